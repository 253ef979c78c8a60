"""Teacher backends, by name. Each turns sequences into top-k soft labels and greedy responses.

A backend implements `TeacherBackend` (base.py); `load_backend` builds one from the run's
configuration. `vllm` imports vLLM only when chosen (an optional extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smoothkd.precompute.backends.base import TeacherBackend
from smoothkd.precompute.backends.hf import HFTeacher
from smoothkd.precompute.backends.vllm import VLLMTeacher

if TYPE_CHECKING:
    from smoothkd.precompute.config import PrecomputeConfig

BACKENDS: dict[str, type[TeacherBackend]] = {"hf": HFTeacher, "vllm": VLLMTeacher}


def load_backend(location: str, cfg: PrecomputeConfig) -> TeacherBackend:
    return BACKENDS[cfg.backend].from_config(location, cfg)


__all__ = ["BACKENDS", "TeacherBackend", "load_backend"]
