"""GRPO's batch, from the setup alone (memory/grpo.py has the rule; this part is what the loss's
token buffers and the head read, so it imports nothing of the memory model but storage): whether
generation runs here, which scorings run, the rows the fused head scores, the buffered generation
batch. Source: trl==1.16.0 trainer/grpo_trainer.py, grpo_config.py."""

from __future__ import annotations

from vramplan.memory.storage import alloc
from vramplan.setup import Generation, Objective, TrainingSetup

# int64 per token of the buffered generation batch: prompt_ids + completion_ids, prompt_mask +
# completion_mask (_generate_and_score_completions' outputs, split into views per micro-step)
BUFFERED_TOKEN_BYTES = 16


def is_grpo(setup: TrainingSetup) -> bool:
    return setup.objective == Objective.GRPO


def generates_here(setup: TrainingSetup) -> bool:
    """model.generate runs on this GPU (use_vllm=False)."""
    return is_grpo(setup) and setup.generation == Generation.TRANSFORMERS


def _generate_every(setup: TrainingSetup) -> int:
    """Micro-steps between two generations (grpo_trainer.py:2642 generate_every)."""
    return (setup.steps_per_generation or setup.gradient_accumulation) * setup.num_iterations


def scores_old(setup: TrainingSetup) -> bool:
    """The old policy's log-probs are computed (grpo_trainer.py:2642-2657): generation not aligned
    with optimizer steps, or vLLM's importance sampling correction (on by default)."""
    return is_grpo(setup) and (setup.gradient_accumulation % _generate_every(setup) != 0 or not generates_here(setup))


def scores_reference(setup: TrainingSetup) -> bool:
    return is_grpo(setup) and setup.beta > 0


def generation_mid_accumulation(setup: TrainingSetup) -> bool:
    """Generation lands between micro-steps of one optimizer step (gradients alive) only when a
    generation feeds fewer micro-steps than an optimizer step takes."""
    return _generate_every(setup) < setup.gradient_accumulation


def scored_rows(setup: TrainingSetup) -> int:
    """Rows through the fused head: every completion position (the head gathers labelled rows)."""
    return setup.batch_size * setup.completion_len


def buffered_bytes(setup: TrainingSetup) -> int:
    """The generation batch's ids and masks, and its scored log-probs (fp32 per completion token),
    held for the steps_per_generation micro-steps it feeds."""
    g = setup.generation_rows
    logps = (int(scores_old(setup)) + int(scores_reference(setup))) * 4 * g * setup.completion_len
    return alloc(BUFFERED_TOKEN_BYTES * g * setup.seq_len) + (alloc(logps) if logps else 0)
