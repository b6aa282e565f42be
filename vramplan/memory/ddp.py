"""DDP (torch.nn.parallel.DistributedDataParallel): every GPU holds the whole model, as
on one GPU, plus the reducer's gradient buckets.

Rule (torch==2.13.0): the Reducer is built in DDP.__init__ (nn/parallel/distributed.py
:1049-1083) and allocates one flat bucket per bucket at wrap time
(c10d/reducer.cpp Reducer::initialize_buckets: `bucket.gradients = at::empty({offset},
options)`), in the parameters' dtype, for parameters with requires_grad only
(distributed.py:1535 _build_params_for_reducer). Buckets are filled in reverse registration
order; the first is capped at 1 MiB (reducer.hpp kDefaultFirstBucketBytes, used when
bucket_cap_mb is left None: distributed.py:86-110), the others at 25 MiB
(_DEFAULT_BUCKET_CAP_MB); a bucket closes once it reaches its cap, so the cap only sets how
many buckets there are, not their total.

With gradient_as_bucket_view=False -- torch's default, accelerate's
DistributedDataParallelKwargs (accelerate==1.16.0 utils/dataclasses.py:165-170, only
non-default values are passed) and HF Trainer's (transformers==5.24.0 trainer.py:749-766
forwards no such flag) -- each .grad is a separate tensor copied into its bucket, so the
buckets are a second, persistent copy of the trainable gradients. With True the grads are
views of the buckets: no second copy. CPU-checked (fake process group, profiler live bytes):
+Pt*4 at wrap, grads + buckets at backward end with False, buckets only with True."""

from __future__ import annotations

from vramplan.memory.parameters import Param, grad_bytes
from vramplan.memory.storage import MiB, alloc
from vramplan.setup import TrainingSetup

FIRST_BUCKET_BYTES = 1 * MiB  # reducer.hpp kDefaultFirstBucketBytes (dist._DEFAULT_FIRST_BUCKET_BYTES)
BUCKET_CAP_BYTES = 25 * MiB  # distributed.py:31 _DEFAULT_BUCKET_CAP_MB = 25


def _registration_order(params: list[Param]) -> list[Param]:
    """Parameters as model.parameters() lists them: the embedding, the decoder layers, then
    the rest of the root (vramplan's list puts the root last)."""
    root = [p for p in params if p.layer is None]
    layers = [p for p in params if p.layer is not None]
    return root[:1] + layers + root[1:]


def bucket_sizes(
    params: list[Param], setup: TrainingSetup, first_cap: int = FIRST_BUCKET_BYTES, cap: int = BUCKET_CAP_BYTES
) -> list[int]:
    """Bytes of each gradient bucket (torch compute_bucket_assignment_by_size: one open bucket
    per dtype, in reverse registration order, closed once it reaches the current cap)."""
    open_: dict[int, int] = {}
    caps: dict[int, int] = {}
    out: list[int] = []
    for p in reversed(_registration_order(params)):
        b = grad_bytes(p, setup)
        if not b:
            continue
        open_[b] = open_.get(b, 0) + b * p.numel
        if open_[b] >= caps.get(b, first_cap):
            out.append(open_.pop(b))
            caps[b] = cap
    return out + [v for v in open_.values() if v]


def bucket_bytes(params: list[Param], setup: TrainingSetup, gradient_as_bucket_view: bool = False) -> int:
    """Persistent bytes DDP adds to one GPU: the buckets, a second copy of the trainable
    grads unless the grads are views of them (then the grads themselves are the buckets and
    the one-GPU gradient count already holds them)."""
    if gradient_as_bucket_view:
        return 0
    return sum(alloc(b) for b in bucket_sizes(params, setup))
