"""Padding with and without `distill --group-by-length`, on a store's training sequences.

A batch is padded to its longest sequence, so a step costs (batch size x longest) tokens. Prints,
for the epochs asked, the padded tokens per epoch over the real ones, for random batches and for
length-grouped ones (smoothkd.batches.StoreDataset.batches, as the trainer draws them).

    python benchmarks/length_grouping.py --store STORE [--batch-size 8] [--epochs 3] [--sources original]

The README's figure: the experiments' tokens store (built by
`smoothkd sweep run experiments/pilot-smollm2/sweep.yaml --only 'tokens-*'`, in
~/.cache/smoothkd/sweeps/tokens-c79d1a52/store).
"""

from __future__ import annotations

import argparse

import numpy as np

from smoothkd.batches import StoreDataset
from smoothkd.storage_schemas import SoftLabelStore


def padded_ratio(data: StoreDataset, epoch: int, batch_size: int, grouped: bool) -> float:
    batches = data.batches(epoch, seed=0, batch_size=batch_size, group_by_length=grouped)
    padded = sum(len(b) * int(data.n_tokens[b].max()) for b in batches)
    return padded / int(data.n_tokens.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sources", default="original")
    args = ap.parse_args()
    data = StoreDataset(SoftLabelStore(args.store), args.sources.split(","))
    print(f"{len(data)} training sequences, {int(data.n_tokens.sum()):,} tokens, batch size {args.batch_size}")
    for grouped in (False, True):
        ratios = [padded_ratio(data, e, args.batch_size, grouped) for e in range(args.epochs)]
        print(f"{'grouped' if grouped else 'random '} batches: padded / real tokens = "
              f"{np.mean(ratios):.2f} (epochs: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
