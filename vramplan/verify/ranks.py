"""How many ranks a setup's engine runs on (shared by the launcher, the measurement and plan_ranks)."""

from __future__ import annotations

from vramplan.setup import Engine, TrainingSetup


def engine_world(setup: TrainingSetup) -> int:
    """The ranks the setup's engine runs on: --fsdp for FSDP1/2, --data-parallel for DDP and
    DeepSpeed, 1 for a single GPU (and FSDP offload on one GPU)."""
    if setup.sharded:
        return setup.fsdp
    if setup.engine in (Engine.DDP, Engine.DEEPSPEED):
        return setup.data_parallel
    return 1
