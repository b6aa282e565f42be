"""Result models returned by the estimate (and compared against by verify)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from vramplan.categories import ALLOCATED, Category
from vramplan.setup import TrainingSetup
from vramplan.units import GiB

if TYPE_CHECKING:
    import pandas as pd


class PerGpu(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    peak_allocated_bytes: int = Field(description="predicted torch.cuda.max_memory_allocated() of one rank")
    peak_reserved_bytes: int = Field(description="predicted torch.cuda.max_memory_reserved() of one rank")
    total_bytes: int = Field(description="reserved + CUDA context: what nvidia-smi shows")
    breakdown: dict[Category, int] = Field(description="bytes per category at the peak")
    peak_phase: str = Field(description="where in the step the peak falls")
    phases: dict[str, int] = Field(default_factory=dict, description="allocated bytes at each modelled phase")
    phase_measured: dict[str, str] = Field(
        default_factory=dict,
        description="the measured phase (build, forward, backward, optimizer) each modelled phase falls in",
    )


class Estimate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="what MODEL resolved to")
    setup: TrainingSetup = Field(description="the configuration estimated")
    description: str
    gpu_name: str
    gpu_count: int
    gpu_memory_bytes: int = Field(description="usable memory of one GPU (mem_get_info total)")
    per_gpu: PerGpu
    host_ram_bytes: int = Field(description="host RAM the run needs (pinned offload buffers + process)")
    host_ram_available_bytes: int | None = Field(
        None, description="host RAM the verdict checked against (None: not checked)"
    )
    fits_gpu: bool = Field(description="the per-GPU total fits the GPU's usable memory")
    fits_host: bool = Field(description="the host RAM need fits the available host RAM (True when unchecked)")
    fits: bool
    headroom_bytes: int = Field(description="GPU memory left at the peak (negative: short by that much)")
    notes: list[str] = Field(default_factory=list)

    def to_json_dict(self) -> dict:
        d = self.model_dump(mode="json")
        d["per_gpu"]["breakdown"] = {c.value: v for c, v in self.per_gpu.breakdown.items()}
        return d

    def to_dict(self) -> dict:
        """Plain Python values (str, int, bool, list, dict): the ``--format json`` contract."""
        return self.to_json_dict()

    def to_json(self, indent: int | None = 1) -> str:
        """The same as ``vramplan estimate --method ... --format json`` prints."""
        return json.dumps(self.to_json_dict(), indent=indent)

    def to_frame(self) -> pd.DataFrame:
        """The per-GPU breakdown, one row per category (in Category order, zeros kept), with
        columns category, bytes, gib, share (of the per-GPU total) and allocated (whether
        torch.cuda.max_memory_allocated() counts it). Needs pandas."""
        import pandas as pd

        total = self.per_gpu.total_bytes or 1
        rows = [
            {
                "category": c.value,
                "bytes": self.per_gpu.breakdown.get(c, 0),
                "gib": self.per_gpu.breakdown.get(c, 0) / GiB,
                "share": self.per_gpu.breakdown.get(c, 0) / total,
                "allocated": c in ALLOCATED,
            }
            for c in Category
        ]
        return pd.DataFrame(rows).astype({"bytes": "int64"})
