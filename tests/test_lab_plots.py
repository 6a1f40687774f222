"""The lab's plots read right (issue 17): one colour per strategy everywhere, titles that name the
file and the settings, labels beside their markers and inside the picture, the hull as straight
segments, heatmap numbers legible on their cells; paths printed; a file without costs says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from gateway.lab import plots
from gateway.lab.commands import replay, sweep
from gateway.lab.report import Trace, hull
from gateway.lab.runner import Options
from tests.test_lab import outcome, write_replay


@pytest.fixture
def saved(monkeypatch) -> dict[str, Figure]:
    """Every figure the lab saves, by file name, kept for inspection after it is written."""
    figures: dict[str, Figure] = {}
    original = Figure.savefig

    def keep(self: Figure, fname, *args, **kwargs):
        figures[Path(str(fname)).name] = self
        self._saved_tight = kwargs.get("bbox_inches") == "tight"  # type: ignore[attr-defined]
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def trace(name: str, n: int, seed: int, costs: bool = True) -> Trace:
    rng = np.random.default_rng(seed)
    return Trace(name, ["m"] * n, rng.random(n), rng.random(n) / 100 if costs else np.zeros(n))


def lines_by_label(fig: Figure) -> dict[str, list[tuple[float, float, float]]]:
    out: dict[str, list[tuple[float, float, float]]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out.setdefault(line.get_label(), []).append(to_rgb(line.get_color()))
    return out


def test_one_colour_per_strategy_in_every_plot_and_titles(tmp_path, saved):
    n = 30
    names = ["best_single", "cheapest", "oracle", "random", "round_robin", "original_proxy"]
    base = {name: trace(name, n, i) for i, name in enumerate(names)}
    plots.replay_plots(tmp_path, trace("auto", n, 9), base, ["m", "k"], "tiny: 30 prompts; COST_WEIGHT=-0.1")
    first = lines_by_label(saved["score_cost.png"])
    assert {saved[f].get_suptitle() for f in ("score_cost.png", "model_share.png", "regret.png")} == {
        "tiny: 30 prompts; COST_WEIGHT=-0.1"
    }
    # a second run with the baselines in another order: the colours stay
    plots.replay_plots(tmp_path, trace("auto", n, 9), dict(reversed(base.items())), ["m", "k"], "again")
    colours: dict[str, set] = {}
    for lines in (first, lines_by_label(saved["score_cost.png"]), lines_by_label(saved["regret.png"])):
        for label, cs in lines.items():
            colours.setdefault(label, set()).update(cs)
    assert set(first) == {"auto", *names}
    assert all(len(cs) == 1 for cs in colours.values()), colours  # the same everywhere
    assert len({next(iter(cs)) for cs in colours.values()}) == len(colours)  # and one each


def test_cost_quality_labels_sit_beside_their_markers_and_the_hull_is_straight(tmp_path, saved):
    singles = {
        "gpt-4-1106-preview": (5e-3, 0.87),
        "mistralai/mistral-7b-chat": (8e-5, 0.58),
        "zero-one-ai/Yi-34B-Chat": (3e-4, 0.77),
        "mixtral-8x7b-chat": (2.4e-4, 0.74),
    }
    points = {
        "cost_weight=0": (4.5e-3, 0.86),
        "cost_weight=-0.1": (1e-3, 0.8),
        "cost_weight=-0.4": (1.6e-4, 0.7),
    }
    plots.cost_quality_plot(
        tmp_path / "cq.png", points, singles, "rb: grid cost_weight", {"random": (1e-3, 0.6)}
    )
    fig = saved["cq.png"]
    ax = fig.axes[0]
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    # what the PNG shows: the whole drawing when saved with a tight box, else the figure's own box
    figure_box = (
        fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans) if fig._saved_tight else fig.bbox
    )
    texts = [t for t in ax.texts if t.get_text()]
    assert {t.get_text() for t in texts} >= {"gpt-4-1106-preview", "cost_weight=0"}
    boxes = []
    for t in texts:
        assert t.xyann != (0, 0)  # offset from the marker, never on it
        box = t.get_window_extent(renderer)
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 * 1.0001  # not clipped by the figure
        boxes.append(box)
    overlaps = sum(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert overlaps == 0
    router_hull = next(line for line in ax.get_lines() if line.get_label() == "router hull")
    assert list(zip(router_hull.get_xdata(), router_hull.get_ydata(), strict=True)) == hull(
        list(points.values())
    )
    assert "rb: grid cost_weight" in ax.get_title()


def test_heatmap_numbers_read_on_their_cells(tmp_path, saved):
    values = np.array([[0.75, 0.80], [0.90, 0.99]])
    plots.heatmap(tmp_path / "h.png", values, ["a", "b"], ["x", "y"], "r", "c", "file: title")
    ax = saved["h.png"].axes[0]
    image = ax.images[0]
    for t in ax.texts:
        x, y = t.get_position()
        r, g, b, _ = image.cmap(image.norm(values[round(y), round(x)]))
        background = 0.299 * r + 0.587 * g + 0.114 * b
        text = (
            0.299 * to_rgb(t.get_color())[0]
            + 0.587 * to_rgb(t.get_color())[1]
            + 0.114 * to_rgb(t.get_color())[2]
        )
        assert abs(background - text) > 0.4, (t.get_text(), background, text)  # contrast


@pytest.fixture
def free_file(tmp_path) -> Path:
    """No costs and no prices: scores only."""
    records = [
        {
            "id": str(i),
            "messages": [{"role": "user", "content": f"Is {i} a prime number?"}],
            "outcomes": {"x": outcome(float(i % 2)), "y": outcome(1.0)},
        }
        for i in range(30)
    ]
    return write_replay(tmp_path / "free.jsonl", records)


def test_a_file_without_costs_reports_scores_and_says_cost_is_unknown(
    free_file, tmp_path, data_dir, st_model, capsys, saved
):
    options = Options(store="memory", data_dir=data_dir)
    report = replay(str(free_file), options, str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert "nan" not in out and "cost: unknown (free has no costs or prices)" in out
    assert report["strategies"]["auto"]["all"]["mean_score"] > 0
    assert "plots: " + str(tmp_path / "out" / "score_cost.png") in out
    fig = saved["score_cost.png"]
    assert len(fig.axes) == 1 and any("cost unknown" in t.get_text() for t in fig.axes[0].texts)
    assert "free: 30 prompts" in fig.get_suptitle() and "default settings" in fig.get_suptitle()


def test_sweep_prints_its_plot_paths(free_file, tmp_path, data_dir, st_model, capsys):
    options = Options(store="memory", data_dir=data_dir, limit=20)
    report = sweep(
        str(free_file), ["COST_WEIGHT=0,-0.5", "policy=knn_ts,lin_ts"], options, str(tmp_path / "sw")
    )
    out = capsys.readouterr().out
    assert "nan" not in out
    printed = out.split("plots: ", 1)[1].split()
    assert printed == report["plots"] and all(Path(p).is_file() for p in printed)
    assert json.loads((tmp_path / "sw" / "report.json").read_text())["plots"] == printed


def test_the_labs_loopback_gateway_does_not_warn_that_it_is_open(fake, gateway, caplog):
    from gateway.lab.runner import LAB_DEFAULTS
    from tests.conftest import make_settings, model

    caplog.set_level("WARNING", logger="gateway")
    gateway(make_settings([model("a", fake.url())], host=LAB_DEFAULTS["host"]))
    assert not [r for r in caplog.records if "is OPEN" in r.getMessage()]
    gateway(make_settings([model("a", fake.url())], host="0.0.0.0"))  # reachable from elsewhere: warned
    assert [r for r in caplog.records if "is OPEN" in r.getMessage()]
