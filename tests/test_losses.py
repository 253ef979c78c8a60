"""Sparse KD losses against dense float64 computations of the same formulas."""

from __future__ import annotations

import pytest
import torch

from smoothkd.distill import losses
from smoothkd.batches import TeacherTopK
from smoothkd.distill.losses import LOSSES, student_logprobs


def from_logits(fn):
    """The loss as a function of student logits (the losses take student_logprobs(logits, tau))."""
    return lambda s, teacher, tau=1.0: fn(student_logprobs(s, tau), teacher, tau)


# Every check below is on values and gradients with respect to the student's logits.
topk_tail, topk_renorm = from_logits(losses.topk_tail), from_logits(losses.topk_renorm)
FROM_LOGITS = {"topk_tail": topk_tail, "topk_renorm": topk_renorm}

N, V, K = 20, 50, 8


def make_teacher(n: int = N, v: int = V, k: int = K, seed: int = 0):
    """A random dense teacher truncated to its top-k, as the store keeps it.

    Returns the float32 TeacherTopK and, in float64, the dense teacher log-probs [n, v],
    its top-k log-probs [n, k] and its tail mass [n].
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    logp = torch.log_softmax(logits, dim=-1)  # [n, v]
    vals, ids = logp.topk(k, dim=-1)  # [n, k], most probable first
    r = 1 - vals.exp().sum(dim=-1)  # [n]
    return TeacherTopK(ids=ids, logprobs=vals.float(), tail=r.float()), logp, vals, r


def make_student(n: int = N, v: int = V, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 2).requires_grad_()


def in_topk(ids: torch.Tensor, v: int) -> torch.Tensor:
    return torch.zeros(ids.shape[0], v, dtype=torch.bool).scatter(-1, ids, True)  # [n, v]


def dense_tail_reference(s: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor, r: torch.Tensor, tau: float):
    """topk_tail in float64 over the dense student, its tail mass summed directly over the non-top-k tokens."""
    logp = torch.log_softmax(s / tau, dim=-1)  # [n, V]
    log_tail = torch.logsumexp(logp.masked_fill(in_topk(ids, s.shape[1]), float("-inf")), dim=-1)  # [n]
    q = (1 - r)[:, None] * torch.softmax(vals / tau, dim=-1)  # [n, k]
    return tau**2 * (-(q * logp.gather(-1, ids)).sum(-1) - r * log_tail)


def dense_renorm_reference(s: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor, r: torch.Tensor, tau: float):
    logp = torch.log_softmax(s / tau, dim=-1)  # [n, V]
    q = torch.exp(vals / tau)
    q = q / q.sum(-1, keepdim=True)  # [n, k], teacher renormalised over its top-k
    return tau**2 * -(q * logp.gather(-1, ids)).sum(-1)


REFERENCES = {"topk_tail": dense_tail_reference, "topk_renorm": dense_renorm_reference}


def value_and_grad(fn, s: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    loss = fn(s, *args)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss, grad


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("name", ["topk_tail", "topk_renorm"])
def test_loss_and_gradient_match_dense_float64_reference(name: str, tau: float):
    teacher, _, vals, r = make_teacher()
    s = make_student()
    loss, grad = value_and_grad(FROM_LOGITS[name], s, teacher, tau)
    assert loss.shape == (N,) and loss.dtype == torch.float32
    s64 = s.detach().double().requires_grad_()
    ref, ref_grad = value_and_grad(REFERENCES[name], s64, teacher.ids, vals, r, tau)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().max() > 1e-2  # the comparison is not vacuous


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_tail_loss_with_the_whole_vocabulary_is_the_full_cross_entropy(tau: float):
    teacher, logp_t, _, r = make_teacher(k=V)
    assert r.abs().max() < 1e-12
    s = make_student()
    loss, grad = value_and_grad(topk_tail, s, teacher, tau)

    def full_ce(s64):
        q = torch.softmax(logp_t / tau, dim=-1)  # [n, V], the teacher at temperature tau
        return tau**2 * -(q * torch.log_softmax(s64 / tau, dim=-1)).sum(-1)

    s64 = s.detach().double().requires_grad_()
    ref, ref_grad = value_and_grad(full_ce, s64)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)


def _all_mass_inside(ids: torch.Tensor, peak: str) -> torch.Tensor:
    """Student logits that leave numerically nothing outside the teacher's top-k."""
    s = torch.full((ids.shape[0], V), -50.0)
    if peak == "spread":
        s.scatter_(-1, ids, 50.0)  # all of S at +50
    else:
        s.scatter_(-1, ids[:, :1], 80.0)  # one token of S takes everything
    return s.requires_grad_()


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("peak", ["spread", "single"])
def test_no_nan_when_the_student_puts_all_its_mass_inside_the_top_k(peak: str, tau: float):
    # r > 0: the tail term is large (the student gives the teacher's tail ~no mass) but finite.
    teacher, *_ = make_teacher()
    assert (teacher.tail > 1e-3).all()
    s = _all_mass_inside(teacher.ids, peak)
    loss, grad = value_and_grad(topk_tail, s, teacher, tau)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    renorm = topk_renorm(s, teacher, tau)
    assert (loss - (1 - teacher.tail) * renorm > tau**2 * teacher.tail * 30).all()  # -log(student tail) >= 30

    # r == 0: a teacher entirely inside its top-k; the tail term vanishes instead of 0 * -inf.
    g = torch.Generator().manual_seed(2)
    exact = TeacherTopK(ids=teacher.ids, logprobs=torch.log_softmax(torch.randn(N, K, generator=g), -1),
                        tail=torch.zeros(N))
    s = _all_mass_inside(exact.ids, peak)
    loss, grad = value_and_grad(topk_tail, s, exact, tau)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ref, ref_grad = value_and_grad(topk_renorm, s, exact, tau)  # the same loss when r == 0
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("name", ["topk_tail", "topk_renorm"])
def test_no_positions_give_an_empty_loss(name: str):
    teacher = TeacherTopK(ids=torch.zeros(0, K, dtype=torch.long), logprobs=torch.zeros(0, K), tail=torch.zeros(0))
    s = torch.randn(0, V, requires_grad=True)
    loss = FROM_LOGITS[name](s, teacher, 2.0)
    assert loss.shape == (0,)
    total = loss.sum()
    assert total.item() == 0.0
    total.backward()
    assert s.grad is not None and s.grad.shape == (0, V)


def test_tail_loss_is_minimised_by_matching_the_top_k_and_the_tail_mass():
    teacher, _, vals, r = make_teacher()
    assert (r > 0.05).all()
    mask = in_topk(teacher.ids, V)
    # The student copies the teacher on S and puts mass r outside S, spread unlike the teacher.
    g = torch.Generator().manual_seed(3)
    other = torch.randn(N, V, generator=g, dtype=torch.float64).masked_fill(mask, float("-inf"))
    outside = r.log()[:, None] + torch.log_softmax(other, dim=-1)  # [n, V], sums to r off S
    inside = torch.zeros(N, V, dtype=torch.float64).scatter(-1, teacher.ids, vals)  # [n, V]
    s = torch.where(mask, inside, outside).float().requires_grad_()

    loss, grad = value_and_grad(topk_tail, s, teacher)
    assert grad.abs().max() < 1e-5
    # At the minimum the loss is the entropy of the teacher's k + 1 outcomes.
    entropy = -(vals.exp() * vals).sum(-1) - r * r.log()
    torch.testing.assert_close(loss.double(), entropy, rtol=1e-5, atol=1e-6)
    perturbed = (s.detach() + 0.3 * torch.randn(N, V, generator=g)).requires_grad_()
    assert (topk_tail(perturbed, teacher) - loss > 1e-4).all()

    # The renormalised loss is not stationary there: it pulls the tail mass r back into S
    # (gradient p - q / (1 - r): -q r / (1 - r) on S, summing to -r, and +p = r off S).
    _, renorm_grad = value_and_grad(topk_renorm, s, teacher)
    torch.testing.assert_close(renorm_grad.abs().sum(-1).double(), 2 * r, rtol=1e-4, atol=1e-6)


def test_low_precision_logits_are_computed_in_float32():
    teacher, *_ = make_teacher()
    s = make_student().detach().bfloat16().requires_grad_()
    loss, grad = value_and_grad(topk_tail, s, teacher, 2.0)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, topk_tail(s.detach().float(), teacher, 2.0))


def test_mismatched_teacher_rows_are_refused():
    teacher, *_ = make_teacher(n=1)
    with pytest.raises(ValueError, match="must be \\[n, V\\]"):
        topk_tail(make_student(), teacher)  # one teacher row would otherwise broadcast over all 20


def test_registry_has_exactly_the_three_losses():
    assert LOSSES == {"topk_tail": losses.topk_tail, "topk_renorm": losses.topk_renorm, "sampled": losses.sampled}


@pytest.mark.parametrize("name", ["topk_tail", "topk_renorm"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_padding_entries_change_nothing(name, tau):
    """Adaptive k: a row that keeps k' < k entries and pads the rest (log-prob -inf) gives the loss,
    and gradients, of the same row stored with k' entries."""
    teacher, *_ = make_teacher()
    keep = torch.randint(1, K + 1, (N,), generator=torch.Generator().manual_seed(3))
    valid = torch.arange(K) < keep[:, None]
    cut = teacher.tail + torch.where(valid, 0.0, teacher.logprobs.exp()).sum(-1)
    padded = TeacherTopK(ids=torch.where(valid, teacher.ids, 0), logprobs=teacher.logprobs.masked_fill(~valid, -torch.inf),
                         tail=cut)
    s1 = make_student().requires_grad_()
    got = FROM_LOGITS[name](s1, padded, tau)
    got.sum().backward()
    for i in range(N):  # each row alone, at its own width
        k = int(keep[i])
        row = TeacherTopK(ids=teacher.ids[i : i + 1, :k], logprobs=teacher.logprobs[i : i + 1, :k], tail=cut[i : i + 1])
        s2 = make_student()[i : i + 1].detach().requires_grad_()
        want = FROM_LOGITS[name](s2, row, tau)
        want.sum().backward()
        assert torch.allclose(got[i], want[0], atol=1e-5)
        assert torch.allclose(s1.grad[i], s2.grad[0], atol=1e-6)


def test_sampled_loss_is_unbiased_for_the_full_distribution_cross_entropy():
    """Many rounds of N = 8 draws from a tiny teacher (V = 6): their mean loss and gradient converge to
    the full-distribution CE and its gradient, -sum_v q_v log p_v; a top-k of 2 stays biased."""
    from smoothkd.batches import TeacherSampled
    from smoothkd.precompute.topk import sampled_labels

    v, n_draws, rounds = 6, 8, 4000
    g = torch.Generator().manual_seed(0)
    teacher_logits = torch.randn(1, v, generator=g, dtype=torch.float64) * 1.5
    q = torch.softmax(teacher_logits, -1)
    student = torch.randn(1, v, generator=g)
    full = -(q * torch.log_softmax(student.double(), -1)).sum()
    full_grad = torch.softmax(student.double(), -1) - q  # d CE / d logits
    logits = teacher_logits.float().repeat(rounds, 1)  # one row per round: independent draws
    lab = sampled_labels(logits, torch.zeros(rounds, dtype=torch.long), n_draws, torch.Generator().manual_seed(1))
    assert (lab.counts.sum(1) == n_draws).all()
    teacher = TeacherSampled(ids=torch.from_numpy(lab.ids), counts=torch.from_numpy(lab.counts).float())
    s = student.repeat(rounds, 1).requires_grad_()
    per_round = losses.sampled(student_logprobs(s), teacher)
    per_round.sum().backward()
    se = per_round.double().std() / rounds**0.5
    assert abs(per_round.double().mean() - full) < 4 * se  # within 4 standard errors
    assert torch.allclose(s.grad.double().mean(0), full_grad[0], atol=4 * s.grad.double().std(0).max() / rounds**0.5)
    # the top-2 with its tail bucket is a different quantity: its error does not shrink with rounds
    topk = TeacherTopK(ids=q.topk(2).indices, logprobs=q.topk(2).values.log().float(), tail=(1 - q.topk(2).values.sum(-1)).float())
    assert abs(losses.topk_tail(student_logprobs(student), topk).double() - full) > 10 * se


def test_sampled_loss_refuses_another_temperature():
    from smoothkd.batches import TeacherSampled

    teacher = TeacherSampled(ids=torch.zeros(1, 1, dtype=torch.long), counts=torch.ones(1, 1))
    with pytest.raises(ValueError, match="temperature 1"):
        losses.sampled(student_logprobs(make_student(n=1)), teacher, 2.0)
