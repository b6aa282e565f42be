"""Run the reference step and snapshot memory per phase (docs/verify.md, the protocol).

Phases: build, then per step forward, backward, optimizer (step + zero_grad). The peak
statistics are reset at the start of every phase, so each phase has its own peak and
the case peak is their maximum (the same number as one max_memory_allocated() over the
whole case). Out-of-memory in any phase is recorded as a result.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

from vramplan.categories import Category as C
from vramplan.setup import TrainingSetup
from vramplan.verify.attribute import gradient_bytes, model_bytes, optimizer_bytes, param_counts
from vramplan.verify.probe import Probe, make_probe
from vramplan.verify.ranks import engine_world
from vramplan.verify.results import Measurement, OomInfo, PhaseSnapshot

#: called with (phase, step) when a phase starts: drives the progress display (and lets
#: tests inject an out-of-memory error)
PhaseCallback = Callable[[str, "int | None"], None]
_VERSIONED = ("torch", "transformers", "peft", "bitsandbytes", "galore-torch", "hqq", "accelerate")


@dataclass
class _Run:
    probe: Probe
    on_phase: PhaseCallback | None
    phases: list[PhaseSnapshot] = field(default_factory=list)
    current: tuple[str, int | None] = ("build", None)
    peak_alloc: int | None = None
    peak_reserved: int | None = None
    peak_at: str | None = None
    trace: Any = None  # cputrace.AllocationTrace on the CPU: phases are marked in it

    @contextmanager
    def phase(self, name: str, step: int | None):
        self.current = (name, step)
        if self.on_phase:
            self.on_phase(name, step)
        self.probe.sync()
        self.probe.reset_peak()
        t0 = time.perf_counter()
        with self.trace.phase(name, step) if self.trace is not None else nullcontext():
            yield
        self.probe.sync()
        self.close_phase(name, step, time.perf_counter() - t0)

    def close_phase(self, name: str, step: int | None, seconds: float) -> PhaseSnapshot:
        p = self.probe
        snap = PhaseSnapshot(
            phase=name,
            step=step,
            allocated_bytes=p.allocated(),
            reserved_bytes=p.reserved(),
            peak_allocated_bytes=p.peak_allocated(),
            peak_reserved_bytes=p.peak_reserved(),
            seconds=seconds,
        )
        self.phases.append(snap)
        self._update_peaks(snap.peak_allocated_bytes, snap.peak_reserved_bytes, _label(name, step))
        return snap

    def phase_end_alloc(self) -> int | None:
        return self.phases[-1].allocated_bytes if self.phases else None

    def _update_peaks(self, alloc: int | None, reserved: int | None, label: str) -> None:
        if alloc is not None and (self.peak_alloc is None or alloc > self.peak_alloc):
            self.peak_alloc, self.peak_at = alloc, label
        if reserved is not None and (self.peak_reserved is None or reserved > self.peak_reserved):
            self.peak_reserved = reserved


def _label(name: str, step: int | None) -> str:
    return name if step is None else f"{name} (step {step})"


@dataclass
class PhaseSizes:
    model: dict = field(default_factory=dict)
    activations: int | None = None
    gradients: int | None = None
    optimizer: int | None = None


def run_case(
    model: str,
    setup: TrainingSetup,
    device: str = "cuda",
    num_layers: int | None = None,
    steps: int = 3,
    on_phase: PhaseCallback | None = None,
    alloc_history: str | None = None,
) -> Measurement:
    """Build the reference step and run `steps` steps; OOM ends the case with fits=False.
    `alloc_history` (CUDA): a file the caching allocator's event history of the whole case is
    written to, build and steps, up to an out-of-memory error (verify/history.py)."""
    import torch

    from vramplan.model_loader import load_model_spec
    from vramplan.verify import cputrace, history
    from vramplan.verify.build import build_step

    probe = make_probe(device)
    full = load_model_spec(model).num_layers
    probe.fresh()
    # the CPU has no allocator statistics: every allocation is traced instead, and the step
    # runs CUDA's choice where only a kernel's allocation differs (cputrace)
    on_cpu = torch.device(device).type == "cpu"
    trace = cputrace.AllocationTrace() if on_cpu else None
    run = _Run(probe, on_phase, trace=trace)
    sizes = PhaseSizes()
    out = _Outcome(traced=trace is not None)
    built = None
    with trace if trace is not None else nullcontext(), history.recording(torch, alloc_history, device):
        try:
            with run.phase("build", None), cputrace.cuda_like_build() if on_cpu else nullcontext():
                built = build_step(model, setup, device, num_layers)
                if on_cpu:
                    cputrace.cuda_like_optimizer(built)
            dev = torch.device(device).type
            sizes.model = model_bytes(built.model, dev)
            out.counts = param_counts(built.model)
            out.after_build = probe.allocated()
            with cputrace.cuda_like_steps() if on_cpu else nullcontext():
                _run_steps(built, run, sizes, steps, dev, out)
            out.nvml = probe.nvml_used()
            out.segments = probe.segments()
        except torch.OutOfMemoryError as e:
            out.oom = _oom_info(run, str(e))
        finally:
            out.notes = list(built.notes) if built is not None else []
            out.simulated, out.rank = (
                (built.simulated, built.rank) if built is not None else (engine_world(setup) > 1, 0)
            )
            _free(built)
            built = None
            probe.fresh()
    if trace is not None:
        out.after_build, out.after_step0, out.step_peaks = _apply_trace(run, trace.phases(), sizes)
        out.notes += _cpu_trace_notes(setup)
    return _measurement(model, setup, device, probe, run, sizes, full, num_layers, steps, out)


@dataclass
class _Outcome:
    """What running one case left for its Measurement: snapshots, timings, counts, notes.

    Filled in place as the case runs, so that what an out-of-memory error interrupts keeps
    what was measured before it."""

    traced: bool = False
    oom: OomInfo | None = None
    after_build: int | None = None
    after_step0: int | None = None
    nvml: int | None = None
    segments: list[list[float]] | None = None
    counts: tuple[int, int] = (0, 0)
    step_peaks: list[int] = field(default_factory=list)
    timing: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    simulated: bool = False
    rank: int = 0


def _run_steps(built, run: _Run, sizes: PhaseSizes, steps: int, dev: str, out: _Outcome) -> None:
    """Run the `steps` training steps, recording each one's time and peak into `out` as it ends."""
    for step in range(steps):
        t0 = time.perf_counter()
        _one_step(built, run, sizes, step, dev)
        out.timing.append(time.perf_counter() - t0)
        if step == 0:
            out.after_step0 = run.probe.allocated()
        if run.peak_alloc is not None:
            out.step_peaks.append(run.peak_alloc)


def _cpu_trace_notes(setup: TrainingSetup) -> list[str]:
    """What a CPU-traced measurement says about itself."""
    from vramplan.verify import cputrace

    return [
        "CPU trace: every CPU allocation traced per phase (the analogue of max_memory_allocated); "
        "CPU kernels are not CUDA's (docs/verify.md, 'CPU trace'); no reserved or CUDA context",
        *(f"not comparable on the CPU: {what}" for what in cputrace.incomparable_on_cpu(setup)),
    ]


def _apply_trace(run: _Run, traced: list, sizes: PhaseSizes) -> tuple[int | None, int | None, list[int]]:
    """Fill the phase snapshots from the allocation trace, which reports only at its end."""
    snaps, prev_end, after_build, after_step0 = [], 0, None, None
    step_peaks: list[int] = []
    run.peak_alloc = run.peak_at = None
    for snap, tp in zip(run.phases, traced, strict=False):
        snaps.append(snap.model_copy(update={"allocated_bytes": tp.end_bytes, "peak_allocated_bytes": tp.peak_bytes}))
        run._update_peaks(tp.peak_bytes, None, _label(tp.name, tp.step))
        if tp.name == "forward":
            sizes.activations = tp.end_bytes - prev_end  # what the forward left alive
        if tp.name == "build":
            after_build = tp.end_bytes
        if tp.name == "optimizer":
            after_step0 = after_step0 if after_step0 is not None else tp.end_bytes
            step_peaks.append(cast(int, run.peak_alloc))  # _update_peaks has set it
        prev_end = tp.end_bytes
    run.phases = snaps
    return after_build, after_step0, step_peaks


def _one_step(built, run: _Run, sizes: PhaseSizes, step: int, dev: str) -> None:
    """One optimizer step: --gradient-accumulation micro-batches (each a forward and a backward
    phase of this step; the last one's are the step's), then the optimizer."""
    for micro in range(built.setup.gradient_accumulation):
        if micro:
            built.accumulate()
        _micro_batch(built, run, sizes, step)
    sizes.gradients = gradient_bytes(built.model, dev)
    with run.phase("optimizer", step):
        built.optimizer_step()
    sizes.optimizer = optimizer_bytes(built.optimizers, dev)


def _micro_batch(built, run: _Run, sizes: PhaseSizes, step: int) -> None:
    ids = built.batch()
    with run.phase("forward", step):
        before = run.probe.allocated()
        loss = built.forward(ids)
    after = run.phase_end_alloc()
    if before is not None and after is not None:
        # what the forward left alive: saved tensors, logits, autocast weight casts
        sizes.activations = after - before
    with run.phase("backward", step):
        built.backward(loss)
        del loss
        settle_collectives()  # gloo's worker thread frees the last collective's tensors here


def settle_collectives() -> None:
    """On a launched gloo run (one worker thread: launch._gloo_with_one_worker_thread), when this
    returns every earlier collective's tensors are freed. Nothing elsewhere.

    An all-reduce of one kept value, not a barrier: gloo's barrier holds a weak reference to every
    collective still in progress when it is issued (torch==2.13.0 ProcessGroupGloo.cpp,
    AsyncBarrierWork::priorWork), and an intrusive_ptr's object, with the tensors it holds, is
    deleted only when its last weak reference goes. That was when the barrier's work went, on
    whichever thread dropped it last: on the worker thread, under load, inside the optimizer
    phase (fsdp1-2-full in CI: +2.56 MiB of the root unit's 4 MiB padded gradient; reproduced
    here 3 times in 13 loaded runs). The worker thread drops a collective's last reference
    before it takes the next one (ProcessGroupGloo::runLoop), so when this all-reduce is done,
    those tensors are gone. Its own tensor is made once, before any trace (launch.init_distributed)."""
    import torch.distributed as dist

    global _SETTLE
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        if _SETTLE is None:
            import torch

            _SETTLE = torch.zeros(1)
        dist.all_reduce(_SETTLE)


_SETTLE: Any = None


def _oom_info(run: _Run, message: str) -> OomInfo:
    p = run.probe
    name, step = run.current
    peak = p.peak_allocated()
    run._update_peaks(peak, p.peak_reserved(), _label(name, step))
    return OomInfo(
        phase=name,
        step=step,
        allocated_bytes=p.allocated(),
        reserved_bytes=p.reserved(),
        peak_allocated_bytes=run.peak_alloc,
        message=message.splitlines()[0][:300] if message else "",
    )


def _free(built) -> None:
    """Drop every reference to the step's tensors, and the fake process group."""
    if built is not None:
        built.close()
    gc.collect()
    try:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_backend() == "fake":
            dist.destroy_process_group()
    except (ImportError, RuntimeError, ValueError):
        pass


def peak_breakdown(
    phase: str | None, sizes: PhaseSizes, peak: int | None, after_step0_seen: bool, layerwise: bool = False
) -> dict:
    """Bytes per category alive at the peak phase; the rest of the peak is transient.

    Alive sets (docs/verify.md): weights, quant state and adapters always; optimizer states
    once created (any phase after step 0's optimizer); activations in forward/backward;
    gradients in the optimizer phase. Backward peaks hold part of the grads and part of
    the activations: we count the activations, and the grads so far fall into transient.
    Layer-wise optimizers create their states inside step 0's backward (the grad hooks), so
    there and after they count as alive."""
    out: dict[C, int | None] = {c: 0 for c in C}
    out.update(sizes.model)
    if phase is None:
        # no allocator statistics (CPU): report each category's size, totals unavailable
        out.update(
            {
                C.GRADIENTS: sizes.gradients or 0,
                C.OPTIMIZER_STATES: sizes.optimizer or 0,
                C.ACTIVATIONS: None,
                C.TRANSIENT: None,
            }
        )
        return out
    name = (phase or "").split(" ")[0]
    step0 = "(step 0)" in (phase or "")
    if name in ("forward", "backward"):
        out[C.ACTIVATIONS] = sizes.activations
    if name == "optimizer":
        out[C.GRADIENTS] = sizes.gradients
    hooked = layerwise and not (name == "forward" and step0)
    if name == "optimizer" or (name in ("forward", "backward") and not step0 and after_step0_seen) or hooked:
        out[C.OPTIMIZER_STATES] = sizes.optimizer
    if peak is None:
        out[C.ACTIVATIONS] = None if name in ("forward", "backward") else out[C.ACTIVATIONS]
        out[C.TRANSIENT] = None
    else:
        known = sum(v or 0 for c, v in out.items() if c != C.TRANSIENT)
        out[C.TRANSIENT] = max(peak - known, 0)
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _measurement(model, setup, device, probe, run, sizes, full, num_layers, steps, out: _Outcome) -> Measurement:
    from vramplan.model_loader import resolve_config

    name, _alias, _cfg = resolve_config(model)
    breakdown = peak_breakdown(run.peak_at, sizes, run.peak_alloc, out.after_step0 is not None, setup.steps_in_backward)
    if run.peak_reserved is not None and run.peak_alloc is not None:
        breakdown[C.ALLOCATOR_OVERHEAD] = run.peak_reserved - run.peak_alloc
    else:
        breakdown[C.ALLOCATOR_OVERHEAD] = None
    last_reserved = run.phases[-1].reserved_bytes if run.phases else None
    # NVML sees the whole process: what it adds over reserved is the CUDA context and the
    # libraries' own workspaces
    breakdown[C.CUDA_CONTEXT] = out.nvml - last_reserved if out.nvml is not None and last_reserved is not None else None
    if not probe.available and not out.traced:
        out.notes.append(
            "no allocator statistics on this device: totals, activations and transients unavailable; "
            "parameter, gradient and optimizer bytes counted from the tensors"
        )
    tokens = setup.tokens
    return Measurement(
        model=name,
        num_layers=num_layers or full,
        full_layers=full,
        setup=setup,
        device=device.split(":")[0],
        device_name=probe.device_name(),
        rank=out.rank,
        world=engine_world(setup),
        simulated=out.simulated and engine_world(setup) > 1,
        steps=steps,
        fits=out.oom is None,
        oom=out.oom,
        phases=run.phases,
        peak_allocated_bytes=run.peak_alloc,
        peak_reserved_bytes=run.peak_reserved,
        peak_phase=run.peak_at,
        after_build_bytes=out.after_build,
        after_step0_bytes=out.after_step0,
        step_peaks_bytes=out.step_peaks,
        breakdown=breakdown,
        nvml_used_bytes=out.nvml,
        step_s=out.timing,
        tokens_per_s=tokens / out.timing[-1] if out.timing and out.oom is None else None,
        params_total=out.counts[0],
        params_trainable=out.counts[1],
        notes=out.notes,
        versions=_versions(),
        segments_mib=out.segments,
    )
