"""What every command shares: usage errors, JSON output, and opening the locations it reads."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import StorageError

if TYPE_CHECKING:  # the storage layer is imported by the commands that use it, not by --help
    from ..rootkind import RootKind
    from ..storage import Location


class UsageError(Exception):
    """A mistake in how the command was called (exit 64)."""


def one_line(text: object) -> str:
    """A message on one line (errors are one line on stderr, never a traceback)."""
    return " ".join(str(text).split()) or "(no message)"


def emit(document: Any, compact: bool = False) -> None:
    """One JSON document on stdout; ``compact``: on one line (JSON Lines, for logs)."""
    text = json.dumps(document, allow_nan=False, separators=(",", ":")) if compact else \
        json.dumps(document, indent=2, allow_nan=False)
    sys.stdout.write(text + "\n")


ROOT_HELP = "checkpoint root: a path or fsspec URL"


def open_locations(urls: list[str], warn: str | None = None,
                   missing_ok: bool = False, new_replicas_ok: bool = False) -> list[Location]:
    """The locations of ``urls``; a URL that cannot be opened or a root that does not exist is
    a usage error (exit 64), named in one line with credentials redacted (with ``missing_ok``,
    a root that does not exist yet is accepted: a root with no checkpoints; with
    ``new_replicas_ok``, a replica on an object store that does not exist yet is accepted:
    ``repair``'s target, a prefix that no one can create beforehand). A root or replica whose
    S3 bucket does not exist is named with its bucket and endpoint.

    Remote locations are probed, all at once: one that does not answer within seconds stands
    in as :class:`~shardckpt.storage.probe.Unreachable` (its every operation fails at once), so
    the command works from the others; with ``warn`` (the command's name) one line on stderr
    says so. ``StorageError`` if no location answers.
    """
    from ..redact import redact_url as redact
    from ..rootkind import NoSuchBucketError, bucket_problem
    from ..storage import open_location
    from ..storage.probe import Unreachable, reachable_all

    opened = []
    for url in urls:
        try:
            opened.append(open_location(url))
        except (ValueError, ImportError) as exc:  # unknown protocol, missing fsspec backend
            raise UsageError(f"{redact(url)}: cannot open: {exc}") from None
    locs = reachable_all(opened)
    down = [loc for loc in locs if isinstance(loc, Unreachable)]
    if len(down) == len(locs):
        raise StorageError("; ".join(f"{loc.display}: unreachable: {loc.why}" for loc in down))
    for index, loc in enumerate(locs):
        if isinstance(loc, Unreachable):
            continue
        try:
            exists = loc.root_exists()
            problem = None if exists else bucket_problem(loc)
        except StorageError:
            if index == 0:
                raise
            continue  # a replica failing now: the command reports it where it matters
        if exists:
            _refuse_a_step_directory(loc)
            continue
        if problem is not None:
            if missing_ok:
                raise NoSuchBucketError(problem)
            raise UsageError(problem)
        if not missing_ok and not (new_replicas_ok and index > 0 and not loc.is_local):
            raise UsageError(f"{loc.display}: no such checkpoint root")
    for loc in down if warn else ():
        print(f"shardckpt {warn}: warning: {loc.display} is unreachable ({loc.why}); using "
              f"the other locations", file=sys.stderr)
    return locs


def _refuse_a_step_directory(loc: Location) -> None:
    """A step directory given where a root is wanted (``verify ROOT/step-N``) is named as such
    (``NotARootError``, exit 2), not reported as a root with no checkpoint."""
    from ..rootkind import classify_root
    from ..storage.location import STEP_DIR

    if STEP_DIR.fullmatch(loc.display.rstrip("/").rsplit("/", 1)[-1]):
        classify_root(loc)


def locations(args: argparse.Namespace) -> list[Location]:
    quiet = args.command in ("ls", "report")  # these report unreachable locations themselves
    return open_locations([args.root, *args.replica], warn=None if quiet else args.command,
                          new_replicas_ok=args.command == "repair")


def checked_roots(args: argparse.Namespace) -> tuple[list[Location], list[RootKind | None]]:
    """``ls``, ``show`` and ``prune``: the locations, and what each one is (None: unreachable
    now). A root that does not exist yet or an empty folder is a root with no checkpoints;
    a path that is not a checkpoint root raises :class:`~shardckpt.rootkind.NotARootError`
    (exit 2) naming it, before anything is read or written there."""
    from ..rootkind import classify_root
    from ..storage.probe import Unreachable

    quiet = args.command in ("ls", "report")
    locs = open_locations([args.root, *args.replica], warn=None if quiet else args.command,
                          missing_ok=True)
    kinds: list[RootKind | None] = []
    for index, loc in enumerate(locs):
        try:
            kinds.append(None if isinstance(loc, Unreachable) else classify_root(loc))
        except StorageError:
            if index == 0:
                raise
            kinds.append(None)  # a replica failing now: the command reports it
    return locs, kinds


def latest_step(locs: list[Location]) -> int:
    """The default ``--step``: the newest step directory holding a manifest, valid or not (a
    corrupt one then fails the command with exit 2, naming the file)."""
    from ..catalog import latest_manifest_step

    return latest_manifest_step(locs, locs[0].display)


def check_out_path(path: str, flag: str = "--out") -> None:
    """``UsageError`` unless ``path``'s directory exists and ``path`` is not a directory."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory")
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
