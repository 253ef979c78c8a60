"""Does a Lookback Lens classifier trained on SmolLM2's heads tell faithful summaries apart?

CLIFF's XSum half (300 BART/Pegasus summaries with binary human labels, 1 = faithful) is
split by article into two halves; features are SmolLM2's lookback ratios (one per layer and
head) while it reads each summary as its answer to the summarisation prompt. Trains on one
half, reports ROC AUC on the other (and the other way round), next to the untrained mean
lookback ratio. The labelled set is not shipped with the package: pass --data-dir.

    python benchmarks/lookback_lens.py --data-dir DIR [--limit 300] [--max-prompt-tokens 768]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from smoothkd.evaluate.lookback_classifier import auc, fit_logistic, summary_features
from smoothkd.evaluate.summarization import DEFAULT_INSTRUCTION
from smoothkd.models import load_causal_lm, load_tokenizer, resolve

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--max-prompt-tokens", type=int, default=768)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    path = args.data_dir / "summ_factuality_human" / "cliff_cnndm_xsum_600.jsonl"
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["origin"] == "xsum"][: args.limit]
    location = resolve(args.model)
    tok, model = load_tokenizer(location), load_causal_lm(location, attn_implementation="eager")
    t0 = time.perf_counter()
    x = np.stack([summary_features(model, tok, r["article"], r["summary"], DEFAULT_INSTRUCTION, args.max_prompt_tokens)
                  for r in rows])
    y = np.array([r["label"] for r in rows], dtype=float)
    seconds = time.perf_counter() - t0
    ids = sorted({r["id"] for r in rows})
    half = {i: k % 2 for k, i in enumerate(ids)}  # by article: both systems' summaries on one side
    fold = np.array([half[r["id"]] for r in rows])

    print(f"CLIFF XSum: {len(rows)} summaries ({int(y.sum())} faithful), {x.shape[1]} features "
          f"(layers x heads of {args.model}), features in {seconds:.0f} s")
    print(f"mean lookback ratio, untrained: AUC {auc(x.mean(axis=1), y):.3f}")
    for l2 in (1.0, 10.0, 100.0):
        held = []
        for test in (0, 1):
            w, b = fit_logistic(x[fold != test], y[fold != test], l2=l2)
            held.append(auc(x[fold == test] @ w + b, y[fold == test]))
            train_auc = auc(x[fold != test] @ w + b, y[fold != test])
        print(f"logistic regression, l2={l2:g}: held-out AUC {held[0]:.3f} / {held[1]:.3f} "
              f"(mean {np.mean(held):.3f}; training AUC {train_auc:.3f})")


if __name__ == "__main__":
    main()
