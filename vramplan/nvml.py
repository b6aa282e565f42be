"""NVML (nvidia-ml-py's ``pynvml``): the one module that talks to it.

Used by GPU detection (vramplan.hardware), ``vramplan gpus`` and verify's probe. Every
call opens and closes its own NVML session, so a machine without a driver or without the
library answers "no GPU" (or None) instead of raising.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


class NvmlUnavailable(Exception):
    """NVML could not be initialised: no driver, no library, or no permission."""


@dataclass(frozen=True)
class NvmlDevice:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int


@contextmanager
def session() -> Iterator[Any]:
    """The pynvml module between nvmlInit and nvmlShutdown; NvmlUnavailable if it cannot start."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no driver or no library (pynvml raises its own NVMLError types)
        raise NvmlUnavailable(f"{type(e).__name__}: {e}") from None
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


def _text(v: bytes | str) -> str:
    # nvidia-ml-py < 11.515 returns bytes, later versions str
    return v.decode() if isinstance(v, bytes) else str(v)


def _memory_info(nvml: Any, handle: Any) -> Any:
    """Memory info v2 where the driver has it (R510+): its `used` leaves out the driver's own
    reservation, so it is what other processes (a desktop, another job) hold; else v1."""
    try:
        return nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    except Exception:  # noqa: BLE001 - older pynvml or driver
        return nvml.nvmlDeviceGetMemoryInfo(handle)


def devices() -> tuple[list[NvmlDevice], str]:
    """Every GPU NVML sees, by NVML index, and the driver version. Raises NvmlUnavailable."""
    with session() as nvml:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        out = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = _memory_info(nvml, handle)
            out.append(
                NvmlDevice(
                    index=i,
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    total_bytes=int(mem.total),
                    free_bytes=int(mem.free),
                    used_bytes=int(mem.used),
                )
            )
        return out, driver


def first_device() -> tuple[int, NvmlDevice] | None:
    """(GPU count, GPU 0), or None without NVML or without a GPU."""
    try:
        with session() as nvml:
            count = nvml.nvmlDeviceGetCount()
            if count == 0:
                return None
            handle = nvml.nvmlDeviceGetHandleByIndex(0)
            mem = _memory_info(nvml, handle)
            return count, NvmlDevice(
                index=0,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                total_bytes=int(mem.total),
                free_bytes=int(mem.free),
                used_bytes=int(mem.used),
            )
    except NvmlUnavailable:
        return None


def _handle(nvml: Any, cuda_index: int) -> Any:
    # CUDA_VISIBLE_DEVICES renumbers devices; NVML does not
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if cuda_index < len(ids):
            ident = ids[cuda_index]
            if ident.isdigit():
                return nvml.nvmlDeviceGetHandleByIndex(int(ident))
            return nvml.nvmlDeviceGetHandleByUUID(ident)
    return nvml.nvmlDeviceGetHandleByIndex(cuda_index)


def process_used_bytes(cuda_index: int, pid: int | None = None) -> int | None:
    """Device memory one process holds on CUDA device ``cuda_index`` per NVML (reserved +
    CUDA context + library workspaces outside torch); None when NVML cannot see processes
    (containers without the host PID namespace) or is not there."""
    pid = os.getpid() if pid is None else pid
    try:
        with session() as nvml:
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(_handle(nvml, cuda_index)):
                if proc.pid == pid and proc.usedGpuMemory:
                    return int(proc.usedGpuMemory)
            return None
    except Exception:  # noqa: BLE001 - NvmlUnavailable, or an NVMLError querying processes: not measurable
        return None
