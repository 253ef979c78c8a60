"""Evaluation: calibration, lookback ratio, summarization, and the comparison report, on real
(tiny) models and real runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from smoothkd.cli import app
from smoothkd.distill.config import DistillConfig
from smoothkd.distill.trainer import run as distill
from smoothkd.errors import SmoothkdError
from smoothkd.evaluate.calibration import expected_calibration_error, evaluate_calibration
from smoothkd.evaluate.lookback import lookback_ratios
from smoothkd.evaluate.summarization import load_articles, load_fc_model
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.run import run as precompute

REPO = Path(__file__).resolve().parents[1]
XSUM = REPO / "data" / "xsum" / "xsum_sample.jsonl"
runner = CliRunner()


def test_ece_on_hand_computed_bins():
    # bin (0.8, 0.8667]: confidences 0.85, 0.85 with one correct -> |0.5 - 0.85| * 2/4
    # bin (0.2667, 0.3333]: 0.3, 0.3 both wrong -> |0 - 0.3| * 2/4
    ece, bins = expected_calibration_error(np.array([0.85, 0.85, 0.3, 0.3]), np.array([1, 0, 0, 0]))
    assert ece == pytest.approx(0.5 * 0.35 + 0.5 * 0.3)
    assert sum(b["count"] for b in bins) == 4 and len(bins) == 15
    perfect, _ = expected_calibration_error(np.array([1.0, 1.0, 0.0]), np.array([1, 1, 0]))
    assert perfect == pytest.approx(0.0)


def test_lookback_ratio_of_uniform_attention(tiny_model):
    """Zero query and key projections make every head attend uniformly: the first generated
    token sees only context (ratio 1), every later one context and new tokens alike (0.5)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.k_proj.weight.zero_()
    ratios = lookback_ratios(model, list(range(3, 13)), [20, 21, 22, 23])
    assert ratios.shape == (4, 2, 4)
    assert torch.allclose(ratios[0], torch.ones(2, 4))
    assert torch.allclose(ratios[1:], torch.full((3, 2, 4), 0.5), atol=1e-6)
    real = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager").eval()
    r = lookback_ratios(real, list(range(3, 13)), [20, 21, 22, 23])
    assert ((r > 0) & (r <= 1)).all() and not torch.allclose(r[1:], torch.full_like(r[1:], 0.5))


@pytest.fixture(scope="module")
def runs(tiny_model, dolly, tmp_path_factory):
    """A tiny store and two real distill runs (SFT and KD) from it."""
    root = tmp_path_factory.mktemp("eval")
    store = root / "store"
    precompute(PrecomputeConfig(model=str(tiny_model), dataset=str(dolly), out=str(store), top_k=16, limit=24,
                                part_size=8, max_length=2048, heldout_fraction=0.3), show_progress=False)
    out = []
    for alpha in (0.0, 0.5):
        d = root / f"alpha-{alpha}"
        distill(DistillConfig(model=str(tiny_model), store=str(store), out=str(d), alpha=alpha, lr=1e-3,
                              batch_size=4, max_steps=3), show_progress=False)
        out.append(d)
    return store, out


def test_calibration_matches_a_direct_computation(tiny_model, runs):
    store, _ = runs
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    result = evaluate_calibration(model, str(store))
    m = result["metrics"]
    assert m["n_sequences"] > 0 and 0 <= m["ece"] <= 1 and m["entropy"] > 0
    from smoothkd.storage_schemas import SoftLabelStore

    s = SoftLabelStore(str(store))
    heldout = [i for i, (sp, src) in enumerate(zip(s.table()["split"].to_pylist(), s.table()["source"].to_pylist()))
               if sp == "heldout" and src == "original"]
    nll = []
    for i in heldout:
        seq = s.sequence(i)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.from_numpy(seq.tokens)[None]).logits[0], -1)[seq.prompt_len - 1 : -1]
        nll.append(-lp.gather(-1, torch.from_numpy(seq.targets)[:, None])[:, 0])
    assert m["nll"] == pytest.approx(torch.cat(nll).mean().item(), rel=1e-4)
    assert m["n_tokens"] == sum(len(x) for x in nll)


def test_summarization_and_compare_report_from_two_runs(runs, tmp_path):
    store, (sft, kd) = runs
    for run_dir in (sft, kd):
        r = runner.invoke(app, ["evaluate", "summarization", "--model", str(run_dir), "--dataset", str(XSUM),
                                "--limit", "2", "--max-new-tokens", "12", "--max-prompt-tokens", "400"])
        assert r.exit_code == 0, r.output + r.stderr
        r = runner.invoke(app, ["evaluate", "calibration", "--model", str(run_dir), "--store", str(store)])
        assert r.exit_code == 0, r.output + r.stderr
    metrics = json.loads((sft / "evals" / "summarization" / "metrics.json").read_text())
    assert metrics["metrics"]["n"] == 2 and metrics["metrics"]["hhem"] is None
    assert any("hhem: not computed" in n for n in metrics["notes"])
    examples = [json.loads(x) for x in (sft / "evals" / "summarization" / "examples.jsonl").read_text().splitlines()]
    assert [e["id"] for e in examples] == [a.id for a in load_articles(str(XSUM), 2)]
    assert all(0 < e["lookback_ratio"] <= 1 and e["reference"] for e in examples)

    report = tmp_path / "report"
    r = runner.invoke(app, ["evaluate", "compare", str(sft), str(kd), "--out", str(report)])
    assert r.exit_code == 0, r.output + r.stderr
    md = (report / "report.md").read_text()
    assert "alpha=0 (SFT) original" in md and "alpha=0.5 topk_tail original" in md
    assert "calibration.ece" in md and "summarization.rouge_l" in md
    for png in ("calibration_ece.png", "reliability.png", "lookback.png", "summarization_rouge_l.png"):
        assert (report / png).stat().st_size > 1000, png
    assert "<table>" in (report / "report.html").read_text()
    summary = json.loads((report / "metrics.json").read_text())
    kd_ece = json.loads((kd / "evals" / "calibration" / "metrics.json").read_text())["metrics"]["ece"]
    assert summary["groups"]["alpha=0.5 topk_tail original T=1.0"]["metrics"]["calibration.ece"]["mean"] == kd_ece


def test_missing_optional_models_and_inputs_fail_clearly(tmp_path):
    with pytest.raises(SmoothkdError, match="HHEM needs a local copy"):
        load_fc_model(str(tmp_path / "hhem"))
    r = runner.invoke(app, ["evaluate", "compare", str(tmp_path), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "no evaluations" in r.stderr
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"document": "x"}\n{"summary": "no article"}\n')
    r = runner.invoke(app, ["evaluate", "summarization", "--model", str(tmp_path), "--dataset", str(bad)])
    assert r.exit_code == 2 and "a.jsonl:2: no article text" in " ".join(r.stderr.split())


def test_faithfulness_scores_given_pairs_in_order_and_carries_fields(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    article = "Barack Obama met 2,000 factory workers in Chicago on Tuesday."
    rows = [{"article": article, "summary": "Obama met 2000 workers in Chicago.", "system": "a"},
            {"article": article, "summary": "Obama met 3,000 workers in Boston.", "system": "b"},
            {"article": article, "summary": "it was fine.", "system": "c"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = runner.invoke(app, ["evaluate", "faithfulness", "--pairs", str(pairs), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output + r.stderr
    out = [json.loads(x) for x in (tmp_path / "o" / "examples.jsonl").read_text().splitlines()]
    assert [o["system"] for o in out] == ["a", "b", "c"]
    assert out[0]["unsupported_rate"] == 0 and out[1]["unsupported_rate"] > 0.5 and out[2]["unsupported_rate"] is None
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]
    assert metrics["n"] == 3 and metrics["unsupported_rate"] == pytest.approx(out[1]["unsupported_rate"] / 2)
    pairs.write_text('{"article": "x"}\n')
    r = runner.invoke(app, ["evaluate", "faithfulness", "--pairs", str(pairs), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "pairs.jsonl:1: missing string field 'summary'" in " ".join(r.stderr.split())
