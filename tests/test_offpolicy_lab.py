"""The lab's check of off-policy evaluation, small: a real gateway logs a slice of RouterBench,
the candidates are estimated from its logs, then each is replayed for real from the same state
on the same calls. (`llm-router evaluate-lab` runs it on whole files: see the README.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.lab.offpolicy import LabOptions, evaluate_lab, parse

REPLAY = next(
    (
        p / "shared" / "data" / "replay"
        for p in Path(__file__).resolve().parents
        if (p / "shared" / "data" / "replay" / "routerbench_dev.jsonl").is_file()
    ),
    None,
)
MODELS = "gpt-4-1106-preview,zero-one-ai/Yi-34B-Chat,mistralai/mistral-7b-chat"


@pytest.mark.skipif(REPLAY is None, reason="the shared replay data is not beside this checkout")
def test_estimates_against_candidates_replayed_for_real(tmp_path, data_dir, st_model):
    # 200 prompts, three models; the logging gateway explores uniformly (EXPLORATION_RATE=1), so
    # that a window of 100 calls says enough about the candidates
    options = LabOptions(
        limit=200,
        logging={"exploration_rate": 1.0, "llm_models": MODELS, "router_policy": "lin_ts"},
        candidates=[
            parse("greedy: EXPLORATION_RATE=0"),
            parse("thrifty: COST_WEIGHT=-0.8 EXPLORATION_RATE=0"),
        ],
        data_dir=data_dir,
    )
    result = evaluate_lab(str(REPLAY / "routerbench_dev.jsonl"), options, str(tmp_path / "lab"))
    assert result["window"] == 100
    rows = {r["name"]: r for r in result["candidates"]}
    assert list(rows) == ["current settings", "greedy", "thrifty"]
    # the logging settings, frozen: uniform exploration is the logging policy itself, so every
    # weight is 1 and IPS and SNIPS give back exactly what the logs got
    same = rows["current settings"]
    assert same["effective_sample_size"] == pytest.approx(100)
    for name in ("ips", "snips"):
        assert same["score"][name]["value"] == pytest.approx(result["logged_realised"]["score"])
    for r in rows.values():
        # the evaluator decides as the replayed gateway did (its expected figures match the replay)
        assert abs(r["truth_expected"]["score"] - r["truth_replayed"]["score"]) < 0.06
        # and the estimates' 90% intervals cover what the candidate really scored
        for name in ("snips", "dr"):
            assert r["score"][name]["covers_replayed"], (
                r["name"],
                name,
                r["score"][name],
                r["truth_replayed"],
            )
    assert rows["thrifty"]["truth_replayed"]["cost_usd"] < rows["greedy"]["truth_replayed"]["cost_usd"]
    assert rows["thrifty"]["cost_usd"]["dr"]["high"] < rows["greedy"]["cost_usd"]["dr"]["low"]
    saved = json.loads((tmp_path / "lab" / "report.json").read_text())
    assert saved["summary"]["score.dr"] == {**result["summary"]["score.dr"]}
    assert (tmp_path / "lab" / "evaluation.png").stat().st_size > 10_000
