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

LLaMA-Factory's `stage: rm` (llamafactory==0.9.5 train/rm/, pinning trl<=0.24.0) is another model:
trl 0.24's AutoModelForCausalLMWithValueHead over the causal LM (model/loader.py:185-186), its
PairwiseTrainer.compute_loss (train/rm/trainer.py:88-110) calling it with the pairwise collator's
labels (data/collator.py:542-564; remove_unused_columns is off, hparams/parser.py:459):

- the causal LM's forward runs whole, its LM loss included (ForCausalLMLoss: the fp32 copy of the
  logits, the saved log-softmax), and the wrapper adds `lm_logits.float()` (trl==0.24.0
  models/modeling_value_head.py:162-184) while that loss and its graph are still referenced; the
  compute_loss keeps only the values (`_, _, values = model(...)`), so both die before backward
  and nothing flows back through lm_head: it keeps its weights and gets no gradient, hence no
  optimizer state, under a full fine-tune too.
- output_hidden_states=True: every decoder layer's output stays referenced until the wrapper
  returns; a checkpointed layer's input or an fp32 stream's norm saves them anyway, a bf16
  stream's are held only by that tuple.
- the value head (modeling_value_head.py:22-59): dropout 0.1 (its mask saved), the last hidden
  state `.to(fp32)` (the summary Linear is made in fp32 after loading), under autocast cast back
  to bf16 and saved for the summary's weight gradient; Linear(hidden, 1) with a bias, trained.
"""

from __future__ import annotations

from vramplan.memory.precision import head_compute_bytes
from vramplan.memory.storage import alloc
from vramplan.memory.types import Param, ParamKind
from vramplan.model_spec import ModelSpec
from vramplan.setup import Engine, Objective, Stack, TrainingSetup

# the score head's outputs (reward_trainer.py:396 num_labels=1)
NUM_LABELS = 1
# Per hidden element, the value head's dropout mask (bool, as CUDA's fused dropout saves it)
VALUE_HEAD_MASK = 1
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
VALUE_HEAD_NOTE = (
    "stage rm: LLaMA-Factory's PairwiseTrainer (llamafactory==0.9.5 train/rm/trainer.py) over trl 0.24's "
    "AutoModelForCausalLMWithValueHead, modelled from source and CPU-traced with both (docs/cpu-trace.md, "
    "group reward), not measured on a GPU: the causal LM's logits and LM loss computed and dropped, lm_head "
    "given no gradient, a value head over the last hidden state, 2 rows per pair"
)


def is_reward(setup: TrainingSetup) -> bool:
    return setup.objective == Objective.REWARD


def value_head(setup: TrainingSetup) -> bool:
    """LLaMA-Factory's reward model: a value head over the whole causal LM, its LM loss included."""
    return is_reward(setup) and setup.stack == Stack.LLAMAFACTORY


def sequence_classifier(setup: TrainingSetup) -> bool:
    """TRL's and axolotl's reward model: AutoModelForSequenceClassification, no lm_head."""
    return is_reward(setup) and not value_head(setup)


def score_params(spec: ModelSpec, setup: TrainingSetup) -> list[Param]:
    """The score head in lm_head's place: trained with every weight, or as peft's SEQ_CLS
    modules_to_save copy beside its frozen original. LLaMA-Factory's: lm_head kept, never given a
    gradient, and the value head's Linear(hidden, 1) with its bias, trained."""
    if value_head(setup):
        out = [Param(spec.hidden + 1, NUM_LABELS, ParamKind.DENSE, True, None)]
        if spec.lm_head_numel:
            out.insert(0, Param(spec.lm_head_numel, spec.vocab, ParamKind.DENSE, _flat_grad(setup), None))
        return out
    numel = spec.hidden * NUM_LABELS
    score = Param(numel, NUM_LABELS, ParamKind.DENSE, True, None)
    if setup.lora_like:
        return [Param(numel, NUM_LABELS, ParamKind.DENSE, False, None), score]
    return [score]


def _flat_grad(setup: TrainingSetup) -> bool:
    """A full fine-tune's lm_head under FSDP1 still gets a gradient, zeros: FSDP1 reduces its unit's
    flat gradient whole, and gives every parameter of the shard a view of it, so AdamW keeps states
    for lm_head too. [CPU trace: engines/fsdp1-2-lf-reward-full, optimizer -18% before]"""
    return setup.engine == Engine.FSDP1 and not setup.lora_like and setup.train_layers is None


def score_input_saved(spec: ModelSpec, setup: TrainingSetup, stream: int, autocast: bool) -> int:
    """The score's input, saved for its weight's gradient (unrounded): autocast's bf16 cast, or
    the stream's own dtype. The value head's: its dropout mask, and its input `.to(fp32)`, which
    autocast casts to bf16 for the summary Linear (fp32 without autocast)."""
    if value_head(setup):
        return setup.tokens * (VALUE_HEAD_MASK + (2 if setup.autocast else 4)) * spec.hidden
    return setup.tokens * (2 if (autocast or stream == 2) else 4) * spec.hidden


def held_hidden_states(spec: ModelSpec, setup: TrainingSetup, stream: int) -> int:
    """The value head's output_hidden_states: each decoder layer's output that nothing saved (a
    bf16 stream without checkpointing), held until the wrapper returns."""
    if not value_head(setup) or setup.gradient_checkpointing or stream != 2:
        return 0
    return len(spec.layers) * alloc(stream * setup.tokens * spec.hidden)


def value_head_forward_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """The value head's moment after the LM loss: the model's logits (the compute dtype), the
    loss's saved fp32 log-softmax, the wrapper's fp32 copy of the logits."""
    nv = setup.tokens * spec.vocab
    return [alloc(head_compute_bytes(setup) * nv), alloc(4 * nv), alloc(4 * nv)]


def value_head_backward_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """The value head's backward: the summary's input gradient (bf16 under autocast), its fp32
    copy through `.to(fp32)`'s backward, and dropout's output gradient in the stream's dtype."""
    n, h = setup.tokens, spec.hidden
    first = 2 if setup.autocast else 4
    return [alloc(first * n * h), alloc(4 * n * h), alloc(head_compute_bytes(setup) * n * h)]


def forward_parts(setup: TrainingSetup) -> list[int]:
    """The head's forward at its widest: the scores over every position, then the two int32
    tensors of the last-position search."""
    n = setup.tokens
    return [alloc(head_compute_bytes(setup) * NUM_LABELS * n), alloc(4 * n), alloc(4 * n)]


def backward_parts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """The head's backward: the scattered gradient of the scores, then the score's input
    gradient."""
    n, c = setup.tokens, head_compute_bytes(setup)
    return [alloc(c * NUM_LABELS * n), alloc(c * n * spec.hidden)]


def reward_notes(setup: TrainingSetup) -> list[str]:
    if value_head(setup):
        return [VALUE_HEAD_NOTE]
    return [NOTE.format(trainer=TRAINERS[setup.stack.value])] if is_reward(setup) else []
