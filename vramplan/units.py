"""Byte units, parsed and formatted only at the edges. Inside: integer bytes.

``GB`` follows how GPUs are sold: a "24GB" card has 24 GiB of memory chips, so a bare
size with GB is read as GiB (2**30). ``GiB`` is 2**30 and ``MiB`` 2**20 everywhere.
"""

from __future__ import annotations

import re
from decimal import Decimal

from vramplan.errors import VramplanError

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
MAX_BYTES = 2**60  # sizes beyond any machine; keeps the arithmetic in range
_UNITS = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": KiB,
    "kib": KiB,
    "m": MiB,
    "mb": MiB,
    "mib": MiB,
    "g": GiB,
    "gb": GiB,
    "gib": GiB,
    "t": TiB,
    "tb": TiB,
    "tib": TiB,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str, flag: str = "size", unit_required: bool = False) -> int:
    """'24GB' -> 24 * 2**30 bytes (see module doc). Positive sizes only. unit_required: a
    bare number is an error (``--host-ram 128`` meant 128 GB, not 128 bytes)."""
    if not isinstance(text, str):
        raise VramplanError(f"must be a size such as '128GB', got {text!r}", flag)
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else None
    if m and unit_required and unit in ("", "b"):
        raise VramplanError(f"{text.strip()[:40]!r} has no unit; give one, e.g. {m.group(1)[:20]}GB", flag)
    if not m or unit not in _UNITS:
        raise VramplanError(f"cannot read size {text!r}; use e.g. 24GB, 80GiB, 512MiB", flag)
    digits = m.group(1).split(".")[0].lstrip("0")
    # Decimal, not float: exact, and '<400 nines>GB' is an error here rather than an OverflowError
    value = int(Decimal(m.group(1)) * _UNITS[unit]) if len(digits) <= 20 else MAX_BYTES + 1
    if value > MAX_BYTES:
        raise VramplanError(f"size {text[:40]!r} is above the limit of {MAX_BYTES // 2**50} PiB", flag)
    if value <= 0:
        raise VramplanError(f"size must be positive, got {text!r}", flag)
    return value


def host_ram_bytes(value: object, flag: str = "--host-ram") -> int | None:
    """Host RAM as given to the CLI or the Python API: None, a size with a unit ('128GB') or
    bytes (an int), each checked the same way."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_bytes(value, flag, unit_required=True)
    if isinstance(value, bool) or not isinstance(value, int):
        raise VramplanError(f"must be a size such as '128GB' or a number of bytes, got {value!r}", flag)
    if not 0 < value <= MAX_BYTES:
        raise VramplanError(f"must be between 1 byte and {MAX_BYTES // 2**50} PiB, got {value}", flag)
    return value


def gib(n: int | float) -> float:
    """Bytes as GiB, for display."""
    return n / GiB
