"""The interface every teacher backend implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from smoothkd.generation import Generation
from smoothkd.storage_schemas.spec import TopKLabels

if TYPE_CHECKING:
    from smoothkd.precompute.config import PrecomputeConfig


class TeacherBackend(Protocol):
    name: str
    default_batch_size: int  # sequences per score/generate call when --batch-size is not given
    tokenizer: Any
    vocab_size: int  # rows of the teacher's output distribution
    stop_ids: set[int]  # end-of-turn / end-of-sequence ids
    dtype: str
    revision: str | None  # the hub commit of a teacher loaded by hub id, else None

    @classmethod
    def from_config(cls, location: str, cfg: PrecomputeConfig) -> TeacherBackend:
        """The backend for a precompute run; refuses options it cannot honour."""
        ...

    def score(self, sequences: list[tuple[list[int], int]], top_k: int) -> list[TopKLabels]:
        """Top-k labels for each (tokens, prompt_len): one row per response token."""
        ...

    def generate(self, prompts: list[list[int]], max_new_tokens: int, top_k: int) -> list[Generation]:
        """Greedy continuations of each prompt, with their top-k labels where the backend keeps
        them while generating (Generation.labels); the pipeline scores those left without."""
        ...
