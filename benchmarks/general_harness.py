"""Do lm-evaluation-harness and smoothkd's builtin scorer agree on the general tasks?

Scores the same items of ARC-Challenge, ARC-Easy, HellaSwag and OpenBookQA with one loaded model
through both harnesses (`smoothkd evaluate general --harness lm-eval` and `--harness builtin`) and
prints, per task, acc_norm under each, the items whose acc_norm (and acc) prediction differs, the
largest difference between their choice log-likelihoods, and the time each took. Needs the
`lm-eval` extra. By default the bundled 40 items of each task; --data-dir and --limit for more.

    python benchmarks/general_harness.py [--model smollm2-135m-instruct] [--data-dir data/general] [--limit N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from smoothkd.evaluate.config import GENERAL_TASKS
from smoothkd.evaluate.general import evaluate_general
from smoothkd.evaluate.harness import evaluate_lm_eval, lm_eval_version
from smoothkd.models import load_causal_lm, load_tokenizer, resolve

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data-dir", type=Path, default=REPO / "data" / "general")
    ap.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    ap.add_argument("--tasks", default=",".join(GENERAL_TASKS))
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    location = resolve(args.model)
    model, tokenizer = load_causal_lm(location), load_tokenizer(location)
    found, seconds = {}, {}
    for name, score in (("builtin", evaluate_general), ("lm-eval", evaluate_lm_eval)):
        t0 = time.perf_counter()
        found[name] = score(model, tokenizer, tasks, args.data_dir, limit=args.limit, batch_size=args.batch_size)
        seconds[name] = time.perf_counter() - t0

    weights = next(model.parameters())
    print(f"{args.model}, {args.data_dir}, lm_eval {lm_eval_version()}, {weights.dtype} on {weights.device}, "
          f"batch {args.batch_size}")
    print(f"{'task':<14} {'n':>5} {'builtin':>8} {'lm-eval':>8} {'diff':>6}  {'pred_norm differs':>17} "
          f"{'pred differs':>12} {'max |d loglik|':>14}")
    for task in tasks:
        b, e = found["builtin"]["tasks"][task], found["lm-eval"]["tasks"][task]
        pairs = [(x, y) for x, y in zip(found["builtin"]["examples"], found["lm-eval"]["examples"], strict=True)
                 if x["task"] == task]
        assert all(x["id"] == y["id"] for x, y in pairs)  # the same items, in the same order
        norm = sum(x["pred_norm"] != y["pred_norm"] for x, y in pairs)
        plain = sum(x["pred"] != y["pred"] for x, y in pairs)
        gap = max(abs(p - q) for x, y in pairs for p, q in zip(x["logliks"], y["logliks"], strict=True))
        print(f"{task:<14} {b['n']:>5} {100 * b['acc_norm']:>8.2f} {100 * e['acc_norm']:>8.2f} "
              f"{100 * (e['acc_norm'] - b['acc_norm']):>+6.2f}  {norm:>17} {plain:>12} {gap:>14.2e}")
    print(f"time: builtin {seconds['builtin']:.1f} s, lm-eval {seconds['lm-eval']:.1f} s "
          f"(lm-eval / builtin = {seconds['lm-eval'] / seconds['builtin']:.2f}; lm-eval's includes its imports "
          f"and reading the files through datasets)")


if __name__ == "__main__":
    main()
