"""Result models returned by the estimate (and compared against by verify)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vramplan.categories import ALLOCATED, Category


class PerGpu(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    peak_allocated_bytes: int = Field(description="predicted torch.cuda.max_memory_allocated() of one rank")
    peak_reserved_bytes: int = Field(description="predicted torch.cuda.max_memory_reserved() of one rank")
    total_bytes: int = Field(description="reserved + CUDA context: what nvidia-smi shows")
    breakdown: dict[Category, int] = Field(description="bytes per category at the peak")
    peak_phase: str = Field(description="where in the step the peak falls")
    phases: dict[str, int] = Field(default_factory=dict, description="allocated bytes at each modelled phase")

    @property
    def allocated_breakdown(self) -> dict[Category, int]:
        return {c: self.breakdown.get(c, 0) for c in ALLOCATED}


class Estimate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="what MODEL resolved to")
    setup: dict = Field(description="the TrainingSetup, as plain values")
    description: str
    gpu_name: str
    gpu_count: int
    gpu_memory_bytes: int = Field(description="usable memory of one GPU (mem_get_info total)")
    per_gpu: PerGpu
    host_ram_bytes: int = Field(description="host RAM the run needs (pinned offload buffers + process)")
    host_ram_available_bytes: int | None = Field(None, description="host RAM the verdict checked against (None: not checked)")
    fits_gpu: bool = Field(description="the per-GPU total fits the GPU's usable memory")
    fits_host: bool = Field(description="the host RAM need fits the available host RAM (True when unchecked)")
    fits: bool
    headroom_bytes: int = Field(description="GPU memory left at the peak (negative: short by that much)")
    notes: list[str] = Field(default_factory=list)

    def to_json_dict(self) -> dict:
        d = self.model_dump(mode="json")
        d["per_gpu"]["breakdown"] = {c.value: v for c, v in self.per_gpu.breakdown.items()}
        return d
