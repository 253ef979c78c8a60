"""The chunked loss (from final hidden states, [chunk, V] at a time) against the whole-batch path
(from the model's logits, [n, V] at once): the same values and gradients on the tiny random Llama."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from smoothkd.batches import Batch, TeacherSampled, TeacherTopK
from smoothkd.precompute.topk import sampled_labels
from smoothkd.distill.config import DistillConfig
from smoothkd.distill.losses import LOSSES
from smoothkd.distill.trainer import loss_step
from smoothkd.errors import SmoothkdError

CHUNK = 7  # rows per chunk: several chunks per batch, the last one short


@pytest.fixture(scope="module")
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model)


def make_batch(vocab: int, k: int, supervised: bool = True, b: int = 3, length: int = 24, seed: int = 0,
               sampled: bool = False) -> Batch:
    """Right-padded sequences of random tokens, responses after a prompt, and a random teacher's
    top-k (with its exact tail) at each supervised position, as StoreDataset lays them out; or, sampled,
    k draws from it as distinct ids with counts."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (b, length), generator=g)
    lengths, prompts = [length, length - 5, length - 9][:b], [6, 9, 4][:b]
    attention_mask = torch.zeros(b, length, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for row, (n, p) in enumerate(zip(lengths, prompts)):
        attention_mask[row, :n] = 1
        mask[row, p - 1 : n - 1] = supervised  # position t predicts token t + 1, a response token
    targets = input_ids[:, 1:][mask[:, :-1]]  # [n]
    logp = torch.log_softmax(torch.randn(targets.numel(), vocab, generator=g, dtype=torch.float64) * 3, -1)
    if sampled:
        lab = sampled_labels(logp.float(), targets, k, torch.Generator().manual_seed(seed))
        teacher = TeacherSampled(torch.from_numpy(lab.ids), torch.from_numpy(lab.counts).float())
        return Batch(list(range(b)), input_ids, attention_mask, mask, targets, teacher)
    vals, ids = logp.topk(k, dim=-1)  # [n, k]
    tail = (1 - vals.exp().sum(-1)).clamp_min(0)  # [n]
    return Batch(list(range(b)), input_ids, attention_mask, mask, targets, TeacherTopK(ids, vals.float(), tail.float()))


def step(model, batch: Batch, chunk: int, **kw) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """loss_step's loss and stats, and the gradient of every trainable parameter."""
    model.zero_grad(set_to_none=True)
    loss, stats = loss_step(model, batch, DistillConfig(loss_chunk_tokens=chunk, **kw), 50.0, keep_positions=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), stats, grads


def assert_same_step(model, batch: Batch, **kw) -> dict[str, torch.Tensor]:
    whole, whole_stats, whole_grads = step(model, batch, 0, **kw)
    chunked, chunked_stats, chunked_grads = step(model, batch, CHUNK, **kw)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert chunked_stats == pytest.approx(whole_stats, rel=1e-5, abs=1e-6)
    assert chunked_grads.keys() == whole_grads.keys() and whole_grads
    for name, g in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-5, atol=1e-5, msg=name)
    return whole_grads


# sampled labels are for temperature 1 only (the loss refuses others)
LOSS_TAUS = [(name, tau) for name in sorted(LOSSES) for tau in (1.0, 2.5) if name != "sampled" or tau == 1.0]


@pytest.mark.parametrize("alpha", [0.0, 0.7])
@pytest.mark.parametrize("name, tau", LOSS_TAUS)
def test_chunked_loss_and_gradients_equal_the_whole_batch_path(model, name, alpha, tau):
    batch = make_batch(model.config.vocab_size, k=16, sampled=name == "sampled")
    assert batch.n_supervised > 3 * CHUNK and batch.n_supervised % CHUNK  # several chunks, the last short
    grads = assert_same_step(model, batch, loss=name, alpha=alpha, temperature=tau)
    assert grads["model.embed_tokens.weight"].abs().max() > 1e-3  # tied: the output layer's gradient too
    assert grads["model.layers.0.mlp.up_proj.weight"].abs().max() > 1e-4
    if alpha:
        assert step(model, batch, CHUNK, loss=name, alpha=alpha, temperature=tau)[1]["kd"] > 0


@pytest.mark.parametrize("name, tau", [(n, t) for n, t in LOSS_TAUS if n != "sampled"])
def test_chunked_equals_whole_with_the_whole_vocabulary_as_top_k(model, name, tau):
    vocab = model.config.vocab_size
    batch = make_batch(vocab, k=vocab)
    assert batch.teacher.ids.shape[1] == vocab and batch.teacher.tail.max() < 1e-6
    assert_same_step(model, batch, loss=name, alpha=0.7, temperature=tau)


def test_an_all_masked_batch_gives_zero_loss_and_zero_gradients(model):
    batch = make_batch(model.config.vocab_size, k=16, supervised=False)
    assert batch.n_supervised == 0
    grads = assert_same_step(model, batch, alpha=0.7, temperature=2.0)
    loss, stats, _ = step(model, batch, CHUNK, alpha=0.7, temperature=2.0)
    assert loss.item() == 0.0 and stats == {"ce": 0.0, "kd": 0.0}
    assert all(not g.any() for g in grads.values())


def test_lora_adapters_get_the_same_gradients(tiny_model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # LoRA B starts at 0, which would leave the A gradients 0 on both paths
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    grads = assert_same_step(lora, make_batch(lora.config.vocab_size, k=16), alpha=0.7, temperature=2.0)
    assert any("lora_A" in n for n in grads) and all("lora_" in n for n in grads)


def test_bfloat16_weights_get_bfloat16_gradients_close_to_the_whole_path(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    batch = make_batch(model.config.vocab_size, k=16)
    whole, _, whole_grads = step(model, batch, 0, alpha=0.7)
    chunked, _, chunked_grads = step(model, batch, CHUNK, alpha=0.7)
    assert chunked.dtype == torch.float32 and chunked_grads["model.embed_tokens.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(chunked, whole, rtol=1e-3, atol=1e-3)  # bf16 sums in another order
    for name, g in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name].float(), g.float(), rtol=0.05, atol=0.05 * g.abs().max().item(),
                                   msg=name)


class LargestVocabTensor(TorchDispatchMode):
    """Records the most rows of any tensor with the vocabulary as its last dimension that an
    operator returns (a real torch dispatch mode: it sees every op, forward and backward)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # new memory only: a view such as the weight transposed [H, V] holds nothing more
            if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[-1] == self.vocab \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_no_tensor_over_the_vocabulary_holds_more_than_a_chunk(model):
    vocab = model.config.vocab_size
    batch = make_batch(vocab, k=16)
    rows = {}
    for chunk in (0, CHUNK):
        with LargestVocabTensor(vocab) as seen:
            loss, _ = loss_step(model, batch, DistillConfig(alpha=0.7, temperature=2.0, loss_chunk_tokens=chunk), 50.0,
                                keep_positions=True)
            loss.backward()
        rows[chunk] = seen.rows
    model.zero_grad(set_to_none=True)
    assert rows[0] >= batch.n_supervised > CHUNK and rows[CHUNK] == CHUNK  # [n, V] on the whole path


def test_scaled_logits_are_refused_with_what_to_set(tmp_path):
    """Granite divides its logits by logits_scaling: not lm_head(hidden), so the chunked path
    would train on other logits than the model's."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, logits_scaling=4.0))
    batch = make_batch(96, k=8)
    with pytest.raises(SmoothkdError, match="GraniteForCausalLM are not its output layer .*--loss-chunk-tokens 0"):
        loss_step(granite, batch, DistillConfig(loss_chunk_tokens=CHUNK), 50.0, keep_positions=True)
    loss, _ = loss_step(granite, batch, DistillConfig(loss_chunk_tokens=0), 50.0, keep_positions=True)
    assert torch.isfinite(loss)


def test_a_model_without_logits_to_keep_uses_the_whole_path(model):
    batch = make_batch(model.config.vocab_size, k=16)
    cfg = DistillConfig(alpha=0.7, loss_chunk_tokens=CHUNK)
    a, _ = loss_step(model, batch, cfg, 50.0, keep_positions=False)
    b, _ = loss_step(model, batch, dataclasses.replace(cfg, loss_chunk_tokens=0), 50.0, keep_positions=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_negative_chunk_is_refused():
    with pytest.raises(SmoothkdError, match="--loss-chunk-tokens must be at least 0, got -1"):
        DistillConfig(store="s", out="o", loss_chunk_tokens=-1).validate(tuple(LOSSES))
