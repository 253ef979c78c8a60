"""Instruction records: loading (JSONL, Parquet, hub datasets), validation, split, fingerprint.

The canonical fields are Dolly's (instruction, context, response, category, plus an
optional id); `field_map` maps them onto another instruction set's column names.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from smoothkd.errors import InputError
from smoothkd.jsonl import read_jsonl

FIELDS = ("id", "instruction", "context", "response", "category")
REQUIRED = ("instruction", "response")
_MAX_LISTED = 10


@dataclass(frozen=True)
class Record:
    record_id: str
    instruction: str
    context: str
    response: str
    category: str
    where: str  # "dolly.jsonl:12": for messages


@dataclass
class LoadedRecords:
    records: list[Record]
    skipped: list[str] = field(default_factory=list)  # why each skipped record was skipped
    fingerprint: str = ""


def parse_field_map(items: list[str] | None) -> dict[str, str]:
    """`["instruction=question", "response=answer"]` -> {"instruction": "question", ...}."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, column = item.partition("=")
        if not sep or not column:
            raise InputError(f"--field {item!r}: expected CANONICAL=COLUMN, e.g. --field response=answer")
        if key not in FIELDS:
            raise InputError(f"--field {item!r}: {key!r} is not one of {', '.join(FIELDS)}")
        out[key] = column
    return out


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    # Not objects-only, and unreadable lines kept: _check reports a non-object row, a line that
    # is not UTF-8 or not JSON, as an invalid record (so --skip-invalid skips and counts it).
    for lineno, value in read_jsonl(path, objects=False, keep_invalid=True):
        yield f"{path}:{lineno}", value


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise InputError(f"{path}: not a readable Parquet file ({e})") from e
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


def _iter_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (offline, missing, ...)
        raise InputError(
            f"{name}: not a local file, and loading it as a Hugging Face dataset failed ({type(e).__name__}: {e})"
        ) from e
    for i, row in enumerate(ds):
        yield f"{name}[{split}]:row {i}", row


def iter_raw(source: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".parquet":
            return _iter_parquet(path)
        return _iter_jsonl(path)
    if path.exists():
        raise InputError(f"{source}: is a directory; give a .jsonl or .parquet file")
    if source.startswith((".", "/", "~")) or source.endswith((".jsonl", ".json", ".parquet")):
        raise InputError(f"{source}: no such file")
    return _iter_hub(source, split)


def _check(where: str, raw: Any, index: int, field_map: dict[str, str]) -> Record | str:
    """A Record, or the reason the raw row is not a valid one."""
    if isinstance(raw, InputError):  # a line that could not be read; the message names file and line
        return str(raw)
    if not isinstance(raw, dict):
        return f"{where}: expected a JSON object, got {type(raw).__name__}"
    values: dict[str, str] = {}
    for name in FIELDS:
        column = field_map.get(name, name)
        value = raw.get(column)
        if value is None:
            if name in REQUIRED:
                hint = "" if name in field_map else f"; map another column with --field {name}=COLUMN"
                return f"{where}: missing field {column!r}{hint} (fields present: {', '.join(sorted(raw))})"
            value = str(index) if name == "id" else ""
        if name == "id" and isinstance(value, int):
            value = str(value)
        if not isinstance(value, str):
            return f"{where}: field {column!r} must be a string, got {type(value).__name__}"
        values[name] = value
    for name in REQUIRED:
        if not values[name].strip():
            return f"{where}: field {field_map.get(name, name)!r} is empty"
    return Record(values["id"], values["instruction"], values["context"], values["response"],
                  values["category"], where)


def load_records(source: str, field_map: dict[str, str] | None = None, limit: int | None = None,
                 skip_invalid: bool = False, split: str = "train") -> LoadedRecords:
    """Read and validate records; every problem is reported at once, with file and line."""
    field_map = field_map or {}
    records: list[Record] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    # islice stops before reading row `limit`: a bad row past the limit is never judged
    for index, (where, raw) in enumerate(itertools.islice(iter_raw(source, split), limit)):
        checked = _check(where, raw, index, field_map)
        if isinstance(checked, str):
            problems.append(checked)
            continue
        if checked.record_id in seen:
            problems.append(f"{where}: id {checked.record_id!r} already used at {seen[checked.record_id]}")
            continue
        seen[checked.record_id] = where
        records.append(checked)
    if problems and not skip_invalid:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise InputError(
            f"{len(problems)} invalid record(s) in {source} (fix them, or pass --skip-invalid to skip them):\n  "
            f"{listed}{more}"
        )
    if not records:
        raise InputError(f"{source}: no valid records" + (f" (first problem: {problems[0]})" if problems else ""))
    return LoadedRecords(records, problems, fingerprint(records))


def fingerprint(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.record_id, r.instruction, r.context, r.response, r.category]).encode())
        h.update(b"\n")
    return h.hexdigest()


def split_of(record_id: str, heldout_fraction: float, salt: str) -> str:
    """Deterministic split by record id: the same record is held out in every store and run."""
    digest = hashlib.sha256(f"{salt}:{record_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if u < heldout_fraction else "train"
