"""Paired statistics, forgetting and the temperature fit against hand-computed cases."""

import numpy as np
import pytest

from smoothkd.evaluate.stats import (BETTER, NO_DIFFERENCE, WORSE, fit_temperature, forgetting,
                                     paired_comparison, proportion)


def test_zero_difference_is_no_detectable_difference():
    x = np.random.default_rng(1).normal(size=50)
    c = paired_comparison(x, x.copy(), higher_is_better=True)
    assert c.diff == 0 and c.ci_low == 0 and c.ci_high == 0
    assert c.p_value == 1.0 and c.verdict == NO_DIFFERENCE


def test_planted_shift_is_detected_in_the_metric_direction():
    rng = np.random.default_rng(2)
    sft = rng.normal(size=200)
    kd = sft + 0.3 + rng.normal(scale=0.2, size=200)  # noisy pairs, shifted up by 0.3
    up = paired_comparison(kd, sft, higher_is_better=True)
    assert up.verdict == BETTER and up.ci_low < 0.3 < up.ci_high and up.ci_low > 0 and up.p_value < 1e-3
    down = paired_comparison(kd, sft, higher_is_better=False)  # e.g. a hallucination rate: higher is worse
    assert down.verdict == WORSE and down.diff == pytest.approx(up.diff)


def test_noise_without_shift_is_not_called():
    rng = np.random.default_rng(3)
    sft = rng.normal(size=100)
    kd = sft + rng.normal(scale=0.5, size=100) - 0.0
    kd -= (kd - sft).mean()  # exactly zero mean difference, nonzero spread
    c = paired_comparison(kd, sft, higher_is_better=True)
    assert c.verdict == NO_DIFFERENCE and c.ci_low < 0 < c.ci_high and c.p_value > 0.5


def test_exact_sign_flip_p_value_on_three_pairs():
    # Differences 1, 2, 3: of the 2^3 sign patterns, only +++ and --- reach |mean| >= 2.
    c = paired_comparison(np.array([1.0, 2.0, 3.0]), np.zeros(3), higher_is_better=True)
    assert c.p_value == pytest.approx(2 / 8)
    assert c.verdict == NO_DIFFERENCE  # p = 0.25: three examples cannot decide
    assert c.diff == pytest.approx(2.0)


def test_one_example_decides_nothing():
    c = paired_comparison(np.array([0.9]), np.array([0.1]), higher_is_better=True)
    assert c.p_value == 1.0 and c.verdict == NO_DIFFERENCE and c.diff == pytest.approx(0.8)


def test_runs_are_averaged_per_example_before_pairing():
    kd = np.array([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])  # two runs
    sft = np.array([[0.0, 0.0, 1.0, 0.0]])
    c = paired_comparison(kd, sft, higher_is_better=True)
    assert c.kd_mean == pytest.approx(0.625) and c.sft_mean == pytest.approx(0.25)
    assert c.diff == pytest.approx(np.mean([0.5, 0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="same examples"):
        paired_comparison(kd, sft[:, :3], higher_is_better=True)


def test_forgetting_on_hand_made_outcomes():
    ref = np.array([1, 1, 1, 1, 0, 0, 0, 1], dtype=bool)
    now = np.array([1, 0, 1, 0, 1, 0, 0, 1], dtype=bool)
    f = forgetting(ref, now)
    assert (f.forgotten.k, f.forgotten.n) == (2, 5) and f.forgotten.rate == pytest.approx(0.4)
    assert (f.learned.k, f.learned.n) == (1, 3) and f.learned.rate == pytest.approx(1 / 3)
    assert f.forgotten.ci_low < 0.4 < f.forgotten.ci_high
    assert forgetting(ref, ref).forgotten.rate == 0.0


def test_wilson_interval_matches_the_formula():
    k, n, z = 7, 20, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    got = proportion(k, n)
    assert got.ci_low == pytest.approx(centre - half, abs=1e-9) and got.ci_high == pytest.approx(centre + half, abs=1e-9)
    assert np.isnan(proportion(0, 0).rate)


def test_temperature_fit_recovers_a_planted_temperature():
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3.0, size=(20000, 12))
    planted = 2.5  # the labels follow softmax(logits / 2.5): the model is overconfident
    z = logits / planted
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    targets = (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)

    def nll(t: float) -> float:
        s = logits / t
        lse = np.log(np.exp(s - s.max(axis=1, keepdims=True)).sum(axis=1)) + s.max(axis=1)
        return float((lse - s[np.arange(len(s)), targets]).mean())

    assert fit_temperature(nll) == pytest.approx(planted, rel=0.05)
