"""The activations saved through the forward, step-wide: every decoder layer's (or, under
checkpointing, each layer's input), RoPE's cos/sin, the batch's buffers, the masks
and what the final norm and lm_head save; and, under activation offload, which of them
live in pinned host RAM instead."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from vramplan.memory.attention import step_masks
from vramplan.memory.autocast import FrozenCasts, frozen_casts
from vramplan.memory.checkpointing import checkpoint_offload, offload_all_resident
from vramplan.memory.context import activation_context, stream_bytes
from vramplan.memory.dora import dora_weight_saved
from vramplan.memory.freeze import frozen_prefix
from vramplan.memory.layer import ShapeKey, layer_saved_per_token, shape_key
from vramplan.memory.lora import lora_targeted
from vramplan.memory.loss import input_bytes, root_saved
from vramplan.memory.storage import alloc
from vramplan.model_spec import ModelSpec
from vramplan.setup import ActivationOffload, Loss, Objective, TrainingSetup


@dataclass(frozen=True)
class SavedActivations:
    per_layer: list[int]  # per token, what each decoder layer saves without checkpointing
    layers: int  # the decoder layers' share of `total` (on the GPU)
    released: int  # the final norm's and lm_head's share, freed before the layers' backward
    total: int
    layer_gpu: list[int] = field(default_factory=list)  # each layer's bytes on the GPU through the step
    host: int = 0  # activation offload: pinned host bytes
    buffers: int = 0  # activation offload: persistent GPU reload buffers (in `total`)
    reload: int = 0  # a checkpointed input back on the GPU while its layer is recomputed
    forward_extra: int = 0  # offloaded tensors still on the GPU at a layer's forward
    casts: list[int] = field(default_factory=list)  # each layer's saved bf16 copies of frozen weights (autocast.py)
    down_casts: list[int] = field(default_factory=list)  # of which down's
    cast_parts: list[tuple[int, ...]] = field(default_factory=list)  # the others one by one (autocast.FrozenCasts)
    forward_cache: int = 0  # autocast's cached copies held through the forward only
    held_mlp_last: int = 0  # LLM.int8: the last layer's MLP inputs a checkpoint keeps (checkpointing.py)


def per_layer_saved(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """Per token, what each decoder layer saves. The first layer's input needs grad only when
    the embedding trains or checkpointing calls enable_input_require_grads. A frozen prefix
    (--train-layers) saves nothing; the first trained layer's input is made to need grad
    (memory/freeze.py)."""
    first = frozen_prefix(spec, setup)
    saved_of: dict[tuple[ShapeKey, bool], int] = {}  # most models repeat one layer shape: compute each once
    out = []
    for i, layer in enumerate(spec.layers):
        if i < first:
            out.append(0)
            continue
        key = (shape_key(layer), input_needs_grad(i, first, setup))
        if key not in saved_of:
            saved_of[key] = layer_saved_per_token(spec, layer, setup, input_grad=key[1])
        out.append(saved_of[key])
    return out


def input_needs_grad(i: int, first_trained: int, setup: TrainingSetup) -> bool:
    """Decoder layer i's input needs grad: it is past the first trained layer, or it is that
    layer and the embedding's output needs grad (_first_grad). The one rule per_layer_saved
    and the allocation events (events.py) both read."""
    return i > first_trained or _first_grad(setup)


def _first_grad(setup: TrainingSetup) -> bool:
    """The embedding's output needs grad: the embedding trains (whole, or peft's modules_to_save
    copy), or checkpointing calls enable_input_require_grads."""
    return setup.trains_embedding or setup.gradient_checkpointing


def rope_saved(spec: ModelSpec, setup: TrainingSetup) -> int:
    """RoPE cos/sin are computed once and saved by every layer's multiply (shared tensors)."""
    return 2 * alloc(setup.tokens * spec.head_dim * stream_bytes(setup))


def dora_weights_saved(spec: ModelSpec, setup: TrainingSetup) -> int:
    """DoRA with dropout: the base weight copy each adapted Linear saves (dora.dora_weight_saved)."""
    if not (setup.dora and setup.lora_dropout > 0):
        return 0
    ctx = activation_context(setup)
    return sum(
        dora_weight_saved(l, setup, ctx) for layer in spec.layers for l in layer.linears if lora_targeted(l, setup)
    )


def offload_all_layers(spec: ModelSpec, setup: TrainingSetup, per_layer: list[int]) -> SavedActivations:
    """--activation-offload all without checkpointing: each layer keeps its deduplicated saves
    on the GPU (offload_all_resident); the host holds every saved tensor once
    (loss_offloaded adds the loss's). At a layer's forward its newest packs are still in flight: bounded by that
    layer's saved tensors. [modelled from source]"""
    n, ctx = setup.tokens, activation_context(setup)
    gpu = [
        alloc(n * offload_all_resident(spec, layer, ctx, i > 0 or _first_grad(setup)))
        for i, layer in enumerate(spec.layers)
    ]
    host = sum(alloc(n * a) for a in per_layer)
    extra = alloc(n * per_layer[-1]) - gpu[-1] if per_layer else 0
    return SavedActivations(
        per_layer=per_layer, layers=sum(gpu), released=0, total=0, layer_gpu=gpu, host=host, forward_extra=extra
    )


def loss_offloaded(spec: ModelSpec, setup: TrainingSetup) -> int:
    """OffloadActivations also moves the loss's saved fp32 log-softmax (4·N·V) to the host:
    ForCausalLMLoss runs outside the lm_head's no-offload region (trl activation_offloading.py
    :716-732), with or without checkpointing. In the loss backward it is back on the GPU, as
    loss_terms counts it. (Other losses: not modelled here.)"""
    if setup.activation_offload != ActivationOffload.ALL or setup.loss != Loss.HF:
        return 0
    if setup.objective == Objective.REWARD:  # no LM loss saved for backward (memory/reward.py)
        return 0
    return alloc(4 * setup.tokens * spec.vocab)


def layer_activations(
    spec: ModelSpec, setup: TrainingSetup, per_layer: list[int], casts: FrozenCasts
) -> SavedActivations:
    """The decoder layers' saved bytes on the GPU (and on the host), per checkpointing and
    offload mode (released and total are filled in by saved_activations). autocast's saved
    copies of frozen weights are a layer's saves (under checkpointing: its recompute's)."""
    n = setup.tokens
    if setup.gradient_checkpointing:
        # each checkpointed layer keeps its input hidden state, on the GPU unless offloaded
        off = checkpoint_offload(spec, setup)
        first = frozen_prefix(spec, setup)  # a frozen prefix keeps no checkpointed input
        gpu = [0] * first + off.layer_gpu(len(spec.layers))[first:]
        return SavedActivations(
            per_layer=per_layer,
            layers=sum(gpu),
            released=0,
            total=0,
            layer_gpu=gpu,
            host=off.host,
            buffers=off.buffers,
            reload=off.reload,
            forward_extra=off.forward_extra,
            held_mlp_last=off.held_mlp_last,
        )
    if setup.activation_offload == ActivationOffload.ALL:
        every = offload_all_layers(spec, setup, per_layer)
        return replace(every, host=every.host + sum(casts.layers))  # the copies are packed to the host too
    gpu = [alloc(n * a) + c for a, c in zip(per_layer, casts.layers, strict=True)]
    # DoRA with dropout: each adapted Linear's saved weight copy (memory/dora.py)
    return SavedActivations(
        per_layer=per_layer, layers=sum(gpu) + dora_weights_saved(spec, setup), released=0, total=0, layer_gpu=gpu
    )


def saved_activations(spec: ModelSpec, setup: TrainingSetup) -> SavedActivations:
    per_layer = per_layer_saved(spec, setup)
    casts = frozen_casts(spec, setup)
    lay = layer_activations(spec, setup, per_layer, casts)
    released = alloc(root_saved(spec, setup)) + casts.head
    host = lay.host + loss_offloaded(spec, setup)
    total = lay.layers + lay.buffers + rope_saved(spec, setup) + input_bytes(setup) + step_masks(spec, setup) + released
    return SavedActivations(
        per_layer=per_layer,
        layers=lay.layers,
        released=released,
        total=total,
        layer_gpu=lay.layer_gpu,
        host=host,
        buffers=lay.buffers,
        reload=lay.reload,
        forward_extra=lay.forward_extra,
        casts=casts.layers,
        down_casts=casts.downs,
        cast_parts=casts.parts,
        forward_cache=casts.forward,
        held_mlp_last=lay.held_mlp_last,
    )
