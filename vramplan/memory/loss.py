"""The head of the step: the batch's token buffers, what the final norm and lm_head save,
and the logits and cross-entropy (transformers ForCausalLMLoss: logits.float(),
log_softmax saved). A different loss (chunked, fused linear cross-entropy) is a new
branch of loss_terms."""
from __future__ import annotations

from dataclasses import dataclass

from vramplan.memory.context import activation_context
from vramplan.memory.norms import norm_saved
from vramplan.memory.storage import alloc
from vramplan.model_spec import ModelSpec
from vramplan.setup import Method, TrainingSetup

# Runtime buffers outside the model per token: input_ids, labels, shifted labels (int64). [cal]
INPUT_BYTES_PER_TOKEN = 24
# At the optimizer step the batch's token ids (input_ids, reused as labels) are still held
# by the training loop: one int64 per token.
LOOP_TOKEN_BYTES = 8


def input_bytes(setup: TrainingSetup) -> int:
    return alloc(setup.tokens * INPUT_BYTES_PER_TOKEN)


def loop_token_bytes(setup: TrainingSetup) -> int:
    return alloc(setup.tokens * LOOP_TOKEN_BYTES)


def head_trains(setup: TrainingSetup) -> bool:
    """lm_head (and the embedding) train with every weight: full fine-tuning and GaLore."""
    return setup.method in (Method.FULL, Method.GALORE)


def root_saved(spec: ModelSpec, setup: TrainingSetup) -> int:
    """What the final norm and lm_head save (unrounded): the norm's saved tensors, and
    lm_head's input when its weight trains."""
    ctx = activation_context(setup)
    final = setup.tokens * norm_saved(spec, ctx, True)
    if head_trains(setup):
        final += setup.tokens * (2 if (ctx.autocast or ctx.stream == 2) else 4) * spec.hidden  # lm_head saves its input
    return final


@dataclass(frozen=True)
class LossTerms:
    """Transient bytes of the loss: inside its forward and at its backward."""
    forward: int
    backward: int


def loss_terms(spec: ModelSpec, setup: TrainingSetup) -> LossTerms:
    """The model's own cross-entropy on the full logits."""
    n, v = setup.tokens, spec.vocab
    held = 2 * n * v * (2 if spec.final_logit_softcapping else 1)  # bf16 logits (+ tanh output)
    return LossTerms(forward=held + 8 * n * v,     # + fp32 copy + log-softmax [notes 7, cal]
                     backward=held + 12 * n * v)   # log-softmax saved + its grad in + grad out [cal]
