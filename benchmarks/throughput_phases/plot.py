"""The bar chart of ``benchmarks/throughput.py``: median seconds per phase (hatched bars are
async stalls), the targets and their verdicts alongside."""

from __future__ import annotations

from typing import Any

from common.output import pyplot


def plot(doc: dict[str, Any], path: str) -> None:
    """Draw the medians of ``doc`` (the benchmark's JSON document) into the PNG ``path``."""
    plt = pyplot()
    labels, values, colors = [], [], []
    palette = {"shardckpt": "#1f77b4", "dcp": "#ff7f0e", "raw": "#7f7f7f", "memcpy": "#2ca02c"}
    for p, m in doc["medians"].items():
        if "time_s" not in m:
            continue
        color = next((c for k, c in palette.items() if p.startswith(k)), "#9467bd")
        if "stall_s" in m:
            labels += [f"{p}\nstall", f"{p}\ncommit"]
            values += [m["stall_s"], m["commit_s"]]
            colors += [color, color]
        else:
            labels.append(p)
            values.append(m["time_s"])
            colors.append(color)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(labels) + 4), 6.5))
    bars = ax.bar(range(len(values)), values, color=colors)
    for i, b in enumerate(bars):
        if "\nstall" in labels[i]:
            b.set_hatch("//")
        ax.annotate(f"{values[i]:.3g} s", (b.get_x() + b.get_width() / 2, values[i]),
                    ha="center", va="bottom", fontsize=8)
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("median seconds (max over ranks)")
    cfg, mach = doc["config"], doc["machine"]
    ax.set_title(f"shardckpt {doc['git']['commit']}: {cfg['state_bytes_total'] / 1e9:.2f} GB "
                 f"FSDP2+AdamW, {cfg['world_size']} ranks, {cfg['reps']} reps, "
                 f"{mach['disk']['fstype']}{'' if mach['fsync'] else ' (no fsync)'}", fontsize=10)
    lines = []
    for tg in doc["targets"]:
        v = tg["value"]
        mark = "n/a" if tg["pass"] is None else ("PASS" if tg["pass"] else "FAIL")
        lines.append(f"{tg['target']}: {'-' if v is None else f'{v:.2f}x'} {mark}")
    ax.text(1.01, 1.0, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=8,
            family="monospace", bbox={"boxstyle": "round", "fc": "white", "ec": "0.7"})
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)

