"""GRPO: what TRL 1.16's GRPOTrainer holds beyond an SFT step (--objective grpo).

Read from trl==1.16.0 trainer/grpo_trainer.py, grpo_config.py and trainer/utils.py
(add_fused_lm_head), with transformers==5.25.0's generate (generation/utils.py) and DynamicCache
(cache_utils.py); traced on the CPU with that code (docs/cpu-trace.md, group "grpo";
docs/memory-model.md, "GRPO").

- Rows: per_device_train_batch_size completions per micro-step, each prompt + completion
  (--seq-len) long; only the completion's positions go through the fused head
  (_get_per_token_logps_and_entropies: `labels[:, :-logits_to_keep] = -100`, :1496-1498), every
  completion counted at its full length (an upper end: EOS masks the rest). The head returns
  log_probs and entropy (:1068-1073).
- The generation batch (per_device_train_batch_size x steps_per_generation rows,
  grpo_config.py:1098-1100) is generated once (_prepare_inputs, :1522-1551) and its ids and masks
  buffered for every micro-step it feeds.
- Generation (use_vllm=False): model.generate under no_grad with checkpointing off
  (unwrap_model_for_generation); a prefill over the padded prompts, then one token per step with
  a DynamicCache grown by torch.cat (cache_utils.py:136-137). accelerate's autocast wraps the
  prepared model's forward; peft's generate calls the inner model's forward, outside it
  (peft PeftModelForCausalLM.generate -> base_model.generate), so a LoRA policy generates in its
  weights' dtype.
- Scoring, no grad, after generation (:2634-2710): the reference's log-probs when beta > 0 (peft:
  adapters disabled; full: a frozen copy, memory/preference.py reference_copy), the old policy's
  when generation and optimisation are misaligned or vLLM's importance sampling is on; each in
  micro-batches of per_device_train_batch_size rows.
- vLLM colocated (vllm_mode="colocate") holds vllm_gpu_memory_utilization of each GPU's memory
  for its weights and KV cache (vLLM's per-instance budget), estimate.vllm_colocated_bytes.

Which scorings run, the rows the head scores and the buffered batch depend on the setup alone:
memory/grpo_batch.py (the loss's token buffers read them).
"""

from __future__ import annotations

from vramplan.categories import Category as C
from vramplan.memory import grpo_logits
from vramplan.memory.autocast import cast_cache, checkpointed_layer_casts
from vramplan.memory.context import StepContext, stream_bytes
from vramplan.memory.grpo_batch import (
    buffered_bytes,
    generates_here,
    generation_mid_accumulation,
    is_grpo,
    scores_old,
    scores_reference,
)
from vramplan.memory.loss import trl_head_forward
from vramplan.memory.parameters import Param
from vramplan.memory.preference import no_grad_layer_parts
from vramplan.memory.storage import Phase, alloc
from vramplan.memory.types import PhaseKind
from vramplan.model_spec import ModelSpec
from vramplan.setup import AdapterDtype, Generation, ModelDtype, Precision, TrainingSetup

# fp32 per scored token: log_probs and entropy (grpo_trainer.py:1068-1073 outputs)
OUTPUT_BYTES = 8
# int64 per token while generating: the padded prompt ids and mask TRL hands to generate, and
# generate's own input_ids and attention_mask, each grown by torch.cat every step
GENERATE_TOKEN_BYTES = 16
# fp32 per vocabulary entry and generated row, alive through the next decode step: the last
# position's logits copied to fp32 (`outputs.logits[:, -1, :].to(copy=True, dtype=torch.float32)`)
# and the sampling's softmax (generation/utils.py _sample; TRL's defaults add no warper that
# copies: temperature 1.0, top_p 1.0, top_k 0)
SAMPLE_BYTES = 8

NOTE = (
    "--objective grpo: {trainer} modelled from source and CPU-traced with it (docs/cpu-trace.md, group "
    "grpo), not measured on a GPU: every completion at its full --completion-len, generated {where}"
)
TRAINERS = {
    False: "TRL's GRPOTrainer (trl==1.16.0 trainer/grpo_trainer.py, its fused head)",
    True: "axolotl's GRPO, trl==1.9.0's GRPOTrainer (trainer/grpo_trainer.py; log-probs from the model's "
    "logits over the completion, converted to fp32)",
}


def _autocast_generates(setup: TrainingSetup) -> bool:
    """accelerate's autocast is on the prepared model's forward, which generate calls for a full
    fine-tune; peft's generate goes to the inner model (outside it)."""
    return setup.autocast and not setup.lora_like


def _generation_setup(setup: TrainingSetup, rows: int, length: int) -> TrainingSetup:
    """The setup of a no-grad forward over `rows` x `length` tokens as generate runs it: no
    checkpointing; for peft, no autocast (the weights' dtype)."""
    update: dict = {"batch_size": rows, "seq_len": length, "gradient_checkpointing": False}
    if not _autocast_generates(setup):
        update.update(precision=Precision.BF16, model_dtype=ModelDtype.BF16)
    return setup.model_copy(update=update)


def _fp32_factor(setup: TrainingSetup) -> int:
    """Without autocast over fp32 weights every activation is fp32: twice the bf16 rule's bytes."""
    return 2 if not _autocast_generates(setup) and setup.weight_dtype.bytes == 4 else 1


def _generation_stream(setup: TrainingSetup) -> int:
    """Bytes per element of generate's residual stream: the step's under autocast, else the weights'."""
    return stream_bytes(setup) if _autocast_generates(setup) else setup.weight_dtype.bytes


def kv_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of the KV cache: the k/v projections' output dtype."""
    return 2 if _autocast_generates(setup) else setup.weight_dtype.bytes


def key_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of the cached keys: rotary embedding multiplies them by cos and sin in the
    stream's dtype (LlamaRotaryEmbedding returns them as the hidden state's dtype), and a bf16
    tensor times an fp32 one is fp32 (type promotion; autocast leaves mul alone): fp32 keys beside
    bf16 values under autocast over fp32 weights. [CPU trace: grpo-prefill-full]"""
    return max(kv_bytes(setup), _generation_stream(setup))


def kv_cache_blocks(spec: ModelSpec, setup: TrainingSetup, rows: int, length: int) -> list[int]:
    """Each layer's keys and values for `rows` x `length` positions (a sliding-window layer keeps
    its window: DynamicSlidingWindowLayer)."""
    out = []
    for layer in spec.layers:
        kept = min(length, layer.sliding_window) if layer.sliding_window else length
        per_row = rows * kept * spec.n_kv_heads * spec.head_dim
        out += [alloc(per_row * key_bytes(setup)), alloc(per_row * kv_bytes(setup))]
    return out


def _generation_casts(params: list[Param], setup: TrainingSetup, spec: ModelSpec) -> tuple[int, int]:
    """autocast's cached bf16 copies of the trainable fp32 matrices inside one generate forward (a
    full fine-tune; cleared as the forward's autocast exits): the decoder layers', and with the
    head's (made at the last position's logits) too. [CPU trace: grpo-prefill-full, grpo-decode-full]"""
    if not _autocast_generates(setup):
        return 0, 0
    layers = checkpointed_layer_casts(params, setup.model_copy(update={"gradient_checkpointing": True}))
    return layers, cast_cache(params, setup.model_copy(update={"gradient_checkpointing": False}), spec)


def generation_parts(spec: ModelSpec, setup: TrainingSetup, params: list[Param]) -> list[int]:
    """generate's widest moment, as blocks: the ids and masks, then the wider of the prefill (the
    prompts' cache with the last layer's no-grad working set over every prompt token) and the
    last decode step (the whole cache, one layer's keys concatenated anew, the head's logits and
    sampling), with autocast's weight copies inside the forward."""
    g, p, s = setup.generation_rows, setup.prompt_len, setup.seq_len
    ids = [alloc(GENERATE_TOKEN_BYTES * g * p), alloc(GENERATE_TOKEN_BYTES * g * s)]
    layer_casts, all_casts = _generation_casts(params, setup, spec)
    gen = _generation_setup(setup, g, p)
    if _fp32_factor(setup) == 2 and setup.lora_like:
        # fp32 adapters over the fp32 stream: no input copy, the scaled output and the sum in the
        # stream's dtype: the bf16 rule's with bf16 adapters, doubled [CPU trace: grpo-prefill-lora-all]
        gen = gen.model_copy(update={"adapter_dtype": AdapterDtype.BF16})
    layer = no_grad_layer_parts(spec, gen, params, widen=_fp32_factor(setup), adapters=True)
    # the rotary cos and sin over every prompt position, in the stream's dtype (LlamaRotaryEmbedding)
    rope = [alloc(g * p * spec.head_dim * _generation_stream(setup))] * 2
    prefill = [layer_casts] + kv_cache_blocks(spec, setup, g, p) + rope + layer
    cache = kv_cache_blocks(spec, setup, g, s - 1)
    sampled = alloc(SAMPLE_BYTES * g * spec.vocab)  # the last step's fp32 logits and probabilities
    # the last step, at the last layer's keys concatenated anew (the old tensor beside the new one)
    at_keys = [layer_casts, *cache, cache[-2], sampled]
    # or at its head: the head's weight copy, the new logits and their fp32 copy beside the last ones
    logits = alloc(g * spec.vocab * (2 if _autocast_generates(setup) else setup.weight_dtype.bytes))
    at_head = [all_casts, *cache, sampled, logits, alloc(4 * g * spec.vocab)]
    decode = max(at_keys, at_head, key=sum)
    return ids + (prefill if sum(prefill) > sum(decode) else decode)


def scoring_parts(spec: ModelSpec, setup: TrainingSetup, params: list[Param]) -> list[int]:
    """A scoring forward's widest moment (no grad, the step's autocast, micro-batches of the
    training rows): a decoder layer's working set or the fused head's forward over the
    completion rows, the log-probs of the micro-batches before it held. The old policy's scoring
    runs the adapters (their path in the layer's moment); the reference's disables them."""
    layer = no_grad_layer_parts(spec, setup, params, adapters=scores_old(setup))
    if grpo_logits.from_logits(setup):  # axolotl's trl 1.9.0: the model's logits (grpo_logits.py)
        head = grpo_logits.scoring_parts(spec, setup)
    else:
        head = [alloc(trl_head_forward(spec, setup, OUTPUT_BYTES))]
    return layer if sum(layer) > sum(head) else head


def grpo_phases(ctx: StepContext) -> list[Phase]:
    """The step's moments before its forward: generation (on this GPU) and scoring, with the
    persistent bytes (gradients only when generation lands mid-accumulation)."""
    setup = ctx.setup
    if not is_grpo(setup):
        return []
    out = []
    if generates_here(setup):
        ph = ctx.base(PhaseKind.GENERATION, with_grads=generation_mid_accumulation(setup))
        out.append(ph.add(C.TRANSIENT, sum(generation_parts(ctx.spec, setup, ctx.params))))
    if scores_old(setup) or scores_reference(setup):
        ph = ctx.base(PhaseKind.SCORING, with_grads=generation_mid_accumulation(setup))
        ph.add(C.ACTIVATIONS, buffered_bytes(setup))
        out.append(ph.add(C.TRANSIENT, sum(scoring_parts(ctx.spec, setup, ctx.params))))
    return out


def stream_note(setup: TrainingSetup) -> str:
    bits = "bf16" if kv_bytes(setup) == 2 else "fp32"
    if _autocast_generates(setup):
        return f"under the step's autocast (KV cache {bits}, autocast's bf16 weight copies inside each forward)"
    return f"in the weights' dtype (peft's generate runs outside accelerate's autocast: KV cache {bits})"


def grpo_notes(setup: TrainingSetup) -> list[str]:
    if not is_grpo(setup):
        return []
    where = {
        Generation.TRANSFORMERS: f"on this GPU by model.generate, {setup.generation_rows} rows at once "
        + stream_note(setup),
        Generation.VLLM_COLOCATE: "by vLLM colocated in the training process "
        f"({setup.vllm_gpu_memory_utilization:g} of each GPU, held for the whole run)",
        Generation.VLLM_SERVER: "by a vLLM server on other GPUs",
    }[setup.generation]
    notes = [NOTE.format(trainer=TRAINERS[grpo_logits.from_logits(setup)], where=where)]
    if scores_reference(setup):
        notes.append(
            "beta > 0: the reference's log-probs scored before the step "
            + ("(the policy with its adapters disabled)" if setup.lora_like else "(a frozen copy of the model)")
        )
    if scores_old(setup):
        notes.append("the old policy's log-probs scored before the step (importance sampling)")
    if setup.generation == Generation.VLLM_COLOCATE:
        notes.append("vLLM's sleep mode (vllm_enable_sleep_mode) is not modelled: its share is held throughout")
    return notes


def vllm_colocated_bytes(setup: TrainingSetup, device_bytes: int) -> int:
    """vLLM's per-instance budget on each GPU: gpu_memory_utilization x the GPU's memory
    (GRPOConfig vllm_gpu_memory_utilization, default 0.3, grpo_config.py:656), outside the step."""
    if not (is_grpo(setup) and setup.generation == Generation.VLLM_COLOCATE):
        return 0
    return int(setup.vllm_gpu_memory_utilization * device_bytes)
