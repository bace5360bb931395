"""What a save adds to the user's state, under reserved keys: the RNG streams (restored by
``load`` at the same world size) and the golden-batch record of ``verify``."""

from __future__ import annotations

from typing import Any

from .format import manifest as M
from .format.manifest import RESERVED_PREFIX
from .golden import GOLDEN_KEY, Golden
from .golden import record as record_golden
from .repro import capture_rng_state, restore_rng_state

RNG_KEY = "__shardckpt_rng__"


def with_extras(state: dict[str, Any], capture_rng: bool, golden: Golden | None,
                extra: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state`` with the reserved entries added (``extra`` gets the golden spec);
    ``ValueError`` if the user's state already uses a reserved key."""
    reserved = [k for k in state if isinstance(k, str) and k.startswith(RESERVED_PREFIX)]
    if reserved:
        raise ValueError(f"state keys starting with {RESERVED_PREFIX!r} are reserved: "
                         f"{reserved}")
    state = dict(state)
    rng = capture_rng_state() if capture_rng else None
    if golden is not None:
        state[GOLDEN_KEY] = record_golden(golden, state)
        extra["golden"] = golden.spec()
        if rng is not None:
            restore_rng_state(rng)  # golden forward passes must not move RNG streams
    if rng is not None:
        state[RNG_KEY] = rng
    return state


def has_key(manifest: M.Manifest, key: str) -> bool:
    """Whether ``key`` is a top-level key of the checkpoint's tree."""
    tree = manifest.tree
    return isinstance(tree, list) and len(tree) == 2 and isinstance(tree[1], dict) and \
        key in tree[1]
