"""`vramplan plan MODEL --gpus SPEC`: the configurations that fit, fastest first."""

from __future__ import annotations

import argparse
import json
import sys

from vramplan.cli import config_file
from vramplan.cli.alloc_conf import ALLOC_CONF_HELP, use_alloc_conf_flag
from vramplan.cli.common import (
    MODEL_HELP,
    _choices,
    _flag,
    add_grpo_options,
    add_num_layers,
    bounded,
    int_in,
    tokens_in,
)
from vramplan.cli.gpu_options import add_gpu_options, gpu_overrides
from vramplan.estimate import DEFAULT_HOST_RAM
from vramplan.limits import MAX_GLOBAL_BATCH, MAX_PLAN_BATCH, MAX_RANK, MAX_RANKS, MAX_SEQ_LEN, MAX_TOP
from vramplan.plan import ALL_METHOD_KEYS, MAX_BATCH, METHOD_KEYS
from vramplan.setup import Objective, Stack
from vramplan.units import GiB

EMIT_CHOICES = ("axolotl", "trl", "llamafactory", "torchtune", "accelerate")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="search the configurations that fit these GPUs, fastest first")
    p.add_argument("model", metavar="MODEL", nargs="?", help=MODEL_HELP + " (optional with a --config that names it)")
    p.add_argument(
        "--gpus",
        help="NxSIZE (2x24GB), a profile (rtx-4090) or Nxprofile; all GPUs, over all nodes; "
        "with --config, the count defaults to the file's world size",
    )
    add_gpu_options(p)
    config_file.add_config_option(p)
    _add_topology_options(p)
    _add_search_options(p)
    _add_output_options(p)
    p.set_defaults(handler=run)


def _add_topology_options(p: argparse.ArgumentParser) -> None:
    """The stack and how the GPUs are spread over nodes, the sequence and global batch."""
    _flag(p, "stack", choices=_choices(Stack), extra_help=" (default: --config's framework, else --emit's)")
    p.add_argument(
        "--nodes", type=int_in(MAX_RANKS), help=bounded("nodes the GPUs are spread over; default 1", MAX_RANKS)
    )
    p.add_argument(
        "--gpus-per-node", type=int_in(MAX_RANKS), help=bounded("GPUs per node (alternative to --nodes)", MAX_RANKS)
    )
    p.add_argument(
        "--min-seq",
        type=tokens_in(MAX_SEQ_LEN),
        help=bounded(
            "shortest acceptable sequence length; default: --config's sequence length, else "
            "2048, capped at the context",
            MAX_SEQ_LEN,
        ),
    )
    p.add_argument(
        "--global-batch",
        type=int_in(MAX_GLOBAL_BATCH),
        help=bounded("sequences per optimizer step over all GPUs (gradient accumulation)", MAX_GLOBAL_BATCH),
    )
    # what the step trains on, fixed for every row as a --config's trainer fixes it
    _flag(p, "objective", choices=_choices(Objective), extra_help=" (default: --config's trainer, else sft)")
    _flag(p, "precompute_ref_log_probs", boolean=True)
    _flag(p, "kto_kl", boolean=True)
    _flag(p, "chosen_nll", boolean=True)
    _flag(p, "dpo_use_weighting", boolean=True)
    add_grpo_options(p)


def _add_search_options(p: argparse.ArgumentParser) -> None:
    """What the search may try: methods, smallest ranks, host RAM and largest micro-batch."""
    p.add_argument(
        "--methods",
        help=f"comma-separated subset of {','.join(ALL_METHOD_KEYS)} (default {','.join(METHOD_KEYS)}; "
        "qlora = both 4-bit formats)",
    )
    p.add_argument(
        "--min-lora-rank", type=int_in(MAX_RANK), help=bounded("smallest acceptable LoRA rank; default 16", MAX_RANK)
    )
    p.add_argument(
        "--min-galore-rank",
        type=int_in(MAX_RANK),
        help=bounded("smallest acceptable GaLore rank; default 128", MAX_RANK),
    )
    p.add_argument(
        "--host-ram",
        help=f"host RAM per node, with a unit (default {DEFAULT_HOST_RAM // GiB}GB when --gpus is given, "
        "else this machine's)",
    )
    p.add_argument(
        "--vary",
        metavar="KNOB=V1,V2",
        action="append",
        help="also search these values of a stack knob (repeatable): loss, activation-offload, attention, "
        "adapter-dtype, optim or liger-layers, e.g. --vary loss=hf,liger --vary activation-offload=none,checkpoints; "
        "each row names its values",
    )
    p.add_argument(
        "--max-batch",
        type=int_in(MAX_PLAN_BATCH),
        help=bounded(f"largest micro-batch searched; default {MAX_BATCH}", MAX_PLAN_BATCH),
    )


def _add_output_options(p: argparse.ArgumentParser) -> None:
    """Layers, rows shown, allocator config, output format and --emit's target."""
    add_num_layers(p)
    p.add_argument("--top", type=int_in(MAX_TOP), default=10, help=bounded("rows to show; default 10", MAX_TOP))
    p.add_argument("--alloc-conf", metavar="CONF", help=ALLOC_CONF_HELP)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument(
        "--emit",
        choices=EMIT_CHOICES,
        help="write a runnable config of this framework for the "
        "recommended row (-o FILE) or for every shown row (--emit-dir DIR); the plan then uses the "
        "framework's stack unless --stack says otherwise",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="the file --emit writes (the recommended row)")
    p.add_argument("--emit-dir", metavar="DIR", help="the folder --emit writes one file per shown row into")


def run(args: argparse.Namespace) -> int:
    from vramplan.cli import emit_rows

    use_alloc_conf_flag(args.alloc_conf)
    emit_rows.check_targets(args)
    reading = config_file.read(args)
    with config_file.blame_file(args, reading):
        return _run(args, reading)


def _run(args: argparse.Namespace, reading) -> int:
    from vramplan.cli import emit_rows
    from vramplan.estimate import default_host_ram, resolve_gpus
    from vramplan.model_loader import load_model_spec
    from vramplan.plan import plan_model
    from vramplan.report.plan import print_plan, result_json, to_frame

    model = config_file.model_name(args, reading)
    gpus = resolve_gpus(config_file.gpus_text(args, reading))
    fields, regex = config_file.without_regex_targets(config_file.setup_fields(args, reading, gpus.count))
    spec, target_notes = None, list[str]()
    if regex is not None:  # the file's regex targets become the Linears they adapt in this model
        spec = load_model_spec(model, num_layers=args.num_layers)
        fields, target_notes = config_file.with_regex_targets(spec, fields, regex)
    if args.emit in Stack._value2member_map_ and args.stack is None:
        fields["stack"] = Stack(args.emit)  # the emitted file runs on that framework, with its defaults
    result = plan_model(
        spec or model,
        gpus,
        top=args.top,
        num_layers=args.num_layers,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        min_seq=args.min_seq or fields.get("seq_len"),
        global_batch=args.global_batch,
        methods=args.methods,
        min_lora_rank=args.min_lora_rank,
        min_galore_rank=args.min_galore_rank,
        host_ram=args.host_ram or default_host_ram(gpus_named=bool(args.gpus)),
        max_batch=args.max_batch,
        **gpu_overrides(args),
        fixed=fields,
        vary=args.vary,
    )
    if target_notes:
        result = result.model_copy(update={"notes": list(result.notes) + target_notes})
    texts = emit_rows.build(args, result, model, reading, gpus.count) if args.emit else {}
    if args.format == "json":
        data = result_json(result)
        if reading is not None:
            data["config"] = config_file.lines(reading)
        if texts:
            data["emitted"] = [str(path) for path in texts]
        print(json.dumps(data, indent=1))
    else:
        config_file.print_lines(reading)
        if args.format == "csv":
            to_frame(result).to_csv(sys.stdout, index=False)
        else:
            print_plan(result)
    emit_rows.write(texts)
    return 0
