"""Attention (SDPA, transformers' eager attention, FlashAttention-2) and sequence packing:
what attention saves, its working set in a forward that saves nothing, and the masks
(sliding-window, eager, packed sequences)."""

from __future__ import annotations

from vramplan.errors import VramplanError
from vramplan.memory.context import ActivationContext
from vramplan.memory.storage import alloc
from vramplan.memory.types import LinearRole
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import Attention, Packing, Stack, TrainingSetup
from vramplan.stacks import set_by_stack

FLASH_NOTE = (
    "FlashAttention-2 (--attention flash): modelled from source, not measured (flash-attn 2.x "
    "FlashAttnFunc saves q, k, v, out and an fp32 logsumexp; transformers==5.25.0 "
    "modeling_flash_attention_utils.py builds no mask and does not repeat k/v)."
)


# flash_attention_2 on a class a later transformers withdrew it from, under the stacks that pin a
# transformers from before: Gemma3ForConditionalGeneration (what AutoModelForCausalLM builds for
# Gemma 3 4B+) has _supports_flash_attn True at transformers==5.6.0 (modeling_gemma3.py:449),
# 5.16.1 and 5.17.0 (:439), and False at 5.25.0 (:905, "Flash Attention drops the bidirectional
# mask over image tokens", which a text-only step has none of). axolotl==0.19.0 pins 5.16.1,
# llamafactory==0.9.5 wants <=5.6.0, unsloth==2026.10.9 <=5.17.0 (presets/stacks/*.json).
FLASH_UNDER_OLDER_PIN: dict[str, frozenset[Stack]] = {
    "Gemma3ForConditionalGeneration": frozenset({Stack.AXOLOTL, Stack.LLAMAFACTORY, Stack.UNSLOTH}),
}


def flash_allowed(spec: ModelSpec, setup: TrainingSetup) -> bool:
    """transformers takes flash_attention_2 for this class, at the version the stack runs."""
    return spec.supports_flash or setup.stack in FLASH_UNDER_OLDER_PIN.get(spec.architecture, frozenset())


def attention_notes(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """What the estimate says when the attention it models is not the one the setup names."""
    if setup.attention == Attention.FLASH and not spec.supports_flash and flash_allowed(spec, setup):
        return [
            f"attention: flash on {spec.architecture}, as the transformers --stack {setup.stack.value} pins "
            "accepts it (transformers==5.16.1 modeling_gemma3.py:439); transformers==5.25.0 refuses it (:905)"
        ]
    if (
        setup.attention == Attention.SDPA
        and spec.attn_implementation != "sdpa"
        and attention_kind(spec, setup) != Attention.SDPA
    ):
        return [
            f"attention: torchtune's own attention for {spec.architecture}'s soft-capping computes q·kᵀ and an "
            "fp32 softmax, not SDPA: estimated as eager (torchtune==0.6.1 "
            "torchtune/models/gemma2/_attention.py:300-341)"
        ]
    return []


def attention_kind(spec: ModelSpec, setup: TrainingSetup) -> Attention:
    """--attention, else the model's own default (sdpa, or eager where the model class has no
    SDPA path). transformers refuses sdpa for such a class (_supports_sdpa = False, e.g.
    Gemma 2: soft-capping) and flash_attention_2 for one without _supports_flash_attn."""
    if setup.attention is None:
        return Attention(spec.attn_implementation)
    if setup.attention == Attention.SDPA and spec.attn_implementation != "sdpa":
        if setup.stack == Stack.TORCHTUNE and set_by_stack(setup, "attention"):
            # torchtune's own Gemma 2 attention (soft-capping): q·kᵀ, tanh capping, a full mask,
            # an fp32 softmax, then ·v — eager's tensors, not SDPA (torchtune==0.6.1
            # torchtune/models/gemma2/_attention.py:300-341)
            return Attention.EAGER
        raise VramplanError(
            f"sdpa{set_by_stack(setup, 'attention')}: {spec.architecture} has no SDPA path in transformers; "
            "use eager or flash",
            "--attention",
        )
    if setup.attention == Attention.FLASH and not flash_allowed(spec, setup):
        older = sorted(s.value for s in FLASH_UNDER_OLDER_PIN.get(spec.architecture, ()))
        pinned = f" (or --stack {'/'.join(older)}: the transformers they pin accepts it)" if older else ""
        raise VramplanError(
            f"flash: {spec.architecture} does not support FlashAttention-2 in transformers; use sdpa or eager{pinned}",
            "--attention",
        )
    return setup.attention


def attention_span(setup: TrainingSetup) -> int:
    """Key positions per query row that a dense mask or eager's scores span: padding-free
    packing flattens the micro-batch into one row of batch x seq tokens (transformers
    DataCollatorWithFlattening, TRL padding_free); otherwise the sequence length."""
    return setup.tokens if setup.packing == Packing.PADDING_FREE else setup.seq_len


def varlen(spec: ModelSpec, setup: TrainingSetup) -> bool:
    """Packed rows attended per sequence with no mask: FlashAttention-2's varlen kernel
    (transformers==5.25.0 modeling_flash_attention_utils.py:743-860, cu_seqlens from
    position_ids), or Unsloth's own dispatch, which sends packed rows to torch's varlen
    kernel or to SDPA per run of equal lengths (unsloth==2026.10.9
    unsloth/utils/attention_dispatch.py:872-990, select_attention_backend)."""
    if setup.packing == Packing.NONE:
        return False
    return attention_kind(spec, setup) == Attention.FLASH or setup.stack == Stack.UNSLOTH


def attention_saved(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, seq: int) -> int:
    """Per token, what attention saves (attention_saved_parts summed)."""
    return sum(attention_saved_parts(spec, layer, ctx, seq))


def attention_saved_parts(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, seq: int) -> list[int]:
    """Per token, the tensors attention saves; `seq` is the attention span (attention_span).
    SDPA (flash) saves q, k, v (after RoPE, bf16), the output and an fp32 logsumexp per head;
    the output layout is already what o_proj reads. [cal] With a fused qkv_proj (Phi-3) v is a
    view of the fused output, so the whole output stays alive. [CPU trace] FlashAttention-2
    saves the same (flash_attn FlashAttnFunc: q, k, v, out, softmax_lse fp32 [B, H, S] or
    [H, total] varlen; maybe_contiguous copies nothing of stride-1 views) with k and v at their
    own kv heads and never a mask. Varlen packing copies q and k (query.contiguous().view(-1, H,
    d)) and the post-RoPE originals die with the forward: the same bytes saved. Eager attention
    (Gemma 2) repeats k/v to all heads and keeps the seq x seq probabilities: tanh soft-cap
    output (bf16), fp32 softmax, bf16 probs. [transformers eager_attention_forward]"""
    q, kv, nh = spec.q_dim, spec.kv_dim, spec.n_heads
    if attention_kind(spec, ctx.setup) != Attention.EAGER:
        masked = sdpa_mask_cols(spec, ctx.setup, layer)
        # with a mask transformers repeats k and v to every head (use_gqa_in_sdpa) and SDPA
        # saves those copies; a single kv head (MQA) repeats as a view of k, no copy
        # (repeat_kv's expand + reshape merges the size-1 head dim) [CPU trace]
        k_saved = repeated_kv(spec) if masked else kv
        v = 2 * (q + 2 * kv) if layer.linears_with(LinearRole.QKV) and k_saved == kv else 2 * k_saved
        return [2 * q, 2 * k_saved, v, 2 * masked, 2 * q, 4 * nh]
    # HF eager attention forms the full s x s scores even for sliding-window layers
    probs = ([nh * seq * 2] if spec.attn_logit_softcapping else []) + [nh * seq * 4, nh * seq * 2]
    return [
        2 * q,
        2 * repeated_kv(spec),
        2 * repeated_kv(spec),
        *probs,
    ]  # q, repeated k, v (o_proj's copy: linears_saved)


def repeated_kv(spec: ModelSpec) -> int:
    """Per token, k (or v) as repeat_kv hands it to every head: a copy for grouped heads, a
    view of k itself for a single kv head (the expand + reshape merges the size-1 dim)."""
    return spec.kv_dim if spec.n_kv_heads == 1 else spec.q_dim


def attention_forward_parts(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, seq: int) -> list[int]:
    """Per token, the tensors of attention's working set in a forward that saves nothing
    (checkpointing). SDPA, FlashAttention-2: what it would save. Eager: at the softmax, q and
    the repeated k and v, the bf16 masked scores, their fp32 copy (aten::softmax converts a
    bf16 input before _softmax on CUDA too; only fp16 takes the fused half-to-float path) and
    the fp32 probabilities: 10 bytes per score, soft-cap or not, since each elementwise step
    frees its input. [CPU trace]"""
    if attention_kind(spec, ctx.setup) != Attention.EAGER:
        return attention_saved_parts(spec, layer, ctx, seq)
    scores = spec.n_heads * seq
    return [2 * spec.q_dim, 2 * repeated_kv(spec), 2 * repeated_kv(spec), 2 * scores, 4 * scores, 4 * scores]


def sdpa_mask_cols(spec: ModelSpec, setup: TrainingSetup, layer: LayerSpec | None = None) -> int:
    """Mask columns per token that each SDPA call receives (of `layer`, or of any layer).
    transformers builds an explicit b x 1 x s x s bool mask for a sliding-window layer once
    the sequence reaches the window (masking_utils._ignore_causal_mask_sdpa), and torch's
    SDPA converts it to the query's dtype per call (aten::where), a copy its backward keeps:
    2·s bytes per token and layer. Where only some layers slide (Gemma 3), the
    full-attention layers stay mask-free. Packed sequences told apart by position_ids
    (padding-free or position-ids packing, no attention_mask) get a packed-sequence mask in
    every layer (transformers==5.25.0 masking_utils.py:735-764, 855-1013:
    find_packed_sequence_indices), one row of batch x seq tokens when padding-free.
    [CPU trace; the conversion precedes SDPA's kernel choice, so CUDA makes the same copy]"""
    if attention_kind(spec, setup) != Attention.SDPA:
        return 0
    if setup.packing != Packing.NONE and not varlen(spec, setup):
        return attention_span(setup)
    window = spec.mask_window if layer is None else _layer_mask_window(spec, layer)
    return setup.seq_len if window and setup.seq_len >= window else 0


def _layer_mask_window(spec: ModelSpec, layer: LayerSpec) -> int | None:
    if spec.attn_implementation != "sdpa":
        return None
    return spec.sdpa_window or layer.sliding_window


def span_terms(spec: ModelSpec, setup: TrainingSetup) -> bool:
    """Whether some per-token term grows with the attention span at this setup (eager's
    scores and masks, an SDPA mask): the planner's third sample."""
    return attention_kind(spec, setup) == Attention.EAGER or sdpa_mask_cols(spec, setup) > 0


def mask_from(spec: ModelSpec, setup: TrainingSetup) -> int | None:
    """The sequence length from which an SDPA mask appears (None: never, or always)."""
    kind = attention_kind(spec, setup)
    if kind != Attention.SDPA or (setup.packing != Packing.NONE and not varlen(spec, setup)):
        return None
    return spec.mask_window


def step_masks(spec: ModelSpec, setup: TrainingSetup) -> int:
    """The masks built once per step and passed to every layer: eager attention's bf16
    additive masks (one per kind of layer: full, sliding), and SDPA's bool mask (sliding
    window or packed sequences). FlashAttention-2 builds none."""
    eager_mask = 0
    span = attention_span(setup)
    if attention_kind(spec, setup) == Attention.EAGER:
        kinds = 1 + any(l.sliding_window for l in spec.layers)
        eager_mask = kinds * alloc(2 * setup.tokens * span)  # bf16 additive masks: rows x span x span
    sdpa_mask = alloc(setup.tokens * sdpa_mask_cols(spec, setup))
    return eager_mask + sdpa_mask
