"""Norms (RMSNorm, Gemma's RMSNorm, LayerNorm): what one saves for backward and what its
fp32 backward holds."""

from __future__ import annotations

from vramplan.memory.context import ActivationContext, activation_context, base_output_bytes
from vramplan.memory.liger import (
    liger_final_norm_forward,
    liger_norm_backward,
    liger_norm_saved,
    liger_norms,
)
from vramplan.model_spec import ModelSpec
from vramplan.setup import TrainingSetup

# An RMSNorm's backward (transformers' Llama/Gemma RMSNorm: fp32 pow, mean, rsqrt, mul):
# bytes per token and hidden unit beyond its saved input and the incoming grad. The same
# eager elementwise autograd graph runs on CUDA. [CPU trace: 20.0 with and without a
# trained weight]
RMS_NORM_BACKWARD = 20


def norm_saved(spec: ModelSpec, ctx: ActivationContext, input_grad: bool, width: int | None = None) -> int:
    """Per token, one norm over `width` elements (the hidden size unless given: q/k norms
    read q_dim/kv_dim). HF LlamaRMSNorm: x.to(fp32) saved by pow/mul (4h); the
    normalized x.to(dtype) is saved by `weight *` only when the weight trains. Gemma's
    RMSNorm keeps the fp32 product (4h). LayerNorm saves its input. [cal]"""
    h = width or spec.hidden
    if not input_grad and not ctx.norms_train:
        return 0  # frozen weight and an input without grad: no autograd node
    if liger_norms(spec, ctx.setup, qk=width is not None):
        # q/k norms read q_proj's / k_proj's output, one row per head
        rows = h // spec.head_dim if width else 1
        return liger_norm_saved(h, base_output_bytes(ctx) if width else ctx.stream, rows)
    if spec.norm_kind == "layer":
        return ctx.stream * h
    normalized = 4 * h if (spec.norm_kind == "rms_gemma" or ctx.stream == 4) else 2 * h
    if not input_grad:
        # only the weight trains (a trained layer after a frozen prefix, memory/freeze.py): the
        # fp32 pow/rsqrt/mul chain records nothing, `weight *` saves the normalized x [CPU trace: the freeze-* cases]
        return normalized
    return 4 * h + (normalized if ctx.norms_train else 0)


def has_rms_final_norm(spec: ModelSpec) -> bool:
    """A final RMSNorm, whose fp32 forward and backward are phases of their own."""
    return bool(spec.final_norm_numel) and spec.norm_kind != "layer"


def final_norm_forward(spec: ModelSpec, setup: TrainingSetup, stream: int, forward_locals: int) -> int:
    """Per token, the final norm's forward: its fp32 normalized product and the forward's
    locals (its input, the embedding output). The peak of forward with a small
    vocabulary. [CPU trace] Liger's: its output in the stream's dtype (memory/liger.py)."""
    if liger_norms(spec, setup):
        return liger_final_norm_forward(spec, stream, forward_locals)
    frozen_fp32 = stream == 4 and not activation_context(setup).norms_train
    return 4 * spec.hidden * (2 if frozen_fp32 else 1) + forward_locals


def final_norm_backward_saved(spec: ModelSpec, setup: TrainingSetup, stream: int) -> int:
    """Per token, what the root keeps in the final norm's backward: only the norm's fp32
    input. lm_head's saved input and the weight multiply's are freed once their nodes ran,
    and the incoming grad once the weight multiply consumed it (nothing else reads it: no
    residual after the final norm). [CPU trace] Liger's: its input X and RSTD."""
    if liger_norms(spec, setup):
        return liger_norm_saved(spec.hidden, stream)
    return 4 * spec.hidden


def rms_backward(spec: ModelSpec, setup: TrainingSetup, stream: int) -> int:
    """Per token, an RMSNorm's fp32 backward over the hidden size (RMS_NORM_BACKWARD); Liger's
    writes into the incoming grad or a zeroed one (liger.liger_norm_backward)."""
    if liger_norms(spec, setup):
        return liger_norm_backward(spec, setup, stream)
    return RMS_NORM_BACKWARD * spec.hidden


def post_mlp_norm_backward(spec: ModelSpec, setup: TrainingSetup, stream: int) -> int:
    """Per token, a post-MLP norm (Gemma 2) running its fp32 backward first, with the whole
    layer alive: the incoming grad in the stream dtype plus the RMSNorm backward."""
    return stream * spec.hidden + rms_backward(spec, setup, stream)
