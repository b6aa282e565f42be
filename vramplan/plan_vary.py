"""`plan --vary KNOB=V1,V2`: stack knobs the plan's search tries besides its own axes.

The search's own axes (method, rank, precision, optimizer of a full fine-tune,
checkpointing, FSDP/ZeRO, offload, micro-batch, sequence) are always searched. A stack knob
(the loss kernel, activation offload, attention, adapter dtype, optimizer) is fixed by
`--stack`/`--config`, or left at the reference step's value; `--vary` makes the search try
each listed value for every configuration, so a fused cross-entropy or offloaded
checkpoints compete on tokens/s with everything else. Each row's label then names the
value it used, and `--emit` writes it in the framework's own keys (configs/emit.py).
"""

from __future__ import annotations

import itertools
from enum import Enum
from typing import Any

from vramplan.errors import VramplanError
from vramplan.setup import ActivationOffload, AdapterDtype, Attention, LigerLayers, Loss, Optim, TrainingSetup

# knob (TrainingSetup field) -> its enum; the CLI spells the field with dashes
VARIABLE_KNOBS: dict[str, type[Enum]] = {
    "loss": Loss,
    "activation_offload": ActivationOffload,
    "attention": Attention,
    "adapter_dtype": AdapterDtype,
    "optim": Optim,
    "liger_layers": LigerLayers,
}
MAX_VARIED_COMBINATIONS = 64  # the search's cost grows with the product of the lists


def _knob_name(field: str) -> str:
    return field.replace("_", "-")


def _parse_one(item: str) -> tuple[str, tuple[str, ...]]:
    """'loss=hf,liger' -> ('loss', ('hf', 'liger')), each value checked against the knob's enum."""
    allowed_knobs = ", ".join(_knob_name(k) for k in VARIABLE_KNOBS)
    if not isinstance(item, str) or "=" not in item:
        raise VramplanError(f"give KNOB=V1,V2 (knobs: {allowed_knobs}), got {item!r}", "--vary")
    name, _, values = item.partition("=")
    field = name.strip().lower().replace("-", "_")
    if field not in VARIABLE_KNOBS:
        raise VramplanError(f"unknown knob {name.strip()!r}; allowed: {allowed_knobs}", "--vary")
    enum = VARIABLE_KNOBS[field]
    valid = [m.value for m in enum]
    out: list[str] = []
    for v in (v.strip() for v in values.split(",")):
        if not v:
            continue
        if v not in valid:
            raise VramplanError(f"{_knob_name(field)}: {v!r} is not one of {', '.join(valid)}", "--vary")
        if v not in out:
            out.append(v)
    if not out:
        raise VramplanError(f"{_knob_name(field)}: give at least one value ({', '.join(valid)})", "--vary")
    return field, tuple(out)


def parse_vary(items: list[str] | tuple[str, ...] | dict | None) -> dict[str, tuple[str, ...]]:
    """--vary's repeated KNOB=V1,V2 items (or an already parsed dict) -> {field: values}."""
    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else [_parse_one(i) for i in items]
    out: dict[str, tuple[str, ...]] = {}
    for field, values in pairs:
        if isinstance(values, str):
            values = (values,)
        field, checked = _parse_one(f"{field}={','.join(str(getattr(v, 'value', v)) for v in values)}")
        if field in out:
            raise VramplanError(f"{_knob_name(field)} is given twice; list its values once", "--vary")
        out[field] = checked
    combos = 1
    for values in out.values():
        combos *= len(values)
    if combos > MAX_VARIED_COMBINATIONS:
        raise VramplanError(f"{combos} combinations; at most {MAX_VARIED_COMBINATIONS}", "--vary")
    return out


def expand_groups(groups: list[list[dict[str, Any]]], vary: dict[str, tuple[str, ...]]) -> list[list[dict[str, Any]]]:
    """Every group once per combination of the varied knobs' values (a group keeps its ranks
    in order, so the search's early stop within a group still holds)."""
    if not vary:
        return groups
    fields = list(vary)
    out: list[list[dict[str, Any]]] = []
    seen: set[tuple] = set()
    for combo in itertools.product(*(vary[f] for f in fields)):
        knobs = {f: VARIABLE_KNOBS[f](v) for f, v in zip(fields, combo, strict=True)}
        for group in groups:
            expanded = [{**cand, **knobs} for cand in group]
            key = tuple(tuple(sorted((k, str(v)) for k, v in c.items())) for c in expanded)
            if key not in seen:  # a varied optimizer can meet a full fine-tune's own choice
                seen.add(key)
                out.append(expanded)
    return out


def varied_label(setup: TrainingSetup, vary: dict[str, tuple[str, ...]]) -> list[str]:
    """The label parts naming each varied knob's value in this row ('loss liger')."""
    parts = []
    for field in vary:
        value = getattr(setup, field)
        parts.append(f"{_knob_name(field)} {getattr(value, 'value', value)}")
    return parts
