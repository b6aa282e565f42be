"""What reading a framework's config file yields, and the checks every reader shares.

A reader maps the keys of one file to ``TrainingSetup`` field values (typed: enums, ints,
bools, tuples), and records for each key it used the field it set, for each memory-relevant
key it could not model why, and the keys it does not know. Bad values raise a
``VramplanError`` whose one line names the file, the key and what is allowed.
"""

from __future__ import annotations

import json
import os
import stat
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict

from vramplan.errors import VramplanError
from vramplan.setup import Stack

MAX_BYTES = 1 << 20  # a training config is a few KiB; refuse anything that is not one
MAX_DEPTH = 24  # nesting levels (the deepest real config, torchtune, has 3)
MAX_NODES = 200_000  # values visited, bounds YAML anchors that fan out


class ConfigFormat(str, Enum):
    AXOLOTL = "axolotl"
    TRL = "trl"  # `trl sft --config` YAML / SFTConfig
    HF = "hf"  # transformers TrainingArguments YAML or JSON
    LLAMAFACTORY = "llamafactory"
    TORCHTUNE = "torchtune"
    ACCELERATE = "accelerate"  # `accelerate config` YAML
    DEEPSPEED = "deepspeed"  # DeepSpeed JSON

    @property
    def is_engine(self) -> bool:
        """Accelerate and DeepSpeed files configure the launch, not the training step."""
        return self in (ConfigFormat.ACCELERATE, ConfigFormat.DEEPSPEED)


class Distributed(str, Enum):
    NONE = "none"
    DDP = "ddp"
    FSDP = "fsdp"
    DEEPSPEED = "deepspeed"


class Used(NamedTuple):
    key: str
    field: str
    value: Any
    note: str = ""


class Unmodelled(NamedTuple):
    key: str
    why: str


class Reference(NamedTuple):
    """An accelerate or DeepSpeed config named inside a framework file (path or inline dict)."""

    key: str
    format: ConfigFormat
    value: Any


# Fields an accelerate/DeepSpeed file owns: when both it and the framework file set one, it wins.
ENGINE_FIELDS = frozenset(
    {
        "fsdp",
        "fsdp_version",
        "fsdp_sharding",
        "cpu_offload",
        "deepspeed",
        "offload_optimizer",
        "offload_params",
        "nodes",
    }
)


class ConfigReading(BaseModel):
    """One file's (or one framework file plus its launch files') contribution to the setup."""

    model_config = ConfigDict(frozen=True)

    format: ConfigFormat
    stack: Stack | None  # None for a lone accelerate/DeepSpeed file
    model: str | None = None  # HF id or local path named in the file
    fields: dict[str, Any]  # TrainingSetup field -> value
    used_keys: tuple[Used, ...] = ()
    unmodelled: tuple[Unmodelled, ...] = ()
    unknown: tuple[str, ...] = ()
    source_files: tuple[str, ...]
    distributed: Distributed = Distributed.NONE
    world: int | None = None  # processes over all nodes, when a file says it
    references: tuple[Reference, ...] = ()


def load_file(path: str | Path) -> dict:
    """Parse a YAML or JSON config: regular file, at most MAX_BYTES, a mapping at the top."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise VramplanError(f"cannot read it ({e.strerror})", f"--config {p}") from None
    if not stat.S_ISREG(st.st_mode):
        raise VramplanError("must be a regular file", f"--config {p}")
    if st.st_size > MAX_BYTES:
        raise VramplanError(f"is {st.st_size} bytes; a config file is at most {MAX_BYTES}", f"--config {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    return parse_text(text, str(p), json_first=p.suffix.lower() == ".json")


def parse_text(text: str, label: str, json_first: bool = False) -> dict:
    try:
        data = json.loads(text) if json_first else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VramplanError(f"is not valid {'JSON' if json_first else 'YAML'} ({first})", f"--config {label}") from None
    if not isinstance(data, dict):
        raise VramplanError("must hold a mapping of keys to values at the top", f"--config {label}")
    _check_shape(data, label)
    return data


def _check_shape(data: Any, label: str) -> None:
    stack, nodes = [(data, 1)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH or nodes > MAX_NODES:
            raise VramplanError(
                f"is nested deeper than {MAX_DEPTH} levels or holds more than {MAX_NODES} values", f"--config {label}"
            )
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)


def resolve_reference(ref: str, config_path: str, key: str) -> Path:
    """A file named inside a config: next to the config first, then the current folder
    (frameworks resolve it against the folder they are launched from)."""
    for base in (Path(config_path).parent, Path(os.getcwd())):
        candidate = (base / ref).resolve()
        if candidate.is_file():
            return candidate
    raise VramplanError(
        f"names {ref}, not found next to the file or in the current folder; pass that file as a second --config",
        f"{config_path}: {key}",
    )


def fmt_value(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(fmt_value(v) for v in value)
    return str(value)
