"""The memory model: per-GPU bytes by category at each phase of one training step.

Every rule lives once, in the module named after its technique, with where it comes
from. "[cal]" marks a rule checked against tests/data/h100_dev.jsonl (H100, torch 2.11,
transformers 5.17, peft 0.21, bitsandbytes 0.50, galore-torch 1.0, hqq 0.2.8); "[CPU
trace]" one checked against the CPU trace of the real step (tests/test_cpu_trace.py).
Notation: N tokens per micro-batch, h hidden, q = heads*head_dim, kv = kv_heads*head_dim,
f MLP width, V vocab, r LoRA rank, W FSDP world size. All values are integer bytes.

  types.py          enums: ParamKind, PhaseKind, LayerPoint, MeasuredPhase, LinearRole
  storage.py        the allocator's 512 B rounding; Phase and StepModel
  context.py        ActivationContext (per layer), StepContext and StaticBytes (per step)
  parameters.py     every parameter tensor, dense storage, gradients
  quantization.py   4-bit storage (nf4, hqq4), what a 4-bit Linear returns and saves, transients, build
  lora.py           peft adapters: targets, storage, saved tensors, forward/backward points
  optimizers.py     optimizer states, step transients, layer-wise hooks, GaLore
  fsdp.py           FSDP2 sharding, units, gathered and reduce-scatter buffers
  persistent.py     per-GPU weights, grads and states (or host-pinned under CPU offload)
  norms.py, attention.py, linears.py, mlp.py   what each block saves
  checkpointing.py  gradient checkpointing's kept inputs and forward working set
  layer.py          one decoder layer: saved bytes and backward points
  activations.py    the step-wide saved activations
  autocast.py       autocast's cached weight casts
  loss.py           token buffers, the head's saved tensors, logits and cross-entropy
  backward.py       each decoder layer's backward moments
  phases.py         the step assembled: step_model
"""

from __future__ import annotations

from vramplan.memory.layer import LayerPoints, layer_points, layer_saved_per_token
from vramplan.memory.lora import lora_targeted
from vramplan.memory.parameters import Param, grad_bytes, parameters, store
from vramplan.memory.persistent import static_bytes
from vramplan.memory.phases import Prepared, prepare, step_model
from vramplan.memory.storage import BLOCK, MiB, Phase, StepModel, alloc
from vramplan.memory.types import (
    MEASURED_PHASES,
    LayerPoint,
    LinearRole,
    MeasuredPhase,
    ParamKind,
    PhaseKind,
)

__all__ = [
    "BLOCK",
    "MEASURED_PHASES",
    "LayerPoint",
    "LayerPoints",
    "LinearRole",
    "MeasuredPhase",
    "MiB",
    "Param",
    "ParamKind",
    "Phase",
    "PhaseKind",
    "Prepared",
    "StepModel",
    "alloc",
    "grad_bytes",
    "layer_points",
    "layer_saved_per_token",
    "lora_targeted",
    "parameters",
    "prepare",
    "static_bytes",
    "step_model",
    "store",
]
