"""``shardckpt report ROOT --out FILE``: a run's history as a PNG, or an HTML page around it.

Everything comes from what the root holds: each committed step's manifest (size, commit time,
metrics, tags, world size, the save's timing) and its ``verification.json`` (see ``verify``).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..textfile import write_textfile

if TYPE_CHECKING:
    from ..format import manifest as M
    from ..storage import Location
from .progress import bar, wanted

_EPILOG = """\
The report has four panels, one point per committed step (x axis: step):
  size       bytes of the checkpoint (its shards)
  save time  seconds, from the timing that save() records in each manifest (extra.timing):
               total = commit time - time save() was called
               write = commit time - time the snapshot was ready (the background write)
               stall = how long save() blocked the training loop (blocking saves: the total)
             The manifest is written as part of the commit, so these stop at the moment the
             manifest was built: the final rename and fsync (milliseconds) are not included.
             Checkpoints saved by versions that did not record timing have no save time; the
             report does not guess one from the gaps between commit times (those include
             training). Exact live figures, including the commit, are in the log records and
             the metrics textfile of CheckpointManager(metrics_path=...).
  metrics    the metrics passed to save() (all of them, or those named by --metric); a NaN
             or infinite value breaks the line and is marked at the panel's edge (NaN, +inf at
             the top, -inf at the bottom)
  status     health (whole / degraded: a copy missing somewhere, or a degraded save / damaged:
             missing or wrong-size files, or a corrupt manifest), pinned and other tags, and
             the verdict of the last 'shardckpt verify' of the step (ok / failed / not verified)
Legends sit beside their panel, never over the data.
--out FILE.png writes the PNG; --out FILE.html an HTML page with the PNG embedded (base64) and
a table of the steps. --json prints a summary of what was plotted, per step.
Needs matplotlib (pip install 'shardckpt[report]').

exit codes: 0 written; 2 a corrupt manifest was found (reported; the rest plotted);
64 usage error (unknown root, no committed checkpoint, bad --out); 70 internal error.
"""

FORMATS = {".png": "png", ".html": "html", ".htm": "html"}


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("root", metavar="ROOT", help="checkpoint root: a path or fsspec URL")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="file to write: FILE.png (a PNG) or FILE.html (a page embedding it)")
    p.add_argument("--metric", action="append", default=None, metavar="NAME",
                   help="plot only this metric (repeatable; default: every metric)")


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def timing_of(m: M.Manifest) -> dict[str, float | None]:
    """save/write/stall seconds from the manifest's ``extra["timing"]`` (None where unknown).
    The manifest is input like any other: anything malformed counts as unknown."""
    t = m.extra.get("timing")
    out: dict[str, float | None] = {"save_s": None, "write_s": None, "stall_s": None}
    if not isinstance(t, dict) or not math.isfinite(m.unix_time):
        return out
    called, ready = _number(t.get("called_unix_time")), _number(t.get("ready_unix_time"))
    if called is not None and m.unix_time >= called:
        out["save_s"] = m.unix_time - called
    if ready is not None and m.unix_time >= ready:
        out["write_s"] = m.unix_time - ready
    stall = _number(t.get("stall_s"))
    if stall is not None and stall >= 0:
        out["stall_s"] = stall
    elif t.get("blocking") is True:
        out["stall_s"] = out["save_s"]
    return out


def collect(locs: Sequence[Location], progress: bool
            ) -> tuple[list[dict[str, Any]], list[str], dict[int, str]]:
    """One row per committed step, the problems met, and the steps whose manifest is corrupt
    everywhere (step -> error: shown as damaged)."""
    from ..format import manifest as M
    from ..verify.record import verified
    from . import health

    survey = health.survey(list(locs), progress=progress)
    rows: list[dict[str, Any]] = []
    previous: float | None = None
    for step, entry in bar(sorted(survey.steps.items()), desc="verification records",
                           total=len(survey.steps), enabled=progress, unit="step"):
        m = entry.manifest
        timing = timing_of(m)
        write_s = timing["write_s"]
        rows.append({
            "step": step, "time": m.time, "unix_time": m.unix_time, "nbytes": m.nbytes,
            "world_size": m.world_size,
            "metrics": {k: M.encode_float(v) for k, v in m.metrics.items()},
            "tags": list(m.tags), "pinned": "pinned" in m.tags,
            "verified": verified(locs[0], m),
            "health": {loc.display: h for loc, h in zip(locs, entry.health)},
            "healthy": all(h == "ok" for h in entry.health),
            "degraded": bool(m.extra.get("degraded", False)),
            **timing,
            "throughput_bytes_per_s": (m.nbytes / write_s if write_s else None),
            "since_previous_s": None if previous is None else m.unix_time - previous,
        })
        previous = m.unix_time
    return rows, list(survey.problems), dict(survey.corrupt)


def _float(v: Any) -> float | None:
    """A metric value from a row (encoded: NaN/inf as strings) as a finite float, or None."""
    return v if isinstance(v, float) and math.isfinite(v) else \
        float(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _scale(values: Sequence[float]) -> tuple[float, str]:
    top = max(values, default=0)
    for div, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if top >= div:
            return float(div), unit
    return 1.0, "B"


def _legend(ax: Any) -> None:
    """The legend beside the panel, never over its data (constrained layout makes room)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False,
              borderaxespad=0.0)


def _state(row: dict[str, Any]) -> str:
    """``whole`` / ``degraded`` (a location lacks it, another has it whole, or its manifest
    says the save was degraded) / ``damaged`` (missing or wrong-size files somewhere)."""
    states = set(row["health"].values())
    if states - {"ok", "absent", "unreachable"}:
        return "damaged"
    return "whole" if states == {"ok"} and not row.get("degraded") else "degraded"


def nonfinite(v: Any) -> float | None:
    """A metric value from a row that is NaN or infinite (stored as "nan", "inf", "-inf")."""
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return v
    return None


def _plot_metrics(ax: Any, rows: list[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """One line per metric, broken where a value is NaN or infinite; those values are marked
    at the panel's top (NaN, +inf) or bottom (-inf) edge, never joined by a line. Returns the
    metrics drawn (those with at least one finite value)."""
    from matplotlib.transforms import blended_transform_factory

    edge = blended_transform_factory(ax.transData, ax.transAxes)
    plotted: list[str] = []
    marked = False
    for name in names:
        pts = [(r["step"], r["metrics"][name]) for r in rows if name in r["metrics"]]
        ys = [_float(v) for _, v in pts]
        marks: dict[str, list[int]] = {"nan": [], "inf": [], "-inf": []}
        for (step, v), y in zip(pts, ys):
            bad = nonfinite(v)
            if y is None and bad is not None:
                marks["nan" if math.isnan(bad) else "inf" if bad > 0 else "-inf"].append(step)
        color = None
        if any(y is not None for y in ys):
            plotted.append(name)
            (line,) = ax.plot([s for s, _ in pts], [math.nan if y is None else y for y in ys],
                              marker=".", ms=4, lw=1.0, label=name)
            color = line.get_color()
        for key, y, marker, label in (("nan", 0.96, "X", "NaN (top edge)"),
                                      ("inf", 0.96, "^", "+inf (top edge)"),
                                      ("-inf", 0.04, "v", "-inf (bottom edge)")):
            if marks[key]:
                marked = True
                ax.scatter(marks[key], [y] * len(marks[key]), marker=marker, s=60,
                           color=color or "tab:red", edgecolors="black", linewidths=0.5,
                           transform=edge, clip_on=False, zorder=5, label=f"{name}: {label}")
    if plotted or marked:
        _legend(ax)
    else:
        ax.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax.transAxes,
                color="gray")
    return plotted


def render_png(rows: list[dict[str, Any]], metric_names: Sequence[str], title: str,
               corrupt: Sequence[int] = ()) -> tuple[bytes, tuple[int, int], list[str]]:
    """The figure as PNG bytes, its (width, height) in pixels, and the metrics drawn (those
    with at least one finite value). ``corrupt``: steps whose manifest is corrupt, marked
    damaged in the status panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(11, 11), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_size, ax_time, ax_metrics, ax_status = fig.subplots(
        4, 1, sharex=True, gridspec_kw={"height_ratios": [3, 3, 3, 2]})
    fig.suptitle(title, fontsize=11)

    div, unit = _scale([r["nbytes"] for r in rows])
    ax_size.plot(steps, [r["nbytes"] / div for r in rows], marker="o", ms=3, lw=1.2,
                 color="tab:blue", label="checkpoint size")
    ax_size.set_ylabel(f"size ({unit})")
    ax_size.set_ylim(bottom=0)
    ax_size.grid(alpha=0.3)
    _legend(ax_size)

    have_timing = False
    for key, label, color in (("save_s", "total (save() call to commit)", "tab:purple"),
                              ("write_s", "write (snapshot to commit)", "tab:orange"),
                              ("stall_s", "stall (save() blocked the caller)", "tab:red")):
        pts = [(r["step"], r[key]) for r in rows if r[key] is not None]
        if pts:
            have_timing = True
            ax_time.plot(*zip(*pts), marker=".", ms=4, lw=1.0, label=label, color=color)
    if have_timing:
        _legend(ax_time)
        ax_time.set_ylim(bottom=0)
    else:
        ax_time.text(0.5, 0.5, "no save timing recorded in these manifests", ha="center",
                     va="center", transform=ax_time.transAxes, color="gray")
    ax_time.set_ylabel("save time (s)")
    ax_time.grid(alpha=0.3)

    plotted = _plot_metrics(ax_metrics, rows, metric_names)
    ax_metrics.set_ylabel("metrics")
    ax_metrics.grid(alpha=0.3)

    lanes = ["health", "pinned", "tags", "verified"]
    y = {name: len(lanes) - 1 - i for i, name in enumerate(lanes)}

    def lane(name: str, pts: list[int], **kw: Any) -> None:
        if pts:
            ax_status.scatter(pts, [y[name]] * len(pts), **kw)

    lane("health", [r["step"] for r in rows if _state(r) == "whole"], marker="s", s=18,
         color="tab:green", label="whole at every location")
    lane("health", [r["step"] for r in rows if _state(r) == "degraded"], marker="s", s=24,
         color="tab:orange", label="degraded: a copy missing, whole elsewhere")
    lane("health", [r["step"] for r in rows if _state(r) == "damaged"] + list(corrupt),
         marker="X", s=50,
         color="tab:red", label="damaged: missing, wrong-size or corrupt files")
    lane("pinned", [r["step"] for r in rows if r["pinned"]], marker="*", s=90,
         color="goldenrod", label="pinned")
    others = [r for r in rows if any(t != "pinned" for t in r["tags"])]
    lane("tags", [r["step"] for r in others], marker="D", s=18, color="tab:gray",
         label="other tags")
    if len(others) <= 40:
        for r in others:
            ax_status.annotate(",".join(t for t in r["tags"] if t != "pinned")[:24],
                               (r["step"], y["tags"]), textcoords="offset points",
                               xytext=(0, 5), ha="center", fontsize=7, color="dimgray")
    lane("verified", [r["step"] for r in rows if r["verified"] == "ok"], marker="o", s=24,
         color="tab:green", label="verified ok")
    lane("verified", [r["step"] for r in rows if r["verified"] == "failed"], marker="X",
         s=40, color="tab:red", label="verification failed")
    ax_status.set_yticks([y[n] for n in lanes], lanes)
    ax_status.set_ylim(-0.7, len(lanes) - 0.3)
    ax_status.set_xlabel("step")
    ax_status.grid(axis="x", alpha=0.3)
    _legend(ax_status)
    if len(steps) == 1:
        ax_status.set_xlim(steps[0] - 1, steps[0] + 1)

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    width, height = fig.canvas.get_width_height(physical=True)
    return buf.getvalue(), (int(width), int(height)), plotted


def render_html(png: bytes, rows: list[dict[str, Any]], title: str,
                metric_names: Sequence[str]) -> str:
    e = html.escape

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return e(str(v))

    head = ["step", "time", "size (bytes)", "world", "save s", "write s", "stall s",
            *metric_names, "tags", "verified", "health"]
    lines = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;"
        "font-size:0.85em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "th{background:#eee}img{max-width:100%}</style>",
        "</head>", "<body>", f"<h1>{e(title)}</h1>",
        f'<img alt="checkpoint history" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}">',
        "<h2>Checkpoints</h2>", "<table>",
        "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        states = sorted(set(r["health"].values()))
        vals = [r["step"], r["time"], r["nbytes"], r["world_size"], r["save_s"], r["write_s"],
                r["stall_s"], *(r["metrics"].get(n) for n in metric_names),
                " ".join(r["tags"]) or None, r["verified"], ",".join(states)]
        lines.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in vals) + "</tr>")
    lines += ["</table>", "</body>", "</html>", ""]
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
    import sys

    from .common import UsageError, check_out_path, emit, open_locations

    fmt = FORMATS.get(os.path.splitext(args.out)[1].lower())
    if fmt is None:
        raise UsageError(f"--out {args.out}: must end in .png or .html")
    check_out_path(args.out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("report needs matplotlib (pip install 'shardckpt[report]')") from None
    locs = open_locations([args.root, *args.replica])
    rows, problems, corrupt = collect(locs, wanted(args))
    for problem in problems:
        print(f"shardckpt report: {problem}", file=sys.stderr)
    if not rows:
        raise UsageError(f"{locs[0].display}: no committed checkpoint to report on")
    available = sorted({k for r in rows for k in r["metrics"]})
    if args.metric:
        unknown = [n for n in args.metric if n not in available]
        if unknown:
            raise UsageError(f"--metric {', '.join(unknown)}: not recorded by any step "
                             f"(recorded: {', '.join(available) or 'none'})")
        names = list(dict.fromkeys(args.metric))
    else:
        names = available
    title = (f"{locs[0].display}: {len(rows)} checkpoint{'s' * (len(rows) != 1)}, steps "
             f"{rows[0]['step']}-{rows[-1]['step']}")
    png, (width, height), plotted = render_png(rows, names, title, sorted(corrupt))
    data = png if fmt == "png" else render_html(png, rows, title, names).encode("utf-8")
    write_textfile(args.out, data)
    timed = [r["step"] for r in rows if r["save_s"] is not None]
    if args.json:
        emit({"root": locs[0].display, "out": args.out, "format": fmt, "width": width,
              "height": height, "bytes_written": len(data),
              "panels": ["size", "save_time", "metrics", "status"], "metrics": plotted,
              "metrics_without_finite_values": [n for n in names if n not in plotted],
              "timing_source": "manifest extra.timing", "steps_with_timing": timed,
              "pinned": [r["step"] for r in rows if r["pinned"]],
              "verified": {str(r["step"]): r["verified"] for r in rows},
              "health": {str(r["step"]): _state(r) for r in rows} |
              {str(s): "damaged" for s in corrupt},
              "problems": problems, "steps": rows})
    else:
        print(f"wrote {args.out} ({fmt}, {width}x{height} px): {len(rows)} checkpoints, "
              f"{len(timed)} with save timing, {len(plotted)} metric{'s' * (len(plotted) != 1)}")
    return 2 if problems else 0
