"""Issue 26 item 4 (report): NaN and infinite metric values are marked points, never joined by
a line; a step with a damaged file, or a corrupt manifest, shows as damaged; legends sit beside
their panel, never over its data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import shardckpt
from shardckpt.cli.main import main
from shardckpt.cli.report_cmd import _plot_metrics

VALUES = {1: 1.0, 2: 0.5, 3: float("nan"), 4: 0.25, 5: float("inf"), 6: 0.2, 7: float("-inf"),
          8: 0.1}


def rows() -> list[dict]:
    return [{"step": s, "metrics": {"loss": v if math.isfinite(v) else repr(v)}}
            for s, v in VALUES.items()]


def test_nonfinite_values_break_the_line_and_are_marked() -> None:
    fig = Figure(figsize=(8, 3), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    assert _plot_metrics(ax, rows(), ["loss"]) == ["loss"]
    (line,) = ax.get_lines()
    ys = dict(zip(line.get_xdata(), line.get_ydata()))
    assert all(math.isnan(ys[s]) for s in (3, 5, 7))  # a gap, not a line through them
    assert [ys[s] for s in (1, 2, 4, 6, 8)] == [1.0, 0.5, 0.25, 0.2, 0.1]
    marks = {c.get_label(): [float(x) for x, _ in c.get_offsets()] for c in ax.collections}
    assert marks == {"loss: NaN (top edge)": [3.0], "loss: +inf (top edge)": [5.0],
                     "loss: -inf (bottom edge)": [7.0]}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["loss", "loss: NaN (top edge)", "loss: +inf (top edge)",
                      "loss: -inf (bottom edge)"]


def test_the_legend_hides_no_data() -> None:
    fig = Figure(figsize=(8, 3), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    _plot_metrics(ax, rows(), ["loss"])
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    plot = ax.get_window_extent()
    assert legend.x0 >= plot.x1  # beside the panel, not over it


def test_damaged_and_corrupt_steps_show_as_damaged(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root), async_save=False) as mgr:
        for step, v in VALUES.items():
            mgr.save(step, {"w": torch.full((8,), float(step))}, metrics={"loss": v})
    next((root / "step-0000000002").glob("*.shard")).unlink()   # a missing file
    with open(next((root / "step-0000000004").glob("*.shard")), "ab") as f:
        f.write(b"x")                                           # a wrong size
    (root / "step-0000000006" / "manifest.json").write_text("{")  # a corrupt manifest
    capsys.readouterr()
    code = main(["report", str(root), "--out", str(tmp_path / "r.png"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 2
    assert doc["health"] == {"1": "whole", "2": "damaged", "3": "whole", "4": "damaged",
                             "5": "whole", "6": "damaged", "7": "whole", "8": "whole"}
    assert (tmp_path / "r.png").stat().st_size > 10_000
