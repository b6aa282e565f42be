"""Read a framework's training config (axolotl, TRL/HF, LLaMA-Factory, torchtune, accelerate,
DeepSpeed) as TrainingSetup fields, and write one from a setup (docs/configs.md)."""

from vramplan.configs.combine import describe_reading, read_config, setup_fields
from vramplan.configs.detect import detect_format
from vramplan.configs.emit import EMIT_FORMATS, emit, write_atomic
from vramplan.configs.reading import (
    ConfigFormat,
    ConfigReading,
    Distributed,
    Unmodelled,
    Used,
)

__all__ = [
    "EMIT_FORMATS",
    "ConfigFormat",
    "ConfigReading",
    "Distributed",
    "Unmodelled",
    "Used",
    "describe_reading",
    "detect_format",
    "emit",
    "read_config",
    "setup_fields",
    "write_atomic",
]
