"""The transformers teacher backend: batched teacher-forced forward, CPU or GPU."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from smoothkd.models import load_causal_lm, load_tokenizer
from smoothkd.precompute.backends.base import Generation
from smoothkd.precompute.topk import topk_labels
from smoothkd.storage_schemas.spec import TopKLabels


def _stop_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return {int(i) for i in ids if i is not None}


class HFTeacher:
    name = "hf"

    def __init__(self, location: str, dtype: str = "auto", device: str = "auto"):
        self.tokenizer = load_tokenizer(location)
        self.model = load_causal_lm(location, dtype=dtype, device=device)
        self.device = next(self.model.parameters()).device
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.stop_ids = _stop_ids(self.tokenizer, self.model)
        self.revision = getattr(self.model.config, "_commit_hash", None)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.stop_ids, default=0))
        # Computing logits only where they are needed (response positions) skips most of the
        # vocabulary projection on long prompts; models without `logits_to_keep` get all.
        self._keep_positions = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def _batch(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            span = slice(width - len(r), width) if left else slice(0, len(r))
            ids[i, span] = torch.tensor(r, dtype=torch.long)
            mask[i, span] = 1
        return ids.to(self.device), mask.to(self.device)

    def forward_logits(self, sequences: list[tuple[list[int], int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher-forced logits at the positions that predict each response token.

        Returns the logits [b, n_kept, V] and, per sequence, the row indices into n_kept of its
        supervised positions (prompt_len - 1 .. len - 2), one per response token.
        """
        ids, mask = self._batch([tokens for tokens, _ in sequences], left=False)  # right padding
        positions = [torch.arange(p - 1, len(t) - 1) for t, p in sequences]
        kwargs: dict[str, Any] = {}
        if self._keep_positions:
            keep = torch.unique(torch.cat(positions))  # sorted
            kwargs["logits_to_keep"] = keep.to(self.device)
            rows = [torch.searchsorted(keep, p) for p in positions]
        else:
            rows = positions
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
        return logits, rows

    def score(self, sequences: list[tuple[list[int], int]], top_k: int) -> list[TopKLabels]:
        logits, rows = self.forward_logits(sequences)
        out = []
        with torch.inference_mode():
            for i, (tokens, prompt_len) in enumerate(sequences):
                targets = torch.tensor(tokens[prompt_len:], device=self.device)
                out.append(topk_labels(logits[i, rows[i].to(self.device)], targets, top_k))
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[Generation]:
        from transformers import GenerationConfig

        ids, mask = self._batch(prompts, left=True)  # left padding: new tokens line up at the end
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=sorted(self.stop_ids), pad_token_id=self.pad_id,
        )
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        gens = []
        for row in out[:, ids.shape[1] :].tolist():
            stop = next((j for j, t in enumerate(row) if t in self.stop_ids), None)
            gens.append(Generation(row if stop is None else row[: stop + 1], stop is not None))
        return gens
