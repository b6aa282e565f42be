"""What the commands share: the one-line error parser, the reference step's options, --host-ram."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import NoReturn

from vramplan.errors import VramplanError
from vramplan.estimate import default_host_ram
from vramplan.limits import MAX_BATCH_SIZE, MAX_LAYERS, MAX_RANK, MAX_RANKS, MAX_SEQ_LEN, MAX_TOKENS
from vramplan.setup import LoraTargets, Method, Optim, Precision, Quant, TrainingSetup, check_method_fields
from vramplan.units import host_ram_bytes

MODEL_HELP = "preset name or alias, a config.json path, or a directory with one"
GPUS_HELP = "NxSIZE (2x24GB), a profile (rtx-4090) or Nxprofile (2xrtx-3090); default: detected"


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one VramplanError line (main prints it), no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise VramplanError(message)


def _help(name: str) -> str:
    return TrainingSetup.model_fields[name].description or ""


_INT = re.compile(r"^\s*[+-]?\d+\s*$")


def int_in(hi: int, lo: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]. argparse names the flag in front of the
    message (``argument --seq-len: must be at most 2,097,152``); the bound is checked on the
    text's length first, so a 5,000-digit number is refused, not parsed."""
    def parse(text: str) -> int:
        if not _INT.match(text):
            raise argparse.ArgumentTypeError(f"must be an integer, got {text[:40]!r}")
        digits = text.strip().lstrip("+-").lstrip("0")
        value = int(text) if len(digits) <= 30 else (-1 if text.strip().startswith("-") else 1) * 10**30
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo:,}, got {text.strip()[:40]}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi:,}, got {text.strip()[:40]}"
                                             f"{'...' if len(text.strip()) > 40 else ''}")
        return value
    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi) (NaN and inf are refused)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text[:40]!r}") from None
        if not (math.isfinite(value) and lo <= value < hi):
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}), got {text[:40]}")
        return value
    parse.__name__ = "number"
    return parse


def bounded(text: str, hi: int, lo: int = 1) -> str:
    """Help text with the range a flag takes."""
    return f"{text} ({lo:,} to {hi:,})"


def add_setup_options(p: argparse.ArgumentParser, method_default: str | None = None) -> None:
    """The options of the reference step, shared by estimate, plan and verify."""
    p.add_argument("--method", choices=[m.value for m in Method], default=method_default, help=_help("method"))
    p.add_argument("--precision", choices=[m.value for m in Precision], help=_help("precision"))
    p.add_argument("--optim", choices=[m.value for m in Optim], help=_help("optim"))
    p.add_argument("--batch-size", type=int_in(MAX_BATCH_SIZE),
                   help=bounded(_help("batch_size") + "; default 1", MAX_BATCH_SIZE)
                   + f"; batch x seq at most {MAX_TOKENS:,} tokens")
    p.add_argument("--seq-len", type=int_in(MAX_SEQ_LEN),
                   help=bounded(_help("seq_len") + "; default 2048", MAX_SEQ_LEN))
    add_num_layers(p)
    p.add_argument("--lora-r", type=int_in(MAX_RANK), help=bounded(_help("lora_r") + "; default 16", MAX_RANK))
    p.add_argument("--lora-dropout", type=float_in(0.0, 1.0),
                   help=_help("lora_dropout") + " (0 <= p < 1; default 0.05)")
    p.add_argument("--lora-targets", choices=[m.value for m in LoraTargets], help=_help("lora_targets"))
    p.add_argument("--quant", choices=[m.value for m in Quant], help=_help("quant"))
    p.add_argument("--galore-rank", type=int_in(MAX_RANK),
                   help=bounded(_help("galore_rank") + "; default 128", MAX_RANK))
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help=_help("gradient_checkpointing"))
    p.add_argument("--fsdp", type=int_in(MAX_RANKS), help=bounded(_help("fsdp"), MAX_RANKS))
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


def add_num_layers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-layers", type=int_in(MAX_LAYERS),
                   help=bounded("override the number of decoder layers (truncated model)", MAX_LAYERS))


HOST_RAM_HELP = "host RAM per node, with a unit (e.g. 128GB; a bare number is refused, not read as bytes)"


def setup_fields(args: argparse.Namespace) -> dict:
    """The TrainingSetup fields given on the command line (unset options left to the defaults).
    With --method, an option that method does not read is an error naming both flags."""
    fields = {k: getattr(args, k) for k in SETUP_KEYS if getattr(args, k, None) is not None}
    if fields.get("method") is not None:
        check_method_fields(fields, explicit=True)
    return fields


def host_ram(args: argparse.Namespace) -> int | None:
    """--host-ram in bytes, or the default for where the GPUs come from (estimate.default_host_ram)."""
    if args.host_ram is not None:
        return host_ram_bytes(args.host_ram, "--host-ram")
    return default_host_ram(gpus_named=bool(args.gpus))
