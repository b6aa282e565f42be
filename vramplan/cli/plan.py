"""`vramplan plan MODEL --gpus SPEC`: the configurations that fit, fastest first."""

from __future__ import annotations

import argparse
import json
import sys

from vramplan.cli.common import MODEL_HELP
from vramplan.cli.gpu_options import add_gpu_options, gpu_overrides
from vramplan.estimate import DEFAULT_HOST_RAM
from vramplan.plan import MAX_BATCH, METHOD_KEYS
from vramplan.units import GiB


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="search the configurations that fit these GPUs, fastest first")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--gpus", help="NxSIZE (2x24GB), a profile (rtx-4090) or Nxprofile; all GPUs, over all nodes")
    add_gpu_options(p)
    p.add_argument("--nodes", type=int, help="nodes the GPUs are spread over (default 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (alternative to --nodes)")
    p.add_argument(
        "--min-seq", type=int, help="shortest acceptable sequence length (default 2048, capped at the context)"
    )
    p.add_argument(
        "--global-batch", type=int, help="sequences per optimizer step over all GPUs (gradient accumulation)"
    )
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHOD_KEYS)} (qlora = both 4-bit formats)")
    p.add_argument("--min-lora-rank", type=int, help="smallest acceptable LoRA rank (default 16)")
    p.add_argument("--min-galore-rank", type=int, help="smallest acceptable GaLore rank (default 128)")
    p.add_argument(
        "--host-ram",
        help=f"host RAM per node (default {DEFAULT_HOST_RAM // GiB}GB when --gpus is given, else this machine's)",
    )
    p.add_argument("--max-batch", type=int, help=f"largest micro-batch searched (default {MAX_BATCH})")
    p.add_argument("--num-layers", type=int, help="override the number of decoder layers (truncated model)")
    p.add_argument("--top", type=int, default=10, help="rows to show (default 10)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from vramplan.plan import plan_model
    from vramplan.report.plan import print_plan, result_json, to_frame

    result = plan_model(
        args.model,
        args.gpus,
        top=args.top,
        num_layers=args.num_layers,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        min_seq=args.min_seq,
        global_batch=args.global_batch,
        methods=args.methods,
        min_lora_rank=args.min_lora_rank,
        min_galore_rank=args.min_galore_rank,
        host_ram=args.host_ram,
        max_batch=args.max_batch,
        **gpu_overrides(args),
    )
    if args.format == "json":
        print(json.dumps(result_json(result), indent=1))
    elif args.format == "csv":
        to_frame(result).to_csv(sys.stdout, index=False)
    else:
        print_plan(result)
    return 0
