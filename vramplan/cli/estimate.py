"""`vramplan estimate MODEL`: one configuration (--method), or the standard strategies compared."""

from __future__ import annotations

import argparse
import json

from vramplan.cli import config_file
from vramplan.cli.common import GPUS_HELP, MODEL_HELP, add_setup_options, host_ram


def add_parser(sub: argparse._SubParsersAction) -> None:
    est = sub.add_parser("estimate", help="per-GPU memory of one configuration, or compare the standard strategies")
    est.add_argument("model", metavar="MODEL", nargs="?", help=MODEL_HELP + " (optional with a --config that names it)")
    est.add_argument("--gpus", help=GPUS_HELP + "; with --config, the count defaults to the file's world size")
    config_file.add_config_option(est)
    add_setup_options(est)
    est.add_argument(
        "--host-ram",
        help="host RAM per node for the verdict (e.g. 128GB); default: this machine's "
        "when the GPUs are detected here, 128GB when --gpus names other hardware",
    )
    est.add_argument("--format", choices=["table", "json"], default="table")
    est.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from vramplan.estimate import estimate_spec, make_setup, resolve_gpus
    from vramplan.model_loader import load_model_spec
    from vramplan.report.estimate import comparison_json, print_comparison, print_estimate
    from vramplan.strategies import compare

    reading = config_file.read(args)
    model = config_file.model_name(args, reading)
    gpus = resolve_gpus(config_file.gpus_text(args, reading))
    ram = host_ram(args)
    fields = config_file.setup_fields(args, reading, gpus.count)
    setup = make_setup(**fields) if "method" in fields else None  # bad values fail before the model loads
    spec = load_model_spec(model, num_layers=args.num_layers)
    if args.format != "json":
        config_file.print_lines(reading)
    if setup is None:
        rows = compare(spec, gpus, fields, ram)
        if args.format == "json":
            print(json.dumps(_with_config(comparison_json(spec, gpus, rows), reading), indent=1))
        else:
            print_comparison(spec, gpus, rows)
        return 0
    est = estimate_spec(spec, setup, gpus, ram)
    if args.format == "json":
        print(json.dumps(_with_config(est.to_json_dict(), reading), indent=1))
    else:
        print_estimate(est)
    return 0


def _with_config(data: dict, reading) -> dict:
    """The file's lines under "config" in --format json (absent without --config)."""
    if reading is not None:
        data["config"] = config_file.lines(reading)
    return data
