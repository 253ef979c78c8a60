"""Sparse knowledge-distillation losses from a teacher's stored top-k, or its sampled ids.

A top-k store keeps, per supervised position, the teacher's k most probable token ids (k may
vary by position: adaptive k), their log-probs at temperature 1, and the exact mass r outside
them (the tail); a sampled store keeps ids drawn from the teacher with their counts (`sampled`,
an unbiased estimate of the full-distribution loss). The losses here take the student's full log-probs (`student_logprobs`, which the CE term needs anyway at
tau = 1) and touch only the k columns of the teacher's ids: the KD term costs a gather
over the CE term, not another pass over the vocabulary.

Each loss returns one value per position, shape [n]; the caller averages over supervised
tokens and scales by alpha. Both are multiplied by tau^2 so that their gradients keep the
same size whatever the temperature (Hinton et al., 2015).

The trainer sums CE and KD with `losses_from_logits` ([n, V] logits in, the whole [n, V]
float32 log-probs built at once) or, by default, with `losses_from_hidden`, which starts from
the final hidden states [n, H] and the output layer and builds logits and log-probs only
[chunk, V] at a time (at a 128k vocabulary and 16k tokens, 8 GB of log-probs become 0.5 GB
per 1,024-token chunk), computing each chunk's gradients as it goes, like Liger-Kernel's
fused linear cross-entropy but in plain torch and for any loss registered here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from smoothkd.batches import Teacher, TeacherSampled, TeacherTopK

_TINY = torch.finfo(torch.float32).tiny


def student_logprobs(student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / tau) over the full vocabulary, in float32: [n, V].

    At tau = 1 this is the tensor the CE term needs too: the trainer computes it once and
    hands it to both, so the KD term adds a gather of k columns and nothing else.
    """
    z = student_logits.float()  # a no-op for float32 input
    return torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


def _gather(student_logp: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """The student's log-probs at the teacher's ids: [n, k]."""
    n, k = teacher.ids.shape
    shapes = {f.name: tuple(getattr(teacher, f.name).shape) for f in dataclasses.fields(teacher)}
    want = {f.name: (n,) if f.name == "tail" else (n, k) for f in dataclasses.fields(teacher)}
    if student_logp.dim() != 2 or student_logp.shape[0] != n or shapes != want:
        # gather would silently broadcast some mismatches (e.g. one teacher row for all positions)
        raise ValueError(f"student log-probs {tuple(student_logp.shape)} must be [n, V] with the teacher's n: "
                         + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))
    return student_logp.gather(-1, teacher.ids)


def _rows(teacher: Teacher, rows: slice) -> Teacher:
    return type(teacher)(**{f.name: getattr(teacher, f.name)[rows] for f in dataclasses.fields(teacher)})


def topk_tail(student_logp: torch.Tensor, teacher: TeacherTopK, temperature: float = 1.0) -> torch.Tensor:
    """KD cross-entropy over k + 1 outcomes: the teacher's top-k tokens and one tail bucket. [n]

    Teacher: q_i = (1 - r) softmax(logprobs / tau)_i on the top-k S, and r on the tail; at
    tau = 1 this is the teacher itself. Student: p_i on S and 1 - sum_S p on the tail, from
    student_logp = student_logprobs(logits, tau) over the full vocabulary.
    loss = tau^2 (-sum_S q_i log p_i - r log(1 - sum_S p_i)).

    Unlike renormalising over S, this is minimised exactly when the student matches the
    teacher on S and on the total mass it leaves outside S. Padding entries (adaptive k: log-prob
    -inf) have q = 0 and are left out of S.
    """
    logp = _gather(student_logp, teacher)  # [n, k]
    r = teacher.tail.float()  # [n]
    # (1 - r) * softmax rather than exp(logprobs / tau): q sums to 1 - r exactly at any tau.
    q = (1.0 - r)[:, None] * torch.softmax(teacher.logprobs.float() / temperature, dim=-1)  # [n, k]
    # log(1 - sum_S p) = log(-expm1(log sum_S p)) from the k gathered columns alone. The clamp
    # keeps it finite when the student leaves (numerically) nothing outside S: the term is then
    # r * log(tiny), 0 when r == 0 rather than 0 * -inf = NaN, and clamp_min passes no gradient
    # there, so the backward pass stays finite as well (masking the value afterwards would not).
    lse_in = torch.logsumexp(logp.masked_fill(torch.isinf(teacher.logprobs), -torch.inf), dim=-1)  # [n], log sum_S p
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


def sampled(student_logp: torch.Tensor, teacher: TeacherSampled, temperature: float = 1.0) -> torch.Tensor:
    """Random-sampling KD (Anshumann et al. 2025): cross-entropy against the draws. [n]

    The store holds, per position, N ids drawn independently from the teacher's full distribution q
    (at temperature 1), as distinct ids v with counts c_v. loss = -(1/N) sum_v c_v log p_v.

    Unbiased: each draw is v with probability q_v, so E[c_v] = N q_v and, the draws not depending on
    the student, E[loss] = -sum_v q_v log p_v = CE(q, p), the full-distribution KD loss over the whole
    vocabulary; its gradient in the logits, (p - c / N), has expectation p - q, the full loss's. A top-k
    cache has no such estimator: it knows nothing of q outside its k ids and biases the student
    towards them. Only at tau = 1: the draws say nothing of q^(1/tau) elsewhere (the trainer refuses it).
    """
    if temperature != 1.0:
        raise ValueError("sampled labels estimate the teacher at temperature 1 only")
    logp = _gather(student_logp, teacher)  # [n, m]
    counts = teacher.counts.float()
    # padding (count 0) contributes nothing, even where the student's log-prob would be -inf
    picked = torch.where(counts > 0, counts * logp, torch.zeros_like(logp))
    return -picked.sum(dim=-1) / counts.sum(dim=-1)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {"topk_tail": topk_tail, "topk_renorm": topk_renorm,
                                                  "sampled": sampled}
LOSS_LABELS = {"topk_tail": "topk", "topk_renorm": "topk", "sampled": "sampled"}  # the store label kind each reads


KDLoss = Callable[[torch.Tensor, Teacher, float], torch.Tensor]


def losses_from_logits(student_logits: torch.Tensor, targets: torch.Tensor, teacher: Teacher,
                       kd_loss: KDLoss | None, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE against the hard targets, KD), each summed over the n rows of student_logits [n, V].

    targets [n] and teacher [n, k] are aligned with the rows; kd_loss None (alpha = 0) gives KD 0
    and skips it. Builds [n, V] float32 log-probs (twice at tau != 1) for the whole batch.
    """
    return _losses_from_logprobs(student_logprobs(student_logits), targets, teacher, kd_loss, temperature)


def _losses_from_logprobs(logp: torch.Tensor, targets: torch.Tensor, teacher: Teacher, kd_loss: KDLoss | None,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """losses_from_logits from the student's log-probs at tau = 1, logp [n, V] float32."""
    ce = F.nll_loss(logp, targets, reduction="sum")
    if kd_loss is None:
        return ce, ce.new_zeros(())
    # log_softmax(logits / tau) = log_softmax(logp / tau): logp is the logits shifted per row
    kd_logp = logp if temperature == 1.0 else torch.log_softmax(logp / temperature, dim=-1)  # [n, V]
    return ce, kd_loss(kd_logp, teacher, temperature).sum()


def losses_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                       teacher: Teacher, kd_loss: KDLoss | None, alpha: float, temperature: float = 1.0,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE + alpha * KD, CE, KD) summed over n positions, from their final hidden states
    hidden [n, H] and the output layer (weight [V, H], bias [V] or None), `chunk` rows at a time.

    The same values and gradients as `losses_from_logits(F.linear(hidden, weight, bias), ...)`
    (up to the order of float sums), but no [n, V] tensor ever exists: each chunk's log-probs
    [chunk, V] float32 are built, differentiated (torch.autograd from the log-probs on, that
    chunk alone, so every registered loss works; through log_softmax by hand, in place) and
    dropped in the forward pass, which keeps only the gradients of hidden [n, H], weight [V, H]
    and bias; the backward pass scales them. At most about three [chunk, V] float32 buffers are
    alive at once (two more at tau != 1), and no second matmul over the vocabulary is run, as
    recomputing each chunk under torch.utils.checkpoint would. Only the first value has a
    gradient (CE and KD are for logs); it cannot be differentiated twice.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 row, got {chunk}")
    return _ChunkedLosses.apply(hidden, weight, bias, targets, teacher, kd_loss, alpha, temperature, chunk,
                                torch.is_grad_enabled())


class _ChunkedLosses(torch.autograd.Function):
    """`losses_from_hidden`'s engine: the gradients are computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher, kd_loss, alpha, temperature, chunk, grad_enabled):
        need_h, need_w, need_b = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        grad_h = torch.zeros_like(hidden) if need_h else None  # [n, H]
        # [V, H] and [V] summed over chunks in float32 whatever the weights' dtype (a bfloat16 sum
        # would round at every chunk); they do not grow with n.
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        ce = kd = torch.zeros((), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]  # [c, H]
            # [c, V] float32, the chunk's only buffer over the vocabulary besides its gradient's: the
            # logits are a temporary, and nothing is saved for a backward pass through log_softmax
            logp = torch.log_softmax(F.linear(h, weight, bias).float(), dim=-1)
            logp.requires_grad_(need_h or need_w or need_b)
            with torch.enable_grad():
                ce_c, kd_c = _losses_from_logprobs(logp, targets[rows], _rows(teacher, rows), kd_loss, temperature)
                total = ce_c + alpha * kd_c
            if logp.requires_grad:
                (g,) = torch.autograd.grad(total, logp)  # [c, V]
                # back through logp = z - logsumexp(z) by hand, in place: dz = g - softmax(z) sum(g)
                g -= logp.detach().exp_().mul_(g.sum(dim=-1, keepdim=True))
                g = g.to(weight.dtype)  # as the whole path's logits get it
                if need_h:
                    grad_h[rows] = g @ weight
                if need_w:
                    if grad_w.dtype == g.dtype:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += g.t() @ h  # a matmul in the weights' dtype, summed in float32
                if need_b:
                    grad_b += g.sum(dim=0)
            ce, kd = ce + ce_c.detach(), kd + kd_c.detach()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = weight.dtype, bias.dtype if bias is not None else None
        ctx.mark_non_differentiable(ce, kd)
        return ce + alpha * kd, ce, kd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_total, _g_ce, _g_kd):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grads = (grad_h.mul_(g_total) if grad_h is not None else None,
                 grad_w.mul_(g_total).to(w_dtype) if grad_w is not None else None,
                 grad_b.mul_(g_total).to(b_dtype) if grad_b is not None else None)
        return *grads, None, None, None, None, None, None, None
