"""Typed results of a verify run: per-phase snapshots, one measurement, the comparison.

Integer bytes everywhere; ``None`` means "not measurable here" (e.g. allocator
statistics on CPU), never zero.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vramplan.categories import Category
from vramplan.measured import OPTIM_TO_HF, MeasuredCase
from vramplan.setup import Precision, TrainingSetup
from vramplan.units import MiB

PHASES = ("build", "forward", "backward", "optimizer")
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class PhaseSnapshot(BaseModel):
    """Memory at the end of one phase, and the peak inside it (peaks are reset per phase)."""

    model_config = _FROZEN
    phase: str = Field(description="build, forward, backward or optimizer (step + zero_grad)")
    step: int | None = Field(None, description="step index; None for build")
    allocated_bytes: int | None = Field(None, description="torch.cuda.memory_allocated() at the end of the phase")
    reserved_bytes: int | None = Field(None, description="torch.cuda.memory_reserved() at the end of the phase")
    peak_allocated_bytes: int | None = Field(None, description="max_memory_allocated() within the phase")
    peak_reserved_bytes: int | None = Field(None, description="max_memory_reserved() within the phase")
    seconds: float = 0.0


class OomInfo(BaseModel):
    """Where a case ran out of memory: a result, not a crash."""

    model_config = _FROZEN
    phase: str
    step: int | None = None
    allocated_bytes: int | None = Field(None, description="allocated when the error was raised")
    reserved_bytes: int | None = None
    peak_allocated_bytes: int | None = Field(None, description="peak over the case up to the error")
    message: str = ""


class Measurement(BaseModel):
    """One reference step measured on one rank."""

    model_config = _FROZEN
    model: str = Field(description="what MODEL resolved to")
    num_layers: int = Field(description="decoder layers actually built")
    full_layers: int = Field(description="decoder layers of the full model")
    setup: TrainingSetup
    device: str = Field(description="cuda or cpu")
    device_name: str = ""
    rank: int = 0
    world: int = 1
    simulated: bool = Field(False, description="DDP/FSDP rank 0 of N on a fake process group (collectives do nothing)")
    steps: int
    fits: bool = Field(description="build and every step ran without out-of-memory")
    oom: OomInfo | None = None
    phases: list[PhaseSnapshot] = Field(default_factory=list)
    peak_allocated_bytes: int | None = Field(None, description="max_memory_allocated() over build + steps")
    peak_reserved_bytes: int | None = None
    peak_phase: str | None = Field(None, description="phase (and step) where the allocated peak fell")
    after_build_bytes: int | None = None
    after_step0_bytes: int | None = None
    step_peaks_bytes: list[int] = Field(default_factory=list, description="running peak after each step")
    breakdown: dict[Category, int | None] = Field(default_factory=dict, description="bytes per category at the peak")
    nvml_used_bytes: int | None = Field(
        None, description="device memory this process uses per NVML (incl. CUDA context)"
    )
    step_s: list[float] = Field(default_factory=list)
    tokens_per_s: float | None = None
    params_total: int = 0
    params_trainable: int = 0
    notes: list[str] = Field(default_factory=list)
    versions: dict[str, str] = Field(default_factory=dict)
    extrapolated_from: list[int] = Field(
        default_factory=list, description="depths this full-depth figure was fitted from (empty: measured)"
    )
    memory_limit_bytes: int | None = Field(
        None, description="set_per_process_memory_fraction's cap on the caching allocator (None: uncapped)"
    )
    segments_mib: list[list[float]] | None = Field(
        None,
        description="the allocator's segments after the last step: [MiB, MiB allocated, stream, count] "
        "per (segment size, stream), the small pool in one row (CudaProbe.segments)",
    )

    def case_name(self) -> str:
        s = self.setup
        parts = [self.model.rsplit("/", 1)[-1].removesuffix(".json"), s.method.value]
        if s.quant:
            parts.append(s.quant.value)
        if s.lora_like:
            parts.append(f"r{s.lora_r}")
        if s.method.value == "galore":
            parts.append(f"g{s.galore_rank}")
        parts += [s.precision.value, s.optim.value]
        if s.gradient_checkpointing:
            parts.append("ckpt")
        if s.fsdp > 1:
            parts.append(f"fsdp{s.fsdp}" + ("off" if s.cpu_offload else ""))
        parts.append(f"b{s.batch_size}s{s.seq_len}")
        if self.num_layers != self.full_layers:
            parts.append(f"L{self.num_layers}")
        return "_".join(parts)

    def to_measured_case(self, name: str | None = None) -> MeasuredCase:
        """The JSON-lines record of tests/data/*.jsonl (extra fields allowed, kept)."""
        s = self.setup
        optim, layerwise = _reference_optim(s)

        def mb(b):
            return None if b is None else b / MiB

        fields = dict(
            name=name or self.case_name(),
            model=self.model,
            layers=None if self.num_layers == self.full_layers else self.num_layers,
            method=s.method.value,
            param_dtype="fp32" if s.precision == Precision.MIXED else "bf16",
            autocast=s.autocast,
            optim=optim,
            lora_r=s.lora_r,
            lora_targets="all" if s.lora_targets.value == "all-linear" else "attention",
            quant=s.quant.value if s.quant else None,
            galore_rank=s.galore_rank,
            layerwise=layerwise,
            ckpt=s.gradient_checkpointing,
            batch=s.batch_size,
            seq=s.seq_len,
            fsdp_world=s.fsdp if s.fsdp > 1 else 0,
            fsdp_offload=s.cpu_offload,
            peak_alloc_mb=mb(self.peak_allocated_bytes),
            peak_reserved_mb=mb(self.peak_reserved_bytes),
            mem_after_build_mb=mb(self.after_build_bytes),
            mem_after_step0_mb=mb(self.after_step0_bytes),
            tokens_per_s=self.tokens_per_s,
            # extra fields (MeasuredCase allows them): everything else a consumer may want
            steps=self.steps,
            params_total=self.params_total,
            params_trainable=self.params_trainable,
            step_peaks_mb=[round(b / MiB, 1) for b in self.step_peaks_bytes],
            step_s=self.step_s,
            fits=self.fits,
            oom_phase=self.oom.phase if self.oom else None,
            rank=self.rank,
            simulated=self.simulated,
            device_name=self.device_name,
            optim_hf=s.optim.value,
            nvml_used_mb=mb(self.nvml_used_bytes),
            lora_dropout=s.lora_dropout,
            measured_breakdown={c.value: int(v) for c, v in self.breakdown.items() if v is not None},
            versions=self.versions,
        )
        fields.update(self._optional_record_fields())
        return MeasuredCase.model_validate(fields)

    def _optional_record_fields(self) -> dict:
        """The record's fields written only when set: extrapolation source, knobs, engines."""
        s = self.setup
        fields: dict = {}
        if self.extrapolated_from:
            fields["extrapolated_from"] = self.extrapolated_from
        if self.memory_limit_bytes is not None:
            fields["memory_limit_mb"] = self.memory_limit_bytes / MiB
        if self.segments_mib is not None:
            fields["segments_mib"] = self.segments_mib
        if self.oom is not None:  # which step ran out, and what the allocator held then (a capped rung's edge)
            fields["oom_step"] = self.oom.step
            fields["oom_reserved_mb"] = None if self.oom.reserved_bytes is None else self.oom.reserved_bytes / MiB
        knobs = stack_knobs(s)
        if knobs:  # the issue-13 knobs (--loss, ...), read back by MeasuredCase.setup_fields
            fields["knobs"] = knobs
        # the engines (issue 15), written only where they differ from the reference step's
        if s.data_parallel > 1:
            fields["data_parallel"] = s.data_parallel
        if s.sharded and s.fsdp_version != 2:
            fields["fsdp_version"] = s.fsdp_version
        if s.sharded and s.fsdp_sharding.value != "full":
            fields["fsdp_sharding"] = s.fsdp_sharding.value
        return fields


def _reference_optim(setup: TrainingSetup) -> tuple[str, bool]:
    """HF optimizer name -> (reference-step name, layerwise); adamw_torch_fused keeps its HF name."""
    for (ref, layerwise), hf in OPTIM_TO_HF.items():
        if hf == setup.optim.value:
            return ref, layerwise
    return setup.optim.value, False


class Extrapolation(BaseModel):
    """A full-depth figure from truncated depths: value(L) = fixed + per_layer * L, least squares."""

    model_config = _FROZEN
    depths: list[int]
    full_layers: int
    quantity: str
    values: list[int]
    fixed_bytes: float
    per_layer_bytes: float
    predicted_bytes: int
    max_residual_bytes: float = Field(description="largest |fit - measured| over the depths used")


class CategoryRow(BaseModel):
    model_config = _FROZEN
    category: str
    estimate_bytes: int | None
    measured_bytes: int | None
    error_bytes: int | None = Field(None, description="estimate - measured")
    error_pct: float | None = Field(None, description="(estimate - measured) / measured, percent")


class Comparison(BaseModel):
    """Estimate and measurement side by side, one row per category and per total."""

    model_config = _FROZEN
    description: str
    rows: list[CategoryRow]
    totals: list[CategoryRow]
    phases: list[CategoryRow] = Field(
        default_factory=list,
        description="peak allocated per measured phase (the estimate's widest modelled phase inside it)",
    )
    extrapolated: bool = False
    simulated: bool = False
    fits_measured: bool
    fits_estimated: bool
    notes: list[str] = Field(default_factory=list)


# TrainingSetup fields the MeasuredCase columns already encode
_ENCODED = frozenset(
    {
        "method",
        "precision",
        "optim",
        "batch_size",
        "seq_len",
        "lora_r",
        "lora_dropout",
        "lora_targets",
        "quant",
        "galore_rank",
        "galore_update_proj_gap",
        "gradient_checkpointing",
        "fsdp",
        "cpu_offload",
    }
)


def stack_knobs(setup: TrainingSetup) -> dict:
    """The setup's other fields where they differ from their defaults, as JSON values."""
    dumped = setup.model_dump(mode="json")
    return {
        k: dumped[k]
        for k, f in TrainingSetup.model_fields.items()
        if k not in _ENCODED and getattr(setup, k) != f.default
    }
