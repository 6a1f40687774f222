"""One contract, two stores: the in-memory store and Postgres + pgvector pass the same tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import numpy as np
import pytest

from gateway.domain import CallRecord, DPOPair, Feedback, prompt_hash, utcnow
from gateway.errors import NotFound
from gateway.insights import CallQuery, Window
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


E = "test-embedder"  # the embedder id of these tests' embeddings (the store compares only equal ids)


def call(id: str, model: str = "m1", **kw) -> CallRecord:
    if kw.get("embedding") is not None:
        kw.setdefault("embedder", E)
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
    assert await store.get_call("", "c1") is None  # another tenant's call (the key is (caller, id))
    stored = await store.get_call("key_abc", "c1")
    assert stored is not None
    got = stored.record
    assert got.messages == rec.messages
    assert got.prompt_hash == prompt_hash(rec.messages)
    assert np.array_equal(np.asarray(got.embedding, dtype=np.float32), emb)  # the same bits, stored
    assert got.decision["candidates"][0]["score"] == 0.7
    assert (got.layer, got.propensity, got.response, got.caller) == ("bandit", 0.4, "an answer", "key_abc")
    assert (got.upstream_ms, got.ttft_ms, got.overhead_ms) == (100.0, 5.0, 0.8)
    assert (got.prompt_tokens, got.completion_tokens, got.cost_usd) == (12, 10, 0.001)
    assert got.stream is True and stored.score is None and stored.feedback == []
    as_json = stored.as_dict()  # what GET /requests/{id} renders
    assert as_json["messages"] == rec.messages and as_json["embedding"] == pytest.approx(
        emb.tolist(), abs=1e-6
    )
    assert await store.get_call("", "nope") is None


async def test_a_reused_request_id_keeps_the_first_record(store):
    await store.write_calls([call("dup", model="m1")])
    await store.write_calls([call("dup", model="m2")])
    assert (await store.get_call("", "dup")).record.model == "m1"
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
    got = await store.get_call("", "a")
    assert got.score == 0.9
    assert [f.score for f in got.feedback] == [0.2, 0.9]
    assert got.feedback[0].feedback_text == "meh"


async def test_a_judge_never_overrides_a_human(store):
    await store.write_calls([call("h"), call("j")])
    await store.add_feedback(Feedback("h", 1.0, source="user"))
    judged = await store.add_feedback(Feedback("h", 0.0, source="judge"))
    assert not judged.applied and judged.score == 1.0
    assert (await store.get_call("", "h")).score == 1.0
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
    found = await store.neighbours(q, k=10, since=now - 30 * DAY, threshold=0.5, embedder=E)
    assert [n.request_id for n in found] == ["nearer", "near"]
    assert found[0].model == "m2" and found[0].score == 0.4
    assert found[0].similarity == pytest.approx(float(unit(1, 0.01) @ q), abs=1e-5)
    everything = await store.neighbours(q, k=10, since=now - 30 * DAY, threshold=-1, embedder=E)
    assert [n.request_id for n in everything] == ["nearer", "near", "far"]
    # k applies before the threshold: the database orders by distance and limits, then we filter
    assert [
        n.request_id for n in await store.neighbours(q, k=1, since=now - 30 * DAY, threshold=0.5, embedder=E)
    ] == ["nearer"]
    assert len(await store.neighbours(q, k=10, since=now - 60 * DAY, threshold=0.5, embedder=E)) == 3


async def test_set_embedding_fills_in_a_missing_one_or_another_embedders(store):
    await store.write_calls(
        [call("x"), call("y", embedding=unit(0, 1)), call("z", embedding=unit(0, 1), embedder="other")]
    )
    for cid in ("x", "y", "z"):
        await store.set_embedding("", cid, unit(1, 0), E)
    assert np.allclose((await store.get_call("", "x")).record.embedding, unit(1, 0), atol=1e-6)
    assert np.allclose((await store.get_call("", "y")).record.embedding, unit(0, 1), atol=1e-6)
    z = (await store.get_call("", "z")).record
    assert z.embedder == E and np.allclose(z.embedding, unit(1, 0), atol=1e-6)
    assert (await store.get_call("", "x")).record.embedder == E


async def test_embeddings_of_another_embedder_are_never_compared(store):
    # "old" is the nearest by far, but its vector is another embedder's (another space)
    same = [{"role": "user", "content": "the same question"}]
    await store.write_calls(
        [
            call(
                "old", model="m1", embedding=unit(1, 0), embedder="old-embedder", messages=same, response="a1"
            ),
            call("new", model="m2", embedding=unit(1, 0.5), response="a2"),
            call("mine", model="m3", embedding=unit(1, 0.4), response="a3"),
            call("legacy", model="m1", embedding=unit(1, 0.01), embedder=None, response="a4"),
        ]
    )
    for cid in ("old", "new", "mine", "legacy"):
        await store.add_feedback(Feedback(cid, 0.5))
    since = utcnow() - 30 * DAY
    q = unit(1, 0)
    assert [n.request_id for n in await store.neighbours(q, 10, since, -1, embedder=E)] == ["mine", "new"]
    per_arm = await store.neighbours(q, 10, since, -1, per_model=["m1", "m2", "m3"], embedder=E)
    assert {n.request_id for n in per_arm} == {"mine", "new"}
    assert [n.request_id for n in await store.neighbours(q, 10, since, -1, embedder="old-embedder")] == [
        "old"
    ]
    keys = [("", c) for c in ("old", "new", "mine", "legacy")]
    assert set(await store.embeddings_of(keys, E)) == {("", "new"), ("", "mine")}
    assert set(await store.embeddings_of(keys, "old-embedder")) == {("", "old")}
    # DPO: a near-identical prompt is found only among the same embedder's vectors
    me, others = await store.pair_candidates("", "mine", 0.9, embedder=E)
    assert me is not None and {o.id for o in others} == {"new"}
    me, others = await store.pair_candidates("", "mine", 0.9, embedder=None)  # no embedder: none near
    assert me is not None and others == []
    me, others = await store.pair_candidates("", "old", 0.0, embedder=E)  # its own vector is stale
    assert me is not None and others == []
    # what `llm-router reembed` reads, and how it writes: vector and id together
    stale = await store.to_reembed(E, None, 10)
    assert [c.key for c in stale] == [("", "legacy"), ("", "old")]
    assert stale[1].messages == same
    assert [c.key for c in await store.to_reembed(E, ("", "legacy"), 10)] == [("", "old")]
    await store.set_embeddings(E, [(("", "old"), unit(0, 1)), (("", "mine"), unit(0, 1))])
    got = (await store.get_call("", "old")).record
    assert got.embedder == E and np.allclose(got.embedding, unit(0, 1), atol=1e-6)
    assert np.allclose((await store.get_call("", "mine")).record.embedding, unit(1, 0.4), atol=1e-6)
    assert [c.key for c in await store.to_reembed(E, None, 10)] == [("", "legacy")]
    near = await store.neighbours(unit(0, 1), 1, since, -1, embedder=E)
    assert [n.request_id for n in near] == ["old"]  # re-embedded: now found, by its new vector


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
    assert await store.get_call("", "0") is None and await store.get_call("", "4") is not None
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
    me, others = await store.pair_candidates("", "me", similarity=0.99, embedder=E)
    assert me is not None and me.response == "answer one" and me.score == 0.5
    assert {o.id for o in others} == {"other", "near"}
    assert next(o for o in others if o.id == "near").similarity == pytest.approx(
        float(unit(1, 0.1) @ unit(1, 0)), abs=1e-5
    )
    assert (await store.pair_candidates("", "placeholder", 0.99, embedder=E)) == (None, [])
    assert (await store.pair_candidates("", "unrated", 0.99, embedder=E)) == (None, [])


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
    assert await store.delete_pair("", "a", "b") is True and await store.delete_pair("", "b", "a") is False
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
    assert {n.model for n in await store.neighbours(q, 3, since, 0.0, embedder=E)} == {"m1"}
    found = await store.neighbours(q, 2, since, 0.0, per_model=["m1", "m2"], embedder=E)
    assert sorted(n.request_id for n in found) == ["a0", "a1", "b0", "b1"]
    assert [n.similarity for n in found] == sorted((n.similarity for n in found), reverse=True)
    assert {
        n.request_id for n in await store.neighbours(q, 2, since, 0.96, per_model=["m1", "m2"], embedder=E)
    } == {
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


async def test_calls_of_a_window_are_each_tenants_own(store):
    now = utcnow()
    t = now - timedelta(minutes=5)
    # the same request id under two keys, at the same time: two calls, each with its own ratings
    await store.write_calls(
        [
            call("r", created_at=t, caller="key_b", model="m2"),
            call("r", created_at=t, caller="key_a"),
            call("s", created_at=t + timedelta(seconds=1), caller="key_a"),
        ]
    )
    await store.add_feedback(Feedback("r", 0.9, caller="key_a"))
    await store.add_feedback(Feedback("r", 0.1, caller="key_b"))
    since, until = now - timedelta(hours=1), now
    every = [c async for c in store.iter_calls(since, until, page=1)]
    assert [(c.record.caller, c.record.id) for c in every] == [("key_a", "r"), ("key_b", "r"), ("key_a", "s")]
    assert [c.score for c in every] == [0.9, 0.1, None]
    assert [[f.score for f in c.feedback] for c in every] == [[0.9], [0.1], []]
    mine = [c async for c in store.iter_calls(since, until, caller="key_b")]
    assert [(c.record.id, c.record.model, c.score) for c in mine] == [("r", "m2", 0.1)]
    assert [c async for c in store.iter_calls(since, until, caller="key_c")] == []


# --- the dashboard's reads (CallInsights, PairInsights)

HOUR = timedelta(hours=1)


async def seeded(store) -> datetime:
    """Calls over three hours, by two keys and three models; some rated, some failed, a duel."""
    t = utcnow().replace(minute=30, second=0, microsecond=0) - 3 * HOUR
    await store.write_calls(
        [
            call(
                "a1",
                created_at=t,
                caller="key_a",
                layer="bandit",
                cost_usd=0.01,
                overhead_ms=1.0,
                upstream_ms=100.0,
                decision={"explored": True},
                trace_id="ab" * 16,
                messages=[{"role": "user", "content": "How do I bake SOURDOUGH bread?"}],
            ),
            call(
                "a2",
                created_at=t + 10 * MINUTE,
                caller="key_a",
                layer="bandit",
                cost_usd=0.02,
                overhead_ms=2.0,
                upstream_ms=200.0,
                messages=[
                    {"role": "system", "content": "be brief"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "x"}},
                            {"type": "text", "text": "what is 100% of 5_0?"},
                        ],
                    },
                ],
            ),
            call(
                "a3",
                created_at=t + HOUR,
                caller="key_b",
                model="m2",
                layer="explicit",
                cost_usd=0.5,
                overhead_ms=3.0,
                upstream_ms=300.0,
            ),
            call(
                "a4",
                created_at=t + HOUR + MINUTE,
                caller="key_b",
                model="m2",
                layer="keyword",
                status="error",
                http_status=502,
                cost_usd=None,
                upstream_ms=None,
                overhead_ms=4.0,
            ),
            call(
                "a5",
                created_at=t + 2 * HOUR,
                caller="key_a",
                model="m3",
                layer="bandit",
                cost_usd=0.04,
                overhead_ms=5.0,
                upstream_ms=500.0,
            ),
            call(
                "a5:duel",
                created_at=t + 2 * HOUR,
                caller="key_a",
                model="m1",
                kind="duel",
                duel_of="a5",
                cost_usd=1.0,
            ),
            call("old", created_at=t - 5 * DAY, caller="key_a", cost_usd=7.0),
        ]
    )
    await store.add_feedback(Feedback("a1", 0.9, caller="key_a"))
    await store.add_feedback(Feedback("a3", 0.2, caller="key_b"))
    await store.add_feedback(Feedback("a3", 0.4, caller="key_b"))  # re-rated: the latest counts
    return t


MINUTE = timedelta(minutes=1)


async def test_list_calls_filters_pages_and_previews(store):
    t = await seeded(store)
    ids = lambda rows: [r.id for r in rows]  # noqa: E731
    everything = await store.list_calls(CallQuery())
    assert ids(everything) == ["a5:duel", "a5", "a4", "a3", "a2", "a1", "old"]  # newest first, then id
    assert ids(await store.list_calls(CallQuery(since=t - HOUR, kind="call"))) == [
        "a5",
        "a4",
        "a3",
        "a2",
        "a1",
    ]
    assert ids(await store.list_calls(CallQuery(until=t + HOUR))) == ["a2", "a1", "old"]
    assert ids(await store.list_calls(CallQuery(caller="key_b"))) == ["a4", "a3"]
    assert ids(await store.list_calls(CallQuery(model="m2", status="error"))) == ["a4"]
    assert ids(await store.list_calls(CallQuery(layer="bandit"))) == ["a5", "a2", "a1"]
    assert ids(await store.list_calls(CallQuery(rated=True))) == ["a3", "a1"]
    assert "a1" not in ids(await store.list_calls(CallQuery(rated=False)))
    assert ids(await store.list_calls(CallQuery(text="sourdough"))) == ["a1"]  # case-insensitive
    assert ids(await store.list_calls(CallQuery(text="100% of 5_0"))) == ["a2"]  # % and _ are literal
    assert ids(await store.list_calls(CallQuery(text="100%% of"))) == []
    assert ids(await store.list_calls(CallQuery(text="be brief"))) == ["a2"]  # any message
    assert ids(await store.list_calls(CallQuery(id="ab" * 16))) == ["a1"]  # a trace id
    assert ids(await store.list_calls(CallQuery(id="a3"))) == ["a3"]
    # paged: a cursor from the last row of a page
    first = await store.list_calls(CallQuery(limit=3))
    second = await store.list_calls(CallQuery(limit=3, before=first[-1].cursor))
    third = await store.list_calls(CallQuery(limit=3, before=second[-1].cursor))
    assert ids(first) + ids(second) + ids(third) == ids(everything)
    rows = {r.id: r for r in everything}
    assert rows["a1"].preview == "How do I bake SOURDOUGH bread?"
    assert rows["a2"].preview == "what is 100% of 5_0?"  # the last message's first text part
    assert (rows["a1"].score, rows["a3"].score, rows["a2"].score) == (0.9, 0.4, None)
    assert (rows["a1"].trace_id, rows["a1"].caller, rows["a1"].cost_usd) == ("ab" * 16, "key_a", 0.01)
    assert rows["a4"].status == "error" and rows["a4"].http_status == 502
    long = call("long", messages=[{"role": "user", "content": "x" * 1000}])
    await store.write_calls([long])
    assert len((await store.list_calls(CallQuery(id="long")))[0].preview) == 200


async def test_call_buckets_and_latency_over_a_window(store):
    t = await seeded(store)
    hour0 = t.replace(minute=0)
    window = Window(t - HOUR, t + 3 * HOUR, "hour")
    rows = {(r.bucket, r.model): r for r in await store.call_buckets(window)}
    assert set(rows) == {
        (hour0, "m1"),
        (hour0 + HOUR, "m2"),
        (hour0 + 2 * HOUR, "m1"),
        (hour0 + 2 * HOUR, "m3"),
    }
    first = rows[(hour0, "m1")]
    assert (first.requests, first.errors, first.routed, first.explored, first.rated) == (2, 0, 2, 1, 1)
    assert first.score_sum == pytest.approx(0.9) and first.cost_usd == pytest.approx(0.03)
    second = rows[(hour0 + HOUR, "m2")]
    assert (second.requests, second.errors, second.routed, second.rated) == (2, 1, 1, 1)
    assert second.score_sum == pytest.approx(0.4) and second.cost_usd == pytest.approx(0.5)
    duel = rows[(hour0 + 2 * HOUR, "m1")]  # a duel's cost is spent, but it is no client request
    assert (duel.requests, duel.cost_usd, duel.side_cost_usd) == (0, 0.0, pytest.approx(1.0))
    days = await store.call_buckets(Window(t - 10 * DAY, t + DAY, "day"))
    assert sum(r.requests for r in days) == 6 and {r.bucket.hour for r in days} == {0}
    mine = await store.call_buckets(Window(t - HOUR, t + 3 * HOUR, "hour", caller="key_b"))
    assert {r.model for r in mine} == {"m2"}
    lat = await store.latency(window)
    assert lat.answered == 4  # ok client calls with both times
    assert lat.latency_p50_ms == pytest.approx(float(np.percentile([101, 202, 303, 505], 50)))
    assert lat.latency_p99_ms == pytest.approx(float(np.percentile([101, 202, 303, 505], 99)))
    assert lat.overhead_p50_ms == pytest.approx(2.5) and lat.overhead_p99_ms == pytest.approx(
        float(np.percentile([1, 2, 3, 5], 99))
    )
    empty = await store.latency(Window(t + DAY, t + 2 * DAY))
    assert empty.answered == 0 and empty.latency_p50_ms is None


async def test_pair_buckets_and_a_calls_pairs(store):
    await store.write_calls([call(c) for c in ("a", "b", "c", "d")])
    await store.save_pair(pair("a", "b", 1.0, 0.0))
    await store.save_pair(pair("c", "a", 0.9, 0.1))
    await store.save_pair(pair("c", "d", 0.6, 0.3))
    now = utcnow()
    buckets = await store.pair_buckets(Window(now - DAY, now + HOUR, "hour"))
    assert [b.pairs for b in buckets] == [3] and buckets[0].bucket == now.replace(
        minute=0, second=0, microsecond=0
    )
    assert await store.pair_buckets(Window(now + HOUR, now + 2 * HOUR)) == []
    assert [(p.chosen_id, p.rejected_id) for p in await store.pairs_of("", "a")] == [("a", "b"), ("c", "a")]
    assert [p.chosen_id for p in await store.pairs_of("", "d")] == ["c"]
    assert await store.pairs_of("", "nobody") == []
    assert await store.pairs_of("key_other", "a") == []  # another tenant's "a" has no pairs


async def test_tenants_have_their_own_ids_ratings_neighbours_and_pairs(store):
    same = [{"role": "user", "content": "the same question"}]
    a = call("x", model="m1", caller="key_a", embedding=unit(1, 0), messages=same, response="a says")
    b = call("x", model="m2", caller="key_b", embedding=unit(1, 0), messages=same, response="b says")
    b2 = call("y", model="m3", caller="key_b", embedding=unit(1, 0), messages=same, response="b again")
    assert await store.write_calls([a, b, b2]) == 3  # one id, two tenants: two calls
    assert await store.write_calls([b]) == 0
    assert (await store.get_call("key_a", "x")).record.model == "m1"
    assert (await store.get_call("key_b", "x")).record.model == "m2"
    assert (await store.get_call(None, "x")) is not None  # the admin: any tenant's
    with pytest.raises(NotFound):
        await store.add_feedback(Feedback("y", 0.5, caller="key_a"))  # b's id, a's key
    await store.add_feedback(Feedback("x", 0.9, caller="key_a"))
    await store.add_feedback(Feedback("x", 0.1, caller="key_b"))
    await store.add_feedback(Feedback("y", 0.8, caller="key_b"))
    assert (await store.get_call("key_b", "x")).score == 0.1
    assert (await store.get_call("key_a", "x")).score == 0.9
    ratings = await store.tenant_ratings()
    assert ratings["m1"] == {"key_a": (1, 0.9)} and ratings["m2"] == {"key_b": (1, 0.1)}
    since = utcnow() - 30 * DAY
    near = await store.neighbours(unit(1, 0), 10, since, 0.0, caller="key_a", embedder=E)
    assert [(n.request_id, n.model) for n in near] == [("x", "m1")]
    assert (
        len(await store.neighbours(unit(1, 0), 10, since, 0.0, ["m1", "m2", "m3"], "key_b", embedder=E)) == 2
    )
    embeddings = await store.embeddings_of([("key_a", "x"), ("key_b", "y"), ("key_c", "x")], E)
    assert set(embeddings) == {("key_a", "x"), ("key_b", "y")}
    me, others = await store.pair_candidates("key_b", "x", 0.97, embedder=E)
    assert me is not None and [o.id for o in others] == ["y"]  # not a's "x", though the same prompt
    me, others = await store.pair_candidates("key_a", "x", 0.97, embedder=E)
    assert me is not None and others == []
    rated = {r.key for r in await store.rated_since(since, 100)}
    assert rated == {("key_a", "x"), ("key_b", "x"), ("key_b", "y")}
