"""Storage cost and precision of a top-k store, measured in one run.

Builds a store with the embedded SmolLM2-135M-Instruct teacher (vocabulary 49,152) at k=64
over the bundled Dolly sample, then prints bytes on disk per supervised token (every file
counted, split by array) and the largest difference between the stored log-probs and the
teacher's float32 log-probs, recomputed here one sequence at a time without padding.

    python benchmarks/storage.py [--limit 338] [--top-k 64]
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from smoothkd.models import load_causal_lm, resolve
from smoothkd.precompute.config import PrecomputeConfig
from smoothkd.precompute.run import run
from smoothkd.storage_schemas import SoftLabelStore, verify_store

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=338, help="Dolly records (the bundled sample has 338)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "store"
        cfg = PrecomputeConfig(model=args.model, dataset=str(REPO / "data/dolly/dolly_sample.jsonl"), out=str(out),
                               top_k=args.top_k, limit=args.limit)
        summary = run(cfg, show_progress=True)
        store = SoftLabelStore(str(out))
        assert verify_store(store).ok
        n_sup = store.n_supervised_tokens

        by_kind: dict[str, int] = defaultdict(int)
        for f in out.rglob("*"):
            if f.is_file():
                rel = f.relative_to(out).parts
                kind = rel[2] if len(rel) > 3 else (rel[-1] if len(rel) > 1 else "root metadata")
                by_kind[kind] += f.stat().st_size
        total = sum(by_kind.values())

        model = load_causal_lm(resolve(args.model), dtype="float32", device="cpu")
        worst_topk = worst_true = 0.0
        for i in range(store.n_sequences):
            s = store.sequence(i)
            with torch.inference_mode():
                lp = torch.log_softmax(model(torch.from_numpy(s.tokens)[None]).logits[0].float(), -1)
            ref = lp[s.prompt_len - 1 : -1]  # [n_labels, V]: the float32 log-probs of the teacher
            exact_topk = ref.gather(-1, torch.from_numpy(s.labels.ids)).numpy()
            exact_true = ref.gather(-1, torch.from_numpy(s.targets)[:, None])[:, 0].numpy()
            worst_topk = max(worst_topk, float(np.abs(s.labels.logprobs - exact_topk).max()))
            worst_true = max(worst_true, float(np.abs(s.labels.true_logprob - exact_true).max()))

    print(f"\nstore: {summary.sequences} sequences, {n_sup:,} supervised tokens, top-k {args.top_k}, "
          f"vocabulary {store.manifest.vocab_size:,}")
    print(f"{'part of the store':<22}{'bytes':>12}{'bytes/token':>14}")
    for kind, size in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:<22}{size:>12,}{size / n_sup:>14.1f}")
    print(f"{'total (all files)':<22}{total:>12,}{total / n_sup:>14.1f}")
    print(f"\nbytes per supervised token: {total / n_sup:.1f} (target <= 160; int32 ids + float32 log-probs: "
          f"{args.top_k * 8})")
    print(f"compression vs int32 + float32: {args.top_k * 8 / (total / n_sup):.2f}x")
    print(f"max |stored - float32| top-k log-probs: {worst_topk:.5f} nats, true-token log-prob: {worst_true:.5f} nats "
          f"(target <= 0.01; encoding bound {store.manifest.encoding.max_error:.5f} + padding noise)")


if __name__ == "__main__":
    main()
