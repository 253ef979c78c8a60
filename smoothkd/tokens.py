"""Token-level building blocks shared by every stage: chat-template rendering and padding.

Precompute, distill and evaluate all turn text into the ids a model sees; doing it here,
once, keeps a prompt's tokens and a batch's padding the same wherever they are built.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from smoothkd.errors import InputError


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """The conversation's token ids as the tokenizer's chat template writes it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes the special tokens (BOS, turn markers) itself.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def instruction_prompt(tokenizer: Any, instruction: str, document: str | None = None) -> list[int]:
    """The chat-formatted prompt a summary follows: the instruction, a blank line and the document
    (or the instruction alone), as one user turn, the assistant's turn opened."""
    content = instruction if document is None else f"{instruction}\n\n{document}"
    return chat_ids(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)


def document_prompt(tokenizer: Any, document: str, instruction: str, max_prompt_tokens: int) -> tuple[list[int], str]:
    """`instruction_prompt` with the document cut at the token level to fit max_prompt_tokens, and
    the document as it is in it: metrics and classifiers compare a summary with what the model saw."""
    def ids(text: str) -> list[int]:
        return instruction_prompt(tokenizer, instruction, text)

    full = ids(document)
    doc_ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    keep = len(doc_ids)
    while len(full) > max_prompt_tokens:  # re-encoding a cut text can shift the count: repeat
        keep -= len(full) - max_prompt_tokens
        if keep < 1:
            raise InputError(f"--max-prompt-tokens {max_prompt_tokens} leaves no room for the article "
                             "after the chat template and instruction")
        document = tokenizer.decode(doc_ids[:keep])
        full = ids(document)
    return full, document


def pad_id(tokenizer: Any) -> int:
    """The id padding is filled with: the pad token, else the end-of-sequence token, else 0.

    Padded positions are masked out and never scored, so the id does not change a result;
    one rule keeps the same rows padded the same way in every stage."""
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if i is not None:
            return int(i)
    return 0


def pad_batch(rows: Sequence[Sequence[int] | np.ndarray], pad: int, left: bool = False,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [b, L]. Right padding (the default) keeps each row's
    tokens at positions 0..n-1; left padding lines new tokens up at the end, for generation."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.as_tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)
