"""One decoder layer: the bytes autograd saves in it, and the widest moments of its
backward (LayerPoints) assembled from the attention, MLP, norm, LoRA and 4-bit rules."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import cast

from vramplan.memory.attention import attention_kind, attention_saved, attention_span
from vramplan.memory.checkpointing import checkpointed_forward
from vramplan.memory.compile import compiled_mlp_parts, compiled_norm_saved
from vramplan.memory.context import ActivationContext, activation_context, stream_bytes
from vramplan.memory.dora import (
    dora_backward_parts,
    dora_forward_weights,
    dora_norm_absent,
    dora_output_parts,
    dora_recompute_grads,
    dora_recompute_stop,
)
from vramplan.memory.liger import (
    liger_experts,
    liger_experts_forward_end,
    liger_experts_grads,
    liger_experts_weight_grads,
    liger_glu,
    liger_glu_grads,
    liger_norms,
)
from vramplan.memory.linears import linears_saved
from vramplan.memory.lora import (
    LoraForwardPoints,
    first_in_backward,
    lora_backward_points,
    lora_forward_points,
    lora_outputs,
    lora_recompute_stop,
    lora_targeted,
)
from vramplan.memory.lora_kernels import kernels_components, kernels_fused, kernels_points
from vramplan.memory.mlp import is_gated, mlp_saved_parts, mlp_width, moe_forward_end
from vramplan.memory.norms import norm_saved
from vramplan.memory.quantization import (
    base_output_bytes,
    dequantize_backward,
    dequantize_transient_parts,
    int8_forward_parts,
    quant_input_bytes,
)
from vramplan.memory.types import ATTENTION_IN_ROLES, MLP_IN_ROLES, MLP_OUT_ROLES, LinearRole, ParamKind
from vramplan.memory.unsloth import FusedLoraPoints, unsloth_components, unsloth_fused, unsloth_points
from vramplan.model_spec import LayerSpec, Linear, ModelSpec
from vramplan.setup import ActivationOffload, Attention, ModelDtype, Quant, TrainingSetup


def layer_saved_per_token(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup, input_grad: bool = True) -> int:
    """Bytes autograd saves per token in one decoder layer (no checkpointing). --compile on a
    full fine-tune: the compiled layer's norms and MLP (compile.py)."""
    ctx = activation_context(setup)
    fused = unsloth_components if unsloth_fused(spec, layer, setup) else None
    fused = kernels_components if kernels_fused(spec, layer, setup) else fused
    if fused is not None:
        attention = [attention_saved(spec, layer, ctx, attention_span(setup))]
        o_shared = attention_kind(spec, setup) != Attention.EAGER
        return sum(fused(spec, layer, ctx, input_grad, attention, o_shared)[0])
    h = spec.hidden
    attn_in = layer.linears_with(*ATTENTION_IN_ROLES)
    n_norms = max(spec.norms_per_layer, 1)
    saved = compiled_norm_saved(spec, ctx, norm_saved(spec, ctx, input_grad))
    saved += linears_saved(attn_in, h, ctx, input_grad)
    # q_norm / k_norm: q and k need grad whatever trains (the layer's input does)
    saved += sum(norm_saved(spec, ctx, True, width=w) for w in layer.attn_norm_dims)
    saved += attention_saved(spec, layer, ctx, attention_span(setup))
    # o_proj reads the attention output, which SDPA already saved (same tensor)
    saved += linears_saved(
        layer.linears_with(LinearRole.O),
        spec.q_dim,
        ctx,
        True,
        input_shared=attention_kind(spec, setup) != Attention.EAGER,
        from_stream=False,
    )
    # post-attn / pre-/post-ffw norms
    saved += compiled_norm_saved(spec, ctx, norm_saved(spec, ctx, True)) * (n_norms - 1)
    saved += sum(compiled_mlp_parts(spec, layer, ctx, mlp_saved_parts(spec, layer, ctx, True)))
    return saved


@dataclass(frozen=True)
class LayerPoints:
    """Per-token bytes at the widest points of one decoder layer's backward, read from
    autograd's lifetimes (a saved tensor is freed once the node that saved it has run)
    and checked against the CPU trace of the real step (tests/test_cpu_trace.py)."""

    down_saved: int  # saved by the down projection (its input; LoRA's fp32 copy): freed first
    mlp_grads: int  # MLP elementwise backward: grad of act*up, of act, of up + the layer's output grad
    end_grads: int  # layer done: grad of its input + the residual grad
    lora_fwd: int  # widest peft LoRA Linear forward before down (fp32 B output, scaled, up-cast result, sum)
    # + the layer's unsaved forward locals at that Linear
    lora_bwd: int  # first adapter reached in backward: lora_A's fp32 input grad + the output grad
    lora_inflight: int  # grads alive when checkpointing recomputes the layer: output grad + that
    # first adapter's fp32 output grad (recompute starts inside its backward)
    quant_numel: int = 0  # QLoRA: weight elements of the first 4-bit Linear reached in backward
    quant_bwd: int = 0  # its input grad (bf16) while the output grad and its adapter's input grad live
    quant_freed: int = 0  # what its adapter saved, freed by then (peft's adapter branch runs first)
    quant_parts: tuple[int, ...] = ()  # bytes: its weight dequantized (quantization.DequantizeBackward.parts)
    down_held: int = 0  # saved at down but kept to the layer's end (LLM.int8's input to down)
    hook_grads: int = 0  # grads in flight when an MLP weight's grad is accumulated (layer-wise optimizers)
    recompute_absent: int = 0  # saved tensors the recompute has not made yet at the widest adapter
    moe_fwd: int = 0  # MoE: the end of the experts' forward in the recompute (fp32 routing product)
    lora_down: int = 0  # down's adapter forward, the whole layer saved by then (same terms as lora_fwd)
    lora_down_rc: int = 0  # the same in the recompute, which stops before down's adapter path
    down_absent: int = 0  # saved tensors not made yet at down's adapter (Gemma 2's post-MLP norm)
    ckpt_fwd: int = 0  # checkpointed forward (nothing saved): the MLP's working set at its widest
    # the tensors of the sums above, oldest first (the allocation events: memory/events.py)
    lora_fwd_parts: tuple[int, ...] = ()
    lora_down_parts: tuple[int, ...] = ()
    lora_down_rc_parts: tuple[int, ...] = ()
    lora_bwd_parts: tuple[int, ...] = ()
    lora_inflight_parts: tuple[int, ...] = ()
    ckpt_fwd_parts: tuple[int, ...] = ()
    mlp_grads_parts: tuple[int, ...] = ()
    end_grads_parts: tuple[int, ...] = ()
    quant_bwd_parts: tuple[int, ...] = ()
    mlp_weights: tuple[int, ...] = ()  # bytes: weight-sized tensors at the MLP moment (LigerExperts' weight grads)
    dora: DoraPoints | None = None  # DoRA's moments (None without DoRA)


@dataclass(frozen=True)
class DoraPoints:
    """DoRA's share of one decoder layer's moments (memory/dora.py). The *_weights are bytes
    (the adapted Linear's weight-sized locals: dora.dora_forward_weights), the rest per token."""

    fwd_weights: tuple[int, ...] = ()  # at lora_fwd's Linear (a saving forward, the recompute)
    down_weights: tuple[int, ...] = ()  # at down's adapter
    ckpt_weights: tuple[int, ...] = ()  # at the checkpointed forward's moment, when it is an adapter's
    bwd_parts: tuple[int, ...] = ()  # the first adapter backward reaches, at the magnitude's grad
    # (the layer's output grad, then dora.dora_backward_parts), the whole layer saved
    mlp_parts: tuple[int, ...] = ()  # the MLP's input adapter at the magnitude's grad: the layer's
    # output grad, the other branch's grad pending, dora.dora_backward_parts
    mlp_freed: int = 0  # what the MLP's elementwise backward released by then (beyond down's saves)
    norm_absent: int = 0  # down's saves made after its weight norm (dora.dora_norm_absent)
    down_common: tuple[int, ...] = ()  # down's forward locals before its adapter's (lora.LoraForwardPoints)


def layer_points(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup) -> LayerPoints:
    ctx = activation_context(setup)
    if unsloth_fused(spec, layer, setup):
        return fused_layer_points(spec, layer, setup, unsloth_points(spec, layer, ctx))
    if kernels_fused(spec, layer, setup):
        return fused_layer_points(spec, layer, setup, kernels_points(spec, layer, ctx))
    h = spec.hidden
    downs = layer.linears_with(*MLP_OUT_ROLES)
    gated = is_gated(layer)
    f = mlp_width(layer, h)
    down_saved, down_held = _down_saves(downs, layer, ctx, f)
    residual = ctx.stream * h
    # what gate/up (and down) return: fp32 behind bnb's 4-bit Linear on an fp32 stream
    b = 2 if layer.experts else base_output_bytes(ctx)
    fwd, at_base = _forward_points(spec, layer, ctx, (f, residual), b)
    lora_bwd, lora_inflight = lora_backward_points(spec, layer, ctx, residual, fwd.post_mlp_norm)
    first = first_in_backward([l for l in layer.linears if lora_targeted(l, setup)])
    if setup.dora and first is not None and not fwd.post_mlp_norm:
        lora_inflight = (residual, *dora_recompute_grads(first, ctx))
    deq = dequantize_backward(layer, ctx, residual)
    ckpt_fwd = checkpointed_forward(spec, layer, ctx, f, gated, residual, list(fwd.ckpt_mlp), at_base)
    mlp_grads = _mlp_grads(spec, layer, setup, (f, residual), b)
    experts = liger_experts(spec, layer, setup)
    # the checkpointed forward's widest moment is the adapter's (not the MLP's or the attention's)
    at_adapter = bool(fwd.ckpt_mlp) and ckpt_fwd != checkpointed_forward(spec, layer, ctx, f, gated, residual, [])
    return LayerPoints(
        down_saved=down_saved,
        down_held=down_held,
        mlp_grads=sum(mlp_grads),
        end_grads=2 * residual,
        lora_fwd=sum(fwd.widest),
        lora_down=sum(fwd.down),
        lora_down_rc=sum(fwd.down_rc),
        lora_bwd=sum(lora_bwd),
        down_absent=fwd.down_absent,
        lora_inflight=sum(lora_inflight),
        quant_numel=deq.numel,
        quant_bwd=sum(deq.grads),
        quant_bwd_parts=deq.grads,
        quant_freed=deq.freed,
        quant_parts=deq.parts,
        hook_grads=residual + 2 * f + 2 * h,
        recompute_absent=fwd.recompute_absent,
        moe_fwd=liger_experts_forward_end(layer, h, residual)
        if experts
        else moe_forward_end(spec, layer, residual, ctx.weights_train),
        mlp_weights=liger_experts_weight_grads(layer, expert_weight_bytes(setup)) if experts else (),
        ckpt_fwd=sum(ckpt_fwd),
        lora_fwd_parts=fwd.widest,
        lora_down_parts=fwd.down,
        lora_down_rc_parts=fwd.down_rc,
        lora_bwd_parts=lora_bwd,
        lora_inflight_parts=lora_inflight,
        ckpt_fwd_parts=tuple(ckpt_fwd),
        mlp_grads_parts=mlp_grads,
        end_grads_parts=(residual, residual),
        dora=dora_points(layer, ctx, fwd, (f, residual), at_adapter) if setup.dora else None,
    )


def _mlp_grads(
    spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup, widths: tuple[int, int], b: int
) -> tuple[int, ...]:
    """Per token, the MLP's elementwise backward: the layer's output grad and the grads of
    act*up, act and up in the dtype of gate/up's output (`b` bytes; `widths`: the MLP's width and
    the residual stream's bytes per token); Liger's kernels write some over their saves
    (memory/liger.py)."""
    f, residual = widths
    if liger_experts(spec, layer, setup):
        return (residual, *liger_experts_grads(layer, spec.hidden))
    gated = is_gated(layer)
    if gated and liger_glu(spec, layer, setup):
        return (residual, *liger_glu_grads(b, f, fused=bool(layer.linears_with(LinearRole.GATE_UP))))
    return (residual, *[b * f] * (3 if gated else 2))


def expert_weight_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of the expert weights a MoE Function sees: the gathered bf16 ones under
    FSDP or ZeRO, else the stored dtype."""
    stored_fp32 = setup.weight_dtype == ModelDtype.FP32
    return 4 if stored_fp32 and not setup.sharded and setup.deepspeed is None else 2


def _down_saves(downs: list[Linear], layer: LayerSpec, ctx: ActivationContext, f: int) -> tuple[int, int]:
    """Per token, (what down saves and its backward frees, what it saves and the layer keeps to
    its end: LLM.int8's input, quantization.int8_held)."""
    saved = linears_saved(downs, f, ctx, True, from_stream=False, mlp_out=True) if downs and not layer.experts else 0
    held = (
        quant_input_bytes(ctx, False, mlp_out=True) * f
        if ctx.quant == ParamKind.INT8 and ctx.quant_saves_input and saved
        else 0
    )
    return saved - held, held


def _forward_points(
    spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, widths: tuple[int, int], b: int
) -> tuple[LoraForwardPoints, bool]:
    """The layer's forward moments at its adapters (lora.lora_forward_points; DoRA's or LLM.int8's
    variant), and whether a checkpointed forward is widest at an 8-bit base's matmul; `widths`:
    the MLP's width and the residual stream's bytes per token."""
    f, residual = widths
    lora_variant = (partial(lora_outputs, result=b), partial(lora_recompute_stop, result=b))
    int8 = ctx.quant == ParamKind.INT8
    if int8:
        lora_variant = (partial(_int8_outputs, result=b), lora_variant[1])
    outputs = (dora_output_parts, dora_recompute_stop) if ctx.setup.dora else lora_variant
    fwd = lora_forward_points(spec, layer, ctx, f, residual, outputs, b)
    if not int8:
        return fwd, False
    # a checkpointed forward's widest MLP moment: at up's 8-bit base matmul or its adapter's
    at_base = _int8_base_widest(fwd.widest_linear, ctx, b) if fwd.ckpt_mlp else False
    return _int8_down_base(fwd, b * f, b), at_base


def _int8_down_base(fwd: LoraForwardPoints, act_up: int, result: int) -> LoraForwardPoints:
    """Down's 8-bit base matmul as the layer's widest forward moment where it is wider: before
    down saves anything (the moment's live bytes are the widest's: the layer saved less down's),
    with the MLP's locals, its input act*up (`act_up` bytes) and the matmul's working set."""
    dn = fwd.down_linear
    if dn is None:
        return fwd
    base = (*fwd.down_common[:2], act_up, *int8_forward_parts(dn, result))
    return replace(fwd, widest=base, widest_linear=dn) if sum(base) > sum(fwd.widest) else fwd


def _int8_outputs(lin: Linear, ctx: ActivationContext, saving: bool, result: int) -> list[int]:
    """At an adapted Linear before down over an 8-bit base, the wider of its two moments: the
    base's matmul (quantization.int8_forward_parts, output in its input's dtype: bf16 for
    o_proj's attention output) or the adapter's path after it (lora_outputs). A checkpointed
    forward (not `saving`) counts the base's output itself (mlp.ckpt_forward_parts). Down's
    base matmul comes before down saves anything: _int8_down_base."""
    lora = lora_outputs(lin, ctx, saving, result)
    if lin.role in MLP_OUT_ROLES:
        return lora
    if not saving:
        return int8_forward_parts(lin, _int8_out(lin, result), False) if _int8_base_widest(lin, ctx, result) else lora
    return _wider(lora, int8_forward_parts(lin, _int8_out(lin, result)))


def _int8_base_widest(lin: Linear | None, ctx: ActivationContext, result: int) -> bool:
    """Whether a checkpointed forward is wider at an adapted Linear's 8-bit base matmul than
    at its adapter's path, which also holds the base's output (mlp.ckpt_forward_parts)."""
    if lin is None:
        return False
    base = int8_forward_parts(lin, _int8_out(lin, result), with_output=False)
    return sum(base) > sum(lora_outputs(lin, ctx, False, result)) + result * lin.out_features


def _int8_out(lin: Linear, result: int) -> int:
    return 2 if lin.role == LinearRole.O else result


def _wider(a: list[int], b: list[int]) -> list[int]:
    return a if sum(a) >= sum(b) else b


def _mlp_input_moment(layer: LayerSpec, ctx: ActivationContext, f: int, residual: int) -> tuple[tuple[int, ...], int]:
    """The MLP's input adapter backward reaches first (the last one forward made: up, else
    gate, a fused gate_up, fc1) at the magnitude's grad: (the tensors in flight per token: the
    layer's output grad, the other branch's grad still pending, its DoRA backward; what the
    elementwise backward released by then). up: act(gate)·up's node released act(gate) and up
    (4f) and left act(gate)'s grad (2f); gate (up not adapted): SiLU's input too (6f), up's
    input grad (2h) pending; gate_up: the whole fused output (6f); fc1: the act's input (2f)."""
    mlp_in = [l for l in layer.linears if l.role in MLP_IN_ROLES and lora_targeted(l, ctx.setup)]
    if not mlp_in or layer.experts:
        return (), 0
    lin = mlp_in[-1]
    pending, freed = {
        LinearRole.UP: ([2 * f], 4 * f),
        LinearRole.GATE: ([2 * lin.in_features], 6 * f),
        LinearRole.GATE_UP: ([], 6 * f),
    }.get(LinearRole(lin.role), ([], 2 * f))
    return (residual, *pending, *dora_backward_parts(lin, ctx, grad_held=False)), freed


def dora_points(
    layer: LayerSpec, ctx: ActivationContext, fwd: LoraForwardPoints, widths: tuple[int, int], ckpt_adapter: bool
) -> DoraPoints:
    """DoRA's moments of one layer (memory/dora.py): the weight-sized locals where the forward
    and the recompute are at an adapter, its backward at the first adapter and at the MLP's
    input adapter; `widths`: the MLP's width and the residual stream's bytes per token. [CPU trace]"""
    setup, (f, residual) = ctx.setup, widths
    first = first_in_backward([l for l in layer.linears if lora_targeted(l, setup)])
    widest, down = fwd.widest_linear, fwd.down_linear
    mlp_parts, mlp_freed = _mlp_input_moment(layer, ctx, f, residual)
    return DoraPoints(
        fwd_weights=tuple(dora_forward_weights(widest, setup, ctx, eye=True)) if widest else (),
        down_weights=tuple(dora_forward_weights(down, setup, ctx, eye=True)) if down else (),
        ckpt_weights=tuple(dora_forward_weights(widest, setup, ctx, eye=False)) if widest and ckpt_adapter else (),
        bwd_parts=(residual, *dora_backward_parts(first, ctx, grad_held=True)) if first else (),
        mlp_parts=mlp_parts,
        mlp_freed=mlp_freed,
        norm_absent=dora_norm_absent(down, ctx) if down else 0,
        down_common=fwd.down_common,
    )


def fused_layer_points(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup, u: FusedLoraPoints) -> LayerPoints:
    """A fused LoRA layer (Unsloth's, memory/unsloth.py; axolotl's kernels, memory/lora_kernels.py)
    as the moments backward.py replays: the MLP moment is LoRA_MLP's backward with the whole
    layer saved (down saves nothing apart, so nothing is freed first), the 4-bit moment its
    tensors beside one dequantized weight, the recompute LoRA_MLP's forward end; no peft
    adapter moments (LORA, RECOMPUTE_DOWN)."""
    ctx = activation_context(setup)
    quant_bwd = u.mlp_bwd if u.quant_bwd is None else u.quant_bwd
    residual = ctx.stream * spec.hidden
    f = mlp_width(layer, spec.hidden)
    return LayerPoints(
        down_saved=0,
        mlp_grads=sum(u.mlp_bwd),
        end_grads=2 * residual,
        lora_fwd=sum(u.mlp_fwd),
        lora_bwd=0,
        lora_inflight=residual,
        quant_numel=u.quant_numel,
        quant_bwd=sum(quant_bwd) if u.quant_numel else 0,
        quant_bwd_parts=quant_bwd if u.quant_numel else (),
        quant_parts=tuple(dequantize_transient_parts(u.quant_numel, cast(Quant, setup.quant))) if u.quant_numel else (),
        hook_grads=residual + 2 * f + 2 * spec.hidden,
        ckpt_fwd=sum(u.ckpt_fwd),
        lora_fwd_parts=u.mlp_fwd,
        lora_inflight_parts=(residual,),
        ckpt_fwd_parts=u.ckpt_fwd,
        mlp_grads_parts=u.mlp_bwd,
        end_grads_parts=(residual, residual),
    )


ShapeKey = tuple[object, ...]


def shape_key(layer: LayerSpec) -> ShapeKey:
    """Everything about a layer that the per-layer rules read."""
    e = layer.experts
    experts = (
        None
        if e is None
        else (e.num_experts, e.top_k, e.hidden, e.intermediate, tuple((n, tuple(shape)) for n, shape in e.tensors))
    )
    return (
        tuple((l.role, l.in_features, l.out_features, l.bias) for l in layer.linears),
        experts,
        tuple(layer.norm_numels),
        tuple(layer.attn_norm_dims),
        tuple(layer.norm_names),
        tuple(layer.other_numels),
        layer.sliding_window,
    )


def step_forward_locals_parts(spec: ModelSpec, setup: TrainingSetup, in_last_layer: bool) -> list[int]:
    """forward_locals_parts at the final norm, or at an adapter of the last layer
    (`in_last_layer`), less the tensors Liger's RMSNorms saved (memory/liger.py), which a saving
    forward (no checkpointing, no offload) would otherwise count twice: the embedding output,
    once the first layer's norm has an autograd node (the embedding or the norms train), and
    the last layer's input, which its input norm saved."""
    stream = stream_bytes(setup)
    parts = forward_locals_parts(spec.hidden, stream)
    if (
        not liger_norms(spec, setup)
        or setup.gradient_checkpointing
        or setup.activation_offload != ActivationOffload.NONE
    ):
        return parts
    ctx = activation_context(setup)
    emb_saved = setup.trains_embedding or (ctx.norms_train and setup.train_layers is None)
    block_saved = in_last_layer and len(parts) == 2
    return parts[:1] * (not emb_saved) + parts[1:] * (not block_saved)


def forward_locals(h: int, stream: int) -> int:
    """Per token, what a model's forward holds that no node saved (forward_locals_parts summed)."""
    return sum(forward_locals_parts(h, stream))


def forward_locals_parts(h: int, stream: int) -> list[int]:
    """Per token, the tensors a model's forward holds that no node saved: the embedding output
    (held until the model's forward returns) and the current block's input, unless x.to(fp32)
    made the saved copy of it a no-op (an fp32 stream under autocast). [CPU trace]"""
    return [stream * h] + ([] if stream == 4 else [stream * h])
