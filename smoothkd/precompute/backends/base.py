"""The interface every teacher backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from smoothkd.storage_schemas.spec import TopKLabels


@dataclass(frozen=True)
class Generation:
    ids: list[int]  # generated tokens, up to and including the stop token when one came
    finished: bool  # a stop token came before max_new_tokens


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
