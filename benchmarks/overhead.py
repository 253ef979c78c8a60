"""Overhead of stage one over the bare teacher forward pass, same batches, one run.

Times, on the same machine in one process:
  forward   the teacher's forward pass alone over exactly the batches precompute makes
            (same sequences, same padding, same logits_to_keep), nothing else;
  full      the same forward with logits at every position (what a plain model(...) does);
  total     `precompute teacher` end to end: reading and tokenizing records, model loading
            and hashing, forward, log-softmax, top-k, tail, fixed-point rounding,
            compression and writing the store.
The forward pass is timed before and after the full run and averaged, to even out drift.

    python benchmarks/overhead.py [--limit 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from smoothkd.models import resolve
from smoothkd.precompute.backends.hf import HFTeacher
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.prompts import PromptFormatter
from smoothkd.precompute.records import load_records
from smoothkd.precompute.run import PartPipeline, run

REPO = Path(__file__).resolve().parents[1]


def batches(cfg: PrecomputeConfig, teacher: HFTeacher) -> list[list[tuple[list[int], int]]]:
    """The (tokens, prompt_len) batches that precompute scores, in its order."""
    records = load_records(cfg.dataset, limit=cfg.limit).records
    pipeline = PartPipeline(cfg, teacher, PromptFormatter(teacher.tokenizer, teacher.stop_ids),
                            advance=lambda *a: None)
    out = []
    for p in range(0, len(records), cfg.part_size):
        seqs, _ = pipeline.sequences(records[p : p + cfg.part_size])
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].tokens))
        for b in range(0, len(order), cfg.batch_size):
            out.append([(seqs[i].tokens, len(seqs[i].prompt_ids)) for i in order[b : b + cfg.batch_size]])
    return out


def time_forward(teacher: HFTeacher, work: list, keep: bool) -> float:
    teacher._keep_positions = keep
    t0 = time.perf_counter()
    for batch in work:
        teacher.forward_logits(batch)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    location = resolve(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PrecomputeConfig(model=args.model, dataset=str(REPO / "data/dolly/dolly_sample.jsonl"),
                               out=str(Path(tmp) / "store"), top_k=args.top_k, limit=args.limit,
                               batch_size=args.batch_size)
        teacher = HFTeacher(location, dtype="float32", device="cpu")
        work = batches(cfg, teacher)
        n_tokens = sum(len(t) for b in work for t, _ in b)
        time_forward(teacher, work[:2], keep=True)  # warm-up
        fwd_before = time_forward(teacher, work, keep=True)
        full_logits = time_forward(teacher, work, keep=False)
        summary = run(cfg, show_progress=False)
        fwd_after = time_forward(teacher, work, keep=True)

    forward = (fwd_before + fwd_after) / 2
    print(f"{len(work)} batches of up to {args.batch_size} sequences, {n_tokens:,} tokens, "
          f"{summary.supervised_tokens:,} supervised; torch threads {torch.get_num_threads()}")
    print(f"forward only (logits at supervised positions): {fwd_before:.1f} s before, {fwd_after:.1f} s after")
    print(f"forward only (logits at every position):       {full_logits:.1f} s")
    print(f"precompute total:                              {summary.seconds:.1f} s "
          f"(of which forward + top-k {summary.forward_seconds:.1f} s)")
    print(f"\ntotal precompute / forward only = {summary.seconds / forward:.3f}  (target <= 1.15)")
    print(f"total precompute / full-logits forward = {summary.seconds / full_logits:.3f}")
    dropped = Counter(summary.dropped)
    if dropped:
        print(f"(dropped as in any precompute run: {dict(dropped)})")


if __name__ == "__main__":
    main()
