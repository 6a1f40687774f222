"""`llm-router replay FILE --warm-start` (issue 12's warm-start target through the real gateway): the
first half of the lab's stream fitted with `fit`'s code, only the second half replayed through a
gateway started from it, beside the fitted state frozen as an offline router at the same cost."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import numpy as np
import pytest

from gateway.cli import main
from gateway.lab.commands import _prepare
from gateway.lab.frontier import Curve
from gateway.lab.runner import Options, run_router, stream_order
from gateway.lab.warm import LAMBDAS, cost_estimates, offline_points
from gateway.routing.hcts import Hcts
from tests.test_lab import outcome, write_replay
from tests.test_router import CODING, COOKING, DISHES, TASKS

RIGHT = {"cooking": "cheap", "coding": "dear"}  # cheap is right on cooking (and cheaper), only dear on coding


@pytest.fixture
def two_topics(tmp_path) -> tuple[Path, dict[str, str]]:
    """240 prompts of two topics; on cooking both models are right (the cheap one is the pick), on
    coding only the dear one is. The records' `task` says nothing: the router must find the topics."""
    rng = random.Random(2)
    prompts = [("cooking", t.format(d)) for t in COOKING for d in DISHES][:120]
    prompts += [("coding", t.format(k)) for t in CODING for k in TASKS][:120]
    records, topic_of = [], {}
    for n, (topic, prompt) in enumerate(prompts):
        cheap = float(topic == "cooking" and rng.random() < 0.97)
        dear = float(rng.random() < 0.97)
        records.append(
            {
                "id": f"p{n}",
                "task": "never read",
                "messages": [{"role": "user", "content": prompt}],
                # short answers, far from the 256 tokens the gateway assumes for a model it has not
                # served: the fitted state carries each model's answer length, or the warm gateway
                # would price the dear model at 20 times its cost and keep off it at first
                "outcomes": {
                    "cheap": outcome(cheap, None, "cheap answer", 20, 12),
                    "dear": outcome(dear, None, "dear answer", 20, 12),
                },
            }
        )
        topic_of[f"p{n}"] = topic
    path = write_replay(tmp_path / "two.jsonl", records, {"cheap": (0.1, 0.1), "dear": (10.0, 30.0)})
    return path, topic_of


def _right(picks: list[str], ids: list[str], topic_of: dict[str, str]) -> int:
    return sum(p == RIGHT[topic_of[i]] for p, i in zip(picks, ids, strict=True))


def test_warm_start_replays_the_second_half_from_the_fit_of_the_first(
    two_topics, tmp_path, data_dir, static_model, capsys
):
    path, topic_of = two_topics
    out = tmp_path / "warm"
    # the quality dial: this file's right picks are what the fit's means say, whatever they cost
    # (the default budget dial would hold the dear model back on purpose)
    argv = [
        "replay",
        str(path),
        "--warm-start",
        "--seed",
        "3",
        "--store",
        "memory",
        "--set",
        "ROUTER_DIAL_MODE=quality",
    ]
    assert main([*argv, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    order = stream_order(240, "shuffle", 3, None)
    first, second = order[:120], order[120:]
    ids = [f"p{i}" for i in second]
    # fitted on exactly the first half of the lab's stream; only the second half was sent
    assert report["fitted"]["prompts"] == 120 and report["fitted"]["contextual"]
    assert (out / "router_state.npz").is_file() and report["fitted"]["path"] == str(out / "router_state.npz")
    h = report["second_half"]
    assert h["prompts"] == 120 and h["feedback"] == 120 and len(report["picks"]) == 120
    assert report["router"]["layers"] == {"bandit": 120}
    # the gateway started from the fit: its very first calls already pick, per topic, the model the
    # first half says is right (a gateway without the state is near a coin flip there, below)
    warm_first = _right(report["picks"][:20], ids[:20], topic_of)
    assert warm_first >= 18
    assert _right(report["picks"], ids, topic_of) >= 108
    # its figures: shares of the best single model (dear) on the second half, lift over the zero router
    w, o = h["warm"], h["offline"]
    assert h["best_single_model"] == "dear"
    zero = Curve([(c, q) for c, q in h["zero_router"]["hull"]])
    assert w["lift"] == pytest.approx(w["score_share"] - zero.at(w["cost_share"]))
    assert w["score_share"] > 0.9 and w["cost_share"] < 0.8 and w["lift"] > 0.05
    # the offline router (the fit frozen, greedy) read at the warm gateway's cost, and the difference
    offline = Curve([(c, q) for c, q in o["hull"]])
    assert o["score_share_at_warm_cost"] == pytest.approx(offline.at(w["cost_share"]))
    assert h["difference"] == pytest.approx(w["score_share"] - o["score_share_at_warm_cost"])
    assert abs(h["difference"]) < 0.05 and len(o["points"]) == len(LAMBDAS)
    assert "warm start" in printed and "offline router" in printed and "difference" in printed

    # a cold gateway (no fitted state: the lab's default) on the same first 20 prompts of the half
    options = Options(seed=3, store="memory", data_dir=data_dir, overrides={"router_dial_mode": "quality"})
    data, _, mask, texts, vectors, encoder = _prepare(str(path), options, [options])
    cold = asyncio.run(run_router(data, second[:20], mask[120:140], options, texts, vectors, encoder))
    assert _right(cold.picks, ids[:20], topic_of) <= warm_first - 3
    assert first == order[:120]


def test_warm_start_is_for_the_routers_policy(two_topics, tmp_path, data_dir, static_model, capsys):
    path, _ = two_topics
    base = ["replay", str(path), "--warm-start", "--store", "memory", "--data-dir", str(data_dir)]
    assert main([*base, "--strategy", "cost_optimized", "--out", str(tmp_path / "a")]) == 2
    assert "--strategy" in capsys.readouterr().err
    assert main([*base, "--policy", "lin_ts", "--out", str(tmp_path / "b")]) == 2
    assert "ROUTER_POLICY is lin_ts" in capsys.readouterr().err


def test_the_offline_routers_cost_estimates_and_points_by_hand():
    """Cost estimates: each model's mean cost in the prompt's finest cluster on the training rows;
    points: greedy on means - lam * estimate / mean estimate, in shares of the best model's."""
    policy = Hcts(2, 2, 0)
    policy.model.cents = [np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)]
    x_train = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    costs_train = np.array([[1.0, 10.0], [3.0, 20.0], [5.0, 50.0]])
    x = np.array([[0.9, 0.1], [0.1, 0.9]], dtype=np.float32)
    est = cost_estimates(policy, x_train, costs_train, x)
    assert est.tolist() == [[2.0, 15.0], [5.0, 50.0]]
    means = np.array([[0.5, 0.9], [0.8, 0.7]])
    scores = np.array([[0.0, 1.0], [1.0, 1.0]])
    costs = np.array([[1.0, 10.0], [1.0, 10.0]])
    points = offline_points(means, est, scores, costs, best=1)
    # lam = 0: the higher means (dear, then cheap): score 1.0 of 1.0, cost 11 of 20
    assert points[0] == pytest.approx((11 / 20, 1.0))
    # the largest lam: the cheapest estimate everywhere: score 0.5, cost 2 of 20
    assert points[-1] == pytest.approx((2 / 20, 0.5))
