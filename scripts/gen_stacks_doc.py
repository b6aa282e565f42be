"""Write the generated tables of docs/stacks.md from vramplan/presets/stacks/*.json.

    python scripts/gen_stacks_doc.py        # rewrites the part between the markers

The text around the markers is hand-written; tests/test_stacks.py checks that the page cites
every bundle value's source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vramplan.setup import Stack
from vramplan.stacks import STACK_KNOBS, StackRule, load_stack

DOC = Path(__file__).resolve().parents[1] / "docs" / "stacks.md"
BEGIN, END = "<!-- stacks:begin (scripts/gen_stacks_doc.py) -->", "<!-- stacks:end -->"
KNOB_ORDER = [
    "precision",
    "model_dtype",
    "loss",
    "fp32_outputs",
    "keep_logits",
    "compile",
    "optim",
    "optimizer_in_backward",
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
]


def _value(value: Any, supported: bool = True) -> str:
    if value is None:
        text = "model default"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    return text if supported else f"{text} (not modelled yet)"


def _when(rule: StackRule) -> str:
    return " and ".join(
        f"{k} in {'/'.join('none' if v is None else _value(v) for v in vs)}" for k, vs in rule.when.items()
    )


def _cell(rules: list[StackRule]) -> str:
    if not rules:
        return "·"
    parts = [f"{_value(r.value, r.supported)} if {_when(r)}" if r.when else _value(r.value, r.supported) for r in rules]
    return "; else ".join(parts)


def matrix() -> str:
    stacks = [s for s in Stack if s != Stack.PLAIN]
    assert set(KNOB_ORDER) == STACK_KNOBS
    rows = ["| knob | " + " | ".join(s.value for s in stacks) + " |", "|---|" + "---|" * len(stacks)]
    for knob in KNOB_ORDER:
        cells = [_cell([r for r in load_stack(s).rules if r.knob == knob]) for s in stacks]
        rows.append(f"| {knob} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def per_stack(stack: Stack) -> str:
    bundle = load_stack(stack)
    out = [f"### {stack.value}: {bundle.framework}", "", f"Version: {bundle.version}.", ""]
    if bundle.comment:
        out += [bundle.comment, ""]
    out += ["| knob | value | when | source | why |", "|---|---|---|---|---|"]
    for r in bundle.rules:
        out.append(f"| {r.knob} | {_value(r.value, r.supported)} | {_when(r) or 'always'} | `{r.source}` | {r.why} |")
    seen: set[str] = set()
    for gap in bundle.unmodelled:  # said in the output where it holds; one line per distinct gap here
        if gap.what not in seen:
            seen.add(gap.what)
            out += ["", f"Not modelled yet, said in the output where it applies: {gap.what} (`{gap.source}`)."]
    return "\n".join(out)


def generated() -> str:
    parts = [
        "## Every stack at a glance",
        "",
        (
            "`·` = the stack does not set the knob (the reference step's value stays). "
            "`a if method in qlora; else b`: the first rule that holds wins."
        ),
        "",
        matrix(),
        "",
        "## Each stack, value by value",
        "",
    ]
    parts += [per_stack(s) + "\n" for s in Stack if s != Stack.PLAIN]
    return "\n".join(parts)


def main() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{generated()}\n{END}{tail}")


if __name__ == "__main__":
    main()
