"""Evaluation: calibration, lookback ratio, summarization, and the comparison report, on real
(tiny) models and real runs."""

from __future__ import annotations

import dataclasses
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
from smoothkd.tokens import document_prompt

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
    prompt, gen = list(range(3, 13)), [20, 21, 22, 23]
    r = lookback_ratios(real, prompt, gen)
    assert ((r > 0) & (r <= 1)).all() and not torch.allclose(r[1:], torch.full_like(r[1:], 0.5))
    # Independent reference: decode step by step, as generation does, and read the last
    # query row of each step's attention (a row or column off by one would not match).
    for j in range(1, len(gen)):
        with torch.no_grad():
            att = real(torch.tensor([prompt + gen[:j]]), output_attentions=True).attentions  # L x [1, H, T, T]
        last = torch.stack([a[0, :, -1, :] for a in att])  # [L, H, T]
        expected = last[..., :10].mean(-1) / (last[..., :10].mean(-1) + last[..., 10:].mean(-1))
        torch.testing.assert_close(r[j], expected, rtol=1e-5, atol=1e-6)


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
    per_seq = {e["seq"]: e for e in result["examples"]}
    assert sorted(per_seq) == heldout
    for i, x in zip(heldout, nll):
        assert per_seq[i]["n_tokens"] == len(x) and per_seq[i]["nll"] == pytest.approx(x.mean().item(), rel=1e-4)


def test_output_drift_and_the_temperature_scaled_baseline(tiny_model, runs):
    store, (sft, _) = runs
    start = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tuned = AutoModelForCausalLM.from_pretrained(sft).eval()
    same = evaluate_calibration(start, str(store), reference=start)["metrics"]
    assert same["kl_from_reference"] == pytest.approx(0.0, abs=1e-6)
    result = evaluate_calibration(tuned, str(store), reference=start)
    m = result["metrics"]
    # KL(start || tuned) by hand on the first held-out sequence
    from smoothkd.storage_schemas import SoftLabelStore

    first = result["examples"][0]
    seq = SoftLabelStore(str(store)).sequence(first["seq"])
    with torch.no_grad():
        ids = torch.from_numpy(seq.tokens)[None]
        p_ref = torch.log_softmax(start(ids).logits[0], -1)[seq.prompt_len - 1 : -1]
        p = torch.log_softmax(tuned(ids).logits[0], -1)[seq.prompt_len - 1 : -1]
    kl = (p_ref.exp() * (p_ref - p)).sum(-1).mean().item()
    assert m["kl_from_reference"] > 1e-5 and first["kl_from_reference"] == pytest.approx(kl, rel=1e-4)
    # the fitted temperature minimises NLL, so it cannot do worse than T = 1
    assert 0.05 <= m["temperature"] <= 20 and m["nll_scaled"] <= m["nll"] + 1e-6 and 0 <= m["ece_scaled"] <= 1


def test_general_with_a_reference_reports_forgetting(tiny_model, runs, tmp_path):
    _, (sft, _) = runs
    data = Path(__file__).resolve().parents[1] / "data" / "general"
    args = ["evaluate", "general", "--model", str(sft), "--data-dir", str(data), "--limit", "6",
            "--tasks", "arc_easy,openbookqa", "--out", str(tmp_path / "g"), "--reference", str(tiny_model)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "g" / "metrics.json").read_text())["metrics"]
    rows = [json.loads(x) for x in (tmp_path / "g" / "examples.jsonl").read_text().splitlines()]
    for task in ("arc_easy", "openbookqa", "all"):
        mine = [r for r in rows if task in ("all", r["task"])]
        knew = [r for r in mine if r["reference_pred_norm"] == r["gold"]]
        lost = sum(r["pred_norm"] != r["gold"] for r in knew)
        f = metrics["forgetting"][task]
        assert f["n_reference_correct"] == len(knew)
        assert f["forgotten"] == (pytest.approx(lost / len(knew)) if knew else None)
    args[args.index("--model") + 1], args[args.index("--out") + 1] = str(tiny_model), str(tmp_path / "s")
    same = CliRunner().invoke(app, args)
    assert same.exit_code == 0, same.output
    f = json.loads((tmp_path / "s" / "metrics.json").read_text())["metrics"]["forgetting"]["all"]
    assert f["forgotten"] in (0.0, None) and f["learned"] in (0.0, None)


def test_cnndm_style_articles_are_read_and_long_articles_cut_to_fit(tiny_model, tmp_path):
    p = tmp_path / "cnndm.jsonl"
    p.write_text(json.dumps({"id": "a1", "article": "( CNN ) word " * 400, "highlights": "Short ."}) + "\n")
    (a,) = load_articles(str(p))
    assert a.id == "a1" and a.reference == "Short ." and a.text.startswith("( CNN )")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids, seen = document_prompt(tok, a.text, "Summarize.", 200)
    assert len(ids) <= 200 and a.text.startswith(seen.rstrip()) and len(seen) < len(a.text)
    full, whole = document_prompt(tok, "A short article.", "Summarize.", 200)
    assert whole == "A short article." and len(full) < 200
    with pytest.raises(SmoothkdError, match="leaves no room for the article"):
        document_prompt(tok, a.text, "Summarize.", 5)


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
    # the PMI score, by the embedded scorer (the same for every model compared)
    assert metrics["pmi"]["scorer"] == "smollm2-135m-instruct" and all("pmi_faithful" in e for e in examples)
    scored = [e["pmi_mean"] for e in examples if e["pmi_mean"] is not None]  # an empty summary has no tokens
    assert metrics["metrics"]["pmi_mean"] == (pytest.approx(np.mean(scored)) if scored else None)

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


def test_faithfulness_run_from_its_config_writes_what_the_command_writes(tmp_path):
    from smoothkd.evaluate import run
    from smoothkd.evaluate.config import FaithfulnessConfig
    from smoothkd.run_layout import read_eval

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"article": "Ann met Bob in Paris.", "summary": "Ann met Bob in Rome."}) + "\n")
    r = runner.invoke(app, ["evaluate", "faithfulness", "--pairs", str(pairs), "--out", str(tmp_path / "cli"), "--no-pmi"])
    assert r.exit_code == 0, r.output + r.stderr
    result = run.faithfulness(FaithfulnessConfig(pairs=str(pairs), out=str(tmp_path / "lib"), pmi=False))
    assert result.path == tmp_path / "lib" and result.metrics["unsupported_rate"] == pytest.approx(1 / 3)  # Rome, of Ann, Bob, Rome
    for name in ("metrics.json", "examples.jsonl"):
        assert (tmp_path / "lib" / name).read_text() == (tmp_path / "cli" / name).read_text()
    back = read_eval(tmp_path / "lib")
    assert (back.kind, back.model, back.metrics, back.examples, back.extra) == \
        ("faithfulness", "", result.metrics, result.examples, {"pairs": str(pairs)})
    with pytest.raises(SmoothkdError, match="--out is required"):
        run.faithfulness(FaithfulnessConfig(pairs=str(pairs)))


def test_eval_layout_is_read_back_by_run_dir_and_kind(tmp_path):
    from smoothkd.run_layout import (
        EvalResult, eval_dir, find_evals, load_eval, read_run_config, resolve_eval_dir, write_eval,
    )

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert resolve_eval_dir(str(run_dir), "general", None) == run_dir / "evals" / "general"
    assert resolve_eval_dir("smollm2-135m-instruct", "general", tmp_path / "x") == tmp_path / "x"
    with pytest.raises(SmoothkdError, match="--out is required when --model smollm2-135m-instruct"):
        resolve_eval_dir("smollm2-135m-instruct", "general", None)

    cal = EvalResult("calibration", str(run_dir), {"ece": 0.1}, [], [{"seq": 3, "nll": 1.5}], {"split": "heldout"})
    gen = EvalResult("general", str(run_dir), {"arc_easy": {"acc": 0.5}}, ["a note"], [{"id": "q1", "pred": 0}])
    for ev in (cal, gen):
        write_eval(eval_dir(run_dir, ev.kind), ev)
    metrics = json.loads((run_dir / "evals" / "calibration" / "metrics.json").read_text())
    assert list(metrics) == ["kind", "model", "metrics", "notes", "split"]  # as the commands always wrote it
    assert load_eval(run_dir, "calibration") == dataclasses.replace(cal, path=run_dir / "evals" / "calibration")
    found = find_evals(run_dir)
    assert sorted(found) == ["calibration", "general"] and found["general"].notes == ["a note"]
    assert found["general"].examples == gen.examples
    assert sorted(find_evals(run_dir / "evals" / "general")) == ["general"]  # an evaluation directory alone
    assert read_run_config(run_dir) is None
    (run_dir / "smoothkd_run.json").write_text(json.dumps({"config": {"alpha": 0.1}}))
    assert read_run_config(run_dir) == {"alpha": 0.1}


def test_logistic_fit_separates_and_matches_a_known_solution():
    from smoothkd.evaluate.lookback_classifier import auc, fit_logistic

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x @ np.array([2.0, -1.0, 0.0]) + 0.3 > 0).astype(float)
    w, b = fit_logistic(x, y, l2=1.0)
    assert auc(x @ w + b, y) > 0.99
    assert w[0] > 0 > w[1] and abs(w[2]) < 0.5 * abs(w[1])
    # at the optimum the penalised gradient vanishes
    p = 1 / (1 + np.exp(-(x @ w + b)))
    assert np.abs(x.T @ (p - y) + w).max() < 1e-6 and abs((p - y).sum()) < 1e-6
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)


def test_lookback_classifier_trains_on_labelled_pairs_and_scores_summaries(tiny_model, tmp_path):
    articles = [json.loads(x)["document"][:300] for x in XSUM.read_text().splitlines()[:6]]
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"article": a, "summary": a[:80], "label": 1} for a in articles[:3]]  # copied: faithful
    rows += [{"article": a, "summary": "Aliens landed in Paris on 3 May 1850.", "label": 0} for a in articles[3:]]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clf = tmp_path / "lens.json"
    r = runner.invoke(app, ["evaluate", "lookback-train", "--model", str(tiny_model), "--pairs", str(pairs),
                            "--out", str(clf), "--max-prompt-tokens", "400"])
    assert r.exit_code == 0, r.output + r.stderr
    saved = json.loads(clf.read_text())
    assert saved["n"] == 6 and saved["n_features"] == 2 * 4 and saved["train_auc"] > 0.5
    r = runner.invoke(app, ["evaluate", "summarization", "--model", str(tiny_model), "--dataset", str(XSUM),
                            "--limit", "2", "--max-new-tokens", "6", "--max-prompt-tokens", "400",
                            "--lookback-classifier", str(clf), "--no-pmi", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output + r.stderr
    ex = [json.loads(x) for x in (tmp_path / "ev" / "examples.jsonl").read_text().splitlines()]
    assert all(0 <= e["lookback_factual_prob"] <= 1 for e in ex)
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["metrics"]
    assert m["lookback_factual_rate"] == np.mean([e["lookback_factual_prob"] > 0.5 for e in ex])
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**saved, "n_features": 99}))
    r = runner.invoke(app, ["evaluate", "summarization", "--model", str(tiny_model), "--dataset", str(XSUM),
                            "--limit", "1", "--lookback-classifier", str(wrong), "--out", str(tmp_path / "e2")])
    assert r.exit_code == 2 and "trained on 99 features" in " ".join(r.stderr.split())


def test_compare_groups_seeds_of_one_config_and_keeps_other_dirs_apart(tmp_path):
    from smoothkd.evaluate.compare import compare

    def fake_run(name: str, alpha: float, seed: int, ece: float, sources=("original",)) -> Path:
        d = tmp_path / name
        (d / "evals" / "calibration").mkdir(parents=True)
        config = {"alpha": alpha, "loss": "topk_tail", "sources": list(sources), "temperature": 1.0, "seed": seed}
        (d / "smoothkd_run.json").write_text(json.dumps({"config": config}))
        bins = [{"lo": 0, "hi": 1, "count": 1, "accuracy": 0.5, "confidence": 0.6}]
        (d / "evals" / "calibration" / "metrics.json").write_text(
            json.dumps({"kind": "calibration", "metrics": {"ece": ece, "n_tokens": 10}, "reliability": bins}))
        return d

    paths = [fake_run("kd-s0", 0.1, 0, 0.10), fake_run("kd-s1", 0.1, 1, 0.20, ("teacher_greedy", "original")),
             fake_run("kd2-s0", 0.1, 0, 0.30, ("original", "teacher_greedy")), fake_run("sft", 0.0, 0, 0.40)]
    groups = compare(paths, tmp_path / "report").groups
    assert set(groups) == {"alpha=0.1 topk_tail original T=1.0", "alpha=0.1 topk_tail original+teacher_greedy T=1.0",
                           "alpha=0 (SFT) original"}
    mixed = groups["alpha=0.1 topk_tail original+teacher_greedy T=1.0"]  # source order does not matter
    assert sorted(mixed["runs"]) == ["kd-s1", "kd2-s0"]
    assert mixed["metrics"]["calibration.ece"]["mean"] == pytest.approx(0.25)
    assert mixed["metrics"]["calibration.ece"]["std"] == pytest.approx(np.std([0.2, 0.3], ddof=1))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "0.2500 +- 0.0707" in md
    assert "| calibration.n_tokens | 10 | 10 | 10 |" in md


def _classifier_with_its_own_code(path: Path, marker: Path) -> Path:
    """A sequence classifier whose directory ships the code of its model class, as HHEM's does;
    importing that code creates `marker`."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "toy_hhem.py").write_text(f'''
import pathlib

import torch
from transformers import PretrainedConfig, PreTrainedModel

pathlib.Path({str(marker)!r}).touch()


class ToyConfig(PretrainedConfig):
    model_type = "toy-hhem"


class ToyModel(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.post_init()

    def predict(self, pairs):
        return torch.sigmoid(self.bias.detach()).repeat(len(pairs))
''')
    (path / "config.json").write_text(json.dumps({
        "model_type": "toy-hhem", "architectures": ["ToyModel"],
        "auto_map": {"AutoConfig": "toy_hhem.ToyConfig", "AutoModelForSequenceClassification": "toy_hhem.ToyModel"}}))
    save_file({"bias": torch.zeros(())}, path / "model.safetensors")
    return path


def test_fc_model_never_runs_the_code_its_directory_ships(tmp_path):
    """smoothkd loads HHEM with its own code (tests/test_hhem.py); a directory's code never runs."""
    marker = tmp_path / "ran"
    path = _classifier_with_its_own_code(tmp_path / "hhem", marker)
    with pytest.raises(SmoothkdError, match=r"--fc-model: .*hhem/config.json: model_type 'toy-hhem'.*not HHEM-2.1-open"):
        load_fc_model(str(path))
    assert not marker.exists()
    r = runner.invoke(app, ["evaluate", "summarization", "--help"], env={"COLUMNS": "200"})
    assert "--trust-remote-code" not in r.output  # nothing from the directory runs: no flag to let it
