"""What a run directory holds, for the stages that write it and the tools that read it.

    <run>/smoothkd_run.json              the trainer's record: resolved config, summary, versions
    <run>/log.jsonl                      the loss and the sequences of every optimizer step
    <run>/checkpoint/                    the last resumable checkpoint (smoothkd.distill.checkpoint)
    <run>/evals/<kind>/metrics.json      one evaluation: kind, model, metrics, notes, kind-specific fields
    <run>/evals/<kind>/examples.jsonl    its per-example rows, one JSON object a line, in input order

An evaluation directory may also stand alone (`evaluate ... --out DIR`). No torch import here:
the trainer, the evaluations, compare and a sweep all import this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from smoothkd.errors import InputError, SmoothkdError

RUN_FILE = "smoothkd_run.json"
LOSS_LOG = "log.jsonl"  # the trainer's losses and sequences per step
CHECKPOINT = "checkpoint"  # the resumable checkpoint's directory (smoothkd.distill.checkpoint)
EVALS_DIR = "evals"
METRICS_FILE = "metrics.json"
EXAMPLES_FILE = "examples.jsonl"
_HEADER = ("kind", "model", "metrics", "notes")  # metrics.json's fields that every evaluation has


@dataclass(frozen=True)
class EvalResult:
    """One evaluation: what metrics.json and examples.jsonl hold."""

    kind: str  # summarization, general, calibration, faithfulness
    model: str  # what was evaluated, as given to --model ("" when nothing was: faithfulness)
    metrics: dict[str, Any]  # name -> number, None (not computed) or, for general, task -> numbers
    notes: list[str] = field(default_factory=list)  # what was not computed, and why
    examples: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific fields: dataset, store, reliability, ...
    path: Path | None = None  # the evaluation directory it was written to or read from


def eval_dir(run_dir: str | Path, kind: str) -> Path:
    """Where a run's evaluation of this kind lives."""
    return Path(run_dir) / EVALS_DIR / kind


def resolve_eval_dir(model: str, kind: str, out: str | Path | None) -> Path:
    """--out, or <model>/evals/<kind> when the model is a local directory (a run, a checkpoint)."""
    if out is not None:
        return Path(out)
    if Path(model).is_dir():
        return eval_dir(model, kind)
    raise SmoothkdError(f"--out is required when --model {model} is not a local directory")


def write_eval(out_dir: str | Path, result: EvalResult) -> EvalResult:
    """Write metrics.json and examples.jsonl; the result, with its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / EXAMPLES_FILE, "w") as f:
        for e in result.examples:
            f.write(json.dumps(e) + "\n")
    header = {"kind": result.kind, "model": result.model, "metrics": result.metrics, "notes": result.notes}
    (out_dir / METRICS_FILE).write_text(json.dumps({**header, **result.extra}, indent=2))
    return replace(result, path=out_dir)


def read_eval(path: str | Path) -> EvalResult:
    """The evaluation in a directory holding metrics.json (examples.jsonl, when present)."""
    path = Path(path)
    file = path / METRICS_FILE
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{file}: cannot be read as JSON ({e})") from e
    examples = []
    if (path / EXAMPLES_FILE).exists():
        from smoothkd.jsonl import read_jsonl

        examples = [row for _, row in read_jsonl(path / EXAMPLES_FILE)]
    return EvalResult(kind=data.get("kind", path.name), model=data.get("model", ""), metrics=data.get("metrics", {}),
                      notes=data.get("notes", []), examples=examples,
                      extra={k: v for k, v in data.items() if k not in _HEADER}, path=path)


def load_eval(run_dir: str | Path, kind: str) -> EvalResult:
    """A run's evaluation of this kind."""
    return read_eval(eval_dir(run_dir, kind))


def find_evals(path: str | Path) -> dict[str, EvalResult]:
    """kind -> evaluation, for a run directory (its evals/*/) or an evaluation directory itself."""
    path = Path(path)
    dirs = sorted(m.parent for m in path.glob(f"{EVALS_DIR}/*/{METRICS_FILE}"))
    if (path / METRICS_FILE).exists():
        dirs.append(path)
    found = [read_eval(d) for d in dirs]
    return {e.kind: e for e in found}


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The resolved config a distill run recorded, or None when the directory is not a run."""
    record = Path(run_dir) / RUN_FILE
    if not record.exists():
        return None
    try:
        return json.loads(record.read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise InputError(f"{record}: not a smoothkd run record ({e})") from e
