"""A framework file together with its accelerate/DeepSpeed files, as one reading."""

from __future__ import annotations

from typing import Any

from vramplan.configs import accelerate, axolotl, deepspeed, hf, llamafactory, torchtune
from vramplan.configs.detect import detect_format
from vramplan.configs.reading import (
    ENGINE_FIELDS,
    ConfigFormat,
    ConfigReading,
    Distributed,
    Reference,
    fmt_value,
    load_file,
    parse_text,
    resolve_reference,
)
from vramplan.errors import VramplanError

_READERS = {
    ConfigFormat.AXOLOTL: axolotl.read,
    ConfigFormat.TRL: hf.read,
    ConfigFormat.HF: lambda d, p, e: hf.read(d, p, e, ConfigFormat.HF),
    ConfigFormat.LLAMAFACTORY: llamafactory.read,
    ConfigFormat.TORCHTUNE: torchtune.read,
    ConfigFormat.ACCELERATE: accelerate.read,
    ConfigFormat.DEEPSPEED: deepspeed.read,
}
_REFERENCES = {
    ConfigFormat.AXOLOTL: axolotl.references,
    ConfigFormat.TRL: hf.references,
    ConfigFormat.HF: hf.references,
    ConfigFormat.LLAMAFACTORY: llamafactory.references,
}


def read_one(data: dict, path: str, fmt: ConfigFormat | None = None, engine: dict | None = None) -> ConfigReading:
    fmt = fmt or detect_format(data, path)
    try:
        return _READERS[fmt](data, path, engine or {})
    except (TypeError, AttributeError, KeyError) as e:  # a value of a shape no framework writes
        raise VramplanError(
            f"holds a value of an unexpected type ({type(e).__name__}: {e})", f"--config {path}"
        ) from None


def read_config(paths: list[str]) -> ConfigReading:
    """Read one framework file and/or accelerate/DeepSpeed files (given, or named inside it)."""
    if not paths:
        raise VramplanError("needs at least one file", "--config")
    loaded = []
    for path in paths:
        data = load_file(path)
        loaded.append((str(path), data, detect_format(data, str(path))))
    frameworks = [item for item in loaded if not item[2].is_engine]
    if len(frameworks) > 1:
        raise VramplanError(
            f"{frameworks[0][0]} and {frameworks[1][0]} are both training configs; give one "
            "(plus accelerate/DeepSpeed files)",
            "--config",
        )
    engines = [read_one(d, p, f) for p, d, f in loaded if f.is_engine]
    if frameworks:
        path, data, fmt = frameworks[0]
        engines += _referenced(path, data, fmt, {r.format for r in engines})
    engines = _follow(engines)
    engine_fields = {k: v for r in engines for k, v in r.fields.items()}
    if not frameworks:
        return _merge(None, engines)
    path, data, fmt = frameworks[0]
    return _merge(read_one(data, path, fmt, engine_fields), engines)


def read_text(text: str, label: str, fmt: ConfigFormat) -> ConfigReading:
    """Read config text already known to be ``fmt`` (the emitter's round trip)."""
    data = parse_text(text, label)
    if fmt.is_engine:
        return _merge(None, _follow([read_one(data, label, fmt)]))
    engines = _follow(_referenced(label, data, fmt, set()))
    engine_fields = {k: v for r in engines for k, v in r.fields.items()}
    return _merge(read_one(data, label, fmt, engine_fields), engines)


def _referenced(path: str, data: dict, fmt: ConfigFormat, given: set) -> list[ConfigReading]:
    out = []
    for ref in _REFERENCES.get(fmt, lambda d: [])(data):
        if ref.format in given:
            continue  # the command line named it: that one wins
        out.append(_read_reference(ref, path))
    return out


def _read_reference(ref: Reference, path: str) -> ConfigReading:
    if isinstance(ref.value, dict):  # an inline DeepSpeed config
        return read_one(ref.value, f"{path}: {ref.key}", ref.format)
    if not isinstance(ref.value, str):
        raise VramplanError(f"must be a file path or a mapping, got {ref.value!r}", f"{path}: {ref.key}")
    target = resolve_reference(ref.value, path, ref.key)
    data = load_file(target)
    found = detect_format(data, str(target))
    if found != ref.format:
        raise VramplanError(
            f"names {target}, a {found.value} file; expected a {ref.format.value} file", f"{path}: {ref.key}"
        )
    return read_one(data, str(target), found)


def _follow(engines: list[ConfigReading]) -> list[ConfigReading]:
    """An accelerate file may name a DeepSpeed JSON (deepspeed_config.deepspeed_config_file)."""
    out = list(engines)
    for reading in engines:
        for ref in reading.references:
            if not any(r.format == ref.format for r in out):
                out.append(_read_reference(ref, reading.source_files[0]))
    return out


def _merge(framework: ConfigReading | None, engines: list[ConfigReading]) -> ConfigReading:
    """Framework fields, then the launch files' engine fields (they own the sharding)."""
    base = framework or engines[0]
    fields: dict[str, Any] = {}
    for reading in ([framework] if framework else []) + engines:
        for key, value in reading.fields.items():
            if reading is framework or key in ENGINE_FIELDS or key not in fields:
                fields[key] = value
    world = next((r.world for r in engines if r.world is not None), base.world)
    distributed = next((r.distributed for r in engines if r.distributed != Distributed.NONE), base.distributed)
    if distributed == Distributed.FSDP and world is not None and "fsdp" not in fields:
        fields["fsdp"] = world
    everything = ([framework] if framework else []) + engines
    # what the framework file derived without an engine that a launch file's FSDP or DeepSpeed undoes
    undone = _undone_by_engine(framework, distributed)
    for key in undone:
        fields.pop(key, None)
    return ConfigReading(
        format=base.format,
        stack=base.stack,
        model=base.model,
        fields=fields,
        used_keys=tuple(u for r in everything for u in r.used_keys if u.field not in undone),
        unmodelled=tuple(u for r in everything for u in r.unmodelled),
        unknown=tuple(f"{r.source_files[0]}: {k}" if len(everything) > 1 else k for r in everything for k in r.unknown),
        source_files=tuple(dict.fromkeys(f for r in everything for f in r.source_files)),
        distributed=distributed,
        world=world,
        references=(),
    )


def _undone_by_engine(framework: ConfigReading | None, distributed: Distributed) -> tuple[str, ...]:
    """axolotl's fp32 embeddings and norms, read from a file that names no engine, when a launch
    file given beside it runs FSDP or DeepSpeed: axolotl casts them back under FSDP, DeepSpeed's
    bf16 engine casts the module back (configs/axolotl.py _fp32_embeddings)."""
    engine = distributed in (Distributed.FSDP, Distributed.DEEPSPEED)
    if framework is None or framework.distributed != Distributed.NONE or not engine:
        return ()
    return ("fp32_embeddings_norms",)


def describe_reading(reading: ConfigReading) -> list[str]:
    """The lines the CLI prints about a config it read."""
    stack = f"; stack {reading.stack.value}" if reading.stack else ""
    lines = [f"config: {', '.join(reading.source_files)} ({reading.format.value}{stack})"]
    if reading.model:
        lines.append(f"model: {reading.model}")
    if reading.distributed != Distributed.NONE:
        world = f", {reading.world} processes" if reading.world else ", world size from --gpus"
        lines.append(f"launch: {reading.distributed.value}{world}")
    for used in reading.used_keys:
        note = f" ({used.note})" if used.note else ""
        lines.append(f"used: {used.key} -> {used.field}={fmt_value(used.value)}{note}")
    for skipped in reading.unmodelled:
        lines.append(f"not modelled: {skipped.key} ({skipped.why})")
    if reading.unknown:
        lines.append("unknown keys: " + ", ".join(reading.unknown))
    return lines


def setup_fields(reading: ConfigReading, flags: dict[str, Any] | None = None, world: int | None = None) -> dict:
    """Fields for ``TrainingSetup``: the file's, the world size when FSDP takes it from the
    launcher (``world``, from --gpus), then the explicit command-line flags."""
    fields = dict(reading.fields)
    if reading.distributed == Distributed.FSDP and "fsdp" not in fields and world:
        fields["fsdp"] = world
    if reading.stack is not None:
        fields.setdefault("stack", reading.stack)
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if given.keys() & {"lora_targets", "lora_target_modules"}:
        fields.pop("lora_target_regex", None)  # --lora-targets replaces the file's targets, whatever their form
    fields.update(given)
    return fields
