"""Config dataclass helpers: each field documents itself once; the CLI's --help reads it."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def opt(default: Any, help: str) -> Any:
    """A config field with its help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def doc(cls: type, name: str) -> str:
    """The help text of a config field."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]
