"""The interface every teacher backend implements."""

from __future__ import annotations

from typing import Any, Protocol

from smoothkd.generation import Generation
from smoothkd.storage_schemas.spec import TopKLabels


class TeacherBackend(Protocol):
    name: str
    tokenizer: Any
    vocab_size: int  # rows of the teacher's output distribution
    stop_ids: set[int]  # end-of-turn / end-of-sequence ids
    dtype: str
    revision: str | None  # the hub commit of a teacher loaded by hub id, else None

    def score(self, sequences: list[tuple[list[int], int]], top_k: int) -> list[TopKLabels]:
        """Top-k labels for each (tokens, prompt_len): one row per response token."""
        ...

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        """Greedy continuations of each prompt."""
        ...
