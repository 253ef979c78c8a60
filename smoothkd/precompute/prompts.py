"""Chat-formatting records into (prompt ids, response ids) with the model's chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smoothkd.errors import SmoothkdError
from smoothkd.precompute.records import Record
from smoothkd.storage_schemas.spec import TopKLabels
from smoothkd.tokens import chat_ids


@dataclass(frozen=True)
class Sequence:
    """One sequence to score: prompt + response token ids; the response is supervised."""

    record: Record
    source: str  # "original" or "teacher_greedy"
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    truncated: bool
    labels: TopKLabels | None = None  # set when the backend kept them while generating the response

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def user_message(record: Record) -> str:
    """The user turn: the instruction, then the context when there is one."""
    if record.context.strip():
        return f"{record.instruction}\n\n{record.context}"
    return record.instruction


class PromptFormatter:
    def __init__(self, tokenizer: Any, stop_ids: set[int], chat_template: str | None = None):
        if chat_template:
            tokenizer.chat_template = chat_template
        if not tokenizer.chat_template:
            raise SmoothkdError(
                "the tokenizer has no chat template; pass one with --chat-template FILE (a Jinja template)"
            )
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids

    def prompt_ids(self, record: Record) -> list[int]:
        return chat_ids(self.tokenizer, [{"role": "user", "content": user_message(record)}], add_generation_prompt=True)

    def response_ids(self, record: Record, prompt_ids: list[int], response: str) -> list[int]:
        """Response tokens as the template writes them, up to and including the end-of-turn token."""
        messages = [{"role": "user", "content": user_message(record)}, {"role": "assistant", "content": response}]
        full = chat_ids(self.tokenizer, messages, add_generation_prompt=False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise SmoothkdError(
                f"{record.where}: the chat template does not write the prompt as a prefix of the conversation, "
                "so response tokens cannot be separated from prompt tokens; use a template whose generation "
                "prompt is a prefix (pass --chat-template FILE)"
            )
        ids = full[len(prompt_ids) :]
        # Drop what the template writes after the end-of-turn token (e.g. a newline): it is
        # never generated, so it is not supervised.
        last_stop = max((i for i, t in enumerate(ids) if t in self.stop_ids), default=None)
        return ids if last_stop is None else ids[: last_stop + 1]
