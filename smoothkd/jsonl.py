"""Reading JSONL input with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from smoothkd.errors import InputError

_BLANK = object()  # what _parse returns for a blank line


def read_jsonl(path: str | Path, objects: bool = True, keep_invalid: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; with `objects`, each must be a JSON object.

    A line that is not UTF-8, not JSON (or, with `objects`, not an object) raises InputError
    naming file and line; with `keep_invalid` that error is yielded as the line's value
    instead, for a caller that skips and counts bad lines.
    """
    with open(path, "rb") as f:  # bytes: a bad byte is one line's problem, not the file's
        for lineno, raw in enumerate(f, 1):
            try:
                value = _parse(raw, path, lineno, objects)
            except InputError as e:
                if not keep_invalid:
                    raise
                value = e
            if value is not _BLANK:
                yield lineno, value


def _parse(raw: bytes, path: str | Path, lineno: int, objects: bool) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                         "of the line); re-encode the file as UTF-8") from e
    if not line.strip():
        return _BLANK
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
    if objects and not isinstance(value, dict):
        raise InputError(f"{path}:{lineno}: not a JSON object (got {type(value).__name__})")
    return value
