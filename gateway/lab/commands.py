"""`llm-router replay` and `llm-router sweep`."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gateway.catalogue import STRATEGIES
from gateway.config import setting_key
from gateway.config_errors import ConfigError
from gateway.lab import frontier, plots
from gateway.lab.report import Trace, aiq, halves, model_shares, regret
from gateway.lab.runner import (
    Options,
    baseline_traces,
    embeddings_for,
    feedback_mask,
    lab_encoder,
    lab_settings,
    noncontextual_ts,
    objective,
    run_router,
    stream_order,
)
from gateway.providers import replay as replay_data
from gateway.routing.policies import POLICIES
from gateway.spelling import unknown

MODE = "http: a real gateway (uvicorn on 127.0.0.1) driven with model='auto', one request at a time"


def report_head(
    data: replay_data.ReplayData, order: list[int], options: Options, note: str = ""
) -> dict[str, Any]:
    """What every lab report starts with: the file, the records streamed, the mode and the options."""
    return {
        "file": str(data.path),
        "records": len(order),
        "mode": MODE + f"; store: {options.store}{note}",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
    }


def _out_dir(out: str | None, name: str, verb: str) -> Path:
    path = Path(out) if out else Path("out") / f"{verb}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _row(name: str, s: dict[str, dict[str, float]]) -> str:
    a, h = s["all"], s["second_half"]
    return (
        f"{name:<16} {a['mean_score']:7.4f} {a['mean_cost_usd']:11.3e} {_pct(a['score_share_of_best'])} "
        f"{_pct(a['cost_share_of_best'])} | {h['mean_score']:7.4f} {h['mean_cost_usd']:11.3e} "
        f"{_pct(h['score_share_of_best'])} {_pct(h['cost_share_of_best'])}"
    )


HEADER = (
    f"{'strategy':<16} {'score':>7} {'cost/call':>11} {'%best':>7} {'%cost':>7} | {'score':>7} "
    f"{'cost/call':>11} {'%best':>7} {'%cost':>7}\n{'':<16} {'(whole stream)':^35} | {'(second half)':^35}"
)


def _prepare(
    file: str, options: Options, runs: list[Options]
) -> tuple[Any, list[int], list[bool], list[str], np.ndarray, Any]:
    data = replay_data.load(file)
    for run in runs:  # a bad setting fails now, not after the runs before it
        lab_settings(data, run, None)
    order = stream_order(len(data.records), options.order, options.seed, options.limit)
    mask = feedback_mask(len(order), options.feedback_rate, options.seed)
    max_chars = int(options.overrides.get("embedding_max_chars", 1000))
    encoder = lab_encoder(data, options)
    texts, vectors = embeddings_for(data, options.data_dir / "lab-cache", max_chars, encoder, order)
    return data, order, mask, texts, vectors, encoder


def _run(
    data: Any,
    order: list[int],
    mask: list[bool],
    texts: list[str],
    vectors: np.ndarray,
    encoder: Any,
    options: Options,
    label: str,
) -> Trace:
    bar = tqdm(total=len(order), desc=label, unit=" req", leave=False)
    seen: dict[str, int] = {}

    def progress(t: int, model: str) -> None:
        seen[model] = seen.get(model, 0) + 1
        bar.update()
        if t % 50 == 0:
            top = max(seen, key=lambda m: seen[m])
            bar.set_postfix_str(f"top: {top.split('/')[-1]} {seen[top] / (t + 1):.0%}")

    try:
        with logging_redirect_tqdm():  # a warning prints above the bar, not inside it
            return asyncio.run(run_router(data, order, mask, options, texts, vectors, encoder, progress))
    finally:
        bar.close()


def _title(name: str, n: int, options: Options, extra: str = "") -> str:
    """What a plot shows: the file, the run, the settings that differ from the defaults."""
    chosen = {k.upper(): v for k, v in options.overrides.items()}
    if options.policy:
        chosen["ROUTER_POLICY"] = options.policy
    if options.strategy:
        chosen["strategy"] = options.strategy
    settings = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "default settings"
    return (
        f"{name}: {n} prompts, feedback on {options.feedback_rate:.0%}, order {options.order} (seed "
        f"{options.seed}); {settings}{extra}"
    )


def _pct(value: float) -> str:
    return "    n/a" if math.isnan(value) else f"{value:7.1%}"


def _mean_point(trace: Trace) -> tuple[float, float]:
    return float(trace.costs.mean()), float(trace.scores.mean())


def _singles(data: Any, rows: list[int]) -> dict[str, tuple[float, float]]:
    """Each model's mean cost and score on `rows`."""
    idx = np.asarray(rows)
    costs, scores = data.costs()[idx], data.scores()[idx]
    return {m: (float(costs[:, j].mean()), float(scores[:, j].mean())) for j, m in enumerate(data.models)}


def _frontier_note(best: str) -> str:
    return (
        f"against the zero router (second half; shares of {best}'s cost and score on the same prompts; "
        "a hull of one point is n/a below it)"
    )


def replay(file: str, options: Options, out: str | None) -> dict[str, Any]:
    data, order, mask, texts, vectors, encoder = _prepare(file, options, [options])
    out_dir = _out_dir(out, data.name, "replay")
    router = _run(data, order, mask, texts, vectors, encoder, options, f"replay {data.name}")
    base = baseline_traces(data, order, mask, vectors, options.seed)
    base["noncontextual_ts"] = noncontextual_ts(data, order, mask, options)
    traces = {"auto": router, **base}
    best = base["best_single"]
    mid = len(order) // 2
    zero = frontier.zero_router(data, order, best.picks[0])
    front: dict[str, Any] = {
        n: frontier.figures({n: frontier.point(traces[n].window(mid), best.window(mid))}, zero)
        for n in ("auto", "noncontextual_ts")
    }
    strategies = {name: halves(tr, best) for name, tr in traces.items()}
    singles = {
        m: (float(data.costs()[:, j].mean()), float(data.scores()[:, j].mean()))
        for j, m in enumerate(data.models)
    }
    report = {
        **report_head(data, order, options),
        "models": data.models,
        "router": router.meta,
        "best_single_model": base["best_single"].picks[0],
        "cheapest_model": base["cheapest"].picks[0],
        "strategies": strategies,
        "regret_vs_oracle": {n: float(regret(tr, base["oracle"])[-1]) for n, tr in traces.items()},
        "model_share_over_time": model_shares(router, data.models),
        "model_share_second_half": {
            m: router.picks[len(order) // 2 :].count(m) / max(1, len(order) - len(order) // 2)
            for m in data.models
        },
        "zero_router_aiq": aiq(list(singles.values())),
        "single_models": {m: {"mean_cost_usd": c, "mean_score": q} for m, (c, q) in singles.items()},
        "frontier_second_half": {
            "best_single_model": best.picks[0],
            "prompts": len(order) - mid,
            "zero_router": zero.figures(),
            **front,
        },
    }
    title = _title(data.name, len(order), options)
    files = plots.replay_plots(out_dir, router, base, data.models, title)
    half = {n: _mean_point(tr.window(mid)) for n, tr in traces.items()}
    files.append(
        plots.cost_quality_plot(
            out_dir / "cost_quality.png",
            {"auto": half.pop("auto")},
            _singles(data, order[mid:]),
            title + "; second half",
            {n: p for n, p in half.items() if n != "noncontextual_ts"},
            {"noncontextual_ts": half["noncontextual_ts"]},
        )
    )
    report["plots"] = [str(f) for f in files]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    print(
        f"\n{data.name}: {len(order)} prompts, {len(data.models)} models, feedback on "
        f"{sum(mask)}/{len(order)} calls, order {options.order} (seed {options.seed}); {MODE}"
    )
    print(HEADER)
    for name, s in strategies.items():
        print(_row(name, s))
    if not float(best.costs.sum()):
        print(f"cost: unknown ({data.name} has no costs or prices): the shares of cost are n/a")
    print("\n" + frontier.table({"zero router": zero.figures(), **front}, _frontier_note(best.picks[0])))
    print(f"\nreport: {out_dir / 'report.json'} ({router.meta['ms_per_request']} ms per request)")
    print("plots: " + "  ".join(str(f) for f in files))
    return report


_ALIASES = {"policy": "router_policy"}


def parse_grid(grids: list[str]) -> list[tuple[str, list[Any]]]:
    """`--grid KEY=v1,v2,...`: KEY a setting (or `policy`, `strategy`); unknown keys, policies and
    strategies are ConfigErrors that name the closest valid spelling."""
    out = []
    for g in grids:
        key, sep, values = g.partition("=")
        if not sep or not values or not key.strip():
            raise ConfigError(f"--grid needs KEY=v1,v2,..., got {g!r}")
        name = key.strip().lower()
        if name not in _ALIASES and name != "strategy":
            name = setting_key(key, "--grid")
        parsed: list[Any] = []
        for v in values.split(","):
            try:
                parsed.append(json.loads(v))
            except json.JSONDecodeError:
                parsed.append(v)
        vocabulary = {"strategy": STRATEGIES, "router_policy": tuple(POLICIES)}.get(
            _ALIASES.get(name, name), ()
        )
        for v in parsed if vocabulary else []:
            if v not in vocabulary:
                raise ConfigError(f"--grid {key.strip()}: {unknown(name.split('_')[-1], str(v), vocabulary)}")
        out.append((name, parsed))
    return out


def sweep(file: str, grids: list[str], options: Options, out: str | None) -> dict[str, Any]:
    grid = parse_grid(grids)
    keys = [k for k, _ in grid]
    plans = []
    for combo in itertools.product(*[vals for _, vals in grid]):
        setting = dict(zip(keys, combo, strict=True))
        opts = Options(**{**vars(options), "overrides": dict(options.overrides)})
        for k, v in setting.items():
            if k == "strategy":
                opts.strategy = v
            else:
                opts.overrides[_ALIASES.get(k, k)] = v
        plans.append((setting, opts))
    data, order, mask, texts, vectors, encoder = _prepare(file, options, [o for _, o in plans])
    out_dir = _out_dir(out, data.name, "sweep")
    base = baseline_traces(data, order, mask, vectors, options.seed)
    best = base["best_single"]
    mid = len(order) // 2
    zero = frontier.zero_router(data, order, best.picks[0])
    runs = []
    contextless: dict[Hashable, Trace] = {}  # one per distinct objective (hcts: dial; else knobs)
    ts_points: dict[str, tuple[float, float]] = {}  # label -> second-half mean cost and score
    for setting, opts in plans:
        label = ",".join(f"{k}={v}" for k, v in setting.items())
        trace = _run(data, order, mask, texts, vectors, encoder, opts, label)
        goal = objective(data, opts)
        if goal not in contextless:
            contextless[goal] = noncontextual_ts(data, order, mask, opts)
        ts = contextless[goal].window(mid)
        ts_points[label] = _mean_point(ts)
        summary = halves(trace, best)
        op = frontier.operating(frontier.point(trace.window(mid), best.window(mid)), zero)
        ts_op = frontier.operating(frontier.point(ts, best.window(mid)), zero)
        runs.append(
            {
                "setting": setting,
                "label": label,
                **summary,
                "ms_per_request": trace.meta["ms_per_request"],
                "frontier_second_half": op,
                "noncontextual_ts_second_half": ts_op,
            }
        )
        h = summary["second_half"]
        print(
            f"{label:<48} second half: score {h['mean_score']:.4f} ({_pct(h['score_share_of_best']).strip()} "
            f"of best) cost {h['mean_cost_usd']:.3e} ({_pct(h['cost_share_of_best']).strip()} of best); "
            f"lift over the zero router {_lift(op['lift'])}, non-contextual TS "
            f"{_share(ts_op['score_share'])} at {_share(ts_op['cost_share'])} cost "
            f"(lift {_lift(ts_op['lift'])})",
            flush=True,
        )
    points = {r["label"]: (r["second_half"]["mean_cost_usd"], r["second_half"]["mean_score"]) for r in runs}
    singles = {}
    for j, m in enumerate(data.models):
        rows = np.asarray(order[mid:])
        singles[m] = (float(data.costs()[rows, j].mean()), float(data.scores()[rows, j].mean()))
    single_lo = min(c for c, _ in singles.values())
    single_hi = max(c for c, _ in singles.values())
    aiqs = {
        "router": aiq(list(points.values())),
        "zero_router": aiq(list(singles.values())),
        "router_on_model_range": aiq(list(points.values()), single_lo, single_hi),
        "zero_router_on_model_range": aiq(list(singles.values()), single_lo, single_hi),
    }
    shares = {r["label"]: r["frontier_second_half"] for r in runs}
    ts_shares = {r["label"]: r["noncontextual_ts_second_half"] for r in runs}
    front: dict[str, Any] = {
        "best_single_model": best.picks[0],
        "prompts": len(order) - mid,
        "zero_router": zero.figures(),
        "router": {"points": shares, **frontier.Curve.of(_shares(shares)).figures()},
        "noncontextual_ts": {"points": ts_shares, **frontier.Curve.of(_shares(ts_shares)).figures()},
    }
    report: dict[str, Any] = {
        **report_head(data, order, options),
        "grid": dict(grid),
        "runs": runs,
        "baselines": {n: halves(tr, best) for n, tr in base.items()},
        "aiq_second_half": aiqs,
        "frontier_second_half": front,
    }
    title = _title(data.name, len(order), options, f"; grid {', '.join(keys)}; second half")
    others = {
        n: (h["mean_cost_usd"], h["mean_score"])
        for n, s in report["baselines"].items()
        for h in [s["second_half"]]
    }
    files = [plots.cost_quality_plot(out_dir / "cost_quality.png", points, singles, title, others, ts_points)]
    if len(grid) == 2:
        (k1, v1), (k2, v2) = grid
        half = {(r["setting"][k1], r["setting"][k2]): r["second_half"] for r in runs}
        for metric in ("score", "cost"):
            files.append(
                plots.heatmap(
                    out_dir / f"heatmap_{metric}.png",
                    np.array([[half[a, b][f"{metric}_share_of_best"] for b in v2] for a in v1]),
                    [str(a) for a in v1],
                    [str(b) for b in v2],
                    k1,
                    k2,
                    f"{data.name}: second-half {metric}, share of the best single model's",
                )
            )
    report["plots"] = [str(f) for f in files]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    print(
        f"\nAIQ (second half): router {aiqs['router']:.4f} over its own cost range; on the single models' "
        f"range router {aiqs['router_on_model_range']:.4f} vs zero router "
        f"{aiqs['zero_router_on_model_range']:.4f}"
    )
    lines = {
        "zero router": front["zero_router"],
        f"router ({len(runs)} settings)": front["router"],
        "non-contextual TS": front["noncontextual_ts"],
    }
    print("\n" + frontier.table(lines, _frontier_note(best.picks[0])))
    print(f"report: {out_dir / 'report.json'}")
    print("plots: " + "  ".join(str(f) for f in files))
    return report


def _shares(points: dict[str, dict[str, Any]]) -> list[tuple[float, float]]:
    """(cost share, score share) of each operating point that has both."""
    return [
        (p["cost_share"], p["score_share"])
        for p in points.values()
        if p["cost_share"] is not None and p["score_share"] is not None
    ]


def _share(value: float | None) -> str:
    return _pct(math.nan if value is None else value).strip()


def _lift(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} points"
