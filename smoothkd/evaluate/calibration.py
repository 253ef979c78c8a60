"""Calibration of next-token predictions on held-out records (the paper's argument: hard
labels make models overconfident; soft labels should not).

On the store's held-out split (records no run trained on), the model predicts every
response token given the prefix: per-token NLL, entropy of its distribution, top-1
accuracy, and the expected calibration error of its top-1 confidence (15 equal-width bins,
as Guo et al. 2017).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from smoothkd.distill.data import StoreDataset
from smoothkd.storage_schemas import SoftLabelStore

N_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS
                               ) -> tuple[float, list[dict[str, float]]]:
    """ECE = sum_b |B|/n * |acc(B) - conf(B)| over equal-width confidence bins; and the bins."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds (edges[b], edges[b + 1]]; confidence 0 goes to the first bin
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        mask = index == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else 0.0
        conf = float(confidence[mask].mean()) if n else 0.0
        ece += n / max(len(confidence), 1) * abs(acc - conf)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n, "accuracy": acc, "confidence": conf})
    return float(ece), bins


def token_statistics(model: Any, data: StoreDataset, batch_size: int = 4,
                     progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Per supervised token: NLL of the target, entropy, top-1 confidence and correctness."""
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {"nll": [], "entropy": [], "confidence": [], "correct": [], "seq": []}
    for positions in data.batches(epoch=0, seed=0, batch_size=batch_size):
        batch = data.load(positions).to(device)
        with torch.inference_mode():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logp = torch.log_softmax(logits[batch.supervised].float(), dim=-1)  # [n, V]
            conf, pred = logp.max(dim=-1)
            out["nll"].append((-logp.gather(-1, batch.targets[:, None])[:, 0]).cpu().numpy())
            out["entropy"].append(torch.special.entr(logp.exp()).sum(-1).cpu().numpy())  # 0 log 0 = 0
            out["confidence"].append(conf.exp().cpu().numpy())
            out["correct"].append((pred == batch.targets).cpu().numpy())
            per_row = batch.supervised.sum(dim=1).cpu().numpy()  # supervised tokens of each sequence
            out["seq"].append(np.repeat(np.array(batch.seqs), per_row))
        if progress:
            progress(len(positions))
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_calibration(model: Any, store_url: str, split: str = "heldout", sources: tuple[str, ...] = ("original",),
                         batch_size: int = 4, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    store = SoftLabelStore(store_url)
    data = StoreDataset(store, list(sources), split=split)
    stats = token_statistics(model, data, batch_size, progress)
    ece, bins = expected_calibration_error(stats["confidence"], stats["correct"])
    examples = []
    for seq in np.unique(stats["seq"]):  # one row per held-out sequence
        m = stats["seq"] == seq
        examples.append({"seq": int(seq), "n_tokens": int(m.sum()), "nll": float(stats["nll"][m].mean()),
                         "entropy": float(stats["entropy"][m].mean()), "accuracy": float(stats["correct"][m].mean()),
                         "confidence": float(stats["confidence"][m].mean())})
    return {
        "examples": examples,
        "metrics": {
            "nll": float(stats["nll"].mean()),
            "entropy": float(stats["entropy"].mean()),
            "accuracy": float(stats["correct"].mean()),
            "confidence": float(stats["confidence"].mean()),
            "ece": ece,
            "n_tokens": int(len(stats["nll"])),
            "n_sequences": len(data),
        },
        "reliability": bins,
        "split": split,
        "store": store_url,
    }
