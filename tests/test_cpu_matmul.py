"""cpu_matmul.fast_half_matmul: the CPU trace's faster half-precision products must record the
allocations ATen's own kernels record, produce their values, and leave ATen's kernels in place
afterwards. Each case runs once natively and once under the override, under the profiler."""

from __future__ import annotations

import pytest
import torch

from vramplan.verify import cpu_matmul
from vramplan.verify.cpu_matmul import fast_half_matmul
from vramplan.verify.cputrace import AllocationTrace


def _allocation_sizes(trace: AllocationTrace) -> list[int]:
    from torch._C._profiler import _EventType

    events, stack = [], list(trace._prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation:
            events.append((e.start_time_ns, e.typed[1].alloc_size))
        stack.extend(e.children)
    return [size for _, size in sorted(events)]


def _linear_step(dtype):
    """A linear layer's forward and backward over a 3-d input: grad_input is the row-major
    product the override speeds up, grad_weight a product it leaves alone."""
    x = torch.randn(2, 24, 64, dtype=dtype, requires_grad=True)
    w = torch.randn(96, 64, dtype=dtype, requires_grad=True)
    torch.nn.functional.linear(x, w).float().sum().backward()
    return x.grad, w.grad


def _attention_step(dtype):
    """Eager attention's batched products: probs @ v is row-major on both sides."""
    q = torch.randn(2, 4, 32, 16, dtype=dtype, requires_grad=True)
    probs = torch.matmul(q, q.transpose(-1, -2)).softmax(-1)
    torch.matmul(probs, q).float().sum().backward()
    return (q.grad,)


def _expanded_bmm(dtype):
    """A stride-0 batch (torchtune's chunked head under LoRA): ATen's own bmm copies it, and
    so must the trace (cputrace.cpu_head_bmm_copy)."""
    a = torch.randn(3, 8, 32, dtype=dtype)
    b = torch.randn(1, 32, 16, dtype=dtype).expand(3, 32, 16)
    return (torch.bmm(a, b),)


def _plain_mm(dtype):
    a, b = torch.randn(40, 24, dtype=dtype), torch.randn(24, 56, dtype=dtype)
    return (a @ b, a.t() @ a)


# (case, dtype, whether a product takes the column-major route)
CASES = [
    (_linear_step, torch.bfloat16, True),
    (_linear_step, torch.float16, True),
    (_attention_step, torch.bfloat16, True),
    (_expanded_bmm, torch.bfloat16, False),
    (_plain_mm, torch.bfloat16, True),
    (_plain_mm, torch.float32, False),
]


def _run(case, dtype, context):
    torch.manual_seed(0)
    with context, AllocationTrace() as trace:
        values = case(dtype)
    return _allocation_sizes(trace), values


@pytest.mark.parametrize("case, dtype, rerouted", CASES, ids=[f"{c.__name__}-{d}" for c, d, _ in CASES])
def test_same_allocations_and_values(case, dtype, rerouted, monkeypatch):
    copies = []
    column_major = cpu_matmul._column_major
    monkeypatch.setattr(cpu_matmul, "_column_major", lambda t: copies.append(t.shape) or column_major(t))
    # ATen's own kernels, without oneDNN (whose bf16 gemm allocates scratch through c10 on CPUs
    # with AVX-512 BF16 or AMX): what the trace runs on every machine
    native_sizes, native_values = _run(case, dtype, torch.backends.mkldnn.flags(enabled=False))
    assert not copies
    fast_sizes, fast_values = _run(case, dtype, fast_half_matmul())
    assert bool(copies) == rerouted
    assert native_sizes, "the case must allocate for the comparison to mean anything"
    assert fast_sizes == native_sizes
    for fast, native in zip(fast_values, native_values, strict=True):
        torch.testing.assert_close(fast, native)


def test_aten_kernels_come_back():
    onednn = torch.backends.mkldnn.enabled
    with fast_half_matmul():
        assert "cpu_matmul" in torch._C._dispatch_dump("aten::mm")
        assert "cpu_matmul" in torch._C._dispatch_dump("aten::bmm")
        assert not torch.backends.mkldnn.enabled
    assert "cpu_matmul" not in torch._C._dispatch_dump("aten::mm")
    assert "cpu_matmul" not in torch._C._dispatch_dump("aten::bmm")
    assert torch.backends.mkldnn.enabled == onednn


def test_operands_stay_resizable():
    """FSDP frees and refills the storage of the parameters it gathers (untyped_storage().resize_):
    a product under the override must leave its operands' storage resizable."""
    a, b = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16)
    with fast_half_matmul():
        a @ b
        torch.bmm(a.view(2, 8, 8), a.view(2, 8, 8))
    for t in (a, b):
        t.untyped_storage().resize_(0)
        t.untyped_storage().resize_(t.numel() * t.element_size())
