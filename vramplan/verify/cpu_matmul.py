"""Half-precision matrix products at a usable speed on CPUs without bf16 instructions, with
the same allocations.

On an AVX2 CPU, ATen's cpublas falls back to a scalar loop for a bf16 or fp16 product of two
row-major operands (oneDNN's bf16 path needs AVX-512 BF16 or AMX): 512x4096 @ 4096x1024 takes
3.8-6.6 s, against 0.2-0.4 s with either operand column-major (docs/benchmarks.md, "The test
tiers"). Every linear layer's backward makes that product (grad_input = grad_output @ W), so
the CPU trace spent most of its time there.

`fast_half_matmul()` re-registers aten::mm and aten::bmm for the CPU: when both operands are
contiguous 2-byte floats, one operand is first laid out column-major in a numpy buffer, which
c10's allocator, and so the profiler's memory trace, never sees; the product is then written by
ATen's own `mm.out`/`bmm.out` into an output allocated as the native kernel allocates it (one
`aten::empty` of the result). The recorded allocations are the native kernel's; the values are
ATen's fp32-accumulated product of the same operands. Every other call keeps ATen's kernel.

oneDNN is switched off for the block. On a CPU that has AVX-512 BF16 or AMX, ATen hands a
half-precision product to oneDNN, whose gemm allocates a transient scratch buffer through c10
(seen on an AMD EPYC with avx512_bf16: 38,528 B for a [48, 96] x [96, 64] bf16 product), a
buffer the GPU's cuBLAS does not take from PyTorch's allocator. Without oneDNN every CPU runs
ATen's own kernels, which allocate only the result: the trace is the same on every machine.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

_HALF_BYTES = 2


def _column_major(t: Any) -> Any:
    """`t` (contiguous, 2-byte elements) as a view of a numpy buffer holding its last two
    dimensions transposed: the same values and shape, column-major, allocated outside c10.

    The source is read through its address, not `Tensor.numpy()`, which marks the tensor's
    storage as not resizable for good (torch/csrc/utils/tensor_numpy.cpp): FSDP resizes the
    storage of the parameters it gathers."""
    import ctypes

    import numpy as np
    import torch

    raw = (ctypes.c_int16 * t.numel()).from_address(t.data_ptr())
    bits = np.frombuffer(raw, dtype=np.int16).reshape(tuple(t.shape))
    swapped = np.ascontiguousarray(np.swapaxes(bits, -1, -2))
    return torch.from_numpy(swapped).view(t.dtype).transpose(-1, -2)


def _both_row_major_half(a: Any, b: Any) -> bool:
    return (
        a.dtype == b.dtype
        and a.dtype.is_floating_point
        and a.element_size() == _HALF_BYTES
        and a.is_contiguous()
        and b.is_contiguous()
        and not a.is_conj()
        and not b.is_conj()
    )


def _smaller_column_major(a: Any, b: Any) -> tuple[Any, Any]:
    """Copy the smaller operand: either column-major operand reaches ATen's fast loop."""
    if a.numel() <= b.numel():
        return _column_major(a), b
    return a, _column_major(b)


def _mm(a: Any, b: Any) -> Any:
    import torch

    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    if _both_row_major_half(a, b):
        a, b = _smaller_column_major(a, b)
    return torch.ops.aten.mm.out(a, b, out=out)


def _bmm(a: Any, b: Any) -> Any:
    import torch

    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype, device=a.device)
    if _both_row_major_half(a, b):
        a, b = _smaller_column_major(a, b)
    return torch.ops.aten.bmm.out(a, b, out=out)


@contextlib.contextmanager
def fast_half_matmul() -> Iterator[None]:
    """aten::mm and aten::bmm on the CPU as described above, until the block ends."""
    import torch

    lib = torch.library.Library("aten", "IMPL")
    no_onednn = torch.backends.mkldnn.flags(enabled=False)
    with warnings.catch_warnings():
        # flags() also sets oneDNN's TF32 switch, and warns that no Intel GPU is there to use it
        warnings.filterwarnings("ignore", message=r"(?s).*TF32 acceleration on top of oneDNN")
        no_onednn.__enter__()
    with warnings.catch_warnings():
        # torch warns once that a registered kernel is overridden: that is the point here
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        lib.impl("mm", _mm, "CPU")
        lib.impl("bmm", _bmm, "CPU")
    try:
        yield
    finally:
        lib._destroy()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*TF32 acceleration on top of oneDNN")
            no_onednn.__exit__(None, None, None)
