"""The report's paired verdicts and forgetting, from evaluation directories written by hand."""

import json

import numpy as np

from smoothkd.evaluate.compare import compare
from smoothkd.run_layout import RUN_FILE, EvalResult, eval_dir, write_eval


def make_run(root, name, alpha, rouge, correct, seed=0):
    """A run directory: its config record, a summarization and a general evaluation."""
    d = root / name
    d.mkdir(parents=True)
    config = {"alpha": alpha, "loss": "topk_tail", "sources": ["original"], "temperature": 1.0, "freeze": [],
              "seed": seed}
    (d / RUN_FILE).write_text(json.dumps({"config": config}))
    summ = [{"id": str(i), "rouge_l_reference": float(r), "unsupported_rate": 0.5} for i, r in enumerate(rouge)]
    write_eval(eval_dir(d, "summarization"),
               EvalResult("summarization", str(d), {"rouge_l": float(np.mean(rouge))}, [], summ))
    items = [{"task": "arc_easy", "id": f"q{i}", "gold": 0, "pred": 0, "pred_norm": 0 if c else 1}
             for i, c in enumerate(correct)]
    write_eval(eval_dir(d, "general"), EvalResult("general", str(d), {"arc_easy": {"acc_norm": float(np.mean(correct))}},
                                                  [], items))
    return d


def test_a_planted_gain_is_called_better_and_no_change_is_not(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.5, size=60)
    ref_correct = np.array([1] * 30 + [0] * 30, dtype=bool)
    sft_correct = ref_correct.copy()
    sft_correct[:6] = False  # SFT forgot 6 of the 30 items the start model knew
    runs = [make_run(tmp_path, f"sft{s}", 0.0, base + rng.normal(0, 0.01, 60), sft_correct, s) for s in range(2)]
    runs += [make_run(tmp_path, f"kd{s}", 1.0, base + 0.05 + rng.normal(0, 0.01, 60), sft_correct, s)
             for s in range(2)]
    start = make_run(tmp_path, "start", 0.0, base, ref_correct)
    (start / RUN_FILE).unlink()  # the start model is a reference, not a run

    result = compare(runs, tmp_path / "report", reference=start)
    by = {(v["group"], v["metric"]): v for v in result.verdicts}
    kd = "alpha=1.0 topk_tail original T=1.0"
    assert by[(kd, "rouge_l")]["verdict"] == "better" and by[(kd, "rouge_l")]["ci_low"] > 0
    assert abs(by[(kd, "rouge_l")]["diff"] - 0.05) < 0.01
    assert by[(kd, "unsupported_rate")]["verdict"] == "no detectable difference"
    assert by[(kd, "acc_norm")]["diff"] == 0 and by[(kd, "acc_norm")]["n"] == 60
    assert all(v["group"] != "alpha=0 (SFT) original" for v in result.verdicts)  # SFT is the baseline

    f = {(x["group"], x["task"]): x for x in result.forgetting}
    sft = f[("alpha=0 (SFT) original", "arc_easy")]
    assert (sft["forgotten"]["k"], sft["forgotten"]["n"]) == (12, 60)  # 6 of 30, pooled over 2 runs
    assert sft["learned"]["k"] == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.index("## Verdict") < md.index("## Forgetting") < md.index("## All metrics")
    assert "start model" in md and (tmp_path / "report" / "forest_summarization_rouge_l.png").exists()
