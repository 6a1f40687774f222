"""An evaluation's report for people: a table for the terminal, and a plot of each candidate's
estimated (cost, score) with its intervals beside what the logging policy got."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.evaluation.estimators import Interval
from gateway.evaluation.run import QUESTION, Report


def _iv(iv: Interval, fmt: str) -> str:
    return f"{iv.value:{fmt}} [{iv.low:{fmt}}, {iv.high:{fmt}}]"


def table(report: Report) -> str:
    q = report.question
    pct = f"{q.confidence:.0%}"
    head = (
        f"{'':<34} {'mean score':^56} {'mean cost per call (USD)':^30}\n"
        f"{'candidate':<34} {'IPS':>8} {'SNIPS':>8} {'DR [' + pct + ' interval]':>38} "
        f"{'DR [' + pct + ' interval]':>30} {'ESS':>7}"
    )
    lines = [
        f"{report.calls} rated calls from {q.since:%Y-%m-%d %H:%M:%S} to {q.until:%Y-%m-%d %H:%M:%S}"
        + (f", caller {q.caller}" if q.caller else "")
        + f"; state learned from the calls since {report.train_since:%Y-%m-%d %H:%M:%S}",
        f"estimate of: {QUESTION}",
        "",
        head,
        f"{'logged policy (what it got)':<34} {'':>8} {'':>8} {_iv(report.logged_score, '.4f'):>38} "
        f"{_iv(report.logged_cost, '.3e'):>30} {report.calls:>7}",
    ]
    for c in report.candidates:
        name = c.candidate.name if len(c.candidate.name) <= 33 else c.candidate.name[:32] + "…"
        flag = " !" if c.warnings else ""
        lines.append(
            f"{name:<34} {c.score.ips.value:>8.4f} {c.score.snips.value:>8.4f} {_iv(c.score.dr, '.4f'):>38} "
            f"{_iv(c.cost.dr, '.3e'):>30} {c.diagnostics.effective_sample_size:>7.0f}{flag}"
        )
    notes = [(c.candidate.name, w) for c in report.candidates for w in c.warnings]
    notes += [("all", w) for w in report.warnings]
    if notes:
        lines.append("")
        lines += [f"! {name}: {w}" for name, w in notes]
    if report.skipped:
        lines.append("")
        lines.append("left out: " + "; ".join(f"{n} {why}" for why, n in sorted(report.skipped.items())))
    return "\n".join(lines)


def plot(report: Report, path: Path, truth: dict[str, tuple[float, float]] | None = None) -> Path:
    """(cost, score) of each candidate: DR with both intervals as error bars, IPS and SNIPS as
    small marks; the logging policy in black; `truth` (the lab's replayed figures) as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = [plt.get_cmap("tab10")(i) for i in range(10)]

    def bars(cost: Interval, score: Interval, **kw: Any) -> None:
        ax.errorbar(
            [cost.value],
            [score.value],
            xerr=[[cost.value - cost.low], [cost.high - cost.value]],
            yerr=[[score.value - score.low], [score.high - score.value]],
            capsize=3,
            **kw,
        )

    bars(report.logged_cost, report.logged_score, fmt="s", color="black", label="logged policy (observed)")
    for n, c in enumerate(report.candidates):
        color = colors[n % len(colors)]
        bars(c.cost.dr, c.score.dr, fmt="o", color=color, label=f"{c.candidate.name} (DR)")
        ax.plot([c.cost.ips.value], [c.score.ips.value], "^", color=color, markersize=5, alpha=0.6)
        ax.plot([c.cost.snips.value], [c.score.snips.value], "v", color=color, markersize=5, alpha=0.6)
        if truth and c.candidate.name in truth:
            tc, ts = truth[c.candidate.name]
            ax.plot([tc], [ts], "x", color=color, markersize=10, markeredgewidth=2)
    pct = f"{report.question.confidence:.0%}"
    title = f"estimated mean cost and score per call ({pct} intervals; ▲ IPS, ▼ SNIPS"
    title += ", × replayed truth)" if truth else ")"
    ax.set(xscale="log", xlabel="mean cost per call (USD)", ylabel="mean score", title=title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
