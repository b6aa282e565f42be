"""GRPO's log-probs from the model's logits: trl==1.9.0's GRPOTrainer, which axolotl==0.19.0 runs
for `rl: grpo` (AxolotlGRPOTrainer adds mixins only: core/trainers/grpo/trainer.py:57-67). TRL 1.16
has a fused head instead (memory/grpo.py, loss.trl_fused_loss).

Read from trl==1.9.0 trainer/grpo_trainer.py:1435-1541 (_get_per_token_logps_and_entropies) and
trainer/utils.py:479-560 (selective_log_softmax, entropy_from_logits); traced on the CPU with that
code (docs/cpu-trace.md, group "grpo", the ax-grpo-* cases).

Per micro-batch of B completions of C tokens, the model returns logits over K = B·(C+1) positions
(`logits_to_keep = C + 1`), accelerate converts them to fp32 (convert_outputs_to_fp32, the bf16
ones alive at the conversion), and the Kc = B·C positions that predict a completion token are
taken as views (`logits[:, :-1]`, `logits[:, -C:]`, then `div_` by the temperature in place):
- fp32 logits: selective_log_softmax gathers, then takes logsumexp row by row (one [C, V] fp32
  temporary at a time; each row's input is saved, a view, so the logits stay);
- bf16 logits (no conversion): log_softmax row by row, each row's output saved (bf16 [C, V]);
- the training forward asks for the entropy too (compute_entropy=True, :3006), without grad when
  there is no entropy bonus (:1524-1532): entropy_from_logits reshapes the views to [Kc, V], a
  copy when B > 1 (a slice of every row but its last is not contiguous), then takes log_softmax,
  exp and their product 128 rows at a time (utils.py:526-560).
Backward (traced, 2·dt·(K + Kc) per vocabulary entry for logits of dt bytes): the zero-filled grad
of the sliced logits, the scattered gather grad, the rows' grads and, for fp32 logits, the logits
logsumexp saved.

The scoring forwards (old policy, reference) run the same head under no_grad without the entropy,
on micro-batches of per_device_train_batch_size rows (grpo_trainer.py:2561-2600).
"""

from __future__ import annotations

from vramplan.memory.precision import head_compute_bytes
from vramplan.memory.storage import alloc
from vramplan.model_spec import ModelSpec
from vramplan.setup import Loss, Objective, Stack, TrainingSetup

# trl==1.9.0 trainer/utils.py:526 entropy_from_logits(chunk_size=128): flattened rows per chunk
TRL19_ENTROPY_CHUNK = 128
# entropy_from_logits per chunk: log_softmax, its exp and their product, each [chunk, V]
ENTROPY_CHUNK_TENSORS = 3

SOURCE = "trl==1.9.0 trainer/grpo_trainer.py:1435-1541"


def from_logits(setup: TrainingSetup) -> bool:
    """GRPO's log-probs come from the model's logits (axolotl's trl 1.9.0), not TRL 1.16's fused head."""
    return setup.objective == Objective.GRPO and setup.stack == Stack.AXOLOTL and setup.loss == Loss.HF


def _positions(setup: TrainingSetup, rows: int) -> tuple[int, int]:
    """(K, Kc): the logits' positions (logits_to_keep = C + 1 per row) and the scored ones."""
    return rows * (setup.completion_len + 1), rows * setup.completion_len


def logits_bytes(setup: TrainingSetup) -> int:
    """The dtype of the logits the head reads: fp32 after accelerate's conversion, else the
    head's product's."""
    return 4 if setup.fp32_outputs else head_compute_bytes(setup)


def _conversion(setup: TrainingSetup, positions: int, vocab: int) -> list[int]:
    """accelerate's fp32 copy of bf16 logits beside them (convert_to_fp32 of the output)."""
    dt = head_compute_bytes(setup)
    if not setup.fp32_outputs or dt == 4:
        return []
    return [alloc(dt * positions * vocab), alloc(4 * positions * vocab)]


def _entropy(setup: TrainingSetup, rows: int, vocab: int, dt: int) -> list[int]:
    """entropy_from_logits: the [Kc, V] copy of the non-contiguous views (none for one row) and
    one chunk's three tensors."""
    _k, scored = _positions(setup, rows)
    copy = [alloc(dt * scored * vocab)] if rows > 1 else []
    chunk = alloc(dt * min(TRL19_ENTROPY_CHUNK, scored) * vocab)
    return copy + [chunk] * ENTROPY_CHUNK_TENSORS


def train_forward_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """The training forward's head at its widest, as blocks (beyond the saved activations): the
    conversion, or the logits (and under bf16 the rows' saved log-softmax) with the entropy's."""
    rows, v = setup.batch_size, spec.vocab
    positions, scored = _positions(setup, rows)
    dt = logits_bytes(setup)
    held = [alloc(dt * positions * v)]
    if dt != 4:
        held.append(alloc(dt * scored * v))  # each row's log_softmax output, saved
    at_entropy = held + _entropy(setup, rows, v, dt)
    conversion = _conversion(setup, positions, v)
    return at_entropy if sum(at_entropy) >= sum(conversion) else conversion


def train_backward_bytes(spec: ModelSpec, setup: TrainingSetup) -> int:
    """The head's backward at its widest: 2·dt per vocabulary entry over the K and the Kc
    positions (traced: the sliced logits' zero-filled grad, the gather's and the rows' grads,
    and what the row-wise softmax saved)."""
    positions, scored = _positions(setup, setup.batch_size)
    return 2 * logits_bytes(setup) * (positions + scored) * spec.vocab


def scoring_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """A no-grad scoring forward's head at its widest, as blocks: the conversion, or the logits
    with one row's temporary (fp32: logsumexp's; bf16: the row's log_softmax output beside the
    last row's, rebound in the loop)."""
    rows, v, c = setup.batch_size, spec.vocab, setup.completion_len
    positions, _ = _positions(setup, rows)
    dt = logits_bytes(setup)
    per_row = [alloc(dt * c * v)] * (1 if dt == 4 else min(rows, 2))
    at_rows = [alloc(dt * positions * v), *per_row]
    conversion = _conversion(setup, positions, v)
    return at_rows if sum(at_rows) >= sum(conversion) else conversion
