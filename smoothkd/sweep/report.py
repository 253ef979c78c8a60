"""The sweep's report step: its runs and reference models, each with the evaluation steps made for
it, handed to `evaluate compare`'s report (mean +- std, paired verdicts, forgetting)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from smoothkd.evaluate.compare import GROUP_KEYS, REFERENCE_LABEL, Comparison, Run, report
from smoothkd.run_layout import read_eval, read_run_config
from smoothkd.sweep.layout import read_step

_REFERENCE_LABELS = {"start": REFERENCE_LABEL, "teacher": "teacher"}


def write_report(steps_root: Path, cfg: dict[str, Any]) -> Comparison:
    """cfg: the report step's config: run step names, evaluation step names, out."""
    evals: dict[str, dict[str, Any]] = defaultdict(dict)  # model (run step name, start, teacher) -> name -> eval
    roles = {name: read_step(steps_root / name)["role"] for name in cfg["evals"]}
    datasets = {r.get("index") for r in roles.values() if r["kind"] == "summarization"}
    for name, role in roles.items():
        key = role["kind"]
        if key == "summarization" and len(datasets) > 1:  # one column per dataset
            key = f"summarization:{Path(role['dataset']).stem}"
        evals[role["model"]][key] = read_eval(steps_root / name)
    runs = []
    for name in cfg["runs"]:
        config = read_run_config(steps_root / name) or {}
        runs.append(Run(name, steps_root / name, {k: config.get(k) for k in GROUP_KEYS}, evals.get(name, {})))
    references = [Run(label, steps_root, {}, evals[who], label=label)
                  for who, label in _REFERENCE_LABELS.items() if who in evals]
    result = report(runs, Path(cfg["out"]), references)
    (Path(cfg["out"]) / "steps.json").write_text(json.dumps({"runs": cfg["runs"], "evals": cfg["evals"]}, indent=2))
    return result
