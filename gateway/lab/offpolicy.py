"""`llm-router evaluate-lab FILE`: does off-policy evaluation tell the truth? In the lab the truth
is known, so the check is direct:

1. log: a real gateway (the logging settings, exploring) serves the first half of the shuffled
   stream, learning from every rating; the database is then cloned as it stands (the state at
   the window's start), and the same gateway serves the second half (the window), learning on;
2. estimate: `gateway.evaluation` evaluates the candidates on the window's logged calls, their
   state learned from the first half (the question it answers: each candidate frozen at that
   state);
3. truth: each candidate is replayed for real on the window: a gateway with its settings over a
   copy of the cloned database (so it starts from exactly the state the estimate assumes), frozen
   (nothing rated, nothing refreshed), its picks scored by the file. Also the expected truth: the
   candidate's own propensities times the file's outcomes of every arm, which the replay's
   realised figures scatter around;
4. compare: each estimator's error, and whether its interval covers the replayed truth.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gateway.domain import utcnow
from gateway.embedders import serve
from gateway.evaluation.candidate import Candidate, settings_of
from gateway.evaluation.estimators import Method
from gateway.evaluation.report import plot, table
from gateway.evaluation.run import Question, Report, candidates_of, compute, load, vectors
from gateway.lab.runner import (
    Options,
    drive,
    embeddings_for,
    lab_encoder,
    lab_settings,
    stream_order,
    trace_of,
)
from gateway.providers import replay as replay_data
from gateway.providers.replay import ReplayData

# The logging policy must explore for the logs to say anything about other policies: the dev
# profile's EXPLORATION_RATE, with lin_ts (whose knobs the candidates below turn; the README's
# figures were measured so). `--candidate 'hcts: ROUTER_POLICY=hcts'` evaluates the default policy.
LOGGING: dict[str, Any] = {"exploration_rate": 0.3, "router_policy": "lin_ts"}
CANDIDATES = [
    "greedy: EXPLORATION_RATE=0.02",
    "quality: COST_WEIGHT=0 EXPLORATION_RATE=0.02",
    "thrifty: COST_WEIGHT=-0.8 EXPLORATION_RATE=0.02",
    "knn_ts: ROUTER_POLICY=knn_ts EXPLORATION_RATE=0.02",
]
ESTIMATORS = ("ips", "snips", "dr")


@dataclass
class LabOptions:
    seed: int = 0
    limit: int | None = None
    logging: dict[str, Any] = field(default_factory=lambda: dict(LOGGING))
    candidates: list[Candidate] = field(default_factory=list)
    interval: Method = "clt"
    confidence: float = 0.9
    data_dir: Path = Path("./data")
    config: str | None = None


def parse(spec: str) -> Candidate:
    from gateway.evaluation.command import parse_candidate

    return parse_candidate(spec)


def default_candidates() -> list[Candidate]:
    return [parse(c) for c in CANDIDATES]


def _truth(
    data: ReplayData, order: list[int], window: list[int], report: Report, picks: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """Per candidate: the estimates beside the replayed truth (realised) and the expected one."""
    rows = [order[int(c.id[1:])] for c in report.window_calls]  # request ids are r{position}
    cols = [data.models.index(a) for a in report.arms]
    scores, costs = data.scores()[rows][:, cols], data.costs()[rows][:, cols]
    out = []
    for c in report.candidates:
        trace = trace_of(c.candidate.name, data, window, picks[c.candidate.name], {})
        keep = np.array([p is not None for p in c.decided.propensities])
        truth = {"score": float(trace.scores.mean()), "cost_usd": float(trace.costs.mean())}
        expected = {
            "score": float((c.target * scores).sum(axis=1)[keep].mean()),
            "cost_usd": float((c.target * costs).sum(axis=1)[keep].mean()),
        }
        row: dict[str, Any] = {
            "name": c.candidate.name,
            "settings": c.candidate.overrides,
            "truth_replayed": truth,
            "truth_expected": expected,
            "effective_sample_size": c.diagnostics.effective_sample_size,
            "warnings": c.warnings,
        }
        for metric, est in (("score", c.score), ("cost_usd", c.cost)):
            row[metric] = {
                name: {
                    **iv.as_dict(),
                    "error": iv.value - truth[metric],
                    "covers_replayed": iv.covers(truth[metric]),
                    "covers_expected": iv.covers(expected[metric]),
                }
                for name, iv in (("ips", est.ips), ("snips", est.snips), ("dr", est.dr))
            }
        out.append(row)
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in ("score", "cost_usd"):
        for name in ESTIMATORS:
            errs = [r[metric][name]["error"] for r in rows]
            out[f"{metric}.{name}"] = {
                "covered": sum(r[metric][name]["covers_replayed"] for r in rows),
                "of": len(rows),
                "mean_abs_error": float(np.mean(np.abs(errs))),
                "max_abs_error": float(np.max(np.abs(errs))),
            }
    return out


async def check(file: str, options: LabOptions) -> tuple[dict[str, Any], Report]:
    from gateway.store.embedded import EmbeddedPostgres
    from gateway.store.postgres import postgres_store

    data = replay_data.load(file)
    order = stream_order(len(data.records), "shuffle", options.seed, options.limit)
    mid = len(order) // 2
    # the embedder (EMBEDDER) of the logging gateway, which its candidates share
    logging = dict(options.logging)
    subset = logging.get("llm_models")
    if subset and "default_model" not in logging:  # the file's first model may be left out
        logging["default_model"] = (subset.split(",") if isinstance(subset, str) else subset)[0].strip()
    lab = Options(overrides=logging, config=options.config, data_dir=options.data_dir)
    encoder = lab_encoder(data, lab)
    texts, vecs = embeddings_for(data, options.data_dir / "lab-cache", 1000, encoder, order)
    embedder = serve(lab_settings(data, lab, None), encoder, cache_size=len(order) + 1000)
    embedder.prime([texts[i] for i in order], vecs[order])
    pg = EmbeddedPostgres(options.data_dir / "lab", database="lab")
    await pg.start()
    tag = uuid.uuid4().hex[:8]
    log_db, snap_db = f"ope_log_{tag}", f"ope_snap_{tag}"
    made = [log_db]
    t0 = time.perf_counter()

    def settings_for(db: str, overrides: dict[str, Any]) -> Any:
        values = dict(overrides)
        subset = values.get("llm_models")
        if subset and "default_model" not in values:  # the file's first model may be left out
            values["default_model"] = (subset.split(",") if isinstance(subset, str) else subset)[0].strip()
        return lab_settings(data, Options(overrides=values, config=options.config), pg.dsn(db))

    def bar(label: str, n: int) -> Any:
        return tqdm(total=n, desc=label, unit=" req", leave=False)

    try:
        await pg.create_database(log_db)
        logging_settings = settings_for(log_db, options.logging)
        everyone = [True] * len(order)
        with bar("log: first half", mid) as b:
            await drive(
                logging_settings,
                embedder,
                data,
                order[:mid],
                everyone,
                options.seed,
                progress=lambda t, m: b.update(),
            )
        since = utcnow()  # the window starts here: the first half's state is cloned as it stands
        made.append(snap_db)
        await pg.create_database(snap_db, template=log_db)
        with bar("log: window", len(order) - mid) as b:
            logged, _ = await drive(
                logging_settings,
                embedder,
                data,
                order[mid:],
                everyone,
                options.seed + 1,
                first=mid,
                progress=lambda t, m: b.update(),
            )
        question = Question(
            since=since,
            until=utcnow(),
            candidates=options.candidates,
            confidence=options.confidence,
            interval=options.interval,
        )
        async with postgres_store(pg.dsn(log_db)) as store:
            loaded = await load(store, logging_settings, question)
        vecs_needed = await vectors(loaded, logging_settings, question, embedder)
        with bar("estimate", len(loaded.window.calls) * len(candidates_of(question))) as b:
            report = await compute(loaded, logging_settings, question, vecs_needed, lambda n: b.update())
        picks: dict[str, list[str]] = {}
        for cand in candidates_of(question):
            db = f"ope_cand_{tag}_{len(picks)}"
            made.append(db)
            await pg.create_database(db, template=snap_db)
            settings = settings_of(settings_for(db, options.logging), cand.overrides)
            with bar(f"truth: {cand.name}", len(order) - mid) as b:
                picks[cand.name], _ = await drive(
                    settings,
                    embedder,
                    data,
                    order[mid:],
                    None,
                    options.seed + 2,
                    first=mid,
                    progress=lambda t, m: b.update(),
                )
    finally:
        for db in made:
            await pg.drop_database(db)
        await pg.stop()
        await embedder.aclose()
    logged_trace = trace_of("logged", data, order[mid:], logged, {})
    rows = _truth(data, order, order[mid:], report, picks)
    result = {
        "file": str(data.path),
        "records": len(order),
        "window": len(order) - mid,
        "logging_settings": options.logging,
        "question": report.as_dict()["question"],
        "logged_realised": {
            "score": float(logged_trace.scores.mean()),
            "cost_usd": float(logged_trace.costs.mean()),
        },
        "candidates": rows,
        "summary": summary(rows),
        "seconds": round(time.perf_counter() - t0, 1),
        "evaluation": report.as_dict(),
    }
    return result, report


def _fmt(iv: dict[str, Any], fmt: str) -> str:
    mark = "" if iv["covers_replayed"] else " ✗"
    return f"{iv['value']:{fmt}} [{iv['low']:{fmt}}, {iv['high']:{fmt}}]{mark}"


def lines(result: dict[str, Any]) -> list[str]:
    """Estimates against the replayed truth, per candidate, and each estimator's record."""
    out = [
        f"{Path(result['file']).name}: window of {result['window']} calls; logging settings "
        f"{result['logging_settings']}: realised score {result['logged_realised']['score']:.4f}, "
        f"cost {result['logged_realised']['cost_usd']:.3e}",
        f"{'candidate':<16} {'truth':>7} {'(expected)':>10} {'IPS':>27} {'SNIPS':>27} {'DR':>27} {'ESS':>6}",
    ]
    for r in result["candidates"]:
        s = r["score"]
        out.append(
            f"{r['name'][:16]:<16} {r['truth_replayed']['score']:>7.4f} "
            f"{r['truth_expected']['score']:>10.4f} {_fmt(s['ips'], '.4f'):>27} "
            f"{_fmt(s['snips'], '.4f'):>27} {_fmt(s['dr'], '.4f'):>27} "
            f"{r['effective_sample_size']:>6.0f}"
        )
    out.append(f"{'cost per call':<16}")
    for r in result["candidates"]:
        s = r["cost_usd"]
        out.append(
            f"{r['name'][:16]:<16} {r['truth_replayed']['cost_usd']:>9.3e} "
            f"{r['truth_expected']['cost_usd']:>9.3e} "
            f"{_fmt(s['ips'], '.3e'):>26} {_fmt(s['snips'], '.3e'):>26} {_fmt(s['dr'], '.3e'):>26}"
        )
    out.append("coverage of the replayed truth (✗: missed) and mean absolute error:")
    for key, v in result["summary"].items():
        out.append(f"  {key:<16} {v['covered']}/{v['of']} covered, mean |error| {v['mean_abs_error']:.3g}")
    return out


def evaluate_lab(file: str, options: LabOptions, out: str | None) -> dict[str, Any]:
    if not options.candidates:
        options.candidates = default_candidates()
    result, report = asyncio.run(check(file, options))
    path = Path(out) if out else Path("out") / f"evaluate-lab-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "report.json").write_text(json.dumps(result, indent=2, default=str))
    arrays: dict[str, Any] = report.arrays()
    data = replay_data.load(file)
    order = stream_order(len(data.records), "shuffle", options.seed, options.limit)
    rows = [order[int(c.id[1:])] for c in report.window_calls]
    cols = [data.models.index(a) for a in report.arms]
    arrays["file_scores"], arrays["file_costs"] = data.scores()[rows][:, cols], data.costs()[rows][:, cols]
    np.savez_compressed(
        path / "calls.npz", **arrays
    )  # the logs and the file's truth, to try other estimators on
    truth = {
        r["name"]: (r["truth_replayed"]["cost_usd"], r["truth_replayed"]["score"])
        for r in result["candidates"]
    }
    plot(report, path / "evaluation.png", truth)
    print(table(report))
    print()
    print("\n".join(lines(result)))
    print(f"\nreport: {path / 'report.json'}  plot: {path / 'evaluation.png'}  ({result['seconds']} s)")
    return result
