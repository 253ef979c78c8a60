"""From a sweep file to a plan: every step with its resolved config, its inputs and its directory.

A step's directory is named by a short hash of what determines its output: its kind, its
config as the sweep file states it (paths relative to the steps directory, so that every sweep
sharing it names a file alike, on any machine; other steps by name) and the names of the steps it reads (whose names carry their own hashes). So a re-run finds finished
steps where it left them, and a value added to one grid axis makes new directories only for
the steps that value changes.

Plain SFT (alpha 0 on the original responses) never reads a teacher's labels: those runs, the
teacher's fine-tune and every calibration read a `tokens` store, the student's own k = 1 pass
over the records, named by what fixes the token stream alone (records, tokenizer, lengths, split).
Two sweeps of one student on the same records that share a steps directory (`steps_dir`) therefore
share their SFT runs and the start model's evaluations, whatever their teachers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smoothkd.distill.config import DistillConfig
from smoothkd.errors import InputError, SmoothkdError
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.evaluate.config import GeneralConfig, SummarizationConfig
from smoothkd.sweep.schema import PATH_OPTIONS, Sweep

STEPS_DIR = "steps"
REPORT_DIR = "report"  # <out>/report: the latest report of the sweep, whichever report step wrote it
STORE_SUBDIR = "store"  # a precompute step's store, beside its step.json and log
HASH_LEN = 8

# kinds of step, in the order a sweep runs them
PRECOMPUTE, DISTILL, SUMMARIZATION, GENERAL, CALIBRATION, REPORT = (
    "precompute", "distill", "summarization", "general", "calibration", "report")
EVAL_KINDS = (SUMMARIZATION, GENERAL, CALIBRATION)

# The store options that decide a store's token stream (records kept, their tokens, parts and
# split); the others (teacher, k, backend, batching, greedy responses) only its labels.
TOKEN_STREAM_OPTIONS = ("max_length", "overlong", "part_size", "heldout_fraction", "chat_template", "skip_invalid")


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
    steps_root: Path  # where the step directories are: <out>/steps, or the sweep's steps_dir

    def dir(self, name: str) -> Path:
        return self.steps_root / name


def build_plan(sweep: Sweep) -> Plan:
    out = Path(sweep.path(sweep.file.out))
    root = Path(sweep.path(sweep.file.steps_dir)) if sweep.file.steps_dir else out / STEPS_DIR
    # stores and run directories (weights): beside the steps' small files, or apart from them
    heavy = Path(sweep.path(sweep.file.artifacts_dir)) if sweep.file.artifacts_dir else root
    steps: dict[str, Step] = {}
    f = sweep.file

    def add(prefix: str, kind: str, stated: dict[str, Any], config: dict[str, Any], needs: tuple[str, ...],
            cost: int, role: dict[str, Any] | None = None) -> Step:
        digest = hashlib.sha256(json.dumps({"kind": kind, "config": stated, "needs": needs}, sort_keys=True,
                                           default=str).encode()).hexdigest()[:HASH_LEN]
        name = f"{prefix}-{digest}"
        # where the stage writes (a step's `output`): a store in a folder of its own, a run's directory
        # among the artifacts; an evaluation beside its step's log
        target = {PRECOMPUTE: str(heavy / name / STORE_SUBDIR), DISTILL: str(heavy / name),
                  REPORT: str(out / REPORT_DIR)}.get(kind, step_path(name))
        steps.setdefault(name, Step(name, kind, {**config, "out": target}, needs, cost, role or {}))
        return steps[name]

    def step_path(name: str) -> str:
        return str(root / name)

    def stated_path(value: str) -> str:
        return os.path.relpath(sweep.path(value), root)

    def stated_model(model: str) -> str:
        from smoothkd.models import EMBEDDED

        return model if model in EMBEDDED else stated_path(model)

    def stated_paths(opts: dict[str, Any]) -> dict[str, Any]:
        return {k: stated_path(v) if k in PATH_OPTIONS else v for k, v in opts.items()}

    def resolved_paths(opts: dict[str, Any]) -> dict[str, Any]:
        return {k: sweep.path(v) if k in PATH_OPTIONS else v for k, v in opts.items()}

    records, tokens_per_record = _dataset_size(sweep)
    dataset = {"dataset": stated_path(f.dataset.path), "limit": f.dataset.limit}
    dataset_resolved = {"dataset": sweep.path(f.dataset.path), "limit": f.dataset.limit}
    store_tokens = records * tokens_per_record

    def tokens_store(model_stated: str, model: str) -> Step:
        """The records under `model`'s tokenizer, k = 1 and no greedy responses: what SFT reads."""
        stream = {k: v for k, v in sweep.store.items() if k in TOKEN_STREAM_OPTIONS}
        stated = {**stated_paths(stream), **dataset, "model": model_stated, "top_k": 1, "augment": []}
        resolved = {**resolved_paths(stream), "top_k": 1, "augment": []}
        return add("tokens", PRECOMPUTE, stated, _precompute(resolved, dataset_resolved, model), (),
                   store_tokens, {"ray_shards": f.ray_shards} if f.ray_shards else {})

    teacher_model, teacher_stated, teacher_needs = _model(sweep, f.teacher.model), stated_model(f.teacher.model), ()
    if sweep.finetune is not None:
        # the paper fine-tunes every teacher with plain SFT on the records first
        ft_store = tokens_store(teacher_stated, teacher_model)
        stated = {**sweep.finetune, "alpha": 0.0, "model": teacher_stated, "store": f"step:{ft_store.name}"}
        ft = add("teacher", DISTILL, stated,
                 _distill({**sweep.finetune, "alpha": 0.0}, teacher_model, output(ft_store)),
                 (ft_store.name,), _train_tokens(sweep.finetune, store_tokens), {"role": "teacher", **_drop(f)})
        teacher_model, teacher_stated, teacher_needs = output(ft), f"step:{ft.name}", (ft.name,)

    stated = {**stated_paths(sweep.store), **dataset, "model": teacher_stated}
    # how a store is built (shards as Ray tasks or not) does not change it: a role, not in the hash
    shards = {"ray_shards": f.ray_shards} if f.ray_shards else {}
    student = _model(sweep, f.student.model)
    store = None  # the teacher's store, for the runs that read its labels or its greedy responses
    if any(not _plain_sft({**sweep.train, **p}) for p in grid_points(sweep)):  # a KD run or one on greedy responses
        store = add("store", PRECOMPUTE, stated, _precompute(resolved_paths(sweep.store), dataset_resolved, teacher_model),
                    teacher_needs,
                    store_tokens * (2 if sweep.store.get("augment") else 1), shards)
    student_stated = stated_model(f.student.model)
    tokens = tokens_store(student_stated, student)

    runs = []
    for point in grid_points(sweep):
        options = {**sweep.train, **point}
        reads = tokens if store is None or _plain_sft(options) else store
        stated = {**options, "model": student_stated, "store": f"step:{reads.name}"}
        runs.append(add(_run_prefix(options), DISTILL, stated,
                        _distill(options, student, output(reads)),
                        (reads.name,), _train_tokens(options, store_tokens), {"role": "run", "grid": point, **_drop(f)}))

    # Reference rows: the student before training (forgetting's baseline) and the teacher.
    models = [("start", student, student_stated, ())]
    if teacher_model != student:
        models.append(("teacher", teacher_model, teacher_stated, teacher_needs))
    models += [(r.name, output(r), f"step:{r.name}", (r.name,)) for r in runs]
    evals = []
    for who, model, model_stated, needs in models:
        for i, s in enumerate(f.evaluate.summarization):
            opts = s.model_dump(exclude_none=True)
            size = _option(SummarizationConfig, opts, "limit") or 100
            cost = size * (_option(SummarizationConfig, opts, "max_prompt_tokens")
                           + _option(SummarizationConfig, opts, "max_new_tokens"))
            evals.append(add(f"summ{i}-{who[:24]}", SUMMARIZATION, {**stated_paths(opts), "model": model_stated},
                             {**resolved_paths(opts), "model": model}, needs, cost,
                             {"kind": SUMMARIZATION, "model": who, "dataset": s.dataset, "index": i}))
        if f.evaluate.general:
            g = f.evaluate.general.model_dump(exclude_none=True)
            cost = len(_option(GeneralConfig, g, "tasks")) * (_option(GeneralConfig, g, "limit") or 500) * 4 * 64
            evals.append(add(f"general-{who[:24]}", GENERAL, {**stated_paths(g), "model": model_stated},
                             {**resolved_paths(g), "model": model}, needs, cost, {"kind": GENERAL, "model": who}))
        if f.evaluate.calibration:
            # on the held-out records of the tokens store: calibration reads no teacher labels
            c = f.evaluate.calibration.model_dump(exclude_none=True)
            ref = student_stated if f.evaluate.forgetting else None
            cfg = {**c, "model": model, "store": output(tokens),
                   "reference": student if f.evaluate.forgetting and model != student else None}
            evals.append(add(f"calib-{who[:24]}", CALIBRATION,
                             {**c, "model": model_stated, "store": f"step:{tokens.name}", "reference": ref},
                             cfg, (*needs, tokens.name),
                             int(store_tokens * float(sweep.store.get("heldout_fraction", 0.05)) + 1),
                             {"kind": CALIBRATION, "model": who}))
    names = {"runs": [r.name for r in runs], "evals": [e.name for e in evals]}
    add("report", REPORT, names, names, tuple(r.name for r in runs) + tuple(e.name for e in evals), 0)
    return Plan(sweep, out, steps, root)


def output(step: Step) -> str:
    """Where a step's stage writes: a store, a run directory, an evaluation's or the report's folder."""
    return step.config["out"]


def output_present(step: Step) -> bool:
    """Whether a finished step's heavy output (a store, a model's weights) is where it was written."""
    if step.kind == PRECOMPUTE:
        return (Path(output(step)) / "zarr.json").is_file()
    if step.kind == DISTILL:
        return any(Path(output(step)).glob("*.safetensors"))
    return True  # evaluations and reports: small files, kept with the sweep


def _option(cls: type, opts: dict[str, Any], name: str) -> Any:
    """An option as its stage will see it: set, or its config's default."""
    if name in opts:
        return opts[name]
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain_sft(options: dict[str, Any]) -> bool:
    """Alpha 0 on the original responses only: reads no teacher labels, so the tokens store serves it."""
    sources = _option(DistillConfig, options, "sources")
    return float(options.get("alpha", DistillConfig.alpha)) == 0.0 and list(sources) == ["original"]


def _drop(f: Any) -> dict[str, Any]:
    """A run's role: drop its resume checkpoint once finished (optimizer state, ~3x the model)?"""
    return {} if f.keep_checkpoints else {"drop_checkpoint": True}


def grid_points(sweep: Sweep) -> list[dict[str, Any]]:
    """The union of the grid's products; alpha 0 (the SFT baseline) always in each, once per
    remaining point (its loss and temperature play no part, so they are set to the defaults and
    SFT runs are shared)."""
    points, seen = [], set()
    for product in sweep.grid or [{}]:
        grid = dict(product)
        alphas = [float(a) for a in grid.pop("alpha", [DistillConfig.alpha])]
        if 0.0 not in alphas:
            alphas = [0.0, *alphas]
        keys = sorted(grid)
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


# the options a run's directory name shows when they are not their default (the hash keeps it unique)
_NAMED = {"batch_size": "bs", "freeze": "fz", "lora": "lora", "loss": "", "lr": "lr", "seed": "s", "sources": "src",
          "temperature": "T"}


def _run_prefix(options: dict[str, Any]) -> str:
    """A readable name from the run's own options, whatever grid or train section set them: two
    sweeps sharing a steps directory name the same run alike (and so share it)."""
    parts = [f"a{float(options.get('alpha', DistillConfig.alpha)):g}"]
    for k in sorted(_NAMED):
        v = options.get(k)
        if v is None or v == _option(DistillConfig, {}, k):
            continue
        v = "+".join(x[:4] for x in v) if isinstance(v, list) else (f"{v:g}" if isinstance(v, float) else v)
        parts.append(f"{_NAMED[k]}{v}")
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
