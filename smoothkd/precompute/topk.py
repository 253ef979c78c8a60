"""Top-k soft labels from teacher logits: log-softmax in float32, tail mass in float64."""

from __future__ import annotations

import torch

from smoothkd.storage_schemas.spec import TopKLabels


def topk_labels(logits: torch.Tensor, targets: torch.Tensor, k: int) -> TopKLabels:
    """Soft labels for n positions.

    logits: [n, V] teacher logits (any float dtype) at the positions that predict `targets`.
    targets: [n] the tokens that actually follow.
    The tail 1 - sum(exp(top-k)) is computed in float64 from the float32 log-probs, before the
    store rounds anything, so that top-k mass + tail = 1 holds exactly for the stored floats.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    values, ids = logprobs.topk(k, dim=-1, sorted=True)  # [n, k], most probable first
    true = logprobs.gather(-1, targets.long()[:, None]).squeeze(-1)  # [n]
    tail = (-torch.expm1(torch.logsumexp(values.double(), dim=-1))).clamp_(min=0.0)  # [n]
    return TopKLabels(
        ids=ids.cpu().numpy(),
        logprobs=values.cpu().numpy(),
        true_logprob=true.cpu().numpy(),
        tail=tail.cpu().numpy(),
    )
