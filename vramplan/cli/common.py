"""What the commands share: the one-line error parser, the reference step's options, --host-ram."""

from __future__ import annotations

import argparse
from typing import NoReturn

from vramplan.errors import VramplanError
from vramplan.estimate import default_host_ram
from vramplan.setup import LoraTargets, Method, Optim, Precision, Quant, TrainingSetup
from vramplan.units import parse_bytes

MODEL_HELP = "preset name or alias, a config.json path, or a directory with one"
GPUS_HELP = "NxSIZE (2x24GB), a profile (rtx-4090) or Nxprofile (2xrtx-3090); default: detected"


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one VramplanError line (main prints it), no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise VramplanError(message)


def _help(name: str) -> str:
    return TrainingSetup.model_fields[name].description or ""


def add_setup_options(p: argparse.ArgumentParser, method_default: str | None = None) -> None:
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


SETUP_KEYS = (
    "method",
    "precision",
    "optim",
    "batch_size",
    "seq_len",
    "lora_r",
    "lora_dropout",
    "lora_targets",
    "quant",
    "galore_rank",
    "gradient_checkpointing",
    "fsdp",
    "cpu_offload",
)


def setup_fields(args: argparse.Namespace) -> dict:
    """The TrainingSetup fields given on the command line (unset options left to the defaults)."""
    return {k: getattr(args, k) for k in SETUP_KEYS if getattr(args, k, None) is not None}


def host_ram(args: argparse.Namespace) -> int | None:
    """--host-ram in bytes, or the default for where the GPUs come from (estimate.default_host_ram)."""
    if args.host_ram:
        return parse_bytes(args.host_ram, "--host-ram")
    return default_host_ram(gpus_named=bool(args.gpus))
