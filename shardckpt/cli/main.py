"""``shardckpt COMMAND ...``: a thin shell over the library.

Exit codes (the contract): 0 success, 1 verification mismatch, 2 integrity problem (corrupt,
missing, incomplete), 64 usage error, 70 internal error. User mistakes print one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..errors import (
    EXIT_INTEGRITY,
    EXIT_INTERNAL,
    EXIT_MISMATCH,
    EXIT_USAGE,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    ShardckptError,
    VerificationError,
)
from ..rootkind import NotARootError
from . import commands
from .common import UsageError, emit, one_line


class _QuietPipe:
    """``sys.stdout`` for the time a command runs, except that a reader going away (``shardckpt
    diff A B | head``) silences it instead of failing the command: the rest of the output goes
    to /dev/null and the command ends with its own exit code, without a traceback."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                written = self._stream.write(text)
                return len(text) if written is None else int(written)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self) -> None:
        self.broken = True
        try:  # what is still buffered, and the interpreter's last flush, go nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


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
    from ..version import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    real = sys.stdout
    sys.stdout = guard = _QuietPipe(real)  # type: ignore[assignment]
    try:
        code = _run(list(sys.argv[1:] if argv is None else argv))
        guard.flush()
    finally:
        sys.stdout = real
    if argv is None:
        raise SystemExit(code)
    return code


def error_document(exc: BaseException, exit_code: int) -> dict[str, Any]:
    """What ``--json`` prints on stdout when a command fails: one document, the same exit code."""
    return {"error": {"type": type(exc).__name__, "message": one_line(exc),
                      "exit_code": exit_code}}


def _fail(exc: BaseException, code: int, line: str | None, as_json: bool,
          log_line: bool = False) -> int:
    """Report ``exc``: ``line`` on stderr (for people), and with ``--json`` the error document on
    stdout (for programs, which otherwise would find nothing there). ``log_line`` (``prune``):
    the document on one line, with the time, as every document of that command."""
    if line is not None:
        print(line, file=sys.stderr)
    if as_json:
        doc = error_document(exc, code)
        if log_line:
            from ..prune_metrics import utc_now

            doc = {"time": utc_now(time.time()), **doc}
        try:
            emit(doc, compact=log_line)
        except (BrokenPipeError, ValueError):  # no reader left, or stdout closed
            pass
    return code


def _run(argv: list[str]) -> int:
    as_json = "--json" in argv  # before parsing, so that usage errors are documents too
    log_line = bool(argv) and argv[0] == "prune"
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE, f"{one_line(exc)} (see 'shardckpt --help')", as_json,
                     log_line)
    except SystemExit as exc:  # --help / --version
        if isinstance(exc.code, str):
            return _fail(UsageError(exc.code), EXIT_USAGE, exc.code, as_json, log_line)
        return int(exc.code or 0)
    as_json = bool(getattr(args, "json", as_json))
    cmd = f"shardckpt {args.command}"
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        return _fail(exc, EXIT_USAGE, f"{cmd}: {one_line(exc)}", as_json, log_line)
    except VerificationError as exc:
        return _fail(exc, EXIT_MISMATCH, f"{cmd}: verification failed: {one_line(exc)}",
                     as_json, log_line)
    except (CorruptCheckpointError, IncompleteCheckpointError, FileNotFoundError,
            NotARootError) as exc:
        return _fail(exc, EXIT_INTEGRITY, f"{cmd}: {one_line(exc)}", as_json, log_line)
    except ShardckptError as exc:
        return _fail(exc, EXIT_INTERNAL, f"{cmd}: {type(exc).__name__}: {one_line(exc)}",
                     as_json, log_line)
    except KeyboardInterrupt as exc:
        return _fail(exc, EXIT_INTERNAL, None, as_json, log_line)
    except OSError as exc:  # the system refused (permission, disk full): not a bug of ours
        return _fail(exc, EXIT_INTERNAL, f"{cmd}: {type(exc).__name__}: {one_line(exc)}",
                     as_json, log_line)
    except Exception as exc:  # a bug: keep the traceback for the report
        import traceback

        traceback.print_exc()
        return _fail(exc, EXIT_INTERNAL, f"{cmd}: internal error: {type(exc).__name__}: {exc}",
                     as_json, log_line)
