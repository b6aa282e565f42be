"""Process isolation: one case per fresh process (clean allocator and CUDA context), and
torchrun for FSDP over N real local GPUs (one process per GPU, every rank reported)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from vramplan.errors import VramplanError
from vramplan.setup import TrainingSetup
from vramplan.verify.results import Measurement


class CaseRequest(BaseModel):
    """What a worker process runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    setup: TrainingSetup
    num_layers: int | None = None
    steps: int = Field(3, ge=1)
    device: str = "cuda"
    memory_limit_bytes: int | None = Field(
        None,
        gt=0,
        description="cap on what the caching allocator may hold, set with "
        "torch.cuda.set_per_process_memory_fraction (None: the whole device)",
    )


def worker_command(req_path: Path, out_dir: Path, nproc: int = 1) -> list[str]:
    base = ["-m", "vramplan.verify.worker", str(req_path), str(out_dir)]
    if nproc <= 1:
        return [sys.executable, *base]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *base]


def run_isolated(req: CaseRequest, nproc: int = 1, timeout: float | None = None) -> list[Measurement]:
    """Run `req` in a fresh process (or `nproc` torchrun ranks); one Measurement per rank."""
    with tempfile.TemporaryDirectory(prefix="vramplan-verify-") as tmp:
        tmp_path = Path(tmp)
        req_path = tmp_path / "request.json"
        req_path.write_text(req.model_dump_json())
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            proc = subprocess.run(
                worker_command(req_path, tmp_path, nproc), capture_output=True, text=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired:
            raise VramplanError(f"the case did not finish within {timeout:.0f} s") from None
        outs = sorted(tmp_path.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        if not outs:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
            raise VramplanError(f"the worker exited with {proc.returncode} and no result: " + " | ".join(tail))
        return [Measurement.model_validate_json(p.read_text()) for p in outs]


def init_distributed(device: str) -> str:
    """Under torchrun: join the real process group; returns this rank's device."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local}"))
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return device


def limit_allocator(device: str, limit: int) -> None:
    """A smaller GPU on a large one: torch.cuda.set_per_process_memory_fraction(limit / total),
    so the caching allocator refuses to hold more than `limit` bytes (allowed_memory_maximum
    in CUDACachingAllocator.cpp: past it, a cudaMalloc is treated as failed, the cached blocks
    are released and the request retried, then OutOfMemoryError). The CUDA context is outside
    the cap."""
    import torch

    if not device.startswith("cuda"):
        raise VramplanError("a memory limit needs a CUDA device", "memory_limit_bytes")
    dev = torch.device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(limit / total, 1.0), dev)


def worker_main(argv: list[str]) -> int:
    req_path, out_dir = Path(argv[0]), Path(argv[1])
    req = CaseRequest.model_validate_json(req_path.read_text())
    device = init_distributed(req.device)
    from vramplan.verify.measure import run_case

    if req.memory_limit_bytes is not None:
        limit_allocator(device, req.memory_limit_bytes)
    m = run_case(req.model, req.setup, device=device, num_layers=req.num_layers, steps=req.steps)
    if req.memory_limit_bytes is not None:
        m = m.model_copy(update={"memory_limit_bytes": req.memory_limit_bytes})
    tmp = out_dir / f".rank{m.rank}.json.tmp"
    tmp.write_text(m.model_dump_json())
    tmp.replace(out_dir / f"rank{m.rank}.json")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
