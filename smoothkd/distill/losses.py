"""Sparse knowledge-distillation losses from a teacher's stored top-k.

The store keeps, per supervised position, the teacher's k most probable token ids, their
log-probs at temperature 1, and the exact mass r outside them (the tail). Both losses here
take the student's full log-probs (`student_logprobs`, which the CE term needs anyway at
tau = 1) and touch only the k columns of the teacher's ids: the KD term costs a gather
over the CE term, not another pass over the vocabulary.

Each loss returns one value per position, shape [n]; the caller averages over supervised
tokens and scales by alpha. Both are multiplied by tau^2 so that their gradients keep the
same size whatever the temperature (Hinton et al., 2015).
"""

from __future__ import annotations

from typing import Callable

import torch

from smoothkd.batches import TeacherTopK

_TINY = torch.finfo(torch.float32).tiny


def student_logprobs(student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / tau) over the full vocabulary, in float32: [n, V].

    At tau = 1 this is the tensor the CE term needs too: the trainer computes it once and
    hands it to both, so the KD term adds a gather of k columns and nothing else.
    """
    z = student_logits.float()  # a no-op for float32 input
    return torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


def _gather(student_logp: torch.Tensor, teacher: TeacherTopK) -> torch.Tensor:
    """The student's log-probs at the teacher's top-k ids: [n, k]."""
    n, k = teacher.ids.shape
    if student_logp.dim() != 2 or student_logp.shape[0] != n or teacher.logprobs.shape != (n, k) \
            or teacher.tail.shape != (n,):
        # gather would silently broadcast some mismatches (e.g. one teacher row for all positions)
        raise ValueError(
            f"student log-probs {tuple(student_logp.shape)} must be [n, V] with the teacher's n: "
            f"ids {tuple(teacher.ids.shape)}, logprobs {tuple(teacher.logprobs.shape)}, tail {tuple(teacher.tail.shape)}"
        )
    return student_logp.gather(-1, teacher.ids)


def topk_tail(student_logp: torch.Tensor, teacher: TeacherTopK, temperature: float = 1.0) -> torch.Tensor:
    """KD cross-entropy over k + 1 outcomes: the teacher's top-k tokens and one tail bucket. [n]

    Teacher: q_i = (1 - r) softmax(logprobs / tau)_i on the top-k S, and r on the tail; at
    tau = 1 this is the teacher itself. Student: p_i on S and 1 - sum_S p on the tail, from
    student_logp = student_logprobs(logits, tau) over the full vocabulary.
    loss = tau^2 (-sum_S q_i log p_i - r log(1 - sum_S p_i)).

    Unlike renormalising over S, this is minimised exactly when the student matches the
    teacher on S and on the total mass it leaves outside S.
    """
    logp = _gather(student_logp, teacher)  # [n, k]
    r = teacher.tail.float()  # [n]
    # (1 - r) * softmax rather than exp(logprobs / tau): q sums to 1 - r exactly at any tau.
    q = (1.0 - r)[:, None] * torch.softmax(teacher.logprobs.float() / temperature, dim=-1)  # [n, k]
    # log(1 - sum_S p) = log(-expm1(log sum_S p)) from the k gathered columns alone. The clamp
    # keeps it finite when the student leaves (numerically) nothing outside S: the term is then
    # r * log(tiny), 0 when r == 0 rather than 0 * -inf = NaN, and clamp_min passes no gradient
    # there, so the backward pass stays finite as well (masking the value afterwards would not).
    lse_in = torch.logsumexp(logp, dim=-1)  # [n], log sum_S p, <= 0 up to rounding
    log_tail = torch.log(torch.clamp_min(-torch.expm1(lse_in), _TINY))  # [n]
    return temperature**2 * (-(q * logp).sum(dim=-1) - r * log_tail)


def topk_renorm(student_logp: torch.Tensor, teacher: TeacherTopK, temperature: float = 1.0) -> torch.Tensor:
    """KD cross-entropy against the teacher renormalised over its top-k S. [n]

    q = softmax(logprobs / tau) over S; loss = tau^2 (-sum_S q_i log p_i), with p the student
    at temperature tau over the full vocabulary. The common choice, but biased: it ignores the
    teacher's tail r and so pushes the student to put all its mass inside S.
    """
    logp = _gather(student_logp, teacher)  # [n, k]
    q = torch.softmax(teacher.logprobs.float() / temperature, dim=-1)  # [n, k]
    return temperature**2 * -(q * logp).sum(dim=-1)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"topk_tail": topk_tail, "topk_renorm": topk_renorm}
