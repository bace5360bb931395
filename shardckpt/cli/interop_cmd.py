"""``shardckpt export`` (safetensors, torch, Hugging Face, DCP) and ``shardckpt import-dcp``."""

from __future__ import annotations

import argparse
from typing import Any

from ..textfile import human_bytes
from .argtypes import step_arg
from .progress import Bar, wanted

EXPORT_EPILOG = """\
formats: safetensors (one file, {"format": "pt"} metadata), torch (torch.save of a dict of
tensors), hf (a Hugging Face model folder: model.safetensors, or model-0000i-of-0000n.safetensors
and model.safetensors.index.json above --max-shard-size; --dtype, --config), dcp (a DCP
checkpoint folder that torch.distributed.checkpoint.load reads). Tensor names are the state's
key paths; --only PREFIX keeps those under PREFIX and strips it (--only model gives a model's own
state_dict names). Without --step: the newest step directory holding a manifest (a corrupt one
exits 2). --out for hf and dcp is a folder: new, empty, or a previous export of that format
holding no file that export did not write (a config.json of yours, a tokenizer): exit 64 unless
--force. An existing --out file (safetensors, torch) is not replaced unless --force.

exit codes: 0 written; 2 corrupt, missing or incomplete checkpoint; 64 usage error (bad option,
--out in the way or not ours to replace, nothing under --only); 70 storage or internal error.
"""

_IMPORT_EPILOG = """\
A DCP checkpoint's .metadata and its non-tensor items are Python pickles, which can run code
when read. shardckpt never unpickles unless told to: without --trust-pickle the command stops
(exit 64). With it, the checkpoint is read through torch.distributed.checkpoint's own API in
this one process, non-tensor items with weights_only=True, and written as step N of ROOT
(nested as it was saved: {"model": ..., "optim": ...}). The whole state is held in memory.

exit codes: 0 imported; 64 refused (no --trust-pickle, step already committed, a value shardckpt
cannot store); 70 storage or internal error.
"""


def cmd_export(args: argparse.Namespace) -> int:
    from ..exporter import export_step
    from ..interop import ConversionError
    from .common import UsageError, emit, open_locations

    options: dict[str, Any] = {k: getattr(args, k) for k in ("max_shard_size", "dtype", "config")
                               if getattr(args, k) is not None}
    if options and args.format != "hf":
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise UsageError(f"{flags}: only with --format hf")
    bar = Bar(desc="export", total=None, enabled=False)

    def on_plan(step: int, nbytes: int) -> None:
        nonlocal bar
        bar = Bar(desc=f"export step {step}", total=nbytes, enabled=wanted(args), unit="B",
                  unit_scale=True)

    try:
        locs = open_locations([args.root, *args.replica], warn="export")
        result = export_step(locs, args.step, args.format, args.out, args.only, options,
                             on_read=lambda n: bar.update(n), on_plan=on_plan,
                             overwrite=bool(getattr(args, "force", False)))
    except ConversionError as exc:
        raise UsageError(str(exc)) from None
    finally:
        bar.close()
    from ..audit import record_export  # issue 32: the audit trail (never raises)

    record_export(locs[0], result)
    doc: dict[str, Any] = {"step": result.step, "format": result.format, "out": result.out,
                           "tensors": result.tensors, "nbytes": result.nbytes}
    if result.format in ("hf", "dcp"):
        doc["files"] = list(result.files)
    if args.json:
        emit(doc)
    else:
        where = result.out if result.format in ("safetensors", "torch") else \
            f"{result.out} ({', '.join(result.files)})"
        print(f"wrote {result.tensors} tensors ({human_bytes(result.nbytes)}) of step "
              f"{result.step} to {where}")
    return 0


def add_import_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _IMPORT_EPILOG
    p.add_argument("dcp_dir", metavar="DCP_DIR", help="folder of a DCP checkpoint (holds "
                   ".metadata)")
    p.add_argument("root", metavar="ROOT", help="shardckpt root to write into (a path or fsspec "
                   "URL; created if missing)")
    p.add_argument("--step", type=step_arg, required=True, metavar="N",
                   help="step number of the new checkpoint")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read DCP's pickled metadata (required: see below)")


def cmd_import_dcp(args: argparse.Namespace) -> int:
    from ..interop import ConversionError
    from ..interop.dcp import import_dcp
    from .common import UsageError, emit

    try:
        result = import_dcp(args.dcp_dir, args.root, args.step, trust_pickle=args.trust_pickle,
                            replicas=args.replica)
    except ConversionError as exc:
        raise UsageError(str(exc)) from None
    from ..audit import record_import  # issue 32: the audit trail (never raises)
    from ..storage import open_location

    record_import(open_location(args.root), result)
    if args.json:
        emit({"step": result.step, "root": result.root, "source": result.source,
              "tensors": result.tensors, "values": result.values, "nbytes": result.nbytes})
    else:
        print(f"imported {result.tensors} tensors ({human_bytes(result.nbytes)}) and "
              f"{result.values} other values from {result.source} as step {result.step} of "
              f"{result.root}")
    return 0
