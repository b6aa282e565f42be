"""KTO: what TRL 1.16's KTOTrainer holds beyond an SFT step (--objective kto).

Read from trl==1.16.0 trainer/kto_trainer.py (DataCollatorForUnpairedPreference :219-420,
_compute_kl_logps :1337-1368, _compute_loss :1370-1560); traced on the CPU with that code
(docs/cpu-trace.md, group "preference", the kto-* cases; docs/memory-model.md, "KTO").

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

from vramplan.setup import Objective, TrainingSetup

# int64 per token of the collator's KL rows: KL_input_ids, KL_attention_mask, KL_completion_mask
KL_INPUT_BYTES = 24
# fp32 per scored row of the policy's fused-head outputs: log_probs, entropy, mean_logits (:966-970)
POLICY_OUTPUT_BYTES = 12

NOTE = (
    "--objective kto: TRL's KTOTrainer (trl==1.16.0 trainer/kto_trainer.py, its fused chunked head) modelled "
    "from source and CPU-traced with it (docs/cpu-trace.md, group preference), not measured on a GPU: one row "
    "per example, every position counted as a completion token (an upper end: prompts are masked)"
)


def is_kto(setup: TrainingSetup) -> bool:
    return setup.objective == Objective.KTO


def kl_rows(setup: TrainingSetup) -> bool:
    """The collator builds the KL rows and the step scores them (loss_type kto)."""
    return is_kto(setup) and setup.kto_kl


def kl_input_bytes(setup: TrainingSetup) -> int:
    """The KL rows' ids and masks, per micro-batch (unrounded)."""
    return KL_INPUT_BYTES * setup.tokens if kl_rows(setup) else 0


def kto_notes(setup: TrainingSetup) -> list[str]:
    if not is_kto(setup):
        return []
    if kl_rows(setup):
        return [
            NOTE,
            "KL term (loss_type kto): the policy and the reference each score the batch's mismatched "
            "(prompt, completion) rows without grad",
        ]
    return [NOTE, "no KL term (loss_type apo_zero_unpaired)"]
