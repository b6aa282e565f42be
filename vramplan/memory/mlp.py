"""The MLP (gated, plain, MoE experts): what it saves, its working set in a forward that
saves nothing, and the end of an MoE block's forward."""

from __future__ import annotations

from vramplan.memory.context import ActivationContext
from vramplan.memory.liger import liger_experts, liger_experts_saved, liger_glu
from vramplan.memory.linears import linears_saved
from vramplan.memory.quantization import base_output_bytes
from vramplan.memory.types import (
    GATED_ROLES,
    MLP_IN_ROLES,
    MLP_OUT_ROLES,
    MOE_SHARED_ROLES,
    LinearRole,
)
from vramplan.model_spec import LayerSpec, ModelSpec


def mlp_saved(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, input_grad: bool) -> int:
    """Per token, what the MLP saves (mlp_saved_parts summed)."""
    return sum(mlp_saved_parts(spec, layer, ctx, input_grad))


def mlp_saved_parts(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, input_grad: bool) -> list[int]:
    """Per token, what the MLP saves, in forward order, down's saves last. Gated MLP: act
    saves its input gate (a view keeps a fused gate_up alive), the mul saves act(gate) and
    up, down_proj saves act*up only when its base needs it, each in the dtype of gate/up's
    output (quantization.base_output_bytes: fp32 behind a 4-bit bitsandbytes Linear on an fp32
    stream). [cal] MoE: one block (moe_saved)."""
    h = spec.hidden
    if layer.experts:
        return [moe_saved(spec, layer, ctx, input_grad), 0]
    ins = layer.linears_with(*MLP_IN_ROLES)
    downs = layer.linears_with(*MLP_OUT_ROLES)
    if not ins or not downs:
        return [0]
    f = downs[0].in_features
    gated = any(l.role in GATED_ROLES for l in ins)
    b = base_output_bytes(ctx)
    inner = [b * f] * 3 if gated else [b * f]  # gated: gate, act(gate), up; plain: fc1 out
    if gated and liger_glu(spec, layer, ctx.setup):
        inner = [b * f, 0, b * f]  # Liger's gated MLP saves gate and up, not act(gate) (liger.py)
    return [
        linears_saved(ins, h, ctx, input_grad),
        *inner,
        linears_saved(downs, f, ctx, True, from_stream=False, mlp_out=True),
    ]


def moe_saved(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, input_grad: bool) -> int:
    """transformers 5.x MixtralExperts: per routed token (top_k per token) the gathered
    input (when expert weights train), gate_up output (kept by the act's view), act out,
    act*up (when weights train) and the expert output saved by the routing-weight mul;
    LigerExperts: its fused Function's pre_act and input (liger.liger_experts_saved). Both:
    the router's input (trained) and its fp32 softmax, and shared experts' Linears."""
    assert layer.experts is not None
    h, e = spec.hidden, layer.experts
    router = ctx.stream * h if ctx.weights_train else 0
    router += 4 * e.num_experts * 2  # fp32 router softmax and its output
    shared = linears_saved(layer.linears_with(*MOE_SHARED_ROLES), h, ctx, input_grad)
    if liger_experts(spec, layer, ctx.setup):
        return liger_experts_saved(layer, ctx.weights_train, h) + router + shared
    per_route = 4 * e.intermediate + 2 * e.intermediate + 2 * h
    if ctx.weights_train:
        per_route += 2 * h + 2 * e.intermediate
    return e.top_k * per_route + router + shared


def is_gated(layer: LayerSpec) -> bool:
    return bool(layer.linears_with(*GATED_ROLES)) or bool(layer.experts)


def mlp_width(layer: LayerSpec, h: int) -> int:
    """Per token, the MLP's intermediate width (all routed experts' for MoE)."""
    if layer.experts:
        return layer.experts.intermediate * layer.experts.top_k
    downs = layer.linears_with(*MLP_OUT_ROLES)
    return downs[0].in_features if downs else h


def ckpt_forward(spec: ModelSpec, layer: LayerSpec, f: int, gated: bool, residual: int, lora_mlp: int) -> int:
    """Per token, a checkpointed layer's forward at the MLP (ckpt_forward_parts summed)."""
    return sum(ckpt_forward_parts(spec, layer, f, gated, residual, [lora_mlp] if lora_mlp else []))


def ckpt_forward_parts(
    spec: ModelSpec,
    layer: LayerSpec,
    f: int,
    gated: bool,
    residual: int,
    lora_mlp: list[int],
    b: int = 2,
    at_base: bool = False,
    glu_copies: bool = False,
) -> list[int]:
    """Per token, the tensors of a checkpointed layer's forward at the MLP, oldest first: the
    residual stream after attention and the MLP's input, then act(gate), up and their product
    (a fused gate_up, and MoE experts, keep the whole fused output behind the views; MoE also
    the gathered expert inputs; a plain MLP: fc1's output and its activation); with an
    adapted gate/up (`lora_mlp`: that adapter's tensors, lora.LoraForwardPoints.ckpt_mlp_parts),
    that adapter's path on top of act(gate) and the up projection's base output, where wider;
    `b` bytes per element of gate/up's output (quantization.base_output_bytes); `at_base`:
    lora_mlp is up's own base matmul (LLM.int8), before up's output exists; `glu_copies`: Liger's
    gated MLP on a fused gate_up copies gate and up before act*up (memory/liger.py). [CPU trace]"""
    fused = bool(layer.linears_with(LinearRole.GATE_UP)) or bool(layer.experts)
    b = 2 if layer.experts else b  # expert tensors are not 4-bit Linears
    # the MLP's input is the norm's output, or (post-norm) the residual stream itself
    stream = [residual] * (2 if layer.pre_norm else 1)
    inner = [2 * b * f, b * f, b * f] if fused else [b * f] * 3 if gated else [b * f, b * f]
    if fused and glu_copies:
        inner = [2 * b * f, b * f, b * f, b * f]  # Liger's contiguous gate and up copies, then act*up
    mlp = stream + inner
    if layer.experts:
        mlp.append(2 * layer.experts.top_k * spec.hidden)
    if not lora_mlp:
        return mlp
    adapter = [b * f, b * f] if gated else [b * f]
    adapter = adapter[: len(adapter) - 1] if at_base else adapter
    adapter += lora_mlp
    return adapter if sum(adapter) > sum(mlp) else mlp


def moe_forward_end(spec: ModelSpec, layer: LayerSpec, residual: int, weights_train: bool) -> int:
    """Per token, at the end of an MoE block's forward (recompute under checkpointing):
    each routed expert output times its fp32 routing weight (the bf16 output up-cast, and
    the product), the forward's locals (the residual stream after attention; the block's
    input and the gathered expert inputs unless the trained router and experts saved
    them), with the layer's output grad and the fp32 grad of the routed outputs in flight."""
    if not layer.experts:
        return 0
    routed = layer.experts.top_k * spec.hidden
    locals_ = residual + (0 if weights_train else residual + 2 * routed)
    return 4 * routed + 4 * routed + locals_ + residual + 4 * routed
