"""Score the estimate against measured reference steps (MeasuredCase lines).

Used by the accuracy doc (scripts/accuracy_report.py), the accuracy plot and the tests,
so every consumer compares the same two numbers the same way: the predicted
``per_gpu.peak_allocated_bytes`` against the measured ``torch.cuda.max_memory_allocated()``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from vramplan.estimate import estimate_config
from vramplan.measured import MeasuredCase
from vramplan.results import Estimate
from vramplan.units import MiB


class ScoredCase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    model: str
    description: str
    predicted_alloc_bytes: int
    measured_alloc_bytes: int
    predicted_reserved_bytes: int
    measured_reserved_bytes: int | None
    peak_phase: str

    @property
    def alloc_error(self) -> float:
        """(predicted - measured) / measured of the peak allocated."""
        return (self.predicted_alloc_bytes - self.measured_alloc_bytes) / self.measured_alloc_bytes

    @property
    def reserved_error(self) -> float | None:
        if not self.measured_reserved_bytes:
            return None
        return (self.predicted_reserved_bytes - self.measured_reserved_bytes) / self.measured_reserved_bytes


def model_source(case: MeasuredCase, configs: str | Path | None) -> str:
    """The config a case was built from: CONFIGS/<model>.json when present, else the preset name."""
    if configs is not None and (Path(configs) / f"{case.model}.json").exists():
        return str(Path(configs) / f"{case.model}.json")
    return case.model


def estimate_case(case: MeasuredCase, configs: str | Path | None = None) -> Estimate:
    """The estimate of the step a case measured (the GPU size does not change the prediction);
    a line verify measured, of verify's loop, which keeps only the loss (setup.loss_only_loop)."""
    fields = case.setup_fields() | ({"loss_only_loop": True} if measured_by_verify(case) else {})
    return estimate_config(model_source(case, configs), gpus=f"{case.world}x80GB", num_layers=case.layers, **fields)


def memory_limit(case: MeasuredCase) -> int | None:
    """The cap a capped case ran its allocator under (calibrate.py's capped cases), in bytes."""
    mb = (case.model_extra or {}).get("memory_limit_mb")
    return int(mb * MiB) if mb else None


def measured_by_verify(case: MeasuredCase) -> bool:
    """A line `vramplan verify` wrote (calibrate.py): it records the device's name, which the
    reference harness's lines (h100_dev.jsonl) do not."""
    return bool((case.model_extra or {}).get("device_name"))


def score_case(case: MeasuredCase, configs: Path | None = None) -> ScoredCase:
    """A capped case's reserved is what the capped allocator held, not the roomy GPU's
    max_memory_reserved the estimate predicts: it is not scored (capped_rows compares it).
    A line verify measured is scored against the estimate of verify's loop (estimate_case)."""
    est = estimate_case(case, configs)
    return ScoredCase(
        name=case.name,
        model=case.model,
        description=est.description,
        predicted_alloc_bytes=est.per_gpu.peak_allocated_bytes,
        measured_alloc_bytes=case.peak_alloc_bytes,
        predicted_reserved_bytes=est.per_gpu.peak_reserved_bytes,
        measured_reserved_bytes=None if memory_limit(case) else case.peak_reserved_bytes,
        peak_phase=est.per_gpu.peak_phase,
    )


def is_full_step(case: MeasuredCase) -> bool:
    """A measured peak of whole steps: not an out-of-memory run (its peak stops at the
    error) and not a depth extrapolation (verify's fit, not a measurement)."""
    extra = case.model_extra or {}
    return bool(case.peak_alloc_mb) and extra.get("fits", True) is not False and not extra.get("extrapolated_from")


def score(cases: list[MeasuredCase], configs: Path | None = None) -> list[ScoredCase]:
    """Every case that measured whole steps, scored."""
    return [score_case(c, configs) for c in cases if is_full_step(c)]


def summary(scored: list[ScoredCase]) -> dict:
    """Median and worst |error| of the peak allocated, as fractions."""
    errs = [abs(s.alloc_error) for s in scored]
    worst = max(scored, key=lambda s: abs(s.alloc_error))
    return {
        "cases": len(scored),
        "median_abs_error": statistics.median(errs),
        "max_abs_error": abs(worst.alloc_error),
        "worst_case": worst.name,
    }


def capped_rows(cases: list[MeasuredCase], configs: Path | None = None) -> list[dict]:
    """Capped cases against the allocator replay under the same cap (reserved.under_memory_limit):
    whether the step ran, and what the allocator held, measured and predicted."""
    from vramplan.model_loader import load_model_spec
    from vramplan.reserved import under_memory_limit

    rows = []
    for c in cases:
        limit = memory_limit(c)
        if limit is None:
            continue
        est = estimate_case(c, configs)
        spec = load_model_spec(model_source(c, configs), num_layers=c.layers)
        pred = under_memory_limit(spec, est.setup, limit)
        extra = c.model_extra or {}
        rows.append(
            dict(
                name=c.name,
                limit=limit,
                ran=extra.get("fits", True) is not False,
                reserved=c.peak_reserved_bytes,
                predicted_ran=pred.runs,
                predicted_reserved=pred.peak_reserved,
                predicted_oom_at=pred.oom_at,
            )
        )
    return rows
