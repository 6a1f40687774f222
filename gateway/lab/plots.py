"""The lab's plots (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gateway.lab.report import Trace, hull, model_shares, regret


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def replay_plots(out: Path, router: Trace, base: dict[str, Trace], models: Sequence[str]) -> list[Path]:
    plt = _plt()
    files = []
    steps = np.arange(1, len(router.picks) + 1)
    traces = {"auto": router, **base}

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, tr in traces.items():
        style = {"linewidth": 2.4, "color": "black"} if name == "auto" else {"linewidth": 1.1}
        ax1.plot(steps, np.cumsum(tr.scores) / steps, label=name, **style)
        ax2.plot(steps, np.cumsum(tr.costs) / steps, label=name, **style)
    ax1.set(title="cumulative mean score", xlabel="request", ylabel="score")
    ax2.set(title="cumulative mean cost per call", xlabel="request", ylabel="USD", yscale="log")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "score_cost.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    shares = model_shares(router, models, windows=20)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    x = np.linspace(0, len(router.picks), len(next(iter(shares.values()))))
    colors = plt.get_cmap("tab20").colors
    ax.stackplot(x, *[shares[m] for m in models], labels=[m.split("/")[-1] for m in models], colors=colors)
    ax.set(title="share of each model over time (auto)", xlabel="request", ylabel="share", ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    files.append(out / "model_share.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, tr in traces.items():
        if name == "oracle":
            continue
        style = {"linewidth": 2.4, "color": "black"} if name == "auto" else {"linewidth": 1.1}
        ax.plot(steps, regret(tr, base["oracle"]), label=name, **style)
    ax.set(title="cumulative regret against the per-prompt oracle", xlabel="request", ylabel="score lost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "regret.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def _curve(h: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """A hull is linear in cost between its points: sample it densely so a log axis shows it true."""
    xs = np.array([p[0] for p in h])
    ys = np.array([p[1] for p in h])
    if len(xs) < 2:
        return xs, ys
    grid = np.geomspace(max(xs[0], 1e-12), xs[-1], 200)
    return grid, np.interp(grid, xs, ys)


def cost_quality_plot(
    path: Path, points: dict[str, tuple[float, float]], singles: dict[str, tuple[float, float]], title: str
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    sx, sy = zip(*singles.values(), strict=True)
    ax.scatter(sx, sy, marker="s", color="grey", label="single models")
    for name, (c, q) in singles.items():
        ax.annotate(name.split("/")[-1], (c, q), fontsize=6, color="grey")
    ax.plot(
        *_curve(hull(list(singles.values()))),
        color="grey",
        linestyle="--",
        linewidth=1,
        label="zero router hull (mixing single models)",
    )
    px, py = zip(*points.values(), strict=True)
    ax.scatter(px, py, color="tab:blue", label="router settings")
    for name, (c, q) in points.items():
        ax.annotate(name, (c, q), fontsize=6, color="tab:blue")
    ax.plot(*_curve(hull(list(points.values()))), color="tab:blue", linewidth=1.5, label="router hull")
    ax.set(xscale="log", xlabel="mean cost per call (USD)", ylabel="mean score", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(
    path: Path,
    values: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    row_key: str,
    col_key: str,
    title: str,
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.4 + 0.7 * len(rows)))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols)
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set(xlabel=col_key, ylabel=row_key, title=title)
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
