"""Command line: parse -> build typed models -> call the engine -> render. Nothing else."""
from __future__ import annotations

import argparse
import json
import sys

from vramplan.errors import VramplanError
from vramplan.setup import LoraTargets, Method, Optim, Precision, Quant, TrainingSetup

_F = TrainingSetup.model_fields
DEFAULT_HOST_RAM = 128 * 2**30


def _help(name: str) -> str:
    return _F[name].description or ""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise VramplanError(message)


def add_setup_options(p: argparse.ArgumentParser, method_default=None) -> None:
    """The options of the reference step, shared by estimate, plan and verify."""
    p.add_argument("--method", choices=[m.value for m in Method], default=method_default, help=_help("method"))
    p.add_argument("--precision", choices=[m.value for m in Precision], help=_help("precision"))
    p.add_argument("--optim", choices=[m.value for m in Optim], help=_help("optim"))
    p.add_argument("--batch-size", type=int, help=_help("batch_size") + " (default 1)")
    p.add_argument("--seq-len", type=int, help=_help("seq_len") + " (default 2048)")
    p.add_argument("--num-layers", type=int, help="override the number of decoder layers (truncated model)")
    p.add_argument("--lora-r", type=int, help=_help("lora_r") + " (default 16)")
    p.add_argument("--lora-dropout", type=float, help=_help("lora_dropout") + " (default 0.05)")
    p.add_argument("--lora-targets", choices=[m.value for m in LoraTargets], help=_help("lora_targets"))
    p.add_argument("--quant", choices=[m.value for m in Quant], help=_help("quant"))
    p.add_argument("--galore-rank", type=int, help=_help("galore_rank") + " (default 128)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help=_help("gradient_checkpointing"))
    p.add_argument("--fsdp", type=int, help=_help("fsdp"))
    p.add_argument("--cpu-offload", action="store_true", default=None, help=_help("cpu_offload"))


SETUP_KEYS = ("method", "precision", "optim", "batch_size", "seq_len", "lora_r", "lora_dropout", "lora_targets",
              "quant", "galore_rank", "gradient_checkpointing", "fsdp", "cpu_offload")


def setup_fields(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in SETUP_KEYS if getattr(args, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vramplan", description="Will this LLM training run fit these GPUs, and where does the memory go?")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    est = sub.add_parser("estimate", help="per-GPU memory of one configuration, or compare the standard strategies")
    est.add_argument("model", metavar="MODEL", help="preset name or alias, a config.json path, or a directory with one")
    est.add_argument("--gpus", help="NxSIZE (2x24GB), a profile (rtx-4090) or Nxprofile (2xrtx-3090); default: detected")
    add_setup_options(est)
    est.add_argument("--host-ram", help="host RAM per node for the verdict (e.g. 128GB); default: this machine's "
                     "when the GPUs are detected here, 128GB when --gpus names other hardware")
    est.add_argument("--format", choices=["table", "json"], default="table")
    sub.add_parser("models", help="list the bundled model presets and aliases")
    sub.add_parser("hardware", help="list the bundled GPU profiles")
    for mod in ("vramplan.verify", "vramplan.plan", "vramplan.plot"):
        try:
            module = __import__(mod, fromlist=["add_cli"])
        except ImportError:
            continue
        if hasattr(module, "add_cli"):
            module.add_cli(sub)
    return parser


def _cmd_estimate(args) -> int:
    from vramplan import report
    from vramplan.estimate import estimate_config, resolve_gpus
    from vramplan.model_spec import load_model_spec
    from vramplan.estimate import local_host_ram
    from vramplan.units import parse_bytes
    gpus = resolve_gpus(args.gpus)
    if args.host_ram:
        host_ram = parse_bytes(args.host_ram, "--host-ram")
    else:
        # planning for other hardware: assume a workstation that holds 2-4 such cards
        host_ram = DEFAULT_HOST_RAM if args.gpus else local_host_ram()
    spec = load_model_spec(args.model, num_layers=args.num_layers)
    fields = setup_fields(args)
    if args.method is None:
        from vramplan.strategies import compare
        rows = compare(spec, gpus, fields, host_ram)
        if args.format == "json":
            print(json.dumps(report.comparison_json(spec, gpus, rows), indent=1))
        else:
            report.print_comparison(spec, gpus, rows)
        return 0
    est = estimate_config(spec, gpus, host_ram=host_ram, **fields)
    if args.format == "json":
        print(json.dumps(est.to_json_dict(), indent=1))
    else:
        report.print_estimate(est)
    return 0


def _cmd_models(_args) -> int:
    from vramplan import report
    report.print_models()
    return 0


def _cmd_hardware(_args) -> int:
    from vramplan import report
    report.print_hardware()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        handler = {"estimate": _cmd_estimate, "models": _cmd_models, "hardware": _cmd_hardware}.get(args.command)
        if handler is None:
            handler = args.handler
        return int(handler(args) or 0)
    except VramplanError as e:
        print(f"vramplan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
