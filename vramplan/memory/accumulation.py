"""Gradient accumulation (--gradient-accumulation N > 1): the gradients of the earlier
micro-batches stay alive through every later one.

`optimizer.zero_grad()` runs once per optimizer step, so from the second micro-batch of a step
on, every trainable parameter's `.grad` exists from the start of the forward to the optimizer
step; backward adds each new gradient into it (torch==2.13 AccumulateGrad: `variable.grad +=
new_grad`, in place outside create_graph, torch/csrc/autograd/functions/accumulate_grad.h), so
a new gradient lives only until its AccumulateGrad node runs. The step's widest micro-batch is
then a later one: each forward and backward moment holds the accumulated gradients, and a
backward moment one new gradient in flight (the largest of the layer, or of the root in the loss
backward) where the one-micro-batch step held the gradients it had made so far.

Where the accumulated gradients live:
- one GPU, DDP (under `no_sync`: its buckets are reduced on the last micro-batch only),
  DeepSpeed (its own accumulation into the partitioned gradients): what the step holds at the
  optimizer step (backward.held_grad).
- FSDP under a Trainer-based stack: transformers' Trainer wraps every micro-batch but the last in
  `accelerator.no_sync` (transformers==5.24.0 trainer.py:1904-1916), which for FSDP2 is
  `set_requires_gradient_sync(False)` (accelerate==1.16.0 accelerator.py:1126-1131) and for FSDP1
  `FullyShardedDataParallel.no_sync`: no reduce-scatter, the unsharded gradients accumulate on
  every rank (the whole model's, in the gradient dtype).
- FSDP in the plain loop, torchtune, Answer.AI's train.py (no `no_sync` unless `--no_sync`,
  train.py:849-853): the sharded gradients; under CPU offload FSDP2 keeps them on the host.
CPU-traced on one GPU and on FSDP2 in the plain loop (tests/test_cpu_trace.py `*-ga2`, group
`embedding`); the Trainer's no_sync under FSDP and DeepSpeed's accumulation are modelled from
source. Not measured on a GPU (scripts/calibrate.py `*_ga4`, `*_ga2`)."""

from __future__ import annotations

from vramplan.categories import Category as C
from vramplan.memory.backward import held_grad
from vramplan.memory.context import StepContext
from vramplan.memory.fsdp import offload_grads_held
from vramplan.memory.parameters import Param, grad_bytes
from vramplan.memory.storage import Phase, alloc
from vramplan.memory.types import MeasuredPhase, PhaseKind
from vramplan.setup import TrainingSetup

ACCUMULATION_NOTE = (
    "gradient accumulation: from the second micro-batch on, every trainable parameter's gradient "
    "is alive through the forward and backward (CPU-traced; not measured on a GPU)"
)
ACCUMULATION_FROM_SOURCE_NOTE = (
    "gradient accumulation under {what}: where the accumulated gradients live is modelled from "
    "source, not measured ({why})"
)


def accumulation_notes(setup: TrainingSetup) -> list[str]:
    """What the estimate says about gradient accumulation, and which part rests on source only."""
    if setup.gradient_accumulation == 1:
        return []
    notes = [ACCUMULATION_NOTE]
    if setup.sharded and setup.stack.trainer_param_groups:
        why = "transformers' Trainer runs the micro-batches in accelerate's no_sync: unsharded on every rank"
        notes.append(ACCUMULATION_FROM_SOURCE_NOTE.format(what="FSDP with a Trainer", why=why))
    elif setup.deepspeed is not None:
        why = "DeepSpeed accumulates into the gradients its step holds"
        notes.append(ACCUMULATION_FROM_SOURCE_NOTE.format(what="DeepSpeed", why=why))
    return notes


def accumulated_grad_sizes(ctx: StepContext) -> list[int]:
    """Each trainable parameter's accumulated gradient on this GPU, in bytes (empty: one
    micro-batch per step, or the gradients live on the host)."""
    setup = ctx.setup
    if setup.gradient_accumulation == 1:
        return []
    trainable = [p for p in ctx.params if p.trainable]
    if setup.sharded and setup.stack.trainer_param_groups:  # the Trainer's no_sync: unsharded
        return [alloc(grad_bytes(p, setup) * p.numel) for p in trainable]
    if setup.cpu_offload and not offload_grads_held(setup):
        return []
    return [held_grad(p, setup) for p in trainable]


def tied_head_grad(ctx: StepContext) -> int:
    """A full fine-tune's lm_head grad on a weight tied to the embedding: it waits in the engine's
    input buffer of the shared weight from the loss backward to the embedding's backward (torch==2.13
    torch/csrc/autograd/input_buffer.cpp), beside the accumulated grad of that weight. 0 otherwise."""
    setup, spec = ctx.setup, ctx.spec
    if setup.lora_like or spec.lm_head_numel or not setup.trains_head:
        return 0
    head = next((p for p in ctx.params if p.layer is None and p.trainable and p.dim0 == spec.vocab), None)
    return alloc(grad_bytes(head, setup) * head.numel) if head is not None else 0


def _in_flight(params: list[Param], sizes: dict[int, int]) -> int:
    """The largest new gradient of these parameters, alive until its AccumulateGrad runs."""
    return max((sizes[id(p)] for p in params if p.trainable), default=0)


def with_accumulated_grads(ctx: StepContext, phases: list[Phase]) -> list[Phase]:
    """The phases of a later micro-batch: every forward and backward moment holds the
    accumulated gradients; a backward moment that made gradients holds one in flight."""
    held = accumulated_grad_sizes(ctx)
    if not held:
        return phases
    total, waiting = sum(held), tied_head_grad(ctx)
    trainable = [p for p in ctx.params if p.trainable]
    sizes = {id(p): s for p, s in zip(trainable, held, strict=True)}
    by_layer: dict[int | None, list[Param]] = {}
    for p in trainable:
        by_layer.setdefault(p.layer, []).append(p)
    for ph in phases:
        if ph.measured not in (MeasuredPhase.FORWARD, MeasuredPhase.BACKWARD):
            continue
        if ph.kind is PhaseKind.EMBEDDING_BACKWARD:  # holds every grad and its new one already
            continue
        if ph.kind in (PhaseKind.GENERATION, PhaseKind.SCORING):  # before the first micro-step (grpo.py)
            continue
        made = ph.parts.get(C.GRADIENTS, 0)
        ph.parts[C.GRADIENTS] = total
        if ph.kind is PhaseKind.LAYER_BACKWARD:  # any of its moments may be between two of its grads
            ph.add(C.TRANSIENT, _in_flight(by_layer.get(ph.layer, []), sizes) + waiting)
        elif ph.kind is PhaseKind.FINAL_NORM_BACKWARD:
            ph.add(C.TRANSIENT, waiting)
        elif made:  # the loss backward's lm_head grad
            ph.add(C.TRANSIENT, _in_flight(by_layer.get(None, []), sizes))
    return phases
