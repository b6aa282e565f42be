"""`vramplan estimate MODEL --gpus SPEC` without --method: the standard strategies side by side."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.errors import VramplanError
from vramplan.estimate import FUSED_LOSS_SHORT, estimate_spec, fp16_on_card, make_setup
from vramplan.hardware import GpuSpec
from vramplan.headroom import has_safe_headroom
from vramplan.memory import PhaseKind
from vramplan.model_spec import ModelSpec
from vramplan.results import Estimate
from vramplan.setup import Loss, Precision, fields_for_method

# GaLore as the comparison (and `plot scaling`) runs it: 8-bit layer-wise states, recomputation.
GALORE_STANDARD: dict[str, object] = dict(
    method="galore", optim="galore_adamw_8bit_layerwise", galore_rank=128, gradient_checkpointing=True
)

# Ordered by what a user gives up: all weights training in bf16 first; then the same with
# recomputation, 8-bit states or sharding; then GaLore (full-rank weights, low-rank
# updates); then adapters (LoRA, QLoRA); offload last (the slowest). The first that fits
# is recommended, and the reason says what it trades.
_CANDIDATES: list[tuple[str, dict[str, object], str]] = [
    ("full fine-tune", dict(method="full"), "trains every weight with plain AdamW, no recomputation"),
    (
        "full + ckpt",
        dict(method="full", gradient_checkpointing=True),
        "trains every weight; recomputes layers (~30% slower)",
    ),
    (
        "full + 8-bit Adam + ckpt",
        dict(method="full", optim="adamw_bnb_8bit", gradient_checkpointing=True),
        "trains every weight; 8-bit optimizer states",
    ),
    (
        "full + FSDP + ckpt",
        dict(method="full", fsdp="all", gradient_checkpointing=True),
        "trains every weight, sharded over all GPUs",
    ),
    (
        "full + FSDP + offload",
        dict(method="full", fsdp="all", cpu_offload=True, gradient_checkpointing=True),
        "trains every weight; shards and optimizer live in host RAM (slow PCIe-bound steps)",
    ),
    (
        "GaLore 8bit-lw r128 + ckpt",
        dict(GALORE_STANDARD),
        "full-parameter training with low-rank projected 8-bit updates (no gradient accumulation)",
    ),
    ("LoRA r16", dict(method="lora"), "frozen bf16 base with adapters, no recomputation"),
    ("LoRA + ckpt", dict(method="lora", gradient_checkpointing=True), "frozen bf16 base with adapters"),
    (
        "LoRA + FSDP + ckpt",
        dict(method="lora", fsdp="all", gradient_checkpointing=True),
        "frozen bf16 base sharded over all GPUs",
    ),
    ("QLoRA nf4 + ckpt", dict(method="qlora", gradient_checkpointing=True), "4-bit frozen base with adapters"),
    (
        "QLoRA + FSDP + ckpt",
        dict(method="qlora", fsdp="all", gradient_checkpointing=True),
        "4-bit base sharded over all GPUs",
    ),
    (
        "QLoRA r64 + FSDP + offload",
        dict(method="qlora", lora_r=64, fsdp="all", cpu_offload=True, gradient_checkpointing=True),
        "4-bit base sharded and offloaded to host RAM (Answer.AI's 70B recipe)",
    ),
]


@dataclass
class StrategyRow:
    label: str
    estimate: Estimate
    reason: str
    recommended: bool = False


# What the user's flags may set for every strategy; the rest is what tells the strategies apart.
_SHARED = (
    "batch_size",
    "seq_len",
    "precision",
    "lora_dropout",
    "lora_targets",
    "lora_target_modules",
    # the stack and how it runs: every strategy runs under them
    "stack",
    "loss",
    "fp32_outputs",
    "keep_logits",
    "compile",
    "adapter_dtype",
    "kbit_prep",
    "dora",
    "gradient_accumulation",
    "activation_offload",
    "checkpoint_reentrant",
    "attention",
    "packing",
    "model_dtype",
    "fsdp_version",
    "fsdp_sharding",
    "nodes",
)


def _shared_fields(base: dict) -> dict:
    """The flags every strategy takes, validated once: a bad value is an error, not an empty
    table. A flag that picks a strategy (--lora-r, --fsdp, ...) needs --method: silently
    dropping it would answer a question the user did not ask."""
    chosen = [k for k, v in base.items() if k not in _SHARED and k != "method" and v is not None]
    if chosen:
        flag = "--" + chosen[0].replace("_", "-")
        raise VramplanError(
            "sets one configuration: add --method (without it, estimate compares the standard "
            "strategies, which take only " + ", ".join("--" + k.replace("_", "-") for k in _SHARED) + ")",
            flag,
        )
    shared = {k: v for k, v in base.items() if k in _SHARED and v is not None}
    make_setup(method="lora", **shared)  # the method that reads every shared flag
    return shared


# Phases whose transient is the loss over the vocabulary (memory/loss.py)
_LOSS_PHASES = (PhaseKind.FORWARD_LOSS.label, PhaseKind.LOSS_BACKWARD.label)


def _with_fused_loss(
    spec: ModelSpec, gpus: GpuSpec, host_ram: int | None, label: str, fields: dict, est: Estimate
) -> list[StrategyRow]:
    """The same strategy with Liger's fused linear cross-entropy, when the model's own loss is
    the peak and the fused one makes it fit: the same training, a different kernel (in the
    precision the strategy ran in: fp16 on a card without bf16)."""
    if est.per_gpu.peak_phase not in _LOSS_PHASES:
        return []
    try:
        setup = make_setup(**fields_for_method({**fields, "loss": Loss.LIGER.value}))
        setup, _ = fp16_on_card(setup, gpus, est.setup.precision != Precision.FP16)
        fused = estimate_spec(spec, setup, gpus, host_ram)
    except VramplanError:
        return []  # a combination Liger refuses
    if not fused.fits:
        return []
    return [StrategyRow(f"{label} + fused CE", fused, FUSED_LOSS_SHORT)]


def compare(spec: ModelSpec, gpus: GpuSpec, base: dict, host_ram: int | None = None) -> list[StrategyRow]:
    """Estimate each standard strategy that the GPU count allows; recommend the first that fits
    under the headroom rule (vramplan.headroom, the plan's too), else the first that fits."""
    shared = _shared_fields(base)
    rows: list[StrategyRow] = []
    refused: list[VramplanError] = []
    for label, candidate, reason in _CANDIDATES:
        fields = dict(candidate)
        if fields.get("fsdp") == "all":
            if gpus.count < 2:
                continue
            fields["fsdp"] = gpus.count
        try:
            # a full fine-tune does not read --lora-dropout: the shared flags go where they apply
            setup, _ = fp16_on_card(make_setup(**fields_for_method({**shared, **fields})), gpus, "precision" in shared)
            est = estimate_spec(spec, setup, gpus, host_ram)
        except VramplanError as e:
            refused.append(e)
            continue  # e.g. a rank larger than a small test model's layers
        rows.append(StrategyRow(label, est, reason))
        if not est.fits and "loss" not in shared:
            rows += _with_fused_loss(spec, gpus, host_ram, label, {**shared, **fields}, est)
    if not rows and refused:
        # every strategy refused the shared flags (--attention flash on a class without it):
        # that one line, not an empty table read as "nothing fits"
        raise refused[0]
    fitting = [r for r in rows if r.estimate.fits]
    safe = [r for r in fitting if has_safe_headroom(r.estimate.headroom_bytes, r.estimate.gpu_memory_bytes)]
    if safe or fitting:
        (safe or fitting)[0].recommended = True
    return rows
