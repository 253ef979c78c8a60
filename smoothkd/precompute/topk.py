"""Soft labels from teacher logits: the top-k (float32 log-probs, exact tail mass), its adaptive
cut, and ids sampled from the full distribution."""

from __future__ import annotations

import numpy as np
import torch

from smoothkd.storage_schemas.spec import PAD_ID, SampledLabels, TopKLabels


def topk_labels(logits: torch.Tensor, targets: torch.Tensor, k: int) -> TopKLabels:
    """Soft labels for n positions.

    logits: [n, V] teacher logits at the positions that predict `targets`; overwritten.
    targets: [n] the tokens that actually follow.
    One exp pass over [n, V] serves both the normaliser and the tail. The tail is the mass of
    the V - k entries outside the top-k summed directly, not 1 - sum(top-k): that keeps its
    relative precision when it is tiny (1e-9 is common for a confident teacher), where 1 - x
    in float32 would be noise. (Two torch.logsumexp calls cost twice as much on CPU.)
    """
    x = logits.float()
    values, ids = x.topk(k, dim=-1, sorted=True)  # [n, k], most probable first
    true = x.gather(-1, targets.long()[:, None])  # [n, 1]
    top = values[:, :1]  # [n, 1], the row maximum
    e = x.sub_(top).exp_()  # [n, V] in place: exp(logit - max), all <= 1
    total = e.sum(dim=-1, keepdim=True)  # [n, 1], >= 1
    outside = e.scatter_(-1, ids, 0.0).sum(dim=-1, keepdim=True)  # [n, 1]; 0 when k == V
    lse = top + total.log()  # [n, 1]
    return TopKLabels(
        ids=ids.cpu().numpy(),
        logprobs=(values - lse).cpu().numpy(),
        true_logprob=(true - lse)[:, 0].cpu().numpy(),
        tail=(outside / total)[:, 0].cpu().numpy(),
    )


def keep_entries(labels: TopKLabels, top_p: float | None, min_prob: float | None, min_k: int) -> TopKLabels:
    """Adaptive k: each position keeps the prefix of its top-k that --top-p and --min-prob ask for
    (at least min_k entries); the mass of the others joins the tail, so the distribution is unchanged
    outside the kept entries' own probabilities. Left out entries become padding (FORMAT.md).

    Entry j is kept when the mass ranked above it is below top_p (the fewest entries that reach
    top_p) and its probability is at least min_prob. Both hold for a prefix: probabilities fall
    along the row.
    """
    if top_p is None and min_prob is None:
        return labels
    p = np.exp(labels.logprobs.astype(np.float64))  # [n, k]
    keep = np.ones(p.shape, dtype=bool)
    if top_p is not None:
        keep &= np.cumsum(p, axis=1) - p < top_p
    if min_prob is not None:
        keep &= p >= min_prob
    keep[:, :min_k] = True
    moved = np.where(keep, 0.0, p).sum(axis=1)
    return TopKLabels(ids=np.where(keep, labels.ids, PAD_ID),
                      logprobs=np.where(keep, labels.logprobs, -np.inf).astype(np.float32),
                      true_logprob=labels.true_logprob,
                      tail=np.minimum(labels.tail.astype(np.float64) + moved, 1.0).astype(np.float32))


def sampled_labels(logits: torch.Tensor, targets: torch.Tensor, n_samples: int, generator: torch.Generator
                   ) -> SampledLabels:
    """n_samples draws per position from the teacher's float32 distribution, as distinct ids with
    their counts, most drawn first (ties: smaller id first).

    logits: [n, V] at the positions that predict `targets` [n]. The draws are those of
    torch.multinomial under `generator`: the same seed gives the same labels.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    true = logp.gather(-1, targets.long()[:, None])[:, 0]
    draws = torch.multinomial(logp.exp(), n_samples, replacement=True, generator=generator)  # [n, N]
    flat = torch.sort(draws, dim=-1).values.cpu().numpy().ravel()
    row = np.repeat(np.arange(len(draws)), n_samples)
    new = np.ones(len(flat), dtype=bool)
    new[1:] = (flat[1:] != flat[:-1]) | (row[1:] != row[:-1])
    counts = np.bincount(np.cumsum(new) - 1)
    ids, rows = flat[new], row[new]
    order = np.lexsort((ids, -counts, rows))  # by row, then most drawn, then id
    ids, counts, rows = ids[order], counts[order], rows[order]
    per_row = np.bincount(rows, minlength=len(draws))
    col = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    out_ids = np.full((len(draws), int(per_row.max())), PAD_ID, dtype=np.int64)
    out_counts = np.zeros(out_ids.shape, dtype=np.int32)
    out_ids[rows, col], out_counts[rows, col] = ids, counts
    return SampledLabels(ids=out_ids, counts=out_counts, true_logprob=true.cpu().numpy())
