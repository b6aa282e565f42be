"""The persistent per-GPU bytes of a step: every parameter's storage (sharded under
FSDP), its gradient and its optimizer states, or, under FSDP2's CPUOffloadPolicy, the
pinned host bytes that hold them instead."""

from __future__ import annotations

from vramplan.categories import Category as C
from vramplan.memory.context import StaticBytes
from vramplan.memory.fsdp import shard_for
from vramplan.memory.optimizers import optimizer_state
from vramplan.memory.parameters import Param, grad_bytes, store
from vramplan.memory.precision import grad_scaler_state
from vramplan.memory.storage import alloc
from vramplan.setup import TrainingSetup


def _stored_on_rank(p: Param, setup: TrainingSetup, world: int, n: int) -> dict[C, int]:
    stored = store(p, setup, n)
    if p.kind.quantized and world > 1:
        # FSDP2 shards Parameters only. The packed weight is one, the quantization state
        # is not: bnb keeps quant_state on the module (Params4bit._quantize sets
        # module.quant_state), hqq keeps scale/zero in HQQLinear.meta (quantize.py: only
        # W_q becomes an nn.Parameter). So the state stays whole on every rank and on
        # the GPU under CPU offload. [notes 5; read from the sources, not yet measured]
        stored[C.QUANT_STATE] = store(p, setup)[C.QUANT_STATE]
    return stored


def static_bytes(params: list[Param], setup: TrainingSetup) -> StaticBytes:
    """Persistent bytes on the GPU (by category), plus grads, optimizer and host-pinned totals."""
    world, offload = setup.shard_world if setup.sharded else 1, setup.cpu_offload
    parts: dict[C, int] = {}
    grads = optim = paged = host = 0
    per_key: dict[tuple, tuple] = {}  # the same bytes for every parameter of one storage_key
    for p in params:
        key = p.storage_key
        if key not in per_key:
            n = shard_for(p, setup)
            per_key[key] = (
                _stored_on_rank(p, setup, world, n),
                alloc(grad_bytes(p, setup) * n),
                optimizer_state(p, setup, n),
            )
        stored, g, s = per_key[key]
        if offload:
            host += sum(v for c, v in stored.items() if c != C.QUANT_STATE) + g + s.device + s.paged + s.host
            if C.QUANT_STATE in stored:
                parts[C.QUANT_STATE] = parts.get(C.QUANT_STATE, 0) + stored[C.QUANT_STATE]
            continue
        for c, v in stored.items():
            parts[c] = parts.get(c, 0) + v
        grads += 0 if setup.steps_in_backward else g
        optim += s.device
        paged += s.paged
        host += s.host
    optim += grad_scaler_state(setup)  # fp16: the GradScaler's scale and growth tracker
    return StaticBytes(parts=parts, grads=grads, optimizer_states=optim, host_pinned=host, paged_states=paged)
