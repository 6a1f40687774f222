"""Computed Thompson-sampling propensities: against millions of draws of the same posteriors, for
every posterior kind the bandit uses (Beta, Normal clipped to [0, 1] with its atoms, a point),
ties, a negative feedback weight, exploration mixed in; the stated error covers the real one; and
the decision does not wait for them."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.routing.bandit import ArmView, Knobs, Posterior, choose
from gateway.routing.propensity import Pending, propensities, win_probabilities

DRAWS = 4_000_000
MC_SE = np.sqrt(0.25 / DRAWS)  # the draws' own standard error at p = 0.5


def drawn(posteriors: list[Posterior], fixed: np.ndarray, weight: float, seed: int = 0) -> np.ndarray:
    """P(argmax) by brute force: the bandit's own arithmetic on many draws (ties: the first)."""
    rng = np.random.default_rng(seed)
    wins = np.zeros(len(posteriors))
    for _ in range(DRAWS // 1_000_000):
        draws = np.stack([p.sample(rng, 1_000_000) for p in posteriors], axis=1)
        wins += np.bincount(np.argmax(weight * draws + fixed, axis=1), minlength=len(posteriors))
    return wins / DRAWS


rng = np.random.default_rng(3)
CASES = {
    "normals, learned": ([Posterior("normal", 0.5 + 0.03 * i, 0.004 + 0.002 * i) for i in range(8)], -0.02),
    "normals, the prior": ([Posterior("normal", 0.8, 0.07) for _ in range(11)], -0.2),
    "normals past 1 (atoms)": ([Posterior("normal", 1.02, 0.05), Posterior("normal", 0.97, 0.04)], -0.05),
    "betas, the optimistic prior": ([Posterior("beta", 1.6, 0.4) for _ in range(11)], -0.2),
    "betas from neighbours": (
        [Posterior("beta", 1.6 + 15 * x, 0.4 + 8 * y) for x, y in rng.random((11, 2))],
        -0.2,
    ),
    "a point, a normal, a beta": (
        [Posterior("normal", 0.7, 0.0), Posterior("normal", 0.7, 0.05), Posterior("beta", 3, 2)],
        0.05,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_computed_propensities_match_millions_of_draws(name):
    posteriors, spread = CASES[name]
    fixed = spread * np.linspace(0, 1, len(posteriors))
    found = win_probabilities(posteriors, fixed, 0.6)
    assert found is not None
    wins, error = found
    truth = drawn(posteriors, fixed, 0.6)
    assert wins.sum() == pytest.approx(1.0, abs=1e-12)
    # within the stated numerical error, plus the draws' own noise (4 standard errors)
    assert np.abs(wins - truth).max() <= error + 4 * MC_SE
    assert error < 2e-3


def test_ties_at_an_atom_go_to_the_first_arm_as_argmax_does():
    # two arms above 1 pile up at the same clipped score 1 about 40% of the time each
    posteriors = [
        Posterior("normal", 0.99, 0.05),
        Posterior("normal", 0.99, 0.05),
        Posterior("normal", 0.5, 0.3),
    ]
    fixed = np.zeros(3)
    wins, _ = win_probabilities(posteriors, fixed, 0.6)
    truth = drawn(posteriors, fixed, 0.6)
    assert truth[0] - truth[1] > 0.1  # the tie rule matters here
    assert np.abs(wins - truth).max() < 4 * MC_SE + 1e-3


def test_a_negative_weight_and_the_degenerate_cases():
    posteriors = [Posterior("beta", 3, 2), Posterior("normal", 0.4, 0.1)]
    fixed = np.zeros(2)
    wins, error = win_probabilities(posteriors, fixed, -0.6)
    assert np.abs(wins - drawn(posteriors, fixed, -0.6)).max() <= error + 4 * MC_SE
    assert win_probabilities(posteriors, np.array([0.0, 0.1]), 0.0)[0].tolist() == [0.0, 1.0]
    assert win_probabilities(posteriors[:1], np.zeros(1), 0.6)[0].tolist() == [1.0]
    # an arm whose whole range lies below another's floor never wins
    far = [Posterior("normal", 0.9, 0.01), Posterior("normal", 0.2, 0.01)]
    assert win_probabilities(far, np.zeros(2), 0.6)[0].tolist() == [1.0, 0.0]


def test_exploration_is_mixed_in_exactly():
    posteriors = [
        Posterior("normal", 0.9, 0.001),
        Posterior("normal", 0.1, 0.001),
        Posterior("normal", 0.1, 0.001),
    ]
    p = propensities(posteriors, np.zeros(3), 0.6, 0.3)
    assert p.exact and p.probs == pytest.approx([0.1 + 0.7, 0.1, 0.1], abs=1e-12)


def test_another_posterior_kind_is_resampled_with_a_stated_bound():
    class Uniform:
        kind = "uniform"

        def __init__(self, lo: float, hi: float) -> None:
            self.lo, self.hi = lo, hi

        def sample(self, rng: np.random.Generator, n: int | None = None):
            return rng.uniform(self.lo, self.hi, size=n)

    p = propensities(
        [Uniform(0, 1), Uniform(0.5, 1)], np.zeros(2), 1.0, 0.0, np.random.default_rng(0), 20_000
    )
    assert not p.exact
    assert p.probs[0] == pytest.approx(0.25, abs=p.error) and 0 < p.error < 0.02  # P(U1 > U2) = 1/4


def test_a_posterior_gone_wrong_is_drawn_not_computed():
    # a NaN mean (a broken model): np.argmax picks the NaN arm every time, and so do the draws
    posteriors = [Posterior("normal", 0.5, 0.1), Posterior("normal", float("nan"), 0.1)]
    assert win_probabilities(posteriors, np.zeros(2), 0.6) is None
    names, probs = Pending(["ok", "broken"], posteriors, np.zeros(2), 0.6, 0.2).resolve()
    assert names == pytest.approx({"ok": 0.1, "broken": 0.9}) and 0 < probs < 0.05


def test_the_decision_does_not_wait_for_its_propensities():
    arms = [ArmView(f"m{i}", Posterior("normal", 0.6 + 0.02 * i, 0.03), rated=50) for i in range(5)]
    choice = choose(arms, Knobs(exploration_rate=0.1), np.random.default_rng(0))
    assert choice.pending is not None and choice.propensity is None and not choice.propensities
    pending: Pending = choice.pending
    choice.resolve()
    assert choice.pending is None and set(choice.propensities) == {a.name for a in arms}
    assert choice.propensity == choice.propensities[choice.arm] >= 0.1 / 5
    assert pending.resolve() is pending.resolve()  # computed once


def test_a_failed_computation_costs_the_record_its_propensities_not_the_record(caplog):
    from gateway.calls import settle_propensities
    from gateway.domain import CallRecord
    from gateway.routing import Decision
    from gateway.routing.bandit import Choice

    class Broken(Pending):
        def resolve(self):
            raise FloatingPointError("boom")

    pending = Broken(["a"], [Posterior("normal", 0.5, 0.1)], np.zeros(1), 0.6, 0.0)
    decision = Decision("a", "bandit", choice=Choice("a", False, None, ["a"], pending=pending))
    record = CallRecord("r1", [], "auto", "a", "ok", 200, decision={"arm": "a"})
    settle_propensities(record, decision)  # does not raise: the call is still recorded
    assert record.propensity is None and record.decision == {"arm": "a"}
    assert "could not compute the propensities of call r1" in caplog.text
