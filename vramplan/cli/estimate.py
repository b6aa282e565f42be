"""`vramplan estimate MODEL`: one configuration (--method), or the standard strategies compared."""

from __future__ import annotations

import argparse
import json

from vramplan.cli import config_file
from vramplan.cli.alloc_conf import ALLOC_CONF_HELP, use_alloc_conf_flag
from vramplan.cli.common import GPUS_HELP, HOST_RAM_HELP, MODEL_HELP, add_setup_options, host_ram
from vramplan.cli.gpu_options import add_gpu_options, resolve_from_args
from vramplan.setup import Objective


def add_parser(sub: argparse._SubParsersAction) -> None:
    est = sub.add_parser("estimate", help="per-GPU memory of one configuration, or compare the standard strategies")
    est.add_argument("model", metavar="MODEL", nargs="?", help=MODEL_HELP + " (optional with a --config that names it)")
    est.add_argument("--gpus", help=GPUS_HELP + "; with --config, the count defaults to the file's world size")
    config_file.add_config_option(est)
    add_gpu_options(est)
    add_setup_options(est)
    est.add_argument(
        "--host-ram",
        help=HOST_RAM_HELP + " for the verdict; default: this machine's "
        "when the GPUs are detected here, 128GB when --gpus names other hardware",
    )
    est.add_argument("--alloc-conf", metavar="CONF", help=ALLOC_CONF_HELP)
    est.add_argument("--format", choices=["table", "json"], default="table")
    est.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    use_alloc_conf_flag(args.alloc_conf)
    reading = config_file.read(args)
    with config_file.blame_file(args, reading):
        return _run(args, reading)


def _run(args: argparse.Namespace, reading) -> int:
    from vramplan.estimate import estimate_spec, fp16_on_card, make_setup
    from vramplan.model_loader import load_model_spec
    from vramplan.report.estimate import comparison_json, print_comparison, print_estimate
    from vramplan.strategies import compare

    model = config_file.model_name(args, reading)
    gpus = resolve_from_args(args, config_file.gpus_text(args, reading))
    ram = host_ram(args)
    fields, regex = config_file.without_regex_targets(config_file.setup_fields(args, reading, gpus.count))
    setup = make_setup(**fields) if "method" in fields else None  # bad values fail before the model loads
    spec = load_model_spec(model, num_layers=args.num_layers)
    fields, target_notes = config_file.with_regex_targets(spec, fields, regex)
    if regex is not None and setup is not None:
        setup = make_setup(**fields)
    if setup is None:
        rows = compare(spec, gpus, fields, ram)
        assumed = comparison_assumptions(args, rows, gpus.count, ram)
        if args.format != "json":  # what the file gave, once nothing can fail: an error stays one line
            config_file.print_lines(reading)
        if args.format == "json":
            print(json.dumps(_with_config(comparison_json(spec, gpus, rows, assumed), reading), indent=1))
        else:
            print_comparison(spec, gpus, rows, assumed=assumed)
        return 0
    # a card without bf16 trains in fp16 unless --precision (or the config) says otherwise
    setup, card = fp16_on_card(setup, gpus, fields.get("precision") is not None)
    est = estimate_spec(spec, setup, gpus, ram)
    if card or target_notes:
        est = est.model_copy(update={"notes": card + list(est.notes) + target_notes})
    if args.format == "json":
        print(json.dumps(_with_config(est.to_json_dict(), reading), indent=1))
    else:
        config_file.print_lines(reading)
        print_estimate(est, assumed=estimate_assumptions(args, est.setup, gpus.count, ram))
    return 0


def comparison_assumptions(args: argparse.Namespace, rows: list, gpu_count: int, ram: int | None) -> list[str]:
    """What the comparison took without being told (vramplan.assumptions), from its first row's setup."""
    from vramplan.setup import TrainingSetup

    first = rows[0].estimate.setup if rows else TrainingSetup()
    return estimate_assumptions(args, first, gpu_count, ram, one_setup=False)


def estimate_assumptions(
    args: argparse.Namespace, setup, gpu_count: int, ram: int | None, one_setup: bool = True
) -> list[str]:
    """Micro-batch x sequence, stack, host RAM and data parallelism (the setup's own sharding, or
    the general rule when the rows shard differently), each with the flag that sets it."""
    from vramplan.assumptions import batch_phrase, data_parallel_phrase, host_ram_phrase, stack_phrase

    return [
        batch_phrase(
            setup.batch_size,
            setup.seq_len,
            setup.rows,
            setup.completion_len if setup.objective == Objective.GRPO else None,
        ),
        stack_phrase(setup.stack),
        host_ram_phrase(ram, given=bool(args.host_ram), gpus_named=bool(args.gpus)),
        data_parallel_phrase(gpu_count, setup if one_setup else None),
    ]


def _with_config(data: dict, reading) -> dict:
    """The file's lines under "config" in --format json (absent without --config)."""
    if reading is not None:
        data["config"] = config_file.lines(reading)
    return data
