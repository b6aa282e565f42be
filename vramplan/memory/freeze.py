"""Freeze tuning: only the last N decoder layers train, whole (--train-layers; LLaMA-Factory's
``finetuning_type: freeze``, llamafactory==0.9.5 model/adapter.py:57-131 ``_setup_freeze_tuning``:
``freeze_trainable_layers`` > 0 trains ``range(num_layers - n, num_layers)`` and every other
parameter, the embedding, the final norm and lm_head included, gets requires_grad False).

What a frozen prefix changes, each rule in the module that owns its category:
- parameters.py: the prefix's weights, the embedding, lm_head and the final norm are frozen
  (no grad, no optimizer state); the trained layers may be cast to another dtype than the
  loaded model (``train_layers_dtype``: LLaMA-Factory casts every trainable parameter to fp32
  unless pure_bf16, adapter.py:313-328 and :126-129). Over a bf16 model under autocast their
  fp32 norm weights make each norm's output fp32 (precision.trained_layers_fp32, read by
  context.activation_context); autocast caches their bf16 copies (autocast.py).
- activations.py / backward.py: the frozen embedding's output needs no grad, so the prefix's
  layers record nothing for autograd (no saved tensors, no checkpointed input, no backward:
  autograd's graph starts at the first trained layer's parameters). The trained layers save
  what a full fine-tune's layer saves; the first one's input is made to require grad
  (LLaMA-Factory's checkpoint function does ``arg.requires_grad_(True)`` on the hidden states
  of a layer with trainable parameters, model_utils/checkpointing.py:100-122; verify's build
  does the same with a forward pre-hook), so its backward also makes the input's grad.
- loss.py: lm_head frozen, its backward makes only the hidden states' grad.
[CPU trace: the freeze-* cases]"""

from __future__ import annotations

from vramplan.model_spec import ModelSpec
from vramplan.setup import TrainingSetup


def first_trained_layer(num_layers: int, setup: TrainingSetup) -> int:
    """Index of the first decoder layer that trains (0 without --train-layers; LLaMA-Factory
    trains every layer when freeze_trainable_layers >= num_layers)."""
    if setup.train_layers is None:
        return 0
    return max(0, num_layers - setup.train_layers)


def layer_trains(i: int, num_layers: int, setup: TrainingSetup) -> bool:
    """Decoder layer i's weights train (whole fine-tune, GaLore, or a trained suffix layer)."""
    return i >= first_trained_layer(num_layers, setup)


def frozen_prefix(spec: ModelSpec, setup: TrainingSetup) -> int:
    """How many decoder layers, from the first, record nothing for autograd."""
    return first_trained_layer(len(spec.layers), setup)


def trained_dtype_bytes(setup: TrainingSetup) -> int | None:
    """Bytes per element of a trained layer's dense weights when the framework casts them away
    from the loaded model's dtype (train_layers_dtype), else None."""
    if setup.train_layers is None or setup.train_layers_dtype is None:
        return None
    return setup.train_layers_dtype.bytes


def freeze_notes(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """What the estimate says about a frozen prefix."""
    if setup.train_layers is None:
        return []
    first = frozen_prefix(spec, setup)
    n = len(spec.layers)
    return [
        f"--train-layers {setup.train_layers}: decoder layers {first}-{n - 1} train whole, layers 0-{first - 1}, "
        "the embedding, the final norm and lm_head are frozen; the frozen layers save nothing for backward "
        "(llamafactory==0.9.5 model/adapter.py:57-131; CPU trace: the freeze-* cases)"
        if first
        else f"--train-layers {setup.train_layers} >= the model's {n} layers: every decoder layer trains; "
        "the embedding, the final norm and lm_head are frozen"
    ]
