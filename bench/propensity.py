"""What computing every arm's propensity costs a routed request, and how accurate it is.

A routing policy is trained in memory on the first part of a replay file (the real `LinTSPolicy`
or `KnnTS` over the in-memory store, learning from the recorded score of each pick, as the lab's
replay does); for the next requests, the arms it saw (their real posteriors) are kept. Timed on
them, interleaved, best of 5 rounds, in CPU time:

  choose                the bandit's pick as it is now: no propensity work before the answer
  choose + resampling   the pick with the 256-draw resampling it used to do inline (the old hot path)
  resolve               the computed propensities, done after the answer is sent (Calls.finish)

The computed propensities are also checked against 2,000,000 draws of the same posteriors.

  python bench/propensity.py                         # routerbench_dev, 600 + 300 requests
  python bench/propensity.py --file ../shared/data/replay/llmrouter_dev.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.lab.runner import LAB_DEFAULTS, embeddings_for, stream_order  # noqa: E402
from gateway.providers.replay import ReplayData, load  # noqa: E402
from gateway.routing.bandit import ArmView, Knobs, choose  # noqa: E402
from gateway.routing.propensity import Propensities  # noqa: E402

DEFAULT_FILE = next(
    (
        p / "shared/data/replay/routerbench_dev.jsonl"
        for p in ROOT.parents
        if (p / "shared/data/replay").is_dir()
    ),
    ROOT.parent / "shared/data/replay/routerbench_dev.jsonl",
)


def resampled(
    posteriors: Any, fixed: np.ndarray, weight: float, eps: float, rng: Any = None, samples: int = 256
) -> Propensities:
    """The estimator `choose` used before: 256 draws of every posterior."""
    rng = rng if rng is not None else np.random.default_rng()
    k = len(posteriors)
    draws = np.stack([p.sample(rng, 256) for p in posteriors], axis=1)
    wins = np.bincount(np.argmax(weight * draws + fixed, axis=1), minlength=k) / 256
    return Propensities(eps / k + (1 - eps) * wins, 0.0, False)


async def collect(
    data: ReplayData, policy_name: str, train: int, test: int, seed: int
) -> list[list[ArmView]]:
    """Train the policy on `train` requests (feedback on every pick), then keep the arms it sees
    on the next `test` requests."""
    from gateway.config import load_settings
    from gateway.routing import RouteContext
    from gateway.routing.eligibility import eligible  # noqa: F401  (the router's own module)
    from gateway.routing.router import Router
    from gateway.store.memory import MemoryStore

    order = stream_order(len(data.records), "shuffle", seed, train + test)
    texts, vectors = embeddings_for(data, ROOT / "data" / "lab-cache", 1000, order)
    settings = load_settings(
        None,
        **{**LAB_DEFAULTS, "models": data.catalogue(), "default_model": data.models[0]},
        router_policy=policy_name,
        enable_persistence=False,
    )

    class Up:
        def is_available(self, name: str) -> bool:
            return True

        def why_unavailable(self, name: str) -> str | None:
            return None

        def in_flight(self, name: str) -> int:
            return 0

    class Vectors:
        async def embed(self, batch: list[str]) -> np.ndarray:
            return np.stack([vectors[by_text[t]] for t in batch])

    by_text = {texts[i]: i for i in order}
    store = MemoryStore()
    router = Router(settings, Up(), store=store, embedder=Vectors(), rng=np.random.default_rng(seed))
    await router.start()
    kept: list[list[ArmView]] = []
    from gateway.domain import CallRecord, Feedback

    for t, i in enumerate(order):
        rec = data.records[i]
        ctx = RouteContext(
            f"r{t}", "auto", rec.messages, prompt_tokens=sum(len(m["content"]) for m in rec.messages) // 4
        )
        if t >= train:
            views = router.arms.views(list(router.specs), ctx)
            emb = vectors[i]
            await router.policy.choose(views, emb, {})  # fills the posteriors in
            kept.append(views)
            continue
        decision = await router.decide(ctx)
        await store.write_calls(
            [
                CallRecord(
                    id=f"r{t}",
                    messages=rec.messages,
                    requested_model="auto",
                    model=decision.model,
                    status="ok",
                    http_status=200,
                    embedding=vectors[i],
                )
            ]
        )
        score = rec.outcomes[decision.model].score
        out = await store.add_feedback(Feedback(f"r{t}", score))
        router.observe_feedback(f"r{t}", decision.model, score, out.previous, vectors[i])
    return kept


def cpu(fn: Any) -> float:
    """CPU seconds of one call of `fn` (this machine is shared: wall time would count others)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def measure(sets: list[list[ArmView]], knobs: Knobs, rng: np.random.Generator) -> dict[str, Any]:
    n = len(sets)

    def picks() -> list[Any]:
        return [choose(views, knobs, rng) for views in sets]

    def old_picks() -> None:
        for views in sets:
            c = choose(views, knobs, rng)
            assert c.pending is not None
            p = c.pending
            resampled(p.posteriors, p.fixed, p.weight, p.eps, rng)

    timings: dict[str, list[float]] = {"choose": [], "choose_resampled": [], "resolve": []}
    for _ in range(5):  # interleaved rounds
        timings["choose"].append(cpu(picks))
        timings["choose_resampled"].append(cpu(old_picks))
        chosen = picks()
        timings["resolve"].append(cpu(lambda: [c.resolve() for c in chosen]))  # noqa: B023
    best = {k: min(v) / n * 1000 for k, v in timings.items()}
    errs, stated, contenders = [], [], []
    for views in sets[:40]:
        c = choose(views, knobs, rng)
        assert c.pending is not None
        p = c.pending
        m = 2_000_000
        draws = np.stack([post.sample(rng, m) for post in p.posteriors], axis=1)
        wins = np.bincount(np.argmax(p.weight * draws + p.fixed, axis=1), minlength=len(p.names)) / m
        ref = p.eps / len(p.names) + (1 - p.eps) * wins
        c.resolve()
        got = np.array([c.propensities[name] for name in p.names])
        errs.append(float(np.max(np.abs(got - ref))))
        stated.append(c.propensity_error)
        contenders.append(int((wins > 0).sum()))
    return {
        "requests": n,
        "choose_ms": round(best["choose"], 4),
        "choose_with_resampling_ms (before)": round(best["choose_resampled"], 4),
        "hot_path_change_ms": round(best["choose"] - best["choose_resampled"], 4),
        "resolve_after_answer_ms": round(best["resolve"], 4),
        "max_abs_error_vs_2M_draws": round(max(errs), 5),
        "draws_standard_error_at_p_0.5": round(float(np.sqrt(0.25 / 2_000_000)), 5),
        "median_stated_error": float(np.median(stated)),
        "max_stated_error": float(np.max(stated)),
        "median_arms_that_won_a_draw": float(np.median(contenders)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--file", default=str(DEFAULT_FILE))
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = load(args.file)
    knobs = Knobs.from_settings(type("S", (), {"latency_weight": 0.0})())
    x = np.zeros(10)
    calib = min(cpu(lambda: [np.add(x, 1) for _ in range(10_000)]) for _ in range(5)) / 10_000 * 1e6
    # a yardstick of this machine's speed at the time: one small numpy call
    results: dict[str, Any] = {"file": data.name, "numpy_add_us": round(calib, 3)}
    for policy in ("lin_ts", "knn_ts"):
        sets = asyncio.run(collect(data, policy, args.train, args.test, args.seed))
        row = measure(sets, knobs, np.random.default_rng(1))
        results[policy] = row
        print(f"{policy}: {json.dumps(row)}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
