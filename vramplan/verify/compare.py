"""The estimate and the measurement side by side, per category and in total."""

from __future__ import annotations

from vramplan.categories import Category as C
from vramplan.memory import MEASURED_PHASES, MeasuredPhase, PhaseKind
from vramplan.results import Estimate
from vramplan.units import GiB, MiB
from vramplan.verify.results import CategoryRow, Comparison, Measurement


def _row(label: str, est: int | None, meas: int | None) -> CategoryRow:
    err = est - meas if est is not None and meas is not None else None
    pct = 100.0 * err / meas if err is not None and meas else None
    return CategoryRow(category=label, estimate_bytes=est, measured_bytes=meas, error_bytes=err, error_pct=pct)


def compare(estimate: Estimate, m: Measurement, loop_output_delta: int = 0) -> Comparison:
    """loop_output_delta: the model's output the reference step's loop holds through the loss
    backward and verify's loop, which keeps only the loss, does not (memory.loss.held_output_bytes);
    the estimate's phases are compared less that."""
    eb: dict[C, int | None] = dict(estimate.per_gpu.breakdown)
    mb: dict[C, int | None] = dict(m.breakdown)
    notes = []
    modelled = dict(estimate.per_gpu.phases)
    loss_backward = PhaseKind.LOSS_BACKWARD.label
    if loop_output_delta and loss_backward in modelled:
        modelled[loss_backward] -= loop_output_delta
        notes.append(
            f"the estimate's loss backward is compared less {loop_output_delta / MiB:.1f} MiB: the logits "
            "the reference step's loop still holds there, verify's loop (like the Trainer's) keeps only the loss"
        )
    notes += _fold_unseparated_buffers(eb, mb, m.setup.fsdp > 1)
    pg = estimate.per_gpu
    peak_name, peak = pg.peak_phase, pg.peak_allocated_bytes
    if loop_output_delta and modelled:  # verify's widest phase may be another one
        peak_name = max(modelled, key=modelled.__getitem__)
        peak = modelled[peak_name]
        if peak_name == pg.peak_phase == loss_backward:
            eb[C.TRANSIENT] = (eb.get(C.TRANSIENT) or 0) - loop_output_delta  # the held logits count as transient
        elif peak_name != pg.peak_phase:
            notes.append(
                f"the categories are the estimate's at its peak ({pg.peak_phase}); "
                f"for verify's loop its widest phase is {peak_name}"
            )
    rows = [_row(c.value, eb.get(c), mb.get(c)) for c in C]
    total = None
    context = mb.get(C.CUDA_CONTEXT)
    if m.peak_reserved_bytes is not None and context is not None:
        total = m.peak_reserved_bytes + context
    totals = [
        _row("peak allocated", peak, m.peak_allocated_bytes),
        # the split between the two is an attribution: the measured activations are what the
        # forward left alive (the loss's fp32 logits too), the measured transient the rest
        _row("activations + transient", _sum(eb, C.ACTIVATIONS, C.TRANSIENT), _sum(mb, C.ACTIVATIONS, C.TRANSIENT)),
        _row("peak reserved", pg.peak_reserved_bytes, m.peak_reserved_bytes),
        _row("total (reserved + context)", pg.total_bytes, total),
    ]
    built = sum(eb.get(c) or 0 for c in (C.WEIGHTS, C.QUANT_STATE, C.ADAPTERS))
    phases = _phase_rows(modelled, pg.phase_measured, m, built)
    est_at = pg.phase_measured[peak_name] if peak_name else None
    if m.peak_phase and est_at and not m.peak_phase.startswith(est_at):
        notes.append(f"peak in a different phase: estimate '{peak_name}', measured '{m.peak_phase}'")
    notes += _measurement_notes(m)
    return Comparison(
        description=estimate.description,
        rows=rows,
        totals=totals,
        phases=phases,
        extrapolated=bool(m.extrapolated_from),
        simulated=m.simulated,
        fits_measured=m.fits,
        fits_estimated=estimate.fits,
        notes=notes,
    )


def _fold_unseparated_buffers(eb: dict[C, int | None], mb: dict[C, int | None], sharded: bool) -> list[str]:
    """Move the buffers the measurement cannot tell apart (FSDP's, the communication ones) into
    the estimate's transient, in place; the notes saying so."""
    notes = []
    if sharded:
        # measured transient is the residual of the peak: it includes the FSDP buffers
        # the estimate's categories are all bytes (no None) until set to None here
        eb[C.TRANSIENT] = (eb.get(C.TRANSIENT) or 0) + (eb.get(C.FSDP_BUFFERS) or 0)
        eb[C.FSDP_BUFFERS] = None
        mb[C.FSDP_BUFFERS] = None
        notes.append("FSDP buffers are not separated in the measurement: compared inside 'transient'")
    comm = eb.get(C.COMM_BUFFERS)
    if comm:
        # DDP's buckets and DeepSpeed's buffers are not told apart by the measurement either
        eb[C.TRANSIENT] = (eb.get(C.TRANSIENT) or 0) + comm
        eb[C.COMM_BUFFERS] = None
        mb[C.COMM_BUFFERS] = None
        notes.append("communication buffers are not separated in the measurement: compared inside 'transient'")
    return notes


def _measurement_notes(m: Measurement) -> list[str]:
    """What the measurement itself was: extrapolated, simulated FSDP, out of memory."""
    notes = []
    if m.extrapolated_from:
        notes.append(f"measurement EXTRAPOLATED from depths {m.extrapolated_from} to {m.full_layers} layers")
    if m.simulated:
        notes.append(
            f"{m.setup.engine.value.upper()} simulated: rank 0 of {m.world} on PyTorch's fake process group "
            "(collectives do nothing; every buffer they need is allocated)"
        )
    if m.oom is not None:
        notes.append(
            f"does not fit: out of memory in {m.oom.phase}"
            + (f" (step {m.oom.step})" if m.oom.step is not None else "")
        )
    return notes


def _sum(breakdown: dict, *cats: C) -> int | None:
    values = [breakdown.get(c) for c in cats]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def _phase_rows(
    modelled: dict[str, int], measured_of: dict[str, str], m: Measurement, built: int = 0
) -> list[CategoryRow]:
    """Per measured phase: the estimate's widest modelled phase inside it against the
    measured peak of that phase over all steps (extrapolated measurements have none). The
    build's peak is its widest moment or its end, the weights, quantization state and adapters
    it leaves (`built`): the 8B QLoRA's build on the H200 peaked at its end, 5.6 GiB, above the
    quantization moment the modelled phase holds (tests/data/h200_lease/call1_verify8b.txt)."""
    est: dict[str, int] = {}
    for name, b in modelled.items():
        k = measured_of[name]
        est[k] = max(est.get(k, 0), b)
    if built and MeasuredPhase.BUILD in est:
        est[MeasuredPhase.BUILD] = max(est[MeasuredPhase.BUILD], built)
    meas: dict[str, int] = {}
    for snap in m.phases:
        if snap.peak_allocated_bytes is not None:
            meas[snap.phase] = max(meas.get(snap.phase, 0), snap.peak_allocated_bytes)
    return [_row(f"{k.value} peak", est.get(k), meas.get(k)) for k in MEASURED_PHASES if k in est or k in meas]


def to_frame(cmp: Comparison):
    """One row per category and per total, in MiB and bytes (for the CSV)."""
    import pandas as pd

    recs = []
    for kind, rows in (("category", cmp.rows), ("total", cmp.totals), ("phase", cmp.phases)):
        for r in rows:
            recs.append({"kind": kind, **r.model_dump()})
    return pd.DataFrame.from_records(recs)


def depth_note(layers: int, full_layers: int, full: Estimate, cmp: Comparison) -> str:
    """What a run of `layers` of `full_layers` decoder layers says about the full model: the
    full-depth estimate, and this run's peak error scaled by depth (the error of the
    per-layer terms grows with the layers; the rest does not: an upper bound)."""
    peak = next((r for r in cmp.totals if r.category == "peak allocated"), None)
    line = (
        f"this run has {layers} of {full_layers} decoder layers; at full depth the estimate is "
        f"{full.per_gpu.total_bytes / GiB:.2f} GiB per GPU on {full.gpu_name} "
        f"({'fits' if full.fits else 'does not fit'} its {full.gpu_memory_bytes / GiB:.1f} GiB)"
    )
    if peak is not None and peak.error_bytes is not None:
        scaled = abs(peak.error_bytes) * full_layers / layers
        line += (
            f"; the peak error here, {peak.error_bytes / MiB:+.1f} MiB, would be at most about "
            f"{scaled / MiB:.0f} MiB ({100 * scaled / full.per_gpu.peak_allocated_bytes:.1f}% of the "
            "full-depth peak) if it all came from the layers"
        )
    return line


SUMMED = (C.ACTIVATIONS.value, C.TRANSIENT.value)
SUM_LABEL = "activations + transient"
SUM_NOTE = (
    "activations and transient are compared as their sum: how a measured peak splits between them is an "
    "attribution (what the forward left alive, then the rest), not a measurement, so either alone can be "
    "far off where their sum agrees; the per-phase peaks below are measured"
)


def display_rows(cmp: Comparison) -> tuple[list[CategoryRow], list[CategoryRow]]:
    """(category rows, total rows) as shown: activations and transient as one row, their sum,
    in the place of the two (the CSV and JSON keep the two attributed rows)."""
    summed = next((r for r in cmp.totals if r.category == SUM_LABEL), None)
    rows: list[CategoryRow] = []
    for r in cmp.rows:
        if r.category in SUMMED and summed is not None:
            if r.category == SUMMED[0]:
                rows.append(summed)
            continue
        rows.append(r)
    return rows, [r for r in cmp.totals if r.category != SUM_LABEL or summed is None]


def render(cmp: Comparison, m: Measurement, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    biggest = max(
        (abs(v) for r in [*cmp.rows, *cmp.totals] for v in (r.estimate_bytes, r.measured_bytes) if v), default=0
    )
    unit, div = ("GiB", GiB) if biggest >= GiB else ("MiB", MiB)

    def gib(b):
        return "n/a" if b is None else f"{b / div:.2f}"

    title = f"{m.model} [{m.num_layers}/{m.full_layers} layers] {cmp.description}"
    t = Table(title=title, title_justify="left")
    for col in ("category", f"estimate {unit}", f"measured {unit}", f"error {unit}", "error %"):
        t.add_column(col, justify="left" if col == "category" else "right")
    rows, totals = display_rows(cmp)
    for r in [*rows, None, *totals, None, *cmp.phases]:
        if r is None:
            t.add_section()
            continue
        if not r.estimate_bytes and not r.measured_bytes:
            continue
        pct = "" if r.error_pct is None else f"{r.error_pct:+.1f}"
        t.add_row(r.category, gib(r.estimate_bytes), gib(r.measured_bytes), gib(r.error_bytes), pct)
    console.print(t)
    verdict = "fits" if cmp.fits_measured else "DOES NOT FIT"
    console.print(f"measured: {verdict}; estimate says {'fits' if cmp.fits_estimated else 'does not fit'}")
    if m.tokens_per_s:
        console.print(f"step {m.step_s[-1]:.3f} s, {m.tokens_per_s:,.0f} tokens/s (last step, per rank)")
    said = [SUM_NOTE] if len(rows) < len(cmp.rows) else []
    for n in [*said, *cmp.notes, *m.notes]:
        console.print(f"note: {n}")


def _max(values) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def max_over_ranks(ms: list[Measurement]) -> Measurement:
    """The launched ranks as one measurement: each category's, phase's and total's largest
    over the ranks (what the GPU the most loaded rank runs on must hold), the rest rank 0's."""
    top = max(ms, key=lambda m: m.peak_allocated_bytes or 0)
    phases = []
    for i, snap in enumerate(ms[0].phases):
        same = [m.phases[i] for m in ms if i < len(m.phases)]
        fields = ("allocated_bytes", "reserved_bytes", "peak_allocated_bytes", "peak_reserved_bytes")
        phases.append(snap.model_copy(update={f: _max(getattr(s, f) for s in same) for f in fields}))
    cats = {c for m in ms for c in m.breakdown}
    return ms[0].model_copy(
        update={
            "fits": all(m.fits for m in ms),
            "phases": phases,
            "peak_allocated_bytes": _max(m.peak_allocated_bytes for m in ms),
            "peak_reserved_bytes": _max(m.peak_reserved_bytes for m in ms),
            "peak_phase": top.peak_phase,
            "breakdown": {c: _max(m.breakdown.get(c) for m in ms) for c in cats},
            "nvml_used_bytes": _max(m.nvml_used_bytes for m in ms),
            "notes": [
                *ms[0].notes,
                f"max over {len(ms)} ranks: each category, phase and total its largest over the ranks "
                f"(the peak on rank {top.rank})",
            ],
        }
    )
