"""Run the reference step on the CPU and trace every allocation: the CPU analogue of
``torch.cuda.max_memory_allocated()``, per phase, without a GPU.

c10's CPU allocator reports each allocation and free to the profiler together with the
running total of live bytes (ProfiledCPUMemoryReporter), so with
``torch.profiler.profile(profile_memory=True)`` the largest ``total_allocated`` inside a
phase is that phase's peak, kernel workspaces and FSDP2 storage resizes included. The step
is built by the same code as ``vramplan verify`` (build.build_step on device "cpu").

Where CPU kernels differ from CUDA's, the trace differs from a GPU too (docs/verify.md):
CPU offload cannot move
anything off the device (host and device are one memory). Where the difference is only in
what a kernel allocates, the trace runs CUDA's choice: hqq's fp16 working dtype, foreach
AdamW, dropout's bool mask (the cuda_like_* helpers, which verify's CPU run uses
too). Used to check the memory model's structure in CI.
"""

from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from vramplan.setup import ModelDtype, OptimFamily, OptimLibrary, Precision, TrainingSetup

if TYPE_CHECKING:
    from vramplan.verify.allocstream import RecordedStream

_MARK = "vramplan.phase:"


class TracedPhase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="build, forward, backward or optimizer")
    step: int | None
    peak_bytes: int = Field(description="largest live CPU-allocator total inside the phase")
    end_bytes: int = Field(description="live bytes when the phase ended")


class TracedStep(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    phases: list[TracedPhase]

    def peak(self, name: str, step: int | None = None) -> int:
        """Peak of a phase (the last step's when step is None; build has no step)."""
        found = [p for p in self.phases if p.name == name and (step is None or p.step == step)]
        return found[-1].peak_bytes

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases)


def _allocations(prof) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]]]:
    """(time, live bytes) at every CPU allocation/free, and (mark, start, end) of each phase.

    The reporter's running total is process-wide: it still counts what earlier profiled
    code allocated and has not freed. Live bytes are taken relative to the total just
    before the first event, so only what this trace allocated counts."""
    from torch._C._profiler import _EventType

    events, marks = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == "cpu":
            events.append((e.start_time_ns, e.typed[1].total_allocated, e.typed[1].alloc_size))
        elif e.name.startswith(_MARK):
            marks.append((e.name[len(_MARK) :], e.start_time_ns, e.end_time_ns))
        stack.extend(e.children)
    events.sort()
    base = events[0][1] - events[0][2] if events else 0
    return [(t, total - base) for t, total, _ in events], sorted(marks, key=lambda m: m[1])


def _phases(allocs, marks) -> list[TracedPhase]:
    out, i, live = [], 0, 0
    for label, start, end in marks:
        while i < len(allocs) and allocs[i][0] < start:
            live = allocs[i][1]
            i += 1
        peak = live
        while i < len(allocs) and allocs[i][0] <= end:
            live = allocs[i][1]
            peak = max(peak, live)
            i += 1
        name, _, step = label.partition("#")
        out.append(TracedPhase(name=name, step=int(step) if step else None, peak_bytes=peak, end_bytes=live))
    return out


class AllocationTrace:
    """Every CPU allocation from entering to leaving, with phases marked by ``phase()``;
    ``phases()`` reads them once the trace is closed (the profiler reports at the end)."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> AllocationTrace:
        gc.collect()  # what earlier code left to the collector must not count here
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)

    @staticmethod
    def phase(name: str, step: int | None = None):
        from torch.profiler import record_function

        return record_function(_MARK + name + ("" if step is None else f"#{step}"))

    def phases(self) -> list[TracedPhase]:
        return _phases(*_allocations(self._prof))


def trace_step(model: str, setup: TrainingSetup, num_layers: int | None = None, steps: int = 2) -> TracedStep:
    """Build the reference step on the CPU and run ``steps`` steps under the allocation tracer."""
    return TracedStep(phases=_run_traced(model, setup, num_layers, steps).phases())


def trace_step_stream(
    model: str, setup: TrainingSetup, num_layers: int | None = None, steps: int = 2
) -> tuple[TracedStep, RecordedStream]:
    """trace_step, and the allocation stream it recorded (every allocation and free, with the
    phases' event ranges: allocstream.events_from_trace), for the allocator replay."""
    from vramplan.verify.allocstream import events_from_trace

    trace = _run_traced(model, setup, num_layers, steps)
    return TracedStep(phases=trace.phases()), events_from_trace(trace)


def _run_traced(model: str, setup: TrainingSetup, num_layers: int | None, steps: int) -> AllocationTrace:
    import torch

    from vramplan.verify.build import build_step

    with AllocationTrace() as trace:
        with trace.phase("build"), cuda_like_build():
            built = build_step(model, setup, device="cpu", num_layers=num_layers)
            cuda_like_optimizer(built)
        try:
            with cuda_like_steps():
                for step in range(steps):
                    for micro in range(setup.gradient_accumulation):  # the last one's phases are the step's
                        if micro:
                            built.accumulate()
                        ids = built.batch()
                        with trace.phase("forward", step):
                            loss = built.forward(ids)
                        with trace.phase("backward", step):
                            built.backward(loss)
                            del loss
                    with trace.phase("optimizer", step):
                        built.optimizer_step()
        finally:
            built.close()
            if torch.distributed.is_initialized():  # the fake group of FSDP, DDP or FSDP1
                torch.distributed.destroy_process_group()
    return trace


# What the CPU trace cannot compare with a CUDA estimate (docs/verify.md, "CPU trace"): a
# kernel that allocates differently on the CPU, not a difference in what the step holds.
def incomparable_on_cpu(setup: TrainingSetup) -> list[str]:
    out = []
    from vramplan.memory.precision import fp32_stream_autocast

    if setup.precision == Precision.FP16 and setup.fsdp == 1:
        out.append("fp16 autocast (the CPU's cast policy is not CUDA's)")
    elif fp32_stream_autocast(setup):
        # over bf16 weights the stream stays bf16 and both policies run the same ops in bf16
        out.append("bf16 autocast over fp32 weights (the CPU's cast policy is not CUDA's)")
    if setup.optim.traits.library == OptimLibrary.BITSANDBYTES or (setup.optim.is_galore and setup.optim.is_8bit):
        out.append("the bitsandbytes optimizer step (8-bit, 32-bit or paged: its CPU fallback allocates temporaries)")
    if setup.optim.traits.family == OptimFamily.STABLE_ADAMW:
        # torch-optimi 0.3.3 stableadamw.py:150-151 (_default_to_triton): Triton kernels on CUDA,
        # the per-tensor torch path here
        out.append("the StableAdamW optimizer step (optimi: Triton kernels on CUDA, a per-tensor fallback on the CPU)")
    if setup.optim.traits.family == OptimFamily.ADAM_MINI and setup.weight_dtype != ModelDtype.FP32:
        # adam_mini.py:269, 309: torch.mean(grad * grad, dim=1) over bf16; ATen's mean_out on the
        # CPU casts a low-precision input to fp32 first (ReduceOps.cpp), CUDA's reduction does not
        out.append("the Adam-mini optimizer step over bf16 weights (the CPU's mean reduces through an fp32 copy)")
    if setup.optim.traits.library == OptimLibrary.TORCHAO:
        out.append("torchao's compiled low-bit step (inductor's CPU kernels are not CUDA's)")
    if setup.quant is not None and setup.quant.value == "nf4":
        out.append("bitsandbytes' 4-bit quantize/dequantize (torch-op fallbacks on the CPU)")
    if setup.quant is not None and setup.quant.value == "int8":
        # bitsandbytes==0.50.2 autograd/_functions.py:403-405: MatMul8bitFp while training on the CPU
        out.append("LLM.int8's matmul (the CPU dequantizes the weight, CUDA quantizes the input)")
    if setup.cpu_offload or setup.offload_optimizer or setup.offload_params:
        out.append("CPU offload (host and device are one memory)")
    return out


def cpu_head_bmm_copy(batch_size: int, vocab: int, hidden: int, compute_bytes: int = 2) -> int:
    """Bytes the CPU's bmm copies where CUDA's does not: torchtune's output layer runs on each
    non-contiguous chunk of the hidden state; with lm_head frozen (LoRA) matmul does not fold
    it (folding copies the chunk; ATen LinearAlgebra.cpp should_fold folds when the weight
    needs a grad: traced, mm under full fine-tuning, bmm under LoRA) and calls bmm with the
    weight expanded over the batch. CUDA hands the stride-0 batch to cuBLAS (Blas.cpp
    prepare_batch_matrix_for_cublas looks only at the two inner strides); the CPU kernel
    makes it contiguous, B copies of lm_head's weight
    (traced: aten::empty of B·V·h·2 bytes under aten::bmm at every chunk, forward and backward).
    It is the trace's peak only where the loss holds little else: the compiled chunked loss."""
    return batch_size * vocab * hidden * compute_bytes


def cpu_int8_forward_parts(lin, input_bytes: int, tokens: int, with_output: bool = True) -> list[int]:
    """quantization.int8_forward_parts as the CPU runs it, per token of a `tokens`-token step:
    bitsandbytes' matmul runs MatMul8bitFp on the CPU while training (bitsandbytes==0.50.2
    autograd/_functions.py:403-405), which dequantizes the whole weight, `CB.to(A.dtype).mul_(
    SCB.unsqueeze(1).mul(1.0 / 127.0))`, and calls F.linear (:263-264): the weight in the input's
    dtype, the scaled row absmax, then the in-place multiply's fp32 temporaries
    (cpu_mixed_inplace) or the output; CUDA's MatMul8bitLt quantizes the input instead."""
    per_token = lambda nbytes: -(-nbytes // tokens)  # noqa: E731
    mixed = per_token(cpu_mixed_inplace(lin.numel, input_bytes))
    last = max(mixed, input_bytes * lin.out_features) if with_output else mixed
    return [per_token(input_bytes * lin.numel), per_token(4 * lin.out_features), last]


def cpu_mixed_inplace(numel: int, element_bytes: int) -> int:
    """Bytes the CPU adds to a bf16 tensor's in-place multiply by an fp32 one: TensorIterator on
    the CPU casts to the common dtype through temporaries, the input's fp32 copy and an fp32
    result copied back (traced: aten::to and aten::empty_like of 4 bytes per element under
    aten::mul_), where a CUDA kernel casts in registers. 0 when the tensor is fp32 already."""
    from vramplan.memory.storage import alloc

    return 2 * alloc(4 * numel) if element_bytes == 2 else 0


def cpu_int8_dequantize_delta(numel: int, in_features: int, tokens: int, input_bytes: int) -> int:
    """The CPU's LLM.int8 backward at the dequantized weight beyond the estimate's moment (the
    CUDA one): MatMul8bitLt/Fp.backward scale CB in place (cpu_mixed_inplace), before the input
    grad, which the estimate's moment holds, exists."""
    from vramplan.memory.storage import alloc

    return max(cpu_mixed_inplace(numel, input_bytes) - alloc(tokens * input_bytes * in_features), 0)


@contextlib.contextmanager
def cuda_like_steps():
    """Dropout as CUDA's native_dropout holds memory: the output and a bool mask, which
    backward keeps and reads in one masked scale. The CPU kernel keeps a noise tensor of the
    input's dtype instead (4 bytes per element for peft's fp32 adapter input, not 1), so
    without this the CPU trace cannot check LoRA dropout. Only nn.Dropout's call is
    replaced (functional.dropout, looked up at call time); evaluation and p = 0 pass through.
    Half-precision products run through cpu_matmul.fast_half_matmul: the same allocations,
    several times faster on a CPU without bf16 instructions."""
    import torch
    import torch.nn.functional as F

    from vramplan.verify.cpu_matmul import fast_half_matmul

    class _Dropout(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, p):
            mask = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)
            ctx.save_for_backward(mask)
            ctx.scale = 1.0 / (1 - p)
            return torch.where(mask, x, 0).mul_(ctx.scale)

        @staticmethod
        def backward(ctx, grad):
            (mask,) = ctx.saved_tensors
            return torch.where(mask, grad, 0).mul_(ctx.scale), None

    saved = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0 or inplace:
            return saved(input, p, training, inplace)
        return _Dropout.apply(input, p)

    F.dropout = dropout
    try:
        with cuda_like_trl(), fast_half_matmul():
            yield
    finally:
        F.dropout = saved


class _RowByRow:
    """A Triton launch `kernel[grid](tile, ...)` as trl's torch fold of one row at a time:
    the Triton kernels keep a row in registers, the CPU fold (_forward_tile/_backward_tile)
    makes several fp32 copies of the whole tile. Row views are updated in place."""

    def __init__(self, fold, rows_first: int):
        self.fold, self.rows_first = fold, rows_first

    def __getitem__(self, grid):
        def launch(tile, stride, *args, **kw):
            for i in range(grid[0]):
                row = [a[i : i + 1] if hasattr(a, "dim") and a.dim() == 1 else a for a in args[: self.rows_first]]
                self.fold(tile[i : i + 1], stride, *row, *args[self.rows_first :], **kw)

        return launch


def _addmm_fp32_blocked(acc, a, b, rows: int = 64) -> None:
    """`acc += a @ b` without an fp32 copy of a or b: CUDA's addmm(out_dtype=float32) makes
    none (trl/kernels/chunked_logprob.py:_addmm_fp32); here a few rows at a time."""
    for i in range(0, acc.shape[0], rows):
        acc[i : i + rows].add_(a[i : i + rows] @ b)


@contextlib.contextmanager
def cuda_like_trl():
    """trl==1.16.0's fused LM head as it runs on CUDA (trl/kernels/chunked_logprob.py, trl/
    trainer/utils.py:_fused_forward): the labelled rows gathered (`compact`), the per-row
    Triton folds, fp32 accumulation without copies. Only when the step loaded trl."""
    import sys

    kernel: Any = sys.modules.get("trl.kernels.chunked_logprob")
    utils: Any = sys.modules.get("trl.trainer.utils")
    if kernel is None or utils is None:
        yield
        return
    import types

    saved = {
        name: getattr(kernel, name, None)
        for name in ("_use_triton", "_forward_kernel", "_backward_kernel", "_addmm_fp32", "triton")
    }
    saved_utils = utils._use_triton
    # forward fold: (targets, 7 running statistics) are per-row; backward: (targets, log_z, entropy,
    # grad_logprobs, grad_entropy)
    kernel._forward_kernel = _RowByRow(kernel._forward_tile, 8)
    kernel._backward_kernel = _RowByRow(kernel._backward_tile, 5)
    kernel._use_triton = utils._use_triton = lambda device: True
    kernel._addmm_fp32 = _addmm_fp32_blocked
    kernel.triton = types.SimpleNamespace(cdiv=lambda a, b: -(-a // b))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                delattr(kernel, name)
            else:
                setattr(kernel, name, value)
        utils._use_triton = saved_utils


@contextlib.contextmanager
def cuda_like_build():
    """hqq quantizes in an fp16 working copy on CUDA and in fp32 elsewhere
    (optimize_weights_proximal picks by device type): trace the CUDA choice."""
    try:
        import hqq.core.optimize as opt
    except ImportError:
        yield
        return
    import torch

    saved, opt.float32 = opt.float32, torch.float16
    try:
        yield
    finally:
        opt.float32 = saved


def cuda_like_optimizer(built) -> None:
    """torch's optimizers default to foreach on CUDA but not on the CPU (torch/optim/optimizer.py
    _default_to_fused_or_foreach): run what CUDA runs."""
    traits = built.setup.optim.traits
    if traits.library == OptimLibrary.TORCH and not traits.fused:
        for opt in built.optimizers:
            for group in opt.param_groups:
                group["foreach"] = True
