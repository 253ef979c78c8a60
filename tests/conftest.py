"""Shared fixtures: a tiny random Llama with a real (small, trained-here) tokenizer, the
bundled Dolly sample, and the embedded SmolLM2 for the end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOLLY = REPO / "data" / "dolly" / "dolly_sample.jsonl"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(path: Path, vocab_size: int = 384, seed: int = 0) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on the Dolly sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for line in DOLLY.read_text().splitlines():
        r = json.loads(line)
        texts += [r["instruction"], r["context"], r["response"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform outputs; scale the embeddings up so the teacher is peaked
    # like a real one (top-k mass well above k/V) and the tail is not ~1 everywhere.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def dolly() -> Path:
    return DOLLY


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The real embedded teacher (pulled from PyPI by `make model` on first use)."""
    from smoothkd.models import resolve

    return resolve("smollm2-135m-instruct")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def need(module: str):
    """Import an optional extra's module for a test. Missing: a skip on a developer's machine,
    a failure where SMOOTHKD_REQUIRE_EXTRAS=1 (the Makefile's test target, hence CI)."""
    import importlib
    import os

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("SMOOTHKD_REQUIRE_EXTRAS") == "1":
            pytest.fail(f"{module} is not installed but SMOOTHKD_REQUIRE_EXTRAS=1: {e}")
        pytest.skip(f"optional extra not installed: {module}")


def dies_at_call(fn, n: int):
    """`fn`, but the n-th call raises KeyboardInterrupt: a run killed at a known point."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped
