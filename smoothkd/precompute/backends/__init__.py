"""Teacher backends, by name. Each turns sequences into top-k soft labels and greedy responses.

A backend implements `TeacherBackend` (base.py); `load_backend` picks one by name. The vLLM
backend will register here beside `hf`.
"""

from __future__ import annotations

from typing import Any

from smoothkd.precompute.backends.base import TeacherBackend
from smoothkd.precompute.backends.hf import HFTeacher

BACKENDS: dict[str, type[TeacherBackend]] = {"hf": HFTeacher}


def load_backend(name: str, location: str, **options: Any) -> TeacherBackend:
    return BACKENDS[name](location, **options)


__all__ = ["BACKENDS", "TeacherBackend", "load_backend"]
