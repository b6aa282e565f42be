"""Stacks: a training framework's defaults for every knob, bundled (``--stack``).

Each bundle is a data file, ``vramplan/presets/stacks/<name>.json``, read from the
framework's own source at one release. A bundle is an ordered list of rules; each rule sets
one knob of :class:`~vramplan.setup.TrainingSetup` to one value, cites the file and line it
comes from and says why. A rule may hold only ``when`` some fields have given values
(``{"method": ["qlora"]}``); for each knob the first rule that holds wins, and a ``when``
sees the caller's fields, the knobs resolved by earlier rules, then the field defaults.

What the caller gives always wins over the bundle (``apply_stack``). A bundle value the
current fields cannot express yet (an optimizer name the contract has not modelled) is kept
in the data, left unapplied and said in the output lines, so the data stays the framework's.
"""

from __future__ import annotations

import json
from enum import Enum
from functools import cache
from importlib import resources
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from vramplan.errors import VramplanError
from vramplan.setup import Stack, TrainingSetup

# The fields a stack may set: the issue-13 knobs plus the engine defaults a framework picks.
# Workload choices (method, batch, sequence length, rank, world size) stay the user's.
STACK_KNOBS = frozenset(
    {
        "precision",
        "model_dtype",
        "optim",
        "optimizer_in_backward",
        "loss",
        "fp32_outputs",
        "keep_logits",
        "compile",
        "adapter_dtype",
        "modules_to_save_dtype",
        "quant_storage",
        "kbit_prep",
        "fp32_embeddings_norms",
        "dora",
        "lora_kernels",
        "liger_layers",
        "lora_targets",
        "lora_target_modules",
        "lora_dropout",
        "gradient_checkpointing",
        "checkpoint_reentrant",
        "activation_offload",
        "attention",
        "packing",
        "fsdp_version",
        "fsdp_embedding_units",
        "cpu_offload",
    }
)

# Knobs that say one thing together: a caller who gives one of them has chosen for all.
# (--lora-targets attention must not be overridden by a stack's explicit target_modules.)
KNOB_GROUPS = (frozenset({"lora_targets", "lora_target_modules"}),)

_STACK_FLAG = "--stack"


class StackRule(BaseModel):
    """One knob value of a stack, with its source."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    knob: str
    value: Any
    source: str  # "package==version path:line" (or "repo@commit path:line")
    why: str
    when: dict[str, tuple[Any, ...]] = {}
    supported: bool = True  # False: the value is not one the field accepts yet (left unapplied)

    def holds(self, context: dict[str, Any]) -> bool:
        return all(_plain(context.get(name)) in allowed for name, allowed in self.when.items())


class StackGap(BaseModel):
    """What the framework does by default that no setup field expresses yet: said in the output
    where its when-clause holds, so the estimate does not pass over it in silence."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    what: str
    source: str
    when: dict[str, tuple[Any, ...]] = {}

    def holds(self, context: dict[str, Any]) -> bool:
        return all(_plain(context.get(name)) in allowed for name, allowed in self.when.items())


class StackBundle(BaseModel):
    """A stack's rules, in the order the data file gives them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stack: Stack
    framework: str
    version: str
    comment: str = ""
    rules: tuple[StackRule, ...]
    unmodelled: tuple[StackGap, ...] = ()

    def resolve(self, given: dict[str, Any]) -> dict[str, StackRule]:
        """For each knob the caller did not give, the first rule that holds."""
        taken = _given_knobs(given)
        context = {name: f.default for name, f in TrainingSetup.model_fields.items()}
        context.update(given)
        chosen: dict[str, StackRule] = {}
        for rule in self.rules:
            if rule.knob in taken or rule.knob in chosen or not rule.holds(context):
                continue
            chosen[rule.knob] = rule
            if rule.supported:
                context[rule.knob] = rule.value
        return chosen


def _plain(value: Any) -> Any:
    """Enum members and their values compare alike; lists as tuples."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return tuple(value)
    return value


def _given_knobs(given: dict[str, Any]) -> set[str]:
    """The knobs the caller chose, a group counting as chosen when any member is."""
    taken = {k for k, v in given.items() if v is not None}
    for group in KNOB_GROUPS:
        if taken & group:
            taken |= group
    return taken


def parse_stack(value: Any) -> Stack:
    """A Stack from its name; an unknown name is one line naming --stack and the valid ones."""
    try:
        return Stack(_plain(value))
    except ValueError:
        valid = ", ".join(s.value for s in Stack)
        raise VramplanError(f"unknown stack {value!r}; valid: {valid}", _STACK_FLAG) from None


def _checked_rule(raw: dict[str, Any], name: str) -> StackRule:
    """A rule from the data file, its knob and when-fields checked, its value typed."""
    fields = TrainingSetup.model_fields
    knob = raw.get("knob")
    if knob not in STACK_KNOBS:
        raise ValueError(f"stack {name}: {knob!r} is not a stack knob ({', '.join(sorted(STACK_KNOBS))})")
    unknown = set(raw.get("when", {})) - set(fields)
    if unknown:
        raise ValueError(f"stack {name}: when-clause on unknown fields {sorted(unknown)}")
    raw = dict(raw)
    raw["when"] = {k: tuple(_plain(x) for x in v) for k, v in raw.get("when", {}).items()}
    try:
        annotation: Any = fields[knob].annotation
        value = TypeAdapter(annotation).validate_python(raw["value"])
        raw["value"] = _plain(value)
    except ValidationError:
        raw["supported"] = False
    return StackRule.model_validate(raw)


@cache
def load_stack(stack: Stack | str) -> StackBundle:
    """The bundle of a stack, from vramplan/presets/stacks/<name>.json."""
    stack = parse_stack(stack)
    text = resources.files("vramplan.presets").joinpath("stacks", f"{stack.value}.json").read_text()
    data = json.loads(text)
    rules = tuple(_checked_rule(r, stack.value) for r in data.get("rules", []))
    gaps = tuple(_checked_gap(g, stack.value) for g in data.get("unmodelled", []))
    return StackBundle.model_validate({**data, "rules": rules, "unmodelled": gaps})


def _checked_gap(raw: dict[str, Any], name: str) -> StackGap:
    unknown = set(raw.get("when", {})) - set(TrainingSetup.model_fields)
    if unknown:
        raise ValueError(f"stack {name}: unmodelled when-clause on unknown fields {sorted(unknown)}")
    when = {k: tuple(_plain(x) for x in v) for k, v in raw.get("when", {}).items()}
    return StackGap.model_validate({**raw, "when": when})


def apply_stack(fields: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The fields completed by their stack's bundle, and lines saying what the stack set.

    Fields given as None count as not given (the CLI passes None for an unset flag)."""
    given = {k: v for k, v in fields.items() if v is not None}
    stack = parse_stack(given.get("stack", Stack.PLAIN))
    bundle = load_stack(stack)
    chosen = bundle.resolve(given)
    out = dict(given)
    out["stack"] = stack.value
    for knob, rule in chosen.items():
        if rule.supported and rule.value is not None:
            out[knob] = rule.value
    kept = sorted({r.knob for r in bundle.rules} & _given_knobs(given))
    context = {name: f.default for name, f in TrainingSetup.model_fields.items()} | out
    return out, _lines(bundle, chosen, kept, context)


def set_by_stack(setup: TrainingSetup, knob: str) -> str:
    """' (set by --stack X: why; source)' when the setup's value of `knob` is the one its
    stack's rule gives (for an error about a value the caller never typed), else ''."""
    if setup.stack == Stack.PLAIN:
        return ""
    context = setup.model_dump()
    value = _plain(context.get(knob))
    for rule in load_stack(setup.stack).rules:
        if rule.knob == knob and rule.supported and rule.holds(context) and _plain(rule.value) == value:
            return f" (set by --stack {setup.stack.value}: {rule.why}; {rule.source})"
    return ""


# Knobs that do nothing in some setups; the output leaves them out there (the first: adapters only).
_LORA_KNOBS = frozenset({"adapter_dtype", "modules_to_save_dtype", "quant_storage", "kbit_prep", "dora"}) | frozenset(
    {"lora_targets", "lora_target_modules", "lora_dropout"}
)
_SHARDING_KNOBS = frozenset({"fsdp_version", "cpu_offload"})


def _matters(knob: str, values: dict[str, Any]) -> bool:
    if knob in _LORA_KNOBS:
        return _plain(values.get("method")) in ("lora", "qlora")
    if knob in _SHARDING_KNOBS:
        return (values.get("fsdp") or 1) > 1
    return True


def _flag(knob: str) -> str:
    return "--lora-targets" if knob == "lora_target_modules" else "--" + knob.replace("_", "-")


def _lines(bundle: StackBundle, chosen: dict[str, StackRule], kept: list[str], values: dict[str, Any]) -> list[str]:
    """What the output says about the stack: the values it set that differ from the reference
    step, the caller's flags that won over it, and framework values vramplan cannot model yet."""
    if bundle.stack == Stack.PLAIN:
        return []
    plain = TrainingSetup.model_validate({"method": values.get("method") or "full"})
    reference = {k: _plain(v) for k, v in plain.model_dump().items()}
    applied = [
        f"{k}={_show(r.value)}"
        for k, r in chosen.items()
        if r.supported and r.value != reference[k] and _matters(k, values)
    ]
    release = bundle.version.split()[0].rstrip(",")
    lines = [
        f"stack {bundle.stack.value} ({release}): "
        + (", ".join(applied) or "no knob differs")
        + "; every other knob as the reference step"
    ]
    flags = sorted({_flag(k) for k in kept if _matters(k, values)})
    if flags:
        lines.append(f"stack {bundle.stack.value}: your {', '.join(flags)} kept over the stack's")
    for knob, rule in chosen.items():
        if not rule.supported and _matters(knob, values):
            lines.append(
                f"stack {bundle.stack.value}: {bundle.framework} uses {knob}={_show(rule.value)} "
                f"({rule.source}), which vramplan does not model yet; the default stays"
            )
    for gap in bundle.unmodelled:
        line = f"stack {bundle.stack.value}: {gap.what} ({gap.source}); not modelled yet"
        if gap.holds(values) and line not in lines:  # one gap may have a when-clause per case
            lines.append(line)
    return lines


def _show(value: Any) -> str:
    if value is None:
        return "model default"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def stack_lines(setup: TrainingSetup) -> list[str]:
    """The output lines for a setup already built: each bundle knob the setup holds at the
    stack's value counts as set by the stack, any other as the caller's own. The when-clauses
    see the setup's final values, which is what ``apply_stack`` saw (given, then resolved)."""
    bundle = load_stack(setup.stack)
    values = setup.model_dump()
    chosen: dict[str, StackRule] = {}
    for rule in bundle.rules:
        if rule.knob not in chosen and rule.holds(values):
            chosen[rule.knob] = rule
    same = {k: r for k, r in chosen.items() if not r.supported or _plain(values[k]) == r.value}
    return _lines(bundle, same, sorted(set(chosen) - set(same)), values)
