"""The one headroom rule behind every recommendation (`estimate MODEL --gpus`, `plan`).

A configuration that fits by a few hundred MiB fits the estimate but not every run: the
caching allocator's fragmentation varies between runs (the allocator replay, reserved.py,
reads under the measured max_memory_reserved by 0.8-4.6 GiB on 7 of the 20 H100 cases in
tests/data/h100_dev.jsonl, docs/allocator.md), and a longer sample than the one planned
for adds activations. So both the strategy comparison and the plan recommend only a
configuration that leaves at least SAFE_SHARE of the card free, and say so; one that fits
with less is shown, never hidden, and a single estimate that fits with less says so
(estimate._tight_note).
"""

from __future__ import annotations

import math

from vramplan.units import GiB

SAFE_SHARE = 0.05


def safe_margin(capacity_bytes: int) -> int:
    """Bytes that must stay free on a card of this usable memory for a recommendation."""
    return math.ceil(SAFE_SHARE * capacity_bytes)


def has_safe_headroom(headroom_bytes: int, capacity_bytes: int) -> bool:
    return headroom_bytes >= safe_margin(capacity_bytes)


def rule_text(capacity_bytes: int) -> str:
    """The rule, as the comparison and the plan print it."""
    return (
        f"headroom rule: recommended only with at least {SAFE_SHARE:.0%} of the card free "
        f"({safe_margin(capacity_bytes) / GiB:.2f} GiB of {capacity_bytes / GiB:.2f} GiB: allocator "
        "fragmentation varies between runs, a longer sample needs more); tighter rows fit the estimate but "
        "are not recommended"
    )
