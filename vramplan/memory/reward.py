"""A reward model's step: what a Bradley-Terry reward model holds where an SFT step over the same
rows holds an LM head and its loss (--objective reward).

TRL's RewardTrainer (trl==1.16.0 trainer/reward_trainer.py; axolotl==0.19.0's `reward_model:
true` runs trl==1.9.0's, whose model class, collator and compute_loss are the same), read from
source and traced on the CPU with its own compute_loss (docs/cpu-trace.md, group "reward"):

- The model is AutoModelForSequenceClassification with num_labels=1 (reward_trainer.py:396-400;
  axolotl utils/schemas/validation.py:260-265): the decoder without lm_head, and a score head
  `nn.Linear(hidden, 1, bias=False)` (transformers==5.25.0 modeling_layers.py:138
  GenericForSequenceClassification). An untied model's lm_head is not loaded at all: its
  weights, gradients and optimizer states are gone from the step. A tied model keeps its
  embedding, which trains under a full fine-tune as before.
- With peft the score head trains: peft's SEQ_CLS task adds `score` to modules_to_save
  (peft==0.21.2 PeftModelForSequenceClassification; axolotl loaders/adapter.py:133 picks the task
  from the model class; TRL's docstring asks for `modules_to_save=["score"]`,
  reward_trainer.py:326): a frozen original and a trained copy, hidden x 1 each.
- Rows: DataCollatorForPreference puts each pair's chosen and rejected rows in one batch
  (reward_trainer.py:203-229), input_ids and attention_mask (int64) and no labels.
- The head (modeling_layers.py:166-190): the score's output over every position, [rows, seq, 1]
  in the compute dtype; the last non-pad position found with two int32 [rows, seq] tensors
  (the mask and its product with the positions); the scores gathered there. The score's input,
  the final norm's output, is saved for its weight's gradient. compute_loss's logsigmoid over
  [batch] scores is negligible (reward_trainer.py:778-795).
- Its backward: the gathered scores' gradient scattered into zeros of [rows, seq, 1], then
  the score's input gradient, [tokens, hidden] in the compute dtype, before the final norm's.
"""

from __future__ import annotations

from vramplan.memory.storage import alloc
from vramplan.memory.types import Param, ParamKind
from vramplan.model_spec import ModelSpec
from vramplan.setup import ModelDtype, Objective, Precision, TrainingSetup

# the score head's outputs (reward_trainer.py:396 num_labels=1)
NUM_LABELS = 1
# Per token, the collator's input_ids and attention_mask (int64 each): no labels
INPUT_BYTES_PER_TOKEN = 16
# Per token, the int32 mask of non-pad positions and its product with the positions
# (modeling_layers.py:180-182), alive together at the head's forward
LAST_TOKEN_SEARCH_BYTES = 8

NOTE = (
    "--objective reward: TRL's RewardTrainer ({trainer}) modelled from source and CPU-traced with it "
    "(docs/cpu-trace.md, group reward), not measured on a GPU: a sequence-classification model (a score "
    "head of one output, no lm_head), 2 rows per pair"
)
TRAINERS = {
    "trl": "trl==1.16.0 trainer/reward_trainer.py",
    "axolotl": "axolotl==0.19.0's `reward_model: true` over trl==1.9.0's",
}


def is_reward(setup: TrainingSetup) -> bool:
    return setup.objective == Objective.REWARD


def score_params(spec: ModelSpec, setup: TrainingSetup) -> list[Param]:
    """The score head in lm_head's place: trained with every weight, or as peft's SEQ_CLS
    modules_to_save copy beside its frozen original."""
    numel = spec.hidden * NUM_LABELS
    score = Param(numel, NUM_LABELS, ParamKind.DENSE, True, None)
    if setup.lora_like:
        return [Param(numel, NUM_LABELS, ParamKind.DENSE, False, None), score]
    return [score]


def compute_bytes(setup: TrainingSetup) -> int:
    """The dtype the score head's product is in: bf16/fp16 under autocast or bf16 weights (as
    loss._compute_bytes for lm_head)."""
    return 2 if setup.precision != Precision.BF16 or setup.weight_dtype == ModelDtype.BF16 else 4


def score_input_saved(spec: ModelSpec, setup: TrainingSetup, stream: int, autocast: bool) -> int:
    """The score's input, saved for its weight's gradient (unrounded): autocast's bf16 cast, or
    the stream's own dtype."""
    return setup.tokens * (2 if (autocast or stream == 2) else 4) * spec.hidden


def forward_parts(setup: TrainingSetup) -> list[int]:
    """The head's forward at its widest: the scores over every position, then the two int32
    tensors of the last-position search."""
    n = setup.tokens
    return [alloc(compute_bytes(setup) * NUM_LABELS * n), alloc(4 * n), alloc(4 * n)]


def backward_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """The head's backward: the scattered gradient of the scores, then the score's input
    gradient."""
    n, c = setup.tokens, compute_bytes(setup)
    return [alloc(c * NUM_LABELS * n), alloc(c * n * spec.hidden)]


def reward_notes(setup: TrainingSetup) -> list[str]:
    return [NOTE.format(trainer=TRAINERS[setup.stack.value])] if is_reward(setup) else []
