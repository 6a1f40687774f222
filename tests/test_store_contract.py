"""One contract, two stores: the in-memory store and Postgres + pgvector pass the same tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import numpy as np
import pytest

from gateway.domain import CallRecord, DPOPair, Feedback, prompt_hash, utcnow
from gateway.errors import NotFound
from gateway.store.memory import MemoryStore
from gateway.store.postgres import PostgresStore, make_engine

DAY = timedelta(days=1)


@pytest.fixture(params=["memory", "postgres"])
async def store(request) -> AsyncIterator[MemoryStore | PostgresStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    s = PostgresStore(make_engine(request.getfixturevalue("dsn")))
    yield s
    await s.aclose()


def unit(*values: float) -> np.ndarray:
    v = np.zeros(384, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


def call(id: str, model: str = "m1", **kw) -> CallRecord:
    kw.setdefault("messages", [{"role": "user", "content": f"question {id}"}])
    kw.setdefault("status", "ok")
    kw.setdefault("http_status", 200)
    kw.setdefault("upstream_ms", 100.0)
    kw.setdefault("cost_usd", 0.001)
    kw.setdefault("completion_tokens", 10)
    return CallRecord(id=id, requested_model="auto", model=model, **kw)


async def test_write_and_read_back_a_call(store):
    emb = unit(1, 2, 3)
    rec = call(
        "c1",
        embedding=emb,
        layer="bandit",
        strategy="bandit",
        propensity=0.4,
        prompt_tokens=12,
        decision={"candidates": [{"model": "m1", "score": 0.7}]},
        attempts=[{"model": "m1", "outcome": "ok"}],
        response="an answer",
        ttft_ms=5.0,
        overhead_ms=0.8,
        caller="key_abc",
        stream=True,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
    )
    await store.write_calls([rec])
    stored = await store.get_call("c1")
    assert stored is not None
    got = stored.record
    assert got.messages == rec.messages
    assert got.prompt_hash == prompt_hash(rec.messages)
    assert np.allclose(got.embedding, emb, atol=1e-6)
    assert got.decision["candidates"][0]["score"] == 0.7
    assert (got.layer, got.propensity, got.response, got.caller) == ("bandit", 0.4, "an answer", "key_abc")
    assert (got.upstream_ms, got.ttft_ms, got.overhead_ms) == (100.0, 5.0, 0.8)
    assert (got.prompt_tokens, got.completion_tokens, got.cost_usd) == (12, 10, 0.001)
    assert got.stream is True and stored.score is None and stored.feedback == []
    as_json = stored.as_dict()  # what GET /requests/{id} renders
    assert as_json["messages"] == rec.messages and as_json["embedding"] == pytest.approx(
        emb.tolist(), abs=1e-6
    )
    assert await store.get_call("nope") is None


async def test_a_reused_request_id_keeps_the_first_record(store):
    await store.write_calls([call("dup", model="m1")])
    await store.write_calls([call("dup", model="m2")])
    assert (await store.get_call("dup")).record.model == "m1"
    stats = await store.arm_stats()
    assert stats["m1"].calls == 1 and "m2" not in stats


async def test_arm_statistics_follow_calls(store):
    await store.write_calls(
        [
            call("a", upstream_ms=100, cost_usd=0.002, completion_tokens=20),
            call("b", upstream_ms=300, cost_usd=0.004, completion_tokens=40),
            call("c", status="error", http_status=502, upstream_ms=5000, cost_usd=None),
            call("d", model="m2"),
        ]
    )
    stats = await store.arm_stats()
    m1 = stats["m1"]
    assert (m1.calls, m1.ok_calls, m1.rated) == (3, 2, 0)
    assert m1.latency_ms_avg == pytest.approx(200)
    assert m1.cost_usd_sum / m1.ok_calls == pytest.approx(0.003)
    assert m1.completion_tokens_avg == pytest.approx(30)
    assert m1.mean_score is None
    assert stats["m2"].calls == 1


async def test_feedback_latest_wins_and_moves_the_arm(store):
    await store.write_calls([call("a"), call("b")])
    with pytest.raises(NotFound):
        await store.add_feedback(Feedback("missing", 0.5))
    first = await store.add_feedback(Feedback("a", 0.2, "meh"))
    assert (first.previous, first.score, first.applied, first.model) == (None, 0.2, True, "m1")
    second = await store.add_feedback(Feedback("a", 0.9, "better on reflection"))
    assert (second.previous, second.score) == (0.2, 0.9)
    await store.add_feedback(Feedback("b", 0.5))
    stats = (await store.arm_stats())["m1"]
    assert stats.rated == 2  # two rated calls, not three feedbacks
    assert stats.mean_score == pytest.approx((0.9 + 0.5) / 2)
    got = await store.get_call("a")
    assert got.score == 0.9
    assert [f.score for f in got.feedback] == [0.2, 0.9]
    assert got.feedback[0].feedback_text == "meh"


async def test_a_judge_never_overrides_a_human(store):
    await store.write_calls([call("h"), call("j")])
    await store.add_feedback(Feedback("h", 1.0, source="user"))
    judged = await store.add_feedback(Feedback("h", 0.0, source="judge"))
    assert not judged.applied and judged.score == 1.0
    assert (await store.get_call("h")).score == 1.0
    await store.add_feedback(Feedback("j", 0.3, source="judge"))
    human = await store.add_feedback(Feedback("j", 0.8, source="user"))
    assert human.applied and human.previous == 0.3
    stats = (await store.arm_stats())["m1"]
    assert stats.rated == 2 and stats.mean_score == pytest.approx(0.9)


async def test_neighbours_are_rated_recent_nearest_then_thresholded(store):
    now = utcnow()
    calls = [
        call("near", embedding=unit(1, 0.05), model="m1"),
        call("nearer", embedding=unit(1, 0.01), model="m2"),
        call("far", embedding=unit(0, 1), model="m1"),
        call("unrated", embedding=unit(1, 0.0), model="m1"),
        call("old", embedding=unit(1, 0.0), model="m1", created_at=now - 40 * DAY),
        call("no-embedding", model="m1"),
    ]
    await store.write_calls(calls)
    for cid, score in [("near", 0.8), ("nearer", 0.4), ("far", 1.0), ("old", 1.0), ("no-embedding", 1.0)]:
        await store.add_feedback(Feedback(cid, score))
    q = unit(1, 0)
    found = await store.neighbours(q, k=10, since=now - 30 * DAY, threshold=0.5)
    assert [n.request_id for n in found] == ["nearer", "near"]
    assert found[0].model == "m2" and found[0].score == 0.4
    assert found[0].similarity == pytest.approx(float(unit(1, 0.01) @ q), abs=1e-5)
    everything = await store.neighbours(q, k=10, since=now - 30 * DAY, threshold=-1)
    assert [n.request_id for n in everything] == ["nearer", "near", "far"]
    # k applies before the threshold: the database orders by distance and limits, then we filter
    assert [n.request_id for n in await store.neighbours(q, k=1, since=now - 30 * DAY, threshold=0.5)] == [
        "nearer"
    ]
    assert len(await store.neighbours(q, k=10, since=now - 60 * DAY, threshold=0.5)) == 3


async def test_set_embedding_fills_in_only_a_missing_one(store):
    await store.write_calls([call("x"), call("y", embedding=unit(0, 1))])
    await store.set_embedding("x", unit(1, 0))
    await store.set_embedding("y", unit(1, 0))
    assert np.allclose((await store.get_call("x")).record.embedding, unit(1, 0), atol=1e-6)
    assert np.allclose((await store.get_call("y")).record.embedding, unit(0, 1), atol=1e-6)


async def test_usage_stats_over_a_window(store):
    now = utcnow()
    await store.write_calls(
        [
            call("a", upstream_ms=100, cost_usd=0.01),
            call("b", upstream_ms=300, cost_usd=0.03),
            call("c", status="error", http_status=502, cost_usd=None),
            call("d", model="m2", cost_usd=0.5),
            call("old", created_at=now - 3 * DAY, cost_usd=9.0),
        ]
    )
    await store.add_feedback(Feedback("a", 1.0))
    rows = {r.model: r for r in await store.usage_stats(now - DAY)}
    m1 = rows["m1"]
    assert (m1.requests, m1.errors, m1.feedback_count) == (3, 1, 1)
    assert m1.latency_ms_avg == pytest.approx(200)
    assert m1.cost_usd == pytest.approx(0.04)
    assert m1.feedback_avg == pytest.approx(1.0)
    assert rows["m2"].cost_usd == pytest.approx(0.5)


async def test_memory_store_is_bounded():
    store = MemoryStore(max_calls=3)
    await store.write_calls([call(str(i)) for i in range(5)])
    assert await store.get_call("0") is None and await store.get_call("4") is not None
    assert (await store.arm_stats())["m1"].calls == 5  # statistics outlive evicted calls


async def test_pair_candidates_are_real_rated_answers_of_other_models(store):
    q = [{"role": "user", "content": "same question"}]
    await store.write_calls(
        [
            call("me", model="m1", messages=q, response="answer one", embedding=unit(1, 0)),
            call("other", model="m2", messages=q, response="answer two", embedding=unit(1, 0)),
            call("same-model", model="m1", messages=q, response="answer three"),
            call("placeholder", model="m3", messages=q, response="[no response recorded]", synthetic=True),
            call("failed", model="m3", messages=q, status="error", http_status=502, response=None),
            call("empty", model="m3", messages=q, response=""),
            call("unrated", model="m3", messages=q, response="answer four"),
            call(
                "near",
                model="m3",
                messages=[{"role": "user", "content": "same question!"}],
                response="a5",
                embedding=unit(1, 0.1),
            ),
            call(
                "far",
                model="m3",
                messages=[{"role": "user", "content": "other"}],
                response="a6",
                embedding=unit(0, 1),
            ),
        ]
    )
    for cid in ("me", "other", "same-model", "placeholder", "failed", "empty", "near", "far"):
        await store.add_feedback(Feedback(cid, 0.5))
    me, others = await store.pair_candidates("me", similarity=0.99)
    assert me is not None and me.response == "answer one" and me.score == 0.5
    assert {o.id for o in others} == {"other", "near"}
    assert next(o for o in others if o.id == "near").similarity == pytest.approx(
        float(unit(1, 0.1) @ unit(1, 0)), abs=1e-5
    )
    assert (await store.pair_candidates("placeholder", 0.99)) == (None, [])
    assert (await store.pair_candidates("unrated", 0.99)) == (None, [])


def pair(a: str, b: str, sa: float, sb: float) -> DPOPair:
    return DPOPair(
        prompt_hash="h",
        messages=[{"role": "user", "content": "q"}],
        chosen_id=a,
        chosen_model="m1",
        chosen=f"answer {a}",
        chosen_score=sa,
        rejected_id=b,
        rejected_model="m2",
        rejected=f"answer {b}",
        rejected_score=sb,
    )


async def test_pairs_are_saved_once_updated_deleted_and_paged(store):
    await store.write_calls([call(c) for c in ("a", "b", "c", "d")])
    assert await store.save_pair(pair("a", "b", 1.0, 0.0)) is True
    assert await store.save_pair(pair("a", "b", 1.0, 0.0)) is False  # unchanged
    assert await store.save_pair(pair("b", "a", 0.9, 0.1)) is True  # flipped: the same pair, updated
    assert await store.save_pair(pair("c", "d", 0.6, 0.3)) is True
    listed = [p async for p in store.iter_pairs(None, 0.0)]
    assert [(p.chosen_id, p.rejected_id) for p in listed] == [("b", "a"), ("c", "d")]
    assert listed[0].margin == pytest.approx(0.8)
    assert [p.chosen_id async for p in store.iter_pairs(None, 0.5)] == ["b"]
    first = [p async for p in store.iter_pairs(None, 0.0, limit=1)]
    after = (first[0].updated_at, first[0].id)
    assert [p.chosen_id async for p in store.iter_pairs(None, 0.0, after=after)] == ["c"]
    assert [p async for p in store.iter_pairs(utcnow() + DAY, 0.0)] == []
    assert await store.delete_pair("a", "b") is True and await store.delete_pair("b", "a") is False
    assert [p.chosen_id async for p in store.iter_pairs(None, 0.0)] == ["c"]


async def test_comparisons_average_each_model_per_prompt(store):
    q1 = [{"role": "user", "content": "first"}]
    q2 = [{"role": "user", "content": "second"}]
    await store.write_calls(
        [
            call("1a", model="cheap", messages=q1),
            call("1b", model="cheap", messages=q1),
            call("1c", model="strong", messages=q1),
            call("2a", model="cheap", messages=q2),
        ]
    )
    for cid, s in (("1a", 1.0), ("1b", 0.0), ("1c", 1.0), ("2a", 1.0)):
        await store.add_feedback(Feedback(cid, s))
    found = [c async for c in store.iter_comparisons(None)]
    assert len(found) == 1
    c = found[0]
    assert (c.model_a, c.score_a, c.model_b, c.score_b) == ("cheap", 0.5, "strong", 1.0)
    assert c.messages == q1


async def test_neighbours_per_model_keep_every_arm_in_view(store):
    # m1 has many close calls, m2 a few farther ones: a global top-3 would hold only m1
    calls = [call(f"a{i}", model="m1", embedding=unit(1, 0.01 * i)) for i in range(5)]
    calls += [call(f"b{i}", model="m2", embedding=unit(1, 0.3 + 0.1 * i)) for i in range(3)]
    calls += [call("c", model="m3", embedding=unit(1, 0.2))]
    await store.write_calls(calls)
    for c in calls:
        await store.add_feedback(Feedback(c.id, 0.5))
    since = utcnow() - 30 * DAY
    q = unit(1, 0)
    assert {n.model for n in await store.neighbours(q, 3, since, 0.0)} == {"m1"}
    found = await store.neighbours(q, 2, since, 0.0, per_model=["m1", "m2"])
    assert sorted(n.request_id for n in found) == ["a0", "a1", "b0", "b1"]
    assert [n.similarity for n in found] == sorted((n.similarity for n in found), reverse=True)
    assert {n.request_id for n in await store.neighbours(q, 2, since, 0.96, per_model=["m1", "m2"])} == {
        "a0",
        "a1",
    }


async def test_calls_of_a_window_come_oldest_first_with_their_ratings(store):
    now = utcnow()
    records = [
        call(f"w{i}", created_at=now - timedelta(minutes=10 - i), embedding=unit(1, i), model=f"m{i % 2}")
        for i in range(7)
    ]
    records.append(call("tie", created_at=records[3].created_at))  # same time: ordered by id
    await store.write_calls(records)
    await store.add_feedback(Feedback("w2", 0.2, "meh", created_at=now - timedelta(minutes=5)))
    await store.add_feedback(Feedback("w2", 0.9, source="app", created_at=now - timedelta(minutes=4)))
    await store.add_feedback(Feedback("w4", 0.5, source="judge"))
    since, until = records[1].created_at, records[6].created_at
    got = [c async for c in store.iter_calls(since, until, page=2)]  # pages of two: keyset paging
    assert [c.record.id for c in got] == ["w1", "w2", "tie", "w3", "w4", "w5"]
    w2 = got[1]
    assert (w2.score, w2.score_source) == (0.9, "app")
    assert [(f.score, f.feedback_text, f.source) for f in w2.feedback] == [
        (0.2, "meh", "user"),
        (0.9, None, "app"),
    ]
    assert w2.feedback[0].created_at < w2.feedback[1].created_at
    assert got[4].score == 0.5 and got[4].feedback[0].source == "judge"
    assert np.allclose(got[0].record.embedding, unit(1, 1), atol=1e-6) and got[0].record.model == "m1"
    assert [c async for c in store.iter_calls(until, until)] == []
