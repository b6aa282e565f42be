"""Before `verify` does any work: are its libraries installed, and what will a CPU run cost?

- The libraries the setup needs (peft, bitsandbytes, hqq, galore-torch: the `verify` extra)
  are looked up with importlib.util.find_spec, which imports nothing, so a missing one is
  said in a second, not after the model was built.
- On the CPU, a full-depth 8B takes many minutes and most of the RAM. The time is the
  throughput model's FLOPs of the step (vramplan.throughput.micro_flops, the same count the
  GPU estimate uses) over this CPU's measured bf16 matmul rate; the RAM is the estimate's
  peak allocated (the CPU trace holds the step in RAM) plus the Python process.
"""

from __future__ import annotations

import importlib.util
import time

from pydantic import BaseModel, ConfigDict

from vramplan.errors import VramplanError
from vramplan.model_spec import ModelSpec
from vramplan.setup import Method, Optim, Quant, TrainingSetup
from vramplan.units import GiB


def needed_libraries(setup: TrainingSetup) -> dict[str, str]:
    """{module: what needs it} for this setup, as vramplan.verify.build imports them."""
    need = {}
    if setup.lora_like:
        need["peft"] = f"--method {setup.method.value}"
    if setup.quant == Quant.NF4:
        need["bitsandbytes"] = "--quant nf4"
    if setup.quant == Quant.INT8:
        need["bitsandbytes"] = "--quant int8"
    if setup.quant == Quant.HQQ4:
        need["hqq"] = "--quant hqq4"
    if setup.optim == Optim.ADAMW_BNB_8BIT:
        need["bitsandbytes"] = "--optim adamw_bnb_8bit"
    if setup.method == Method.GALORE or setup.optim.is_galore:
        need["galore_torch"] = f"--optim {setup.optim.value}"
        if setup.optim.is_8bit:
            need["bitsandbytes"] = f"--optim {setup.optim.value}"
    return need


PIP_NAMES = {"galore_torch": "galore-torch"}


def require_libraries(setup: TrainingSetup) -> None:
    """One error naming every missing library of the `verify` extra, before any work."""
    missing = {m: what for m, what in needed_libraries(setup).items() if importlib.util.find_spec(m) is None}
    if missing:
        said = ", ".join(f"{PIP_NAMES.get(m, m)} (for {what})" for m, what in missing.items())
        raise VramplanError(f"verify needs {said}: pip install 'vramplan[verify]'", "--method")


class CpuCost(BaseModel):
    """What one CPU run of the step will take, estimated before it starts."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    seconds: float
    ram_bytes: int
    flops_per_s: float


def cpu_matmul_flops(size: int = 512, repeats: int = 8) -> float:
    """This CPU's bf16 matmul rate, FLOP/s: the best of `repeats` timed products (the first
    calls pay for the thread pool and kernel choice, a busy machine for other processes), a
    fraction of a second in all."""
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / max(best, 1e-9)


# The traced step's share of the bf16 matmul rate: the step runs under torch.profiler, through
# unfused CPU kernels, with a fp32 loss over the whole vocabulary. Measured on this project's
# 2-core build machine: llama-3.2-1b at 1 layer, 128 tokens, LoRA and QLoRA nf4, 6.3-9.4 s per
# step against 0.9-1.1 s of matmul FLOPs at the measured rate (0.10-0.17). Order of magnitude.
CPU_STEP_EFFICIENCY = 0.13


def cpu_cost(spec: ModelSpec, setup: TrainingSetup, steps: int, flops_per_s: float, peak_bytes: int) -> CpuCost:
    """Seconds for `steps` steps at `flops_per_s` x CPU_STEP_EFFICIENCY, and the RAM of the
    traced step."""
    from vramplan.estimate import PROCESS_HOST_BYTES
    from vramplan.throughput import micro_flops, shapes

    flops = steps * micro_flops(shapes(spec), setup)
    return CpuCost(
        seconds=flops / (flops_per_s * CPU_STEP_EFFICIENCY),
        ram_bytes=peak_bytes + PROCESS_HOST_BYTES,
        flops_per_s=flops_per_s,
    )


# Above this a CPU run is worth a word before it starts.
SLOW_CPU_RUN_S = 60.0


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def cpu_notice(spec: ModelSpec, full_layers: int, cost: CpuCost, small: CpuCost | None, ram: int | None) -> str:
    """The line said before a CPU run: its depth, time and RAM, and a cheaper check."""
    depth = (
        f"{spec.num_layers} of {full_layers} layers"
        if spec.num_layers < full_layers
        else f"full depth ({full_layers} layers)"
    )
    line = (
        f"on the CPU: {spec.name} at {depth} needs about {cost.ram_bytes / GiB:.1f} GiB of RAM"
        + (f" (this machine has {ram / GiB:.0f} GiB)" if ram else "")
        + f" and about {_duration(cost.seconds)} (this CPU: {cost.flops_per_s / 1e9:.0f} GFLOP/s in bf16 matmul)"
    )
    if small is not None and cost.seconds > SLOW_CPU_RUN_S:
        line += (
            f"; --num-layers 2 --seq-len 512 checks the layer structure in about {_duration(small.seconds)}, "
            "and `vramplan estimate` gives the full model"
        )
    return line
