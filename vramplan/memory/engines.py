"""Which engine holds the model (TrainingSetup.engine) and what it adds per GPU: DDP's
buckets (ddp.py), DeepSpeed ZeRO's partitions and buffers (deepspeed.py); FSDP's sharding
lives in fsdp.py and persistent.py."""

from __future__ import annotations

from collections.abc import Callable

from vramplan.categories import Category as C
from vramplan.memory import ddp, deepspeed
from vramplan.memory.accelerate import accelerate_fsdp2, accelerate_note
from vramplan.memory.context import EngineBuffers, StaticBytes
from vramplan.memory.parameters import Param
from vramplan.model_spec import ModelSpec
from vramplan.setup import Engine, FsdpSharding, Method, Quant, QuantStorage, TrainingSetup
from vramplan.units import GiB


def zero_config(spec: ModelSpec, setup: TrainingSetup) -> deepspeed.ZeroConfig:
    assert setup.deepspeed is not None
    return deepspeed.auto_config(spec.hidden, setup.deepspeed)


def engine_static(
    spec: ModelSpec,
    params: list[Param],
    setup: TrainingSetup,
    one_gpu: Callable[[list[Param], TrainingSetup], StaticBytes],
) -> tuple[StaticBytes, EngineBuffers]:
    """Persistent bytes of one GPU under the setup's engine, and the engine's per-phase buffers.
    `one_gpu` is persistent.static_bytes (one GPU, or FSDP's shards)."""
    engine = setup.engine
    if engine == Engine.DEEPSPEED:
        cfg = zero_config(spec, setup)
        return deepspeed.static_bytes(params, setup, cfg), deepspeed.engine_buffers(params, setup, cfg)
    static = one_gpu(params, setup)
    if engine == Engine.DDP:
        parts = dict(static.parts)
        parts[C.COMM_BUFFERS] = ddp.bucket_bytes(params, setup)
        static = StaticBytes(
            parts=parts, grads=static.grads, optimizer_states=static.optimizer_states, host_pinned=static.host_pinned
        )
    return static, EngineBuffers()


def engine_notes(spec: ModelSpec, setup: TrainingSetup, static: StaticBytes) -> list[str]:
    """The line saying which engine the estimate is for, when it is not one plain GPU, and what
    accelerate's FSDP preparation changed (memory/accelerate.py)."""
    return (
        _engine_line(spec, setup, static)
        + accelerate_note(setup)
        + _embedding_units_note(setup)
        + _packed_uint8_note(setup)
    )


def _packed_uint8_note(setup: TrainingSetup) -> list[str]:
    """fully_shard itself (not accelerate, which sets uint8 4-bit weights aside: memory/accelerate.py)
    over a uint8 packed weight: torch 2.11 raises, 2.13 shards it."""
    uint8 = (setup.quant == Quant.NF4 and setup.quant_storage_dtype == QuantStorage.UINT8) or setup.quant == Quant.HQQ4
    if not (uint8 and setup.engine == Engine.FSDP2 and setup.method == Method.QLORA) or accelerate_fsdp2(setup):
        return []
    return [
        "FSDP2 over uint8 4-bit weights needs torch>=2.13: torch 2.11's fully_shard makes every shard a Parameter "
        "that requires grad and raises 'only Tensors of floating point dtype can require gradients' (measured on "
        "an H200, tests/data/h200_lease); --quant-storage bf16 (nf4) shards on any version"
    ]


def _embedding_units_note(setup: TrainingSetup) -> list[str]:
    """--fsdp-embedding-units (memory/fsdp.py separate_head_units): say it applied and what it rests on."""
    if not (setup.fsdp_embedding_units and setup.sharded and setup.fsdp_version == 2):
        return []
    return [
        "--fsdp-embedding-units: the embedding and lm_head are FSDP2 units of their own, lm_head gathered "
        "only at the loss (torchtune's custom_sharded_layers); modelled from source, not measured "
        "(torchtune==0.6.1 training/_distributed.py:519-568)"
    ]


def _engine_line(spec: ModelSpec, setup: TrainingSetup, static: StaticBytes) -> list[str]:
    engine = setup.engine
    if engine == Engine.DDP:
        buckets = static.parts.get(C.COMM_BUFFERS, 0)
        return [
            f"{setup.data_parallel} GPUs: DDP, each holds the whole model plus {buckets / GiB:.2f} GiB of "
            "gradient buckets (a second copy of the trainable grads: gradient_as_bucket_view=False, the "
            "torch/accelerate/HF default; torch==2.13.0 nn/parallel/distributed.py, c10d/reducer.cpp)"
        ]
    if engine == Engine.DEEPSPEED:
        return [f"{setup.data_parallel} GPU(s): " + deepspeed.ds_note(setup, zero_config(spec, setup))]
    if engine == Engine.FSDP1:
        prefetch = "BACKWARD_PRE" if setup.stack.value in ("plain", "fsdp-qlora") else "no backward prefetch"
        return [
            f"FSDP1 (FullyShardedDataParallel, {setup.fsdp_sharding.value}): flat parameters per unit, "
            f"{prefetch}, each LoRA Linear its own unit (torch==2.13.0 distributed/fsdp/_flat_param.py)"
        ]
    if setup.sharded and setup.fsdp_sharding == FsdpSharding.HYBRID:
        return [
            f"hybrid sharding: shards over the {setup.shard_world} GPUs of a node, replicated over {setup.nodes} nodes"
        ]
    return []


def step_transient_applies(setup: TrainingSetup) -> bool:
    """Whether the optimizer module's step temporaries apply (DeepSpeed's are its own)."""
    return setup.engine != Engine.DEEPSPEED
