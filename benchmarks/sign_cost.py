"""Cost of signing (issue 32): ``shardckpt sign`` and a ``trusted_keys`` load, as ratios to the
save and to a plain load of the same step, measured in the same run, interleaved.

    python benchmarks/sign_cost.py --mb 256 --repeats 3 [--dir /nvme/tmp]

Prints one JSON document: per repeat, seconds for a blocking save, for signing the step (every
file read once and hashed with SHA-256), for a plain load and for a trusted load (signature
check, one whole-file SHA-256 read of the step, then the load); and the median ratios
sign/save and trusted/plain load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import shardckpt
from shardckpt.sign import sign_step
from shardckpt.storage import open_location


def keys(where: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    (where / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    (where / "k.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(where / "k.pem"), str(where / "k.pub")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    n = args.mb * (1 << 20) // 4 // 8
    state = {f"t{i}": torch.randn(n) for i in range(8)}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        key, pub = keys(Path(tmp))
        root = str(Path(tmp) / "run")
        loc = open_location(root)
        for r in range(args.repeats):
            with shardckpt.CheckpointManager(root, async_save=False) as mgr:
                t0 = time.perf_counter()
                mgr.save(r, state)
                save_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            sign_step(loc, r, key)
            sign_s = time.perf_counter() - t0
            into = {k: torch.empty_like(v) for k, v in state.items()}
            with shardckpt.CheckpointManager(root) as mgr:
                t0 = time.perf_counter()
                mgr.load(into, step=r)
                plain_s = time.perf_counter() - t0
            with shardckpt.CheckpointManager(root, trusted_keys=[pub]) as mgr:
                t0 = time.perf_counter()
                mgr.load(into, step=r)
                trusted_s = time.perf_counter() - t0
                check_s = mgr.last_load_profile["signature_check_s"]
            rows.append({"save_s": save_s, "sign_s": sign_s, "plain_load_s": plain_s,
                         "trusted_load_s": trusted_s, "signature_check_s": check_s})
    print(json.dumps({"mb": args.mb, "runs": rows,
                      "sign_over_save": statistics.median(r["sign_s"] / r["save_s"]
                                                          for r in rows),
                      "trusted_over_plain_load": statistics.median(
                          r["trusted_load_s"] / r["plain_load_s"] for r in rows)}, indent=1))


if __name__ == "__main__":
    main()
