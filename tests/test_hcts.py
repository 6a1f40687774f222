"""HCTS, the default routing policy (issue 12): its dial, its safe fallback, its propensities, its
warm start and its state file, on synthetic streams with known outcomes; and end to end through
the gateway with the openai client."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
import openai
import pytest
from conftest import make_settings, model, wait_for

from gateway.routing import hcts_state
from gateway.routing.hcts import Hcts
from gateway.routing.hcts_dial import DialSpec
from gateway.routing.hcts_math import argmax_probs, propensities

DIM = 16


def topics(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`k` well-separated topics: unit embeddings around k directions, and each prompt's topic."""
    centres = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0][:k]
    t = rng.integers(k, size=n)
    x = centres[t] + 0.15 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), t


# arm quality per topic (rows: topics; columns: cheap, mid, dear) and cost per call
QUALITY = np.array([[0.90, 0.85, 0.95], [0.20, 0.80, 0.95], [0.30, 0.40, 0.90]])
COST = np.array([0.1, 1.0, 10.0])


def stream(
    policy: Hcts,
    x: np.ndarray,
    t: np.ndarray,
    rng: np.random.Generator,
    spec: DialSpec | None = None,
    realised: Callable[[int, int], float] | None = None,
):
    """Every prompt decided, its call observed (at COST, or at `realised(arm, topic)`) and rated."""
    picks, scores = [], []
    for xi, ti in zip(x, t, strict=True):
        pick = policy.choose(xi, None, COST, spec)
        score = float(rng.random() < QUALITY[ti, pick.arm])
        paid = COST[pick.arm] if realised is None else realised(pick.arm, ti)
        policy.observe_call(pick.ticket, xi, pick.arm, paid)
        policy.observe_rating(xi, pick.arm, score, ticket=pick.ticket)
        picks.append(pick.arm)
        scores.append(QUALITY[ti, pick.arm])  # the expected score: less noise in the assertions
    return np.array(picks), np.array(scores)


@pytest.mark.parametrize("target", [0.8, 0.9])
def test_the_quality_dial_meets_its_target_on_average(target):
    rng = np.random.default_rng(0)
    x, t = topics(3000, 3, rng)
    policy = Hcts(3, DIM, seed=1, dial=DialSpec("quality", target))
    picks, scores = stream(policy, x, t, rng)
    best = QUALITY[t[1500:]].mean(axis=0).max()  # the best single arm on the same prompts
    share = scores[1500:].mean() / best
    assert share == pytest.approx(target, abs=0.03)
    # and it gets there for less than always using the best arm
    assert COST[picks[1500:]].mean() < 0.8 * COST[2]


def test_a_budget_dial_holds_the_mean_cost_per_call():
    rng = np.random.default_rng(2)
    x, t = topics(3000, 3, rng)
    policy = Hcts(3, DIM, seed=3, dial=DialSpec("usd", 2.0))
    picks, _ = stream(policy, x, t, rng)
    assert COST[picks[1500:]].mean() == pytest.approx(2.0, rel=0.15)


def test_useless_context_ends_on_the_best_fixed_arm():
    """Embeddings that say nothing about the outcome: the gate stays closed and, asked for the best
    quality, the router ends on the arm that is best overall."""
    rng = np.random.default_rng(4)
    x, _ = topics(2000, 3, rng)
    t = rng.integers(3, size=2000)  # the outcome's topic, independent of the embedding
    policy = Hcts(3, DIM, seed=5, dial=DialSpec("quality", 1.0))
    picks, _ = stream(policy, x, t, rng)
    assert not policy.model.use_ctx
    assert np.mean(picks[-200:] == 2) >= 0.95


def test_useful_context_opens_the_gate_and_pays():
    rng = np.random.default_rng(6)
    x, t = topics(2000, 3, rng)
    policy = Hcts(3, DIM, seed=7, dial=DialSpec("quality", 0.95))
    picks, _ = stream(policy, x, t, rng)
    assert policy.model.use_ctx
    # on topic 0 the cheap arm is nearly as good: it gets most of those calls late on
    late = slice(1500, None)
    assert np.mean(picks[late][t[late] == 0] == 0) > 0.5
    assert np.mean(picks[late][t[late] == 2] == 2) > 0.7


def test_propensities_sum_to_one_and_match_monte_carlo():
    rng = np.random.default_rng(8)
    for k in (2, 3, 7):
        u, s = rng.normal(0.5, 0.1, k), rng.uniform(0.02, 0.2, k)
        p, bound = argmax_probs(u, s, np.linspace(-5, 5, 20))
        draws = u + s * rng.standard_normal((200_000, k))
        mc = np.bincount(draws.argmax(axis=1), minlength=k) / 200_000
        assert p.sum() == pytest.approx(1.0)
        assert np.abs(p - mc).max() < 0.006, (p, mc, bound)
    # the policy's propensities (more nodes than above) and their estimated error
    for k in (2, 3, 7, 10):
        u, s = rng.normal(0.5, 0.1, k), rng.uniform(0.005, 0.3, k)
        p, error = propensities(u, s)
        fine, _ = argmax_probs(u, s, np.linspace(-8, 8, 4000))
        assert error < 2e-3 and np.abs(p - fine).max() <= max(error, 1e-6)
    # the policy's own: every eligible arm above the floor, the others 0, the picks as propensities say
    x, t = topics(400, 3, rng)
    policy = Hcts(3, DIM, seed=9)
    stream(policy, x, t, rng)
    state = policy.state()
    pick = policy.choose(x[0], np.array([0, 2]), COST)
    assert pick.props[1] == 0 and pick.props.sum() == pytest.approx(1.0)
    assert pick.props[[0, 2]].min() >= (1 - policy.kn.few_share) * policy.epsilon() / 2
    counts = np.zeros(3)
    for _ in range(3000):  # the same decision again and again, from the same state
        again = Hcts.from_state(state)
        again.rng = np.random.default_rng(int(rng.integers(2**62)))
        counts[again.choose(x[0], np.array([0, 2]), COST).arm] += 1
    assert np.abs(counts / 3000 - pick.props).max() < 0.03


def test_fit_save_load_gives_the_same_decisions(tmp_path):
    rng = np.random.default_rng(10)
    x, t = topics(600, 3, rng)
    scores = (rng.random((600, 3)) < QUALITY[t]).astype(float)
    fitted = Hcts(3, DIM, seed=11, dial=DialSpec("quality", 0.9))
    fitted.fit(x, scores, np.broadcast_to(COST, (600, 3)))
    assert fitted.model.use_ctx and fitted.model.rated == 600
    path = tmp_path / "state.npz"
    hcts_state.save(fitted, ["cheap", "mid", "dear"], path)
    loaded = hcts_state.load(path, ["cheap", "mid", "dear"], inline=True)
    assert loaded is not None
    xs, ts = topics(300, 3, np.random.default_rng(12))
    a, _ = stream(fitted, xs, ts, np.random.default_rng(13))
    b, _ = stream(loaded, xs, ts, np.random.default_rng(13))
    assert (a == b).all()
    # warm: from its first request it routes topic 1 away from the cheap arm
    assert np.mean(a[:100][ts[:100] == 1] == 0) < 0.1
    # a catalogue listing the same models in another order gets the same decisions, by name
    reordered = hcts_state.load(path, ["dear", "cheap", "mid"], inline=True)
    assert reordered is not None
    base = hcts_state.load(path, ["cheap", "mid", "dear"], inline=True)
    assert base is not None
    pick = reordered.choose(xs[0], None, COST[[2, 0, 1]])
    assert np.allclose(pick.means[[1, 2, 0]], base.choose(xs[0], None, COST).means)
    # other models: not loaded
    assert hcts_state.load(path, ["cheap", "mid", "other"]) is None


def test_the_default_policy_end_to_end(fake, gateway, dsn):
    """Through the gateway with the openai client: `auto` is HCTS; the dial per request (body,
    header, virtual model) and its errors; every call observed; a restarted gateway rebuilds what
    it learnt from the store."""
    catalogue = [
        model("cheap", fake.url(answer="a_recipe"), input_usd_per_mtok=0.1, output_usd_per_mtok=0.1),
        model("dear", fake.url(answer="some_code"), input_usd_per_mtok=5.0, output_usd_per_mtok=15.0),
    ]
    virtual = {"auto-cheap": {"dial_mode": "quality", "dial_target": 0.85}}
    settings = make_settings(catalogue, enable_persistence=True, database_url=dsn, virtual_models=virtual)
    assert settings.router_policy == "hcts"
    gw = gateway(settings, seed=1)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    ids = []
    for i in range(12):
        raw = client.chat.completions.with_raw_response.create(
            model="auto" if i % 3 else "auto-cheap",
            messages=[{"role": "user", "content": f"question number {i} about soup"}],
            extra_body={"router": {"dial_mode": "usd", "dial_target": 0.001}} if i == 4 else None,
            extra_headers={5: {"X-Router-Dial-Target": "0.9"}, 7: {"X-Router-Dial-Mode": "quality"}}.get(i),
        )
        assert raw.headers["x-router-layer"] == "bandit"
        ids.append(raw.headers["x-request-id"])
        httpx.post(gw.url + "/feedback", json={"request_id": ids[-1], "score": 0.8}).raise_for_status()
    policy = gw.services.router.policy
    assert wait_for(lambda: policy.core is not None and policy.core.model.rated == 12)
    assert policy.core.calls == 12  # every finished call observed
    dials = {(d.spec.mode, d.spec.target) for d in policy.core.dials.values()}
    # the default dial (budget 0.35); a target alone is the default mode's; a mode alone its default
    assert {("budget", 0.35), ("quality", 0.85), ("usd", 0.001), ("budget", 0.9), ("quality", 0.95)} <= dials
    record = httpx.get(f"{gw.url}/requests/{ids[0]}").json()
    candidates = record["decision"]["candidates"]
    assert {c["model"] for c in candidates} == {"cheap", "dear"}
    assert sum(c["propensity"] for c in candidates) == pytest.approx(1, abs=1e-6)
    assert record["propensity"] == pytest.approx(candidates[0]["propensity"], abs=1e-6)
    # HCTS's own propensities, known at decision time (nothing left for the record to compute)
    decision = record["decision"]
    assert decision["propensities"] == pytest.approx(
        {c["model"]: c["propensity"] for c in candidates}, abs=1e-6
    )
    assert decision["deterministic"] is False and decision.get("propensity_error", 0) < 2e-3
    for bad, where in [
        ({"router": {"dial_mode": "cheapest"}}, None),
        ({"router": {"dial_target": -1}}, None),
        ({"router": {"dial_mode": "quality", "dial_target": 3}}, None),
        (None, {"X-Router-Dial-Mode": "best"}),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="auto",
                messages=[{"role": "user", "content": "hi"}],
                extra_body=bad,
                extra_headers=where,
            )
        assert err.value.status_code == 400 and err.value.body["code"] == "invalid_value"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="auto",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"router": {"dial_mode": "qualty"}},
        )
    assert "did you mean 'quality'" in err.value.body["message"]  # type: ignore[index]
    again = make_settings(catalogue, enable_persistence=True, database_url=dsn)
    gw2 = gateway(again, seed=2)  # a new replica (or a restart) on the same store
    core = gw2.services.router.policy.core
    assert core is not None and core.model.rated == 12 and core.model.seen == 12


def test_a_restarted_gateway_goes_on_from_what_it_learnt(fake, gateway, dsn, tmp_path):
    """ROUTER_STATE_KEEP: a gateway that stops saves what HCTS learnt; the next one starts from it
    (the prompts of unrated calls, the dial's multiplier: not only the store's rated calls) and
    applies each of the store's ratings once; a state `llm-router fit` wrote since wins."""
    catalogue = [
        model("cheap", fake.url(answer="a_recipe"), input_usd_per_mtok=0.1, output_usd_per_mtok=0.1),
        model("dear", fake.url(answer="some_code"), input_usd_per_mtok=5.0, output_usd_per_mtok=15.0),
    ]
    settings = make_settings(
        catalogue, enable_persistence=True, database_url=dsn, data_dir=tmp_path, router_state_keep=True
    )
    gw = gateway(settings, seed=1)
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    ids = []
    for i in range(30):
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"question number {i} about soup"}]
        )
        ids.append(raw.headers["x-request-id"])
        if i < 20:
            httpx.post(gw.url + "/feedback", json={"request_id": ids[-1], "score": 0.8}).raise_for_status()
    core = gw.services.router.policy.core
    assert wait_for(lambda: core.calls == 30 and core.model.rated == 20)
    lam = core.dial().lam
    gw.__exit__()
    live = tmp_path / "router_state.live.npz"
    assert live.is_file() and not (tmp_path / "router_state.npz").exists()

    gw2 = gateway(settings, seed=2)
    core2 = gw2.services.router.policy.core
    assert core2 is not None and core2.model.seen == 30  # the store alone has the 20 rated ones
    assert core2.model.rated == 20 and core2.dial().lam == pytest.approx(lam)  # none twice
    # a rating of a call the first gateway made, posted to the second: applied once, and a
    # refresh of the store's ratings after it does not apply it again
    httpx.post(gw2.url + "/feedback", json={"request_id": ids[25], "score": 0.3}).raise_for_status()
    assert wait_for(lambda: core2.model.rated == 21)
    gw2.call(gw2.services.router.refresh_stats())
    assert core2.model.rated == 21
    # `llm-router fit` writes a state while the gateway runs (here: the gateway's own, saved as
    # `fit` saves); the gateway then stops and saves its live state, newer than the fit ...
    fitted = tmp_path / "router_state.npz"
    policy2 = gw2.services.router.policy
    hcts_state.save(core2, policy2.arms, fitted, embedder=policy2.deps.embedder)
    gw2.__exit__()
    assert live.stat().st_mtime_ns >= fitted.stat().st_mtime_ns

    # ... but the fit is new since that gateway started: it is the start, and the store's 21
    # ratings come on top of it (a fit's rows are not the store's)
    gw3 = gateway(settings, seed=3)
    core3 = gw3.services.router.policy.core
    assert core3 is not None and core3.model.rated == 21 + 21
    gw3.__exit__()
    gw5 = gateway(settings, seed=5)  # the fit unchanged since: the live state again
    core5 = gw5.services.router.policy.core
    assert core5 is not None and core5.model.rated == 42
    gw5.__exit__()
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left
    off = make_settings(catalogue, enable_persistence=True, database_url=dsn, data_dir=tmp_path)
    fitted.unlink()
    before = live.stat().st_mtime_ns
    gw4 = gateway(off, seed=4)  # ROUTER_STATE_KEEP off: neither read nor written
    core4 = gw4.services.router.policy.core
    assert core4 is not None and core4.model.rated == 21 and core4.model.seen == 21
    gw4.__exit__()
    assert live.stat().st_mtime_ns == before


async def test_the_saved_state_never_claims_what_was_not_applied(tmp_path):
    """ROUTER_STATE_KEEP's books: a sync cancelled while it fetches its ratings' embeddings (a stop)
    leaves its mark where it was, so the next start reads those ratings again; and a gateway
    without an embedder (it failed to load one) saves nothing over a good state."""
    import asyncio
    import contextlib

    from gateway.domain import Rating, utcnow
    from gateway.routing.bandit import Knobs
    from gateway.routing.hcts_policy import HctsPolicy
    from gateway.routing.seam import PolicyDeps
    from gateway.routing.stats import ArmStatsCache

    class Store:  # one rating, then an embedding fetch that does not return before the stop
        async def rated_since(self, since, limit):
            return [Rating("r1", "cheap", 1.0, utcnow(), "")]

        async def embeddings_of(self, keys, embedder):
            await asyncio.Event().wait()

    settings = make_settings(
        [model("cheap", "http://127.0.0.1:9/v1"), model("dear", "http://127.0.0.1:9/v1")],
        data_dir=tmp_path,
        router_state_keep=True,
    )

    def policy(embedder: str | None) -> HctsPolicy:
        knobs = Knobs.from_settings(settings)
        deps = PolicyDeps(
            settings, knobs, ArmStatsCache(settings.models, knobs), Store(), np.random.default_rng(0),
            lambda: 0.0, embedder=embedder,
        )  # fmt: skip
        return HctsPolicy(deps, Hcts(2, DIM, 0))

    p = policy("e")
    before = p.synced
    task = asyncio.create_task(p.sync())
    await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert p.synced == before
    x = np.ones(DIM, dtype=np.float32) / np.sqrt(DIM)
    live = tmp_path / "router_state.live.npz"
    blind = policy(None)
    blind.core.observe_call(None, x, 0, None)
    await blind.keep()
    assert not live.exists()
    p.core.observe_call(None, x, 0, None)
    await p.keep()
    assert live.is_file()


def test_fit_command_warm_starts_a_gateway(gateway, data_dir, tmp_path):
    """`llm-router fit FILE` stores a state; a gateway with the same models routes well from its
    first request (no feedback at all), and keeps learning."""
    import json
    import random

    from test_router import CODING, COOKING, DISHES, TASKS

    from gateway.cli import main
    from gateway.providers.replay import load

    rng = random.Random(0)
    prompts = [("cooking", t.format(d)) for t in COOKING[:6] for d in DISHES[:20]]
    prompts += [("coding", t.format(k)) for t in CODING[:6] for k in TASKS[:20]]
    rng.shuffle(prompts)
    good = {"cooking": "chef", "coding": "coder"}

    def outcome(score: float) -> dict:
        return {
            "score": score,
            "cost_usd": 0.001,
            "response": "ok",
            "prompt_tokens": 10,
            "completion_tokens": 5,
        }

    records = [
        {
            "id": f"r{i}",
            "task": "never read",
            "messages": [{"role": "user", "content": text}],
            "outcomes": {m: outcome(1.0 if good[topic] == m else 0.2) for m in ("chef", "coder")},
        }
        for i, (topic, text) in enumerate(prompts)
    ]
    path = tmp_path / "evals.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "state.npz"
    config = tmp_path / "fit.yaml"
    config.write_text(f"data_dir: {data_dir}\nmodels: []\n")
    assert main(["fit", str(path), "--out", str(out), "--config", str(config)]) == 0
    assert out.is_file()
    settings = make_settings(load(path).catalogue(), router_state_path=out, latency_weight=0.0)
    gw = gateway(settings, seed=3)
    core = gw.services.router.policy.core
    assert core is not None and core.model.rated == len(records) and core.model.use_ctx
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    right = 0
    for topic, text in prompts[:40]:
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": text}]
        )
        right += raw.headers["x-router-model"] == good[topic]
    assert right >= 36
    assert wait_for(lambda: core.calls == len(records) + 40)  # and it keeps learning


def test_an_observed_mean_of_zero_completion_tokens_is_not_replaced_by_the_default():
    """HCTS's objective uses each arm's pre-call cost estimate. An arm whose calls all came back with
    0 completion tokens (a replay file without completion tokens: every call is billed for its
    prompt) was estimated as if it answered with DEFAULT_COMPLETION_TOKENS: 4.5x the realised cost
    on llmrouter_dev, with the per-prompt cost differences the policy trades on diluted."""
    from gateway.catalogue import ModelSpec
    from gateway.domain import ArmStats
    from gateway.routing import RouteContext
    from gateway.routing.bandit import Knobs
    from gateway.routing.stats import DEFAULT_COMPLETION_TOKENS, ArmStatsCache

    spec = ModelSpec(
        name="m",
        provider="openai_compatible",
        base_url="http://127.0.0.1:9",
        input_usd_per_mtok=1.0,
        output_usd_per_mtok=2.0,
    )
    cache = ArmStatsCache([spec], Knobs())
    ctx = RouteContext("r1", "auto", [], prompt_tokens=1000)
    assert cache.estimated_cost("m", ctx) == spec.cost_usd(1000, DEFAULT_COMPLETION_TOKENS)  # none seen
    cache.stats["m"] = ArmStats("m", calls=3, ok_calls=3, completion_tokens_sum=0)
    assert cache.estimated_cost("m", ctx) == spec.cost_usd(1000, 0)
    cache.stats["m"] = ArmStats("m", calls=3, ok_calls=3, completion_tokens_sum=30)
    assert cache.estimated_cost("m", ctx) == spec.cost_usd(1000, 10)
    # a fitted state's answer length stays the basis, whatever the calls routing sent answered: the
    # fit's cost correction was learnt against estimates on it
    cache.expected_answers["m"] = 40.0
    assert cache.estimated_cost("m", ctx) == spec.cost_usd(1000, 40)
