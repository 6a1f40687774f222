"""The shared limiter's cost: the same gateway (explicit model, persistence off) with no limits, with
limits and a budget counted in process, and with them counted in Valkey (REDIS_URL), measured side
by side against direct calls to a fake upstream in alternating rounds, on this machine.

Each limited call goes through the whole path: a virtual key with its own RPM, TPM and a daily
budget; the chat's admission (one request, its tokens and its estimated cost against the budget,
in one operation once routed, the figures read for the headers) and, after the answer, the
settlement (which rides the next admission). With Valkey that is one round trip before the
upstream; a key without a budget ("rpm/tpm only") is admitted before routing, also in one.

  python bench/limits.py                 # about 1 minute: c=1 and c=32
  python bench/limits.py --n1 3000 --n32 20000

Targets (issue 16): the shared limiter adds at most 0.3 ms at p50 at c=1, and keeps at least 80% of
the in-process requests/s at c=32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.overhead import PY, Proc, Result, chat_body, cpu_seconds, free_port, gateway  # noqa: E402
from tests.valkey import Valkey  # noqa: E402

Target = tuple[str, dict[str, str], int | None]  # url, headers, pid


async def one(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], res: Result | None
):
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            raw = await resp.read()
            t1 = time.perf_counter()
            if res is None:
                return
            if resp.status != 200 or b'"choices"' not in raw:
                res.errors += 1
                res.samples.append(f"HTTP {resp.status}: {raw[:200]!r}")
                return
            res.lat.append((t1 - t0) * 1000)
    except Exception as exc:
        if res is not None:
            res.errors += 1
            res.samples.append(f"{type(exc).__name__}: {exc}")


async def block(target: Target, n: int, c: int, res: Result | None, start: int) -> None:
    url, headers, pid = target
    body = chat_body("m0")
    connector = aiohttp.TCPConnector(limit=c, limit_per_host=c)
    hdrs = {"content-type": "application/json", **headers}
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(one(session, url, body(start + i), hdrs, None) for i in range(c)))
        counter = iter(range(start + c, start + c + n))
        cpu0 = cpu_seconds(pid) if pid else 0.0
        t0 = time.perf_counter()

        async def worker() -> None:
            for i in counter:
                await one(session, url, body(i), hdrs, res)

        await asyncio.gather(*(worker() for _ in range(c)))
        if res is not None:
            res.wall += time.perf_counter() - t0
            if pid:
                res.cpu += cpu_seconds(pid) - cpu0


async def side_by_side(targets: dict[str, Target], n: int, c: int, rounds: int = 6) -> dict[str, Result]:
    results = {name: Result() for name in targets}
    for target in targets.values():
        await block(target, 100, c, None, 10_000_000)
    offset = 0
    for r in range(rounds):
        names = list(targets)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            await block(targets[name], n // rounds, c, results[name], offset)
            offset += n // rounds + c
    return results


def new_key(port: int, budget: bool = True) -> str:
    import urllib.request

    body: dict[str, Any] = {"owner": "bench", "rpm": 100_000_000, "tpm": 2_000_000_000}
    if budget:
        body["budget_day_usd"] = 1_000_000
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/keys",
        data=orjson.dumps(body),
        headers={"Authorization": "Bearer sk-bench-admin", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        return str(json.loads(resp.read())["key"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n1", type=int, default=1200, help="requests per target at concurrency 1")
    ap.add_argument("--n32", type=int, default=6000, help="requests per target at concurrency 32")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-router-bench-limits-"))
    up_port = free_port()
    upstream = Proc(
        "upstream", [PY, "-m", "tests.fake_upstream", "--port", str(up_port)], up_port, log_dir=work
    )
    valkey = Valkey(work / "valkey").start()
    models = [
        {
            "name": "m0",
            "provider": "openai_compatible",
            "base_url": f"http://127.0.0.1:{up_port}/v1",
            "input_usd_per_mtok": 0.2,
            "output_usd_per_mtok": 0.4,
        }
    ]
    base = {"models": models, "log_level": "warning", "enable_persistence": False, "router_policy": "default"}
    keyed = {**base, "require_api_keys": True, "admin_api_key": "sk-bench-admin"}
    report: dict[str, Any] = {}
    table: list[str] = []
    try:
        upstream.wait_ready("/v1/models")
        with (
            gateway("none", base, work) as plain,
            gateway("local", keyed, work) as local,
            gateway("redis", {**keyed, "redis_url": valkey.url}, work) as shared,
        ):
            direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"

            def url(p: Proc) -> str:
                return f"http://127.0.0.1:{p.port}/v1/chat/completions"

            targets: dict[str, Target] = {
                "direct": (direct, {}, None),
                "no limits": (url(plain), {}, plain.pid),
                "in-process": (url(local), {"Authorization": f"Bearer {new_key(local.port)}"}, local.pid),
                "redis": (url(shared), {"Authorization": f"Bearer {new_key(shared.port)}"}, shared.pid),
                "redis, rpm/tpm only": (
                    url(shared),
                    {"Authorization": f"Bearer {new_key(shared.port, budget=False)}"},
                    shared.pid,
                ),
            }
            for c, n in ((1, args.n1), (32, args.n32)):
                res = {k: v.summary() for k, v in asyncio.run(side_by_side(targets, n, c)).items()}
                report[f"c{c}"] = res
                d = res["direct"]
                for name in ("no limits", "in-process", "redis", "redis, rpm/tpm only"):
                    g = res[name]
                    line = (
                        f"c={c:<2} {name:<19} p50 {g['p50_ms']:7.3f} p99 {g['p99_ms']:7.3f}  added p50 "
                        f"{g['p50_ms'] - d['p50_ms']:6.3f}  rps {g['rps']:7.1f}  "
                        f"CPU {g.get('cpu_ms_per_request', 0):.3f} ms/req  errors {g['errors']}"
                    )
                    table.append(line)
                    print(line, flush=True)
            c1, c32 = report["c1"], report["c32"]
            report["shared_added_p50_ms_c1"] = round(c1["redis"]["p50_ms"] - c1["in-process"]["p50_ms"], 3)
            report["limits_added_p50_ms_c1"] = round(
                c1["in-process"]["p50_ms"] - c1["no limits"]["p50_ms"], 3
            )
            report["shared_rps_share_c32"] = round(c32["redis"]["rps"] / c32["in-process"]["rps"], 3)
            line = (
                f"shared limiter: added p50 at c=1 {report['shared_added_p50_ms_c1']:+.3f} ms vs in-process "
                f"(target <= 0.3); rps at c=32 {report['shared_rps_share_c32']:.0%} of in-process "
                f"(target >= 80%); in-process limits vs none: {report['limits_added_p50_ms_c1']:+.3f} ms"
            )
            table.append(line)
            print(line, flush=True)
    finally:
        upstream.stop()
        valkey.stop()
    print("\n".join(["", "summary", *table]))
    print(json.dumps(report, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
