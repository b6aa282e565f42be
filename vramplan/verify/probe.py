"""Where memory numbers come from: torch.cuda's allocator statistics and NVML on a GPU;
on CPU nothing (None = unavailable), so the harness still runs and is tested there."""

from __future__ import annotations

import gc

from vramplan import nvml


class Probe:
    """CPU: no allocator statistics. Subclassed for CUDA."""

    available = False

    def sync(self) -> None:
        pass

    def fresh(self) -> None:
        """Protocol: gc, empty the cache, reset the peaks before a case."""
        gc.collect()

    def reset_peak(self) -> None:
        pass

    def allocated(self) -> int | None:
        return None

    def reserved(self) -> int | None:
        return None

    def peak_allocated(self) -> int | None:
        return None

    def peak_reserved(self) -> int | None:
        return None

    def nvml_used(self) -> int | None:
        return None

    def segments(self) -> list[list[float]] | None:
        return None

    def device_name(self) -> str:
        import platform

        return platform.processor() or "cpu"


class CudaProbe(Probe):
    available = True

    def __init__(self, index: int = 0):
        import torch

        self.torch = torch
        self.index = index

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.index)

    def fresh(self) -> None:
        gc.collect()
        self.torch.cuda.synchronize(self.index)
        self.torch.cuda.empty_cache()
        self.torch.cuda.reset_peak_memory_stats(self.index)

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.index)

    def allocated(self) -> int:
        return int(self.torch.cuda.memory_allocated(self.index))

    def reserved(self) -> int:
        return int(self.torch.cuda.memory_reserved(self.index))

    def peak_allocated(self) -> int:
        return int(self.torch.cuda.max_memory_allocated(self.index))

    def peak_reserved(self) -> int:
        return int(self.torch.cuda.max_memory_reserved(self.index))

    def device_name(self) -> str:
        return self.torch.cuda.get_device_name(self.index)

    def nvml_used(self) -> int | None:
        """Device memory this process holds per NVML: reserved + CUDA context + library
        workspaces outside torch. None when NVML cannot see processes (containers without
        the host PID namespace)."""
        return nvml.process_used_bytes(self.index)

    def segments(self) -> list[list[float]] | None:
        """The caching allocator's large segments now (torch.cuda.memory_snapshot), as
        [MiB reserved, MiB allocated in it, stream, count] per (size, stream), largest first,
        with the small pool's 2 MiB segments in one row: which requests made the reserved
        memory, and how much of each segment the live tensors still use."""
        try:
            snapshot = self.torch.cuda.memory_snapshot()
        except RuntimeError:  # a diagnostic: never the reason a case fails
            return None
        rows: dict[tuple[float, int, bool], list[float]] = {}
        for seg in snapshot:
            if seg.get("device", self.index) != self.index:
                continue
            small = seg.get("segment_type") == "small"
            key = (0.0 if small else seg["total_size"] / 2**20, int(seg.get("stream", 0)), small)
            row = rows.setdefault(key, [0.0, 0.0, float(key[1]), 0.0])
            row[0] += seg["total_size"] / 2**20
            row[1] += seg["allocated_size"] / 2**20
            row[3] += 1
        return [[round(v, 1) for v in r] for r in sorted(rows.values(), key=lambda r: -r[0] / r[3])]


def make_probe(device: str) -> Probe:
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return CudaProbe(index)
    return Probe()
