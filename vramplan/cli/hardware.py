"""`vramplan hardware`: the bundled GPU profiles."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("hardware", help="list the bundled GPU profiles").set_defaults(handler=run)


def run(_args: argparse.Namespace) -> int:
    from vramplan.report.catalog import print_hardware

    print_hardware()
    return 0
