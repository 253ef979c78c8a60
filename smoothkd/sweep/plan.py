"""From a sweep file to a plan: every step with its resolved config, its inputs and its directory.

A step's directory is named by a short hash of what determines its output: its kind, its
config as the sweep file states it (paths as written there, other steps by name) and the
names of the steps it reads (whose names carry their own hashes). So a re-run finds finished
steps where it left them, and a value added to one grid axis makes new directories only for
the steps that value changes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoothkd.distill.config import DistillConfig
from smoothkd.errors import InputError, SmoothkdError
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.sweep.schema import Sweep

STEPS_DIR = "steps"
STORE_SUBDIR = "store"  # a precompute step's store, beside its step.json and log
HASH_LEN = 8

# kinds of step, in the order a sweep runs them
PRECOMPUTE, DISTILL, SUMMARIZATION, GENERAL, CALIBRATION, REPORT = (
    "precompute", "distill", "summarization", "general", "calibration", "report")
EVAL_KINDS = (SUMMARIZATION, GENERAL, CALIBRATION)


@dataclass(frozen=True)
class Step:
    name: str  # the directory under <out>/steps/, e.g. run-a0.1-seed1-1f3a9c2e
    kind: str
    config: dict[str, Any]  # the stage config's fields, paths resolved, ready to run
    needs: tuple[str, ...]  # steps whose output this one reads
    cost_tokens: int  # a rough estimate of the tokens it processes, for planning
    role: dict[str, Any] = field(default_factory=dict)  # for the report: which run, model or evaluation it is


@dataclass(frozen=True)
class Plan:
    sweep: Sweep
    out: Path
    steps: dict[str, Step]  # name -> step, dependencies before the steps that need them

    def dir(self, name: str) -> Path:
        return self.out / STEPS_DIR / name


def build_plan(sweep: Sweep) -> Plan:
    out = Path(sweep.path(sweep.file.out))
    steps: dict[str, Step] = {}
    f = sweep.file

    def add(prefix: str, kind: str, stated: dict[str, Any], config: dict[str, Any], needs: tuple[str, ...],
            cost: int, role: dict[str, Any] | None = None) -> Step:
        digest = hashlib.sha256(json.dumps({"kind": kind, "config": stated, "needs": needs}, sort_keys=True,
                                           default=str).encode()).hexdigest()[:HASH_LEN]
        name = f"{prefix}-{digest}"
        # where the stage writes: a store goes in a folder of its own beside the step's log
        target = step_path(name, STORE_SUBDIR) if kind == PRECOMPUTE else step_path(name)
        steps.setdefault(name, Step(name, kind, {**config, "out": target}, needs, cost, role or {}))
        return steps[name]

    def step_path(name: str, sub: str = "") -> str:
        return str(out / STEPS_DIR / name / sub) if sub else str(out / STEPS_DIR / name)

    records, tokens_per_record = _dataset_size(sweep)
    dataset = {"dataset": f.dataset.path, "limit": f.dataset.limit}
    dataset_resolved = {"dataset": sweep.path(f.dataset.path), "limit": f.dataset.limit}
    store_tokens = records * tokens_per_record

    teacher_model, teacher_stated, teacher_needs = _model(sweep, f.teacher.model), f.teacher.model, ()
    if sweep.finetune is not None:
        # Plain SFT needs the dataset's token stream: a store of the untuned teacher with k = 1 (its
        # labels are never read at alpha 0), with the same split, lengths and parts as the main store.
        stated = {**sweep.store, **dataset, "model": f.teacher.model, "top_k": 1, "augment": []}
        sft_store = add("sftstore", PRECOMPUTE, stated, _precompute(stated, dataset_resolved, teacher_model), (),
                        store_tokens, {"ray_shards": f.ray_shards} if f.ray_shards else {})
        stated = {**sweep.finetune, "alpha": 0.0, "model": f.teacher.model, "store": f"step:{sft_store.name}"}
        ft = add("teacher", DISTILL, stated,
                 _distill({**sweep.finetune, "alpha": 0.0}, teacher_model, step_path(sft_store.name, STORE_SUBDIR)),
                 (sft_store.name,), _train_tokens(sweep.finetune, store_tokens), {"role": "teacher"})
        teacher_model, teacher_stated, teacher_needs = step_path(ft.name), f"step:{ft.name}", (ft.name,)

    stated = {**sweep.store, **dataset, "model": teacher_stated}
    # how a store is built (shards as Ray tasks or not) does not change it: a role, not in the hash
    shards = {"ray_shards": f.ray_shards} if f.ray_shards else {}
    store = add("store", PRECOMPUTE, stated, _precompute(stated, dataset_resolved, teacher_model), teacher_needs,
                store_tokens * (2 if sweep.store.get("augment") else 1), shards)
    store_url = step_path(store.name, STORE_SUBDIR)

    student = _model(sweep, f.student.model)
    runs = []
    for point in grid_points(sweep):
        options = {**sweep.train, **point}
        stated = {**options, "model": f.student.model, "store": f"step:{store.name}"}
        runs.append(add(_run_prefix(point, sweep.grid), DISTILL, stated, _distill(options, student, store_url),
                        (store.name,), _train_tokens(options, store_tokens), {"role": "run", "grid": point}))

    # Reference rows: the student before training (forgetting's baseline) and the teacher.
    models = [("start", student, f.student.model, ())]
    if teacher_model != student:
        models.append(("teacher", teacher_model, teacher_stated, teacher_needs))
    models += [(r.name, step_path(r.name), f"step:{r.name}", (r.name,)) for r in runs]
    evals = []
    for who, model, model_stated, needs in models:
        for i, s in enumerate(f.evaluate.summarization):
            opts = s.model_dump()
            cfg = {**opts, "dataset": sweep.path(s.dataset), "model": model}
            evals.append(add(f"summ{i}-{who[:24]}", SUMMARIZATION, {**opts, "model": model_stated},
                             cfg, needs, (s.limit or 100) * (s.max_prompt_tokens + s.max_new_tokens),
                             {"kind": SUMMARIZATION, "model": who, "dataset": s.dataset, "index": i}))
        if f.evaluate.general:
            g = f.evaluate.general.model_dump()
            cfg = {**g, "data_dir": sweep.path(g["data_dir"]), "model": model, "tasks": list(g["tasks"])}
            evals.append(add(f"general-{who[:24]}", GENERAL, {**g, "model": model_stated}, cfg,
                             needs, len(g["tasks"]) * (g["limit"] or 500) * 4 * 64, {"kind": GENERAL, "model": who}))
        if f.evaluate.calibration:
            c = f.evaluate.calibration.model_dump()
            ref = f.student.model if f.evaluate.forgetting else None
            cfg = {**c, "model": model, "store": store_url,
                   "reference": student if f.evaluate.forgetting and model != student else None}
            evals.append(add(f"calib-{who[:24]}", CALIBRATION,
                             {**c, "model": model_stated, "store": f"step:{store.name}", "reference": ref},
                             cfg, (*needs, store.name),
                             int(store_tokens * float(sweep.store.get("heldout_fraction", 0.05)) + 1),
                             {"kind": CALIBRATION, "model": who}))
    names = {"runs": [r.name for r in runs], "evals": [e.name for e in evals]}
    add("report", REPORT, names, names, tuple(r.name for r in runs) + tuple(e.name for e in evals), 0)
    return Plan(sweep, out, steps)


def grid_points(sweep: Sweep) -> list[dict[str, Any]]:
    """The grid's product; alpha 0 (the SFT baseline) always in it, once per remaining point (its
    loss and temperature play no part, so they are set to the defaults and SFT runs are shared)."""
    grid = dict(sweep.grid)
    alphas = [float(a) for a in grid.pop("alpha", [DistillConfig.alpha])]
    if 0.0 not in alphas:
        alphas = [0.0, *alphas]
    keys = sorted(grid)
    points, seen = [], set()
    for alpha in alphas:
        for values in itertools.product(*(grid[k] for k in keys)):
            point = {"alpha": alpha, **dict(zip(keys, values))}
            if alpha == 0.0:
                point = {**point, **{k: getattr(DistillConfig, k) for k in ("loss", "temperature") if k in point}}
            key = json.dumps(point, sort_keys=True)
            if key not in seen:
                seen.add(key)
                points.append(point)
    return points


def _run_prefix(point: dict[str, Any], grid: dict[str, list[Any]]) -> str:
    """A readable name from the grid values that vary (the hash keeps it unique)."""
    short = {"batch_size": "bs", "seed": "s", "sources": "src", "loss": "", "temperature": "T", "freeze": "fz"}
    parts = [f"a{point['alpha']:g}"]
    for k in sorted(point):
        if k == "alpha" or len(grid.get(k, [])) < 2:
            continue
        v = point[k]
        v = "+".join(x[:4] for x in v) or "none" if isinstance(v, list) else (f"{v:g}" if isinstance(v, float) else v)
        parts.append(f"{short.get(k, k)}{v}")
    return "run-" + "-".join(str(p) for p in parts).replace("/", "_")


def _model(sweep: Sweep, model: str) -> str:
    """An embedded name stays a name; anything else is a path relative to the sweep file."""
    from smoothkd.models import EMBEDDED

    return model if model in EMBEDDED else sweep.path(model)


def _precompute(stated: dict[str, Any], dataset: dict[str, Any], model: str) -> dict[str, Any]:
    cfg = {**stated, **dataset, "model": model}
    try:
        PrecomputeConfig(**{**cfg, "out": "x"}).validate(("hf", "vllm"))
    except (TypeError, SmoothkdError) as e:
        raise InputError(f"store options: {e}") from e
    return cfg


def _distill(options: dict[str, Any], model: str, store: str) -> dict[str, Any]:
    from smoothkd.distill.losses import LOSSES  # torch: not at import, so that `smoothkd --help` stays quick

    cfg = {**options, "model": model, "store": store, "resume": True}
    try:
        DistillConfig(**{**cfg, "out": "x"}).validate(tuple(LOSSES))
    except (TypeError, SmoothkdError) as e:
        raise InputError(f"training options {options}: {e}") from e
    return cfg


def _train_tokens(options: dict[str, Any], store_tokens: int) -> int:
    return store_tokens * int(options.get("epochs", DistillConfig.epochs))


def _dataset_size(sweep: Sweep) -> tuple[int, int]:
    """(records used, a rough token count per record: characters / 4), for cost estimates only."""
    path = Path(sweep.path(sweep.file.dataset.path))
    if path.suffix != ".jsonl":
        return sweep.file.dataset.limit or 1000, 200
    n, chars = 0, 0
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                n += 1
                chars += len(line)
                if sweep.file.dataset.limit and n >= sweep.file.dataset.limit:
                    break
    return n, max(1, chars // max(n, 1) // 4)
