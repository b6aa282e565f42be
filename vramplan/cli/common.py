"""What the commands share: the one-line error parser, the reference step's options, --host-ram."""

from __future__ import annotations

import argparse
from typing import NoReturn

from vramplan.errors import VramplanError
from vramplan.estimate import default_host_ram
from vramplan.setup import (
    ActivationOffload,
    AdapterDtype,
    Attention,
    DeepSpeedStage,
    FsdpSharding,
    LoraTargets,
    Loss,
    Method,
    ModelDtype,
    Optim,
    Packing,
    Precision,
    Quant,
    Stack,
    TrainingSetup,
    split_module_names,
)
from vramplan.units import parse_bytes

MODEL_HELP = "preset name or alias, a config.json path, or a directory with one"
GPUS_HELP = "NxSIZE (2x24GB), a profile (rtx-4090) or Nxprofile (2xrtx-3090); default: detected"


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one VramplanError line (main prints it), no usage dump."""

    def error(self, message: str) -> NoReturn:
        raise VramplanError(message)


def _help(name: str) -> str:
    return TrainingSetup.model_fields[name].description or ""


def _choices(enum: type) -> list[str]:
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
    _flag(p, "batch_size", type=int, extra_help=" (default 1)")
    _flag(p, "seq_len", type=int, extra_help=" (default 2048)")
    p.add_argument("--num-layers", type=int, help="override the number of decoder layers (truncated model)")
    _flag(p, "lora_r", type=int, extra_help=" (default 16)")
    _flag(p, "lora_dropout", type=float, extra_help=" (default 0.05)")
    p.add_argument("--lora-targets", dest="lora_targets", action=_LoraTargetsAction,
                   metavar="{all-linear,attention,NAME,...}",
                   help="which Linears get adapters: all-linear, attention, or a comma-separated list of module "
                        "names as peft's target_modules (q_proj,v_proj)")
    p.set_defaults(lora_target_modules=None)
    _flag(p, "quant", choices=_choices(Quant))
    _flag(p, "galore_rank", type=int, extra_help=" (default 128)")
    _flag(p, "gradient_checkpointing", boolean=True)
    _flag(p, "fsdp", type=int)
    _flag(p, "cpu_offload", boolean=True)
    add_stack_options(p)
    add_engine_options(p)


def add_stack_options(p: argparse.ArgumentParser) -> None:
    """The knobs real training frameworks turn (docs/stacks.md, docs/memory-model.md)."""
    _flag(p, "stack", choices=_choices(Stack))
    _flag(p, "loss", choices=_choices(Loss))
    _flag(p, "fp32_outputs", boolean=True)
    _flag(p, "keep_logits", boolean=True)
    _flag(p, "adapter_dtype", choices=_choices(AdapterDtype))
    _flag(p, "kbit_prep", boolean=True)
    _flag(p, "dora", boolean=True)
    _flag(p, "optimizer_in_backward", boolean=True)
    _flag(p, "gradient_accumulation", type=int, extra_help=" (default 1)")
    _flag(p, "activation_offload", choices=_choices(ActivationOffload))
    _flag(p, "checkpoint_reentrant", boolean=True)
    _flag(p, "attention", choices=_choices(Attention))
    _flag(p, "packing", choices=_choices(Packing))
    _flag(p, "model_dtype", choices=_choices(ModelDtype))


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """How the GPUs share the work: DDP, FSDP1/2, DeepSpeed ZeRO (docs/memory-model.md, "Engines")."""
    _flag(p, "fsdp_version", type=int, choices=(1, 2))
    _flag(p, "fsdp_sharding", choices=_choices(FsdpSharding))
    _flag(p, "deepspeed", choices=_choices(DeepSpeedStage))
    _flag(p, "offload_optimizer", boolean=True)
    _flag(p, "offload_params", boolean=True)
    _flag(p, "nodes", type=int)


SETUP_KEYS = tuple(k for k in TrainingSetup.model_fields if k != "galore_update_proj_gap")


def setup_fields(args: argparse.Namespace) -> dict:
    """The TrainingSetup fields given on the command line (unset options left to the defaults)."""
    return {k: getattr(args, k) for k in SETUP_KEYS if getattr(args, k, None) is not None}


def host_ram(args: argparse.Namespace) -> int | None:
    """--host-ram in bytes, or the default for where the GPUs come from (estimate.default_host_ram)."""
    if args.host_ram:
        return parse_bytes(args.host_ram, "--host-ram")
    return default_host_ram(gpus_named=bool(args.gpus))
