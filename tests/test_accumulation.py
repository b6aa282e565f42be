"""Gradient accumulation (--gradient-accumulation N), fast tier.

The rule is held to the CPU trace of real micro-batches (tests/test_cpu_trace.py, the `*-ga2`
cases). Here: what follows by hand (every gradient alive from the forward of a later
micro-batch; where the accumulated gradients live per engine) and the planner's use of it."""

from __future__ import annotations

import pytest

from vramplan.categories import Category
from vramplan.estimate import make_setup
from vramplan.memory import step_model
from vramplan.memory.types import MeasuredPhase
from vramplan.model_loader import load_model_spec
from vramplan.plan import make_request, plan_spec

L32_1B_PARAMS = 1_235_814_400  # meta-llama/Llama-3.2-1B, tied embeddings


def _grads_at(spec, setup, measured: MeasuredPhase) -> int:
    return max(p.parts.get(Category.GRADIENTS, 0) for p in step_model(spec, setup).phases if p.measured == measured)


def test_a_later_micro_batch_holds_every_gradient_from_its_forward():
    """bf16 full fine-tune: 2 bytes per parameter, alive at the forward (zero_grad runs once a step)."""
    spec = load_model_spec("llama-3.2-1b")
    one = make_setup(method="full", seq_len=1024)
    four = make_setup(method="full", seq_len=1024, gradient_accumulation=4)
    assert _grads_at(spec, one, MeasuredPhase.FORWARD) == 0
    held = _grads_at(spec, four, MeasuredPhase.FORWARD)
    assert 2 * L32_1B_PARAMS <= held <= 2 * L32_1B_PARAMS * 1.001
    assert _grads_at(spec, four, MeasuredPhase.BACKWARD) == held
    # any count above one holds the same
    eight = make_setup(method="full", seq_len=1024, gradient_accumulation=8)
    assert step_model(spec, eight).peak.allocated == step_model(spec, four).peak.allocated


def test_the_optimizer_step_is_unchanged():
    spec = load_model_spec("llama-3.2-1b")

    def step(ga: int) -> int:
        setup = make_setup(method="full", seq_len=1024, gradient_accumulation=ga)
        return max(p.allocated for p in step_model(spec, setup).phases if p.measured == MeasuredPhase.OPTIMIZER)

    assert step(1) == step(4)


@pytest.mark.parametrize(
    ("stack", "unsharded", "width"),
    [("plain", False, 4), ("torchtune", False, 2), ("hf-trainer", True, 4), ("trl", True, 4), ("axolotl", True, 4)],
)
def test_fsdp_under_a_trainer_accumulates_unsharded(stack, unsharded, width):
    """transformers' Trainer wraps the micro-batches in accelerate's no_sync (FSDP2:
    set_requires_gradient_sync(False)): every rank holds the whole model's gradients; the plain
    loop and torchtune accumulate the sharded ones. The gradient dtype is the trainable weights':
    fp32 masters (plain mixed; accelerate's FSDP2 upcasts), bf16 in torchtune."""
    spec = load_model_spec("llama-3.2-1b")
    setup = make_setup(method="full", precision="mixed", fsdp=4, stack=stack, seq_len=1024, gradient_accumulation=2)
    held = _grads_at(spec, setup, MeasuredPhase.FORWARD)
    whole = width * L32_1B_PARAMS
    if unsharded:
        assert whole <= held <= whole * 1.001
    else:
        assert whole / 4 <= held <= whole / 4 * 1.01


def test_lora_accumulates_only_the_adapters():
    spec = load_model_spec("llama-3.2-1b")
    setup = make_setup(method="lora", lora_r=16, seq_len=1024, gradient_accumulation=4)
    held = _grads_at(spec, setup, MeasuredPhase.FORWARD)
    # r=16 on q,k,v,o,gate,up,down of 16 layers: r*(in+out) fp32 per Linear
    per_layer = 16 * ((2048 + 2048) * 2 + (2048 + 512) * 2 + (2048 + 8192) * 3)
    assert 4 * 16 * per_layer <= held <= 4 * 16 * per_layer + 16 * 14 * 512


def test_plan_rows_carry_their_accumulation_and_the_estimates_memory():
    """A --global-batch row that accumulates is planned (and re-checked) with its gradients held."""
    from vramplan.estimate import estimate_spec

    spec = load_model_spec("llama-3.2-1b")
    req = make_request(spec, "1x24GB", methods="full", global_batch=16)
    result = plan_spec(spec, req, top=3, suggest=False)
    assert result.rows
    for row in result.rows:
        assert row.setup.gradient_accumulation == row.grad_accum
        est = estimate_spec(spec, row.setup, req.gpus)
        assert row.per_gpu_bytes == est.per_gpu.total_bytes


def test_the_estimate_says_which_part_rests_on_source():
    from vramplan.memory.accumulation import accumulation_notes

    assert accumulation_notes(make_setup(method="full")) == []
    (traced,) = accumulation_notes(make_setup(method="full", gradient_accumulation=2))
    assert "CPU-traced" in traced
    trainer = accumulation_notes(make_setup(method="full", fsdp=2, stack="hf-trainer", gradient_accumulation=2))
    assert len(trainer) == 2 and "modelled from source, not measured" in trainer[1]
