"""One SHA-256 over every modelled phase of every preset x a grid of setups.

A refactoring of the memory model must leave this hash unchanged: it covers each
phase's display name, its (category, bytes) parts, the host-pinned bytes and the notes,
for the default step and for every_layer=True (one phase per decoder layer), and the
measured phase each modelled phase falls in.

    PYTHONPATH=. python scripts/phase_hash.py [--per-preset]
"""

from __future__ import annotations

import hashlib
import sys

from vramplan.memory import step_model
from vramplan.model_loader import load_model_spec, preset_names
from vramplan.setup import TrainingSetup

SETUPS: dict[str, dict] = {
    "full bf16": {"method": "full"},
    "full mixed": {"method": "full", "precision": "mixed"},
    "lora": {"method": "lora"},
    "lora ckpt": {"method": "lora", "gradient_checkpointing": True},
    "qlora nf4 ckpt": {"method": "qlora", "quant": "nf4", "gradient_checkpointing": True},
    "qlora hqq4": {"method": "qlora", "quant": "hqq4"},
    "galore": {"method": "galore"},
    "galore 8bit layerwise": {"method": "galore", "optim": "galore_adamw_8bit_layerwise"},
    "lora fsdp2": {"method": "lora", "fsdp": 2},
    "qlora fsdp2 offload ckpt": {"method": "qlora", "fsdp": 2, "cpu_offload": True, "gradient_checkpointing": True},
    "full adamw_bnb_8bit": {"method": "full", "optim": "adamw_bnb_8bit"},
    "lora attention": {"method": "lora", "lora_targets": "attention"},
    "lora mixed dropout0": {"method": "lora", "precision": "mixed", "lora_dropout": 0.0},
    "full mixed fsdp2 ckpt": {"method": "full", "precision": "mixed", "fsdp": 2, "gradient_checkpointing": True},
}
SEQ_LENS = (512, 4096)


def _measured(ph) -> str:
    """The measured phase (build, forward, backward, optimizer) the phase falls in."""
    if hasattr(ph, "measured"):
        return str(ph.measured)
    # a tree from before the memory package (commit 64c9e73 and earlier): matched by name
    from vramplan.memory import measured_phase

    return measured_phase(ph.name)


def _model_text(model) -> str:
    lines = [f"host_pinned={model.host_pinned}", *(f"note={n}" for n in model.notes)]
    for ph in model.phases:
        parts = sorted((c.value, b) for c, b in ph.parts.items())
        lines.append(f"{ph.name}|{_measured(ph)}|{parts}")
    return "\n".join(lines)


def preset_hash(name: str) -> str:
    spec = load_model_spec(name)
    h = hashlib.sha256()
    for label, fields in SETUPS.items():
        for seq in SEQ_LENS:
            setup = TrainingSetup(**fields, seq_len=seq)
            for every in (False, True):
                h.update(f"## {label} seq={seq} every={every}\n".encode())
                h.update(_model_text(step_model(spec, setup, every_layer=every)).encode())
    return h.hexdigest()


def main() -> None:
    total = hashlib.sha256()
    for name in preset_names():
        ph = preset_hash(name)
        total.update(f"{name}={ph}\n".encode())
        if "--per-preset" in sys.argv:
            print(f"{name:20s} {ph}")
    print(f"ALL {total.hexdigest()}")


if __name__ == "__main__":
    main()
