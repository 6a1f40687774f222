"""HCTS's estimate of the best arm (issue 12, the dial's reference): an arm that routing sends only
the hard prompts must not be read as bad everywhere (it was, and the best arm starved); the dial's
correction follows exploration's loss as it shrinks; a starved best arm's clipped doubly robust
mean does not sink the reference below the model's own estimate; an arm's paired advantage over the
predictions routing chose by keeps it in the budget's reference; the few-ratings trials end, and
start again while a budget is starved."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import test_hcts
from test_hcts import DIM, topics

from gateway.routing.hcts import Hcts
from gateway.routing.hcts_dial import Dial, DialSpec, Reference, solve_lambda
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


def test_an_unaffordable_budget_sets_the_smallest_multiplier_that_picks_the_cheapest():
    """A budget below what even the cheapest picks cost: the multiplier that just makes them, not
    LAM_MAX (whose penalty drowns every sample, so no arm is ever tried again)."""
    rng = np.random.default_rng(11)
    m = rng.uniform(0.3, 0.9, (200, 3))
    c = np.tile([1.0, 2.0, 4.0], (200, 1))
    knobs = HctsKnobs()
    ref = Reference(3, DIM, knobs)
    ref.book_rows(rng.standard_normal((200, DIM)).astype(np.float32), c)
    ref.pbest = np.array([1.0, 0.0, 0.0])  # the cheap arm is believed the best: budget 0.35 x 1.0
    lam = solve_lambda(DialSpec("budget", 0.35), m, c, ref, knobs)
    cn = ref.c_norm()
    assert lam < knobs.lam_max / 10
    assert np.all(np.argmax(m - lam * c / cn, axis=1) == 0)
    assert not np.all(np.argmax(m - lam / 1.2 * c / cn, axis=1) == 0)


def test_the_paired_advantage_keeps_an_arm_sent_only_hard_prompts_in_the_budgets_reference():
    """Eight topics, four hard; the coarse clusters mix hard and easy ones (their offsets cannot
    undo the selection), and the best arm is rated on the hard prompts only: the model's means read
    it worse than mid, and the budget's reference fell on mid's cost. Its ratings against the
    predictions of the arm with the most ratings on the same prompts (what routing chose by) show
    it the best: the reference is its cost."""
    rng = np.random.default_rng(1)
    x, topic = topics(2400, 8, rng)
    hard = (topic >= 4).astype(int)
    policy = Hcts(3, DIM, seed=1)
    for xi in x:
        policy.observe_call(None, xi, 0, None)
    rated = [(0, 1, 2) if h else (0, 1) for h in hard]
    for xi, h, arms in zip(x, hard, rated, strict=True):
        for arm in arms:
            policy.observe_rating(xi, arm, float(rng.random() < QUALITY[h, arm]))
    model = policy.model
    assert model.glob()[0][2] < model.glob()[0][1]
    ref = Reference(3, DIM, policy.kn)
    for xi in x[:400]:
        ref.book(xi, np.array([0.1, 1.0, 10.0]), np.arange(3))
    ref.refresh(model)
    assert ref.ref_cost() == pytest.approx(1.0)
    for xi, h, arms in zip(x, hard, rated, strict=True):
        mdec = model.decision_means(xi[None])[0]
        for arm in arms:
            ref.paired(mdec, arm, float(rng.random() < QUALITY[h, arm]))
    ref.refresh(model)
    assert ref.ref_cost() == pytest.approx(10.0)


def test_a_few_lucky_ratings_do_not_make_a_known_bad_dear_arm_the_reference():
    """After a warm start that knows the dearest arm is bad, its first lucky ratings do not make it
    plausible: the fitted rows, chosen by no decision, count in the paired estimate's prior (with
    the paired ratings alone two lucky ones did)."""
    rng = np.random.default_rng(51)
    x, _ = topics(600, 3, rng)
    quality, cost = np.array([0.6, 0.9, 0.5]), np.array([0.1, 1.0, 10.0])
    policy = Hcts(3, DIM, seed=52, dial=DialSpec("budget", 0.35))
    policy.fit(x, (rng.random((600, 3)) < quality).astype(float), np.broadcast_to(cost, (600, 3)))
    ref, model = policy.ref, policy.model
    ref.refresh(model)
    assert ref.ref_cost() == pytest.approx(1.0, rel=0.01)
    for i in range(5):
        ref.paired(model.decision_means(x[i][None])[0], 2, 1.0)
        ref.refresh(model)
        assert ref.ref_cost() == pytest.approx(1.0, rel=0.01)


def test_with_sparse_feedback_the_few_ratings_trials_end_after_their_calls():
    """An arm with fewer than MIN_RATINGS ratings is tried whatever it is believed, but only until
    it has had FEW_CALLS x MIN_RATINGS calls: with 30 % of calls rated, a bad dear arm would
    otherwise be tried on a share of calls until it had 100. (The budget, 0.8 x the best arm's
    cost, is one the cheap arms meet: a starved budget tries such arms again, see below.)"""

    def bad_dear_arm(few_calls: float) -> tuple[float, float]:
        rng = np.random.default_rng(31)
        x, _ = topics(4000, 2, rng)
        knobs = dataclasses.replace(HctsKnobs(), few_calls=few_calls)
        policy = Hcts(3, DIM, seed=32, knobs=knobs, dial=DialSpec("budget", 0.8))
        quality, cost = np.array([0.8, 0.85, 0.3]), np.array([1.0, 1.5, 10.0])
        for xi in x:
            pick = policy.choose(xi, None, cost)
            policy.observe_call(pick.ticket, xi, pick.arm, cost[pick.arm])
            if rng.random() < 0.3:
                score = float(rng.random() < quality[pick.arm])
                policy.observe_rating(xi, pick.arm, score, ticket=pick.ticket)
        return policy.model.cost.seen[2], policy.model.n[2]  # its calls, its ratings

    least = HctsKnobs().min_ratings
    calls, ratings = bad_dear_arm(1.0)
    assert calls < 1.5 * least and ratings < least
    calls, ratings = bad_dear_arm(1e9)  # the rule in ratings alone
    assert calls > 2.5 * least and ratings >= least


def budget_stream(min_ratings: int) -> Hcts:
    """Two arms, every call rated: cheap (0.5) and dear (0.9, 3x the cost), a budget of 0.35 x the
    best arm's cost, and bad luck: the dear arm's first five ratings are 0."""
    rng = np.random.default_rng(12)
    x, _ = topics(1500, 2, rng)
    knobs = dataclasses.replace(HctsKnobs(), min_ratings=min_ratings)
    policy = Hcts(2, DIM, seed=13, knobs=knobs, dial=DialSpec("budget", 0.35), prior=np.array([0.6, 0.05]))
    cost, quality = np.array([1.0, 3.0]), np.array([0.5, 0.9])
    for xi in x:
        pick = policy.choose(xi, None, cost)
        policy.observe_call(pick.ticket, xi, pick.arm, cost[pick.arm])
        unlucky = pick.arm == 1 and policy.model.n[1] < 5
        score = 0.0 if unlucky else float(rng.random() < quality[pick.arm])
        policy.observe_rating(xi, pick.arm, score, ticket=pick.ticket)
    return policy


def test_an_arm_written_off_before_its_ratings_is_still_tried():
    """Every arm gets MIN_RATINGS ratings whatever it is believed: the dear arm, found the best, sets
    the budget's reference (without that rule five unlucky ratings write it off for good: it is
    never tried again and the reference stays on the cheap arm)."""
    policy = budget_stream(min_ratings=30)
    assert policy.model.n[1] >= 30
    assert int(np.argmax(policy.model.glob()[0])) == 1
    assert policy.ref.ref_cost() == pytest.approx(3.0, rel=0.01)
    locked = budget_stream(min_ratings=0)
    assert locked.model.n[1] < 30
    assert locked.ref.ref_cost() == pytest.approx(1.0, rel=0.01)


def test_a_budget_starved_by_a_cheap_reference_tries_the_arms_with_few_ratings_again():
    """With 30 % of calls rated the trials end after their calls, before MIN_RATINGS ratings: the
    dear arm, the best (0.9), has seven unlucky ratings and reads worst. The reference then falls
    on mid, 35 % of whose cost is below what even the cheapest arm costs: at any multiplier only
    the cheapest is affordable and nothing dear is tried again (llmrouter_dev's locks, 3 of 24 runs).
    Such a starved budget gives the arms with fewer than MIN_RATINGS ratings as many trial calls
    again: the dear arm gets more ratings, is found the best and sets the reference."""
    rng = np.random.default_rng(41)
    x, _ = topics(3000, 2, rng)
    policy = Hcts(3, DIM, seed=42, dial=DialSpec("budget", 0.35))
    cost, quality = np.array([1.0, 2.0, 10.0]), np.array([0.5, 0.6, 0.9])
    paid = []
    for xi in x:
        pick = policy.choose(xi, None, cost)
        policy.observe_call(pick.ticket, xi, pick.arm, cost[pick.arm])
        paid.append(cost[pick.arm])
        if rng.random() < 0.3:
            unlucky = pick.arm == 2 and policy.model.n[2] < 7
            score = 0.0 if unlucky else float(rng.random() < quality[pick.arm])
            policy.observe_rating(xi, pick.arm, score, ticket=pick.ticket)
    assert policy.model.n[2] >= policy.kn.min_ratings
    assert int(np.argmax(policy.model.glob()[0])) == 2
    assert policy.ref.ref_cost() == pytest.approx(10.0, rel=0.05)
    assert np.mean(paid[-500:]) > 2.5  # (locked: about 1.5, the cheap and mid arms)


def test_propensities_include_the_arms_tried_for_their_few_ratings():
    """The trials of arms with few ratings are part of every propensity (and of the picks)."""
    policy = Hcts(3, DIM, seed=14)  # no ratings yet: every arm is tried on a share of calls
    x = np.ones(DIM, dtype=np.float32) / np.sqrt(DIM)
    cost = np.array([1.0, 2.0, 4.0])
    state = policy.state()
    pick = policy.choose(x, None, cost)
    assert pick.props.sum() == pytest.approx(1.0)
    assert pick.props.min() >= policy.kn.few_share / 3  # each tried on FEW_SHARE / 3 of calls
    counts = np.zeros(3)
    for seed in range(3000):
        again = Hcts.from_state(state)
        again.rng = np.random.default_rng(seed)
        counts[again.choose(x, None, cost).arm] += 1
    assert np.abs(counts / 3000 - pick.props).max() < 0.03


def test_the_budget_reference_is_what_the_best_arm_really_costs():
    """Estimates 10 % low (of output lengths, say): a budget of 0.35 x the best arm's cost must mean
    its realised cost, not its estimate (or it spends 10 % more than it says)."""
    knobs = HctsKnobs()
    ref = Reference(2, DIM, knobs)
    ref.book_rows(np.zeros((100, DIM), np.float32), np.tile([1.0, 4.0], (100, 1)))
    ref.pbest = np.array([0.0, 1.0])
    assert ref.ref_cost() == pytest.approx(4.0)
    for _ in range(10):  # the cheap arm paid for: the pooled ratio stands in for the best arm's
        ref.paid(0, 1.1, 1.0)
    assert ref.ref_cost() == pytest.approx(4.4)
    for _ in range(int(knobs.ratio_calls)):  # then the best arm's own
        ref.paid(1, 4.8, 4.0)
    assert ref.ref_cost() == pytest.approx(4.8)


def test_a_budget_is_met_in_what_calls_really_cost():
    """Cost estimates 20 % low: the budget's integral (a dual variable on the realised overspend,
    within COST_INTEGRAL_MAX = 25 % of the target) brings the realised mean cost to the budget;
    without it (gain 0) it overspends. (The cost correction of `hcts_cost`, which would learn
    this error itself, is off: the integral is what must meet the budget here.)"""

    def realised_mean(gain: float) -> float:
        rng = np.random.default_rng(2)
        x, t = topics(3000, 3, rng)
        knobs = dataclasses.replace(HctsKnobs(), cost_gain=gain, cost_n0=1e12)
        policy = Hcts(3, DIM, seed=3, knobs=knobs, dial=DialSpec("usd", 2.0))
        picks, _ = test_hcts.stream(policy, x, t, rng, realised=lambda arm, _: 1.2 * test_hcts.COST[arm])
        return float(np.mean(1.2 * test_hcts.COST[picks[1500:]]))

    assert realised_mean(HctsKnobs().cost_gain) == pytest.approx(2.0, rel=0.05)
    assert realised_mean(0.0) > 2.25


@pytest.mark.parametrize("level", [0, -1])
def test_thompson_sampling_draws_with_the_chosen_levels_spread(level):
    """TS_LEVEL 0: the draws' spread is the coarse clusters' posterior (exploring where a prompt's
    group is uncertain, not each fine cluster an arm was never tried in); -1: the finest level's.
    The means are the finest level's either way."""
    rng = np.random.default_rng(15)
    x, t = topics(1500, 3, rng)
    knobs = dataclasses.replace(HctsKnobs(), ts_level=level, gate=False)
    policy = Hcts(3, DIM, seed=16, knobs=knobs)
    test_hcts.stream(policy, x, t, rng)
    model = policy.model
    cl = model.clusters(x[0])
    assert len(cl) >= 2
    pick = policy.choose(x[0], None, np.array([0.1, 1.0, 10.0]))
    _, _, fine_m, fine_v = model.posterior(x[0], cl)
    spread = fine_v if level == -1 else model.posterior(x[0], cl[:1])[3]
    np.testing.assert_allclose(pick.means, fine_m)
    np.testing.assert_allclose(pick.sd, np.sqrt(spread))
    assert not np.allclose(spread, fine_v if level == 0 else model.posterior(x[0], cl[:1])[3])


def test_the_exploration_boost_decays_with_the_calls_seen_rated_or_not():
    """Explore early, exploit late, in calls: with sparse feedback a boost that waited for ratings
    kept the second half of a replay exploring (on top of the wider posteriors that sparse
    feedback leaves, which still widen the draws)."""
    rng = np.random.default_rng(17)
    x, _ = topics(900, 3, rng)
    policy = Hcts(3, DIM, seed=18)
    kn = policy.kn
    fresh = policy.ts_scale(())
    assert fresh == pytest.approx(kn.ts_scale + kn.ts_boost)
    for xi in x:  # calls, none rated
        policy.observe_call(policy.choose(xi).ticket, xi, 0, None)
    cl = policy.model.clusters(x[0])
    seen = policy.model.lc[0][cl[0]]
    assert seen > 200 and policy.model.rated == 0
    assert policy.ts_scale(cl) == pytest.approx(kn.ts_scale + kn.ts_boost * kn.ts_n0 / (kn.ts_n0 + seen))
    assert policy.ts_scale(cl) < kn.ts_scale + kn.ts_boost / 2


def test_the_paired_advantages_are_saved_and_loaded_by_model_name(tmp_path):
    from gateway.routing import hcts_state

    rng = np.random.default_rng(41)
    x, t = topics(300, 3, rng)
    policy = Hcts(3, DIM, seed=42)
    test_hcts.stream(policy, x, t, rng)
    assert policy.ref.rcnt.sum() == 300 and policy.ref.rsum.shape == (3, 3)
    path = tmp_path / "state.npz"
    hcts_state.save(policy, ["cheap", "mid", "dear"], path)
    loaded = hcts_state.load(path, ["dear", "cheap", "mid"], inline=True)
    assert loaded is not None
    order = [2, 0, 1]
    assert np.array_equal(loaded.ref.rcnt, policy.ref.rcnt[order])
    assert np.array_equal(loaded.ref.rsum, policy.ref.rsum[order][:, order])
