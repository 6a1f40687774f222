"""The lab's plots (PNG, matplotlib's Agg backend: no display needed).

One colour per strategy in every plot (`colour`), titles that name the file and the settings,
labels offset from their markers and kept inside the figure, the hull drawn as straight segments
between its vertices, heatmap numbers in a colour that reads on their cell. A file without costs
gets no cost axis: its plots say that cost is unknown.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gateway.lab.report import Trace, hull, model_shares, regret

# The same strategy has the same colour in every plot of every run.
COLOURS: dict[str, str] = {
    "auto": "#000000",
    "best_single": "#d62728",
    "cheapest": "#2ca02c",
    "oracle": "#9467bd",
    "random": "#7f7f7f",
    "round_robin": "#8c564b",
    "original_proxy": "#ff7f0e",
    "single models": "#7f7f7f",
    "router": "#1f77b4",
}
_OTHERS = ("#1f77b4", "#17becf", "#bcbd22", "#e377c2", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5")


def colour(name: str) -> str:
    """A strategy's colour: fixed for the known ones, a stable pick from the name for others."""
    return COLOURS.get(name) or _OTHERS[zlib.crc32(name.encode()) % len(_OTHERS)]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # nothing clipped at the figure's edge
    _plt().close(fig)
    return path


def _line(name: str) -> dict[str, Any]:
    return {"color": colour(name), "linewidth": 2.4 if name == "auto" else 1.2, "label": name}


def replay_plots(
    out: Path, router: Trace, base: dict[str, Trace], models: Sequence[str], title: str = ""
) -> list[Path]:
    """score_cost.png, model_share.png, regret.png; `title` names the file and the settings."""
    plt = _plt()
    files = []
    steps = np.arange(1, len(router.picks) + 1)
    traces = {"auto": router, **base}
    costed = any(float(tr.costs.sum()) > 0 for tr in traces.values())

    fig, axes = plt.subplots(1, 2 if costed else 1, figsize=(13 if costed else 7.5, 4.8), squeeze=False)
    ax1 = axes[0][0]
    for name, tr in traces.items():
        ax1.plot(steps, np.cumsum(tr.scores) / steps, **_line(name))
    ax1.set(title="cumulative mean score", xlabel="request", ylabel="score")
    ax1.legend(fontsize=8)
    if costed:
        ax2 = axes[0][1]
        for name, tr in traces.items():
            ax2.plot(steps, np.cumsum(tr.costs) / steps, **_line(name))
        ax2.set(title="cumulative mean cost per call", xlabel="request", ylabel="USD", yscale="log")
    else:
        ax1.text(
            0.99,
            0.01,
            "cost unknown: the file has no costs or prices",
            transform=ax1.transAxes,
            ha="right",
            va="bottom",
            fontsize=8,
            color="#555555",
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    files.append(_save(fig, out / "score_cost.png"))

    shares = model_shares(router, models, windows=20)
    fig, ax = plt.subplots(figsize=(11, 4.8))
    x = np.linspace(0, len(router.picks), len(next(iter(shares.values()))))
    colours = plt.get_cmap("tab20").colors
    ax.stackplot(x, *[shares[m] for m in models], labels=list(models), colors=colours)
    ax.set(title="share of each model over time (auto)", xlabel="request", ylabel="share", ylim=(0, 1))
    ax.set_xlim(0, len(router.picks))
    handles, labels = ax.get_legend_handles_labels()  # listed top to bottom, as stacked
    ax.legend(handles[::-1], labels[::-1], fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    files.append(_save(fig, out / "model_share.png"))

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    for name, tr in traces.items():
        if name != "oracle":
            ax.plot(steps, regret(tr, base["oracle"]), **_line(name))
    ax.set(title="cumulative regret against the per-prompt oracle", xlabel="request", ylabel="score lost")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    files.append(_save(fig, out / "regret.png"))
    return files


class _Labels:
    """Labels beside their markers (offset, never on them), each moved to the first of a few spots
    around its marker where it overlaps no label placed before it. Placed once the axes' scales and
    limits are final (positions are in display coordinates)."""

    SPOTS = ((5, 3), (5, -11), (5, 12), (-5, 3), (-5, -11), (5, -22), (5, 22))

    def __init__(self) -> None:
        self.todo: list[tuple[str, tuple[float, float], str]] = []

    def add(self, text: str, xy: tuple[float, float], colour_: str) -> None:
        self.todo.append((text, xy, colour_))

    def place(self, ax: Any, fontsize: float = 7) -> None:
        dpi = ax.figure.dpi
        char_w, height = 0.6 * fontsize * dpi / 72, fontsize * dpi / 72  # pixels
        boxes: list[tuple[float, float, float, float]] = []
        for text, xy, colour_ in self.todo:
            x, y = ax.transData.transform(xy)
            width = char_w * len(text)
            for dx, dy in self.SPOTS:
                ox, oy = dx * dpi / 72, dy * dpi / 72
                left = x + ox if dx > 0 else x + ox - width
                box = (left, y + oy, left + width, y + oy + height)
                if not any(
                    b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in boxes
                ):
                    break
            boxes.append(box)
            ax.annotate(
                text,
                xy,
                xytext=(dx, dy),
                textcoords="offset points",
                ha="left" if dx > 0 else "right",
                fontsize=fontsize,
                color=colour_,
                annotation_clip=False,
            )


def cost_quality_plot(
    path: Path,
    points: dict[str, tuple[float, float]],
    singles: dict[str, tuple[float, float]],
    title: str,
    baselines: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """The router's settings and the single models in cost (log) x score, with each set's hull.
    The hulls are drawn as straight segments between their vertices."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5.5))
    labels = _Labels()
    costed = all(c > 0 for c, _ in [*singles.values(), *points.values()])
    grey = colour("single models")
    sx, sy = zip(*singles.values(), strict=True)
    ax.scatter(sx, sy, marker="s", color=grey, label="single models")
    for name, (c, q) in singles.items():
        labels.add(name.split("/")[-1], (c, q), grey)
    h = hull(list(singles.values()))
    ax.plot(
        [p[0] for p in h],
        [p[1] for p in h],
        color=grey,
        linestyle="--",
        linewidth=1,
        label="zero router hull (mixing single models)",
    )
    blue = colour("router")
    px, py = zip(*points.values(), strict=True)
    ax.scatter(px, py, color=blue, label="router settings")
    for name, (c, q) in points.items():
        labels.add(name, (c, q), blue)
    h = hull(list(points.values()))
    ax.plot([p[0] for p in h], [p[1] for p in h], color=blue, linewidth=1.5, label="router hull")
    for name, (c, q) in (baselines or {}).items():
        ax.scatter([c], [q], marker="D", color=colour(name), label=name, zorder=3)
    xs = [*sx, *px]
    if costed:
        ax.set_xscale("log")
        ax.set_xlim(min(xs) / 1.6, max(xs) * 4)  # room on the right for the dearest labels
    else:
        title += " (cost unknown: the file has no costs or prices)"
    ax.set(xlabel="mean cost per call (USD)", ylabel="mean score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    labels.place(ax)
    return _save(fig, path)


def heatmap(
    path: Path,
    values: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    row_key: str,
    col_key: str,
    title: str,
) -> Path:
    """A grid of shares; each number is dark on a light cell and light on a dark one."""
    plt = _plt()
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(2.4 + 1.3 * len(cols), 1.8 + 0.7 * len(rows)))
    shown = np.ma.masked_invalid(values)
    im = ax.imshow(shown, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols)
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set(xlabel=col_key, ylabel=row_key)
    ax.set_title(title, fontsize=9)
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            if not np.isfinite(v):
                ax.text(j, i, "n/a", ha="center", va="center", color="black", fontsize=8)
                continue
            r, g, b, _ = im.cmap(im.norm(v))
            light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5
            ax.text(
                j, i, f"{v:.1%}", ha="center", va="center", color="black" if light else "white", fontsize=8
            )
    fig.colorbar(im, ax=ax, format=PercentFormatter(1.0))
    fig.tight_layout()
    return _save(fig, path)
