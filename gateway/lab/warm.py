"""`llm-router replay FILE --warm-start`: the warm start checked through the real gateway (issue 12:
"with a warm start fitted on the first half of a file, the second half's figures are within 1
point of an offline router trained on the same half, from the second half's first request").

For the run's seed, the stream is the lab's (`stream_order`), split at its middle:

- the first half is fitted with `llm-router fit`'s code (`gateway.lab.fit.fit_rows`: every model's
  outcome known, the configured embedder's vectors from the lab's cache), stored in the run's
  directory, and the lab's gateway starts from it (ROUTER_STATE_PATH);
- ONLY the second half is sent through that gateway (feedback on the calls the lab's mask says, as
  in a replay), so its figures count from its first request: score and cost as shares of the best
  single model's on the same prompts, and the lift over the zero router at that cost;
- beside it the offline router trained on the same half: the same fitted state, frozen (no online
  update, no exploration, no calibration), deciding greedily on its posterior means (the ones its
  decisions use: contextual once its gate opened) minus lam x a cost estimate learnt from the first
  half (each model's mean cost in the prompt's finest cluster). Its cost multiplier lam is swept;
  the upper hull of its (cost, score) points (a mix of two multipliers hits any cost between) is
  read at the warm gateway's cost share, so the two scores are at the same cost. Why this router:
  it is what the warm start knows before its first request, so the difference is what learning
  online (and exploring) on the second half gains or loses against never learning; like the
  gateway it reads the embeddings only, never a record's `task`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gateway.config_errors import ConfigError
from gateway.lab import baselines, commands, frontier
from gateway.lab.commands import _out_dir, _pct, _prepare, _run, report_head
from gateway.lab.fit import answer_lengths, fit_rows, pre_call_estimates, unit_rows
from gateway.lab.report import Trace, summary
from gateway.lab.runner import Options, lab_settings
from gateway.providers.replay import ReplayData
from gateway.routing import hcts_state
from gateway.routing.hcts import Hcts
from gateway.routing.hcts_policy import default_dial

# the offline router's cost multipliers: none, then from negligible to "the cheapest estimate wins"
LAMBDAS = np.concatenate([[0.0], np.logspace(-4, 3, 141)])


def cost_estimates(policy: Hcts, x_train: np.ndarray, costs_train: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(B, K): each model's mean cost on the training prompts of x's finest cluster (the model's
    mean over all of them where the cluster has none, or there are no clusters)."""
    overall = costs_train.mean(axis=0)
    cents = policy.model.cents
    if not cents:
        return np.broadcast_to(overall, (len(x), len(overall))).copy()
    fine = cents[-1]
    c_train = np.argmax(x_train @ fine.T, axis=1)
    sums = np.zeros((len(fine), costs_train.shape[1]))
    np.add.at(sums, c_train, costs_train)
    counts = np.bincount(c_train, minlength=len(fine))[:, None]
    table = np.where(counts > 0, sums / np.maximum(counts, 1), overall[None, :])
    return np.asarray(table[np.argmax(x @ fine.T, axis=1)])


def offline_points(
    means: np.ndarray, estimates: np.ndarray, scores: np.ndarray, costs: np.ndarray, best: int
) -> list[frontier.Point]:
    """The frozen router's (cost share, score share) of model `best` on these prompts, one point
    per cost multiplier: greedy on means - lam * estimate / (the models' mean estimate)."""
    norm = float(estimates.mean()) or 1.0
    rows = np.arange(len(means))
    out = []
    for lam in LAMBDAS:
        picks = np.argmax(means - lam * estimates / norm, axis=1)
        out.append((float(costs[rows, picks].mean()), float(scores[rows, picks].mean())))
    bc, bs = float(costs[:, best].mean()), float(scores[:, best].mean())
    nan = float("nan")
    return [(c / bc if bc else nan, s / bs if bs else nan) for c, s in out]


def replay(file: str, options: Options, out: str | None, warm: bool = False) -> dict[str, Any]:
    """`llm-router replay`: the lab's replay (`gateway.lab.commands.replay`), or with --warm-start
    this module's check."""
    return warm_start(file, options, out) if warm else commands.replay(file, options, out)


def warm_start(file: str, options: Options, out: str | None) -> dict[str, Any]:
    """Fit on the first half of the run's stream, replay the second half through a gateway started
    from the fit, and compare with the offline router trained on the same half (see the module)."""
    if options.strategy:
        raise ConfigError("--warm-start checks the router's policy: it takes no --strategy")
    data, order, mask, texts, vectors, encoder = _prepare(file, options, [options])
    settings = lab_settings(data, options, None)
    if settings.router_policy != "hcts":
        raise ConfigError(
            f"--warm-start fits HCTS's state: ROUTER_POLICY is {settings.router_policy}, not hcts"
        )
    mid = len(order) // 2
    first, second = order[:mid], order[mid:]
    if not first or not second:
        raise ConfigError("--warm-start needs at least 2 prompts (a first half to fit, a second to replay)")
    out_dir = _out_dir(out, data.name, "warm")
    state = out_dir / "router_state.npz"
    scores, costs = data.scores(), data.costs()
    answers = answer_lengths([data.records[i] for i in first], data.models)
    fitted = fit_rows(
        data.models,
        vectors[first],
        scores[first],
        costs[first],
        settings,
        state,
        encoder.id,
        options.seed,
        answers,
        pre_call_estimates([data.records[i] for i in first], data.models, settings, answers),
    )
    warm_options = Options(
        **{**vars(options), "overrides": {**options.overrides, "router_state_path": str(state)}}
    )
    trace = _run(data, second, mask[mid:], texts, vectors, encoder, warm_options, f"warm {data.name}")
    best_model = baselines.best_single(data)
    best = baselines.single(data, second, best_model, "best_single")
    zero = frontier.zero_router(data, order, best_model)  # on order[mid:], the second half
    warm = frontier.operating(frontier.point(trace, best), zero)

    policy = hcts_state.load(state, data.models, default_dial(settings), embedder=encoder.id)
    assert policy is not None  # fitted just now, for these models and this embedder
    x_train, x_test = unit_rows(vectors[first]), unit_rows(vectors[second])
    means = policy.model.decision_means(x_test)
    estimates = cost_estimates(policy, x_train, costs[first], x_test)
    rows = np.asarray(second)
    points = offline_points(means, estimates, scores[rows], costs[rows], data.models.index(best_model))
    curve = frontier.Curve.of(points)
    at_warm = curve.at(warm["cost_share"]) if warm["cost_share"] is not None else float("nan")
    offline = {
        "router": "the fitted HCTS state frozen: greedy on its posterior means minus lam x each model's "
        "mean cost in the prompt's finest cluster (first half); lam swept, hull read at the warm cost",
        "lambdas": [float(v) for v in LAMBDAS],
        "points": [[c, q] for c, q in points],
        "score_share_at_warm_cost": _num(at_warm),
        "zero_router_at_cost": warm["zero_router_at_cost"],
        "lift": _num(at_warm - (warm["zero_router_at_cost"] or math.nan)),
        **curve.figures(),
    }
    diff = None if warm["score_share"] is None or math.isnan(at_warm) else warm["score_share"] - at_warm
    report = {
        **report_head(data, order, options, "; started from the fit of the first half"),
        "models": data.models,
        "fitted": {
            "path": str(fitted.path),
            "prompts": fitted.prompts,
            "clusters": fitted.clusters,
            "contextual": fitted.contextual,
            "lambda": fitted.lam,
        },
        "second_half": {
            "prompts": len(second),
            "feedback": sum(mask[mid:]),
            "best_single_model": best_model,
            "warm": {**warm, **summary(trace, best)},
            "offline": offline,
            "difference": diff,
            "zero_router": zero.figures(),
        },
        "router": trace.meta,
        "picks": trace.picks,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    _print(data, report, trace, out_dir)
    return report


def _print(data: ReplayData, report: dict[str, Any], trace: Trace, out_dir: Path) -> None:
    f, h = report["fitted"], report["second_half"]
    w, o = h["warm"], h["offline"]
    print(
        f"\n{data.name}: warm start (seed {report['options']['seed']}): fitted on the first half "
        f"({f['prompts']} prompts x {len(data.models)} models, every outcome known; clusters "
        f"{f['clusters']}, contextual {f['contextual']}); the second half ({h['prompts']} prompts, "
        f"feedback on {h['feedback']}) through the gateway started from it; shares of "
        f"{h['best_single_model']}'s score and cost on the same prompts"
    )
    print(
        f"warm start      {_share(w['score_share'])} at {_share(w['cost_share'])} cost; zero router "
        f"{_share(w['zero_router_at_cost'])} there, lift {_points(w['lift'])}"
    )
    print(
        f"offline router  trained on the first half (the fit frozen, greedy): "
        f"{_share(o['score_share_at_warm_cost'])} at the same cost; lift {_points(o['lift'])}; "
        f"its hull at 35 %: {_share(o['hull_at_cost_share']['35%'])}"
    )
    print(f"difference      {_points(h['difference'])} (warm start minus offline router)")
    print(f"report: {out_dir / 'report.json'} ({trace.meta['ms_per_request']} ms per request)")


def _num(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _share(value: float | None) -> str:
    return _pct(float("nan") if value is None else value).strip()


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} points"
