"""GPU hardware profiles (data files in hardware_profiles/) and the --gpus parser."""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from vramplan import nvml
from vramplan.errors import VramplanError
from vramplan.units import GiB

_FLAG = "--gpus"


class HardwareProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    display_name: str
    nvml_names: list[str] = Field(default_factory=list)
    nominal_memory_gb: float = Field(description="memory the card is sold with, GiB of chips")
    memory_bytes: int = Field(description="what torch.cuda.mem_get_info() reports as total")
    memory_bytes_source: str = ""
    bf16_dense_tflops: float
    memory_bandwidth_gbps: float
    host_link: str
    host_link_gbps: float = Field(description="usable host<->GPU bandwidth, one direction, GB/s")
    nvlink_gbps: float | None = None
    cuda_context_bytes: int = Field(553648128, description="CUDA context outside torch's statistics")
    compute_capability: str = ""
    notes: str = ""

    @property
    def cublas_workspace_bytes(self) -> int:
        # torch's default CUBLAS_WORKSPACE_CONFIG: ":4096:8" (32 MiB) on sm90+, else ":4096:2:16:8" (~8 MiB)
        major = int(self.compute_capability.split(".")[0]) if self.compute_capability[:1].isdigit() else 9
        return 32 * 2**20 if major >= 9 else 8 * 2**20 + 128 * 2**10


class GpuSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    count: int
    profile: HardwareProfile
    label: str = Field(description="how the user spelled it, resolved")


def _profile_dir() -> Path:
    here = Path(__file__).parent
    for cand in (here / "_hardware_profiles", here.parent / "hardware_profiles"):
        if cand.is_dir():
            return cand
    raise VramplanError("hardware profiles are missing from this installation")


@lru_cache(maxsize=1)
def profiles() -> dict[str, HardwareProfile]:
    out = {}
    for path in sorted(_profile_dir().glob("*.json")):
        try:
            prof = HardwareProfile.model_validate_json(path.read_text())
        except ValueError as e:
            raise VramplanError(f"invalid hardware profile {path.name}: {e.errors()[0]['loc']} {e.errors()[0]['msg']}") from None
        out[prof.name] = prof
    return out


def _generic(size_gib: float) -> HardwareProfile:
    """A card sold as SIZE GB: the usable memory of the best-known card of that size (the
    most usable memory among the profiles sold with SIZE GB: for 24GB the RTX 4090, not
    the L4), else SIZE GiB less 1.5% (what the driver keeps back on the cards we know)."""
    same = [p for p in profiles().values() if abs(p.nominal_memory_gb - size_gib) < 0.5]
    if same:
        ref = max(same, key=lambda p: p.memory_bytes)
        return ref.model_copy(update={"name": f"{size_gib:g}GB", "display_name": f"{size_gib:g} GB GPU (as {ref.name})"})
    return HardwareProfile(name=f"{size_gib:g}GB", display_name=f"{size_gib:g} GB GPU", nominal_memory_gb=size_gib,
                           memory_bytes=int(size_gib * GiB * 0.985), memory_bytes_source="SIZE GiB - 1.5%",
                           bf16_dense_tflops=100.0, memory_bandwidth_gbps=1000.0, host_link="PCIe 4.0 x16",
                           host_link_gbps=25.0, cuda_context_bytes=419430400, compute_capability="8.0")


_SPEC = re.compile(r"^\s*(?:(\d+)\s*[x*]\s*)?(.+?)\s*$", re.I)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(gb|gib|g)$", re.I)


def parse_gpus(text: str) -> GpuSpec:
    """'2x24GB', 'rtx-4090', '2xrtx-3090', '8x80GB' -> GpuSpec."""
    m = _SPEC.match(text or "")
    if not m:
        raise VramplanError(f"cannot read {text!r}; use NxSIZE (2x24GB), a profile (rtx-4090) or Nxprofile", _FLAG)
    count = int(m.group(1) or 1)
    what = m.group(2).lower()
    if count < 1:
        raise VramplanError(f"GPU count must be positive in {text!r}", _FLAG)
    size = _SIZE.match(what)
    if size:
        gib = float(size.group(1))
        if gib <= 0:
            raise VramplanError(f"GPU memory must be positive in {text!r}", _FLAG)
        prof = _generic(gib)
    elif what in profiles():
        prof = profiles()[what]
    else:
        raise VramplanError(f"unknown GPU {what!r}; use NxSIZE (e.g. 2x24GB) or one of: {', '.join(profiles())}", _FLAG)
    return GpuSpec(count=count, profile=prof, label=f"{count}x{prof.name}")


def detect_gpus() -> GpuSpec | None:
    """The local GPUs via NVML, matched to a profile by name (else by memory size)."""
    found = nvml.first_device()
    if found is None:
        return None
    n, gpu = found
    name, total = gpu.name, gpu.total_bytes
    for prof in profiles().values():
        if name in prof.nvml_names:
            return GpuSpec(count=n, profile=prof, label=f"{n}x{prof.name}")
    prof = _generic(round(total / GiB))
    return GpuSpec(count=n, profile=prof.model_copy(update={"memory_bytes": int(total * 0.99), "display_name": name}),
                   label=f"{n}x{name}")
