"""`vramplan models`: the bundled model presets and their aliases."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("models", help="list the bundled model presets and aliases").set_defaults(handler=run)


def run(_args: argparse.Namespace) -> int:
    from vramplan.report.catalog import print_models

    print_models()
    return 0
