"""DoRA (peft LoraConfig(use_dora=True)): the magnitude vector, what each adapted Linear
saves beyond LoRA, and the weight norm it recomputes in every forward.

Source: peft==0.21.2 tuners/lora/dora.py:85-166 (DoraLinearLayer: get_weight_norm,
get_lora_weight, forward), tuners/lora/variants.py:138-258 (DoraLinearVariant)."""

from __future__ import annotations

from vramplan.memory.context import ActivationContext, activation_context
from vramplan.memory.lora import adapter_bytes, lora_grad_width, lora_targeted
from vramplan.memory.storage import alloc
from vramplan.memory.types import ParamKind
from vramplan.model_spec import LayerSpec, Linear, ModelSpec
from vramplan.setup import TrainingSetup


def dora_saved(lin: Linear, ctx: ActivationContext) -> int:
    """Per token, what a DoRA Linear saves beyond LoRA's: `(mag_norm_scale - 1) * base_result`
    keeps the base output for the magnitude's grad, `mag_norm_scale * lora_result` keeps
    lora_B's output (adapter compute dtype). With dropout the base output is recomputed as
    F.linear(dropout(x), weight) in the adapter dtype. A 4-bit base returns its input's dtype
    (the stream); a dense base computes in bf16. [CPU trace]"""
    width = lora_grad_width(ctx)
    if ctx.lora_dropout:
        base = width
    else:
        base = ctx.stream if ctx.quant is not None else 2
    return (base + width) * lin.out_features


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


def _eye_graph(lin: Linear, setup: TrainingSetup) -> int:
    """get_lora_weight's lora_B(lora_A(eye(in))) runs with grad on: lora_A saves eye(in) and
    lora_B saves A's output, kept by lora_weight's (never used) graph while it lives."""
    a, i = adapter_bytes(setup), lin.in_features
    return alloc(a * i * i) + alloc(a * i * setup.lora_r)


def _norm_terms(lin: Linear, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """At get_weight_norm's add: lora_weight, scaling * lora_weight, their sum, the weight copy."""
    return 3 * alloc(adapter_bytes(setup) * lin.numel) + _weight_copy(lin, setup, ctx)


def dora_norm_transient(lin: Linear, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """One DoRA Linear's forward before its output, all alive at the norm's add. In a
    checkpointed forward the graph saves nothing: eye(in) is freed when get_lora_weight returns."""
    if setup.gradient_checkpointing:
        return max(_eye_graph(lin, setup) + alloc(adapter_bytes(setup) * lin.numel), _norm_terms(lin, setup, ctx))
    return _eye_graph(lin, setup) + _norm_terms(lin, setup, ctx)


def dora_layer_transient(spec: ModelSpec, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """The widest DoRA weight norm of the last decoder layer (0 without DoRA)."""
    if not setup.dora:
        return 0
    return max(
        (dora_norm_transient(l, setup, ctx) for l in spec.layers[-1].linears if lora_targeted(l, setup)), default=0
    )


def dora_recompute(layer: LayerSpec, setup: TrainingSetup) -> tuple[int, int]:
    """Under non-reentrant checkpointing, (what the recompute keeps, its last weight norm):
    the recompute stores every tensor the original forward packed, eye(in) and A's output
    of each adapted Linear included, in the checkpoint frame; nothing unpacks them (the
    lora_weight graph never runs backward), so they stay until the layer's backward ends.
    The last adapted Linear's norm terms come on top. torch==2.13 utils/checkpoint.py
    (_checkpoint_hook, frame.recomputed). [CPU trace, approximate]"""
    if not (setup.dora and setup.gradient_checkpointing and setup.lora_like):
        return 0, 0
    ctx = activation_context(setup)
    adapted = [l for l in layer.linears if lora_targeted(l, setup)]
    if not adapted:
        return 0, 0
    return sum(_eye_graph(l, setup) for l in adapted), _norm_terms(adapted[-1], setup, ctx)


def magnitude_kind() -> ParamKind:
    """lora_magnitude_vector: one value per output feature, trained, in the adapters' dtype
    (peft's cast_adapter_dtype upcasts it with the adapters)."""
    return ParamKind.LORA
