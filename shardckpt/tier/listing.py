"""What one node's local path holds, for ``shardckpt ls`` / ``verify`` on it: each local step,
the ranks whose files the node holds (its own, or a peer copy) and their health, judged against
``holdings.json`` (sizes, trailers and header checksums). Torch-free; small reads only."""

from __future__ import annotations

from typing import Any

from ..errors import ShardckptError
from ..storage import Location
from .holdings import check_holdings, read_holdings


def node_steps(location: Location) -> list[dict[str, Any]]:
    """One JSON-ready record per step directory, ascending: ``{"step", "node", "health":
    "ok" | "damaged" | "incomplete" | "corrupt", "nbytes", "ranks": [{"rank", "copy": "own" |
    "peer", "nbytes", "health": "ok" | why}], "detail"}``."""
    out: list[dict[str, Any]] = []
    for step, step_dir in sorted(location.list_step_dirs().items()):
        record: dict[str, Any] = {"step": step, "node": None, "health": "ok", "nbytes": 0,
                                  "ranks": [], "detail": ""}
        try:
            holdings = read_holdings(location, step_dir)
        except FileNotFoundError:
            record.update(health="incomplete", detail=f"{location.display}/{step_dir}: no "
                                                      f"holdings.json (a save that did not finish)")
            out.append(record)
            continue
        except ShardckptError as exc:
            record.update(health="corrupt", detail=str(exc))
            out.append(record)
            continue
        checks = check_holdings(location, holdings)
        record.update(node=holdings.node, nbytes=holdings.nbytes)
        for rank, files in sorted(holdings.ranks.items()):
            own = holdings.node_map.nodes[rank] == holdings.node
            record["ranks"].append({"rank": rank, "copy": "own" if own else "peer",
                                    "nbytes": sum(f.nbytes for f in files.values()),
                                    "health": checks[rank] or "ok"})
        bad = [why for why in checks.values() if why]
        if bad:
            record.update(health="damaged", detail="; ".join(bad))
        out.append(record)
    return out
