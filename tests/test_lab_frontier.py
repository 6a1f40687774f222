"""The lab against the zero router (issue 12): the zero router's hull, a strategy's lift over it,
hulls read at 10/20/35/50 % cost share, the cost share that reaches 95 % / 100 % of the best model
(n/a when it is never reached), the non-contextual Thompson-sampling baseline, and the zero
router's hull in the cost-quality plot. Every number by hand, on small files written here."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest

from gateway.lab import baselines, frontier, plots
from gateway.lab.frontier import Curve
from gateway.lab.report import hull
from gateway.providers.replay import load
from gateway.routing.bandit import Knobs
from tests.test_lab import outcome, write_replay

# Second half (records 2 and 3 of 4): per model the mean cost and score, and as shares of dear's
#   cheap (0.1, 0.4) -> (0.1, 0.4)   mid (0.4, 0.8) -> (0.4, 0.8)   dear (1.0, 1.0) -> (1, 1)
# mid is above the chord cheap-dear (0.6 at 0.4), so the zero router's hull is all three.
SCORES = {
    "cheap": [1.0, 1.0, 0.5, 0.3],
    "mid": [0.0, 0.0, 1.0, 0.6],
    "dear": [1.0, 1.0, 1.0, 1.0],
}
COSTS = {"cheap": 0.1, "mid": 0.4, "dear": 1.0}


def flat(points) -> list[float]:
    return [float(v) for p in points for v in p]


@pytest.fixture
def three(tmp_path):
    records = [
        {
            "id": f"p{i}",
            "task": "t",
            "messages": [{"role": "user", "content": f"question {i}"}],
            "outcomes": {m: outcome(SCORES[m][i], COSTS[m]) for m in SCORES},
        }
        for i in range(4)
    ]
    return load(write_replay(tmp_path / "three.jsonl", records))


def test_the_zero_router_is_the_hull_of_the_single_models_on_the_second_half(three):
    assert baselines.best_single(three) == "dear"  # whole file: dear 1.0, cheap 0.7, mid 0.4
    zero = frontier.zero_router(three, [0, 1, 2, 3], "dear")
    assert flat(zero.hull) == pytest.approx([0.1, 0.4, 0.4, 0.8, 1.0, 1.0])
    assert math.isnan(zero.at(0.05))  # below the cheapest model nothing reaches that cost
    assert zero.at(0.10) == pytest.approx(0.4)
    assert zero.at(0.20) == pytest.approx(0.4 + 0.1 / 0.3 * 0.4)  # a mix of cheap and mid
    assert zero.at(0.35) == pytest.approx(0.4 + 0.25 / 0.3 * 0.4)
    assert zero.at(0.50) == pytest.approx(0.8 + 0.1 / 0.6 * 0.2)  # a mix of mid and dear
    assert zero.at(2.0) == pytest.approx(1.0)  # flat beyond the dearest
    assert zero.cost_for(0.95) == pytest.approx(0.4 + 0.15 / 0.2 * 0.6)
    assert zero.cost_for(1.00) == pytest.approx(1.0)
    figures = zero.figures()
    assert figures["hull_at_cost_share"] == pytest.approx(
        {"10%": 0.4, "20%": 0.4 + 0.4 / 3, "35%": 0.4 + 1 / 3, "50%": 0.8 + 0.2 / 6}
    )
    assert figures["cost_share_for_score_share"] == pytest.approx({"95%": 0.85, "100%": 1.0})
    # the order decides which prompts are the second half
    assert flat(frontier.zero_router(three, [2, 3, 0, 1], "dear").hull) == pytest.approx([0.1, 1.0])


def test_a_strategys_point_and_its_lift(three):
    order = [0, 1, 2, 3]
    best = baselines.single(three, order, "dear").window(2)
    # a router that took mid on record 2 (1.0 at 0.4) and cheap on record 3 (0.3 at 0.1)
    router = baselines._trace("auto", three, order, [0, 0, 1, 0]).window(2)
    p = frontier.point(router, best)
    assert p == pytest.approx((0.25, 0.65))
    zero = frontier.zero_router(three, order, "dear")
    op = frontier.operating(p, zero)
    assert op["zero_router_at_cost"] == pytest.approx(0.4 + 0.15 / 0.3 * 0.4)
    assert op["lift"] == pytest.approx(0.65 - 0.6)
    # below the zero router: a negative lift; below its cheapest point: n/a
    assert frontier.operating((0.4, 0.7), zero)["lift"] == pytest.approx(-0.1)
    assert frontier.operating((0.05, 0.7), zero)["lift"] is None


def test_one_replay_is_one_point_its_hull_is_na_below_it():
    zero = Curve([(0.1, 0.4), (0.4, 0.8), (1.0, 1.0)])
    f = frontier.figures({"auto": (0.35, 0.80)}, zero)
    assert f["points"]["auto"]["lift"] == pytest.approx(0.8 - (0.4 + 0.25 / 0.3 * 0.4))
    assert f["hull_at_cost_share"] == pytest.approx({"10%": None, "20%": None, "35%": 0.80, "50%": 0.80})
    assert f["cost_share_for_score_share"] == {"95%": None, "100%": None}  # never reached
    reaching = frontier.figures({"auto": (0.5, 0.96)}, zero)
    assert reaching["cost_share_for_score_share"] == {"95%": 0.5, "100%": None}


def test_a_sweeps_hull_read_at_the_cuts_and_the_targets():
    zero = Curve([(0.1, 0.4), (0.4, 0.8), (1.0, 1.0)])
    points = {"a": (0.2, 0.7), "b": (0.35, 0.9), "c": (0.6, 1.02), "worse": (0.5, 0.8)}
    f = frontier.figures(points, zero)
    assert flat(f["hull"]) == pytest.approx([0.2, 0.7, 0.35, 0.9, 0.6, 1.02])
    assert f["hull_at_cost_share"] == pytest.approx(
        {"10%": None, "20%": 0.7, "35%": 0.9, "50%": 0.9 + 0.15 / 0.25 * 0.12}
    )
    assert f["cost_share_for_score_share"] == pytest.approx(
        {"95%": 0.35 + 0.05 / 0.12 * 0.25, "100%": 0.35 + 0.10 / 0.12 * 0.25}
    )
    assert f["points"]["worse"]["lift"] == pytest.approx(0.8 - (0.8 + 0.1 / 0.6 * 0.2))
    # the printed table: n/a where the hull is undefined, signed lift for one point
    text = frontier.table({"zero router": zero.figures(), "sweep": f}, "note")
    assert "nan" not in text and "n/a" in text.splitlines()[-1]
    one = frontier.table({"auto": frontier.figures({"auto": (0.25, 0.65)}, zero)}, "note")
    assert "+5.0" in one and "  25.0   65.0   60.0" in one


def test_no_costs_means_no_hull_and_no_nan(tmp_path):
    records = [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": f"q{i}"}],
            "outcomes": {"x": outcome(0.5), "y": outcome(1.0)},
        }
        for i in range(4)
    ]
    data = load(write_replay(tmp_path / "free.jsonl", records))
    zero = frontier.zero_router(data, [0, 1, 2, 3], "y")
    assert zero.hull == [] and zero.figures()["hull_at_cost_share"]["35%"] is None
    assert frontier.operating((math.nan, 0.5), zero) == {
        "cost_share": None,
        "score_share": 0.5,
        "zero_router_at_cost": None,
        "lift": None,
    }


# --- the non-contextual Thompson sampler


def _arms(tmp_path, n=200, name="arms", task=lambda i: "t"):
    """good: always right, dear; fair: right 90 % of the time, 50x cheaper (prices per token)."""
    records = [
        {
            "id": str(i),
            "task": task(i),
            "messages": [{"role": "user", "content": f"q{i} " + "x" * 400}],
            "outcomes": {
                "fair": outcome(float(i % 10 != 0), None, None, 100, 10),
                "good": outcome(1.0, None, None, 100, 10),
            },
        }
        for i in range(n)
    ]
    return load(write_replay(tmp_path / f"{name}.jsonl", records, {"fair": (0.2, 0.2), "good": (10.0, 10.0)}))


def test_noncontextual_ts_is_seeded_and_never_reads_the_task(tmp_path):
    data = _arms(tmp_path)
    order, rated = list(range(200)), [True] * 200
    knobs = Knobs(latency_weight=0.0)
    a = baselines.noncontextual_ts(data, order, rated, 3, knobs)
    assert a.picks == baselines.noncontextual_ts(data, order, rated, 3, knobs).picks
    assert a.name == "noncontextual_ts" and set(a.picks) == {"fair", "good"}
    assert any(baselines.noncontextual_ts(data, order, rated, s, knobs).picks != a.picks for s in (4, 5, 6))
    # other tasks (or none): the same picks
    other = _arms(tmp_path, name="tasks", task=lambda i: f"task-{i % 7}")
    assert baselines.noncontextual_ts(other, order, rated, 3, knobs).picks == a.picks
    blank = dataclasses.replace(data, records=[dataclasses.replace(r, task="") for r in data.records])
    assert baselines.noncontextual_ts(blank, order, rated, 3, knobs).picks == a.picks


def test_noncontextual_ts_has_the_routers_cost_trade_off_and_learns_from_the_rated_calls(tmp_path):
    data = _arms(tmp_path)
    order = list(range(200))
    quality = Knobs(latency_weight=0.0, cost_weight=0.0, exploration_rate=0.0)
    thrifty = Knobs(latency_weight=0.0, cost_weight=-0.5, exploration_rate=0.0)
    rated = [True] * 200
    assert baselines.noncontextual_ts(data, order, rated, 0, quality).picks[100:].count("good") > 90
    assert baselines.noncontextual_ts(data, order, rated, 0, thrifty).picks[100:].count("fair") > 90
    # no feedback: the posteriors stay at the prior, the picks stay spread
    blind = baselines.noncontextual_ts(data, order, [False] * 200, 0, quality).picks[100:]
    assert 25 < blind.count("good") < 75


# --- the plot


def test_the_cost_quality_plot_draws_the_zero_router_hull_and_the_contextless_points(tmp_path):
    singles = {"cheap": (1e-4, 0.4), "mid": (4e-4, 0.8), "dear": (1e-3, 1.0), "bad": (8e-4, 0.5)}
    points = {"cost_weight=0": (9e-4, 0.99), "cost_weight=-0.5": (3e-4, 0.75)}
    contextless = {"cost_weight=0": (8e-4, 0.9), "cost_weight=-0.5": (2e-4, 0.6)}
    path = plots.cost_quality_plot(
        tmp_path / "cq.svg", points, singles, "three: sweep", {"random": (5e-4, 0.6)}, contextless
    )
    svg = path.read_text()
    group = re.search(r'<g id="zero-router-hull">(.*?)</g>', svg, re.S)
    assert group is not None and "stroke-dasharray" in group.group(1)  # dashed
    vertices = re.findall(r"[ML] ?(-?[\d.]+) (-?[\d.]+)", group.group(1))
    assert len(vertices) == len(hull(list(singles.values()))) == 3  # bad is under it
    ts = re.search(r'<g id="noncontextual-ts">(.*?)</g>', svg, re.S)
    assert ts is not None and ts.group(1).count("<path ") == 2  # one marker per setting
