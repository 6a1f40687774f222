"""`llm-router replay` and `llm-router sweep`."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gateway.lab import plots
from gateway.lab.report import Trace, aiq, halves, model_shares, regret
from gateway.lab.runner import (
    Options,
    baseline_traces,
    embeddings_for,
    feedback_mask,
    lab_encoder,
    run_router,
    stream_order,
)
from gateway.providers import replay as replay_data

MODE = "http: a real gateway (uvicorn on 127.0.0.1) driven with model='auto', one request at a time"


def _out_dir(out: str | None, name: str, verb: str) -> Path:
    path = Path(out) if out else Path("out") / f"{verb}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _row(name: str, s: dict[str, dict[str, float]]) -> str:
    a, h = s["all"], s["second_half"]
    return (
        f"{name:<16} {a['mean_score']:7.4f} {a['mean_cost_usd']:11.3e} {a['score_share_of_best']:7.1%} "
        f"{a['cost_share_of_best']:7.1%} | {h['mean_score']:7.4f} {h['mean_cost_usd']:11.3e} "
        f"{h['score_share_of_best']:7.1%} {h['cost_share_of_best']:7.1%}"
    )


HEADER = (
    f"{'strategy':<16} {'score':>7} {'cost/call':>11} {'%best':>7} {'%cost':>7} | {'score':>7} "
    f"{'cost/call':>11} {'%best':>7} {'%cost':>7}\n{'':<16} {'(whole stream)':^35} | {'(second half)':^35}"
)


def _prepare(file: str, options: Options) -> tuple[Any, list[int], list[bool], list[str], np.ndarray, Any]:
    data = replay_data.load(file)
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
        return asyncio.run(run_router(data, order, mask, options, texts, vectors, encoder, progress))
    finally:
        bar.close()


def replay(file: str, options: Options, out: str | None) -> dict[str, Any]:
    data, order, mask, texts, vectors, encoder = _prepare(file, options)
    out_dir = _out_dir(out, data.name, "replay")
    router = _run(data, order, mask, texts, vectors, encoder, options, f"replay {data.name}")
    base = baseline_traces(data, order, mask, vectors, options.seed)
    traces = {"auto": router, **base}
    best = base["best_single"]
    strategies = {name: halves(tr, best) for name, tr in traces.items()}
    singles = {
        m: (float(data.costs()[:, j].mean()), float(data.scores()[:, j].mean()))
        for j, m in enumerate(data.models)
    }
    report = {
        "file": str(data.path),
        "records": len(order),
        "models": data.models,
        "mode": MODE + f"; store: {options.store}",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
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
    }
    files = plots.replay_plots(out_dir, router, base, data.models)
    report["plots"] = [str(f) for f in files]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    print(
        f"\n{data.name}: {len(order)} prompts, {len(data.models)} models, feedback on "
        f"{sum(mask)}/{len(order)} calls, order {options.order} (seed {options.seed}); {MODE}"
    )
    print(HEADER)
    for name, s in strategies.items():
        print(_row(name, s))
    print(
        f"\nreport: {out_dir / 'report.json'}  plots: {', '.join(f.name for f in files)}  "
        f"({router.meta['ms_per_request']} ms per request)"
    )
    return report


_ALIASES = {"policy": "router_policy"}


def parse_grid(grids: list[str]) -> list[tuple[str, list[Any]]]:
    out = []
    for g in grids:
        key, sep, values = g.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid needs KEY=v1,v2,..., got {g!r}")
        parsed: list[Any] = []
        for v in values.split(","):
            try:
                parsed.append(json.loads(v))
            except json.JSONDecodeError:
                parsed.append(v)
        out.append((key.strip().lower(), parsed))
    return out


def sweep(file: str, grids: list[str], options: Options, out: str | None) -> dict[str, Any]:
    grid = parse_grid(grids)
    data, order, mask, texts, vectors, encoder = _prepare(file, options)
    out_dir = _out_dir(out, data.name, "sweep")
    base = baseline_traces(data, order, mask, vectors, options.seed)
    best = base["best_single"]
    runs = []
    keys = [k for k, _ in grid]
    for combo in itertools.product(*[vals for _, vals in grid]):
        setting = dict(zip(keys, combo, strict=True))
        opts = Options(**{**vars(options), "overrides": dict(options.overrides)})
        for k, v in setting.items():
            if k == "strategy":
                opts.strategy = v
            else:
                opts.overrides[_ALIASES.get(k, k)] = v
        label = ",".join(f"{k}={v}" for k, v in setting.items())
        trace = _run(data, order, mask, texts, vectors, encoder, opts, label)
        summary = halves(trace, best)
        runs.append(
            {"setting": setting, "label": label, **summary, "ms_per_request": trace.meta["ms_per_request"]}
        )
        h = summary["second_half"]
        print(
            f"{label:<48} second half: score {h['mean_score']:.4f} ({h['score_share_of_best']:.1%} of best) "
            f"cost {h['mean_cost_usd']:.3e} ({h['cost_share_of_best']:.1%} of best)",
            flush=True,
        )
    mid = len(order) // 2
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
    report: dict[str, Any] = {
        "file": str(data.path),
        "records": len(order),
        "mode": MODE + f"; store: {options.store}",
        "grid": dict(grid),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
        "runs": runs,
        "baselines": {n: halves(tr, best) for n, tr in base.items()},
        "aiq_second_half": aiqs,
    }
    files = [
        plots.cost_quality_plot(
            out_dir / "cost_quality.png", points, singles, f"{data.name}: second half, cost vs quality"
        )
    ]
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
                    f"second-half {metric}, share of the best single model",
                )
            )
    report["plots"] = [str(f) for f in files]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    print(
        f"\nAIQ (second half): router {aiqs['router']:.4f} over its own cost range; on the single models' "
        f"range router {aiqs['router_on_model_range']:.4f} vs zero router "
        f"{aiqs['zero_router_on_model_range']:.4f}"
    )
    print(f"report: {out_dir / 'report.json'}")
    return report
