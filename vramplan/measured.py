"""Measured reference steps: the JSON-lines schema shared by the calibration files,
``vramplan verify``'s output and the accuracy plot.

One line is one configuration run as docs/reference-step.md describes, with what
``torch.cuda`` reported. ``MeasuredCase.setup_fields()`` turns a line into the
TrainingSetup fields the estimate takes, so every consumer reads a case the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vramplan.errors import VramplanError
from vramplan.files import read_regular
from vramplan.limits import MAX_DATA_BYTES
from vramplan.units import MiB

# reference-step optimizer names -> Hugging Face TrainingArguments.optim names
OPTIM_TO_HF = {
    ("adamw", False): "adamw_torch",
    ("adamw8bit", False): "adamw_bnb_8bit",
    ("galore_adamw", False): "galore_adamw",
    ("galore_adamw8bit", False): "galore_adamw_8bit",
    ("galore_adamw", True): "galore_adamw_layerwise",
    ("galore_adamw8bit", True): "galore_adamw_8bit_layerwise",
}


class MeasuredCase(BaseModel):
    """One measured reference step (a line of tests/data/h100_dev.jsonl)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    model: str = Field(description="preset name / config the case was built from")
    layers: int | None = Field(None, description="--num-layers override, None for full depth")
    method: str
    param_dtype: str = Field(description="bf16, or fp32 (mixed precision)")
    autocast: bool = False
    optim: str = Field(description="adamw, adamw8bit, galore_adamw, galore_adamw8bit")
    lora_r: int = 16
    lora_targets: str = "all"
    quant: str | None = None
    galore_rank: int = 128
    layerwise: bool = False
    ckpt: bool = False
    batch: int
    seq: int
    fsdp_world: int = 0
    fsdp_offload: bool = False
    data_parallel: int = Field(0, description="DDP ranks (0: none); the estimate derives it from the GPU count")
    fsdp_version: int = 2
    fsdp_sharding: str = "full"
    # a measured peak is positive and finite (a log-log plot and the error ratio divide by it)
    peak_alloc_mb: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="torch.cuda.max_memory_allocated() over build + steps, MiB"
    )
    peak_reserved_mb: float | None = Field(None, gt=0, allow_inf_nan=False)
    mem_after_build_mb: float | None = Field(None, ge=0, allow_inf_nan=False)
    mem_after_step0_mb: float | None = Field(None, ge=0, allow_inf_nan=False)
    tokens_per_s: float | None = None
    measured_breakdown: dict[str, int] | None = Field(
        None,
        description="bytes per memory category (Category values) at the measured peak, where verify attributed them",
    )

    @property
    def peak_alloc_bytes(self) -> int | None:
        return None if self.peak_alloc_mb is None else int(self.peak_alloc_mb * MiB)

    @property
    def peak_reserved_bytes(self) -> int | None:
        return None if self.peak_reserved_mb is None else int(self.peak_reserved_mb * MiB)

    @property
    def world(self) -> int:
        return self.fsdp_world or self.data_parallel or 1

    def setup_fields(self) -> dict:
        """The TrainingSetup fields of this case (as `vramplan estimate` flags would give them)."""
        # verify's lines name the optimizer as TrainingArguments.optim does (optim_hf), the
        # reference harness's by its short family name (OPTIM_TO_HF)
        optim = (self.model_extra or {}).get("optim_hf") or OPTIM_TO_HF.get((self.optim, bool(self.layerwise)))
        if optim is None:
            allowed = ", ".join(sorted({o for o, _ in OPTIM_TO_HF}))
            raise VramplanError(
                f"case {self.name!r}: optim {self.optim!r} (layerwise={bool(self.layerwise)}) is not one of {allowed}",
                "FILE",
            )
        s: dict[str, object] = dict(
            method=self.method,
            precision="mixed" if self.param_dtype == "fp32" else "bf16",
            optim=optim,
            batch_size=self.batch,
            seq_len=self.seq,
            gradient_checkpointing=self.ckpt,
        )
        if self.method in ("lora", "qlora"):
            s.update(
                lora_r=self.lora_r,
                lora_dropout=0.05,
                lora_targets="all-linear" if self.lora_targets == "all" else "attention",
            )
        if self.quant:
            s["quant"] = self.quant
        if self.method == "galore":
            s["galore_rank"] = self.galore_rank
        if self.fsdp_world:
            s.update(fsdp=self.fsdp_world, cpu_offload=self.fsdp_offload)
            if self.fsdp_version != 2 or self.fsdp_sharding != "full":
                s.update(fsdp_version=self.fsdp_version, fsdp_sharding=self.fsdp_sharding)
        s.update((self.model_extra or {}).get("knobs") or {})  # --loss and the other stack knobs
        return s


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def load_cases(path: str | Path) -> list[MeasuredCase]:
    """Every line of a JSON-lines file of measured cases (blank lines skipped)."""
    data = read_regular(path, MAX_DATA_BYTES, "FILE")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise VramplanError(f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})", "FILE") from None
    cases = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            cases.append(MeasuredCase.model_validate(json.loads(line, parse_constant=_no_constant)))
        except (ValueError, RecursionError) as e:  # json.JSONDecodeError, pydantic.ValidationError, deep nesting
            first = e.errors()[0] if isinstance(e, ValidationError) else None
            why = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(e)
            raise VramplanError(f"{path}:{i} is not a measured case ({why})", "FILE") from None
    return cases
