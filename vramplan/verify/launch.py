"""Process isolation: one case per fresh process (clean allocator and CUDA context), and the
real engine over N ranks: torchrun for DDP, FSDP1 and FSDP2 (one process per GPU on NCCL,
or per CPU rank on gloo), the `deepspeed` launcher for ZeRO. Every rank measures its own
step and writes rank<r>.json; a rank that fails writes rank<r>.error (one line)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vramplan.errors import VramplanError
from vramplan.setup import Engine, TrainingSetup
from vramplan.verify.results import Measurement

WORKER = "vramplan.verify.worker"
#: seconds the ranks get between SIGTERM and SIGKILL once the case has run out of time
KILL_GRACE_S = 5.0


GLOO_TRACE_NOTE = (
    "CPU trace over gloo: the allocations and frees of every thread counted, gloo's worker threads "
    "included (launch.count_frees_on_every_thread)"
)


class CaseRequest(BaseModel):
    """What a worker process runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    setup: TrainingSetup
    num_layers: int | None = None
    steps: int = Field(3, ge=1)
    device: str = "cuda"
    memory_limit_bytes: int | None = Field(
        None,
        gt=0,
        description="cap on what the caching allocator may hold, set with "
        "torch.cuda.set_per_process_memory_fraction (None: the whole device)",
    )
    alloc_history: str | None = Field(
        None, description="CUDA: rank 0 writes the caching allocator's event history here (verify/history.py)"
    )


class Launcher(str, Enum):
    """What starts the ranks of an engine."""

    TORCHRUN = "torchrun"  # python -m torch.distributed.run: DDP, FSDP1, FSDP2
    DEEPSPEED = "deepspeed"  # python -m deepspeed.launcher.runner: ZeRO-1/2/3


def launcher_for(setup: TrainingSetup) -> Launcher:
    return Launcher.DEEPSPEED if setup.engine == Engine.DEEPSPEED else Launcher.TORCHRUN


def require_deepspeed(setup: TrainingSetup) -> None:
    """verify runs ZeRO only as DeepSpeed itself runs it: with the `deepspeed` launcher and
    deepspeed.initialize. Without deepspeed, one line before any work."""
    if setup.engine != Engine.DEEPSPEED or importlib.util.find_spec("deepspeed") is not None:
        return
    stage = setup.deepspeed.value if setup.deepspeed else "ZeRO"
    raise VramplanError(
        "verify runs ZeRO with the `deepspeed` launcher and deepspeed is not installed (pip install deepspeed); "
        f"`vramplan estimate` models {stage} from source, not measured",
        "--deepspeed",
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_command(req_path: Path, out_dir: Path, nproc: int = 1, launcher: Launcher = Launcher.TORCHRUN) -> list[str]:
    base = [str(req_path), str(out_dir)]
    if launcher == Launcher.DEEPSPEED:
        # deepspeed==0.19.8 launcher/runner.py: --num_gpus ranks on this node, --module runs WORKER
        # with -m, --no_local_rank keeps --local_rank=N out of its arguments (LOCAL_RANK is set)
        runner = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}"]
        return [*runner, f"--master_port={_free_port()}", "--no_local_rank", "--module", WORKER, *base]
    if nproc <= 1:
        return [sys.executable, "-m", WORKER, *base]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        WORKER,
        *base,
    ]


def run_isolated(
    req: CaseRequest, nproc: int = 1, timeout: float | None = None, failure_log: Path | None = None
) -> list[Measurement]:
    """Run `req` in a fresh process (or `nproc` ranks of its engine's launcher); one Measurement
    per rank, in rank order. A rank that fails, or a case past `timeout`, stops every rank and
    raises one line; `failure_log`: where the workers' output tail is appended when it fails
    (a measurement batch keeps the whole traceback)."""
    with tempfile.TemporaryDirectory(prefix="vramplan-verify-") as tmp:
        tmp_path = Path(tmp)
        req_path = tmp_path / "request.json"
        req_path.write_text(req.model_dump_json())
        cmd = worker_command(req_path, tmp_path, nproc, launcher_for(req.setup))
        rc, tail = _run_group(cmd, timeout, nproc)
        outs = sorted(tmp_path.glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        try:
            _check_ranks(tmp_path, outs, nproc, rc, tail)
        except VramplanError as e:
            if failure_log is not None:
                with failure_log.open("a") as f:
                    f.write(f"==== {req.model} {req.setup.describe()} (layers {req.num_layers}): {e}\n{tail}\n")
            raise
        return [Measurement.model_validate_json(p.read_text()) for p in outs]


def _run_group(cmd: list[str], timeout: float | None, nproc: int) -> tuple[int, str]:
    """Run `cmd` in its own process group (the launcher and every rank); past `timeout`, SIGTERM
    the whole group, then SIGKILL what is left: no straggler outlives the case."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, without its banner
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            who = f"its {nproc} ranks" if nproc > 1 else "the worker"
            raise VramplanError(f"the case did not finish within {timeout:.0f} s; {who} were stopped") from None
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C): take the ranks down too
                _stop_group(proc)
        _stop_group(proc)  # ranks the launcher left behind
        log.seek(0)
        return rc, log.read()[-20000:]


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
        if wait is not None and not _group_alive(proc.pid):
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _check_ranks(folder: Path, outs: list[Path], nproc: int, rc: int, tail: str) -> None:
    """One line for the first rank that failed or gave no result."""
    errors = sorted(folder.glob("rank*.error"), key=lambda p: int(p.stem[4:]))
    if errors:
        rank = errors[0].stem[4:]
        raise VramplanError(
            f"rank {rank} of {nproc} failed: {errors[0].read_text().strip()}; the other ranks were stopped"
        )
    if len(outs) < max(nproc, 1):
        have = {int(p.stem[4:]) for p in outs}
        missing = [r for r in range(max(nproc, 1)) if r not in have]
        last = _last_error_line(tail)
        who = f"rank {missing[0]} of {nproc}" if nproc > 1 else "the worker"
        raise VramplanError(f"{who} exited ({rc}) with no result" + (f": {last}" if last else ""))


def _last_error_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    errs = [l for l in lines if "Error" in l or "error" in l or "Killed" in l]
    return (errs or lines or [""])[-1][:300]


def init_distributed(device: str) -> str:
    """Under torchrun: join the real process group; returns this rank's device."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:  # not under a launcher
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local}"))
        return f"cuda:{local}"
    count_frees_on_every_thread()
    with _gloo_with_one_worker_thread():
        dist.init_process_group("gloo")
    from vramplan.verify.measure import settle_collectives

    settle_collectives()  # makes its one-value tensor now, outside every trace
    return device


@contextlib.contextmanager
def _gloo_with_one_worker_thread():
    """init_process_group("gloo") builds ProcessGroupGloo with two worker threads (torch==2.13.0
    ProcessGroupGloo::Options threads=2) and passes no options through. A worker thread signals a
    collective's completion before it drops its reference to the collective's tensors
    (ProcessGroupGloo::runLoop: execute(work), then the lock, then `work` leaves scope), so a
    tensor the main thread has already let go of (FSDP1's padded unsharded gradient) is freed
    whenever that thread is next scheduled: under load, inside the optimizer phase (a +4 MiB
    optimizer peak on one rank of the fsdp1-2-full case in CI). With one worker thread, works
    run in order, and a collective's completion (measure.settle_collectives' all-reduce) means every
    earlier work's tensors are gone: the frees land where the fake process group has them."""
    c10d: Any = importlib.import_module("torch.distributed.distributed_c10d")
    base: Any = c10d.ProcessGroupGloo

    class OneWorkerGloo(base):
        def __init__(self, store, rank, size, timeout):
            opts = base._Options()
            opts._timeout = timeout
            opts._devices = [base.create_default_device()]
            opts._threads = 1
            super().__init__(store, rank, size, opts)

    c10d.ProcessGroupGloo = OneWorkerGloo
    try:
        yield
    finally:
        c10d.ProcessGroupGloo = base


def limit_allocator(device: str, limit: int) -> None:
    """A smaller GPU on a large one: torch.cuda.set_per_process_memory_fraction(limit / total),
    so the caching allocator refuses to hold more than `limit` bytes (allowed_memory_maximum
    in CUDACachingAllocator.cpp: past it, a cudaMalloc is treated as failed, the cached blocks
    are released and the request retried, then OutOfMemoryError). The CUDA context is outside
    the cap."""
    import torch

    if not device.startswith("cuda"):
        raise VramplanError("a memory limit needs a CUDA device", "memory_limit_bytes")
    dev = torch.device(device)
    if dev.index is None:  # set_per_process_memory_fraction wants an index (torch 2.11 _utils.py:888)
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(limit / total, 1.0), dev)


def count_frees_on_every_thread() -> None:
    """c10's CPU memory reporter counts a free only on a thread the profiler traces, unless
    FLAGS_caffe2_report_cpu_memory_usage is set (torch==2.13.0 c10/core/CPUAllocator.cpp,
    ProfiledCPUMemoryReporter::New/Delete: `if (FLAGS_caffe2_report_cpu_memory_usage ||
    profile_memory)`). gloo frees a collective's tensors on its worker thread when that thread
    drops the last reference: without the flag those bytes stay counted for the rest of the
    trace. With it, every thread's allocations and frees move the running total the trace
    reads at each traced allocation. The flag is a plain exported bool of libc10."""
    import ctypes

    import torch

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage").value = True


@contextlib.contextmanager
def rank_errors(out_dir: Path):
    """Any exception of this rank as one line in out_dir/rank<r>.error (the launcher reports
    it and stops the others), then exit 1."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure becomes one line for the launcher
        rank = int(os.environ.get("RANK", "0"))
        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
        line = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{at}"
        (out_dir / f"rank{rank}.error").write_text(line[:500] + "\n")
        traceback.print_exc()
        raise SystemExit(1) from None


def worker_main(argv: list[str]) -> int:
    req_path, out_dir = Path(argv[0]), Path(argv[1])
    with rank_errors(out_dir):
        req = CaseRequest.model_validate_json(req_path.read_text())
        device = init_distributed(req.device)
        from vramplan.verify.measure import run_case

        if req.memory_limit_bytes is not None:
            limit_allocator(device, req.memory_limit_bytes)
        rank0 = int(os.environ.get("RANK", "0")) == 0
        m = run_case(
            req.model,
            req.setup,
            device=device,
            num_layers=req.num_layers,
            steps=req.steps,
            alloc_history=req.alloc_history if rank0 else None,
        )
        if req.memory_limit_bytes is not None:
            m = m.model_copy(update={"memory_limit_bytes": req.memory_limit_bytes})
        if not device.startswith("cuda") and m.world > 1:
            m = m.model_copy(update={"notes": [*m.notes, GLOO_TRACE_NOTE]})
        tmp = out_dir / f".rank{m.rank}.json.tmp"
        tmp.write_text(m.model_dump_json())
        tmp.replace(out_dir / f"rank{m.rank}.json")
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
