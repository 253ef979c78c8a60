"""Top-k soft labels from teacher logits: float32 log-probs, exact tail mass."""

from __future__ import annotations

import torch

from smoothkd.storage_schemas.spec import TopKLabels


def topk_labels(logits: torch.Tensor, targets: torch.Tensor, k: int) -> TopKLabels:
    """Soft labels for n positions.

    logits: [n, V] teacher logits at the positions that predict `targets`; overwritten.
    targets: [n] the tokens that actually follow.
    Log-probs are logits minus their float32 logsumexp (a log-softmax without writing the
    [n, V] result). The tail is the mass of the V - k entries outside the top-k, summed
    directly rather than as 1 - sum(top-k): that keeps its relative precision when it is tiny
    (1e-9 is common for a confident teacher), where 1 - x in float32 would be noise.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [n, 1]
    values, ids = logits.topk(k, dim=-1, sorted=True)  # [n, k], most probable first
    true = logits.gather(-1, targets.long()[:, None])  # [n, 1]
    outside = logits.scatter_(-1, ids, float("-inf"))  # in place: the logits are not used again
    tail = (torch.logsumexp(outside, dim=-1, keepdim=True) - lse).exp()  # [n, 1]; 0 when k == V
    return TopKLabels(
        ids=ids.cpu().numpy(),
        logprobs=(values - lse).cpu().numpy(),
        true_logprob=(true - lse)[:, 0].cpu().numpy(),
        tail=tail[:, 0].cpu().numpy(),
    )
