"""The activations saved through the forward, step-wide: every decoder layer's (or, under
checkpointing, each layer's input), RoPE's cos/sin, the batch's buffers, the masks and
what the final norm and lm_head save."""
from __future__ import annotations

from dataclasses import dataclass

from vramplan.memory.attention import step_masks
from vramplan.memory.checkpointing import kept_per_layer
from vramplan.memory.context import activation_context, stream_bytes
from vramplan.memory.dora import dora_weight_saved
from vramplan.memory.layer import ShapeKey, layer_saved_per_token, shape_key
from vramplan.memory.lora import lora_targeted
from vramplan.memory.loss import input_bytes, root_saved
from vramplan.memory.storage import alloc
from vramplan.model_spec import ModelSpec
from vramplan.setup import Method, TrainingSetup


@dataclass(frozen=True)
class SavedActivations:
    per_layer: list[int]   # per token, what each decoder layer saves without checkpointing
    layers: int            # the decoder layers' share of `total`
    released: int          # the final norm's and lm_head's share, freed before the layers' backward
    total: int


def per_layer_saved(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """Per token, what each decoder layer saves. The first layer's input needs grad only when
    the embedding trains or checkpointing calls enable_input_require_grads."""
    first_grad = setup.method in (Method.FULL, Method.GALORE) or setup.gradient_checkpointing
    saved_of: dict[tuple[ShapeKey, bool], int] = {}  # most models repeat one layer shape: compute each once
    out = []
    for i, layer in enumerate(spec.layers):
        key = (shape_key(layer), i > 0 or first_grad)
        if key not in saved_of:
            saved_of[key] = layer_saved_per_token(spec, layer, setup, input_grad=key[1])
        out.append(saved_of[key])
    return out


def rope_saved(spec: ModelSpec, setup: TrainingSetup) -> int:
    """RoPE cos/sin are computed once and saved by every layer's multiply (shared tensors)."""
    return 2 * alloc(setup.tokens * spec.head_dim * stream_bytes(setup))


def dora_weights_saved(spec: ModelSpec, setup: TrainingSetup) -> int:
    """DoRA with dropout: the base weight copy each adapted Linear saves (dora.dora_weight_saved)."""
    if not (setup.dora and setup.lora_dropout > 0):
        return 0
    ctx = activation_context(setup)
    return sum(dora_weight_saved(l, setup, ctx) for layer in spec.layers for l in layer.linears
               if lora_targeted(l, setup))


def saved_activations(spec: ModelSpec, setup: TrainingSetup) -> SavedActivations:
    n = setup.tokens
    per_layer = per_layer_saved(spec, setup)
    if setup.gradient_checkpointing:
        # non-reentrant checkpointing keeps each layer's input hidden state
        layers = sum(alloc(n * kept_per_layer(spec, stream_bytes(setup))) for _ in spec.layers)
    else:
        layers = sum(alloc(n * a) for a in per_layer) + dora_weights_saved(spec, setup)
    released = alloc(root_saved(spec, setup))
    total = layers + rope_saved(spec, setup) + input_bytes(setup) + step_masks(spec, setup) + released
    return SavedActivations(per_layer=per_layer, layers=layers, released=released, total=total)
