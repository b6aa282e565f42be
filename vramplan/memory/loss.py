"""The head of the step: the batch's token buffers, what the final norm and lm_head save,
and the loss over the vocabulary, one rule per `--loss` kind (setup.Loss), dispatched by
loss_terms. Sources and lifetimes: docs/memory-model.md, "The loss over the vocabulary".

Notation: N tokens, V vocab, h hidden; bytes. Every rule gives the bytes the loss holds
beyond the saved activations at its forward's and its backward's widest moment. The
full-logit losses (hf, chunked) run the model's lm_head, so lm_head saves its input as a
Linear does; the fused ones (trl-chunked-nll, liger, cce, unsloth) take the final norm's
output and lm_head's weight and save what they need themselves."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from vramplan.memory import grpo_logits, kto, orpo, reward
from vramplan.memory.compile import (
    axolotl_chunked_loss,
    chunked_compiled,
    compile_notes,
    compiled_chunked_loss,
    compiled_linear_ce_loss,
)
from vramplan.memory.context import activation_context, stream_bytes
from vramplan.memory.grpo_batch import buffered_bytes, is_grpo, scored_rows
from vramplan.memory.norms import norm_saved
from vramplan.memory.precision import head_compute_bytes, upcast_roots
from vramplan.memory.reward import is_reward
from vramplan.memory.storage import alloc
from vramplan.model_spec import ModelSpec
from vramplan.setup import Loss, ModelDtype, Objective, Precision, SavedModule, Stack, TrainingSetup

# Runtime buffers outside the model per token: input_ids, labels, shifted labels (int64). [cal]
INPUT_BYTES_PER_TOKEN = 24
# At the optimizer step the batch's token ids (input_ids, reused as labels) are still held
# by the training loop: one int64 per token.
LOOP_TOKEN_BYTES = 8
GiB = 2**30

# torchtune==0.6.1 torchtune/modules/loss/ce_chunked_output_loss.py:31 (num_output_chunks=8)
TORCHTUNE_CHUNKS = 8
# LinearCrossEntropyLoss is in no torchtune release (0.6.1 is the last): the repository's
TORCHTUNE_LINEAR_CE_SOURCE = "pytorch/torchtune@bd2a0fc torchtune/modules/loss/cross_entropy_loss.py"
# trl==1.16.0 trl/kernels/chunked_logprob.py:30 (TOKEN_CHUNK_SIZE) and trl/trainer/utils.py:1506
# (_CHUNKED_LOGPROB_CHUNK_SIZE, the vocabulary tile)
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
# unsloth_zoo==2026.10.9 unsloth_zoo/fused_losses/fused_linear.py:67-70 (_CHUNK_GB 2.0,
# _MIN_LOGITS, _MAX_ROWS), :74 (_SPLIT_COLS), :80-81 (_BWD_ROWS 4096, _BWD_TILE_BYTES 256 MiB)
UNSLOTH_BUDGET = 2 * GiB
UNSLOTH_MIN_LOGITS = 512 * 151936
UNSLOTH_MAX_ROWS = 4096
UNSLOTH_SPLIT_COLS = 16384

FUSED = frozenset({Loss.TRL_CHUNKED_NLL, Loss.LIGER, Loss.CCE, Loss.UNSLOTH})
CUDA_ONLY = {
    Loss.LIGER: "liger-kernel==0.8.5 liger_kernel/ops/fused_linear_cross_entropy.py",
    Loss.CCE: "cut-cross-entropy (axolotl-ai-cloud/ml-cross-entropy@5f0c7a7) cut_cross_entropy/cce.py",
    Loss.UNSLOTH: "unsloth_zoo==2026.10.9 unsloth_zoo/fused_losses/fused_linear.py",
}
# The CUDA-only losses `vramplan verify` has measured (tests/data/h200_verify.jsonl, docs/accuracy.md)
MEASURED_ON_GPU = {
    Loss.LIGER: "liger-kernel==0.8.5 on an H200: l1b_full_bf16_b1s4096_liger -0.6%, "
    "qw7_qlora_nf4_ckpt_b1s8192_liger +0.8%",
    Loss.CCE: "cut-cross-entropy==25.1.1 on an H200: l1b_full_bf16_b1s4096_cce -0.6%, "
    "l8b_lora16_ckpt_b1s4096_cce +0.1%",
}


def input_bytes(setup: TrainingSetup) -> int:
    """The micro-batch's token buffers; GRPO's (input_ids and attention_mask concatenated from the
    prompt and completion, the labels made from them: 24 bytes a token too) beside the buffered
    generation batch (memory/grpo.py)."""
    per_token = reward.INPUT_BYTES_PER_TOKEN if reward.sequence_classifier(setup) else INPUT_BYTES_PER_TOKEN
    kl = alloc(kto.kl_input_bytes(setup)) if kto.kl_rows(setup) else 0  # KTO's KL rows (memory/kto.py)
    pairs = alloc(orpo.batch_bytes(setup)) if orpo.is_orpo(setup) else 0  # ORPO's collated pairs (memory/orpo.py)
    return alloc(setup.tokens * per_token) + kl + pairs + grpo_buffered_bytes(setup)


def grpo_buffered_bytes(setup: TrainingSetup) -> int:
    return buffered_bytes(setup) if is_grpo(setup) else 0


def trl_scored_rows(setup: TrainingSetup) -> int:
    """Rows the fused head scores: every position with a next-token label, B·(S-1); under GRPO
    the completion's positions alone (memory/grpo.py scored_rows)."""
    if is_grpo(setup):
        return scored_rows(setup)
    return setup.rows * (setup.seq_len - 1)


def trl_output_bytes(setup: TrainingSetup) -> int:
    """Per scored row, the fused head's outputs: SFT's log_probs, entropy and is_top1; DPO adds
    mean_logits (trl==1.16.0 dpo_trainer.py:943-947, memory/preference.py); GRPO asks for log_probs
    and entropy (grpo_trainer.py:1068-1073)."""
    if setup.objective == Objective.GRPO:
        return 8
    if setup.objective == Objective.KTO:  # log_probs, entropy, mean_logits (memory/kto.py)
        return kto.POLICY_OUTPUT_BYTES
    if setup.objective == Objective.DPO:  # mean_logits, and WPO's log_sum_sq_probs (dpo_trainer.py:956-959)
        return TRL_SFT_OUTPUT_BYTES + 4 + (4 if setup.dpo_use_weighting else 0)
    return TRL_SFT_OUTPUT_BYTES


def loop_token_bytes(setup: TrainingSetup) -> int:
    return alloc(setup.tokens * LOOP_TOKEN_BYTES)


def head_trains(setup: TrainingSetup) -> bool:
    """lm_head trains: with every weight (full fine-tuning, GaLore), or as peft's trainable copy
    (--modules-to-save lm_head), which the loss reads as it reads lm_head (ModulesToSaveWrapper
    forwards the call and `.weight` to the copy: peft==0.21.2 utils/other.py:614-631)."""
    return setup.trains_head


def root_saved(spec: ModelSpec, setup: TrainingSetup) -> int:
    """What the final norm and lm_head save (unrounded): the norm's saved tensors, and
    lm_head's input when its weight trains and the loss runs lm_head as a Linear."""
    ctx = activation_context(setup)
    final = setup.tokens * norm_saved(spec, ctx, True)
    if head_trains(setup) and setup.loss not in FUSED:
        final += setup.tokens * (2 if (ctx.autocast or ctx.stream == 2) else 4) * spec.hidden  # lm_head saves its input
    if is_reward(setup):  # the score head trains: it saves its input
        final += reward.score_input_saved(spec, setup, ctx.stream, ctx.autocast)
    return final


def fused_head_cast(spec: ModelSpec, setup: TrainingSetup) -> int:
    """autocast's cached bf16 copy of a trained fp32 lm_head (memory/autocast.py) is never made
    under a fused loss: it never calls lm_head, and casts views of the weight (TRL per tile,
    trl/kernels/chunked_logprob.py:346; Liger's fallback `weight.t()`), which autocast does not
    cache (aten/src/ATen/autocast_mode.cpp: leaves only, no views). Over bf16 weights there
    is no cached copy to leave out (autocast.cast_cache)."""
    if not (setup.loss in FUSED and setup.autocast and _head_weight_bytes(setup) == 4 and head_trains(setup)):
        return 0
    return alloc(2 * spec.vocab * spec.hidden)


@dataclass(frozen=True)
class LossTerms:
    """Bytes of the loss beyond the saved activations: at its forward's and its backward's
    widest moment, and what the training loop keeps referenced (the logits under
    --keep-logits) through backward, the optimizer step and the next forward."""

    forward: int
    backward: int
    kept: int = 0


def _head_weight_bytes(setup: TrainingSetup) -> int:
    """lm_head's weight dtype as the loss sees it: fp32 masters (FSDP2's mixed policy gathers them
    in bf16), or peft's prepare_model_for_kbit_training upcast."""
    if SavedModule.LM_HEAD in setup.modules_to_save and setup.modules_to_save_dtype is not None:
        return setup.modules_to_save_dtype.bytes  # peft's trainable copy, cast (parameters._dense_param_bytes)
    if upcast_roots(setup):  # axolotl's fp32 lm_head (precision.upcast_roots)
        return 4
    gathered_bf16 = setup.precision == Precision.MIXED and setup.fsdp > 1
    fp32 = (setup.weight_dtype == ModelDtype.FP32 and not gathered_bf16) or (setup.kbit_prep and setup.lora_like)
    return 4 if fp32 else 2


def _compute_bytes(setup: TrainingSetup) -> int:
    """The dtype the head's matmul computes in (precision.head_compute_bytes)."""
    return head_compute_bytes(setup)


def _logits(spec: ModelSpec, setup: TrainingSetup) -> int:
    """The model's bf16 logits (+ Gemma 2's tanh softcap output, saved by the model)."""
    return _compute_bytes(setup) * setup.tokens * spec.vocab * (2 if spec.final_logit_softcapping else 1)


def held_output_bytes(spec: ModelSpec, setup: TrainingSetup) -> int:
    """The model's output (its logits) that the training loop still references while
    loss.backward() runs. The reference step's loop does (`out = model(input_ids, labels=...)`,
    then `out.loss.backward()`); a loop that keeps only the loss does not: transformers' Trainer
    (compute_loss returns the loss alone, the outputs die before accelerator.backward:
    transformers==5.25.0 trainer.py:2126-2163) and verify's own loop. Measured: on an H200,
    with the library versions of the H100 reference (torch 2.11.0, transformers 5.17.0),
    verify's loop held these bytes less at the loss backward in each of the 6 configurations
    both measured (tests/data/h200_verify.jsonl against h100_dev.jsonl: 2·N·V less 64 MiB,
    the 64 MiB verify holds more after step 0 in every line), and the same at every other peak.
    Only the model's own loss hands its logits out (the fused and chunked losses return none,
    torchtune's recipe deletes them); --keep-logits counts the output as kept instead
    (LossTerms.kept, from the forward until the next one returns)."""
    if setup.loss != Loss.HF or setup.stack != Stack.PLAIN or setup.keep_logits or setup.loss_only_loop:
        return 0
    return (4 if setup.fp32_outputs else _compute_bytes(setup)) * setup.tokens * spec.vocab  # as LossTerms.kept


def hf_loss(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """transformers ForCausalLMLoss (loss/loss_utils.py:35-74): logits.float() and
    log_softmax (saved, fp32) in forward; log-softmax saved, its grad in and out in backward,
    beside what the model saved (Gemma 2's softcap tanh output) and the output the loop holds."""
    n, v = setup.tokens, spec.vocab
    logits = _logits(spec, setup)
    copy = 4 * n * v if _compute_bytes(setup) != 4 else 0  # .float() of fp32 logits is the same tensor
    saved_by_model = logits - _compute_bytes(setup) * n * v  # the softcap's tanh output, else 0
    return LossTerms(
        forward=logits + copy + 4 * n * v,  # + fp32 copy + log-softmax [notes 7, cal]
        backward=saved_by_model + held_output_bytes(spec, setup) + 12 * n * v,
    )  # log-softmax saved + its grad in + grad out [cal]


def chunked_loss(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """torchtune's CEWithChunkedOutputLoss, eager (torchtune==0.6.1 modules/loss/
    ce_chunked_output_loss.py:39-90): the output layer makes 8 bf16 chunks of logits; each is
    upcast and log-softmaxed in turn, every chunk's fp32 log-softmax saved. The recipe
    drops the logits before backward (recipes/lora_finetune_single_device.py `del logits`);
    backward walks the chunks last to first, each freeing its log-softmax. Compiled
    (--compile, torchtune's compile_loss) and axolotl's patch of it (always compiled, over
    the model's full logits): memory/compile.py."""
    v = spec.vocab
    chunk = setup.rows * -(-setup.seq_len // TORCHTUNE_CHUNKS)  # torch.chunk along the sequence
    saved = 4 * setup.tokens * v  # every chunk's log-softmax
    tanh = _logits(spec, setup) // 2 if spec.final_logit_softcapping else 0  # softcap's saved tanh output
    if setup.stack == Stack.AXOLOTL:
        plain = _compute_bytes(setup) * setup.tokens * v
        fwd, bwd = axolotl_chunked_loss(setup.tokens, plain, tanh, setup.rows)
        return LossTerms(forward=fwd, backward=bwd)
    head = _chunked_head_grad(spec, setup, chunk)
    if chunked_compiled(setup):
        fwd, bwd = compiled_chunked_loss(setup.tokens, v, chunk, _logits(spec, setup), _compute_bytes(setup), tanh)
        return LossTerms(forward=fwd, backward=max(bwd, head))
    return LossTerms(
        forward=_logits(spec, setup) + saved + 4 * chunk * v,  # + the last chunk's fp32 copy
        backward=max(tanh + saved + 8 * chunk * v, head),
    )  # + its log-softmax grad in and out


def _chunked_head_grad(spec: ModelSpec, setup: TrainingSetup, chunk: int) -> int:
    """A trained lm_head under the chunked loss gets one weight grad per chunk: autograd runs
    the 8 loss backwards first (newer nodes), leaving 8 chunk grads, then each chunk's matmul
    backward. The engine's input buffer (torch/csrc/autograd/input_buffer.cpp accumulate)
    sums these weight grads, each the grad of `weight.t()`, out of place: traced, an
    aten::add of V·h·2 bytes under TBackward0 with both operands freed after it (case
    torchtune-chunked-compile-full; a plain elementwise grad is summed in place there). Widest
    at the second chunk: both grads and their sum, with 6 chunk grads still waiting. CUDA runs
    the same engine code; not measured there (scripts/calibrate.py *_chunked_compile)."""
    if not head_trains(setup):
        return 0
    c = _compute_bytes(setup)
    return 3 * spec.vocab * spec.hidden * c + (TORCHTUNE_CHUNKS - 2) * chunk * spec.vocab * c


def _linear_ce_rows(setup: TrainingSetup) -> tuple[int, int, int]:
    """R = B·(S-1) rows whose label is kept (every token but each sequence's last: labels shifted,
    an ignored last column, torchtune datasets/_sft.py:165-175; prompt masking would drop more,
    so an upper bound), and the last two of torch.tensor_split(R, 8)'s chunks (the first R % 8
    are one row longer)."""
    rows, n = setup.rows * (setup.seq_len - 1), TORCHTUNE_CHUNKS
    sizes = [rows // n + (1 if i < rows % n else 0) for i in range(n)]
    return rows, sizes[-1], sizes[-2]


def torchtune_linear_ce_loss(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """torchtune's LinearCrossEntropyLoss, eager (pytorch/torchtune@bd2a0fc, unreleased:
    torchtune/modules/loss/cross_entropy_loss.py:87-188). The recipe makes the decoder return its
    final norm's output (set_model_output :67-70, skip_output_layer, modules/transformer.py:678-689);
    the loss copies out the R rows whose label is kept (index_select, :117-145), splits them into 8
    (tensor_split) and projects and cross-entropies each in turn (:87-115): a chunk's bf16 logits
    and their fp32 copy live only while its log-softmax (fp32, saved) is made; no [N, V] tensor.
    Backward walks the chunks last to first, each whole (its projection is newer than the previous
    chunk's loss): the last chunk's log-softmax grad in and out; a trained output layer gets one
    weight grad per chunk, each the grad of `weight.t()`, summed out of place in the engine's
    input buffer (as _chunked_head_grad): widest at the second-last chunk's matmul. Traced on the
    CPU (cases torchtune-linear-ce-*). No softcap: torchtune caps Gemma 2's hidden state in its
    final norm (models/gemma2/_component_builders.py:55-71), not the logits. Compiled:
    memory/compile.py compiled_linear_ce_loss."""
    v, c = spec.vocab, _compute_bytes(setup)
    rows, last, prev = _linear_ce_rows(setup)
    masked = _linear_ce_masked(spec, setup, rows)
    w = _head_weight_bytes(setup) * v * spec.hidden if head_trains(setup) else 0
    if setup.compile:
        fwd, bwd = compiled_linear_ce_loss(rows, v, last, c, w)
        return LossTerms(forward=masked + fwd, backward=bwd)
    copy = 4 * last * v if c != 4 else 0  # .float() of fp32 logits is the same tensor
    return LossTerms(
        forward=masked + 4 * rows * v + c * last * v + copy,
        backward=max(
            4 * rows * v + 8 * last * v,  # every log-softmax saved, the last chunk's grad in and out
            (4 * (rows - last) * v + 8 * prev * v + w) if w else 0,  # the second-last's, one weight grad held
            4 * (rows - last - prev) * v + 3 * w,  # the held grad, the new one and their sum
        ),
    )


def _linear_ce_masked(spec: ModelSpec, setup: TrainingSetup, rows: int) -> int:
    """What the loss's forward holds of the hidden state: the decoder's output, which the recipe
    holds (`outputs`) until the loss returns (`del outputs`), and the kept rows' copy
    (index_select); when the output layer trains, that copy's chunks are the Linear's saved input
    (root_saved counts them), unless autocast casts an fp32 stream's chunks and saves those."""
    dt = max(stream_bytes(setup), _compute_bytes(setup))
    saved_by_head = head_trains(setup) and not (setup.autocast and dt == 4)
    return setup.tokens * spec.hidden * dt + (0 if saved_by_head else rows * spec.hidden * dt)


def trl_fused_loss(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """TRL 1.16 SFTTrainer's fused LM head (trl/trainer/utils.py:1548-1698 _fused_forward,
    trl/kernels/chunked_logprob.py:299-465; `loss_type="chunked_nll"` is a deprecated alias,
    sft_config.py:283-321): the N_v = B·(S-1) labelled rows of the hidden state gathered (a
    copy, saved), 7 fp32 running statistics per row, one tile buffer of min(N_v, 4096) rows x
    32768 columns whatever the vocabulary; backward: the same tile, an fp32 grad of the hidden
    rows cast back, and an fp32 weight grad cast back when lm_head trains."""
    h, v = spec.hidden, spec.vocab
    rows = trl_scored_rows(setup)
    dt_h, dt_w = stream_bytes(setup), _head_weight_bytes(setup)
    tile, casts = _trl_tile_and_casts(spec, setup, rows, backward=True)
    saved = rows * h * dt_h + 16 * rows  # h_sel + targets int64, log_z and entropy fp32
    forward = trl_head_forward(spec, setup, trl_output_bytes(setup))
    # fp32 accumulators cast back to the input's and the weight's dtype (chunked_logprob.py:428-438,
    # zeros(..., float32) then `.to(dtype)`): the cast of an fp32 tensor to fp32 is the same tensor
    weight_grad = v * h * (4 + _fp32_cast_copy(dt_w)) if head_trains(setup) else 0
    backward = saved + rows * h * (4 + _fp32_cast_copy(dt_h)) + 4 * rows + tile + casts + weight_grad
    return LossTerms(forward=forward, backward=backward)


def _fp32_cast_copy(dtype_bytes: int) -> int:
    """Bytes per element of `fp32_tensor.to(dtype)`: a new tensor, or none when dtype is fp32."""
    return 0 if dtype_bytes == 4 else dtype_bytes


# per token, SFTTrainer's fused-head outputs (sft_trainer.py:1144-1147): log_probs and entropy fp32, is_top1 bool
TRL_SFT_OUTPUT_BYTES = 9


def _trl_tile_and_casts(spec: ModelSpec, setup: TrainingSetup, rows: int, backward: bool = False) -> tuple[int, int]:
    """The fused head's tile buffer, min(rows, 4096) x 32768 in the compute dtype whatever the
    vocabulary (mm_buf, kernels/chunked_logprob.py:347, :413), and its casts to the compute
    dtype: the hidden rows of an fp32 stream (`hidden_chunk = hidden[...].to(compute_dtype)` per
    4096-row chunk, :352, :420), and a slice of an fp32 lm_head, at most 32768 of its V rows
    (`weight[start:end].to(compute_dtype)`: inline in the forward's matmul, :356; bound to
    `w_chunk` per tile in the backward, :423). A name rebound in a loop keeps its old tensor until
    the new one is made: two row casts where there are two row chunks, and in the backward two
    weight slices where the loop has two iterations (rows > 4096 or V > 32768)."""
    h, v = spec.hidden, spec.vocab
    dt_h, dt_c, dt_w = stream_bytes(setup), _compute_bytes(setup), _head_weight_bytes(setup)
    tile = min(rows, TRL_TOKEN_TILE) * TRL_VOCAB_TILE * dt_c
    row_chunks, vocab_tiles = -(-rows // TRL_TOKEN_TILE), -(-v // TRL_VOCAB_TILE)
    row_cast = min(rows, TRL_TOKEN_TILE) * h * dt_c if dt_h != dt_c else 0
    weight_cast = min(v, TRL_VOCAB_TILE) * h * dt_c if dt_w != dt_c else 0
    casts = row_cast * min(row_chunks, 2)
    casts += weight_cast * (min(row_chunks * vocab_tiles, 2) if backward else 1)
    return tile, casts


def trl_head_forward(spec: ModelSpec, setup: TrainingSetup, output_bytes: int) -> int:
    """The fused head's forward at its widest: the final norm's output, its gathered rows
    (h_sel), targets and log_z/entropy (16 per row), the 7 fp32 running statistics, the
    outputs per row and scattered to every token (`output_bytes` each), the tile and its casts."""
    n, h = setup.tokens, spec.hidden
    rows = trl_scored_rows(setup)
    tile, casts = _trl_tile_and_casts(spec, setup, rows)
    dt_h = stream_bytes(setup)
    return n * h * dt_h + rows * h * dt_h + 16 * rows + 28 * rows + output_bytes * (rows + n) + tile + casts


def liger_chunk_rows(tokens: int, vocab: int, hidden: int) -> int:
    """liger-kernel==0.8.5 ops/fused_linear_cross_entropy.py:99-106: rows per logits chunk,
    next_pow2(cdiv(N, cdiv(V, h))) (chunk_mem_const 1), at most N."""
    inc = -(-vocab // hidden)
    rows = -(-tokens // inc)
    return min(1 << (rows - 1).bit_length(), tokens)


def liger_loss(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """Liger's fused linear cross-entropy (liger-kernel==0.8.5 ops/fused_linear_cross_entropy.py:
    108-155, 574-610): gradients made inside the forward, one logits chunk live (reused), the
    input grad N·h (and the weight grad V·h in the weight's dtype when lm_head trains) saved
    for backward, which only scales them in place. An fp32 lm_head under autocast takes the
    fallback path: a bf16 cast of the weight per chunk."""
    n, h, v = setup.tokens, spec.hidden, spec.vocab
    dt_in, dt_w, dt_c = stream_bytes(setup), _head_weight_bytes(setup), _compute_bytes(setup)
    held = n * h * dt_in + (v * h * dt_w if head_trains(setup) else 0)
    cast = v * h * dt_c if dt_w != dt_c else 0
    chunk = liger_chunk_rows(n, v, h) * v * dt_c
    return LossTerms(
        forward=n * h * dt_in + held + chunk + cast + 5 * n,  # input + grads + chunk + loss_1d, mask
        backward=held,
    )


def cce_loss(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """Cut Cross-Entropy, axolotl's defaults (ml-cross-entropy@5f0c7a7 cut_cross_entropy/cce.py:
    49-220, cce_backward.py:330-485; accum_e_fp32 = accum_c_fp32 = False): no [N,V] tensor;
    saved: the hidden state itself, lse fp32, int64 targets and valid-row index, logit_avg
    fp32 [V]; backward: the hidden grad (and the weight grad when lm_head trains) in their
    own dtype, and argsort(logit_avg)."""
    n, h, v = setup.tokens, spec.hidden, spec.vocab
    dt_e, dt_c = stream_bytes(setup), _head_weight_bytes(setup)
    held = n * h * dt_e + 20 * n + 4 * v
    weight_grad = v * h * dt_c if head_trains(setup) else 0
    return LossTerms(
        forward=held + 12 * n + 16 * n,  # + neg_dot, lse temp, nonzero index
        backward=held + n * h * dt_e + weight_grad + 12 * v,
    )


def unsloth_chunk_rows(keep: int, hidden: int, vocab: int) -> int:
    """unsloth_zoo==2026.10.9 fused_losses/fused_linear.py:140-154 fused_linear_rows with fp32
    logits (4 B, `_logits_mode` on sm80+): the power of two at or below keep·h/V, at least the
    power of two at or below 512·151936/V (within [512, 4096]), at most 4096 and at most the
    2 GiB budget's rows (`_budget_bytes`: min(2 GiB, free/2); the free half is not known here,
    so the budget is taken at its 2 GiB cap, the widest chunk), at most keep."""

    def floor_pow2(x: float) -> int:
        p = 1 << max(math.ceil(math.log2(max(x, 1))), 0)
        return p // 2 if p > x else p

    rows = floor_pow2(keep * hidden / vocab)
    least = min(max(floor_pow2(UNSLOTH_MIN_LOGITS / vocab), 512), UNSLOTH_MAX_ROWS)
    rows = min(max(rows, least), UNSLOTH_MAX_ROWS)
    rows = min(rows, max(UNSLOTH_BUDGET // (vocab * 4), 2))
    return max(min(rows, keep), 1)


def unsloth_tiled(setup: TrainingSetup) -> bool:
    """fused_linear.py:1319-1320: a frozen head without label smoothing streams the vocabulary in
    fp32 tiles (`_tiled_forward`) when the logits are fp32 (bf16 compute on sm80+; fp16 is the
    T4/V100 case, where `_flash_ce_ok` needs sm80 too) and the labelled rows reach
    `_flash_min_rows`: 0 on a card of at most 24.5 GiB, 4096 above (:92-106). Below 4096 rows
    the chunked path of the larger cards is taken, the wider of the two."""
    rows = setup.rows * (setup.seq_len - 1)
    return not head_trains(setup) and setup.precision != Precision.FP16 and rows >= UNSLOTH_MAX_ROWS


def _unsloth_working_set(spec: ModelSpec, setup: TrainingSetup, keep: int) -> int:
    """One chunk's buffers inside `_ce_impl` (fused_linear.py:1286-1386). Unsloth shifts the labels
    (the last position of each row is ignore_index, llama.py:2122-2136), so fewer rows are kept
    than there are tokens and each chunk's rows are gathered (`_rows_of`: index_select, R·h in
    the compute dtype). Tiled (`_tiled_forward`, :1100-1186): R = min(4096, keep) rows x one
    16384-column fp32 tile (256 MiB `_BWD_TILE_BYTES` // (R·4), clamped to 16384), the fp32
    [R, h] gradient accumulator and `part` [8, ceil(V/16384), R] fp32. Chunked: an [R, ceil8(V)]
    fp32 logits buffer reused by every chunk (`_Buffers`, :919-935), the chunk's hidden grad
    in fp32 (`_dz_w`) and cast to the stream dtype for `index_copy_`."""
    h, v = spec.hidden, spec.vocab
    dt_c, dt_h = _compute_bytes(setup), stream_bytes(setup)
    if unsloth_tiled(setup):
        r = min(UNSLOTH_MAX_ROWS, keep)
        splits = -(-v // UNSLOTH_SPLIT_COLS)
        return r * UNSLOTH_SPLIT_COLS * 4 + r * h * 4 + 4 * r + 32 * splits * r + r * h * dt_c
    r = unsloth_chunk_rows(keep, h, v)
    return r * (-(-v // 8) * 8) * 4 + r * h * dt_c + r * h * (4 + dt_h)


def unsloth_loss(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """Unsloth's fused cross-entropy as its Llama forward calls it (unsloth==2026.10.9
    models/llama.py:2122-2136, target_gb None) and unsloth_zoo==2026.10.9 routes it by default
    (UNSLOTH_CHUNKED_CE and UNSLOTH_FUSED_LINEAR on: cross_entropy_loss.py:736-756, 856-860 ->
    chunked_logprob.py:430-456 -> fused_linear.py:2312-2355, the `fused_linear_ce_v2` op): the
    gradients are made in the forward, chunk by chunk; the hidden grad [N, h] in the stream dtype
    (and lm_head's, in its dtype, when it trains) is saved for backward (:1692-1698), which
    returns scaled copies while the saved ones are alive (:1700-1716). Around the chunks: the
    kept-row mask and index (`_keep_index`, bool + int64), fp32 log-probs and lse per kept row,
    then their float64 negation (:1371-1375); a bf16 copy of an fp32 lm_head (`w`)."""
    n, h, v = setup.tokens, spec.hidden, spec.vocab
    dt_h, dt_w, dt_c = stream_bytes(setup), _head_weight_bytes(setup), _compute_bytes(setup)
    keep = setup.rows * (setup.seq_len - 1)
    head = v * h * dt_w if head_trains(setup) else 0
    held = n * h * dt_h + head
    around = n + 8 * keep + 8 * keep + (v * h * dt_c if dt_w != dt_c else 0)
    widest = max(_unsloth_working_set(spec, setup, keep), 16 * keep)
    return LossTerms(forward=n * h * dt_h + held + around + widest, backward=2 * held)


def trl19_dpo_loss(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """trl==1.9.0's DPO head as axolotl runs it (dpo_trainer.py:1340-1347, utils.py:479-523): the
    model's bf16 logits converted to fp32 by accelerate (both alive at the conversion), then
    selective_log_softmax: a gather and, row by row, logsumexp, which saves its row (a view, so
    the fp32 logits stay) and makes one [S, V] fp32 temporary. Backward: the logits saved, the
    gather's zero-filled grad and each row's scattered grad (12 bytes per logit, as the hf loss's
    backward: loss.hf_loss). The reference forward and the metrics: preference.reference_forward_parts."""
    n, v = setup.tokens, spec.vocab
    conversion = 2 * n * v + 4 * n * v
    per_row = 4 * n * v + 4 * setup.seq_len * v
    return LossTerms(forward=max(conversion, per_row), backward=12 * n * v)


def llamafactory_dpo_loss(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """LLaMA-Factory 0.9.5's DPO head (train/dpo/trainer.py:218-252, train/trainer_utils.py:592-635):
    the model's bf16 logits converted to fp32 by accelerate (`.to(torch.float32)` is then the same
    tensor), then the log-softmax of every row but its last position at once (saved for backward)
    over a contiguous copy of that slice (aten SoftMax host_softmax: input.contiguous()), beside
    the fp32 logits. Backward: the saved log-softmax, the gather's zero-filled grad and the
    log-softmax's grad, 12 bytes per scored logit."""
    n, v, shifted = setup.tokens, spec.vocab, setup.rows * (setup.seq_len - 1) * spec.vocab
    return LossTerms(forward=max(6 * n * v, 4 * n * v + 8 * shifted), backward=12 * shifted)


LOSS_RULES: dict[Loss, Callable[[ModelSpec, TrainingSetup], LossTerms]] = {
    Loss.HF: hf_loss,
    Loss.CHUNKED: chunked_loss,
    Loss.TORCHTUNE_LINEAR_CE: torchtune_linear_ce_loss,
    Loss.TRL_CHUNKED_NLL: trl_fused_loss,
    Loss.LIGER: liger_loss,
    Loss.CCE: cce_loss,
    Loss.UNSLOTH: unsloth_loss,
}


def outside_forward(setup: TrainingSetup) -> bool:
    """The trainer computes its log-probs from the logits the model returned, after accelerate's
    autocast around the forward has exited and cleared its weight cache: axolotl's (trl 1.9.0) and
    LLaMA-Factory's preference steps, axolotl's GRPO (grpo_logits.py). [CPU trace: ax-grpo-beta-lora-ckpt,
    ax-orpo-qlora-ckpt]"""
    if grpo_logits.from_logits(setup):
        return True
    full_logit_trainer = setup.stack in (Stack.AXOLOTL, Stack.LLAMAFACTORY) and setup.loss == Loss.HF
    return full_logit_trainer and setup.objective in (Objective.DPO, Objective.KTO, Objective.ORPO)


def loss_terms(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """The loss of setup.loss, with accelerate's fp32 outputs and the loop's kept logits.

    --fp32-outputs (accelerate==1.16.0 utils/operations.py:872-893 convert_to_fp32 around
    forward, accelerator.py:1791-1801): the model's logits copied to fp32 after its loss ran,
    while the loss's saved log-softmax and the bf16 logits are alive; the bf16 ones die when
    the wrapper returns, the fp32 ones when compute_loss returns (trainer.py:2126-2163): before
    backward. For the hf loss that moment equals its forward peak; the fused losses return no
    [N,V] logits to convert. --keep-logits: the output the loop keeps holds the logits (fp32
    when converted), from this forward until the next one returns."""
    if reward.value_head(setup):  # LLaMA-Factory's: the LM loss made and dropped, then the value head (reward.py)
        held = reward.held_hidden_states(spec, setup, stream_bytes(setup))
        forward = max(hf_loss(spec, setup).forward, sum(reward.value_head_forward_parts(spec, setup))) + held
        return LossTerms(forward=forward, backward=sum(reward.value_head_backward_parts(spec, setup)))
    if is_reward(setup):  # a score head of one output: no logits over the vocabulary (reward.py)
        return LossTerms(forward=sum(reward.forward_parts(setup)), backward=sum(reward.backward_parts(spec, setup)))
    if orpo.is_orpo(setup):  # axolotl's ORPO and SimPO: trl 1.9.0's logits, an NLL over the chosen rows (orpo.py)
        forward, backward = orpo.head_terms(spec, setup)
        return LossTerms(forward=forward, backward=backward)
    if grpo_logits.from_logits(setup):  # axolotl's GRPO: trl 1.9.0's log-probs from the logits (grpo_logits.py)
        forward = sum(grpo_logits.train_forward_parts(spec, setup))
        return LossTerms(forward=forward, backward=grpo_logits.train_backward_bytes(spec, setup))
    if setup.objective in (Objective.DPO, Objective.KTO) and setup.loss == Loss.HF:  # axolotl's, LLaMA-Factory's
        return llamafactory_dpo_loss(spec, setup) if setup.stack == Stack.LLAMAFACTORY else trl19_dpo_loss(spec, setup)
    terms = LOSS_RULES[setup.loss](spec, setup)
    if setup.loss in FUSED or setup.loss == Loss.TORCHTUNE_LINEAR_CE:  # no [N,V] logits come out of the model
        return terms
    n, v = setup.tokens, spec.vocab
    # A compiled chunked loss holds no fp32 log-softmax: what it holds at its forward's end
    # (the logits, its saved chunks) and the fp32 copy (case axolotl-chunked-*).
    moment = terms.forward + 4 * n * v if chunked_compiled(setup) else _logits(spec, setup) + 8 * n * v
    forward = max(terms.forward, moment) if setup.fp32_outputs else terms.forward
    kept = (4 if setup.fp32_outputs else _compute_bytes(setup)) * n * v if setup.keep_logits else 0
    return LossTerms(forward=forward, backward=terms.backward, kept=kept)


def loss_notes(setup: TrainingSetup) -> list[str]:
    """What the estimate of a CUDA-only loss kernel, of an unreleased loss, or of a compiled
    step rests on."""
    if setup.loss == Loss.TORCHTUNE_LINEAR_CE:
        return [
            f"--loss {setup.loss.value}: torchtune's LinearCrossEntropyLoss, which no release has "
            f"({TORCHTUNE_LINEAR_CE_SOURCE}); CPU-traced with that source, not measured on a GPU",
            *compile_notes(setup),
        ]
    if setup.loss not in CUDA_ONLY:
        return compile_notes(setup)
    if setup.loss in MEASURED_ON_GPU:
        return [
            f"--loss {setup.loss.value}: read from source ({CUDA_ONLY[setup.loss]}) and measured "
            f"({MEASURED_ON_GPU[setup.loss]}; tests/data/h200_verify.jsonl)",
            *compile_notes(setup),
        ]
    note = (
        f"--loss {setup.loss.value}: modelled from source, not measured ({CUDA_ONLY[setup.loss]}; "
        "a Triton kernel, so no CPU trace; scripts/calibrate.py has its case)"
    )
    if setup.loss == Loss.UNSLOTH and not unsloth_tiled(setup):
        note += (
            "; its chunk depends on the free memory at the first loss call (min(free/2, 2 GiB) of logits): "
            "the 2 GiB cap is assumed, the widest chunk it allows"
        )
    return [note, *compile_notes(setup)]
