"""Shared helpers of the incremental-save tests: a LoRA-style state, manifest surgery, loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import xxhash

import shardckpt
from shardckpt.storage import step_dirname

BASE_SHAPE = (64, 1024)  # x 4 layers of float32: 1 MiB frozen
ADAPTER_SHAPE = (64, 8)


def lora_state(step: int, layers: int = 4) -> dict[str, Any]:
    """A frozen base (the same bytes every step), adapters and their AdamW moments (new bytes
    every step), and a step counter."""
    base = torch.Generator().manual_seed(0)
    g = torch.Generator().manual_seed(1000 + step)
    model = {f"layers.{i}.weight": torch.randn(*BASE_SHAPE, generator=base)
             for i in range(layers)}
    for i in range(layers):
        model[f"layers.{i}.lora_A"] = torch.randn(*ADAPTER_SHAPE, generator=g)
        model[f"layers.{i}.lora_B"] = torch.randn(*ADAPTER_SHAPE[::-1], generator=g)
    optim = {f"{k}.{m}": torch.randn(*v.shape, generator=g) for k, v in model.items()
             if "lora" in k for m in ("exp_avg", "exp_avg_sq")}
    return {"model": model, "optim": optim, "step": step}


def zeros_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros_like(v) for k, v in state.items()}
    return type(state)(0)


def assert_bit_equal(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{path} differs"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for k in want:
            assert_bit_equal(got[k], want[k], f"{path}/{k}")
    else:
        assert got == want, path


def mismatched_keys(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Keys of ``want["model"]`` and ``want["optim"]`` whose loaded tensor in ``got`` differs
    bit for bit (a DTensor is compared whole)."""
    bad = []
    for k, v in want["model"].items():
        g = got["model"][k]
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        if not torch.equal(g.view(torch.uint8), v.view(torch.uint8)):
            bad.append(k)
    return bad + [k for k, v in want["optim"].items() if not torch.equal(got["optim"][k], v)]


def load_step(root: str, step: int, want: dict[str, Any], **kw: Any) -> None:
    with shardckpt.CheckpointManager(root, async_save=False, **kw) as mgr:
        got = zeros_like(want)
        assert mgr.load(got, step=step) == step
    assert_bit_equal(got, want)


def adapter_bytes(state: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for k, v in state["model"].items() if "lora" in k) \
        + sum(v.numel() * v.element_size() for v in state["optim"].values())


def read_doc(root: str | Path, step: int) -> dict[str, Any]:
    path = Path(root) / step_dirname(step) / "manifest.json"
    doc = json.loads(path.read_bytes())
    del doc["checksum"]
    return doc


def write_doc(root: str | Path, step: int, doc: dict[str, Any]) -> None:
    """Write a manifest with a valid checksum, whatever it says (the checksum catches
    accidents, not attackers)."""
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    prefix = body[:-1]
    data = prefix + b',"checksum":"' + xxhash.xxh3_64_hexdigest(prefix).encode() + b'"}\n'
    (Path(root) / step_dirname(step) / "manifest.json").write_bytes(data)


def root_bytes(root: str | Path) -> int:
    """Bytes of every file under the root but the control folder (allocated, so that holes
    punched in a file do not count)."""
    total = 0
    for p in Path(root).rglob("*"):
        if p.is_file() and ".shardckpt" not in p.relative_to(root).parts[0]:
            st = p.stat()
            total += min(st.st_size, st.st_blocks * 512)
    return total
