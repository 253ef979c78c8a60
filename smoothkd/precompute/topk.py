"""Top-k soft labels from teacher logits: float32 log-probs, exact tail mass."""

from __future__ import annotations

import torch

from smoothkd.storage_schemas.spec import TopKLabels


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
