"""Mixed precision under torch.autocast: the bf16 casts of fp32 weights it caches, and the
per-call casts of frozen fp32 weights that autograd saves."""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.memory.freeze import frozen_prefix, trained_dtype_bytes
from vramplan.memory.lora import adapter_bytes, lora_targeted
from vramplan.memory.loss import TORCHTUNE_CHUNKS, head_trains
from vramplan.memory.parameters import Param, grad_bytes
from vramplan.memory.precision import dense_weight_bytes, frozen_fp32_autocast
from vramplan.memory.reward import sequence_classifier, value_head
from vramplan.memory.storage import alloc
from vramplan.memory.types import ATTENTION_IN_ROLES, MLP_OUT_ROLES, LinearRole, ParamKind
from vramplan.model_spec import ModelSpec
from vramplan.setup import Loss, Method, ModelDtype, TrainingSetup


def dense_trained_fp32(setup: TrainingSetup) -> bool:
    """A full fine-tune's decoder weights train in fp32: masters, or --train-layers-dtype fp32."""
    cast = trained_dtype_bytes(setup)
    return (cast if cast is not None else dense_weight_bytes(setup)) == 4


def _cached_matrix(p: Param, setup: TrainingSetup) -> bool:
    """A trainable fp32 weight matrix: cached_cast keeps its bf16 copy (autocast.py's header)."""
    return p.trainable and p.kind == ParamKind.DENSE and p.numel != p.dim0 and grad_bytes(p, setup) == 4


def checkpointed_layer_casts(params: list[Param], setup: TrainingSetup) -> int:
    """Under checkpointing, the decoder layers' trainable fp32 weights: the checkpointed forward
    runs inside the forward's autocast, so cached_cast keeps each weight's bf16 copy in the cache
    until that autocast exits (after the loss), though no layer saves it; the recompute runs in
    an autocast of its own (torch.utils.checkpoint's recompute_fn) whose exit clears its copies.
    [CPU trace: full-mixed-ckpt and the freeze-*-mixed-ckpt cases, forward]"""
    return sum(sum(parts) for parts in checkpointed_layer_cast_parts(params, setup).values())


def checkpointed_layer_cast_parts(params: list[Param], setup: TrainingSetup) -> dict[int, list[int]]:
    """checkpointed_layer_casts per decoder layer, one copy each: a layer's copies are made when its
    checkpointed forward runs (the allocation events place them there, one block each)."""
    if not (setup.autocast and setup.gradient_checkpointing):
        return {}
    out: dict[int, list[int]] = {}
    for p in params:
        if p.layer is not None and _cached_matrix(p, setup):
            out.setdefault(p.layer, []).append(alloc(2 * p.numel))
    return out


def cast_cache(params: list[Param], setup: TrainingSetup, spec: ModelSpec) -> int:
    """autocast caches bf16 casts of trainable fp32 weights (a full fine-tune's masters, peft's
    fp32 modules_to_save lm_head; LoRA's adapters: adapter_casts); they are saved for backward
    (without checkpointing every layer's; with it only the root's lm_head). [cal]"""
    # bf16 weights (--model-dtype bf16): casting a bf16 tensor to bf16 is a no-op, nothing cached
    if not setup.autocast:
        return 0
    total = 0
    ckpt = setup.gradient_checkpointing
    # the input embedding is a lookup, not an autocast op: never cast. Untied, it is the first
    # root matrix of vocab rows parameters() lists, before lm_head; tied, that one matrix is
    # lm_head's weight too, cast for the head's matmul. [CPU trace: full-mixed-ckpt, untied]
    # a sequence classifier has no lm_head: its embedding is never cast, tied or not (memory/reward.py)
    embedding_left = bool(spec.lm_head_numel) or sequence_classifier(setup)
    for p in params:
        head = p.layer is None and p.dim0 == spec.vocab and p.role != LinearRole.EMBED
        if head and embedding_left:
            embedding_left = False
            continue
        if _cached_matrix(p, setup) and (not ckpt or p.layer is None) and (p.layer is not None or head):
            total += alloc(2 * p.numel)
    return total


@dataclass(frozen=True)
class FrozenCasts:
    """The bf16 copies of frozen fp32 weights that autograd saves, in bytes."""

    layers: list[int]  # each decoder layer's, saved until that layer's backward (its recompute's under checkpointing)
    downs: list[int]  # of which the down projection's, freed first with down's saved input
    head: int = 0  # lm_head's, freed in lm_head's backward with what the root saved
    forward: int = 0  # held by autocast's cache through the forward only (the adapters' under checkpointing)
    # each layer's copies but down's, one tensor each, where they are weights' (the allocation events:
    # one block per copy, not one block of their sum)
    parts: list[tuple[int, ...]] = field(default_factory=list)


# ATen autocast_mode.cpp cached_cast (torch==2.13; `can_try_cache`) caches a cast only for an
# fp32 leaf that requires grad (not a view): a frozen fp32 weight (a LoRA base, a frozen lm_head,
# a Linear LoRA does not target) is cast to bf16 again at every F.linear call.
# linear's backward needs the weight for the input's grad (mm(grad, W)): autograd saves that bf16
# copy, not the fp32 weight, whenever the input requires grad (torch==2.13.0
# torchgen/packaged/autograd/derivatives.yaml:256-259 addmm, :1218-1220 mm: the input's grad is
# mm_mat1_backward(grad, mat2); ATen/autocast_mode.h:840 `linear` casts to bf16). Checked at torch 2.13.0 (three
# F.linear calls on one frozen fp32 weight save three bf16 storages; on a trainable one, one).
# [CPU trace: the adapters group's *-fp32w-mixed cases, torchtune's chunked loss included]
def frozen_casts(spec: ModelSpec, setup: TrainingSetup) -> FrozenCasts:
    """Without checkpointing every decoder layer keeps its copies from its forward to its
    backward; under checkpointing the checkpointed forward saves nothing and the layer's
    recompute makes them again. A 4-bit base runs inside its own autograd function (no copy);
    the first layer's q/k/v save none when its input needs no grad (a frozen embedding, no
    checkpointing). MoE expert tensors are left out (the experts implementation decides).
    The adapters' cached copies (adapter_casts) are saved alike."""
    n = len(spec.layers)
    adapters = adapter_casts(spec, setup)
    ckpt = setup.gradient_checkpointing
    forward = sum(adapters) if ckpt else 0
    if setup.method in (Method.FULL, Method.GALORE):
        # every layer weight trains (cast_cache; under checkpointing their recompute's copies), but
        # under --train-layers lm_head is frozen; the frozen prefix records nothing (memory/freeze.py)
        layers, downs, parts = recomputed_weight_casts(spec, setup)
        head = _head_casts(spec, setup) if frozen_fp32_autocast(setup) else 0
        return FrozenCasts(layers, downs, head, forward + _value_head_lm_head_cast(spec, setup), parts)
    if not frozen_fp32_autocast(setup):
        return FrozenCasts(adapters, [0] * n, forward=forward)
    layers, downs = [], []
    dense = setup.method == Method.LORA
    for i, layer in enumerate(spec.layers):
        lins = [l for l in layer.linears if dense and (i > 0 or ckpt or l.role not in ATTENTION_IN_ROLES)]
        layers.append(sum(alloc(2 * l.numel) for l in lins) + adapters[i])
        downs.append(sum(alloc(2 * l.numel) for l in lins if l.role in MLP_OUT_ROLES))
    return FrozenCasts(layers, downs, _head_casts(spec, setup), forward)


def recomputed_weight_casts(
    spec: ModelSpec, setup: TrainingSetup
) -> tuple[list[int], list[int], list[tuple[int, ...]]]:
    """Under checkpointing, per decoder layer (and down's share), the bf16 copies of its trained
    fp32 weight matrices (a full fine-tune's masters, --train-layers-dtype fp32): the layer's
    recompute runs in an autocast of its own (torch.utils.checkpoint's recompute_fn), whose
    cached_cast makes each copy again, and the recomputed matmuls save them until their backward
    ran (down's first, with down's input); the recompute's autocast exit clears only the cache.
    [CPU trace: layer-backward full-mixed-ckpt, 8 Linear inputs and weights of bf16 alive at the
    MLP's backward]"""
    n = len(spec.layers)
    if not (setup.autocast and setup.gradient_checkpointing and dense_trained_fp32(setup)):
        return [0] * n, [0] * n, []
    first = frozen_prefix(spec, setup)
    trained = [layer if i >= first else None for i, layer in enumerate(spec.layers)]
    parts = [tuple(alloc(2 * l.numel) for l in t.linears if l.role not in MLP_OUT_ROLES) if t else () for t in trained]
    downs = [sum(alloc(2 * l.numel) for l in t.linears if l.role in MLP_OUT_ROLES) if t else 0 for t in trained]
    return [sum(p) + d for p, d in zip(parts, downs, strict=True)], downs, parts


def adapter_casts(spec: ModelSpec, setup: TrainingSetup) -> list[int]:
    """Per decoder layer, the cached bf16 copies of fp32 adapters under autocast: lora_A and
    lora_B are trainable fp32 leaves, so cached_cast keeps one copy of each until the forward's
    autocast exits, and their matmuls save it until the layer's backward. Under checkpointing
    the cache holds every layer's through the forward and the recompute makes one layer's
    again. [CPU trace: lora-fp32w-mixed-ckpt's forward]"""
    if not (setup.autocast and setup.lora_like and adapter_bytes(setup) == 4):
        return [0] * len(spec.layers)
    r = setup.lora_r
    return [
        sum(
            alloc(2 * r * l.in_features) + alloc(2 * r * l.out_features)
            for l in layer.linears
            if lora_targeted(l, setup)
        )
        for layer in spec.layers
    ]


def _value_head_lm_head_cast(spec: ModelSpec, setup: TrainingSetup) -> int:
    """LLaMA-Factory's reward model under a full fine-tune: lm_head's fp32 weight requires grad (it
    never gets one), so cached_cast keeps its bf16 copy until the wrapper's autocast exits; the
    logits' graph is dropped before backward, so it is held through the forward only.
    [CPU trace: lf-reward-full]"""
    if not (value_head(setup) and setup.autocast and setup.weight_dtype == ModelDtype.FP32):
        return 0
    return alloc(2 * (spec.lm_head_numel or spec.embed_numel))


def _head_casts(spec: ModelSpec, setup: TrainingSetup) -> int:
    """A frozen fp32 lm_head (or the embedding it is tied to): one saved copy per call, once for
    the model's loss, once per chunk for torchtune's two (their output layer runs on each chunk).
    TRL's fused head runs its own autograd function on the weight and saves no
    copy (CPU-checked); Liger, CCE and Unsloth (CUDA kernels) are left out. A reward model has no
    lm_head (its score head's copy is hidden x 1)."""
    if head_trains(setup) or sequence_classifier(setup):
        return 0
    calls = {Loss.HF: 1, Loss.CHUNKED: TORCHTUNE_CHUNKS, Loss.TORCHTUNE_LINEAR_CE: TORCHTUNE_CHUNKS}.get(setup.loss, 0)
    return calls * alloc(2 * (spec.lm_head_numel or spec.embed_numel))
