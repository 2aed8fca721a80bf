"""The `depthkit` command.

Each stage owns its sub-commands in a `commands.py` module with two functions, `register(subparsers)`
and the handlers it binds with `set_defaults(func=...)`. Those modules import only argparse at the top,
so `depthkit --help` stays fast; heavy imports happen inside the handlers.

The training verbs (`fit`, `validate`, `test`) are handed to LightningCLI untouched.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

# Modules that define sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "depthkit.data.commands",
    "depthkit.models.commands",
    "depthkit.pseudo_label.commands",
    "depthkit.eval.commands",
    "depthkit.export.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthkit",
        description="Train, pseudo-label, evaluate and export monocular depth models.",
        epilog="Training: depthkit fit|validate|test --config A.yaml [--config B.yaml ...] (LightningCLI).",
    )
    from depthkit import __version__

    parser.add_argument("--version", action="version", version=f"depthkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real import error inside the module, not a stage that does not exist yet
                raise
            continue
        module.register(subparsers)
    for verb in ("fit", "validate", "test"):  # listed in --help (and typo errors); `main` hands them to LightningCLI
        subparsers.add_parser(verb, help=f"training (LightningCLI): see depthkit {verb} --help")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("fit", "validate", "test"):
        try:
            from depthkit.train.cli import run_lightning_cli

            return run_lightning_cli(argv)
        except KeyboardInterrupt:  # before Lightning's own handler (which ends a started run with exit code 1)
            print(f"depthkit {argv[0]}: interrupted", file=sys.stderr)
            return 130
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # SIGTERM as an exception, for the length of the command (pseudo-label stops its ranks itself: launch.stop_ranks).
    catch_term = args.command != "pseudo-label" and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if catch_term else None
    try:
        return _run(args)
    finally:
        if catch_term:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """A sub-command's handler, its errors as one line."""
    try:
        result = args.func(args)
    except (ValueError, OSError, MemoryError) as err:  # bad input, a path that cannot be read or written, a size
        # too large for memory: one line, no traceback
        print(f"depthkit {args.command}: error: {_message(err) or type(err).__name__}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # torch's out of memory (CPU or CUDA) is a RuntimeError: one line too
        if "out of memory" not in str(err).lower():
            raise
        print(f"depthkit {args.command}: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"depthkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _terminated(signum, frame) -> None:
    """SIGTERM (`kill`, a job scheduler) ends the command as an exception, so its `finally` blocks remove the
    temporary files it was writing; the default action left them behind. Exit status 128 + 15, as a kill."""
    raise SystemExit(128 + signum)


def _message(err: Exception) -> str:
    """The error's text; an OS error without our own message reads `reason: path` (e.g. `File exists: out`)."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.strerror and err.filename:
        target = f" -> {err.filename2}" if err.filename2 else ""
        why = ""
        if isinstance(err, FileExistsError | NotADirectoryError):
            path = Path(os.fsdecode(err.filename))
            blocking = next((p for p in (path, *path.parents) if p.is_file()), None)
            why = f" ({blocking} is a file, where a folder is needed)" if blocking else ""
        return f"{err.strerror}: {err.filename}{target}{why}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
