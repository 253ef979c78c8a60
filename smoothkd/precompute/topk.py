"""Top-k soft labels from teacher logits: log-softmax in float32, exact tail mass."""

from __future__ import annotations

import torch

from smoothkd.storage_schemas.spec import TopKLabels


def topk_labels(logits: torch.Tensor, targets: torch.Tensor, k: int) -> TopKLabels:
    """Soft labels for n positions.

    logits: [n, V] teacher logits (any float dtype) at the positions that predict `targets`.
    targets: [n] the tokens that actually follow.
    The tail is the mass of the V - k entries outside the top-k, summed directly
    (logsumexp) rather than as 1 - sum(top-k): that keeps its relative precision when it is
    tiny (1e-9 is common for a confident teacher), where 1 - x in float32 would be noise.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    values, ids = logprobs.topk(k, dim=-1, sorted=True)  # [n, k], most probable first
    true = logprobs.gather(-1, targets.long()[:, None]).squeeze(-1)  # [n]
    outside = logprobs.scatter_(-1, ids, float("-inf"))  # in place: logprobs is not used again
    tail = torch.logsumexp(outside, dim=-1).exp()  # [n]; exactly 0 when k == V
    return TopKLabels(
        ids=ids.cpu().numpy(),
        logprobs=values.cpu().numpy(),
        true_logprob=true.cpu().numpy(),
        tail=tail.cpu().numpy(),
    )
