"""``shardckpt COMMAND ...``: a thin shell over the library.

Exit codes (the contract): 0 success, 1 verification mismatch, 2 integrity problem (corrupt,
missing, incomplete), 64 usage error, 70 internal error. User mistakes print one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import (
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ShardckptError,
    VerificationError,
)
from . import commands

EXIT_OK, EXIT_MISMATCH, EXIT_INTEGRITY, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 64, 70


class UsageError(Exception):
    """A mistake in how the command was called (exit 64)."""


def one_line(text: object) -> str:
    """A message on one line (errors are one line on stderr, never a traceback)."""
    return " ".join(str(text).split()) or "(no message)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would exit 2, which means "integrity"
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--replica", action="append", default=[], metavar="URL",
                        help="another location holding copies of the checkpoints (repeatable)")
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser = _Parser(prog="shardckpt", description="Inspect and manage shardckpt checkpoints.")
    parser.add_argument("--version", action="version", version=f"shardckpt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (fn, help_text, add_args) in commands.COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def emit(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    code = _run(list(sys.argv[1:] if argv is None else argv))
    sys.stdout.flush()
    if argv is None:
        raise SystemExit(code)
    return code


def _run(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"{one_line(exc)} (see 'shardckpt --help')", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"shardckpt {args.command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except VerificationError as exc:
        print(f"shardckpt {args.command}: verification failed: {one_line(exc)}",
              file=sys.stderr)
        return EXIT_MISMATCH
    except (CorruptCheckpointError, IncompleteCheckpointError, FileNotFoundError) as exc:
        print(f"shardckpt {args.command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_INTEGRITY
    except ShardckptError as exc:
        print(f"shardckpt {args.command}: {type(exc).__name__}: {one_line(exc)}",
              file=sys.stderr)
        return EXIT_INTERNAL
    except (KeyboardInterrupt, BrokenPipeError):
        return EXIT_INTERNAL
    except OSError as exc:  # the system refused (permission, disk full): not a bug of ours
        print(f"shardckpt {args.command}: {type(exc).__name__}: {one_line(exc)}",
              file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # a bug: keep the traceback for the report
        import traceback

        traceback.print_exc()
        print(f"shardckpt {args.command}: internal error: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_INTERNAL
