"""DoRA (peft LoraConfig(use_dora=True)): the magnitude vector, what each adapted Linear
saves beyond LoRA, the weight norm it recomputes in every forward, and its per-token
forward and backward working set (the products with the magnitude, its grad before the
reduction over tokens).

Source: peft==0.21.2 tuners/lora/dora.py:85-166 (DoraLinearLayer: get_weight_norm,
get_lora_weight, forward), tuners/lora/variants.py:138-258 (DoraLinearVariant),
tuners/lora/layer.py:1074-1114 (Linear.forward: x cast to lora_A's dtype, the result cast back)."""

from __future__ import annotations

from vramplan.memory.context import ActivationContext
from vramplan.memory.lora import adapter_bytes, lora_grad_width, lora_targeted
from vramplan.memory.storage import alloc
from vramplan.memory.types import ParamKind
from vramplan.model_spec import LayerSpec, Linear, ModelSpec
from vramplan.setup import TrainingSetup


def _result_width(ctx: ActivationContext) -> int:
    """Bytes per element of the base layer's output: a 4-bit base returns its input's dtype
    (the stream); a dense base computes in bf16."""
    return ctx.stream if ctx.quant is not None else 2


def dora_width(ctx: ActivationContext) -> int:
    """Bytes per element of `(mag_norm_scale - 1) * base_result` and
    `mag_norm_scale * lora_result * scaling` (dora.py:153,165): the magnitude's dtype promoted
    with the outputs'. fp32 adapters (and autocast, whose magnitude and weight norm stay fp32:
    mul is no autocast op) give fp32 products; bf16 adapters bf16 ones."""
    return 4 if ctx.lora_autocast else lora_grad_width(ctx)


def dora_saved(lin: Linear, ctx: ActivationContext) -> int:
    """Per token, what a DoRA Linear saves beyond LoRA's: `(mag_norm_scale - 1) * base_result`
    keeps the base output for the magnitude's grad, `mag_norm_scale * lora_result` keeps
    lora_B's output (adapter compute dtype). With dropout the base output is recomputed as
    F.linear(dropout(x), weight) in the adapter dtype. [CPU trace]"""
    width = lora_grad_width(ctx)
    base = width if ctx.lora_dropout else _result_width(ctx)
    return (base + width) * lin.out_features


def _x_width(ctx: ActivationContext) -> int:
    """Bytes per element of x cast to lora_A's dtype (layer.py:1100 _cast_input_dtype)."""
    return 2 if ctx.adapters_bf16 and not ctx.lora_autocast else 4


def _dropout_output(lin: Linear, ctx: ActivationContext) -> int:
    """Per token, `x = dropout(x)` in the variant (variants.py:245), x already cast to lora_A's
    dtype: a local the recomputed base output reads after lora_A ran."""
    return _x_width(ctx) * lin.in_features


def dora_output_parts(lin: Linear, ctx: ActivationContext, saving: bool) -> list[int]:
    """Per token, one DoRA Linear's forward at its widest, `(... * lora_result) * scaling`
    being made (dora.py:165), oldest first: in a forward that saves nothing (checkpointing),
    lora_B's output and, with dropout, dropout(x) and the recomputed base output, all locals
    there; then the three products (the first term, the unscaled and the scaled second term),
    each out wide in dora_width. (The sum and `result + result_dora` hold two at a time.)
    [CPU trace]"""
    out, w = lin.out_features, dora_width(ctx)
    parts = []
    if not saving:
        parts.append(lora_grad_width(ctx) * out)
        if ctx.lora_dropout:
            parts += [_dropout_output(lin, ctx), lora_grad_width(ctx) * out]
    return parts + [w * out] * 3


def dora_recompute_stop(lin: Linear, ctx: ActivationContext) -> list[int]:
    """Per token, the last adapted Linear's forward where non-reentrant checkpointing's recompute
    stops: its last saved tensors are the magnitude and lora_B's output packed by
    `mag_norm_scale * lora_result` (the `* scaling` by a Python float packs nothing), so the
    first term and the unscaled second term exist; the base output, x's copy and lora_B's output
    are saved (the layer's count). torch==2.13 utils/checkpoint.py:1128-1131 (early stop)."""
    return [dora_width(ctx) * lin.out_features] * 2


def dora_backward_parts(lin: Linear, ctx: ActivationContext, grad_held: bool) -> list[int]:
    """Per token, one DoRA Linear's backward at the magnitude's grad, oldest first: where the
    products are wider than the base output, the output grad up-cast by `result.to(dtype)`'s
    backward and the base branch's copy of it (AddBackward0 hands it the base's dtype), else the
    output grad itself (unless another branch holds it: `grad_held`); then
    MulBackward0(`mag_norm_scale * lora_result`): its input grad (the scaling's backward), lora_B
    output's grad and the magnitude's grad before sum_to reduces it over the tokens. The first
    term's MulBackward0 runs next with lora_B's output released: no wider. [CPU trace]"""
    out, w, r = lin.out_features, dora_width(ctx), _result_width(ctx)
    if w > r:
        head = [w * out, r * out]
    else:
        head = [] if grad_held else [r * out]
    return head + [w * out] * 3


def dora_recompute_grads(lin: Linear, ctx: ActivationContext) -> list[int]:
    """Per token, the grads in flight when the recompute starts: the first saved tensor
    backward unpacks is lora_B's output in MulBackward0(`mag_norm_scale * lora_result`), so
    that node's input grad is there with the output grad's copies (dora_backward_parts less
    the node's two outputs; the layer's output grad counted apart)."""
    return dora_backward_parts(lin, ctx, grad_held=True)[:-2]


def _weight_copy(lin: Linear, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """The base weight as DoRA reads it, `dequantize_module_weight(base).to(x.dtype)`: a 4-bit
    base's dequantized bf16 weight, up-cast for fp32 adapters; a dense base's weight itself
    when it already has the adapters' dtype, else a copy."""
    a = adapter_bytes(setup)
    if ctx.quant is not None:
        return alloc(max(a, 2) * lin.numel)
    return 0 if a == 2 else alloc(a * lin.numel)


def dora_weight_saved(lin: Linear, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """With dropout > 0 (dora variant forward: base_result=None) the recomputed base output's
    F.linear saves that weight copy for the input's grad until this layer's backward."""
    return _weight_copy(lin, setup, ctx) if ctx.lora_dropout else 0


def _eye_graph(lin: Linear, setup: TrainingSetup) -> list[int]:
    """get_lora_weight's lora_B(lora_A(eye(in))) runs with grad on: lora_A saves eye(in) and
    lora_B saves A's output, kept by lora_weight's (never used) graph while it lives."""
    a, i = adapter_bytes(setup), lin.in_features
    return [alloc(a * i * i), alloc(a * i * setup.lora_r)]


def dora_forward_weights(lin: Linear, setup: TrainingSetup, ctx: ActivationContext, eye: bool) -> list[int]:
    """The weight-sized locals of DoraLinearLayer.forward, alive from the weight norm until it
    returns (dora.py:137-166): lora_weight (and, where its graph saves them, eye(in) and A's
    output: a saving forward, and checkpointing's recompute, whose pack hook keeps real
    tensors; not a checkpointed forward, which saves nothing) and the weight copy."""
    graph = _eye_graph(lin, setup) if eye else []
    return [*graph, alloc(adapter_bytes(setup) * lin.numel), _weight_copy(lin, setup, ctx)]


def _norm_terms(lin: Linear, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """At get_weight_norm's add: lora_weight, scaling * lora_weight, their sum, the weight copy."""
    return 3 * alloc(adapter_bytes(setup) * lin.numel) + _weight_copy(lin, setup, ctx)


def dora_norm_transient(lin: Linear, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """One DoRA Linear's forward before its output, all alive at the norm's add. In a
    checkpointed forward the graph saves nothing: eye(in) is freed when get_lora_weight returns."""
    eye = sum(_eye_graph(lin, setup))
    if setup.gradient_checkpointing:
        return max(eye + alloc(adapter_bytes(setup) * lin.numel), _norm_terms(lin, setup, ctx))
    return eye + _norm_terms(lin, setup, ctx)


def dora_norm_absent(lin: Linear, ctx: ActivationContext) -> int:
    """Per token, what a saving forward's DoRA Linear saves after its weight norm: lora_A's
    output, lora_B's output and, with dropout, the recomputed base output (x's copy and the
    base output exist before it)."""
    width = lora_grad_width(ctx)
    return width * ctx.lora_r + width * lin.out_features * (2 if ctx.lora_dropout else 1)


def dora_norm_locals(lin: Linear, ctx: ActivationContext, saving: bool) -> list[int]:
    """Per token, an adapted Linear's own locals at its weight norm that nothing saved: the
    base output, which the first term saves only without dropout; in a forward that saves
    nothing also x's copy (`x.to(lora_A.weight.dtype)`, with dropout dropout(x) beside the
    layer's copy)."""
    out = [_result_width(ctx) * lin.out_features]
    if saving:
        return out if ctx.lora_dropout else []
    copy = 0 if _x_width(ctx) == ctx.stream else _x_width(ctx) * lin.in_features
    return [copy, *([_dropout_output(lin, ctx)] if ctx.lora_dropout else []), *out]


def dora_layer_transient(spec: ModelSpec, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """The widest DoRA weight norm of the last decoder layer (0 without DoRA)."""
    if not setup.dora:
        return 0
    return max(
        (dora_norm_transient(l, setup, ctx) for l in spec.layers[-1].linears if lora_targeted(l, setup)), default=0
    )


def dora_recompute(layer: LayerSpec, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """Under non-reentrant checkpointing, the recompute's last adapted Linear at its weight
    norm: eye(in) and A's output saved by its lora_weight graph (the recompute's pack hook keeps
    real tensors) and the norm terms. The checkpoint frame keeps none of them: their holders
    died with the original forward's lora_weight graph, so the recompute drops what they packed
    (torch==2.13 utils/checkpoint.py:1119-1126, `holder is not None`). [CPU trace]"""
    if not (setup.dora and setup.gradient_checkpointing and setup.lora_like):
        return 0
    adapted = [l for l in layer.linears if lora_targeted(l, setup)]
    if not adapted:
        return 0
    return sum(_eye_graph(adapted[-1], setup)) + _norm_terms(adapted[-1], setup, ctx)


def magnitude_kind() -> ParamKind:
    """lora_magnitude_vector: one value per output feature, trained, in the adapters' dtype
    (peft's cast_adapter_dtype upcasts it with the adapters)."""
    return ParamKind.LORA
