"""ORPO and SimPO as axolotl runs them (--objective orpo): `rl: orpo` is trl==1.9.0's experimental
ORPOTrainer, `rl: simpo` its CPOTrainer with loss_type simpo (axolotl==0.19.0 core/trainers/trl.py,
core/builders/rl.py:75-78, 128-145). Neither has a reference model (axolotl loads none for ORPO,
train.py:144; CPO has none). Read from trl==1.9.0 experimental/orpo/orpo_trainer.py:609-900 and
experimental/cpo/cpo_trainer.py:790-900; traced on the CPU with that code (docs/cpu-trace.md, group
"preference", the ax-orpo-* cases; docs/memory-model.md, "ORPO and SimPO").

- Rows: each pair's chosen and rejected sequences in one batch (TrainingSetup.rows = 2 x the
  micro-batch); concatenated_inputs pads and concatenates the collator's chosen_* and rejected_*
  ids, masks and labels into new tensors, and concatenated_forward clones the labels.
- The head (concatenated_forward): the model's logits, converted to fp32 by accelerate; the NLL
  over the chosen rows (ORPO always; CPO when cpo_alpha > 0, its default 1.0): a contiguous copy of
  the chosen rows' shifted logits and nn.CrossEntropyLoss's log-softmax of it (saved); then
  get_batch_logps: selective_log_softmax over every row's shifted logits, row by row (one [S, V]
  fp32 logsumexp temporary; each row's input saved, a view, so the logits stay).
- Backward (traced on isolated heads to the byte): 4 bytes per logit of every position and 8 per
  shifted position (the logits' grad, the gather's and the rows' grads), and with the NLL 4 per
  chosen shifted position (its log-softmax's saved output)."""

from __future__ import annotations

from vramplan.model_spec import ModelSpec
from vramplan.setup import Objective, TrainingSetup

# int64 per token beside the model's inputs: the collator's chosen_* and rejected_* ids, masks and
# labels (the concatenated copies are the step's own 24, loss.INPUT_BYTES_PER_TOKEN), and the
# labels concatenated_forward clones
BATCH_BYTES = 32

NOTE = (
    "--objective orpo: axolotl's {trainer} over trl==1.9.0's experimental {base} (the model's full fp32 "
    "logits{nll}; no reference model) modelled from source and CPU-traced with it (docs/cpu-trace.md, group "
    "preference), not measured on a GPU: 2 rows per pair, every position counted as a completion token"
)


def is_orpo(setup: TrainingSetup) -> bool:
    return setup.objective == Objective.ORPO


def batch_bytes(setup: TrainingSetup) -> int:
    """The collator's batch and the cloned labels, per micro-batch (unrounded)."""
    return BATCH_BYTES * setup.tokens if is_orpo(setup) else 0


def head_terms(spec: ModelSpec, setup: TrainingSetup) -> tuple[int, int]:
    """(forward, backward) of the head at their widest, beyond the saved activations: the
    conversion (bf16 and fp32 logits), the NLL's copy and log-softmax beside the fp32 logits, or a
    row's logsumexp temporary beside the logits and the NLL's saved log-softmax."""
    n, v, s = setup.tokens, spec.vocab, setup.seq_len
    shifted, chosen = setup.rows * (s - 1), setup.batch_size * (s - 1)
    nll = 4 * chosen * v if setup.chosen_nll else 0
    conversion = 6 * n * v
    at_nll = 4 * n * v + 2 * nll
    at_rows = 4 * n * v + nll + 4 * (s - 1) * v
    return max(conversion, at_nll, at_rows), 4 * n * v + 8 * shifted * v + nll


def orpo_notes(setup: TrainingSetup) -> list[str]:
    if not is_orpo(setup):
        return []
    nll = ", the NLL over the chosen rows" if setup.chosen_nll else ""
    return [NOTE.format(trainer="ORPO or SimPO trainer", base="ORPOTrainer / CPOTrainer", nll=nll)]
