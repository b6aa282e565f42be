"""FSDP2 (fully_shard): how a parameter shards, each unit's all-gathered bytes, the
unsharded grads and reduce-scatter input of a unit in backward, and which units are
gathered at each moment. Units are the decoder layers and the root (layer None)."""
from __future__ import annotations

from vramplan.memory.quantization import packed_compute_bytes
from vramplan.memory.storage import alloc
from vramplan.memory.types import Param
from vramplan.setup import TrainingSetup


def shard(p: Param, world: int) -> int:
    """FSDP2 shards dim 0, padded to ceil(dim0 / W) rows on every rank."""
    if world == 1:
        return p.numel
    rows = -(-p.dim0 // world)
    return rows * (p.numel // p.dim0)


def compute_bytes(p: Param) -> int:
    """Bytes of a parameter as FSDP all-gathers it: param_dtype bf16 (FSDP2 needs one
    compute dtype per unit, so peft's fp32 adapters are gathered in bf16 too); 4-bit stays packed."""
    if p.kind.quantized:
        return packed_compute_bytes(p.numel)
    return 2 * p.numel


def reduce_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of the reduce-scatter: MixedPrecisionPolicy reduce_dtype fp32 under
    mixed precision, else bf16."""
    return 4 if setup.mixed_precision else 2


def unit_bytes(params: list[Param], world: int) -> dict[int | None, int]:
    """All-gathered (unsharded, padded) bytes of each FSDP unit: decoder layers and the root."""
    units: dict[int | None, int] = {}
    for p in params:
        units[p.layer] = units.get(p.layer, 0) + alloc(compute_bytes(p) * shard(p, world) * world // max(p.numel, 1))
    return units


def unit_grad_bytes(params: list[Param], layer: int | None, reduce: int) -> tuple[int, int]:
    """(unsharded grads in param_dtype, reduce-scatter input in reduce_dtype) of one unit."""
    n = sum(p.numel for p in params if p.layer == layer and p.trainable)
    return 2 * n, reduce * n


def root_and_layer_unit(units: dict[int | None, int]) -> tuple[int, int]:
    """(the root unit, the largest decoder-layer unit), all-gathered."""
    layer_unit = max((v for k, v in units.items() if k is not None), default=0)
    return units.get(None, 0), layer_unit


def forward_end_gathered(units: dict[int | None, int]) -> int:
    """At the loss and the final norm: the root unit is not resharded after forward, and
    the last unit's all-gather output is held by FSDP's AllGatherState until the next
    unshard. [cal: fsdp2 l32-1b]"""
    root, layer = root_and_layer_unit(units)
    return root + layer


def layer_forward_gathered(units: dict[int | None, int]) -> int:
    """Inside a layer's forward: this unit and the one prefetched, and the root."""
    root, layer = root_and_layer_unit(units)
    return root + 2 * layer


def layer_backward_gathered(units: dict[int | None, int], i: int) -> int:
    """In layer i's backward: this unit + the one it prefetches (the previous in forward
    order; layer 0 has none: FSDPParamGroup._backward_prefetch) + the root (kept
    unsharded). [notes 5]"""
    return (2 * units.get(i, 0) if i > 0 else units.get(i, 0)) + units.get(None, 0)
