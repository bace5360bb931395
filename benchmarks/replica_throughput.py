"""Blocking-save throughput to a local disk alone vs local disk + an S3 replica, in one run.

S3 is a moto server on 127.0.0.1 started here (the only S3 this machine may reach); on a real
bucket point --s3-url and the usual FSSPEC_S3_* / AWS_* variables at it instead. Prints JSON.

    .venv/bin/python benchmarks/replica_throughput.py --size-mb 256 --reps 3 --dir /work/bench_tmp
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import torch

import shardckpt

from common.output import write_outputs
from common.rounds import interleaved_rounds, medians


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--s3-url", default=None, help="s3://bucket/prefix (default: local moto)")
    args = ap.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    proc, options = None, {}
    if args.s3_url is None:
        proc, endpoint = start_moto()
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=bucket)
        options = {"s3://": {"endpoint_url": endpoint,
                             "client_kwargs": {"region_name": "us-east-1"}}}
        s3_root = f"s3://{bucket}/run"
    else:
        s3_root = args.s3_url.rstrip("/")
    n = args.size_mb * (1 << 20) // 4 // 8
    state = {f"w{i}": torch.randn(n) for i in range(8)}
    nbytes = sum(t.numel() * 4 for t in state.values())
    base = tempfile.mkdtemp(dir=args.dir, prefix="replica-bench-")

    def save(name: str, rep: int) -> float:
        replicas = [f"{s3_root}/{rep}"] if name == "local+s3" else []
        with shardckpt.CheckpointManager(os.path.join(base, f"{name}-{rep}"),
                                         replicas=replicas, storage_options=options,
                                         capture_rng=False) as mgr:
            start = time.perf_counter()
            mgr.save(1, state, blocking=True)
            return time.perf_counter() - start

    try:  # A, B then B, A: drift on a shared machine hits both alike
        times = interleaved_rounds(["local", "local+s3"], args.reps, save)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if proc is not None:
            proc.kill()
    med = medians(times)
    write_outputs({"nbytes": nbytes, "reps": args.reps, "s3": "moto on 127.0.0.1"
                   if args.s3_url is None else "given", "median_s": med,
                   "gbps": {k: nbytes / v / 1e9 for k, v in med.items()},
                   "local_plus_s3_over_local": med["local"] / med["local+s3"]})


if __name__ == "__main__":
    main()
