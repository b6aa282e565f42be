"""Command line: parse -> build typed models -> call the engine -> render. Nothing else.

One module per command; COMMANDS below is the whole list, in the order ``vramplan --help``
shows them. Each module has ``add_parser(sub)``, which registers its subcommand and sets
``handler`` to the function that runs it. Entry point: ``vramplan.cli:main``.

This package (and ``vramplan`` itself) imports nothing heavy: ``main`` is in charge of the
process before numpy, pydantic or torch load, so a Ctrl-C during those imports, a closed pipe
or a full disk end in one line and the conventional exit code, never a traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

__all__ = ["COMMANDS", "add_setup_options", "build_parser", "main", "setup_fields"]

# exit codes: 2 bad input (argparse's), 120 output could not be written (what CPython
# returns when flushing stdout fails at exit), 128 + signal for SIGINT (130) and SIGPIPE (141)
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE (sysexits.h): a bug; VRAMPLAN_DEBUG=1 shows the traceback
EXIT_OUTPUT = 120
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def __getattr__(name: str):
    """COMMANDS, add_setup_options and setup_fields load the command modules on first use."""
    if name == "COMMANDS":
        from vramplan.cli import estimate, gpus, hardware, models, plan, plot, verify

        return (estimate, models, hardware, verify, gpus, plan, plot)
    if name in ("add_setup_options", "setup_fields"):
        from vramplan.cli import common

        return getattr(common, name)
    raise AttributeError(f"module 'vramplan.cli' has no attribute {name!r}")


# the command word -> its module under vramplan.cli, in COMMANDS' order
COMMAND_NAMES = ("estimate", "models", "hardware", "verify", "gpus", "plan", "plot")


def build_parser(argv: list[str] | None = None):
    """The whole parser; given the command line, only its command's (when its first word is
    one): a cold `vramplan estimate` then imports neither the planner nor the plot code
    (docs/benchmarks.md). Help, an option first or an unknown word get every command."""
    from vramplan.cli.common import _Parser

    parser = _Parser(
        prog="vramplan", description="Will this LLM training run fit these GPUs, and where does the memory go?"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    if argv and argv[0] in COMMAND_NAMES:
        commands = [importlib.import_module(f"vramplan.cli.{argv[0]}")]
    else:
        commands = list(__getattr__("COMMANDS"))
    for command in commands:
        command.add_parser(sub)
    return parser


def _broken_pipe_is_an_error() -> None:
    """rich answers a closed pipe with SystemExit(1) (Console.on_broken_pipe, which its docs
    say to override in a subclass); the tables here are rich's, so it raises the
    BrokenPipeError main answers with 141 instead."""
    from rich.console import Console

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    Console.on_broken_pipe = on_broken_pipe  # type: ignore[method-assign]


def _run(argv: list[str] | None) -> int:
    _broken_pipe_is_an_error()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.argv = argv  # for the header of files --emit writes
    code = int(args.handler(args) or 0)
    sys.stdout.flush()  # a closed pipe or a full disk is raised here, inside main, not at exit
    return code


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's flush at exit cannot fail again
    (the recipe of the Python docs, 'Note on SIGPIPE', signal module)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout replaced by something without a descriptor (a test's capture)


def _say(message: str) -> None:
    try:
        print(f"vramplan: {message}", file=sys.stderr)
    except (OSError, ValueError):
        pass  # stderr is gone too: the exit code is all that is left


def main(argv: list[str] | None = None) -> int:
    """Run one command; every way it can end is an exit code and at most one line on stderr."""
    try:
        try:
            return _run(argv)
        except BrokenPipeError:
            _quiet_stdout()
            return EXIT_BROKEN_PIPE
        except OSError as e:
            if e.errno == errno.EPIPE:
                _quiet_stdout()
                return EXIT_BROKEN_PIPE
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                _quiet_stdout()
                _say(f"error: cannot write the output: {e.strerror or e}")
                return EXIT_OUTPUT
            raise
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the last boundary: one line, never a traceback
        from vramplan.errors import VramplanError

        if isinstance(e, VramplanError):
            _say(f"error: {e}")
            return EXIT_BAD_INPUT
        if isinstance(e, MemoryError):
            _say("error: out of memory (the request is larger than this machine holds)")
            return EXIT_INTERNAL
        if os.environ.get("VRAMPLAN_DEBUG"):
            raise
        _say(
            f"internal error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]} "
            "(a bug: please report it; VRAMPLAN_DEBUG=1 shows the traceback)"
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
