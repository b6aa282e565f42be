"""Command line: parse -> build typed models -> call the engine -> render. Nothing else.

One module per command; COMMANDS below is the whole list, in the order ``vramplan --help``
shows them. Each module has ``add_parser(sub)``, which registers its subcommand and sets
``handler`` to the function that runs it. Entry point: ``vramplan.cli:main``.
"""

from __future__ import annotations

import argparse
import sys

from vramplan.cli import estimate, gpus, hardware, models, plan, plot, verify
from vramplan.cli.common import _Parser, add_setup_options, setup_fields
from vramplan.errors import VramplanError

__all__ = ["COMMANDS", "add_setup_options", "build_parser", "main", "setup_fields"]

COMMANDS = (estimate, models, hardware, verify, gpus, plan, plot)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vramplan", description="Will this LLM training run fit these GPUs, and where does the memory go?"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for the header of files --emit writes
        return int(args.handler(args) or 0)
    except VramplanError as e:
        print(f"vramplan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
