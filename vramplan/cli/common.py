"""What the commands share: the one-line error parser, the reference step's options, --host-ram."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from enum import Enum
from typing import NoReturn

from vramplan.errors import VramplanError
from vramplan.estimate import default_host_ram
from vramplan.limits import (
    MAX_ACCUMULATION,
    MAX_BATCH_SIZE,
    MAX_LAYERS,
    MAX_RANK,
    MAX_RANKS,
    MAX_SEQ_LEN,
    MAX_TOKENS,
)
from vramplan.setup import (
    ActivationOffload,
    AdapterDtype,
    Attention,
    DeepSpeedStage,
    FsdpSharding,
    Generation,
    LigerLayers,
    LoraTargets,
    Loss,
    Method,
    ModelDtype,
    Objective,
    Optim,
    Packing,
    Precision,
    Quant,
    QuantStorage,
    Stack,
    TrainingSetup,
    check_method_fields,
    split_module_names,
)
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
    message (``argument --seq-len: must be at most 2,097,152``); the length of the text is
    checked first, so a 5,000-digit number is refused, not parsed."""

    def parse(text: str) -> int:
        if not _INT.match(text):
            raise argparse.ArgumentTypeError(f"must be an integer, got {text[:40]!r}")
        digits = text.strip().lstrip("+-").lstrip("0")
        value = int(text) if len(digits) <= 30 else (-1 if text.strip().startswith("-") else 1) * 10**30
        shown = text.strip()[:40] + ("..." if len(text.strip()) > 40 else "")
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo:,}, got {shown}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi:,}, got {shown}")
        return value

    parse.__name__ = "integer"  # argparse's and docs/cli.md's name for the type
    return parse


_KILO_TOKENS = re.compile(r"^\s*(\d{1,7})\s*[kK]\s*$")


def tokens_in(hi: int, lo: int = 1) -> Callable[[str], int]:
    """int_in for a token count that may be written as people say it: 8k, 32K (x 1024, as
    context lengths are: 32k = 32,768)."""
    whole = int_in(hi, lo)

    def parse(text: str) -> int:
        kilo = _KILO_TOKENS.match(text)
        return whole(str(int(kilo.group(1)) * 1024) if kilo else text)

    parse.__name__ = "tokens"
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


def _choices(enum: type[Enum]) -> list[str]:
    return [m.value for m in enum]


def _flag(p: argparse.ArgumentParser, field: str, **kw) -> None:
    """One option per TrainingSetup field, named after it, its help the field's description.
    Booleans take --x / --no-x and default to None, so a --stack bundle fills what is not given."""
    if kw.pop("boolean", False):
        kw.update(action=argparse.BooleanOptionalAction, default=None)
    extra = kw.pop("extra_help", "")
    p.add_argument("--" + field.replace("_", "-"), dest=field, help=_help(field) + extra, **kw)


class _LoraTargetsAction(argparse.Action):
    """--lora-targets: an enum value (lora_targets) or a list of module names (lora_target_modules)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values in _choices(LoraTargets):
            namespace.lora_targets, namespace.lora_target_modules = values, None
        else:
            namespace.lora_targets, namespace.lora_target_modules = None, split_module_names(values)


def add_setup_options(p: argparse.ArgumentParser, method_default: str | None = None) -> None:
    """The options of the training setup, shared by estimate, plan and verify."""
    p.add_argument("--method", choices=_choices(Method), default=method_default, help=_help("method"))
    _flag(p, "precision", choices=_choices(Precision))
    _flag(p, "optim", choices=_choices(Optim))
    _flag(
        p,
        "batch_size",
        type=int_in(MAX_BATCH_SIZE),
        extra_help=f"; default 1 (1 to {MAX_BATCH_SIZE:,}; batch x seq at most {MAX_TOKENS:,} tokens)",
    )
    _flag(p, "seq_len", type=tokens_in(MAX_SEQ_LEN), extra_help=f"; default 2048 (1 to {MAX_SEQ_LEN:,}; 8k = 8192)")
    add_num_layers(p)
    _flag(p, "lora_r", type=int_in(MAX_RANK), extra_help=f"; default 16 (1 to {MAX_RANK:,})")
    _flag(p, "lora_dropout", type=float_in(0.0, 1.0), extra_help="; default 0.05 (0 <= p < 1)")
    p.add_argument(
        "--lora-targets",
        dest="lora_targets",
        action=_LoraTargetsAction,
        metavar="{all-linear,attention,NAME,...}",
        help="which Linears get adapters: all-linear, attention, or a comma-separated list of module "
        "names as peft's target_modules (q_proj,v_proj)",
    )
    p.set_defaults(lora_target_modules=None)
    _flag(p, "modules_to_save", metavar="{embed_tokens,lm_head}[,...]", extra_help=" (comma-separated)")
    _flag(p, "modules_to_save_dtype", choices=_choices(AdapterDtype))
    _flag(p, "quant", choices=_choices(Quant))
    _flag(p, "galore_rank", type=int_in(MAX_RANK), extra_help=f"; default 128 (1 to {MAX_RANK:,})")
    _flag(p, "apollo_rank", type=int_in(MAX_RANK), extra_help=f" (1 to {MAX_RANK:,})")
    _flag(p, "train_layers", type=int_in(MAX_LAYERS), extra_help=f" (--method full; 1 to {MAX_LAYERS:,})")
    _flag(p, "train_layers_dtype", choices=_choices(AdapterDtype))
    _flag(p, "gradient_checkpointing", boolean=True)
    _flag(p, "fsdp", type=int_in(MAX_RANKS), extra_help=f" (1 to {MAX_RANKS:,})")
    _flag(p, "cpu_offload", boolean=True)
    _flag(p, "objective", choices=_choices(Objective))
    _flag(p, "precompute_ref_log_probs", boolean=True)
    _flag(p, "kto_kl", boolean=True)
    _flag(p, "dpo_use_weighting", boolean=True)
    _flag(p, "chosen_nll", boolean=True)
    add_grpo_options(p)
    add_stack_options(p)
    add_engine_options(p)


def add_grpo_options(p: argparse.ArgumentParser) -> None:
    """--objective grpo's knobs (GRPOConfig's names, memory/grpo.py)."""
    _flag(p, "completion_len", type=tokens_in(MAX_SEQ_LEN), extra_help="; default 512 (below --seq-len)")
    _flag(p, "steps_per_generation", type=int_in(MAX_ACCUMULATION))
    _flag(p, "num_iterations", type=int_in(MAX_ACCUMULATION), extra_help="; default 1")
    _flag(p, "beta", type=float_in(0.0, 1e6), extra_help="; default 0")
    _flag(p, "generation", choices=_choices(Generation))
    _flag(p, "vllm_gpu_memory_utilization", type=float_in(1e-3, 1.000001), extra_help="; default 0.3")


def add_stack_options(p: argparse.ArgumentParser) -> None:
    """The knobs real training frameworks turn (docs/stacks.md, docs/memory-model.md)."""
    _flag(p, "stack", choices=_choices(Stack))
    _flag(p, "loss", choices=_choices(Loss))
    _flag(p, "fp32_outputs", boolean=True)
    _flag(p, "keep_logits", boolean=True)
    _flag(p, "compile", boolean=True)
    _flag(p, "adapter_dtype", choices=_choices(AdapterDtype))
    _flag(p, "quant_storage", choices=_choices(QuantStorage))
    _flag(p, "kbit_prep", boolean=True)
    _flag(p, "fp32_embeddings_norms", boolean=True)
    _flag(p, "dora", boolean=True)
    _flag(p, "lora_kernels", boolean=True)
    _flag(p, "liger_layers", choices=_choices(LigerLayers))
    _flag(p, "optimizer_in_backward", boolean=True)
    _flag(
        p, "gradient_accumulation", type=int_in(MAX_ACCUMULATION), extra_help=f"; default 1 (1 to {MAX_ACCUMULATION:,})"
    )
    _flag(p, "activation_offload", choices=_choices(ActivationOffload))
    _flag(p, "checkpoint_reentrant", boolean=True)
    _flag(p, "attention", choices=_choices(Attention))
    _flag(p, "packing", choices=_choices(Packing))
    _flag(p, "model_dtype", choices=_choices(ModelDtype))


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """How the GPUs share the work: DDP, FSDP1/2, DeepSpeed ZeRO (docs/memory-model.md, "Engines")."""
    _flag(p, "fsdp_version", type=int, choices=(1, 2))
    _flag(p, "fsdp_sharding", choices=_choices(FsdpSharding))
    _flag(p, "fsdp_embedding_units", boolean=True)
    _flag(p, "deepspeed", choices=_choices(DeepSpeedStage))
    _flag(p, "offload_optimizer", boolean=True)
    _flag(p, "offload_params", boolean=True)
    _flag(p, "nodes", type=int_in(MAX_RANKS), extra_help=f" (1 to {MAX_RANKS:,})")


SETUP_KEYS = tuple(k for k in TrainingSetup.model_fields if k != "galore_update_proj_gap")


def add_num_layers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--num-layers",
        type=int_in(MAX_LAYERS),
        help=bounded("override the number of decoder layers (truncated model)", MAX_LAYERS),
    )


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
