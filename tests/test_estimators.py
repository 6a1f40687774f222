"""The off-policy estimators: by hand on a few calls, the identities they must keep, and on a
simulated contextual bandit where the truth is known: unbiased, with intervals that cover it."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.evaluation.estimators import diagnose, estimate, observed, warnings_for


def test_by_hand():
    # three calls, two arms; the logging policy's propensities of both arms, its pick, the outcome
    logged = np.array([[0.5, 0.5], [0.8, 0.2], [0.25, 0.75]])
    chosen = np.array([0, 1, 1])
    y = np.array([1.0, 0.0, 1.0])
    target = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    model = np.array([[0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])
    e = estimate(chosen, logged, target, y, model, confidence=0.9)
    w = np.array([1 / 0.5, 1 / 0.2, 0.5 / 0.75])
    assert e.ips.value == pytest.approx(np.mean(w * y))
    assert e.snips.value == pytest.approx((w * y).sum() / w.sum())
    direct = np.array([0.6, 0.5, 0.5 * 0.2 + 0.5 * 0.8])
    dr = direct + w * (y - np.array([0.6, 0.5, 0.8]))
    assert e.dr.value == pytest.approx(dr.mean())
    se = dr.std(ddof=1) / np.sqrt(3)
    assert (e.dr.low, e.dr.high) == pytest.approx(
        (dr.mean() - 1.6449 * se, dr.mean() + 1.6449 * se), abs=1e-4
    )
    d = diagnose(chosen, logged, target, ["a", "b"], min_propensity=0.3)
    assert d.effective_sample_size == pytest.approx(w.sum() ** 2 / (w**2).sum())
    assert d.max_weight == pytest.approx(5.0)
    assert d.unsupported_mass == 0.0
    # call 2: all its mass on an arm logged at 0.2; call 3: half on one logged at 0.25
    assert d.small_propensity_mass == pytest.approx((1 + 0.5) / 3)


def test_a_candidate_identical_to_the_logging_policy_gets_back_what_it_got():
    rng = np.random.default_rng(0)
    logged = rng.dirichlet(np.ones(4), size=500)
    chosen = np.array([rng.choice(4, p=p) for p in logged])
    y = rng.random(500)
    model = rng.random((500, 4))
    e = estimate(chosen, logged, logged, y, model)
    assert e.ips.value == pytest.approx(y.mean()) and e.snips.value == pytest.approx(y.mean())
    seen = observed(y)
    assert (e.ips.low, e.ips.high) == pytest.approx((seen.low, seen.high))
    assert e.dr.covers(y.mean())
    assert diagnose(chosen, logged, logged, list("abcd"), 0.01).effective_sample_size == pytest.approx(500)


def test_support_and_small_propensities_are_warned_about():
    logged = np.array([[1.0, 0.0, 0.0]] * 50 + [[0.98, 0.02, 0.0]] * 50)
    target = np.array([[0.0, 0.0, 1.0]] * 50 + [[0.0, 1.0, 0.0]] * 50)
    chosen = np.zeros(100, dtype=int)
    d = diagnose(chosen, logged, target, ["a", "b", "c"], min_propensity=0.05)
    assert d.unsupported_mass == pytest.approx(0.5) and d.unsupported_arms == {"c": 0.5}
    assert d.small_propensity_mass == pytest.approx(0.5)
    text = " ".join(warnings_for(d, 0.05))
    assert "50.0% of its picks where the logging policy could not go (c (50.0%))" in text
    assert "below 0.05" in text and "effective sample size 0 of 100" in text


def simulate(rng: np.random.Generator, n: int) -> tuple[float, dict[str, tuple[float, float, float]]]:
    """A contextual bandit with 3 arms; the logging policy explores (eps 0.3) around a softmax of
    a noisy quality estimate; the target prefers the second arm where x > 0. The truth is the
    target's expected reward over the same contexts."""
    x = rng.normal(size=n)
    means = np.stack([0.5 + 0.2 * np.tanh(x), 0.4 + 0.3 * np.tanh(2 * x), np.full(n, 0.45)], axis=1)
    logits = 3 * (means + rng.normal(scale=0.1, size=means.shape))
    soft = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    logged = 0.1 + 0.7 * soft
    chosen = (rng.random(n)[:, None] > np.cumsum(logged, axis=1)).sum(axis=1)
    y = (rng.random(n) < means[np.arange(n), chosen]).astype(float)
    target = np.where((x > 0)[:, None], [0.05, 0.9, 0.05], [0.8, 0.1, 0.1])
    model = np.clip(means + rng.normal(scale=0.05, size=means.shape), 0, 1)  # a decent reward model
    truth = float((target * means).sum(axis=1).mean())
    e = estimate(chosen, logged, target, y, model, confidence=0.9)
    return truth, {k: (v.value, v.low, v.high) for k, v in e.as_dict().items() for v in [getattr(e, k)]}


@pytest.mark.parametrize("n", [300, 2000])
def test_unbiased_with_intervals_that_cover_the_truth(n):
    rng = np.random.default_rng(n)
    runs = [simulate(rng, n) for _ in range(300)]
    for name in ("ips", "snips", "dr"):
        errors = np.array([est[name][0] - truth for truth, est in runs])
        covered = np.mean([est[name][1] <= truth <= est[name][2] for truth, est in runs])
        assert abs(errors.mean()) < 3 * errors.std() / np.sqrt(len(runs)) + 0.002, name  # no bias
        assert 0.84 <= covered <= 0.96, (name, covered)  # 90% intervals
    dr_spread = np.std([est["dr"][0] for _, est in runs])
    ips_spread = np.std([est["ips"][0] for _, est in runs])
    assert dr_spread < ips_spread  # the reward model pays for itself


def test_the_bootstrap_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(size=800)
    logged = np.full((800, 2), 0.5)
    chosen = rng.integers(2, size=800)
    y = rng.random(800) < np.where(chosen == 1, 0.7, 0.3)
    target = np.tile([0.0, 1.0], (800, 1))
    model = np.tile([0.3, 0.7], (800, 1)) + 0 * x[:, None]
    clt = estimate(chosen, logged, target, y.astype(float), model)
    boot = estimate(chosen, logged, target, y.astype(float), model, method="bootstrap")
    assert boot.ips.value == clt.ips.value
    for name in ("ips", "snips", "dr"):
        a, b = getattr(clt, name), getattr(boot, name)
        assert a.high - a.low == pytest.approx(b.high - b.low, rel=0.2)
        assert b.covers(0.7)
