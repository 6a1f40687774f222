"""HCTS's default dial over many policy seeds, without the HTTP round trips (issue 12).

One lab `--seed` fixes the prompt order and the feedback mask, not the policy's own random draws,
and HCTS's runs spread widely over those (a point of score is worth ~30 points of cost near the
top of routerbench_dev). This drives HCTS's core as the gateway does - the lab's embeddings (the
configured EMBEDDER, cached in DATA_DIR/lab-cache, made by a first `llm-router replay` with the
same --data-dir), each arm's pre-call cost estimate as the lab's non-contextual baseline computes
it, every call observed with its realised cost, the rated calls with their score, re-clustering
inline - for several policy seeds per lab seed, and prints for each run the second half's score
and cost shares of the best single model, the lift over the zero router, and the decision's p50
(as the gateway decides: the propensities, computed while the call is upstream, not in it).
A record's `task` is never read.

`--restart-at F` restarts the gateway at that share of the stream: by default from what it saved
when it stopped (ROUTER_STATE_KEEP: `hcts_state.save` and `load`, through a file), with
`--restart-from store` as without that state (a crash, a new replica): a new policy that reads the
rated calls back as `HctsPolicy.sync` does (the calls' costs, the unrated prompts and the dial's
multiplier are not in the store's ratings).

  python bench/hcts_seeds.py FILE --lab-seeds 0 1 2 --policy-seeds 1 2 3 4 --data-dir DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gateway.lab import baselines
from gateway.lab.commands import _prepare
from gateway.lab.fit import unit_rows
from gateway.lab.frontier import point, zero_router
from gateway.lab.report import Trace
from gateway.lab.runner import Options, lab_settings, trace_of
from gateway.routing import hcts_state
from gateway.routing.bandit import Knobs
from gateway.routing.hcts import Hcts
from gateway.routing.hcts_model import HctsKnobs
from gateway.routing.hcts_policy import chat_arms, default_dial
from gateway.routing.stats import ArmStatsCache


def second_half(trace: Trace) -> Trace:
    half = len(trace.picks) // 2
    return dataclasses.replace(
        trace, picks=trace.picks[half:], scores=trace.scores[half:], costs=trace.costs[half:]
    )


def restarted(core: Hcts, arms: list[str]) -> Hcts:
    """The policy a gateway saves when it stops and loads when it starts again."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "router_state.live.npz"
        hcts_state.save(core, arms, path, compress=False)
        loaded = hcts_state.load(path, arms, core.default, inline=True)
    assert loaded is not None
    return loaded


def run(
    file: str,
    lab_seed: int,
    policy_seeds: list[int],
    data_dir: Path,
    feedback: float = 1.0,
    knobs: HctsKnobs | None = None,
    restart_at: float | None = None,
    restart_from: str = "state",
) -> list[tuple[float, float, float]]:
    options = Options(store="memory", seed=lab_seed, data_dir=data_dir, feedback_rate=feedback)
    data, order, mask, _, vectors, _ = _prepare(file, options, [options])
    settings = lab_settings(data, options, None)
    x_all = unit_rows(vectors)
    best = baselines.best_single(data)
    zero = zero_router(data, order, best)
    best_trace = second_half(baselines.single(data, order, best, "best"))
    out = []
    for seed in policy_seeds:
        cache = ArmStatsCache(settings.models, Knobs.from_settings(settings))
        arms, prior = chat_arms(settings)
        core = Hcts(len(arms), x_all.shape[1], seed, knobs, dial=default_dial(settings), prior=prior)
        picks, timings, rated = [], [], []
        for t, i in enumerate(order):
            record, x = data.records[i], x_all[i]
            if restart_at is not None and t == int(restart_at * len(order)):
                if restart_from == "state":
                    core = restarted(core, arms)
                else:
                    core = Hcts(
                        core.k, core.dim, seed + 10_000, knobs, dial=default_dial(settings), prior=prior
                    )
                    for xr, arm, score in rated:
                        core.observe_rating(
                            xr, arm, score, None, None, core.observe_call(None, xr, arm, None)
                        )
            costs = np.array([v.cost_usd for v in cache.views(arms, baselines._context(record, t))])
            t0 = time.perf_counter()
            # lazy, as the gateway decides: the propensities are filled by observe_call (the
            # gateway computes them while the call is upstream); the picks are the same
            pick = core.choose(x, None, costs, lazy=True)
            timings.append(time.perf_counter() - t0)
            model = arms[pick.arm]
            core.observe_call(pick.ticket, x, pick.arm, data.cost(record, model))
            baselines._book_call(cache, data, record, model)
            if mask[t]:
                core.observe_rating(x, pick.arm, record.outcomes[model].score, ticket=pick.ticket)
                rated.append((x, pick.arm, record.outcomes[model].score))
            picks.append(model)
        cost, score = point(second_half(trace_of("auto", data, order, picks, {})), best_trace)
        lift = score - zero.at(cost)
        out.append((score, cost, lift))
        print(
            f"{data.name} lab seed {lab_seed} policy seed {seed}: score {100 * score:.1f} % "
            f"cost {100 * cost:.1f} % lift {100 * lift:+.1f} (lam {core.dial().lam:.3g}, reference "
            f"{core.ref.emax:.3f}; decision p50 {1000 * float(np.median(timings)):.3f} ms)",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--lab-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--policy-seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--data-dir", type=Path, default=Path("./data"))
    ap.add_argument("--feedback", type=float, default=1.0, help="share of calls rated (the lab's --feedback)")
    ap.add_argument("--restart-at", type=float, help="restart the gateway at this share of the stream")
    ap.add_argument("--restart-from", choices=["state", "store"], default="state", help="see above")
    ap.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE", help="an HCTS knob")
    args = ap.parse_args()
    knobs = HctsKnobs()
    for kv in args.knob:
        name, _, value = kv.partition("=")
        now = getattr(knobs, name)
        parsed = tuple(int(v) for v in value.split(",") if v) if isinstance(now, tuple) else type(now)(value)
        knobs = dataclasses.replace(knobs, **{name: parsed})
    rows = [
        r
        for s in args.lab_seeds
        for r in run(
            args.file,
            s,
            args.policy_seeds,
            args.data_dir,
            args.feedback,
            knobs,
            args.restart_at,
            args.restart_from,
        )
    ]
    scores = [100 * r[0] for r in rows]
    print(
        f"{len(rows)} runs: score {statistics.mean(scores):.1f} % (sd {statistics.pstdev(scores):.1f}; "
        f"{sum(93 <= s <= 97 for s in scores)} within 95 +/- 2), cost "
        f"{100 * statistics.mean(r[1] for r in rows):.1f} %, "
        f"lift {100 * statistics.mean(r[2] for r in rows):+.2f} "
        f"(lowest {100 * min(r[2] for r in rows):+.1f})"
    )


if __name__ == "__main__":
    main()
