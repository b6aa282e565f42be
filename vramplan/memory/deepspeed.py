"""DeepSpeed ZeRO-1/2/3, with optimizer and parameter offload: what one GPU holds.

Modelled from source, not measured (deepspeed==0.19.8 runtime/zero/stage_1_and_2.py,
stage3.py, partition_parameters.py, offload_config.py; the bucket sizes at HF's "auto"
values, transformers==5.24.0 integrations/deepspeed.py:202-241). Notation: W the
data-parallel world (every GPU a rank), Pt the trainable elements, part(n) = ceil(n / W).

  bf16.enabled: the engine casts every parameter to bf16, frozen ones and peft's adapters
  too (runtime/engine.py:2079-2087), and the ZeRO optimizer keeps an fp32 master partition
  of the trainable ones (stage_1_and_2.py:560, stage3.py:1157-1172), handed to the optimizer
  as one flat tensor; its states are made for that partition.
  ZeRO-1/2: the bf16 weights stay whole on every GPU (only requires_grad parameters enter
  the optimizer, stage_1_and_2.py:428-434); trainable ones are flattened into one buffer
  padded to a multiple of 2W (:387, :441-446). Gradients: ZeRO-1 keeps each full bf16
  grad until reduce_gradients after backward (:2284-2292); ZeRO-2 copies each grad into the
  ipg bucket as autograd makes it and keeps only this rank's partition (:1445-1460). The
  ipg bucket (reduce_bucket_size elements, two with overlap_comm) is allocated at the first
  grad hook of each backward and released after it (setup_buckets :3256-3279,
  _release_ipg_buffers :924). The step flattens the averaged partition to fp32 (:3117).
  ZeRO-3: every parameter partitioned per tensor (partition_parameters.py:1690-1696),
  except those of at most stage3_param_persistence_threshold elements, whole after their
  first gather (:1292-1297); submodules gathered around their use, at most the running one
  plus stage3_prefetch_bucket_size elements (capped by stage3_max_live_parameters); one
  persistent ipg bucket and the flat grad partition buffer from init (stage3.py:778-791).
  offload_optimizer (cpu, pin_memory true by default, offload_config.py:67): fp32 master,
  bf16 staging and fp32 grad partition pinned on the host (stage_1_and_2.py:562-576,
  :937-940), DeepSpeedCPUAdam's states on the host; the GPU keeps a temp grad buffer of the
  largest parameter (:653-659). offload_param (ZeRO-3 only): the bf16 partitions on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.categories import Category as C
from vramplan.memory.context import EngineBuffers, StaticBytes
from vramplan.memory.optimizers import bnb8_state
from vramplan.memory.parameters import Param
from vramplan.memory.quantization import quantized_store
from vramplan.memory.storage import alloc
from vramplan.memory.types import ParamKind
from vramplan.setup import DeepSpeedStage, Optim, TrainingSetup

DS_NOTE = (
    "DeepSpeed {stage}: modelled from source, not measured (deepspeed==0.19.8 runtime/zero/stage_1_and_2.py, "
    'stage3.py; buckets at HF\'s "auto" sizes: reduce {reduce:,} elements{more})'
)
MAX_LIVE_PARAMETERS = 10**9  # runtime/zero/config.py:245 stage3_max_live_parameters
SUB_GROUP_SIZE = 10**9  # runtime/zero/config.py sub_group_size default (elements)


@dataclass(frozen=True)
class ZeroConfig:
    """The DeepSpeed config values that size GPU buffers, in elements (HF "auto" by default)."""

    reduce_bucket: int
    prefetch_bucket: int
    persistence_threshold: int
    overlap_comm: bool
    max_live: int = MAX_LIVE_PARAMETERS


def auto_config(hidden: int, stage: DeepSpeedStage, overlap_comm: bool | None = None) -> ZeroConfig:
    """HF's "auto": reduce_bucket_size = h*h; ZeRO-3 stage3_prefetch_bucket_size = 0.9*h*h and
    stage3_param_persistence_threshold = 10*h (integrations/deepspeed.py:202-241). overlap_comm
    left unset is DeepSpeed's default: on for stage 3 only (runtime/zero/config.py:384-386)."""
    overlap = stage == DeepSpeedStage.ZERO3 if overlap_comm is None else overlap_comm
    return ZeroConfig(
        reduce_bucket=hidden * hidden,
        prefetch_bucket=int(0.9 * hidden * hidden),
        persistence_threshold=10 * hidden,
        overlap_comm=overlap,
    )


def part(numel: int, world: int) -> int:
    return -(-numel // world)


def _stage3(setup: TrainingSetup) -> bool:
    return setup.deepspeed == DeepSpeedStage.ZERO3


def _trainable_partition(params: list[Param], setup: TrainingSetup) -> int:
    """Elements of this rank's slice of the trainable parameters (ZeRO-1/2: one flat group
    padded to 2W; ZeRO-3: per tensor)."""
    w = setup.data_parallel
    if _stage3(setup):
        return sum(part(p.numel, w) for p in params if p.trainable)
    total = sum(p.numel for p in params if p.trainable)
    return -(-total // (2 * w)) * 2


def _weight_bytes(p: Param, setup: TrainingSetup, cfg: ZeroConfig) -> dict[C, int]:
    """One parameter's bf16 bytes on the GPU (4-bit weights keep their packed storage)."""
    if p.kind.quantized:
        return quantized_store(p.kind, p.numel, p.dim0)
    cat = C.ADAPTERS if p.kind == ParamKind.LORA else C.WEIGHTS
    if not _stage3(setup) or p.numel <= cfg.persistence_threshold:
        return {cat: alloc(2 * p.numel)}
    return {cat: 0 if setup.offload_params else alloc(2 * part(p.numel, setup.data_parallel))}


def optimizer_bytes(n: int, setup: TrainingSetup) -> int:
    """fp32 master partition + the optimizer's states for it (one flat tensor)."""
    states = bnb8_state(n) if setup.optim.is_8bit else 2 * alloc(4 * n)
    return alloc(4 * n) + states


def _largest_trainable(params: list[Param]) -> int:
    return max((p.numel for p in params if p.trainable), default=0)


def static_bytes(params: list[Param], setup: TrainingSetup, cfg: ZeroConfig) -> StaticBytes:
    """Persistent bytes of one GPU under ZeRO, and the host bytes of its offload."""
    parts: dict[C, int] = {}
    for p in params:
        for c, v in _weight_bytes(p, setup, cfg).items():
            parts[c] = parts.get(c, 0) + v
    n = _trainable_partition(params, setup)
    grads = alloc(2 * n)
    host = 0
    if _stage3(setup) and setup.offload_params:
        host += sum(
            alloc(2 * part(p.numel, setup.data_parallel))
            for p in params
            if not p.kind.quantized and p.numel > cfg.persistence_threshold
        )
    if setup.offload_optimizer:
        # pinned fp32 master + bf16 staging + fp32 grad partition + temp grad buffer; CPU Adam states
        host += alloc(4 * n) + alloc(2 * n) + alloc(4 * n) + alloc(2 * _largest_trainable(params)) + 2 * alloc(4 * n)
        parts[C.COMM_BUFFERS] = alloc(2 * _largest_trainable(params))  # temp_grad_buffer_for_gpu_offload
        return StaticBytes(
            parts=_with_stage3_buffers(parts, setup, cfg, 0), grads=0, optimizer_states=0, host_pinned=host
        )
    parts = _with_stage3_buffers(parts, setup, cfg, grads)
    return StaticBytes(
        parts=parts, grads=0 if _stage3(setup) else grads, optimizer_states=optimizer_bytes(n, setup), host_pinned=host
    )


def _with_stage3_buffers(parts: dict[C, int], setup: TrainingSetup, cfg: ZeroConfig, grads: int) -> dict[C, int]:
    """ZeRO-3's buffers from init: one ipg bucket (bf16) and the flat grad partition."""
    if not _stage3(setup):
        return parts
    parts[C.COMM_BUFFERS] = parts.get(C.COMM_BUFFERS, 0) + alloc(2 * cfg.reduce_bucket)
    if grads:
        parts[C.GRADIENTS] = parts.get(C.GRADIENTS, 0) + grads
    return parts


def held_grad(p: Param, setup: TrainingSetup) -> int:
    """A trainable parameter's gradient bytes still held on the GPU after its layer's backward."""
    if not p.trainable or _stage3(setup):
        return 0  # ZeRO-3: in the persistent partition buffer (static_bytes)
    if setup.deepspeed == DeepSpeedStage.ZERO1:
        return alloc(2 * p.numel)
    return 0 if setup.offload_optimizer else alloc(2 * part(p.numel, setup.data_parallel))


def gathered_bytes(params: list[Param], cfg: ZeroConfig) -> int:
    """ZeRO-3: parameters gathered at once, the running submodule's plus the prefetched ones."""
    largest = max((p.numel for p in params if p.numel > cfg.persistence_threshold), default=0)
    return alloc(2 * min(cfg.max_live, largest + cfg.prefetch_bucket))


def engine_buffers(params: list[Param], setup: TrainingSetup, cfg: ZeroConfig) -> EngineBuffers:
    """ZeRO's buffers by measured phase: gathered partitions (ZeRO-3), the ipg bucket(s) and
    the grad of the running parameter before its copy (backward), the fp32 flat grad and the
    foreach temporaries of the step."""
    largest_grad = alloc(2 * _largest_trainable(params))
    n = _trainable_partition(params, setup)
    if _stage3(setup):  # ZeRO-3 steps one sub-group at a time (stage3.py step: per sub_group_size)
        n = min(n, SUB_GROUP_SIZE)
    step = 0 if setup.offload_optimizer else alloc(4 * n) + (alloc(4 * n) if setup.optim == Optim.ADAMW_TORCH else 0)
    if _stage3(setup):
        gathered = gathered_bytes(params, cfg)
        return EngineBuffers(forward=gathered, backward=gathered + largest_grad, step=step)
    buckets = alloc(2 * cfg.reduce_bucket) * (2 if cfg.overlap_comm else 1)
    return EngineBuffers(forward=0, backward=buckets + largest_grad, step=step)


def ds_note(setup: TrainingSetup, cfg: ZeroConfig) -> str:
    assert setup.deepspeed is not None
    more = (
        f", prefetch {cfg.prefetch_bucket:,}, persistence threshold {cfg.persistence_threshold:,}"
        if _stage3(setup)
        else ""
    ) + (", overlap_comm" if cfg.overlap_comm else "")
    return DS_NOTE.format(stage=setup.deepspeed.value, reduce=cfg.reduce_bucket, more=more)
