"""Memory and time of the chunked loss (--loss-chunk-tokens, the default) against the whole-batch
loss (--loss-chunk-tokens 0), measured in one run.

On a randomly initialised Llama-style model with a 128k vocabulary (Llama 3's, 128,256) and a few
small layers, one micro-batch of `--tokens` supervised tokens with random teacher top-k labels:
  memory   peak memory of one forward + backward (`loss_step` and `loss.backward()`), each
           variant in a fresh process: the kernel's peak resident set (VmHWM) is reset
           (`echo 5 > /proc/self/clear_refs`) once the model and batch are built, and the step's
           peak is VmHWM after it less VmRSS before it. torch's CPU allocator has no statistics
           and tracemalloc does not see it; large tensors are mmap'ed by glibc and returned on
           free, so the resident set follows what torch holds. Ratios: whole / chunked (KD), and
           chunked KD / chunked SFT (alpha 0);
  time     forward + backward of the same step, whole and chunked alternating in one process
           (after one warm-up each), median over --repeats; ratio chunked / whole.

    python benchmarks/chunked_loss.py [--tokens 4096] [--hidden 128] [--layers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from smoothkd.batches import Batch, TeacherTopK
from smoothkd.distill.config import DistillConfig
from smoothkd.distill.trainer import loss_step

VOCAB = 128_256
VARIANTS = {  # name: (loss_chunk_tokens, alpha); chunked uses the config's default chunk
    "whole-kd": (0, 0.1), "chunked-kd": (DistillConfig().loss_chunk_tokens, 0.1),
    "chunked-sft": (DistillConfig().loss_chunk_tokens, 0.0),
}


def build(args: argparse.Namespace) -> tuple[LlamaForCausalLM, Batch]:
    """The model and one batch: `--rows` sequences of a 64-token prompt and a response, `--tokens`
    supervised positions in all, teacher top-k ids distinct within each row."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False))
    model.train()
    per_row, prompt = args.tokens // args.rows, 64
    length = prompt + per_row
    input_ids = torch.randint(0, VOCAB, (args.rows, length))
    supervised = torch.zeros(args.rows, length, dtype=torch.bool)
    supervised[:, prompt - 1 : length - 1] = True
    targets = input_ids[:, 1:][supervised[:, :-1]]  # [n]
    n = targets.numel()
    offsets = torch.randperm(VOCAB)[: args.top_k]  # distinct, so ids are distinct within a row
    ids = (torch.randint(0, VOCAB, (n, 1)) + offsets) % VOCAB  # [n, k]
    tail = torch.rand(n) * 0.3  # [n]
    logprobs = (torch.log_softmax(torch.randn(n, args.top_k) * 2, -1) + torch.log1p(-tail)[:, None])  # [n, k]
    teacher = TeacherTopK(ids, logprobs.sort(-1, descending=True).values, tail)
    return model, Batch(list(range(args.rows)), input_ids, torch.ones_like(input_ids), supervised, targets, teacher)


def forward_backward(model: LlamaForCausalLM, batch: Batch, variant: str) -> float:
    chunk, alpha = VARIANTS[variant]
    t0 = time.perf_counter()
    loss, _ = loss_step(model, batch, DistillConfig(alpha=alpha, loss_chunk_tokens=chunk), batch.n_supervised,
                        keep_positions=True)
    loss.backward()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


def _status() -> dict[str, int]:
    """This process's memory figures from /proc (bytes)."""
    text = open("/proc/self/status").read()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", text, re.M)}


def measure_memory(args: argparse.Namespace) -> None:
    """In the fresh process: one step's peak above the resident set it starts from (prints JSON)."""
    model, batch = build(args)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status()["VmRSS"]
    forward_backward(model, batch, args.measure_memory)
    after = _status()
    print(json.dumps({"step_peak": after["VmHWM"] - before, "process_peak": after["VmHWM"], "before": before}))


def memory_in_fresh_process(variant: str, argv: list[str]) -> dict[str, int]:
    out = subprocess.run([sys.executable, __file__, *argv, "--measure-memory", variant], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="supervised tokens in the micro-batch")
    ap.add_argument("--rows", type=int, default=4, help="sequences in the micro-batch")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per variant")
    ap.add_argument("--measure-memory", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_memory:
        return measure_memory(args)
    argv = [f"--tokens={args.tokens}", f"--rows={args.rows}", f"--hidden={args.hidden}", f"--layers={args.layers}",
            f"--top-k={args.top_k}"]

    mem = {v: memory_in_fresh_process(v, argv) for v in VARIANTS}
    model, batch = build(args)
    times: dict[str, list[float]] = {"whole-kd": [], "chunked-kd": []}
    for v in times:  # warm-up: the first step pays one-off allocations
        forward_backward(model, batch, v)
    for i in range(args.repeats):
        for v in (("whole-kd", "chunked-kd") if i % 2 == 0 else ("chunked-kd", "whole-kd")):
            times[v].append(forward_backward(model, batch, v))
    med = {v: statistics.median(t) for v, t in times.items()}

    mib = {v: m["step_peak"] / 2**20 for v, m in mem.items()}
    n, params = batch.n_supervised, sum(p.numel() for p in model.parameters())
    print(f"vocabulary {VOCAB:,}, hidden {args.hidden}, {args.layers} layers ({params / 1e6:.1f}M parameters), "
          f"{n:,} supervised tokens in {args.rows} rows, top-k {args.top_k}, chunk "
          f"{DistillConfig().loss_chunk_tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"[n, V] float32 is {n * VOCAB * 4 / 2**20:,.0f} MiB")
    for v, m in mem.items():
        print(f"  {v:12s} step peak {mib[v]:8,.0f} MiB above {m['before'] / 2**20:,.0f} MiB "
              f"(process peak {m['process_peak'] / 2**20:,.0f} MiB)")
    print(f"peak memory of a step, chunked / whole (KD) = {mib['chunked-kd'] / mib['whole-kd']:.3f}  (target <= 0.5)")
    print(f"peak memory of a step, chunked KD / chunked SFT = {mib['chunked-kd'] / mib['chunked-sft']:.3f}  "
          "(target <= 1.05)")
    print(f"median forward + backward: whole {med['whole-kd']:.2f} s, chunked {med['chunked-kd']:.2f} s "
          f"({args.repeats} each, alternating)")
    print(f"step time, chunked / whole (KD) = {med['chunked-kd'] / med['whole-kd']:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
