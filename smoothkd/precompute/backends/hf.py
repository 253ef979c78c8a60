"""The transformers teacher backend: batched teacher-forced forward, CPU or GPU."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from smoothkd.generation import Generation, greedy, stop_ids
from smoothkd.models import load_causal_lm, load_tokenizer
from smoothkd.precompute.topk import sampled_labels, topk_labels
from smoothkd.errors import SmoothkdError
from smoothkd.storage_schemas.spec import SampledLabels, TopKLabels
from smoothkd.tokens import pad_batch, pad_id

if TYPE_CHECKING:
    from smoothkd.precompute.config import PrecomputeConfig


class HFTeacher:
    name = "hf"
    default_batch_size = 8

    def __init__(self, location: str, dtype: str = "auto", device: str = "auto"):
        self.tokenizer = load_tokenizer(location)
        self.model = load_causal_lm(location, dtype=dtype, device=device)
        self.device = next(self.model.parameters()).device
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.stop_ids = stop_ids(self.tokenizer, self.model.generation_config)
        self.revision = getattr(self.model.config, "_commit_hash", None)
        self.pad_id = pad_id(self.tokenizer)
        # Computing logits only where they are needed (response positions) skips most of the
        # vocabulary projection on long prompts; models without `logits_to_keep` get all.
        self._keep_positions = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @classmethod
    def from_config(cls, location: str, cfg: PrecomputeConfig) -> HFTeacher:
        if cfg.tensor_parallel_size != 1:
            raise SmoothkdError("--tensor-parallel-size is for --backend vllm; the hf backend runs the "
                                "teacher on one device (--device)")
        return cls(location, dtype=cfg.dtype, device=cfg.device)

    def forward_logits(self, sequences: list[tuple[list[int], int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Teacher-forced logits at the positions that predict each response token.

        Returns the logits [b, n_kept, V] and, per sequence, the row indices into n_kept of its
        supervised positions (prompt_len - 1 .. len - 2), one per response token.
        """
        ids, mask = pad_batch([tokens for tokens, _ in sequences], self.pad_id, left=False, device=self.device)
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

    def sample(self, sequences: list[tuple[list[int], int]], n_samples: int, seeds: list[int]) -> list[SampledLabels]:
        """`n_samples` draws at every response position of each (tokens, prompt_len) from the teacher's
        full distribution; sequence i's draws come from a generator seeded with seeds[i], so they do not
        depend on which sequences share its batch."""
        logits, rows = self.forward_logits(sequences)
        out = []
        with torch.inference_mode():
            for i, (tokens, prompt_len) in enumerate(sequences):
                targets = torch.tensor(tokens[prompt_len:], device=self.device)
                generator = torch.Generator(device=self.device).manual_seed(seeds[i])
                out.append(sampled_labels(logits[i, rows[i].to(self.device)], targets, n_samples, generator))
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int, top_k: int) -> list[Generation]:
        # No labels while generating: the pipeline scores the responses in one batched forward.
        return greedy(self.model, prompts, max_new_tokens, self.stop_ids, self.pad_id)
