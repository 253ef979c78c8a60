"""Reading JSONL input with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from smoothkd.errors import InputError


def read_jsonl(path: str | Path, objects: bool = True) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; with `objects`, each must be a JSON object."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            if objects and not isinstance(value, dict):
                raise InputError(f"{path}:{lineno}: not a JSON object (got {type(value).__name__})")
            yield lineno, value
