"""Stage two on a tiny random Llama and a tiny store built by stage one."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from smoothkd.batches import StoreDataset
from smoothkd.cli import app
from smoothkd.distill import trainer
from smoothkd.distill.config import DistillConfig
from smoothkd.distill.trainer import loss_step, run
from smoothkd.errors import SmoothkdError
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.run import run as precompute
from smoothkd.storage_schemas import SoftLabelStore

from conftest import build_tiny_model, dies_at_call


@pytest.fixture(scope="module")
def store(tiny_model, dolly, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "store"
    precompute(PrecomputeConfig(model=str(tiny_model), dataset=str(dolly), out=str(out), top_k=16, limit=20,
                                part_size=8, max_length=2048, augment=["greedy"], max_new_tokens=8,
                                heldout_fraction=0.3), show_progress=False)
    return out


def cfg(tiny_model, store, out, **kw) -> DistillConfig:
    base = dict(model=str(tiny_model), store=str(store), out=str(out), lr=1e-3, batch_size=3, max_steps=4,
                save_every=2, alpha=0.5)
    return DistillConfig(**{**base, **kw})


def log(out, name="log.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_loss_goes_down_on_a_fixed_batch(tiny_model, store):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    data = StoreDataset(SoftLabelStore(str(store)), ["original"])
    batch = data.load(data.batches(0, 0, 4)[0])
    c = DistillConfig(alpha=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss, _ = loss_step(model, batch, c, batch.n_supervised, keep_positions=True)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_batches_align_student_positions_with_the_stored_teacher_rows(tiny_model, store):
    """The tiny model is the teacher of its own store: at step 0 its log-probs at the supervised
    positions, gathered at the stored ids, are the stored log-probs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    data = StoreDataset(SoftLabelStore(str(store)), ["original", "teacher_greedy"])
    batch = data.load(data.batches(0, 0, 4)[0])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[batch.supervised], -1)  # [n, V]
    assert logp.shape[0] == batch.targets.numel() == batch.teacher.ids.shape[0]
    assert torch.allclose(logp.gather(-1, batch.teacher.ids), batch.teacher.logprobs, atol=1 / 128 + 1e-4)
    assert (logp.argmax(-1) == batch.teacher.ids[:, 0]).float().mean() > 0.99


def test_length_grouped_batches_pad_less_and_hold_every_sequence_once(store):
    reader = SoftLabelStore(str(store))
    data = StoreDataset(reader, ["original", "teacher_greedy"], pad_id=-1)

    def padded(batches) -> int:
        return sum(len(b) * int(data.n_tokens[b].max()) for b in batches)

    plain = data.batches(1, 3, 2)
    grouped = data.batches(1, 3, 2, group_by_length=True)
    assert sorted(np.concatenate(grouped).tolist()) == sorted(np.concatenate(plain).tolist())  # the same epoch
    assert [len(b) for b in grouped] == [len(b) for b in plain]
    assert padded(grouped) < padded(plain)
    assert [b.tolist() for b in grouped] == [b.tolist() for b in data.batches(1, 3, 2, group_by_length=True)]
    ranks = [data.batches(1, 3, 2, rank=r, world=2, group_by_length=True) for r in (0, 1)]
    assert not set(np.concatenate(ranks[0]).tolist()) & set(np.concatenate(ranks[1]).tolist())
    for positions in grouped:  # rows of several parts, interleaved: each as the reader returns it
        batch = data.load(positions)
        assert batch.targets.tolist() == np.concatenate([reader.sequence(s).targets for s in batch.seqs]).tolist()


def test_a_batch_holds_each_sequence_as_the_reader_returns_it(store):
    """Batches come from whole decoded parts; the reader's one-sequence read is the reference."""
    reader = SoftLabelStore(str(store))
    data = StoreDataset(reader, ["original", "teacher_greedy"], pad_id=-1)
    batches = data.batches(0, 0, 3)
    assert any(len(set(data.part[b])) > 1 for b in batches)  # parts of 8 records: a batch spans two
    for positions in batches:
        batch = data.load(positions)
        seqs = [reader.sequence(s) for s in batch.seqs]
        for row, s in enumerate(seqs):
            n = len(s.tokens)
            assert batch.input_ids[row, :n].tolist() == s.tokens.tolist()
            assert (batch.input_ids[row, n:] == -1).all() and batch.attention_mask[row].sum() == n
            assert batch.supervised[row].nonzero().flatten().tolist() == list(range(s.prompt_len - 1, n - 1))
        assert batch.targets.tolist() == np.concatenate([s.targets for s in seqs]).tolist()
        for field in ("ids", "logprobs", "tail"):
            want = np.concatenate([getattr(s.labels, field) for s in seqs])
            got = getattr(batch.teacher, field)
            assert got.dtype == (torch.long if field == "ids" else torch.float32)
            assert np.array_equal(got.numpy(), want)


def test_logits_at_supervised_positions_only_give_the_same_loss(tiny_model, store):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    data = StoreDataset(SoftLabelStore(str(store)), ["original", "teacher_greedy"])
    batch = data.load(data.batches(0, 0, 4)[0])
    c = DistillConfig(alpha=0.3)
    a, sa = loss_step(model, batch, c, batch.n_supervised, keep_positions=True)
    b, sb = loss_step(model, batch, c, batch.n_supervised, keep_positions=False)
    assert a.item() == pytest.approx(b.item(), rel=1e-5) and sa["kd"] == pytest.approx(sb["kd"], rel=1e-5)


def test_sft_and_kd_runs_see_identical_batches(tiny_model, store, tmp_path):
    run(cfg(tiny_model, store, tmp_path / "sft", alpha=0.0), show_progress=False)
    run(cfg(tiny_model, store, tmp_path / "kd", alpha=1.0, loss="topk_renorm"), show_progress=False)
    sft, kd = log(tmp_path / "sft"), log(tmp_path / "kd")
    assert [r["seqs"] for r in sft] == [r["seqs"] for r in kd]
    assert [r["supervised_tokens"] for r in sft] == [r["supervised_tokens"] for r in kd]
    assert all(r["kd"] == 0 for r in sft) and all(r["kd"] > 0 for r in kd)
    assert sft[0]["ce"] == pytest.approx(kd[0]["ce"], rel=1e-6)  # same start, same first batch


def test_epoch_covers_every_train_sequence_once_and_skips_heldout(tiny_model, store, tmp_path):
    s = SoftLabelStore(str(store))
    t = s.table()
    train = {q for q, src, sp in zip(t["seq"].to_pylist(), t["source"].to_pylist(), t["split"].to_pylist())
             if sp == "train" and src in ("original", "teacher_greedy")}
    assert len(train) < s.n_sequences  # some are held out
    run(cfg(tiny_model, store, tmp_path / "r", max_steps=None, epochs=1, sources=["original", "teacher_greedy"]),
        show_progress=False)
    seen = [q for r in log(tmp_path / "r") for q in r["seqs"]]
    assert sorted(seen) == sorted(train)


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_model, store, tmp_path, monkeypatch):
    run(cfg(tiny_model, store, tmp_path / "full", max_steps=6, save_every=2, grad_accum=2), show_progress=False)
    real = trainer.loss_step
    # two micro-batches a step: call 8 is step 4's second, after its first has added gradients
    monkeypatch.setattr(trainer, "loss_step", dies_at_call(real, 8))
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tiny_model, store, tmp_path / "cut", max_steps=6, save_every=2, grad_accum=2), show_progress=False)
    monkeypatch.setattr(trainer, "loss_step", real)
    with pytest.raises(SmoothkdError, match="pass --resume"):
        run(cfg(tiny_model, store, tmp_path / "cut", max_steps=6, save_every=2, grad_accum=2), show_progress=False)
    with pytest.raises(SmoothkdError, match=r"seed: 0 -> 1"):
        run(cfg(tiny_model, store, tmp_path / "cut", max_steps=6, save_every=2, grad_accum=2, resume=True, seed=1),
            show_progress=False)
    run(cfg(tiny_model, store, tmp_path / "cut", max_steps=6, save_every=2, grad_accum=2, resume=True),
        show_progress=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in log(tmp_path / "full")] == [r["loss"] for r in log(tmp_path / "cut")]


def test_run_directory_is_a_loadable_checkpoint_with_its_record(tiny_model, store, tmp_path):
    run(cfg(tiny_model, store, tmp_path / "r"), show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    record = json.loads((tmp_path / "r" / "smoothkd_run.json").read_text())
    assert record["config"]["alpha"] == 0.5
    assert record["store"]["tokenizer"] == SoftLabelStore(str(store)).manifest.tokenizer
    assert set(log(tmp_path / "r")[0]) >= {"step", "loss", "ce", "kd", "lr", "tokens_per_s"}


def test_freeze_keeps_named_groups_fixed(tiny_model, store, tmp_path):
    run(cfg(tiny_model, store, tmp_path / "r", freeze=["embed", "layers:0-0"]), show_progress=False)
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "r").state_dict()
    for k in after:  # the tiny model ties lm_head to the embeddings: freezing one freezes both
        frozen = "embed_tokens" in k or k == "lm_head.weight" or "layers.0." in k
        assert torch.equal(before[k], after[k]) == frozen, k


def test_freeze_lm_head_of_a_tied_model_and_freeze_with_lora_is_refused(tiny_model, store, tmp_path):
    run(cfg(tiny_model, store, tmp_path / "r", freeze=["lm_head"]), show_progress=False)
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "r").state_dict()
    assert torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    with pytest.raises(SmoothkdError, match="--freeze has no effect with --lora"):
        run(cfg(tiny_model, store, tmp_path / "r2", freeze=["attn"], lora=True), show_progress=False)


def test_incomplete_store_is_refused(tiny_model, store, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(store, partial)
    (partial / "parts" / "part-000001" / "commit.json").unlink()
    with pytest.raises(SmoothkdError, match="is incomplete"):
        run(cfg(tiny_model, partial, tmp_path / "r"), show_progress=False)
    run(cfg(tiny_model, partial, tmp_path / "r", allow_incomplete_store=True), show_progress=False)


def test_lora_saves_an_adapter_and_a_merged_model(tiny_model, store, tmp_path):
    run(cfg(tiny_model, store, tmp_path / "r", lora=True, lora_rank=4, lr=1e-2), show_progress=False)
    assert (tmp_path / "r" / "adapter" / "adapter_config.json").exists()
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "r").state_dict()
    assert set(after) == set(before)
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])


def test_a_student_with_another_tokenizer_is_refused(store, tmp_path):
    other = build_tiny_model(tmp_path / "other", vocab_size=320, seed=1)
    with pytest.raises(SmoothkdError, match="tokenizer .* differs from the one the store was built with"):
        run(cfg(other, store, tmp_path / "r"), show_progress=False)
    assert not (tmp_path / "r").exists()


def test_bad_options_are_refused_before_training(tiny_model, store, tmp_path):
    result = CliRunner().invoke(app, ["distill", "student", "--model", str(tiny_model), "--store", str(store),
                                      "--out", str(tmp_path / "r"), "--alpha", "-1", "--temperature", "0",
                                      "--sources", ",", "--freeze", "wings"])
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    for needle in ("--alpha must be a finite number >= 0", "--temperature must be a finite number > 0",
                   "--sources selects nothing",
                   "--freeze 'wings'"):
        assert needle in message, message
    with pytest.raises(SmoothkdError, match="has no train sequences from sources"):
        StoreDataset(SoftLabelStore(str(store)), ["nothing"])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", "inf", "--temperature must be a finite number > 0, got inf"),
    ("--alpha", "nan", "--alpha must be a finite number >= 0 (0 is plain SFT), got nan"),
    ("--lr", "nan", "--lr must be a finite number in (0, 1]"),
    ("--lr", "1e38", "--lr must be a finite number in (0, 1]"),
    ("--weight-decay", "-inf", "--weight-decay must be a finite number >= 0, got -inf"),
    ("--max-grad-norm", "nan", "--max-grad-norm must be a finite number >= 0 (0: no clipping), got nan"),
    ("--warmup-steps", "-1", "--warmup-steps must be at least 0, got -1"),
])
def test_non_finite_and_out_of_range_options_are_refused_from_the_command_line(tiny_model, store, tmp_path, flag,
                                                                               value, needle):
    result = CliRunner().invoke(app, ["distill", "student", "--model", str(tiny_model), "--store", str(store),
                                      "--out", str(tmp_path / "r"), flag, value])
    assert result.exit_code == 2 and needle in " ".join(result.stderr.split()), result.stderr
    assert not (tmp_path / "r").exists()


def test_two_processes_read_disjoint_slices_that_cover_each_epoch(tiny_model, store, tmp_path):
    """torch.distributed on the CPU (gloo), 2 processes under torchrun, an odd number of
    sequences (one rank has a batch fewer) and two epochs."""
    data = StoreDataset(SoftLabelStore(str(store)), ["original"])
    assert len(data) % 2 == 1  # so the ranks' batch counts differ
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "smoothkd.cli", "distill", "student", "--model", str(tiny_model), "--store", str(store),
           "--out", str(out), "--batch-size", "1", "--epochs", "2", "--sources", "original",
           "--lr", "1e-3", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [log(out), log(out, "log-rank1.jsonl")]
    assert [len(x) for x in logs] == [len(logs[0])] * 2  # every rank takes the same steps
    for epoch in (0, 1):
        seen = [[q for r in x if r["epoch"] == epoch for q in r["seqs"]] for x in logs]
        assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(int(q) for q in data.seq)
    AutoModelForCausalLM.from_pretrained(out)  # rank 0 saved a loadable checkpoint


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "smoothkd.cli", "distill", "student", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_fsdp_trains_like_ddp_and_saves_whole_weights(tiny_model, store, tmp_path):
    """FSDP2 on the CPU (gloo), 2 processes: the same losses step by step and the same final
    weights as DDP; its checkpoint (gathered from the shards) loads back with --resume."""
    base = ["--model", str(tiny_model), "--store", str(store), "--batch-size", "2", "--max-steps", "4",
            "--save-every", "2", "--lr", "1e-3", "--alpha", "0.5", "--json"]
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        proc = _torchrun([*base, "--out", str(tmp_path / name), *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, fsdp = log(tmp_path / "ddp"), log(tmp_path / "fsdp")
    assert [r["seqs"] for r in ddp] == [r["seqs"] for r in fsdp] and len(fsdp) == 4
    for a, b in zip(ddp, fsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").state_dict()
    assert wa.keys() == wb.keys()
    from safetensors import safe_open

    stored = [set(safe_open(tmp_path / n / "model.safetensors", "pt").keys()) for n in ("ddp", "fsdp")]
    assert stored[0] == stored[1]  # tied weights saved once, as save_pretrained does
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    assert any(not torch.equal(start[k], wb[k]) for k in wb)  # it trained
    saved = safe_open(tmp_path / "fsdp" / "checkpoint" / "params.safetensors", "pt").keys()
    assert set(saved) == dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters()).keys()
    again = _torchrun([*base, "--out", str(tmp_path / "fsdp"), "--fsdp", "--resume"])
    said = " ".join(again.stderr.split())  # rich wraps lines
    assert again.returncode == 0 and "at step 4 (epoch 0, batch 4)" in said, again.stderr[-3000:]


def test_fsdp_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_model, store, tmp_path):
    """Killed in step 4 on both ranks, resumed from the step-2 checkpoint (gathered shards,
    optimizer state included): the same losses and weights as the uninterrupted FSDP run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "fsdp_resume_driver.py"), str(tiny_model), str(store), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, cut = log(tmp_path / "full"), log(tmp_path / "cut")
    assert len(full) == 6 and [r["loss"] for r in full] == [r["loss"] for r in cut]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_run_saved_before_an_option_existed_takes_its_default(tiny_model, store, tmp_path):
    out = tmp_path / "r"
    run(cfg(tiny_model, store, out, max_steps=2, save_every=1), show_progress=False)
    path = out / "checkpoint" / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["run"]["fsdp"]  # as written by smoothkd before --fsdp
    path.write_text(json.dumps(state))
    summary = run(cfg(tiny_model, store, out, max_steps=2, save_every=1, resume=True), show_progress=False)
    assert summary.steps == 2


def test_resume_refuses_a_change_to_each_compared_option_and_allows_the_others(tiny_model, store, tmp_path):
    """Every option not marked resume=False is compared, each before anything loads."""
    out = tmp_path / "r"
    base = cfg(tiny_model, store, out, max_steps=2, save_every=1)
    run(base, show_progress=False)
    shutil.copytree(store, tmp_path / "same-labels")
    changed = {"store": str(tmp_path / "same-labels"), "model": "another-student", "loss": "topk_renorm",
               "sources": ["original", "teacher_greedy"], "freeze": ["embed"]}
    fields = dataclasses.fields(DistillConfig)
    for f in fields:
        if not f.metadata["resume"]:
            continue
        old = getattr(base, f.name)
        new = changed[f.name] if f.name in changed else (not old if isinstance(old, bool) else
                                                         old + 0.5 if isinstance(old, float) else (old or 1) + 1)
        with pytest.raises(SmoothkdError, match=re.escape(f"{f.name}: {old!r} -> {new!r}")):
            run(dataclasses.replace(base, resume=True, **{f.name: new}), show_progress=False)
    free = {f.name for f in fields if not f.metadata["resume"]}
    assert free == {"out", "resume", "save_every", "allow_incomplete_store", "dtype", "device", "loss_chunk_tokens"}
    again = run(dataclasses.replace(base, resume=True, save_every=2, allow_incomplete_store=True, dtype="float32",
                                    device="cpu"), show_progress=False)
    assert again.steps == 2 and again.last == {}  # resumed a finished run: nothing to do


def test_resume_with_fsdp_toggled_is_refused_before_loading(tiny_model, store, tmp_path):
    run(cfg(tiny_model, store, tmp_path / "r", max_steps=2), show_progress=False)
    with pytest.raises(SmoothkdError, match=r"fsdp: False -> True"):
        run(cfg(tiny_model, store, tmp_path / "r", max_steps=2, resume=True, fsdp=True), show_progress=False)


def test_fsdp_needs_several_processes_and_no_lora(tiny_model, store, tmp_path):
    with pytest.raises(SmoothkdError, match="start it under torchrun"):
        run(cfg(tiny_model, store, tmp_path / "a", fsdp=True), show_progress=False)
    with pytest.raises(SmoothkdError, match="--fsdp with --lora"):
        run(cfg(tiny_model, store, tmp_path / "b", fsdp=True, lora=True), show_progress=False)


def test_accelerate_launch_runs_the_same_distributed_training(tiny_model, store, tmp_path):
    """`accelerate launch --multi_gpu` starts the same torch.distributed processes (here 2 on the CPU)."""
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "smoothkd.cli", "distill", "student", "--model", str(tiny_model), "--store", str(store),
           "--out", str(out), "--batch-size", "2", "--max-steps", "2", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [log(out), log(out, "log-rank1.jsonl")]
    assert [len(x) for x in logs] == [2, 2]
    assert not set(logs[0][0]["seqs"]) & set(logs[1][0]["seqs"])  # disjoint slices
    assert json.loads((out / "smoothkd_run.json").read_text())["summary"]["steps"] == 2
