"""HCTS's estimate of the best arm (issue 12, the dial's reference): an arm that routing sends only
the hard prompts must not be read as bad everywhere (it was, and the best arm starved); the dial's
correction follows exploration's loss as it shrinks; a starved best arm's clipped doubly robust
mean does not sink the reference below the model's own estimate."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_hcts import DIM, topics

from gateway.routing.hcts import Hcts
from gateway.routing.hcts_dial import Dial, DialSpec, Reference
from gateway.routing.hcts_model import HctsKnobs

# two kinds of prompt (rows: easy, hard); arms cheap, mid, best. Over all prompts the best arm
# (0.70) beats mid (0.55), but on the hard prompts alone it scores less (0.45) than mid overall.
QUALITY = np.array([[0.80, 0.90, 0.95], [0.10, 0.20, 0.45]])


def starved_model(shared_offsets: bool) -> Hcts:
    """Ratings as a router leaves them once it has learnt to send the best arm only the hard
    prompts: cheap and mid rated on both kinds, the best arm on the hard ones only."""
    rng = np.random.default_rng(0)
    x, t = topics(1200, 2, rng)
    knobs = dataclasses.replace(HctsKnobs(), shared_offsets=shared_offsets)
    policy = Hcts(3, DIM, seed=1, knobs=knobs)
    for xi in x:
        policy.observe_call(None, xi, 0, None)
    for xi, ti in zip(x, t, strict=True):
        arms = (0, 1, 2) if ti == 1 else (0, 1)
        for arm in arms:
            policy.observe_rating(xi, arm, float(rng.random() < QUALITY[ti, arm]))
    return policy


def test_an_arm_sent_only_the_hard_prompts_is_still_the_best():
    m0, _, _ = starved_model(shared_offsets=True).model.glob()
    assert int(np.argmax(m0)) == 2
    assert m0[2] == pytest.approx(QUALITY[:, 2].mean(), abs=0.08)
    # without the clusters' shared offsets it reads as worse than mid (the starvation)
    m0, _, _ = starved_model(shared_offsets=False).model.glob()
    assert m0[2] < m0[1]


def test_the_best_arm_is_predicted_well_where_it_was_never_rated():
    rng = np.random.default_rng(0)
    x, t = topics(1200, 2, rng)  # the same prompts
    easy = x[t == 0][:100]
    m, _ = starved_model(shared_offsets=True).model.predict(easy)
    assert np.mean(m.argmax(axis=1) == 2) > 0.7  # on the easy prompts too (there: 0.95 vs 0.90)
    assert m[:, 2].mean() > 0.85
    m, _ = starved_model(shared_offsets=False).model.predict(easy)
    assert m[:, 2].mean() < 0.7  # without the offsets: the hard prompts' score, carried over


def test_offsets_keep_predictions_inside_the_score_range():
    m0, _, _ = starved_model(shared_offsets=True).model.glob()
    policy = starved_model(shared_offsets=True)
    rng = np.random.default_rng(0)
    x, _ = topics(300, 2, rng)
    m, _ = policy.model.predict(x)
    assert np.all((m > 0) & (m < 1)) and np.all((m0 > 0) & (m0 < 1))


def test_the_correction_forgets_exploration_as_it_shrinks():
    """Early decisions explore a lot (the greedy pick's predicted quality well above the
    decision's expected one), late ones little: the correction follows the late ones within a few
    of its windows, and the model's own gap is measured on the chosen arm alone."""
    kn = HctsKnobs()
    dial = Dial(DialSpec("quality", 0.9), kn)
    for _ in range(1000):
        dial.explored(0.2, 1.0)
    assert dial.integ == pytest.approx(kn.integral_max)  # capped
    for _ in range(int(6 * kn.explore_halflife)):
        dial.explored(0.01, 1.0)
    assert dial.xgap == pytest.approx(0.01, abs=0.005)
    for _ in range(2000):
        dial.rated(0.6, 0.6, 1.0)  # the chosen arm predicted right
    assert dial.integ == pytest.approx(0.01, abs=0.005)
    again = Dial.from_state(dial.state(), kn)
    assert (again.xgap, again.xgap_w, again.integ) == (dial.xgap, dial.xgap_w, dial.integ)


def test_a_starved_best_arm_does_not_sink_the_reference():
    """The best arm's doubly robust mean leans on the model's predictions where its propensity
    sits under the clip; once that is most of the time the reference is at least the arm's
    level-0 mean."""
    policy = starved_model(shared_offsets=True)
    model, kn = policy.model, policy.kn
    ref = Reference(3, DIM, kn)
    rng = np.random.default_rng(0)
    x, _ = topics(50, 2, rng)
    for xi in x:
        ref.book(xi, np.array([0.1, 1.0, 10.0]), np.arange(3))
    m0 = model.glob()[0]
    mdec = model.decision_means(x[:1])[0]
    low = mdec.copy()
    low[2] = 0.3  # predictions that sank
    model.use_ctx = True
    covered = np.array([0.5, 0.4, 0.1])  # the best arm's propensity above the clip
    starved = np.array([0.9, 0.09, 0.01])  # ... and under it
    for props in (covered,) * 2000:  # (the DR mean is used once its window has filled)
        ref.update_dr(low, 0, 0.8, props)
    ref.refresh(model)
    assert ref.emax == pytest.approx(float(ref.dr[2]))  # its propensities were fine: the DR mean
    for props in (starved,) * 6000:
        ref.update_dr(low, 0, 0.8, props)
    ref.refresh(model)
    assert ref.cover[2] < kn.ref_cover
    assert ref.emax == pytest.approx(max(float(ref.dr[2]), float(m0[2])))
    assert ref.emax > 0.5
