"""``shardckpt.LocalTier``: what the user configures for the node-local tier. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from .placement import check_node_id

NODE_FIELD = "{node}"


def _positive(name: str, value: object) -> int:
    if type(value) is not int or value < 1:
        raise ValueError(f"LocalTier({name}=...) must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class LocalTier:
    """A node-local tier: each node keeps its checkpoints under ``path`` (``{node}`` becomes
    the node's id), every ``every`` steps, each rank's files on ``copies`` distinct nodes (its
    own and the next ``copies - 1``), the newest ``keep`` steps per node. ``node`` overrides the
    node id (default: ``$GROUP_RANK``, then ``$SLURM_NODEID``, then the host name)."""

    path: str
    every: int
    copies: int = 2
    keep: int = 2
    node: str | int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError(f"LocalTier(path=...) must be a non-empty string, got "
                             f"{self.path!r}")
        rest = self.path.replace(NODE_FIELD, "")
        if "{" in rest or "}" in rest:
            raise ValueError(f"LocalTier(path={self.path!r}): the only field is {NODE_FIELD}")
        _positive("every", self.every)
        _positive("copies", self.copies)
        _positive("keep", self.keep)
        if self.node is not None:
            check_node_id(self.node, "LocalTier(node=...)")

    def path_for(self, node: str) -> str:
        """This node's path: ``{node}`` replaced by the (path-safe) node id."""
        return self.path.replace(NODE_FIELD, check_node_id(node))

    def due(self, step: int) -> bool:
        return step % self.every == 0
