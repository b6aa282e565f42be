"""KTO: what a KTO trainer holds beyond an SFT step (--objective kto). Three trainers: TRL 1.16's
KTOTrainer (--stack trl, its fused head; the bullets below), axolotl's, trl==1.9.0's KTOTrainer
over the model's fp32 logits (trl19_head_parts), and LLaMA-Factory's CustomKTOTrainer
(llamafactory_moment).

Read from trl==1.16.0 trainer/kto_trainer.py (DataCollatorForUnpairedPreference :219-420,
_compute_kl_logps :1337-1368, _compute_loss :1370-1560), trl==1.9.0's and llamafactory==0.9.5's
train/kto/trainer.py; traced on the CPU with that code (docs/cpu-trace.md, group "preference", the
kto-*, ax-kto-* and lf-kto-* cases; docs/memory-model.md, "KTO").

- Rows: one per example (TrainingSetup.rows is the micro-batch), each a prompt and a completion
  labelled desirable or not; every position counted as a completion token, as DPO's.
- The KL term (loss_type "kto", the default; --no-kto-kl for "apo_zero_unpaired"): the collator
  pairs each prompt with the next row's completion (KL_input_ids, KL_attention_mask,
  KL_completion_mask, int64 beside the batch's own three). Before the policy's forward the
  policy scores those rows under no_grad (nothing saved: narrower than the step's forward, which
  holds the saved activations beside the same working set); after it the reference scores them,
  then the completions, each a no-grad forward as DPO's reference forward
  (memory/preference.py), one after the other: the widest is that moment.
- The policy's fused head is asked for log_probs, entropy and mean_logits (:966-970): 12 fp32
  bytes per scored row; the reference copy's for log_probs alone (add_fused_lm_head's default).
"""

from __future__ import annotations

from vramplan.memory.storage import alloc
from vramplan.model_spec import ModelSpec
from vramplan.setup import Objective, Stack, TrainingSetup

# int64 per token of the collator's KL rows: KL_input_ids, KL_attention_mask, KL_completion_mask
KL_INPUT_BYTES = 24
# fp32 per scored row of the policy's fused-head outputs: log_probs, entropy, mean_logits (:966-970)
POLICY_OUTPUT_BYTES = 12
# trl==1.9.0 trainer/utils.py:526 entropy_from_logits(chunk_size=128): flattened rows per chunk
TRL19_ENTROPY_CHUNK = 128

NOTE = (
    "--objective kto: TRL's KTOTrainer (trl==1.16.0 trainer/kto_trainer.py, its fused chunked head) modelled "
    "from source and CPU-traced with it (docs/cpu-trace.md, group preference), not measured on a GPU: one row "
    "per example, every position counted as a completion token (an upper end: prompts are masked)"
)


AXOLOTL_NOTE = (
    "--objective kto: axolotl's AxolotlKTOTrainer over trl==1.9.0's KTOTrainer (axolotl 0.19.0's pin: the "
    "policy's and the reference's full fp32 logits, the metrics' copies of them) modelled from source and "
    "CPU-traced with it (docs/cpu-trace.md, group preference), not measured on a GPU; the KL term's rows scored "
    "without grad by the policy and the reference"
)


LLAMAFACTORY_NOTE = (
    "--objective kto: LLaMA-Factory's CustomKTOTrainer (llamafactory==0.9.5 train/kto/trainer.py: full fp32 "
    "logits and their log-softmax, copies of the desirable and undesirable rows' logits; the KL rows scored "
    "without grad after the policy's forward) modelled from source and CPU-traced with it (docs/cpu-trace.md, "
    "group preference), not measured on a GPU"
)


def is_kto(setup: TrainingSetup) -> bool:
    return setup.objective == Objective.KTO


def kl_rows(setup: TrainingSetup) -> bool:
    """The collator builds the KL rows and the step scores them (loss_type kto)."""
    return is_kto(setup) and setup.kto_kl


def kl_input_bytes(setup: TrainingSetup) -> int:
    """The KL rows' ids and masks, per micro-batch (unrounded)."""
    return KL_INPUT_BYTES * setup.tokens if kl_rows(setup) else 0


def _rows_each(setup: TrainingSetup) -> int:
    """The larger of the desirable and the undesirable rows of a micro-batch (half each, rounded up)."""
    return -(-setup.rows // 2)


def trl19_head_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """axolotl's KTO (trl==1.9.0 kto_trainer.py:1280-1330, 1478-1640): the widest of the reference's
    moments after the policy's forward, as blocks beyond the policy's saved activations and its fp32
    logits (preference.policy_held_parts). Each reference forward's logits converted to fp32 beside
    the bf16 ones, its KL rows' first (their log-probs taken row by row, one [S, V] fp32 logsumexp
    temporary), then the completions', whose fp32 logits `ref_outputs` keeps to the end; then the
    metrics over the policy's shifted logits: entropy_from_logits' copy of them (`reshape(-1, V)`
    of a non-contiguous slice) with one 128-row chunk's log-softmax, exp and product, then
    `index_select` copies of the desirable and the undesirable rows (every row's shifted logits)
    and one side's boolean-mask copy at a time. Precomputed: the metrics alone. [CPU trace: ax-kto-*]"""
    n, v, s = setup.tokens, spec.vocab, setup.seq_len
    shifted = setup.rows * (s - 1)
    ref = [] if setup.precompute_ref_log_probs else [alloc(4 * n * v)]  # the reference's fp32 logits, kept
    entropy = [*ref, alloc(4 * shifted * v), *[alloc(4 * min(TRL19_ENTROPY_CHUNK, shifted) * v)] * 3]
    sides = [*ref, alloc(4 * shifted * v), alloc(4 * _rows_each(setup) * (s - 1) * v)]
    moments = [entropy, sides]
    if not setup.precompute_ref_log_probs:
        moments.append([alloc(2 * n * v), alloc(4 * n * v)])  # a reference forward's conversion
        if kl_rows(setup):
            moments.append([alloc(4 * n * v), alloc(4 * s * v)])  # the KL rows' logits and a row's logsumexp
    return max(moments, key=sum)


def llamafactory_moment(
    spec: ModelSpec, setup: TrainingSetup, head: list[int], layers: tuple[list[int], list[int]]
) -> list[int]:
    """LLaMA-Factory's KTO (llamafactory==0.9.5 train/kto/trainer.py:149-270) after the policy's
    forward, as blocks beyond its saved activations and saved log-softmax. First, the policy's fp32
    logits alive, its no-grad KL forward (adapters on: a layer's moment with the adapter's path,
    or its head, `head` being LLaMA-Factory's head rule); then, in their place,
    `target_logits[kto_tags]` and `[~kto_tags]`, copies of every row's logits held to the metrics,
    beside the reference's moments: a layer's (adapters off), its head, or, its fp32 logits alive,
    its KL forward's head or its own row copies. `layers`: a no-grad layer's moment with and without
    the adapter's path (preference.no_grad_layer_parts). [CPU trace: lf-kto-*]"""
    n, v = setup.tokens, spec.vocab
    with_adapters, without = layers
    policy_kl = max(with_adapters, head, key=sum)
    ref_logits = [alloc(4 * n * v)]
    reference = max(
        without,
        head,
        ref_logits + head,  # its KL forward, its target's fp32 logits alive
        ref_logits + [alloc(4 * n * v)],  # its own row copies
        key=sum,
    )
    # the policy's logits, then (the same size) its row copies
    return [alloc(4 * n * v)] + max(policy_kl, reference, key=sum)


def kto_notes(setup: TrainingSetup) -> list[str]:
    if not is_kto(setup):
        return []
    if setup.stack == Stack.AXOLOTL:
        return [AXOLOTL_NOTE, *([] if kl_rows(setup) else ["no KL term (loss_type apo_zero_unpaired)"])]
    if setup.stack == Stack.LLAMAFACTORY:
        return [LLAMAFACTORY_NOTE]
    if kl_rows(setup):
        return [
            NOTE,
            "KL term (loss_type kto): the policy and the reference each score the batch's mismatched "
            "(prompt, completion) rows without grad",
        ]
    return [NOTE, "no KL term (loss_type apo_zero_unpaired)"]
