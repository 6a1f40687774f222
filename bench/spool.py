"""The durable spool's cost on the hot path: `Recorder.keep` (encode the record, one INSERT into the
spool's SQLite WAL; what every call does before its last byte) timed over a few thousand records,
for a plain call's record and for a routed one (embedding and candidates), with fsync=interval.

  python bench/spool.py [--n 3000] [--dir /tmp/spool-bench]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.domain import CallRecord, encode_record
from gateway.recorder import Recorder
from gateway.spool import Spool
from gateway.store.memory import MemoryStore


def plain(i: int) -> CallRecord:
    return CallRecord(
        id=f"bench-{i}",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        requested_model="m0",
        model="m0",
        status="ok",
        http_status=200,
        layer="explicit",
        response="Hello from m0.",
        prompt_tokens=20,
        completion_tokens=4,
        cost_usd=1e-6,
        decision={"fallbacks": []},
        attempts=[{"model": "m0", "outcome": "ok", "ms": 0.5}],
        upstream_model="m0-2026-01-01",
    )


def routed(i: int) -> CallRecord:
    rec = plain(i)
    rec.embedding = np.random.default_rng(i).random(384).astype(np.float32)
    rec.decision = {
        "candidates": [
            {
                "model": f"m{k}",
                "score": 0.5,
                "quality_sample": 0.5,
                "quality_mean": 0.5,
                "speed": 0.5,
                "cost": 0.1,
                "bonus": 0.0,
                "evidence": 1.0,
                "propensity": 0.3,
            }
            for k in range(3)
        ],
        "timings_ms": {"embed_ms": 5.0, "routing_ms": 6.0},
    }
    return rec


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(xs, p)) * 1e6


async def run(directory: Path, n: int) -> None:
    spool = Spool(directory)
    spool.open()
    try:
        async with Recorder(MemoryStore(), spool) as recorder:
            for i in range(200):  # warm up
                await recorder.keep(plain(i))
            for name, make in (("plain call", plain), ("routed call", routed)):
                keep, encode = [], []
                for i in range(n):
                    rec = make(10_000 + i)
                    t = time.perf_counter()
                    encode_record(rec)
                    encode.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    await recorder.keep(rec)
                    keep.append(time.perf_counter() - t)
                    await asyncio.sleep(0.001)  # calls arrive one at a time (c=1)
                print(
                    f"{name:<12} keep p50 {pct(keep, 50):6.1f} us  p90 {pct(keep, 90):6.1f} us  "
                    f"p99 {pct(keep, 99):7.1f} us   (of which encoding p50 {pct(encode, 50):5.1f} us)",
                    flush=True,
                )
    finally:
        spool.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--dir", help="the spool directory (default: a temporary one, removed)")
    args = ap.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="spool-bench-"))
    try:
        asyncio.run(run(directory, args.n))
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
