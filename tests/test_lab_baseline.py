"""The lab's non-contextual Thompson-sampling baseline under the default policy (ROUTER_POLICY=hcts):
HCTS's own core without clusters or gate, with the router's dial. Small files written here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gateway.lab import baselines, runner
from gateway.lab.runner import Options, lab_settings
from gateway.providers.replay import ReplayData, load
from gateway.routing.bandit import Knobs
from tests.test_lab import outcome, write_replay

N = 300


def _arms(tmp_path: Path, name: str = "arms", task=lambda i: "t", words=lambda i: f"q{i:04d}") -> ReplayData:
    """good: always right, dear; fair: right 90 % of the time, 50x cheaper (prices per token); the
    prompts' lengths (so the pre-call cost estimates) vary."""
    records = [
        {
            "id": str(i),
            "task": task(i),
            "messages": [{"role": "user", "content": words(i) + " " + "x" * (40 + 37 * i % 1200)}],
            "outcomes": {
                "fair": outcome(float(i % 10 != 0), None, None, 100, 10),
                "good": outcome(1.0, None, None, 100, 10),
            },
        }
        for i in range(N)
    ]
    return load(write_replay(tmp_path / f"{name}.jsonl", records, {"fair": (0.2, 0.2), "good": (10.0, 10.0)}))


def _run(data: ReplayData, seed: int = 0, rated: list[bool] | None = None, **overrides) -> list[str]:
    options = Options(store="memory", seed=seed, overrides=overrides)
    trace = runner.noncontextual_ts(data, list(range(N)), rated or [True] * N, options)
    assert trace.name == "noncontextual_ts"
    return trace.picks


def _cost_share(data: ReplayData, picks: list[str]) -> float:
    costs = [data.cost(r, m) for r, m in zip(data.records, picks, strict=True)]
    return sum(costs[N // 2 :]) / sum(data.cost(r, "good") for r in data.records[N // 2 :])


def test_under_hcts_it_is_seeded_and_never_reads_the_task_nor_the_prompts_words(tmp_path):
    data = _arms(tmp_path)
    assert lab_settings(data, Options(store="memory"), None).router_policy == "hcts"  # the default
    a = _run(data, 3)
    assert a == _run(data, 3) and set(a) == {"fair", "good"}
    assert any(_run(data, s) != a for s in (4, 5, 6))
    # other tasks (or none), other words of the same length (other embeddings): the same picks
    tasks = _arms(tmp_path, "tasks", task=lambda i: f"task-{i % 7}")
    assert _run(tasks, 3) == a
    blank = dataclasses.replace(data, records=[dataclasses.replace(r, task="") for r in data.records])
    assert _run(blank, 3) == a
    words = _arms(tmp_path, "words", words=lambda i: f"z{(i * 7919) % 10000:04d}")
    assert _run(words, 3) == a


def test_under_hcts_it_follows_the_dial(tmp_path):
    data = _arms(tmp_path)
    shares = {
        q: _cost_share(data, _run(data, 0, router_dial_mode="quality", router_dial_target=q))
        for q in (0.85, 0.95, 1.0)
    }
    assert shares[0.85] < 0.1 < shares[0.95] < 0.6 < shares[1.0]  # fair is 90 % of good
    budget = {
        b: _cost_share(data, _run(data, 0, router_dial_mode="budget", router_dial_target=b))
        for b in (0.1, 0.5)
    }
    assert budget[0.1] < 0.3 < budget[0.5]


def test_under_hcts_it_learns_only_from_the_rated_calls(tmp_path):
    data = _arms(tmp_path)
    rated = _run(data, 0, router_dial_mode="quality", router_dial_target=0.85)
    blind = _run(data, 0, [False] * N, router_dial_mode="quality", router_dial_target=0.85)
    assert blind != rated
    assert _cost_share(data, rated) < _cost_share(data, blind)  # it found fair good enough


def test_the_bandit_policies_keep_the_bandits_objective(tmp_path):
    data = _arms(tmp_path)
    for policy in ("lin_ts", "knn_ts", "default"):
        options = Options(store="memory", seed=2, policy=policy, overrides={"cost_weight": -0.5})
        knobs = Knobs.from_settings(lab_settings(data, options, None))
        mine = runner.noncontextual_ts(data, list(range(N)), [True] * N, options)
        assert mine.picks == baselines.noncontextual_ts(data, list(range(N)), [True] * N, 2, knobs).picks


def test_a_sweep_runs_one_baseline_per_objective(tmp_path):
    data = _arms(tmp_path)

    def goal(policy: str | None = None, **overrides):
        return runner.objective(data, Options(store="memory", policy=policy, overrides=overrides))

    # hcts: the dial is the objective (the bandit's weights are not)
    assert goal(cost_weight=-0.5) == goal(cost_weight=0.0) == goal(router_dial_target=0.35)  # the default
    assert goal(router_dial_mode="budget") == goal()
    assert goal(router_dial_target=0.9) != goal() != goal(router_dial_mode="quality", router_dial_target=0.35)
    assert goal(router_dial_mode="quality") == goal(router_dial_mode="quality", router_dial_target=0.95)
    # the bandit policies: their knobs are (the dial is not)
    assert goal("lin_ts", router_dial_target=0.9) == goal("lin_ts")
    assert goal("lin_ts", cost_weight=-0.5) != goal("lin_ts") != goal("knn_ts")
