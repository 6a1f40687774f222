"""The DPO flywheel end to end: pairs from feedback, re-rating, near-identical prompts, duels,
the blind judge, routing labels, and exports that TRL's DPOTrainer can read."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import dpo
from gateway.cli import main as cli
from tests.conftest import make_settings, model, wait_for

ADMIN = "sk-admin-test-0123456789"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


# --- the pure parts


@pytest.mark.parametrize(
    ("medium", "large", "label"),
    [
        ("correct", "correct", "standard"),
        ("correct", "incorrect", "standard"),
        ("correct", "unsure", "standard"),
        ("incorrect", "correct", "complex"),
        ("unsure", "correct", "complex"),
        ("incorrect", "unsure", "complex"),
        ("incorrect", "incorrect", "ambiguous"),
        ("unsure", "unsure", "ambiguous"),
        ("unsure", "incorrect", "ambiguous"),
    ],
)
def test_the_nine_cell_routing_matrix(medium, large, label):
    assert dpo.route_label(medium, large) == label


def test_outcome_thresholds():
    assert [dpo.outcome(s) for s in (1.0, 0.7, 0.5, 0.3, 0.0)] == [
        "correct",
        "correct",
        "unsure",
        "incorrect",
        "incorrect",
    ]


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("VERDICT: A", "A"),
        ("  VERDICT: B \n", "B"),
        ("VERDICT:TIE", "TIE"),
        ("verdict: A", None),
        ("VERDICT: A, because it is correct", None),
        ("A", None),
        ("", None),
        (None, None),
        ("VERDICT: C", None),
        ("VERDICT: A\nVERDICT: B", None),
        ("I think VERDICT: A", None),
    ],
)
def test_the_verdict_is_parsed_strictly(text, verdict):
    assert dpo.parse_verdict(text) == verdict


def test_blind_order_is_random_and_scores_follow_it():
    rng = random.Random(0)
    orders = {dpo.blind_order("x", "y", rng).a for _ in range(50)}
    assert orders == {"x", "y"}
    order = dpo.JudgeOrder("x", "y")
    assert order.scores("A") == {"x": 1.0, "y": 0.0}
    assert order.scores("B") == {"y": 1.0, "x": 0.0}
    assert order.scores("TIE") == {"x": 0.5, "y": 0.5}


# --- end to end


@pytest.fixture
def flywheel(fake, gateway, dsn, request):
    settings = make_settings(
        [
            model(
                "chef",
                fake.url(answer="Paris_is_the_capital."),
                input_usd_per_mtok=0.1,
                output_usd_per_mtok=0.1,
            ),
            model("coder", fake.url(answer="It_is_Lyon."), input_usd_per_mtok=5, output_usd_per_mtok=15),
        ],
        enable_persistence=True,
        database_url=dsn,
        admin_api_key=ADMIN,
    )
    if getattr(request, "param", "static") == "minilm":
        from gateway.embedders.minilm import MiniLMEmbedder

        return gateway(settings, embedder=MiniLMEmbedder(request.getfixturevalue("st_model")))
    return gateway(settings)


def call(gw, model_name: str, messages=CAPITAL) -> str:
    resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": model_name, "messages": messages})
    assert resp.status_code == 200, resp.text
    return resp.headers["x-request-id"]


def rate(gw, rid: str, score: float, **kw) -> dict:
    resp = httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": score, **kw})
    assert resp.status_code == 200, resp.text
    return resp.json()


def pairs(gw, **params) -> list[dict]:
    params.setdefault("format", "jsonl")
    resp = httpx.get(gw.url + "/v1/dpo/pairs", params=params, headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in resp.text.splitlines()]


def test_two_models_rated_apart_make_one_pair_and_rerating_flips_it(flywheel):
    gw = flywheel
    a, b = call(gw, "chef"), call(gw, "coder")
    assert rate(gw, a, 1.0)["pairs"] == 0  # nothing to pair with yet
    assert rate(gw, b, 0.0)["pairs"] == 1
    assert rate(gw, b, 0.0)["pairs"] == 0  # the same rating again changes nothing
    [pair] = pairs(gw)
    assert (pair["chosen_model"], pair["rejected_model"]) == ("chef", "coder")
    assert (pair["chosen"], pair["rejected"]) == ("Paris is the capital.", "It is Lyon.")
    assert (pair["chosen_request_id"], pair["rejected_request_id"]) == (a, b)
    assert pair["prompt"] == CAPITAL and pair["margin"] == 1.0 and pair["similarity"] == 1.0
    assert rate(gw, b, 1.0)["pairs"] == 0 and pairs(gw) == []  # equal now: no preference, no pair
    assert rate(gw, a, 0.1)["pairs"] == 1  # flipped
    [flipped] = pairs(gw)
    assert (flipped["chosen_model"], flipped["rejected_model"]) == ("coder", "chef")
    assert flipped["margin"] == pytest.approx(0.9)


def test_margin_and_model_rules(flywheel):
    gw = flywheel
    a, b, c = call(gw, "chef"), call(gw, "coder"), call(gw, "chef")
    rate(gw, a, 0.6)
    assert rate(gw, b, 0.5)["pairs"] == 0  # below the 0.2 margin
    assert rate(gw, c, 0.0)["pairs"] == 1  # pairs with b (other model), never with a (same model)
    [pair] = pairs(gw)
    assert {pair["chosen_request_id"], pair["rejected_request_id"]} == {b, c}


@pytest.mark.parametrize("flywheel", ["static", "minilm"], indirect=True)
def test_near_identical_prompts_pair_and_unrelated_ones_do_not(flywheel):
    # with either embedder (the cosines are the static one's, then MiniLM's)
    gw = flywheel
    ask = "Could you please tell me which city is the capital of France?"
    a = call(gw, "chef", [{"role": "user", "content": ask}])
    b = call(gw, "coder", [{"role": "user", "content": ask.replace("please ", "")}])  # 0.98, 0.99
    river = ask.replace("city is", "river flows through")
    d = call(gw, "coder", [{"role": "user", "content": river}])  # related: 0.84, 0.76
    c = call(gw, "coder", [{"role": "user", "content": "How do I bake sourdough bread?"}])
    # one content word apart: 0.98 to the static embedding, but another question (MiniLM: 0.67)
    g = call(gw, "coder", [{"role": "user", "content": ask.replace("France", "Germany")}])
    rate(gw, a, 1.0)
    assert rate(gw, c, 0.0)["pairs"] == 0
    assert rate(gw, d, 0.0)["pairs"] == 0  # related, but below DPO_SIMILARITY (0.97)
    assert rate(gw, g, 0.0)["pairs"] == 0
    assert rate(gw, b, 0.0)["pairs"] == 1
    [pair] = pairs(gw)
    assert 0.97 <= pair["similarity"] < 1.0
    assert pair["prompt"] == [{"role": "user", "content": ask}]
    # near-identical in embedding space (cosine 0.96-0.98), but not the same request: never a pair
    x = call(gw, "chef", [{"role": "user", "content": "Name a famous bridge, please (0)"}])
    y = call(gw, "coder", [{"role": "user", "content": "Name a famous bridge, please (1)"}])
    rate(gw, x, 1.0)
    assert rate(gw, y, 0.0)["pairs"] == 0


def test_identical_answers_are_no_preference(fake, gateway, dsn):
    settings = make_settings(
        [model("a", fake.url(answer="Same.")), model("b", fake.url(answer="Same."))],
        enable_persistence=True,
        database_url=dsn,
    )
    gw = gateway(settings)
    rate(gw, call(gw, "a"), 1.0)
    assert rate(gw, call(gw, "b"), 0.0)["pairs"] == 0


def test_admin_endpoint_auth_and_paging(flywheel, fake, gateway, dsn):
    gw = flywheel
    for topic in ("rivers", "volcanoes", "jazz"):
        prompt = [{"role": "user", "content": f"Tell me something surprising about {topic}."}]
        rate(gw, call(gw, "chef", prompt), 1.0)
        rate(gw, call(gw, "coder", prompt), 0.0)
    first = httpx.get(
        gw.url + "/v1/dpo/pairs?limit=2&format=jsonl", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert len(first.text.splitlines()) == 2
    cursor = first.headers["x-next-cursor"]
    rest = httpx.get(
        gw.url + "/v1/dpo/pairs",
        params={"limit": 2, "cursor": cursor, "format": "jsonl"},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert len(rest.text.splitlines()) == 1 and "x-next-cursor" not in rest.headers
    seen = {json.loads(x)["chosen_request_id"] for x in first.text.splitlines() + rest.text.splitlines()}
    assert len(seen) == 3
    assert httpx.get(gw.url + "/v1/dpo/pairs", headers={"Authorization": "Bearer nope"}).status_code == 401
    open_gw = gateway(make_settings([model("m", fake.url())], enable_persistence=True, database_url=dsn))
    disabled = httpx.get(open_gw.url + "/v1/dpo/pairs")
    assert disabled.status_code == 403 and disabled.json()["error"]["code"] == "admin_disabled"


def test_export_loads_with_datasets_as_dpo_trainer_reads_it(flywheel, dsn, tmp_path):
    gw = flywheel
    for topic in ("owls", "glaciers", "the Roman empire", "prime numbers"):
        prompt = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"One fact about {topic}?"},
        ]
        rate(gw, call(gw, "chef", prompt), 0.9)
        rate(gw, call(gw, "coder", prompt), 0.2)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {"name": "chef", "base_url": "http://127.0.0.1:9/v1", "input_usd_per_mtok": 0.1},
                    {"name": "coder", "base_url": "http://127.0.0.1:9/v1", "input_usd_per_mtok": 5},
                ],
                "enable_persistence": True,
                "database_url": dsn,
            }
        )
    )
    out = tmp_path / "pairs.jsonl"
    assert cli(["export-dpo", "--config", str(config), "--out", str(out), "--format", "trl"]) == 0
    import datasets

    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert ds.num_rows == 4
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    row = ds[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["chosen"] == [{"role": "assistant", "content": "Paris is the capital."}]
    assert row["rejected"] == [{"role": "assistant", "content": "It is Lyon."}]
    routes = tmp_path / "routes.jsonl"
    assert cli(["export-dpo", "--config", str(config), "--out", str(routes), "--kind", "routes"]) == 0
    labels = [json.loads(x) for x in routes.read_text().splitlines()]
    assert len(labels) == 4
    # chef is the cheaper arm and was right: "standard", route to the cheaper model
    assert {(r["label"], r["chosen_model"], r["rejected_model"]) for r in labels} == {
        ("standard", "chef", "coder")
    }
    assert set(labels[0]) == {"prompt", "label", "chosen_model", "rejected_model"}
    high = tmp_path / "high.jsonl"
    cli(
        [
            "export-dpo",
            "--config",
            str(config),
            "--out",
            str(high),
            "--min-margin",
            "0.8",
            "--format",
            "jsonl",
        ]
    )
    assert high.read_text() == ""


@pytest.fixture
def dueling(fake, gateway, dsn):
    def start(judge_answer: str | None = "VERDICT:_A", **kw):
        models = [
            model("fast", fake.url(answer="The_fast_answer.")),
            model(
                "slow",
                fake.url(answer="The_slow_answer.", delay_ms=400),
                input_usd_per_mtok=3,
                output_usd_per_mtok=9,
            ),
        ]
        if judge_answer:
            models.append(model("judge", fake.url(answer=judge_answer)))
        settings = make_settings(
            models,
            enable_persistence=True,
            database_url=dsn,
            duel_rate=1.0,
            judge_model="judge" if judge_answer else None,
            admin_api_key=ADMIN,
            policies={"pair": {"models": ["fast", "slow"]}},
            **kw,
        )
        return gateway(settings, seed=7)

    return start


def ask_pair(gw, content: str) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        timeout=10,
        json={
            "model": "auto",
            "router": {"policy": "pair"},
            "messages": [{"role": "user", "content": content}],
        },
    )


def test_a_duel_adds_no_latency_and_its_answer_is_stored(dueling, fake):
    gw = dueling(judge_answer=None)
    for i in range(6):
        t0 = time.perf_counter()
        resp = ask_pair(gw, f"Tell me a fact about the moon, number {i}")
        elapsed = time.perf_counter() - t0
        if resp.headers["x-router-model"] == "fast":
            break
    assert resp.headers["x-router-model"] == "fast" and resp.headers["x-router-layer"] == "bandit"
    assert elapsed < 0.3  # the duel's model takes 400 ms; the caller did not wait for it
    rid = resp.headers["x-request-id"]
    duel = wait_for(lambda: (r := httpx.get(f"{gw.url}/requests/{rid}:duel")).status_code == 200 and r.json())
    assert duel["kind"] == "duel" and duel["duel_of"] == rid and duel["model"] == "slow"
    assert duel["response"] == "The slow answer." and duel["status"] == "ok"
    assert duel["cost_usd"] > 0
    costs = {
        (s.labels["model"], s.labels["kind"]): s.value
        for f in text_string_to_metric_families(httpx.get(gw.url + "/metrics").text)
        for s in f.samples
        if s.name == "llm_router_cost_usd_total"
    }
    assert costs[("slow", "duel")] == pytest.approx(duel["cost_usd"])  # the duel's cost is counted
    # rated by the user, the duel's answer pairs with the original one
    rate(gw, rid, 1.0)
    assert rate(gw, f"{rid}:duel", 0.0)["pairs"] == 1


def test_the_blind_judge_rates_duels_in_random_order(dueling, fake):
    gw = dueling(judge_answer="VERDICT:_A")  # a judge that always prefers whatever it saw first
    ids = [ask_pair(gw, f"Name a famous bridge, please ({i})").headers["x-request-id"] for i in range(8)]
    records = {
        rid: wait_for(
            lambda rid=rid: (
                (r := httpx.get(f"{gw.url}/requests/{rid}:judge")).status_code == 200
                and r.json()["decision"].get("order")
                and r.json()
            )
        )
        for rid in ids
    }
    shown_first = []
    for rid, judged in records.items():
        order = judged["decision"]["order"]
        assert (
            judged["kind"] == "judge"
            and judged["decision"]["verdict"] == "A"
            and set(order) == {rid, f"{rid}:duel"}
        )
        winner, loser = order
        wait_for(lambda w=winner: httpx.get(f"{gw.url}/requests/{w}").json()["score"] is not None)
        assert httpx.get(f"{gw.url}/requests/{winner}").json()["score"] == 1.0
        assert httpx.get(f"{gw.url}/requests/{loser}").json()["score"] == 0.0
        feedback = httpx.get(f"{gw.url}/requests/{winner}").json()["feedback"]
        assert feedback[-1]["source"] == "judge"
        shown_first.append(winner == rid)
        prompt = judged["messages"][0]["content"]
        first_answer = prompt.split("<answer_a>")[1].split("</answer_a>")[0]
        winner_text = httpx.get(f"{gw.url}/requests/{winner}").json()["response"]
        assert winner_text in first_answer  # what the judge saw as A is the call it scored 1
    assert any(shown_first) and not all(shown_first)  # both orders happened
    assert len(pairs(gw)) == 8  # the judge's ratings made the pairs, without a human


def test_a_malformed_verdict_records_nothing(dueling):
    gw = dueling(judge_answer="I_prefer_answer_A")
    rid = ask_pair(gw, "What is the longest river?").headers["x-request-id"]
    judged = wait_for(
        lambda: (r := httpx.get(f"{gw.url}/requests/{rid}:judge")).status_code == 200 and r.json()
    )
    assert judged["response"] == "I prefer answer A"
    time.sleep(0.2)
    assert httpx.get(f"{gw.url}/requests/{rid}").json()["feedback"] == []
    assert httpx.get(f"{gw.url}/requests/{rid}:duel").json()["feedback"] == []


def test_a_judge_never_overrides_a_human(dueling):
    gw = dueling(judge_answer="VERDICT:_A")
    rid = ask_pair(gw, "Is a tomato a fruit?").headers["x-request-id"]
    wait_for(
        lambda: (
            (r := httpx.get(f"{gw.url}/requests/{rid}:judge")).status_code == 200
            and r.json()["decision"].get("verdict")
        )
    )
    # The judge's record is kept before its rating is applied: wait for the rating too.
    wait_for(
        lambda: [f["source"] for f in httpx.get(f"{gw.url}/requests/{rid}").json()["feedback"]] == ["judge"]
    )
    rate(gw, rid, 0.3, feedback_text="human says meh")
    later = httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 1.0}).json()
    assert later["previous_score"] == 0.3
    record = httpx.get(f"{gw.url}/requests/{rid}").json()
    assert [f["source"] for f in record["feedback"]] == ["judge", "user", "user"]
