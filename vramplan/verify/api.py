"""verify(): estimate, run the reference step (maybe at truncated depths or on N ranks), compare."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from vramplan.errors import VramplanError
from vramplan.hardware import GpuSpec
from vramplan.results import Estimate
from vramplan.setup import Engine, Loss, TrainingSetup
from vramplan.verify.compare import max_over_ranks
from vramplan.verify.results import Comparison, Extrapolation, Measurement

EXIT_NO_GPU = 3


class NoGpuError(VramplanError):
    """verify needs a CUDA GPU (the CLI exits with EXIT_NO_GPU)."""


class VerifyReport(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    estimate: Estimate
    measurements: list[Measurement] = Field(description="what actually ran: one per rank, or per truncated depth")
    result: list[Measurement] = Field(description="what is compared: every rank, or the extrapolated full depth")
    comparisons: list[Comparison]
    extrapolations: list[Extrapolation] = Field(default_factory=list)
    ran: str = Field("", description="how the step ran: one process, N launched ranks, or rank 0 simulated")
    over_ranks: Comparison | None = Field(
        None, description="launched ranks: each category's, phase's and total's largest over the ranks"
    )

    @property
    def fits(self) -> bool:
        return all(m.fits for m in self.result)

    def write(self, folder: str | Path) -> Path:
        """report.json (everything), comparison.csv, measurements.jsonl (MeasuredCase lines),
        written into a temporary folder renamed to ``folder`` last (vramplan.files.write_folder):
        a full disk leaves no truncated report."""
        import pandas as pd

        from vramplan.files import write_folder
        from vramplan.verify.compare import to_frame

        frames = []
        for i, c in enumerate(self.comparisons):
            f = to_frame(c)
            f.insert(0, "rank", self.result[i].rank)
            frames.append(f)
        if self.over_ranks is not None:
            f = to_frame(self.over_ranks)
            f.insert(0, "rank", "max")
            frames.append(f)
        lines = [m.to_measured_case().model_dump_json() for m in self.measurements]
        files = {
            "report.json": self.model_dump_json(indent=1).encode(),
            "comparison.csv": pd.concat(frames).to_csv(index=False).encode(),
            "measurements.jsonl": "".join(line + "\n" for line in lines).encode(),
        }
        if len(self.result) > 1:  # launched: what each rank measured, as it wrote it
            files |= {f"rank{m.rank}.json": m.model_dump_json(indent=1).encode() for m in self.result}
        return write_folder(folder, files, "--out")


def require_cuda(device: str) -> None:
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise NoGpuError(
            f"verify runs the real training step and needs a CUDA GPU ({why}); `vramplan estimate` works without one"
        )


def local_gpus(device: str) -> int:
    if not device.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


def estimate_gpus(gpus: str | GpuSpec | None, device: str, fsdp: int) -> GpuSpec:
    """The GPUs the estimate is for: given, else the detected ones (at least `fsdp` of them:
    the engine's ranks)."""
    from vramplan.estimate import resolve_gpus
    from vramplan.hardware import detect_gpus, parse_gpus

    if gpus is not None:
        return resolve_gpus(gpus)
    found = detect_gpus() if device.startswith("cuda") else None
    if found is None:
        found = parse_gpus("h100-80gb")  # CPU harness run: any reference card will do
    return found.model_copy(update={"count": max(found.count, fsdp)})


def available_ram() -> int | None:
    """MemAvailable (Linux /proc/meminfo: what can be allocated without swapping), else the
    machine's total RAM, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    from vramplan.estimate import local_host_ram

    return local_host_ram()


def check_cpu_ram(est: Estimate, device: str) -> None:
    """The CPU trace holds the whole step in this machine's RAM: refuse, before building
    anything, a step whose estimated peak (plus the process: torch, transformers) does not
    fit what is available (issue 17: a 10M-token sequence took > 8 GiB in 35 s unchecked)."""
    if device.startswith("cuda"):
        return
    from vramplan.estimate import PROCESS_HOST_BYTES
    from vramplan.units import GiB

    need = est.per_gpu.peak_allocated_bytes + PROCESS_HOST_BYTES
    have = available_ram()
    if have is not None and need > have:
        raise VramplanError(
            f"the CPU trace of {est.description} needs about {need / GiB:.1f} GiB of RAM (the "
            f"estimate's peak {est.per_gpu.peak_allocated_bytes / GiB:.1f} GiB + "
            f"{PROCESS_HOST_BYTES / GiB:.0f} GiB for the process) and {have / GiB:.1f} GiB is "
            "available; use a smaller --seq-len or --batch-size, or --num-layers",
            "--device cpu",
        )


def _capacity(device: str, spec: GpuSpec) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[1])
    # the CPU trace holds the step in this machine's RAM
    from vramplan.estimate import local_host_ram

    ram = local_host_ram()
    return min(spec.profile.memory_bytes, int(0.6 * ram)) if ram else spec.profile.memory_bytes


def verify(
    model: str,
    setup: TrainingSetup,
    *,
    device: str = "cuda",
    num_layers: int | None = None,
    steps: int = 3,
    gpus: str | GpuSpec | None = None,
    extrapolate: str = "auto",
    depths: list[int] | None = None,
    max_depth: int = 8,
    on_phase=None,
    on_case=None,
    on_notice=None,
    launch: bool | None = None,
) -> VerifyReport:
    """Run the reference step on this machine and compare it with the estimate.

    launch: run the engine's N ranks as N processes (torchrun) — None: when N GPUs are
    visible; True: always (gloo on the CPU), refused where it cannot; False: never (rank 0
    simulated on a fake process group).

    extrapolate: "auto" (when the estimate says the full depth does not fit the local GPU
    and no --num-layers was given), "always" or "never". on_case(label) announces each
    case (progress display); on_phase(phase, step) each phase; on_notice(line) what a CPU
    case will cost, before it runs (preflight.cpu_notice)."""
    from vramplan.estimate import estimate_config, with_data_parallel
    from vramplan.model_loader import load_model_spec
    from vramplan.verify.preflight import require_libraries
    from vramplan.verify.ranks import engine_world

    require_libraries(setup)  # the verify extra, before any work
    require_cuda(device)
    from vramplan.verify.build import check_buildable

    check_buildable(setup, device)  # what verify does not build here, refused before the CPU notice

    gspec = estimate_gpus(gpus, device, engine_world(setup))
    setup = with_data_parallel(setup, gspec)  # DDP or ZeRO over every GPU of --gpus, as the estimate
    ranks = plan_ranks(setup, device, launch)
    fields = setup.model_dump(exclude_none=True)
    est = estimate_config(model, gspec, num_layers=num_layers, **fields)
    full = load_model_spec(model).num_layers
    capacity = _capacity(device, gspec)
    if _should_extrapolate(extrapolate, num_layers, depths, est, capacity):
        if ranks.launched and (launch or setup.engine == Engine.DEEPSPEED):
            flag = "--launch" if launch else "--deepspeed"
            raise VramplanError("launched ranks run one depth: give --num-layers or --extrapolate never", flag)
        report = _extrapolated(
            model, setup, device, steps, gspec, full, capacity, depths, max_depth, on_phase, on_case, on_notice
        )
        return report.model_copy(update={"ran": _extrapolated_ran(setup)})
    check_cpu_ram(est, device)
    if on_notice is not None and ranks.launched:
        on_notice(f"runs {ranks.line}")
    ms = _measure_at_depth(model, setup, device, num_layers, steps, on_phase, on_case, on_notice, ranks)
    return _report(model, est, ms, setup, device, num_layers, full, gspec, ranks.line)


def _report(model, est: Estimate, ms, setup: TrainingSetup, device, num_layers, full, gspec, ran) -> VerifyReport:
    """Each rank (and, launched, the max over the ranks) compared with the estimate."""
    from vramplan.verify.compare import compare

    delta = _loop_output_delta(model, setup, num_layers)
    comparisons = [compare(est, m, delta) for m in ms]
    over = compare(est, max_over_ranks(ms), delta) if len(ms) > 1 else None
    if num_layers is not None and num_layers < full:  # relate the truncated run to the model asked about
        comparisons = _with_depth_note(comparisons, model, gspec, setup, num_layers, full)
    return VerifyReport(
        model=est.model,
        estimate=est,
        measurements=ms,
        result=ms,
        comparisons=comparisons,
        ran=ran,
        over_ranks=over,
    )


def _extrapolated_ran(setup: TrainingSetup) -> str:
    from vramplan.verify.ranks import engine_world

    world = engine_world(setup)
    each = f"rank 0 of {world} of {setup.engine.value.upper()} simulated" if world > 1 else "one process"
    return f"{each} per truncated depth (extrapolated)"


def _with_depth_note(comparisons, model: str, gspec: GpuSpec, setup: TrainingSetup, layers: int, full: int):
    from vramplan.estimate import estimate_config
    from vramplan.verify.compare import depth_note

    whole = estimate_config(model, gspec, **setup.model_dump(exclude_none=True))
    return [c.model_copy(update={"notes": [*c.notes, depth_note(layers, full, whole, c)]}) for c in comparisons]


#: seconds a launched case may take (every rank builds and runs the step); past it every rank is stopped
LAUNCH_TIMEOUT_S = 3600.0


class RankPlan(BaseModel):
    """How the step runs: nproc > 1 launched ranks, else in this process."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    nproc: int
    line: str
    launched: bool = False


def plan_ranks(setup: TrainingSetup, device: str, launch: bool | None) -> RankPlan:
    """The engine's N ranks as N processes when N GPUs are visible (or asked for on the CPU:
    gloo), else rank 0 of N simulated on a fake process group; the line says which ran."""
    from vramplan.verify.launch import require_deepspeed
    from vramplan.verify.ranks import engine_world

    require_deepspeed(setup)
    world = engine_world(setup)
    if setup.engine == Engine.DEEPSPEED:
        return _plan_zero(setup, device, launch, world)
    if world <= 1:
        if launch:
            raise VramplanError("the setup runs on one rank: give --fsdp N or --data-parallel N to launch", "--launch")
        return RankPlan(nproc=1, line="one process")
    name = setup.engine.value.upper()
    if device.startswith("cuda"):
        n_local = local_gpus(device)
        if launch is not False and n_local >= world:
            line = f"torchrun, {world} ranks of {name} on {n_local} local GPUs (NCCL)"
            return RankPlan(nproc=world, line=line, launched=True)
        if launch:
            raise VramplanError(f"{world} ranks need {world} GPUs and {n_local} are visible", "--launch")
        why = "--no-launch" if launch is False else f"{world} ranks need {world} GPUs, {n_local} visible"
        return RankPlan(nproc=1, line=f"rank 0 of {world} of {name} simulated on a fake process group ({why})")
    if launch:
        return RankPlan(nproc=world, line=f"torchrun, {world} ranks of {name} on this CPU (gloo)", launched=True)
    return RankPlan(
        nproc=1,
        line=f"rank 0 of {world} of {name} simulated on a fake process group (--launch: {world} ranks on gloo)",
    )


def _plan_zero(setup: TrainingSetup, device: str, launch: bool | None, world: int) -> RankPlan:
    """ZeRO always runs launched (deepspeed.initialize needs its process group; it is not
    simulated on a fake one): N GPUs for N ranks, or N CPU ranks over gloo."""
    stage = setup.deepspeed.value.upper() if setup.deepspeed else "ZeRO"
    if launch is False:
        raise VramplanError("ZeRO is not simulated on a fake process group: it runs launched", "--no-launch")
    if device.startswith("cuda"):
        n_local = local_gpus(device)
        if n_local < world:
            raise VramplanError(
                f"ZeRO over {world} ranks needs {world} GPUs and {n_local} are visible (ZeRO is not simulated)",
                "--deepspeed",
            )
        line = f"deepspeed launcher, {world} rank(s) of {stage} on {n_local} local GPUs (NCCL)"
        return RankPlan(nproc=world, line=line, launched=True)
    return RankPlan(
        nproc=world, line=f"deepspeed launcher, {world} rank(s) of {stage} on this CPU (gloo)", launched=True
    )


def _measure_at_depth(
    model, setup: TrainingSetup, device: str, num_layers: int | None, steps: int, on_phase, on_case, on_notice, ranks
) -> list[Measurement]:
    """One measurement per rank: the launched ranks (plan_ranks), else one in-process case."""
    if ranks.launched:
        nproc = ranks.nproc
        from vramplan.verify.launch import CaseRequest, run_isolated

        if on_case:
            on_case(f"torchrun: {nproc} ranks")
        req = CaseRequest(model=model, setup=setup, num_layers=num_layers, steps=steps, device=device)
        return run_isolated(req, nproc=nproc, timeout=LAUNCH_TIMEOUT_S)
    return [_run(model, setup, device, num_layers, steps, on_phase, on_case, on_notice)]


def _loop_output_delta(model: str, setup: TrainingSetup, num_layers: int | None) -> int:
    """What the reference step's loop holds at the loss backward and verify's does not: its
    output's logits (memory.loss.held_output_bytes). verify keeps only the loss, as transformers'
    Trainer does, on the GPU and in the CPU trace alike."""
    from vramplan.memory.loss import held_output_bytes
    from vramplan.model_loader import load_model_spec

    if setup.loss != Loss.HF:
        return 0
    return held_output_bytes(load_model_spec(model, num_layers=num_layers), setup)


def _should_extrapolate(mode: str, num_layers, depths, est: Estimate, capacity: int | None = None) -> bool:
    if mode not in ("auto", "always", "never"):
        raise VramplanError(f"must be auto, always or never, got {mode!r}", "--extrapolate")
    if num_layers is not None or mode == "never":
        if depths:
            raise VramplanError("--depths needs full depth (no --num-layers) and --extrapolate auto/always", "--depths")
        return False
    too_big = not est.fits_gpu or (capacity is not None and est.per_gpu.total_bytes > capacity)
    return mode == "always" or bool(depths) or too_big


def _run(model, setup, device, num_layers, steps, on_phase, on_case, on_notice=None) -> Measurement:
    from vramplan.verify.measure import run_case

    if on_notice is not None and not device.startswith("cuda"):
        on_notice(_cpu_notice(model, setup, num_layers, steps))
    if on_case:
        on_case(f"{num_layers} layers" if num_layers else "full depth")
    return run_case(model, setup, device=device, num_layers=num_layers, steps=steps, on_phase=on_phase)


def _cpu_notice(model: str, setup: TrainingSetup, num_layers: int | None, steps: int) -> str:
    """What this CPU case will take (time, RAM), and the cheaper check when it is slow."""
    from vramplan.estimate import estimate_spec, local_host_ram
    from vramplan.hardware import parse_gpus
    from vramplan.model_loader import load_model_spec
    from vramplan.verify import preflight

    gpus = parse_gpus("h100-80gb")  # any card: only the allocated bytes are used
    full = load_model_spec(model)
    spec = load_model_spec(model, num_layers=num_layers)
    rate = preflight.cpu_matmul_flops()
    peak = estimate_spec(spec, setup, gpus).per_gpu.peak_allocated_bytes
    cost = preflight.cpu_cost(spec, setup, steps, rate, peak)
    small_spec = load_model_spec(model, num_layers=min(2, full.num_layers))
    small_setup = setup.model_copy(update={"seq_len": min(512, setup.seq_len)})
    small_peak = estimate_spec(small_spec, small_setup, gpus).per_gpu.peak_allocated_bytes
    small = preflight.cpu_cost(small_spec, small_setup, steps, rate, small_peak)
    return preflight.cpu_notice(spec, full.num_layers, cost, small, local_host_ram())


def _extrapolated(
    model, setup, device, steps, gspec, full, capacity, depths, max_depth, on_phase, on_case, on_notice=None
):
    from vramplan.estimate import estimate_config
    from vramplan.model_loader import load_model_spec
    from vramplan.verify import extrapolate as xp
    from vramplan.verify.compare import compare

    if on_notice is not None and not device.startswith("cuda"):
        extra = "; verify measures truncated depths instead and extrapolates"
        on_notice(_cpu_notice(model, setup, None, steps) + extra)
    fields = setup.model_dump(exclude_none=True)
    spec = load_model_spec(model)
    if not depths:
        even = len({l.sliding_window for l in spec.layers}) > 1  # alternating layer types: whole pairs
        margin = 0.85 * capacity

        def fits_at(d: int) -> bool:
            e = estimate_config(model, gspec, num_layers=d, **fields)
            return e.per_gpu.total_bytes <= margin

        depths = xp.choose_depths(full, fits_at, max_depth=max_depth, even=even)
    if any(d >= full or d < 1 for d in depths):
        raise VramplanError(f"depths must be between 1 and {full - 1}, got {depths}", "--depths")
    check_cpu_ram(estimate_config(model, gspec, num_layers=max(depths), **fields), device)
    ms = [_run(model, setup, device, d, steps, on_phase, on_case, on_notice) for d in depths]
    result, fits = xp.extrapolate(ms, capacity)
    est = estimate_config(model, gspec, **fields)
    return VerifyReport(
        model=est.model,
        estimate=est,
        measurements=ms,
        result=[result],
        comparisons=[compare(est, result, _loop_output_delta(model, setup, None))],
        extrapolations=fits,
    )
