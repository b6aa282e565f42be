"""Attention (SDPA and transformers' eager attention): what it saves, its working set in
a forward that saves nothing, and the sliding-window and eager masks."""
from __future__ import annotations

from vramplan.memory.context import ActivationContext
from vramplan.memory.storage import alloc
from vramplan.memory.types import LinearRole
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import TrainingSetup


def attention_saved(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, seq: int) -> int:
    """SDPA (flash) saves q, k, v (after RoPE, bf16), the output and an fp32 logsumexp
    per head; the output layout is already what o_proj reads. [cal] With a fused qkv_proj
    (Phi-3) v is a view of the fused output, so the whole output stays alive. [CPU trace]
    Eager attention
    (Gemma 2) repeats k/v to all heads and keeps the seq x seq probabilities: tanh
    soft-cap output (bf16), fp32 softmax, bf16 probs. [transformers eager_attention_forward]"""
    q, kv, nh = spec.q_dim, spec.kv_dim, spec.n_heads
    if spec.attn_implementation == "sdpa":
        masked = sdpa_mask_cols(spec, seq, layer)
        # with a mask transformers repeats k and v to every head (use_gqa_in_sdpa) and SDPA
        # saves those copies; a single kv head (MQA) repeats as a view of k, no copy
        # (repeat_kv's expand + reshape merges the size-1 head dim) [CPU trace]
        k_saved = repeated_kv(spec) if masked else kv
        v = 2 * (q + 2 * kv) if layer.linears_with(LinearRole.QKV) and k_saved == kv else 2 * k_saved
        return 2 * q + 2 * k_saved + v + 2 * q + 4 * nh + 2 * masked
    # HF eager attention forms the full s x s scores even for sliding-window layers
    probs = nh * seq * (4 + 2 + (2 if spec.attn_logit_softcapping else 0))
    return 2 * q + 4 * repeated_kv(spec) + probs  # q, repeated k, repeated v (o_proj's copy: linears_saved)


def repeated_kv(spec: ModelSpec) -> int:
    """Per token, k (or v) as repeat_kv hands it to every head: a copy for grouped heads, a
    view of k itself for a single kv head (the expand + reshape merges the size-1 dim)."""
    return spec.kv_dim if spec.n_kv_heads == 1 else spec.q_dim


def attention_forward(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, seq: int) -> int:
    """Per token, attention's working set in a forward that saves nothing (checkpointing).
    SDPA: what it would save. Eager: at the softmax, q and the repeated k and v, the bf16
    masked scores, their fp32 copy (aten::softmax converts a bf16 input before _softmax on
    CUDA too; only fp16 takes the fused half-to-float path) and the fp32 probabilities:
    10 bytes per score, soft-cap or not, since each elementwise step frees its input.
    [CPU trace]"""
    if spec.attn_implementation == "sdpa":
        return attention_saved(spec, layer, ctx, seq)
    return 2 * spec.q_dim + 4 * repeated_kv(spec) + spec.n_heads * seq * (2 + 4 + 4)


def sdpa_mask_cols(spec: ModelSpec, seq: int, layer: LayerSpec | None = None) -> int:
    """Mask columns per token that each SDPA call receives (of `layer`, or of any layer).
    transformers builds an explicit b x 1 x s x s bool mask for a sliding-window layer once
    the sequence reaches the window (masking_utils._ignore_causal_mask_sdpa), and torch's
    SDPA converts it to the query's dtype per call (aten::where), a copy its backward keeps:
    2·s bytes per token and layer. Where only some layers slide (Gemma 3), the full-attention
    layers stay mask-free. [CPU trace; the conversion precedes SDPA's kernel choice, so CUDA
    makes the same copy]"""
    window = spec.mask_window if layer is None else _layer_mask_window(spec, layer)
    return seq if window and seq >= window else 0


def _layer_mask_window(spec: ModelSpec, layer: LayerSpec) -> int | None:
    if spec.attn_implementation != "sdpa":
        return None
    return spec.sdpa_window or layer.sliding_window


def step_masks(spec: ModelSpec, setup: TrainingSetup) -> int:
    """The masks built once per step and passed to every layer: eager attention's bf16
    additive masks (one per kind of layer: full, sliding), and SDPA's bool sliding-window
    mask."""
    eager_mask = 0
    if spec.attn_implementation == "eager":
        kinds = 1 + any(l.sliding_window for l in spec.layers)
        eager_mask = kinds * alloc(2 * setup.batch_size * setup.seq_len ** 2)  # bf16 additive masks
    sdpa_mask = alloc(setup.batch_size * setup.seq_len * sdpa_mask_cols(spec, setup.seq_len))
    return eager_mask + sdpa_mask
