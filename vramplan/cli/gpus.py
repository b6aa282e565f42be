"""`vramplan gpus`: the GPUs NVML detects, with the matching hardware profile."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("gpus", help="list the GPUs NVML detects, with the matching hardware profile")
    g.add_argument("--format", choices=["table", "json"], default="table")
    g.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from vramplan import nvml
    from vramplan.report.catalog import gpus_json, print_gpus

    try:
        devices, driver = nvml.devices()
        why = None if devices else "NVML found no GPU"
    except nvml.NvmlUnavailable as e:
        devices, driver, why = [], None, f"NVML is not available ({e})"
    if args.format == "json":
        print(json.dumps(gpus_json(devices, driver, why), indent=1))
        return 0 if devices else 1
    if not devices or driver is None:
        print(f"vramplan: no NVIDIA GPU detected: {why}", file=sys.stderr)  # an error: stderr, non-zero
        return 1
    print_gpus(devices, driver)
    return 0
