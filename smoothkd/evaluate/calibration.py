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
import torch.nn.functional as F

from smoothkd.batches import StoreDataset
from smoothkd.evaluate.stats import fit_temperature
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
                     progress: Callable[[int], None] | None = None, reference: Any | None = None,
                     keep_logits: bool = False) -> dict[str, Any]:
    """Per supervised token: NLL of the target, entropy, top-1 confidence and correctness; with a
    reference model, KL(reference || model) of the next-token distributions (output drift); with
    keep_logits, the logits themselves (float16 on the CPU, [n, V]) for a temperature fit."""
    device = next(model.parameters()).device
    names = ["nll", "entropy", "confidence", "correct", "seq"] + (["kl_from_reference"] if reference else [])
    out: dict[str, list[Any]] = {k: [] for k in names + (["logits", "targets"] if keep_logits else [])}
    for positions in data.batches(epoch=0, seed=0, batch_size=batch_size):
        batch = data.load(positions).to(device)
        with torch.inference_mode():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.supervised]
            logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
            conf, pred = logp.max(dim=-1)
            out["nll"].append((-logp.gather(-1, batch.targets[:, None])[:, 0]).cpu().numpy())
            out["entropy"].append(torch.special.entr(logp.exp()).sum(-1).cpu().numpy())  # 0 log 0 = 0
            out["confidence"].append(conf.exp().cpu().numpy())
            out["correct"].append((pred == batch.targets).cpu().numpy())
            per_row = batch.supervised.sum(dim=1).cpu().numpy()  # supervised tokens of each sequence
            out["seq"].append(np.repeat(np.array(batch.seqs), per_row))
            if reference is not None:
                ref = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                ref_logp = torch.log_softmax(ref[batch.supervised].float(), dim=-1)
                kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1)  # sum p_ref (log p_ref - log p)
                out["kl_from_reference"].append(kl.cpu().numpy())
            if keep_logits:
                out["logits"].append(logits.to("cpu", torch.float16))
                out["targets"].append(batch.targets.cpu())
        if progress:
            progress(len(positions))
    return {k: (torch.cat(v) if k in ("logits", "targets") else np.concatenate(v)) for k, v in out.items()}


def scaled_statistics(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                      chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per token: NLL of the target and top-1 confidence under softmax(logits / T), chunk by chunk
    (the [n, V] float32 tensor never exists whole)."""
    nll, conf = [], []
    for i in range(0, len(logits), chunk):
        logp = torch.log_softmax(logits[i:i + chunk].float() / temperature, dim=-1)
        nll.append(-logp.gather(-1, targets[i:i + chunk, None])[:, 0])
        conf.append(logp.max(dim=-1).values.exp())
    return torch.cat(nll).numpy(), torch.cat(conf).numpy()


def temperature_scaling(logits: torch.Tensor, targets: torch.Tensor, correct: np.ndarray) -> dict[str, float]:
    """The post-hoc baseline: the temperature minimising NLL on these tokens, and NLL and ECE under it."""
    t = fit_temperature(lambda temp: float(scaled_statistics(logits, targets, temp)[0].mean()))
    nll, conf = scaled_statistics(logits, targets, t)
    return {"temperature": t, "nll_scaled": float(nll.mean()),
            "ece_scaled": expected_calibration_error(conf, correct)[0]}


def evaluate_calibration(model: Any, store_url: str, split: str = "heldout", sources: tuple[str, ...] = ("original",),
                         batch_size: int = 4, progress: Callable[[int], None] | None = None,
                         reference: Any | None = None, fit_temperature: bool = True) -> dict[str, Any]:
    store = SoftLabelStore(store_url)
    store.check()  # a damaged store is refused, not scored (its chunks are checked as read)
    data = StoreDataset(store, list(sources), split=split)
    stats = token_statistics(model, data, batch_size, progress, reference=reference, keep_logits=fit_temperature)
    ece, bins = expected_calibration_error(stats["confidence"], stats["correct"])
    per_token = [k for k in ("nll", "entropy", "confidence", "kl_from_reference") if k in stats]
    examples = []
    for seq in np.unique(stats["seq"]):  # one row per held-out sequence
        m = stats["seq"] == seq
        examples.append({"seq": int(seq), "n_tokens": int(m.sum()), "accuracy": float(stats["correct"][m].mean()),
                         **{k: float(stats[k][m].mean()) for k in per_token}})
    metrics: dict[str, Any] = {k: float(stats[k].mean()) for k in per_token}
    metrics.update(accuracy=float(stats["correct"].mean()), ece=ece, n_tokens=int(len(stats["nll"])),
                   n_sequences=len(data))
    if fit_temperature:
        metrics.update(temperature_scaling(stats["logits"], stats["targets"], stats["correct"]))
    return {"examples": examples, "metrics": metrics, "reliability": bins, "split": split, "store": store_url}
