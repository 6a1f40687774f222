"""Virtual keys through one gateway: issued, used, rotated and revoked through the admin API and
the CLI, stored as a hash only; their models, own limits and budgets; spend per day and model;
OpenAI's x-ratelimit-* headers on every answer."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.domain import utcnow
from tests.conftest import make_settings, model, query, wait_for
from tests.test_errors import assert_openai_error

USER = [{"role": "user", "content": "hi"}]
ADMIN = {"Authorization": "Bearer sk-admin"}


def _settings(fake: Any, dsn: str | None = None, **kw: Any) -> Any:
    models = [
        model("cheap", fake.url()),
        model("paid", fake.url(), input_usd_per_mtok=1000.0, output_usd_per_mtok=1000.0),  # $0.001 a token
    ]
    extra: dict[str, Any] = {"require_api_keys": True, "admin_api_key": "sk-admin", **kw}
    if dsn is not None:
        extra.update(enable_persistence=True, database_url=dsn)
    return make_settings(models, virtual_models={"auto-cheap": {"strategy": "cost_optimized"}}, **extra)


def create(gw: Any, **body: Any) -> dict[str, Any]:
    resp = httpx.post(gw.url + "/v1/keys", json={"owner": "acme", **body}, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return resp.json()


def chat(gw: Any, key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": "cheap", "messages": USER, **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_issue_use_rotate_revoke_with_only_a_hash_stored(fake, gateway, dsn):
    gw = gateway(_settings(fake, dsn))
    assert_openai_error(httpx.post(gw.url + "/v1/keys", json={"owner": "acme"}), 401)
    made = create(gw, name="ci", models=["cheap", "auto"])
    secret, key_id = made["key"], made["id"]
    assert secret.startswith("sk-lr-") and len(secret) > 40 and made["status"] == "active"
    assert "key_hash" not in made
    rows = query(dsn, "SELECT * FROM api_keys")
    assert len(rows) == 1 and rows[0]["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert all(secret not in str(v) for v in dict(rows[0]).values())  # the secret is nowhere
    listed = httpx.get(gw.url + "/v1/keys", headers=ADMIN).json()["data"]
    assert [k["id"] for k in listed] == [key_id] and "key" not in listed[0] and "key_hash" not in listed[0]

    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=secret, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="cheap", messages=USER)  # type: ignore[arg-type]
    rid = raw.headers["x-request-id"]
    gw.call(gw.services.recorder.flush())
    row = query(dsn, "SELECT caller, key_id FROM calls WHERE id = $1", rid)[0]
    assert row["key_id"] == key_id and row["caller"] == "acme"  # the key's own; its owner's tenant
    own = httpx.get(f"{gw.url}/v1/keys/{key_id}", headers={"Authorization": f"Bearer {secret}"})
    assert own.status_code == 200 and own.json()["owner"] == "acme"  # a key may read itself

    rotated = httpx.post(f"{gw.url}/v1/keys/{key_id}/rotate", headers=ADMIN).json()
    assert rotated["id"] == key_id and rotated["key"] != secret
    assert_openai_error(chat(gw, secret), 401, "invalid_api_key")  # the old secret: at once, here
    assert chat(gw, rotated["key"]).status_code == 200
    # the key's calls stay its own across the rotation
    mine = httpx.get(f"{gw.url}/requests/{rid}", headers={"Authorization": f"Bearer {rotated['key']}"})
    assert mine.status_code == 200
    revoked = httpx.delete(f"{gw.url}/v1/keys/{key_id}", headers=ADMIN).json()
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    assert_openai_error(chat(gw, rotated["key"]), 401, "key_revoked")
    assert_openai_error(httpx.post(f"{gw.url}/v1/keys/{key_id}/rotate", headers=ADMIN), 400, "key_revoked")
    assert_openai_error(httpx.get(f"{gw.url}/v1/keys/vk_0000000000000000", headers=ADMIN), 404)


def test_bad_key_requests_and_expiry(fake, gateway):
    gw = gateway(_settings(fake))  # the in-memory store holds keys too
    for body, param in (
        ({"owner": ""}, "owner"),
        ({"owner": "a", "models": ["nope"]}, "models"),
        ({"owner": "a", "rpm": -1}, "rpm"),
        ({"owner": "a", "budget_day_usd": 0}, "budget_day_usd"),
        ({"owner": "a", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"owner": "a", "colour": "red"}, "colour"),
    ):
        err = assert_openai_error(httpx.post(gw.url + "/v1/keys", json=body, headers=ADMIN), 400)
        assert err["param"] == param
    made = create(gw)
    assert chat(gw, made["key"]).status_code == 200
    store, directory = gw.services.store, gw.services.directory
    key = gw.call(store.find_key(key_id=made["id"]))
    gw.call(store.save_key(replace(key, expires_at=utcnow() - timedelta(seconds=1))))
    directory.forget(made["id"])
    assert_openai_error(chat(gw, made["key"]), 401, "key_expired")
    assert_openai_error(chat(gw, "sk-lr-" + "x" * 43), 401, "invalid_api_key")
    other = create(gw)
    assert_openai_error(  # another key's record does not exist for it
        httpx.get(
            f"{gw.url}/v1/keys/{made['id']}/spend", headers={"Authorization": f"Bearer {other['key']}"}
        ),
        401,
    )


def test_a_key_uses_only_its_models(fake, gateway):
    gw = gateway(_settings(fake))
    only_cheap = create(gw, models=["cheap"])["key"]
    err = assert_openai_error(chat(gw, only_cheap, model="paid"), 403, "model_not_allowed")
    assert err["param"] == "model" and "cheap" in err["message"]
    routed = chat(gw, only_cheap, model="auto", router={"models": ["paid", "cheap"]})
    assert routed.status_code == 200 and routed.headers["x-router-model"] == "cheap"  # never widened
    assert_openai_error(chat(gw, only_cheap, model="auto", router={"models": ["paid"]}), 403)
    virtual_only = create(gw, models=["auto-cheap"])["key"]
    assert chat(gw, virtual_only, model="auto-cheap").status_code == 200
    assert_openai_error(chat(gw, virtual_only, model="auto"), 403, "model_not_allowed")
    assert_openai_error(chat(gw, virtual_only, model="cheap"), 403, "model_not_allowed")


def test_own_limits_and_headers_on_every_answer(fake, gateway):
    gw = gateway(_settings(fake, rate_limit_rpm=100, max_body_bytes=1000))
    key = create(gw, rpm=4, tpm=1000)["key"]
    # max_tokens: a call holds its prompt and its most output against the key's 1,000 tokens
    answers = [chat(gw, key, max_tokens=50) for _ in range(2)]
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].headers["x-ratelimit-limit-requests"] == "4"
    assert answers[1].headers["x-ratelimit-remaining-requests"] == "2"
    assert answers[1].headers["x-ratelimit-limit-tokens"] == "1000"
    assert answers[1].headers["x-ratelimit-reset-requests"].endswith("s")
    # a bad request is an answer too
    auth = {"Authorization": f"Bearer {key}"}
    bad = httpx.post(gw.url + "/v1/chat/completions", content=b"{", headers=auth)
    assert_openai_error(bad, 400, "invalid_json")
    assert bad.headers["x-ratelimit-remaining-requests"] == "1"
    # refused by its content-length before the chat endpoint is reached: counted all the same
    huge = httpx.post(gw.url + "/v1/chat/completions", content=b" " * 2000, headers=auth)
    assert huge.status_code == 413 and huge.headers["x-ratelimit-remaining-requests"] == "0"
    limited = chat(gw, key, max_tokens=50)
    assert_openai_error(limited, 429, "rate_limit_exceeded")
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert 1 <= int(limited.headers["retry-after"]) <= 15
    unlimited = create(gw, rpm=0, tpm=0)["key"]
    free = chat(gw, unlimited)
    assert free.status_code == 200 and "x-ratelimit-limit-requests" not in free.headers


def test_a_budget_stops_spend_and_the_spend_is_reported(fake, gateway, dsn):
    gw = gateway(_settings(fake, dsn))
    made = create(gw, budget_day_usd=0.05, budget_total_usd=1.0)
    key, key_id = made["key"], made["id"]
    # "hi" is 4 prompt tokens and the fake answers 3: $0.007 a call, estimated exactly with max_tokens=3
    answers = [chat(gw, key, model="paid", max_tokens=3) for _ in range(7)]
    assert [a.status_code for a in answers] == [200] * 7
    assert answers[0].headers["x-ratelimit-limit-usd-day"] == "0.05"
    assert float(answers[-1].headers["x-ratelimit-remaining-usd-day"]) == pytest.approx(0.001, abs=1e-9)
    assert answers[-1].headers["x-ratelimit-reset-usd-day"].endswith("s")
    assert "x-ratelimit-reset-usd-total" not in answers[-1].headers  # a total budget never resets
    refused = chat(gw, key, model="paid", max_tokens=3)
    err = assert_openai_error(refused, 429, "budget_exceeded")
    assert err["type"] == "insufficient_quota" and "resets at" in err["message"]
    assert int(refused.headers["retry-after"]) <= 86_400
    # a free model still answers; a call with no max_tokens is estimated at BUDGET_DEFAULT_MAX_TOKENS
    assert chat(gw, key, model="cheap").status_code == 200
    assert_openai_error(chat(gw, key, model="paid"), 429, "budget_exceeded")
    # a stream is settled at its end, with the usage the upstream reported
    with httpx.stream(
        "POST",
        gw.url + "/v1/chat/completions",
        json={"model": "paid", "messages": USER, "max_tokens": 3, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as stream:
        assert stream.status_code == 429  # the budget holds for streams as well
    spend = httpx.get(f"{gw.url}/v1/keys/{key_id}/spend", headers={"Authorization": f"Bearer {key}"}).json()
    assert spend["requests"] == 8 and spend["cost_usd"] == pytest.approx(0.049)
    (day,) = spend["days"]
    assert {m["model"]: m["requests"] for m in day["models"]} == {"paid": 7, "cheap": 1}
    assert {b["period"]: b["remaining_usd"] for b in spend["budgets"]} == pytest.approx(
        {"day": 0.001, "total": 0.951}
    )
    assert spend["budgets"][0]["resets_at"] and spend["budgets"][1]["resets_at"] is None
    assert httpx.get(f"{gw.url}/v1/keys/{key_id}/spend", headers=ADMIN).status_code == 200


def test_streams_are_settled_with_their_real_cost(fake, gateway):
    gw = gateway(_settings(fake))
    made = create(gw, budget_day_usd=0.02)
    key = made["key"]
    body = {"model": "paid", "messages": USER, "max_tokens": 8, "stream": True}
    for _ in range(2):  # estimated at $0.012, each costs $0.007 (the fake's usage): both fit
        with httpx.stream(
            "POST", gw.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            assert resp.status_code == 200
            assert b"[DONE]" in b"".join(resp.iter_bytes())
    spend = wait_for(
        lambda: (
            s
            if (s := httpx.get(f"{gw.url}/v1/keys/{made['id']}/spend", headers=ADMIN).json())["requests"] == 2
            else None
        )
    )
    assert spend["cost_usd"] == pytest.approx(0.014)
    assert_openai_error(chat(gw, key, model="paid", max_tokens=8), 429, "budget_exceeded")  # 0.014 + 0.012


def test_the_cli_manages_keys(fake, dsn, tmp_path):
    env = {"DATABASE_URL": dsn, "ENABLE_PERSISTENCE": "true", "RUN_MIGRATIONS": "false", "PATH": "/usr/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "keys", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = cli("create", "--owner", "acme", "--rpm", "5", "--budget-month", "20", "--expires-in-days", "30")
    assert made.returncode == 0, made.stderr
    key = orjson.loads(made.stdout)
    assert key["key"].startswith("sk-lr-") and key["rpm"] == 5 and key["budget_month_usd"] == 20
    assert "shown once" in made.stderr
    listed = cli("list")
    assert listed.returncode == 0 and key["key"] not in listed.stdout
    assert [orjson.loads(line)["id"] for line in listed.stdout.splitlines()] == [key["id"]]
    rotated = cli("rotate", key["id"])
    assert rotated.returncode == 0 and orjson.loads(rotated.stdout)["key"] != key["key"]
    assert cli("revoke", key["id"]).returncode == 0
    assert cli("list").stdout == "" and key["id"] in cli("list", "--all").stdout
    missing = cli("revoke", "vk_0000000000000000")
    assert missing.returncode == 1 and "no key" in missing.stderr and "Traceback" not in missing.stderr
    bad = cli("create", "--owner", "acme", "--rpm", "-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    memory = subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "list"],
        cwd=tmp_path,
        env={**env, "ENABLE_PERSISTENCE": "false"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert memory.returncode == 1 and "/v1/keys" in memory.stderr
