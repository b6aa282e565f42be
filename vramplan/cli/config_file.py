"""``--config FILE`` on estimate and plan: the training config the user already runs
(vramplan/configs, docs/configs.md) supplies the model, the setup fields and the world
size; the command line overrides each of them.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vramplan.errors import VramplanError

CONFIG_HELP = (
    "a training config: axolotl, TRL/HF TrainingArguments, LLaMA-Factory or torchtune YAML, or an "
    "accelerate YAML / DeepSpeed JSON (repeat --config for the launch file); the model, setup and "
    "GPU count come from it, flags override them (docs/configs.md)"
)
MODEL_MISSING = (
    "give MODEL (a preset, Hugging Face id, config.json or model folder), or a --config file that "
    "names one (base_model, model_name_or_path, model._component_)"
)
_COUNT = re.compile(r"^\s*\d+\s*[x*]", re.I)


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", metavar="FILE", help=CONFIG_HELP)


def read(args: argparse.Namespace):
    """The reading of the --config files, or None when none was given."""
    if not getattr(args, "config", None):
        return None
    from vramplan.configs import read_config

    return read_config(args.config)


def model_name(args: argparse.Namespace, reading) -> str:
    """MODEL on the command line, else the one the file names."""
    if args.model:
        return args.model
    if reading is not None and reading.model:
        return reading.model
    # the file names a model vramplan cannot map (a torchtune builder with no known checkpoint)
    skipped = reading.unmodelled if reading is not None else ()
    why = next((f"; {u.key}: {u.why}" for u in skipped if u.key.startswith("model")), "")
    raise VramplanError(MODEL_MISSING + why, "MODEL")


def gpus_text(args: argparse.Namespace, reading) -> str | None:
    """--gpus, with the file's world size (accelerate num_processes, TRL num_processes) as the
    count when --gpus names only the card; the file's world of detected GPUs when --gpus is absent."""
    world = reading.world if reading is not None else None
    if not world:
        return args.gpus
    if args.gpus is None:
        return _detected_card(world)
    return args.gpus if _COUNT.match(args.gpus) else f"{world}x{args.gpus.strip()}"


def _detected_card(world: int) -> str | None:
    from vramplan.hardware import detect_gpus

    found = detect_gpus()
    return f"{world}x{found.profile.name}" if found is not None else None


def setup_fields(args: argparse.Namespace, reading, world: int) -> dict:
    """The file's fields, the FSDP world from the GPU count, then the flags given."""
    from vramplan.cli.common import setup_fields as flag_fields

    flags = flag_fields(args)
    if reading is None:
        return flags
    from vramplan.configs import setup_fields as file_fields

    return file_fields(reading, flags, world)


def lines(reading) -> list[str]:
    if reading is None:
        return []
    from vramplan.configs import describe_reading

    return describe_reading(reading)


def print_lines(reading) -> None:
    """What the file gave (used / not modelled / unknown keys), on stderr so stdout stays the result."""
    for line in lines(reading):
        print(line, file=sys.stderr)


def _flag_fields(flag: str) -> set[str]:
    """The fields a flag sets (--lora-targets: either of two, or overrides a file's regex)."""
    field = flag[2:].replace("-", "_")
    return {"lora_targets", "lora_target_modules", "lora_target_regex"} if field == "lora_targets" else {field}


def without_regex_targets(fields: dict) -> tuple[dict, str | None]:
    """The file's one-string target_modules (a peft regex, configs/axolotl.py), taken out of the
    setup fields until the model it is matched against is known."""
    fields = dict(fields)
    return fields, fields.pop("lora_target_regex", None)


def with_regex_targets(spec, fields: dict, regex: str | None) -> tuple[dict, list[str]]:
    """The fields with the Linears the regex adapts in this model as lora_target_modules, and
    the note when it adapts some layers only (memory/lora.regex_target_names)."""
    if regex is None:
        return fields, []
    from vramplan.memory.lora import regex_target_names

    names, notes = regex_target_names(spec, regex)
    return {**fields, "lora_target_modules": names}, notes


def blamed_on_file(e: VramplanError, args: argparse.Namespace, reading) -> VramplanError:
    """An error about a value the --config file gave (not a flag on the command line) names
    the file's key and the file, then the flag that would override it: the user did not
    type that flag, so the flag alone would not say where to look."""
    if reading is None or not (e.flag or "").startswith("--"):
        return e
    fields = _flag_fields(e.flag or "")
    if any(getattr(args, f, None) is not None for f in fields):
        return e  # the command line gave it
    keys = [u.key for u in reading.used_keys if u.field in fields]
    if not keys:
        return e
    files = ", ".join(Path(f).name for f in reading.source_files)
    return VramplanError(e.message, f"{keys[-1]} in {files} ({e.flag})")


@contextmanager
def blame_file(args: argparse.Namespace, reading) -> Iterator[None]:
    """Re-raise a VramplanError through blamed_on_file."""
    try:
        yield
    except VramplanError as e:
        raise blamed_on_file(e, args, reading) from None
