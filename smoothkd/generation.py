"""Batched greedy decoding with transformers, shared by the teacher (greedy augmentation)
and evaluation (summaries); `Generation` is also what the vLLM paths return
(smoothkd/vllm_engine.py starts their engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from smoothkd.storage_schemas.spec import TopKLabels
from smoothkd.tokens import pad_batch


@dataclass(frozen=True)
class Generation:
    ids: list[int]  # generated tokens, up to and including the stop token when one came
    finished: bool  # a stop token came before max_new_tokens
    labels: TopKLabels | None = None  # the teacher's top-k at each generated token, when the backend kept them

    @property
    def content(self) -> list[int]:
        """The generated tokens without the stop token: a summary's, a response's text."""
        return self.ids[:-1] if self.finished else self.ids


def stop_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    """End-of-turn / end-of-sequence ids: the tokenizer's eos and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return {int(i) for i in ids if i is not None}


def greedy(model: Any, prompts: list[list[int]], max_new_tokens: int, stops: set[int], pad: int) -> list[Generation]:
    """Greedy continuations of each prompt, cut after the first stop token."""
    from transformers import GenerationConfig

    ids, mask = pad_batch(prompts, pad, left=True, device=next(model.parameters()).device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=sorted(stops), pad_token_id=pad)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    gens = []
    for row in out[:, ids.shape[1] :].tolist():
        end = next((j for j, t in enumerate(row) if t in stops), None)
        gens.append(Generation(row if end is None else row[: end + 1], end is not None))
    return gens
