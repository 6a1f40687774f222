"""Versioned embeddings across a change of EMBEDDER (issue 13): a gateway never uses another
embedder's stored vectors, and `llm-router reembed` brings the stored rated calls to the current one."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import httpx
import numpy as np

from gateway.domain import utcnow
from gateway.embedders import distil, minilm
from gateway.embedders.minilm import MiniLMEmbedder
from gateway.store.postgres import postgres_store
from tests.conftest import make_settings, model, query, run_async

PROMPTS = [
    "How do I reverse a linked list in Python?",
    "Write a SQL query that returns the ten largest orders.",
    "What is a good recipe for banana bread?",
    "Explain the difference between TCP and UDP.",
]


def _calls_and_ratings(gw) -> list[str]:
    ids = []
    for prompt in PROMPTS:
        body = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
        r = httpx.post(gw.url + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        ids.append(r.headers["x-request-id"])
    for rid in ids:
        assert httpx.post(gw.url + "/feedback", json={"request_id": rid, "score": 0.9}).status_code == 200
    return ids


async def _neighbours(dsn: str, vector: np.ndarray, embedder: str) -> list[str]:
    async with postgres_store(dsn) as store:
        found = await store.neighbours(vector, 10, utcnow() - timedelta(days=1), -1, embedder=embedder)
        return [n.request_id for n in found]


def test_reembed_brings_another_embedders_calls_to_the_current_one(
    fake, gateway, dsn, st_model, static_model, static_build
):
    # a gateway on MiniLM stores MiniLM's vectors, with MiniLM's id
    settings = make_settings(
        [model("m1", fake.url()), model("m2", fake.url())],
        enable_persistence=True,
        database_url=dsn,
        router_policy="knn_ts",
    )
    gw = gateway(settings, embedder=MiniLMEmbedder(st_model))
    ids = _calls_and_ratings(gw)
    gw.__exit__(None, None, None)
    rows = query(dsn, "SELECT id, embedder FROM calls WHERE score IS NOT NULL ORDER BY id")
    assert sorted(r[0] for r in rows) == sorted(ids) and {r[1] for r in rows} == {minilm.ID}

    # after a switch to the static embedder, none of them is a neighbour of a new request: they
    # live in MiniLM's space (even a prompt equal to a stored one finds nothing)
    q = static_model.encode([PROMPTS[0]])[0]
    assert run_async(_neighbours(dsn, q, distil.ID)) == []
    assert len(run_async(_neighbours(dsn, st_model.encode([PROMPTS[0]])[0], minilm.ID))) == 4

    # `llm-router reembed` (offline, like the build): every rated call gets the static vector
    env = {
        **static_build.env,
        "DATABASE_URL": dsn,
        "EMBEDDER": "static",
        "MODELS_DIR": str(static_build.models_dir),
    }
    cmd = [sys.executable, "-m", "gateway.cli", "reembed"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"re-embedded 4 rated calls with {distil.ID}" in proc.stdout
    rows = query(dsn, "SELECT embedder, embedding FROM calls WHERE score IS NOT NULL")
    assert {r[0] for r in rows} == {distil.ID}
    found = run_async(_neighbours(dsn, q, distil.ID))
    assert len(found) == 4 and found[0] == ids[0]  # the same prompt, now the nearest
    assert run_async(_neighbours(dsn, st_model.encode([PROMPTS[0]])[0], minilm.ID)) == []
    # run again: nothing left to do
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "re-embedded 0 rated calls" in proc.stdout, proc.stderr[-3000:]
