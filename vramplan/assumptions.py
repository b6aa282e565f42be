"""What a comparison or a plan assumed and did not ask: said in its output, one phrase each.

The numbers depend on the micro-batch x sequence, the training stack, the host RAM and how
GPUs outside an FSDP group run; a user who reads a table without them reads the wrong table.
"""

from __future__ import annotations

from vramplan.setup import Stack, TrainingSetup
from vramplan.units import GiB

STACK_MEANING = {Stack.PLAIN: "transformers + peft in a plain loop, the reference step"}


def stack_phrase(stack: Stack) -> str:
    meaning = STACK_MEANING.get(stack, "its bundled defaults")
    return f"stack {stack.value} ({meaning})"


def host_ram_phrase(host_ram: int | None, given: bool, gpus_named: bool) -> str:
    """Where the host RAM of the verdict comes from."""
    if host_ram is None:
        return "host RAM not checked (this machine's could not be read; --host-ram)"
    size = f"host RAM {host_ram / GiB:.0f} GB"
    if given:
        return f"{size} per node (--host-ram)"
    if gpus_named:
        return f"{size} per node assumed (--host-ram)"
    return f"{size} per node: this machine's (--host-ram)"


def data_parallel_phrase(gpu_count: int, setup: TrainingSetup | None = None) -> str:
    """How the GPUs share the model (the per-GPU memory is that of one rank): with a setup that
    shards, its FSDP groups or DeepSpeed stage; else the DDP default."""
    if gpu_count < 2:
        return "one GPU"
    if setup is not None and setup.deepspeed is not None:
        return f"{gpu_count} GPUs: DeepSpeed ZeRO-{setup.deepspeed.value[-1]} data parallel, one rank each"
    group = setup.shard_world if setup is not None and setup.sharded else 0
    if group == 1:
        return f"{gpu_count} GPUs: FSDP without sharding, each GPU a whole replica"
    if group >= gpu_count:
        return f"{gpu_count} GPUs: one FSDP group sharding the model over all of them"
    if group:
        return f"{gpu_count} GPUs: FSDP groups of {group}, the model replicated across {gpu_count // group} of them"
    return (
        f"{gpu_count} GPUs: without FSDP or DeepSpeed they are DDP replicas (each holds the whole model "
        "and its gradient buckets: gradient_as_bucket_view=False, torch's and accelerate's default, so a "
        "second copy of the trainable gradients; memory/ddp.py); with FSDP the GPUs outside one group "
        "replicate it"
    )


def batch_phrase(batch_size: int, seq_len: int, rows: int | None = None, completion: int | None = None) -> str:
    """The micro-batch as assumed; `rows` when they differ from the examples (DPO: 2 per pair);
    `completion`: GRPO's rows are prompt + completion."""
    if completion is not None:
        plural = "s" if batch_size != 1 else ""
        return (
            f"micro-batch {batch_size} completion{plural} x {seq_len} tokens ({seq_len - completion} prompt + "
            f"{completion} completion) per GPU (--batch-size, --seq-len, --completion-len)"
        )
    if rows is not None and rows != batch_size:
        return (
            f"micro-batch {batch_size} pairs ({rows} rows: chosen and rejected) x {seq_len} tokens per GPU "
            "(--batch-size, --seq-len)"
        )
    return f"micro-batch {batch_size} x {seq_len} tokens per GPU (--batch-size, --seq-len)"
