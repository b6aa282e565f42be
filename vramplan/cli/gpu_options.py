"""The GPU options estimate, plan and plot share: --gpus is per command; these three refine it.

Kept apart from cli/common.py (the reference step's options): they describe the hardware,
not the training step, and go to vramplan.estimate.resolve_gpus unchanged.
"""

from __future__ import annotations

import argparse

from vramplan.hardware import GpuSpec


def add_gpu_options(p: argparse.ArgumentParser) -> None:
    """--gpu-tflops, --gpu-bandwidth, --reserve (hardware.with_overrides applies them)."""
    p.add_argument(
        "--gpu-tflops",
        help="dense tensor TFLOP/s of one card for the step (bf16, or fp16 on a card without bf16): "
        "a card without a profile, or your own clocks; replaces the profile's",
    )
    p.add_argument("--gpu-bandwidth", help="memory bandwidth of one card in GB/s; replaces the profile's")
    p.add_argument(
        "--reserve",
        help="memory already in use on each card (a desktop, another job), e.g. 1GB; subtracted from the usable "
        "memory (default: what NVML reports in use on detected GPUs, 0 for --gpus)",
    )


def gpu_overrides(args: argparse.Namespace) -> dict:
    """The keyword arguments of resolve_gpus from the parsed options."""
    return {"gpu_tflops": args.gpu_tflops, "gpu_bandwidth": args.gpu_bandwidth, "reserve": args.reserve}


def resolve_from_args(args: argparse.Namespace, gpus: str | None) -> GpuSpec:
    from vramplan.estimate import resolve_gpus

    return resolve_gpus(gpus, **gpu_overrides(args))
