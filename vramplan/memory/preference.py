"""DPO: what a preference step holds beyond an SFT step over the same rows (--objective dpo).

Three trainers, each read from its source and traced on the CPU with its own code
(docs/cpu-trace.md, group "preference"; docs/memory-model.md, "Preference steps (DPO)"):
trl==1.16.0's DPOTrainer (--stack trl: trainer/dpo_trainer.py, trainer/utils.py,
models/utils.py; its fused head), axolotl==0.19.0's, which pins trl==1.9.0 (full logits:
loss.trl19_dpo_loss, _trl19_head_parts), and llamafactory==0.9.5's CustomDPOTrainer (full
logits and their log-softmax: loss.llamafactory_dpo_loss, _llamafactory_head_parts). The
bullets below are TRL 1.16's; the other two differ where the functions named say.

- Rows (TrainingSetup.rows): DataCollatorForPreference puts each pair's chosen and rejected
  sequences in one batch, chosen rows first, padded to one length (dpo_trainer.py:146-206): an
  SFT step's activations, loss and token buffers over 2 x batch rows. Every position is counted
  as a completion token (the fused head gathers only those, utils.py:1636-1653): prompts are
  masked in practice, so this is the upper end.
- The policy's head (loss.trl_fused_loss): DPOTrainer asks the fused head for log_probs,
  entropy, mean_logits and is_top1 (dpo_trainer.py:943-947), one fp32 output more than SFT's.
- The reference model: with peft, none (the adapters are disabled for the reference forward,
  dpo_trainer.py:1318-1326); a full fine-tune loads a frozen copy in the policy's dtype
  (:905-919), sharded by FSDP as the policy (models/utils.py:292-340 prepare_fsdp, its CPU
  offload included) and by ZeRO-3, whole on every GPU under ZeRO-1/2 (stage 0,
  models/utils.py:284-286) and DDP (accelerator.prepare_model(evaluation_mode=True)).
  `precompute_ref_log_probs` computes the reference log-probs once before training: no copy
  is kept (except under FSDP, where it is freed after the precompute) and the step has no
  reference forward.
- The reference forward (dpo_trainer.py:1313-1332): after the policy's forward returned, every
  tensor it saved alive, under no_grad and with checkpointing off: each decoder layer's working
  set saving nothing (the rule of a checkpointed layer's forward,
  checkpointing.checkpointed_forward, without the adapter's path), a 4-bit weight dequantized
  or an fp32 frozen weight cast to bf16 per matmul, then the fused head's forward over the
  same rows, its outputs the reference's (log_probs alone on a separate copy, utils.py
  add_fused_lm_head's default)."""

from __future__ import annotations

from vramplan.categories import Category as C
from vramplan.memory import kto
from vramplan.memory.checkpointing import checkpointed_forward
from vramplan.memory.context import StaticBytes, StepContext, activation_context, stream_bytes
from vramplan.memory.fsdp import forward_end_gathered, layer_forward_gathered, shard_for
from vramplan.memory.layer import layer_points
from vramplan.memory.loss import TRL_SFT_OUTPUT_BYTES, trl_head_forward
from vramplan.memory.mlp import is_gated, mlp_width
from vramplan.memory.parameters import Param, store
from vramplan.memory.quantization import forward_quant_transient
from vramplan.memory.storage import Phase, alloc
from vramplan.memory.types import PhaseKind
from vramplan.model_spec import ModelSpec
from vramplan.setup import DeepSpeedStage, Engine, Method, Objective, Stack, TrainingSetup

# Per token, what the policy's step adds to an SFT step's inputs: the labels _compute_loss makes
# (`input_ids.masked_fill(completion_mask == 0, -100)`, int64) beside the collator's completion_mask.
DPO_LABELS_BYTES = 8
# fp32 per token of the policy's fused-head outputs beyond SFT's: mean_logits (dpo_trainer.py:945)
POLICY_EXTRA_OUTPUT = 4
# fp32 per token of WPO's log_sum_sq_probs, asked for under use_weighting (dpo_trainer.py:958-959)
WPO_OUTPUT = 4
# the reference copy's head returns log_probs alone (add_fused_lm_head's default outputs): fp32,
# where the policy's (and peft's, the same model) return log_probs, entropy, mean_logits, is_top1
COPY_OUTPUT_BYTES = 4

NOTE = (
    "--objective dpo: {trainer} modelled from source and CPU-traced with it (docs/cpu-trace.md, "
    "group preference), not measured on a GPU: 2 rows per pair, every position counted as a completion "
    "token (an upper end: prompts are masked)"
)
TRAINERS = {
    Stack.TRL: "TRL's DPOTrainer (trl==1.16.0 trainer/dpo_trainer.py, its fused chunked head)",
    Stack.AXOLOTL: "axolotl's AxolotlDPOTrainer over trl==1.9.0's DPOTrainer (axolotl 0.19.0's pin: the "
    "policy's and the reference's full fp32 logits)",
    Stack.LLAMAFACTORY: "LLaMA-Factory's CustomDPOTrainer (llamafactory==0.9.5 train/dpo/trainer.py: full fp32 logits "
    "and their log-softmax, the policy's and the reference's)",
}


def is_dpo(setup: TrainingSetup) -> bool:
    return setup.objective == Objective.DPO


def against_reference(setup: TrainingSetup) -> bool:
    """A preference step scored against a reference model: DPO's, KTO's (memory/kto.py)."""
    return setup.objective in (Objective.DPO, Objective.KTO)


def reference_forward(setup: TrainingSetup) -> bool:
    """The step runs a reference forward (not precomputed)."""
    return against_reference(setup) and not setup.precompute_ref_log_probs


def reference_copy(setup: TrainingSetup) -> bool:
    """A frozen copy of the model is kept: a full fine-tune (no peft model to disable), not
    precomputed; axolotl loads it whatever precompute_ref_log_probs says (axolotl==0.19.0
    train.py:144-164 does not read it, and TRL keeps a reference it is given)."""
    if setup.lora_like:
        return False
    if setup.objective == Objective.GRPO:  # GRPOTrainer loads one when beta > 0 (grpo_trainer.py:990-1003)
        return setup.beta > 0
    if not against_reference(setup):
        return False
    # axolotl passes its own reference copy to DPO only (core/builders/rl.py:71-73); KTO's is TRL's
    return not setup.precompute_ref_log_probs or (setup.stack == Stack.AXOLOTL and is_dpo(setup))


def reference_copy_blocks(params: list[Param], setup: TrainingSetup) -> list[int]:
    """This GPU's storage of the reference copy, one block per parameter, each as the policy
    stores it (TRL loads it in the policy's dtype; axolotl loads it with the same config, its
    fp32 embeddings and norms included: axolotl==0.19.0 loaders/model.py:258-274 runs
    _configure_embedding_dtypes for the reference too); empty when there is no copy or it lives
    on the host (FSDP CPU offload, ZeRO-3 offload_param)."""
    if not reference_copy(setup):
        return []
    if setup.cpu_offload or (setup.deepspeed == DeepSpeedStage.ZERO3 and setup.offload_params):
        return []
    if setup.stack == Stack.LLAMAFACTORY:  # load_model(is_trainable=False): the checkpoint's dtype, bf16
        return [alloc(2 * _held_elements(p, setup)) for p in params if not p.kind.quantized]
    return [store(p, setup, _held_elements(p, setup))[C.WEIGHTS] for p in params if not p.kind.quantized]


def reference_host_bytes(params: list[Param], setup: TrainingSetup) -> int:
    """The copy's pinned host bytes under FSDP CPU offload (its shards live on the host)."""
    if not (reference_copy(setup) and setup.cpu_offload):
        return 0
    return sum(store(p, setup, shard_for(p, setup))[C.WEIGHTS] for p in params)


def _held_elements(p: Param, setup: TrainingSetup) -> int:
    if setup.sharded:
        return shard_for(p, setup)
    if setup.deepspeed == DeepSpeedStage.ZERO3:
        return -(-p.numel // setup.data_parallel)
    return p.numel


def with_reference_copy(static: StaticBytes, params: list[Param], setup: TrainingSetup) -> StaticBytes:
    """The persistent bytes with the reference copy added (weights; its host shards pinned)."""
    copy = sum(reference_copy_blocks(params, setup))
    host = reference_host_bytes(params, setup)
    if not copy and not host:
        return static
    parts = dict(static.parts)
    parts[C.WEIGHTS] = parts.get(C.WEIGHTS, 0) + copy
    return StaticBytes(parts, static.grads, static.optimizer_states, static.host_pinned + host, static.paged_states)


def policy_held_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """What the policy's forward leaves beside the layers' saved tensors at the reference
    forward: the fused head's saved rows and statistics (loss.trl_fused_loss `saved`), then its
    outputs scattered to every token (log_probs, entropy, mean_logits fp32, is_top1 and the
    label mask bool) with the labels _compute_loss made. trl==1.9.0 (axolotl): the policy's fp32
    logits, which `outputs` and every row's logsumexp (saved input views) keep."""
    if setup.stack == Stack.LLAMAFACTORY and kto.is_kto(setup):
        # get_batch_logps' saved log-softmax; the fp32 logits die with concatenated_forward, which returns
        # copies of them by kto_tags instead (kto.llamafactory_moment)
        return [alloc(4 * _shifted(setup) * spec.vocab)]
    if setup.stack == Stack.LLAMAFACTORY and is_dpo(setup):
        # concatenated_forward's fp32 logits (returned, held to the metrics) and get_batch_logps'
        # log-softmax over every row but the last position (saved for backward)
        return [alloc(4 * setup.tokens * spec.vocab), alloc(4 * _shifted(setup) * spec.vocab)]
    if full_logits(setup):
        return [alloc(4 * setup.tokens * spec.vocab)]
    rows, n = setup.rows * (setup.seq_len - 1), setup.tokens
    saved = rows * spec.hidden * stream_bytes(setup) + 16 * rows
    outputs = _policy_output_bytes(setup) + (0 if kto.is_kto(setup) else 1)  # DPO's label mask
    return [alloc(saved), alloc(n * (outputs + DPO_LABELS_BYTES))]


def _layer_working_set(spec: ModelSpec, setup: TrainingSetup, adapters: bool = False) -> tuple[list[int], int]:
    """The widest decoder layer's no-grad forward, per token, oldest first, and that layer's MLP
    width. Without `adapters` no adapter path runs (disabled, or a copy); with it, peft's adapter
    path runs as in a forward that saves nothing (a checkpointed layer's: layer.layer_points),
    GRPO's generation and its old policy's scoring. [CPU trace: ax-grpo-decode-lora]"""
    if adapters and setup.lora_like:
        ckpt = setup.model_copy(update={"gradient_checkpointing": True})
        sets = [
            (list(layer_points(spec, layer, ckpt).ckpt_fwd_parts), mlp_width(layer, spec.hidden))
            for layer in spec.layers
        ]
        return max(sets, key=lambda s: sum(s[0]))
    act = activation_context(setup)
    residual = act.stream * spec.hidden
    sets = [
        (
            checkpointed_forward(spec, layer, act, mlp_width(layer, spec.hidden), is_gated(layer), residual, []),
            mlp_width(layer, spec.hidden),
        )
        for layer in spec.layers
    ]
    return max(sets, key=lambda s: sum(s[0]))


def _weight_transient(spec: ModelSpec, setup: TrainingSetup, params: list[Param]) -> int:
    """One Linear's weight made for its matmul: a 4-bit weight dequantized (or LLM.int8's
    working set), else a frozen fp32 weight cast to bf16 by autocast, which caches no cast of a
    tensor that does not require grad (aten/src/ATen/autocast_mode.cpp cached_cast)."""
    if setup.method == Method.QLORA:
        return forward_quant_transient(spec.layers, params, activation_context(setup), setup.tokens)
    if setup.autocast and setup.weight_dtype.bytes == 4:
        return alloc(2 * max(l.numel for layer in spec.layers for l in layer.linears))
    return 0


def no_grad_layer_parts(
    spec: ModelSpec, setup: TrainingSetup, params: list[Param], widen: int = 1, adapters: bool = False
) -> list[int]:
    """A decoder layer's no-grad forward at its widest, as blocks: the embedding output (held by
    the model's forward until it returns) and the block's input (held by the decoder loop through
    the call), with the layer's working set at its widest, the elementwise product that is its
    last tensor, or at the up projection's matmul before it: act(gate) beside the weight made for
    the matmul (_weight_transient) and its bf16 output (a 4-bit Linear casts it to the stream's
    dtype after the weight is freed). `widen` multiplies the activations, not the weight (GRPO's
    generation over fp32 weights without autocast: every activation fp32, memory/grpo.py).
    [CPU trace: groups "preference" and "grpo"]"""
    n = setup.tokens * widen
    stream = stream_bytes(setup) * spec.hidden
    parts, f = _layer_working_set(spec, setup, adapters)
    ws = [alloc(n * x) for x in parts]
    at_matmul = ws[:-2] + [alloc(n * 2 * f), _weight_transient(spec, setup, params)]
    return [alloc(n * stream)] * 2 + (ws if sum(ws) >= sum(at_matmul) else at_matmul)


def reference_forward_parts(spec: ModelSpec, setup: TrainingSetup, params: list[Param]) -> list[int]:
    """The reference forward's widest moment beyond the policy's saved tensors, as blocks: what
    the policy's head left, then the wider of a decoder layer's moment (no_grad_layer_parts) and
    the fused head's forward. [CPU trace: group "preference"]"""
    # precomputed: no reference layers run, only the metrics' head
    layer = no_grad_layer_parts(spec, setup, params) if reference_forward(setup) else []
    if setup.stack == Stack.LLAMAFACTORY and kto.is_kto(setup):
        held = policy_held_parts(spec, setup)
        layers = (no_grad_layer_parts(spec, setup, params, adapters=True), layer)
        return held + kto.llamafactory_moment(spec, setup, _llamafactory_head_parts(spec, setup), layers)
    if setup.stack == Stack.LLAMAFACTORY:
        head = _llamafactory_head_parts(spec, setup)
    elif full_logits(setup):
        head = kto.trl19_head_parts(spec, setup) if kto.is_kto(setup) else _trl19_head_parts(spec, setup)
    else:
        out = COPY_OUTPUT_BYTES if reference_copy(setup) else _policy_output_bytes(setup)
        head = [alloc(trl_head_forward(spec, setup, out))]
    return policy_held_parts(spec, setup) + (layer if sum(layer) > sum(head) else head)


def _policy_output_bytes(setup: TrainingSetup) -> int:
    """Per scored row, what the policy's fused head returns (peft's reference is the policy): WPO's
    log_sum_sq_probs too under use_weighting (trl==1.16.0 dpo_trainer.py:956-959)."""
    if kto.is_kto(setup):
        return kto.POLICY_OUTPUT_BYTES
    return TRL_SFT_OUTPUT_BYTES + POLICY_EXTRA_OUTPUT + (WPO_OUTPUT if setup.dpo_use_weighting else 0)


# trl==1.9.0 trainer/utils.py:526 entropy_from_logits(chunk_size=128): flattened rows per chunk
TRL19_ENTROPY_CHUNK = 128


def full_logits(setup: TrainingSetup) -> bool:
    """The DPO or KTO trainer takes its log-probs from the model's full logits (axolotl's
    trl==1.9.0, LLaMA-Factory's own)."""
    return against_reference(setup) and setup.stack in (Stack.AXOLOTL, Stack.LLAMAFACTORY)


def _shifted(setup: TrainingSetup) -> int:
    """Positions scored: every row's but its last."""
    return setup.rows * (setup.seq_len - 1)


def _llamafactory_head_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """The reference's head in LLaMA-Factory (train/dpo/trainer.py:254-274 -> :218-252): its bf16
    logits converted to fp32 by accelerate, then get_batch_logps' log-softmax of every row but the
    last position (train/trainer_utils.py:592-635) on its contiguous copy, beside the fp32
    logits; none when the loss
    needs no reference (orpo, simpo: precompute_ref_log_probs here)."""
    if not reference_forward(setup):
        return []
    n, v = setup.tokens, spec.vocab
    conversion = [alloc(2 * n * v), alloc(4 * n * v)]
    # log_softmax of the non-contiguous `logits[:, :-1, :]` works on a contiguous copy of it
    # (aten/src/ATen/native/SoftMax.cpp host_softmax, cuda/SoftMax.cu: input.contiguous())
    log_softmax = [alloc(4 * n * v), alloc(4 * _shifted(setup) * v), alloc(4 * _shifted(setup) * v)]
    return log_softmax if sum(log_softmax) >= sum(conversion) else conversion


def _trl19_head_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """The widest moment of the reference's head and the metrics after it, as blocks (trl==1.9.0
    dpo_trainer.py:1373-1385, 1584-1621): the reference's bf16 logits converted to fp32
    (accelerate's convert_outputs_to_fp32), or, the reference's fp32 logits kept to the end of
    _compute_loss, entropy_from_logits' copy of the shifted logits (`reshape(-1, V)` of a
    non-contiguous slice: every row but the last position) and one 128-row chunk's log-softmax,
    exp and product. Without reference forward (precomputed) only the metrics' copy."""
    n, v = setup.tokens, spec.vocab
    shifted = setup.rows * (setup.seq_len - 1) * v
    chunk = [alloc(4 * min(TRL19_ENTROPY_CHUNK, shifted // v) * v)] * 3
    metrics = [alloc(4 * shifted), *chunk]
    # WPO's weights (dpo_trainer.py:1565-1576): `2.0 * shift_logits` and its logsumexp's temporary
    weighting = [alloc(4 * shifted), alloc(4 * shifted)] if setup.dpo_use_weighting else []
    if not reference_forward(setup):
        return max(metrics, weighting, key=sum)
    conversion = [alloc(2 * n * v), alloc(4 * n * v)]
    ref_kept = [alloc(4 * n * v)]
    return max(ref_kept + metrics, ref_kept + weighting, conversion, key=sum)


def reference_forward_phase(ctx: StepContext) -> list[Phase]:
    """The moment of the reference forward (the forward's measured phase), and of the metrics
    after it while the reference's output is alive (trl==1.9.0)."""
    if not reference_forward(ctx.setup) and not full_logits(ctx.setup):
        return []
    ph = ctx.base(PhaseKind.REFERENCE_FORWARD).add(C.ACTIVATIONS, ctx.acts + ctx.cast_cache)
    ph.add(C.TRANSIENT, sum(reference_forward_parts(ctx.spec, ctx.setup, ctx.params)))
    if ctx.sharded and reference_forward(ctx.setup):
        # the reference's units gathered as a forward gathers them; a separate copy's beside the
        # policy's root and last unit, still gathered from the policy's forward
        gathered = layer_forward_gathered(ctx.units, ctx.gathering)
        if reference_copy(ctx.setup):
            gathered += forward_end_gathered(ctx.units, ctx.gathering)
        ph.add(C.FSDP_BUFFERS, gathered)
    return [ph]


def preference_notes(setup: TrainingSetup) -> list[str]:
    if not against_reference(setup):
        return []
    notes = kto.kto_notes(setup) or [NOTE.format(trainer=TRAINERS[setup.stack])]
    if reference_copy(setup):
        where = (
            "sharded as the policy"
            if setup.sharded or setup.deepspeed == DeepSpeedStage.ZERO3
            else "whole on every GPU"
        )
        notes.append(f"reference model: a frozen copy of the model, stored as the policy is, {where}")
    if setup.precompute_ref_log_probs:
        notes.append("reference log-probs precomputed before training: no reference forward in the step")
        if reference_copy(setup):
            notes.append("axolotl loads the reference copy whatever precompute_ref_log_probs says (train.py:144-164)")
    elif not reference_copy(setup):
        notes.append("reference model: the policy with its adapters disabled (no copy)")
    if setup.engine == Engine.DEEPSPEED and reference_copy(setup) and setup.deepspeed != DeepSpeedStage.ZERO3:
        notes.append("DeepSpeed below ZeRO-3 keeps the reference copy whole (TRL prepares it at stage 0)")
    if full_logits(setup):
        notes.append(
            "axolotl's DPO trainer also runs gc.collect() and torch.cuda.empty_cache() after every step "
            "(core/trainers/dpo/trainer.py:99-101): the allocator's cache is not kept between steps"
        )
    return notes
