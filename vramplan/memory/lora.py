"""LoRA adapters (peft): which Linears get them, their storage (fp32, or bf16 with
--adapter-dtype bf16), what an adapted Linear saves for backward, the input copy its
adapter path reads, and its forward's output terms."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from vramplan.errors import VramplanError
from vramplan.memory.accelerate import upcasts_trainable
from vramplan.memory.context import ActivationContext
from vramplan.memory.liger import liger_norms
from vramplan.memory.norms import norm_saved
from vramplan.memory.types import (
    ATTENTION_ROLES,
    MLP_OUT_ROLES,
    MLP_ROLES,
    LinearRole,
    ParamKind,
)
from vramplan.model_spec import LayerSpec, Linear, ModelSpec, narrower_than
from vramplan.setup import AdapterDtype, LoraTargets, TrainingSetup
from vramplan.stacks import set_by_stack


def adapter_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of lora_A/lora_B, their grads (AccumulateGrad keeps the param's
    dtype) and torch AdamW's states (zeros_like). peft==0.21.2 tuners/tuners_utils.py:2705-2750
    (cast_adapter_dtype): get_peft_model(autocast_adapter_dtype=True), the default, replaces
    bf16 adapters by fp32 ones [cal]; autocast_adapter_dtype=False (TRL on a 4-bit model,
    axolotl peft_autocast_adapter_dtype: false, torchtune) keeps the base's bf16. [CPU trace]
    accelerate's FSDP2 preparation upcasts trainable parameters to fp32 (memory/accelerate.py)."""
    return 4 if upcasts_trainable(setup) else setup.adapter_store_dtype.bytes


def _name_matches(name: str, key: str) -> bool:
    """peft's target_modules list rule (tuners_utils.check_target_module_exists): the
    module's full name equals the key or ends with "." + key."""
    return name == key or name.endswith("." + key)


def lora_targeted(lin: Linear, setup: TrainingSetup) -> bool:
    """Whether peft puts an adapter on this Linear (an explicit target_modules list, else
    all-linear or attention)."""
    if not setup.lora_like:
        return False
    if setup.lora_target_modules:
        return any(_name_matches(lin.name, key) for key in setup.lora_target_modules)
    if lin.role in (LinearRole.ROUTER, LinearRole.OTHER):
        return False
    if setup.lora_targets == LoraTargets.ATTENTION:
        return lin.role in ATTENTION_ROLES
    return True


def check_lora_targets(spec: ModelSpec, setup: TrainingSetup) -> None:
    """Every name of --lora-targets must adapt some decoder Linear (peft raises otherwise)."""
    if not (setup.lora_like and setup.lora_target_modules):
        return
    names = sorted({lin.name for layer in spec.layers for lin in layer.linears})
    for key in setup.lora_target_modules:
        if not any(_name_matches(n, key) for n in names):
            leaves = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))
            by_stack = set_by_stack(setup, "lora_target_modules")
            raise VramplanError(
                f"{key!r}{by_stack} matches no Linear of {spec.name}'s decoder layers; they are: {leaves}"
                + ("; give --lora-targets (all-linear, attention or names)" if by_stack else ""),
                "--lora-targets",
            )


def regex_target_names(spec: ModelSpec, pattern: str) -> tuple[tuple[str, ...], list[str]]:
    """peft's target_modules given as one string (axolotl's lora_target_modules: '...', TRL's
    one-name list, which it unwraps): a regular expression matched in full against each
    module's full name (peft==0.21.2 tuners/tuners_utils.py:2370-2371, utils/other.py:1521).
    Matched here against the decoder Linears' names (spec.layers_path.N.name), it becomes
    the list of the Linears it adapts. A Linear adapted in some layers only is counted in
    every layer (an upper bound), said in a note; modules outside the decoder layers (a
    vision tower, lm_head) are not adapted by the memory model either way."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise VramplanError(f"{pattern!r} is not a regular expression ({e})", "--lora-targets") from None
    layers: dict[str, int] = {}
    for i, layer in enumerate(spec.layers):
        for lin in layer.linears:
            if rx.fullmatch(f"{spec.layers_path}.{i}.{lin.name}"):
                layers[lin.name] = layers.get(lin.name, 0) + 1
    if not layers:
        example = f"{spec.layers_path}.0.{spec.layers[0].linears[0].name}" if spec.layers else spec.layers_path
        raise VramplanError(
            f"{pattern!r} matches no Linear of {spec.name}'s decoder layers: peft matches one string as a "
            f"regular expression in full against names such as {example}",
            "--lora-targets",
        )
    some = [f"{name} in {n} of {len(spec.layers)} layers" for name, n in sorted(layers.items()) if n < len(spec.layers)]
    notes = (
        [f"LoRA targets adapt {', '.join(some)}: estimated as adapted in every layer (an upper bound)"] if some else []
    )
    return tuple(sorted(layers)), notes


def check_lora_rank(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """peft accepts any rank >= 1 (peft==0.21.2 tuners/lora/layer.py:239 LoraLayer.update_layer
    refuses only r <= 0): above a Linear's smaller dimension its adapter is simply full rank,
    still r·(in + out) parameters, which is what the memory model counts. A rank above every
    adapted Linear's larger dimension cannot be meant and is refused; one above some
    adapted Linear's smaller dimension (Qwen2.5-0.5B's 128-wide k_proj at r=256, a MoE's
    1-wide shared-expert gate) is said in a note."""
    if not setup.lora_like:
        return []
    targeted = [lin for layer in spec.layers for lin in layer.linears if lora_targeted(lin, setup)]
    if not targeted:
        return []
    r = setup.lora_r
    largest = max(max(lin.in_features, lin.out_features) for lin in targeted)
    if r > largest:
        raise VramplanError(f"rank {r} is larger than every adapted layer's dimensions (largest {largest})", "--lora-r")
    below = narrower_than(targeted, r)
    if not below:
        return []
    return [
        f"LoRA rank {r} is above the smaller dimension of {', '.join(below)}: peft accepts it, and those "
        "adapters are full rank at r·(in + out) parameters each (counted so)"
    ]


def lora_saved(in_dim: int, ctx: ActivationContext, input_grad: bool, x_saved: bool = False) -> int:
    """peft LoRA Linear: x.to(fp32) -> dropout (bool mask when the input needs grad) ->
    lora_A saves its fp32 input -> lora_B saves A's output. Under autocast lora_A casts
    its input back to bf16 and saves that. [cal: l32-1b lora/qlora, notes table 3] Under
    FSDP2 the adapters compute in bf16: the cast is a no-op, so without dropout lora_A
    saves x itself, shared with whatever else saved it (`x_saved`). [CPU trace]"""
    mask = in_dim if (ctx.lora_dropout and input_grad) else 0
    if ctx.lora_autocast:
        return mask + 2 * in_dim + 2 * ctx.lora_r
    if ctx.adapters_bf16:
        x = 0 if (x_saved and not ctx.lora_dropout) else 2 * in_dim
        return mask + x + 2 * ctx.lora_r
    return mask + 4 * in_dim + 4 * ctx.lora_r


def lora_input_copy(in_dim: int, ctx: ActivationContext) -> int:
    """Per token, the copy of x that peft's adapter path reads: x.to(lora_A's dtype) (fp32
    adapters), autocast's bf16 copy of the fp32 stream, none for bf16 adapters on a bf16
    stream. lora_A saves it, so only a forward that saves nothing counts it apart. [CPU trace]"""
    if ctx.lora_autocast:
        return 2 * in_dim
    return 0 if ctx.adapters_bf16 else 4 * in_dim


def fp32_copy_local(in_dim: int, ctx: ActivationContext, input_bytes: int | None = None) -> int:
    """Under autocast over a bf16 input with fp32 adapters peft first makes x.to(fp32)
    (peft==0.21.2 tuners_utils.py:2220-2235 _cast_input_dtype): a local through the adapter's path,
    beside autocast's bf16 cast of it that lora_A saves (in a forward that saves nothing that cast
    is freed once lora_A ran, so the fp32 copy is the input copy left at the output terms). The
    input is bf16 on a bf16 stream (axolotl's and LLaMA-Factory's LoRA over bf16 weights), and at
    down whatever the stream (`input_bytes`: act(gate)*up, autocast's bf16 product, over fp32
    weights too). [CPU trace: ax-reward-lora, ax-reward-qlora-ckpt, found with the reward model,
    whose forward peaks in the last layer's MLP; grpo-prefill-lora-all, found with GRPO's small
    head, whose backward peaks in down's recompute]"""
    dt = ctx.stream if input_bytes is None else input_bytes
    if ctx.lora_autocast and dt == 2 and ctx.setup.adapter_store_dtype == AdapterDtype.FP32:
        return 4 * in_dim
    return 0


def lora_copy_local(in_dim: int, ctx: ActivationContext, input_bytes: int | None = None) -> int:
    """That copy when it is a local, not saved: with dropout lora_A saves dropout(x) instead
    (under autocast lora_A's own bf16 cast of dropout(x) is what it saves). Over a bf16 stream
    with fp32 adapters, peft's fp32 copy (fp32_copy_local), and under dropout its fp32 output too
    until lora_A has cast it (the mask is saved: lora_saved) [CPU trace: ax-reward-lora-dropout]."""
    fp32_copy = fp32_copy_local(in_dim, ctx, input_bytes)
    if fp32_copy:
        return fp32_copy * (2 if ctx.lora_dropout else 1)
    return lora_input_copy(in_dim, ctx) if ctx.lora_dropout and not ctx.lora_autocast else 0


def lora_forward_per_out(ctx: ActivationContext) -> int:
    """Per output feature, peft lora.Linear.forward's `result + lora_B(lora_A(x)) * scaling`
    in the adapter dtype, then .to(result dtype). fp32 adapters: the scaled fp32 B output,
    the result up-cast and their sum (12·out); bf16 adapters (autocast, FSDP2): B's output
    is freed after the scaling, so the scaled output and the sum (4·out) [CPU trace]; fp32
    adapters on an 8-bit base, B's output and its scaled copy (8·out: lora_output_parts)"""
    if ctx.adapters_bf16:
        return 4
    return 8 if ctx.quant == ParamKind.INT8 else 12


def lora_output_parts(ctx: ActivationContext, out: int, result: int = 2) -> list[int]:
    """lora_forward_per_out's tensors for `out` output features, oldest first: fp32 adapters
    the scaled B output, the up-cast result and their sum; bf16 the scaled output and the sum,
    which takes the base result's dtype (`result` bytes: fp32 behind bitsandbytes' 4-bit Linear
    on an fp32 stream, quantization.base_output_bytes)."""
    if ctx.adapters_bf16:
        return [2 * out, result * out]
    if ctx.quant == ParamKind.INT8:
        # peft's lora.bnb.Linear8bitLt outside autocast (peft==0.21.2 tuners/lora/bnb.py:226-235):
        # `lora_B(lora_A(x)) * scaling`, then `.to(result.dtype)` before the add: B's fp32 output
        # and its scaled copy are the widest, then bf16 tensors. [CPU trace: tiny-vocab qlora-int8-ckpt]
        return [4 * out, 4 * out]
    return [lora_forward_per_out(ctx) * out // 3] * 3


def lora_grad_width(ctx: ActivationContext) -> int:
    """Bytes per element of the grads through the adapter path (its compute dtype)."""
    return 2 if ctx.adapters_bf16 else 4


def norm_output_saved(ctx: ActivationContext) -> bool:
    """Whether a node saved the very tensor a Linear reads (the norm's output): lora_A for
    bf16 adapters without autocast and without dropout; hqq's matmul. Otherwise the
    forward holds it as a local. [CPU trace]"""
    return (ctx.adapters_bf16 and not ctx.lora_autocast and not ctx.lora_dropout) or ctx.quant_saves_input


def lora_outputs(lin: Linear, ctx: ActivationContext, saving: bool, result: int = 2) -> list[int]:
    """Per token, an adapted Linear's output terms (lora_output_parts), saving forward or not;
    `result` bytes per element of the base's result (o_proj's is always bf16)."""
    return lora_output_parts(ctx, lin.out_features, 2 if lin.role == LinearRole.O else result)


def lora_recompute_stop(lin: Linear, ctx: ActivationContext, result: int = 2) -> list[int]:
    """Per token, down's forward where the recompute stops: lora_B has saved its input, the
    layer's last saved tensor, so only the base's result (`result` bytes) exists, not the
    adapter path."""
    return [result * lin.out_features]


# what an adapter variant holds at a Linear's widest: (Linear, context, saving forward) -> parts
OutputParts = Callable[[Linear, ActivationContext, bool], list[int]]
StopParts = Callable[[Linear, ActivationContext], list[int]]


@dataclass(frozen=True)
class LoraForwardPoints:
    """Per-token bytes of one decoder layer's forward at its adapters."""

    widest: tuple[int, ...]  # widest adapted Linear before down: the layer's unsaved locals + its adapter path
    down: tuple[int, ...]  # down's adapter forward, the whole layer saved by then
    down_rc: tuple[int, ...]  # the same in the recompute, which stops before down's adapter path
    recompute_absent: int  # saved tensors the recompute has not made yet at the widest adapter
    down_absent: int  # saved tensors not made yet at down's adapter (Gemma 2's post-MLP norm)
    ckpt_mlp: tuple[int, ...]  # a forward that saves nothing, at an adapted MLP Linear (empty: none)
    post_mlp_norm: bool  # a post-MLP norm's backward, not an adapter's, starts the recompute
    widest_linear: Linear | None = None  # the Linear of `widest` (and of ckpt_mlp)
    down_linear: Linear | None = None  # the adapted down projection of `down`
    down_common: tuple[int, ...] = ()  # down's locals before its output terms (`down` less those)


def _forward_locals_at(
    lin: Linear, ctx: ActivationContext, norm_out: int, residual: int, outputs: OutputParts = lora_outputs
) -> list[int]:
    """Per token, the tensors of an adapted Linear's forward before down, oldest first: inside
    the MLP the residual stream after attention, the norm's output feeding it (norm_out), the
    copy its adapter reads under dropout, and peft's output terms (o_proj's result bf16, the
    others' `b` bytes)."""
    return [
        residual if lin.role in MLP_ROLES else 0,
        norm_out,
        lora_copy_local(lin.in_features, ctx),
        *outputs(lin, ctx, True),
    ]


def _down_common(
    dn: Linear | None, ctx: ActivationContext, residual: int, norm_out: int, saved: bool, b: int = 2
) -> list[int]:
    """Per token, down's adapter's locals before its output terms: down runs last, with the
    whole MLP saved; its input, act(gate)*up (`b` bytes), is a local unless a node saved it (`saved`),
    plus the copy the adapter reads under dropout; the decoder layer still holds the norm's
    output it passed to the MLP and the residual stream after attention."""
    if dn is None:
        return []
    return [residual, norm_out, 0 if saved else b * dn.in_features, lora_copy_local(dn.in_features, ctx, b)]


def lora_forward_points(
    spec: ModelSpec,
    layer: LayerSpec,
    ctx: ActivationContext,
    f: int,
    residual: int,
    outputs: tuple[OutputParts, StopParts] = (lora_outputs, lora_recompute_stop),
    b: int = 2,
) -> LoraForwardPoints:
    """The layer's forward at its widest adapter and at down's; `outputs`: the adapter
    variant's output terms and where the recompute stops in down (LoRA's, DoRA's); `b` bytes
    per element of act*up, down's input (quantization.base_output_bytes).
    [CPU trace, dropout as CUDA holds it]"""
    terms, stop = outputs
    adapted = [l for l in layer.linears if lora_targeted(l, ctx.setup)]
    saved_norm_out = norm_output_saved(ctx)
    # post-norm layers (OLMo2) feed the blocks the residual stream itself, already counted
    norm_out = 0 if saved_norm_out or not layer.pre_norm else residual
    # a saving forward's residual stream after attention is what Liger's post-attention norm saved
    local_residual = 0 if liger_norms(spec, ctx.setup) else residual
    widest = max(
        (l for l in adapted if l.role not in MLP_OUT_ROLES),
        key=lambda l: sum(_forward_locals_at(l, ctx, norm_out, local_residual, terms)),
        default=None,
    )
    # in the recompute torch's checkpoint stops early, in down (`stop`: LoRA's, DoRA's)
    dn = next((l for l in adapted if l.role in MLP_OUT_ROLES), None)
    common = _down_common(dn, ctx, local_residual, norm_out, saved_norm_out, b)
    down = common + terms(dn, ctx, True) if dn else []
    down_rc = [*common, *stop(dn, ctx)] if dn else []
    in_mlp = widest is not None and widest.role in MLP_ROLES
    # a fused gate_up runs before the activation exists, which the layer's saved count holds
    absent = 2 * f if widest is not None and widest.role == LinearRole.GATE_UP else 0
    # Gemma 2's post-feedforward norm runs after the MLP: its saved fp32 input does not exist
    # yet at an MLP adapter, and its backward, not down's adapter, starts the recompute
    post_mlp_norm = layer.post_mlp_norm and in_mlp
    if post_mlp_norm:
        absent += norm_saved(spec, ctx, True)
    # a forward that saves nothing (checkpointing) holds the norm's output and the adapter's
    # input copy as locals (dropout's output and mask are freed once lora_A ran)
    ckpt_mlp = (
        [
            *[residual] * (2 if layer.pre_norm else 1),
            fp32_copy_local(widest.in_features, ctx) or lora_input_copy(widest.in_features, ctx),
            *terms(widest, ctx, False),
        ]
        if widest is not None and in_mlp
        else []
    )
    return LoraForwardPoints(
        widest=tuple(_forward_locals_at(widest, ctx, norm_out, local_residual, terms)) if widest else (),
        down=tuple(down),
        down_rc=tuple(down_rc),
        recompute_absent=absent,
        down_absent=norm_saved(spec, ctx, True) if layer.post_mlp_norm and dn is not None else 0,
        ckpt_mlp=tuple(ckpt_mlp),
        post_mlp_norm=post_mlp_norm,
        widest_linear=widest,
        down_linear=dn,
        down_common=tuple(common),
    )


def first_in_backward(linears: list[Linear]) -> Linear | None:
    """The first of these Linears backward reaches: backward meets them in reverse forward
    order, down first, else o_proj."""
    return next((l for roles in (MLP_OUT_ROLES, (LinearRole.O,)) for l in linears if l.role in roles), None)


def lora_backward_points(
    spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, residual: int, post_mlp_norm: bool
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(first adapter reached in backward: lora_A's input grad in the adapter dtype + the
    output grad; grads alive when checkpointing recomputes the layer: output grad + that
    first adapter's output grad, as recompute starts inside its backward)."""
    first = first_in_backward([l for l in layer.linears if lora_targeted(l, ctx.setup)])
    norm_grads = (residual, 4 * spec.hidden)  # a post-MLP norm: the layer's output grad and its fp32 output grad
    if first is None:
        return (), norm_grads if post_mlp_norm else ()
    width = lora_grad_width(ctx)
    # fp32 adapters: peft's `result + lora_out` promotes to fp32, so its backward also hands
    # the base branch a bf16 copy of the output grad
    copy = 0 if ctx.adapters_bf16 else 2 * first.out_features
    inflight = norm_grads if post_mlp_norm else (residual, width * first.out_features, copy)
    return (residual, width * first.in_features), inflight
