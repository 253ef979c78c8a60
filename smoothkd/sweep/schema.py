"""The sweep file: one YAML document, one typed schema, every problem reported at once with its line.

The training and store options are not declared again here: their pydantic models are built
from the stage configs' dataclass fields (DistillConfig, PrecomputeConfig), so a new option of
a stage is a sweep key at once, with the same default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from smoothkd.distill.config import DistillConfig
from smoothkd.errors import InputError, SmoothkdError
from smoothkd.evaluate.config import CalibrationConfig, GeneralConfig, SummarizationConfig
from smoothkd.precompute.config import PrecomputeConfig

# Options a sweep sets itself, per stage: where things are, and resuming.
_DISTILL_OWN = ("store", "out", "model", "resume", "allow_incomplete_store")
_PRECOMPUTE_OWN = ("dataset", "out", "model", "limit", "fields", "dataset_split", "shard", "overwrite", "skip_invalid")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _fields_model(name: str, cls: type, skip: tuple[str, ...], as_lists: bool = False,
                  required: str | None = None) -> type[BaseModel]:
    """A pydantic model of a stage config's fields, all optional (unset means the stage's default)
    but `required`, a path the sweep must be given (relative to the sweep file)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, help = hints[f.name], f.metadata.get("help", "")
        if f.name == required:
            fields[f.name] = (str, Field(description=help + " Relative to the sweep file."))
        else:
            fields[f.name] = (Optional[list[kind]] if as_lists else Optional[kind],  # type: ignore[valid-type]
                              Field(None, description=help))
    return create_model(name, __base__=Strict, **fields)


@lru_cache(maxsize=None)
def _models() -> tuple[type[BaseModel], type[BaseModel], type[BaseModel]]:
    return (_fields_model("Train", DistillConfig, _DISTILL_OWN + ("alpha",)),
            _fields_model("Grid", DistillConfig, _DISTILL_OWN, as_lists=True),
            _fields_model("Store", PrecomputeConfig, _PRECOMPUTE_OWN))


class Dataset(Strict):
    path: str = Field(description="Instruction records (.jsonl or .parquet), relative to the sweep file.")
    limit: Optional[int] = Field(None, ge=1, description="Use only the first N records.")


class Teacher(Strict):
    model: str = Field(description="Embedded model name, checkpoint directory (relative to the sweep file) or hub id.")
    finetune: Optional[dict[str, Any]] = Field(
        None, description="Fine-tune the teacher with plain SFT on the dataset's train split first (distill "
                          "options, e.g. lr, epochs, batch_size), as the paper does for every teacher.")


class Student(Strict):
    model: str = Field(description="The student's starting model; also the reference row and forgetting's baseline.")


# What the sweep sets itself: the model, where it writes, and the reference (the student's start model)
Summarization = _fields_model("Summarization", SummarizationConfig, ("model", "out"), required="dataset")
General = _fields_model("General", GeneralConfig, ("model", "out", "reference"), required="data_dir")
Calibration = _fields_model("Calibration", CalibrationConfig, ("model", "out", "reference", "store"))
# options (of an evaluation or the store) that name a file: resolved against the sweep file's folder
PATH_OPTIONS = ("dataset", "data_dir", "fc_model", "lookback_classifier", "chat_template")


class Evaluate(Strict):
    summarization: list[Summarization] = Field(default_factory=list)  # type: ignore[valid-type]
    general: Optional[General] = None  # type: ignore[valid-type]
    calibration: Optional[Calibration] = None  # type: ignore[valid-type]
    forgetting: bool = Field(True, description="Forgetting against the student's starting model "
                                               "(general tasks and held-out tokens).")


class SweepFile(Strict):
    """What `smoothkd sweep run` reads. Paths are relative to the sweep file's folder."""

    name: str
    out: str = Field(description="The sweep's directory: its steps (unless steps_dir), the latest report in <out>/report.")
    steps_dir: Optional[str] = Field(
        None, description="Where the steps live (default <out>/steps). Sweeps that share one share the steps they "
                          "have in common: e.g. two experiments on one student and the same records share their "
                          "SFT runs and the start model's evaluations.")
    artifacts_dir: Optional[str] = Field(
        None, description="Where the stores and run directories (model weights) go, default beside each step's "
                          "small files; e.g. outside a repository that commits the steps' configs, logs and "
                          "per-example outputs. A run's record and loss log are copied to its step.")
    keep_checkpoints: bool = Field(False, description="Keep a finished run's resume checkpoint (its optimizer "
                                                      "state, ~3x the model); by default only the model is kept.")
    dataset: Dataset
    teacher: Teacher
    student: Student
    store: dict[str, Any] = Field(default_factory=dict, description="precompute options: top_k, augment, ...")
    train: dict[str, Any] = Field(default_factory=dict, description="distill options shared by every run.")
    grid: dict[str, Any] | list[dict[str, Any]] = Field(
        default_factory=dict, description="distill options as lists: their product; or a list of such products, "
                                          "whose union is the grid (e.g. KD alphas, and SFT with a group frozen).")
    evaluate: Evaluate = Field(default_factory=Evaluate)
    ray_shards: Optional[int] = Field(None, ge=1, description="Build each store as N Ray tasks "
                                                           "(precompute --ray-shards N).")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A validated sweep: the file's values, with its stage options checked against the stages."""

    file: SweepFile
    root: Path  # the sweep file's folder, which relative paths start from
    store: dict[str, Any]
    train: dict[str, Any]
    grid: list[dict[str, list[Any]]]  # products, whose union is the grid
    finetune: dict[str, Any] | None

    def path(self, value: str) -> str:
        """A path from the sweep file, as the stages will see it."""
        p = Path(value).expanduser()
        return os.path.normpath(p if p.is_absolute() else self.root / p)


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file; every problem in one InputError, each with its line."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the sweep file ({e})") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise InputError(f"{path}: a sweep file is a mapping of keys (name, out, dataset, teacher, ...)")
    lines = _line_index(node)
    problems: list[str] = []
    file = None
    try:
        file = SweepFile.model_validate(data)
    except ValidationError as e:
        problems += [_problem(path, lines, err["loc"], err["msg"], err["type"], _valid_keys(SweepFile, err["loc"]))
                     for err in e.errors()]
    train_m, grid_m, store_m = _models()
    raw_grid = data.get("grid") or {}
    products = raw_grid if isinstance(raw_grid, list) else [raw_grid]
    sections = [("store", (), data.get("store") or {}, store_m), ("train", (), data.get("train") or {}, train_m)]
    sections += [("grid", (i,) if isinstance(raw_grid, list) else (), g, grid_m) for i, g in enumerate(products)]
    checked: dict[str, dict[str, Any]] = {}
    grid: list[dict[str, list[Any]]] = []
    for key, at, raw, model in sections:
        if not isinstance(raw, dict):
            continue  # SweepFile reported it
        try:
            values = model.model_validate(raw).model_dump(exclude_none=True)
        except ValidationError as e:
            problems += [_problem(path, lines, (key, *at, *err["loc"]), err["msg"], err["type"],
                                  sorted(model.model_fields)) for err in e.errors()]
            continue
        if key == "grid":
            grid.append(values)
            for k, v in values.items():
                where = f"{path}:{lines.get((key, *at, k), '?')}: grid{''.join(f'[{i}]' for i in at)}.{k}"
                if not v:
                    problems.append(f"{where} is empty: give at least one value")
                if k in (data.get("train") or {}):
                    problems.append(f"{where} is also set in train: set it in one place")
        else:
            checked[key] = values
    finetune = None
    raw_ft = (data.get("teacher") or {}).get("finetune") if isinstance(data.get("teacher"), dict) else None
    if isinstance(raw_ft, dict):
        try:
            finetune = train_m.model_validate(raw_ft).model_dump(exclude_none=True)
        except ValidationError as e:
            problems += [_problem(path, lines, ("teacher", "finetune", *err["loc"]), err["msg"], err["type"],
                                  sorted(train_m.model_fields)) for err in e.errors()]
    sweep = None
    if file is not None:
        sweep = Sweep(file, path.resolve().parent, checked.get("store", {}), checked.get("train", {}), grid, finetune)
        problems += _missing_paths(sweep, path, lines)
    if sweep is None or problems:
        raise InputError(f"{path}: invalid sweep file:\n  " + "\n  ".join(problems))
    return sweep


def _missing_paths(sweep: Sweep, path: Path, lines: dict[tuple, int]) -> list[str]:
    """Every dataset and local model named, checked before anything runs."""
    from smoothkd.models import EMBEDDED

    f = sweep.file
    problems = []
    wanted = [(("dataset", "path"), f.dataset.path, "file")]
    wanted += [(("evaluate", "summarization", i, "dataset"), s.dataset, "file") for i, s in enumerate(f.evaluate.summarization)]
    if f.evaluate.general:
        wanted.append((("evaluate", "general", "data_dir"), f.evaluate.general.data_dir, "dir"))
    for loc, value, kind in wanted:
        p = Path(sweep.path(value))
        if not (p.is_file() if kind == "file" else p.is_dir()):
            problems.append(f"{path}:{lines.get(loc, '?')}: {'.'.join(map(str, loc))}: no such {kind}: {p}")
    for loc, model in ((("teacher", "model"), f.teacher.model), (("student", "model"), f.student.model)):
        local = Path(sweep.path(model))
        # A name that is neither embedded nor a local directory is taken as a hub id, which fails
        # here (no hub): say so before the first step instead of in its log.
        if model not in EMBEDDED and not local.is_dir():
            problems.append(f"{path}:{lines.get(loc, '?')}: {'.'.join(loc)}: {model!r} is neither an embedded model "
                            f"({', '.join(EMBEDDED)}) nor a directory ({local})")
    if f.evaluate.general and Path(sweep.path(f.evaluate.general.data_dir)).is_dir():
        from smoothkd.evaluate.general import task_file

        for task in f.evaluate.general.tasks or GeneralConfig.__dataclass_fields__["tasks"].default_factory():
            try:
                task_file(task, Path(sweep.path(f.evaluate.general.data_dir)))
            except SmoothkdError as e:
                problems.append(f"{path}:{lines.get(('evaluate', 'general', 'data_dir'), '?')}: evaluate.general: {e}")
    return problems


def _line_index(node: yaml.Node | None, loc: tuple = ()) -> dict[tuple, int]:
    """(key, key, index, ...) -> 1-based line of that value in the YAML text."""
    out: dict[tuple, int] = {}
    if node is None:
        return out
    out[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out[(*loc, k.value)] = k.start_mark.line + 1
            out.update({key: line for key, line in _line_index(v, (*loc, k.value)).items() if key != (*loc, k.value)})
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.update(_line_index(v, (*loc, i)))
    return out


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed beside an unknown one, walking the schema along loc."""
    for key in loc[:-1]:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(str(key))
        ann = field.annotation if field else None
        for arg in (*typing.get_args(ann), ann):
            for inner in (*typing.get_args(arg), arg):
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    model = inner
                    break
    return sorted(model.model_fields)


def _problem(path: Path, lines: dict[tuple, int], loc: tuple, msg: str, kind: str, valid: list[str]) -> str:
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), "?")
    where = ".".join(map(str, loc))
    if kind == "extra_forbidden":
        return f"{path}:{line}: unknown key {where}; valid keys here: {', '.join(valid)}"
    return f"{path}:{line}: {where}: {msg}"
