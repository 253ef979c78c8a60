"""Paired statistics that give a verdict: KD vs SFT on the same examples, forgetting against a
reference model, and the temperature that post-hoc scaling would fit.

Resampling goes through scipy.stats (bootstrap, permutation_test, binomtest) with a fixed
seed, so every interval and p-value in a report can be recomputed from its examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
N_RESAMPLES = 9999
SEED = 0

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"

# How examples are resampled, said once for reports.
RESAMPLING = ("examples resampled (95% BCa bootstrap, 9,999 resamples); a group's runs are averaged per "
              "example first, so the spread over seeds shows in the mean +- std columns, not in the interval")


@dataclass(frozen=True)
class PairedComparison:
    """KD minus SFT on one metric, over the examples both were scored on."""

    n: int  # paired examples
    kd_mean: float
    sft_mean: float
    diff: float  # mean over examples of (KD - SFT)
    ci_low: float
    ci_high: float
    p_value: float  # two-sided paired permutation test of a zero mean difference
    higher_is_better: bool
    verdict: str  # BETTER, WORSE or NO_DIFFERENCE, for KD


def paired_comparison(kd: np.ndarray, sft: np.ndarray, higher_is_better: bool, *, seed: int = SEED,
                      n_resamples: int = N_RESAMPLES) -> PairedComparison:
    """`kd`, `sft`: [runs, n] (or [n]) per-example values of one metric on the same n examples.

    Runs of a group are averaged per example, then the per-example differences are bootstrapped
    for the interval and sign-flipped for the p-value. The verdict needs both: an interval that
    excludes 0 and p < 0.05; otherwise "no detectable difference".
    """
    kd2, sft2 = np.atleast_2d(np.asarray(kd, dtype=np.float64)), np.atleast_2d(np.asarray(sft, dtype=np.float64))
    if kd2.shape[1] != sft2.shape[1]:
        raise ValueError(f"paired values need the same examples: {kd2.shape[1]} vs {sft2.shape[1]}")
    a, b = kd2.mean(axis=0), sft2.mean(axis=0)
    d = a - b  # [n]
    n, diff = len(d), float(d.mean()) if len(d) else float("nan")
    if n < 2 or np.ptp(d) == 0:
        # No spread: resampling cannot move the mean (and BCa is undefined). A constant nonzero
        # difference on few examples still gets the exact sign-flip p-value below.
        low = high = diff
    else:
        ci = stats.bootstrap((d,), np.mean, confidence_level=CONFIDENCE, n_resamples=n_resamples,
                             method="BCa", random_state=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
        if not (np.isfinite(low) and np.isfinite(high)):  # BCa degenerates on near-constant data
            ci = stats.bootstrap((d,), np.mean, confidence_level=CONFIDENCE, n_resamples=n_resamples,
                                 method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
            low, high = float(ci.low), float(ci.high)
    p = _sign_flip_p(d, seed, n_resamples)
    verdict = NO_DIFFERENCE
    if n and p < SIGNIFICANCE and (low > 0 or high < 0):
        verdict = BETTER if (diff > 0) == higher_is_better else WORSE
    return PairedComparison(n, float(a.mean()) if n else float("nan"), float(b.mean()) if n else float("nan"),
                            diff, low, high, p, higher_is_better, verdict)


def _sign_flip_p(d: np.ndarray, seed: int, n_resamples: int) -> float:
    """Two-sided paired permutation test (each pair's KD and SFT values swapped at random)."""
    if len(d) < 2 or not np.any(d):  # one example cannot be told from chance
        return 1.0
    res = stats.permutation_test((d, np.zeros_like(d)), lambda x, y, axis: np.mean(x - y, axis=axis),
                                 permutation_type="samples", vectorized=True, n_resamples=n_resamples,
                                 alternative="two-sided", random_state=np.random.default_rng(seed))
    return float(res.pvalue)


@dataclass(frozen=True)
class Proportion:
    k: int
    n: int
    rate: float  # k / n (nan when n = 0)
    ci_low: float  # 95% Wilson interval
    ci_high: float


def proportion(k: int, n: int) -> Proportion:
    if n == 0:
        return Proportion(0, 0, float("nan"), float("nan"), float("nan"))
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return Proportion(k, n, k / n, float(ci.low), float(ci.high))


@dataclass(frozen=True)
class Forgetting:
    """Against a reference model on the same items (Kaplan et al. 2026)."""

    forgotten: Proportion  # of the items the reference answered correctly, now wrong
    learned: Proportion  # of the items the reference answered wrongly, now right


def forgetting(reference_correct: np.ndarray, model_correct: np.ndarray) -> Forgetting:
    ref, now = np.asarray(reference_correct, dtype=bool), np.asarray(model_correct, dtype=bool)
    if ref.shape != now.shape:
        raise ValueError(f"forgetting needs outcomes on the same items: {ref.shape} vs {now.shape}")
    return Forgetting(forgotten=proportion(int((ref & ~now).sum()), int(ref.sum())),
                      learned=proportion(int((~ref & now).sum()), int((~ref).sum())))


def fit_temperature(nll_at: Callable[[float], float], bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the mean NLL of softmax(logits / T), by a bounded scalar search
    (NLL is convex in 1/T, so unimodal in T)."""
    res = optimize.minimize_scalar(nll_at, bounds=bounds, method="bounded", options={"xatol": 1e-4})
    return float(res.x)
