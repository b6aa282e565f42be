"""`vramplan estimate MODEL`: one configuration (--method), or the standard strategies compared."""

from __future__ import annotations

import argparse
import json

from vramplan.cli.common import GPUS_HELP, HOST_RAM_HELP, MODEL_HELP, add_setup_options, host_ram, setup_fields


def add_parser(sub: argparse._SubParsersAction) -> None:
    est = sub.add_parser("estimate", help="per-GPU memory of one configuration, or compare the standard strategies")
    est.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    est.add_argument("--gpus", help=GPUS_HELP)
    add_setup_options(est)
    est.add_argument(
        "--host-ram",
        help=HOST_RAM_HELP + " for the verdict; default: this machine's "
        "when the GPUs are detected here, 128GB when --gpus names other hardware",
    )
    est.add_argument("--format", choices=["table", "json"], default="table")
    est.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from vramplan.estimate import estimate_config, resolve_gpus
    from vramplan.model_loader import load_model_spec
    from vramplan.report.estimate import comparison_json, print_comparison, print_estimate
    from vramplan.strategies import compare

    gpus = resolve_gpus(args.gpus)
    ram = host_ram(args)
    spec = load_model_spec(args.model, num_layers=args.num_layers)
    fields = setup_fields(args)
    if args.method is None:
        rows = compare(spec, gpus, fields, ram)
        if args.format == "json":
            print(json.dumps(comparison_json(spec, gpus, rows), indent=1))
        else:
            print_comparison(spec, gpus, rows)
        return 0
    est = estimate_config(spec, gpus, host_ram=ram, **fields)
    if args.format == "json":
        print(est.to_json())
    else:
        print_estimate(est)
    return 0
