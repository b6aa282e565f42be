"""DoRA (peft LoraConfig(use_dora=True)): the magnitude vector, what each adapted Linear
saves beyond LoRA, and the weight norm it recomputes in every forward.

Source: peft==0.21.2 tuners/lora/dora.py:85-166 (DoraLinearLayer: get_weight_norm,
get_lora_weight, forward), tuners/lora/variants.py:138-258 (DoraLinearVariant)."""
from __future__ import annotations

from vramplan.memory.context import ActivationContext
from vramplan.memory.lora import adapter_bytes, lora_grad_width, lora_targeted
from vramplan.memory.storage import alloc
from vramplan.memory.types import ParamKind
from vramplan.model_spec import Linear, ModelSpec
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


def dora_norm_transient(lin: Linear, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """One DoRA Linear's forward before its output: get_lora_weight runs
    lora_B(lora_A(eye(in))) with grad on, so eye(in) and A's output stay saved by the
    (dropped) graph while lora_weight lives; then the weight copy, scaling * lora_weight and
    their sum for the norm, all alive at the add (adapter dtype)."""
    a, i, o, r = adapter_bytes(setup), lin.in_features, lin.out_features, setup.lora_r
    return alloc(a * i * i) + alloc(a * i * r) + 3 * alloc(a * i * o) + _weight_copy(lin, setup, ctx)


def dora_layer_transient(spec: ModelSpec, setup: TrainingSetup, ctx: ActivationContext) -> int:
    """The widest DoRA weight norm of the last decoder layer (0 without DoRA)."""
    if not setup.dora:
        return 0
    return max((dora_norm_transient(l, setup, ctx) for l in spec.layers[-1].linears if lora_targeted(l, setup)),
               default=0)


def magnitude_kind() -> ParamKind:
    """lora_magnitude_vector: one value per output feature, trained, in the adapters' dtype
    (peft's cast_adapter_dtype upcasts it with the adapters)."""
    return ParamKind.LORA
