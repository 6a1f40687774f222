"""The bandit's pure core: posterior arithmetic, prior rules, scores, exploration, propensities,
linear Thompson sampling, and convergence on synthetic problems."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.domain import ArmStats, Neighbour
from gateway.routing.bandit import (
    ArmView,
    Knobs,
    LinTS,
    Posterior,
    bonus,
    choose,
    global_posterior,
    knn_posteriors,
    normalise_cost,
    normalise_speed,
    quality_prior,
)
from gateway.routing.strategies import rank

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def stats(model: str, rated: int, mean: float, **kw) -> ArmStats:
    return ArmStats(model, rated=rated, score_sum=rated * mean, **kw)


def nb(model: str, score: float, sim: float) -> Neighbour:
    return Neighbour("id", model, score, sim, T0)


def test_knobs_defaults_are_the_settings_defaults():
    from gateway.config import Settings

    for name, field in Knobs.__dataclass_fields__.items():
        if name in Settings.model_fields:
            assert field.default == Settings.model_fields[name].default, name


def test_global_posterior_is_optimistic_prior_plus_all_feedback():
    k = Knobs(optimistic_prior=0.8, prior_strength=2.0)
    p = global_posterior(stats("a", 10, 0.3), k)
    assert (p.a, p.b) == pytest.approx((0.8 * 2 + 3.0, 0.2 * 2 + 7.0))
    assert global_posterior(None, k).mean == pytest.approx(0.8)
    assert global_posterior(None, k, hint=0.6).mean == pytest.approx(0.6)  # a catalogue hint replaces it


def test_prior_switches_to_the_global_mean_after_enough_ratings():
    k = Knobs(optimistic_prior=0.8, min_requests_for_global=10)
    assert quality_prior(stats("a", 9, 0.2), k) == 0.8
    assert quality_prior(stats("a", 10, 0.2), k) == pytest.approx(0.2)
    assert quality_prior(None, k) == 0.8


def test_perfect_and_hopeless_arms_still_have_proper_posteriors():
    # an arm rated 1.0 every time (or 0.0), or a prior of 1.0, must not give Beta(a, 0)
    k = Knobs(optimistic_prior=1.0, min_requests_for_global=2, min_similar_requests=1)
    table = {"perfect": stats("perfect", 5, 1.0), "hopeless": stats("hopeless", 5, 0.0)}
    posts, *_ = knn_posteriors(["perfect", "hopeless", "new"], table, [nb("perfect", 1.0, 0.9)], k)
    globals_ = [global_posterior(table.get(n), k) for n in ("perfect", "hopeless", "new")]
    for p in [*posts, *globals_]:
        assert p.a > 0 and p.b > 0
    views = [ArmView(n, p) for n, p in zip(("perfect", "hopeless", "new"), posts, strict=True)]
    assert choose(views, k, np.random.default_rng(0)).arm in {"perfect", "new"}


def test_knn_posterior_weights_neighbours_by_similarity():
    k = Knobs(optimistic_prior=0.5, prior_strength=2.0, min_similar_requests=2, min_confidence_score=0.1)
    posts, evidence, used, confidence = knn_posteriors(
        ["a", "b"], {}, [nb("a", 1.0, 0.9), nb("a", 0.0, 0.5), nb("b", 1.0, 0.8)], k
    )
    assert used
    assert (posts[0].a, posts[0].b) == pytest.approx((1.0 + 0.9, 1.0 + 0.5))
    assert (posts[1].a, posts[1].b) == pytest.approx((1.0 + 0.8, 1.0))
    assert evidence == pytest.approx([1.4, 0.8])
    assert confidence == pytest.approx(2.2 / 4.2)


def test_knn_posterior_uses_the_arm_global_mean_as_its_prior():
    k = Knobs(optimistic_prior=0.9, prior_strength=2.0, min_requests_for_global=5, min_similar_requests=1)
    posts, *_ = knn_posteriors(["a"], {"a": stats("a", 20, 0.25)}, [nb("a", 1.0, 1.0)], k)
    assert (posts[0].a, posts[0].b) == pytest.approx((0.5 + 1.0, 1.5))


def test_too_little_context_falls_back_to_global_posteriors():
    k = Knobs(min_similar_requests=3, min_confidence_score=0.1)
    arms = {"a": stats("a", 50, 0.9)}
    posts, evidence, used, _ = knn_posteriors(["a"], arms, [nb("a", 0.0, 0.9), nb("a", 0.0, 0.9)], k)
    assert not used and evidence == [0.0]
    assert posts[0] == global_posterior(arms["a"], k)
    # enough neighbours, but too little similarity mass: W / (W + s) < MIN_CONFIDENCE_SCORE
    k2 = Knobs(min_similar_requests=1, min_confidence_score=0.5, prior_strength=2.0)
    _, _, used2, conf = knn_posteriors(["a"], arms, [nb("a", 0.0, 0.9)], k2)
    assert not used2 and conf == pytest.approx(0.9 / 2.9)


def test_normalised_speed_and_cost():
    assert normalise_speed([100, 300, None]) == pytest.approx([1.0, 0.0, 0.5])
    assert normalise_speed([None, None]) == pytest.approx([0.5, 0.5])
    costs = normalise_cost([1e-3, 1e-5, 1e-4])
    assert costs == pytest.approx([1.0, 0.0, 0.5], abs=0.01)  # a log scale: 1e-4 sits halfway
    assert normalise_cost([0.0, 0.0]) == pytest.approx([0.0, 0.0])


def test_bonus_fades_with_data():
    k = Knobs(exploration_bonus=0.1, min_requests_for_global=10)
    assert [bonus(n, k) for n in (0, 5, 10, 50)] == pytest.approx([0.1, 0.05, 0.0, 0.0])


def view(name: str, mean: float, strength: float = 1000.0, **kw) -> ArmView:
    return ArmView(name, Posterior("beta", mean * strength, (1 - mean) * strength), rated=1000, **kw)


def test_score_combines_quality_speed_and_cost():
    k = Knobs(feedback_weight=0.6, latency_weight=0.2, cost_weight=-0.2, exploration_rate=0.0)
    arms = [
        view("slow-dear", 0.9, latency_ms=900, cost_usd=1e-2),
        view("fast-cheap", 0.8, latency_ms=100, cost_usd=1e-5),
    ]
    choice = choose(arms, k, np.random.default_rng(0))
    # 0.6 * 0.9 + 0 - 0.2 = 0.34   vs   0.6 * 0.8 + 0.2 - 0 = 0.68
    assert choice.arm == "fast-cheap"
    top = choice.candidates[0]
    assert top["score"] == pytest.approx(0.6 * top["quality_sample"] + 0.2, abs=1e-3)
    quality_only = Knobs(feedback_weight=1.0, latency_weight=0.0, cost_weight=0.0, exploration_rate=0.0)
    assert choose(arms, quality_only, np.random.default_rng(0)).arm == "slow-dear"


def test_exploration_rate_is_observed_over_many_draws():
    k = Knobs(exploration_rate=0.3, exploration_bonus=0.0)
    arms = [view("best", 0.95), view("b", 0.2), view("c", 0.2), view("d", 0.2)]
    rng = np.random.default_rng(42)
    picks = [choose(arms, k, rng) for _ in range(4000)]
    off_best = sum(p.arm != "best" for p in picks) / len(picks)
    assert off_best == pytest.approx(0.3 * 3 / 4, abs=0.03)
    assert sum(p.explored for p in picks) / len(picks) == pytest.approx(0.3, abs=0.03)


def test_propensities_sum_to_one_and_match_frequencies():
    k = Knobs(exploration_rate=0.2)
    arms = [view("a", 0.6, strength=20), view("b", 0.55, strength=20), view("c", 0.3, strength=20)]
    rng = np.random.default_rng(7)
    first = choose(arms, k, rng)
    assert first.propensity is None and first.pending is not None  # computed when asked for
    first.resolve()
    assert first.propensity == first.propensities[first.arm] and first.pending is None
    assert sum(first.propensities.values()) == pytest.approx(1.0, abs=1e-9)
    assert first.propensity_error < 1e-3
    picks = [choose(arms, k, rng).arm for _ in range(3000)]
    for model, p in first.propensities.items():
        assert picks.count(model) / len(picks) == pytest.approx(p, abs=0.03)


def test_a_seeded_choice_is_reproducible():
    arms = [view("a", 0.6, strength=5), view("b", 0.5, strength=5)]
    a = [choose(arms, Knobs(), np.random.default_rng(3)).arm for _ in range(5)]
    b = [choose(arms, Knobs(), np.random.default_rng(3)).arm for _ in range(5)]
    assert a == b


def simulate(means: list[float], rounds: int, seed: int, knobs: Knobs) -> list[str]:
    """Thompson sampling on Bernoulli arms, learning from every outcome."""
    rng = np.random.default_rng(seed)
    names = [f"arm{i}" for i in range(len(means))]
    table = {n: ArmStats(n) for n in names}
    picks = []
    for _ in range(rounds):
        views = [ArmView(n, global_posterior(table[n], knobs), rated=table[n].rated) for n in names]
        arm = choose(views, knobs, rng).arm
        reward = float(rng.random() < means[names.index(arm)])
        table[arm].rated += 1
        table[arm].score_sum += reward
        picks.append(arm)
    return picks


@settings(max_examples=15, deadline=None)
@given(
    means=st.lists(st.floats(0.05, 0.6), min_size=2, max_size=5),
    gap=st.floats(0.25, 0.4),
    seed=st.integers(0, 2**31),
)
def test_thompson_sampling_converges_on_the_best_arm(means, gap, seed):
    best = int(np.argmax(means))
    means = list(means)
    means[best] = min(0.99, max(means) + gap)
    knobs = Knobs(exploration_rate=0.05, exploration_bonus=0.05, latency_weight=0, cost_weight=0)
    picks = simulate(means, 600, seed, knobs)
    share = picks[-200:].count(f"arm{best}") / 200
    assert share >= 0.8


def test_lints_update_matches_the_direct_inverse_and_learns():
    rng = np.random.default_rng(0)
    lin = LinTS(dim=8, ridge=1.0, noise=0.1, prior_mean=0.5)
    xs = rng.normal(size=(200, 8))
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    w = np.array([0.4, -0.3, 0, 0, 0, 0, 0, 0.1])
    for x in xs:
        lin.update("a", x, float(np.clip(0.5 + x @ w, 0, 1)))
    design = np.hstack([xs, np.ones((200, 1))])
    a_inv = np.linalg.inv(np.eye(9) + design.T @ design)
    assert lin.a_inv["a"] == pytest.approx(a_inv, abs=1e-8)
    probe = xs[0]
    post = lin.posterior("a", probe)
    assert post.mean == pytest.approx(float(np.clip(0.5 + probe @ w, 0, 1)), abs=0.1)
    assert post.b < lin.posterior("never-seen", probe).b  # data shrinks the uncertainty


def test_lints_batch_update_equals_one_by_one():
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(100, 8))
    scores = rng.random(100)
    one, many = LinTS(dim=8, ridge=2.0), LinTS(dim=8, ridge=2.0)
    one.update("a", xs[0], 0.3)
    many.update("a", xs[0], 0.3)
    for x, s in zip(xs[1:], scores[1:], strict=True):
        one.update("a", x, float(s))
    many.update_many("a", xs[1:], scores[1:])
    assert many.a_inv["a"] == pytest.approx(one.a_inv["a"], abs=1e-9)
    assert many.b["a"] == pytest.approx(one.b["a"])
    assert many.n["a"] == one.n["a"] == 100


def test_lints_rerating_moves_only_the_target():
    lin = LinTS(dim=4, prior_mean=0.5)
    x = np.array([1.0, 0, 0, 0])
    lin.update("a", x, 0.0)
    low = lin.posterior("a", x).mean
    a_inv = lin.a_inv["a"].copy()
    lin.update("a", x, 1.0, previous=0.0)
    assert lin.posterior("a", x).mean > low
    assert np.array_equal(lin.a_inv["a"], a_inv) and lin.n["a"] == 1


def test_fixed_strategies():
    k = Knobs()
    arms = [
        ArmView("dear-good", Posterior("beta", 9, 1), latency_ms=500, cost_usd=1e-2),
        ArmView("cheap-ok", Posterior("beta", 6, 4), latency_ms=900, cost_usd=1e-5),
        ArmView("fast", Posterior("beta", 5, 5), latency_ms=50, cost_usd=1e-3),
    ]
    assert rank("cost_optimized", arms, k).arm == "cheap-ok"
    assert rank("quality_optimized", arms, k).arm == "dear-good"
    assert rank("latency_optimized", arms, k).arm == "fast"
    assert [rank("round_robin", arms, k, turn=t).arm for t in range(4)] == [
        "dear-good",
        "cheap-ok",
        "fast",
        "dear-good",
    ]
    load = {"dear-good": 3, "cheap-ok": 1, "fast": 2}
    assert rank("least_loaded", arms, k, in_flight=load.__getitem__).arm == "cheap-ok"
    # 0.6 q + 0.2 speed - 0.2 cost: dear-good 0.54 + 0.094 - 0.2 = 0.434; fast 0.3 + 0.2 - 0.133 = 0.367;
    # cheap-ok 0.36 + 0 - 0 = 0.36
    balanced = rank("balanced", arms, k)
    assert balanced.ranking == ["dear-good", "fast", "cheap-ok"] and balanced.propensity == 1.0
    assert balanced.candidates[0]["metric"] == pytest.approx(0.434, abs=1e-3)
    with pytest.raises(ValueError, match="unknown strategy"):
        rank("random", arms, k)


async def test_linear_policy_replicas_stay_in_sync_through_the_store(static_model):
    from gateway.config import Settings
    from gateway.domain import CallRecord, Feedback
    from gateway.routing.policies import LinTSPolicy
    from gateway.routing.router import Router
    from gateway.store.memory import MemoryStore

    class Up:
        def is_available(self, name: str) -> bool:
            return True

        def why_unavailable(self, name: str) -> None:
            return None

        def in_flight(self, name: str) -> int:
            return 0

    settings = Settings(
        _env_file=None,
        router_policy="lin_ts",  # type: ignore[call-arg]
        models=[{"name": "m", "base_url": "http://127.0.0.1:1/v1"}],
    )
    from gateway.embedders.static import StaticEmbedder

    store = MemoryStore()
    embedder = StaticEmbedder(static_model)  # the policies read back only their embedder's vectors
    a = Router(settings, Up(), store=store, embedder=embedder)
    b = Router(settings, Up(), store=store, embedder=embedder)
    await a.start()
    await b.start()
    x = np.eye(384, dtype=np.float32)[0]
    await store.write_calls(
        [
            CallRecord(
                id="c1",
                messages=[],
                requested_model="auto",
                model="m",
                status="ok",
                http_status=200,
                embedding=x,
                embedder=embedder.id,
            )
        ]
    )
    outcome = await store.add_feedback(Feedback("c1", 1.0))
    a.observe_feedback("", "c1", "m", 1.0, outcome.previous, x)  # replica A took the feedback
    assert isinstance(a.policy, LinTSPolicy) and isinstance(b.policy, LinTSPolicy)
    lin_a, lin_b = a.policy.lin, b.policy.lin
    assert lin_a.n["m"] == 1 and lin_b.n.get("m", 0) == 0
    await b.refresh_stats()  # replica B reads it from the store
    assert lin_b.n["m"] == 1
    assert lin_b.posterior("m", x).mean == pytest.approx(lin_a.posterior("m", x).mean)
    await a.refresh_stats()  # A sees its own rating again: absorbed once only
    assert lin_a.n["m"] == 1
    await store.add_feedback(Feedback("c1", 0.0))  # a re-rating moves the target, not the count
    await b.refresh_stats()
    assert lin_b.n["m"] == 1 and lin_b.posterior("m", x).mean < lin_a.posterior("m", x).mean
    await embedder.aclose()
