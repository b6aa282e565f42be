"""Optimizers: persistent state bytes per parameter, the largest temporary of a step,
layer-wise (per-parameter hook) optimizers, and GaLore's projectors and SVD refresh.
A new optimizer adds a branch to optimizer_state (its states) and optimizer_transient
(its step's temporaries)."""
from __future__ import annotations

from vramplan.categories import Category as C
from vramplan.memory.fsdp import shard_for
from vramplan.memory.parameters import Param, grad_bytes
from vramplan.memory.storage import Phase, alloc
from vramplan.memory.types import PhaseKind
from vramplan.setup import Optim, TrainingSetup

# bitsandbytes Optimizer2State: tensors with numel >= 4096 get uint8 state1/state2 and
# an fp32 absmax per block of 256; smaller tensors keep fp32 states.
BNB_MIN_8BIT, BNB_BLOCK = 4096, 256


def bnb8_state(n: int) -> int:
    """bitsandbytes 8-bit Adam state1 + state2 for n elements."""
    if n < BNB_MIN_8BIT:
        return 2 * alloc(4 * n)
    return 2 * (alloc(n) + alloc(4 * -(-n // BNB_BLOCK)))


def galore_rank(p: Param, setup: TrainingSetup) -> int:
    assert p.galore is not None
    m, n = p.galore
    return min(setup.galore_rank, m, n)


def _galore_state(p: Param, setup: TrainingSetup) -> int:
    """GaLore: Adam moments of the low-rank gradient plus the kept projector."""
    assert p.galore is not None
    m, n = p.galore
    r = galore_rank(p, setup)
    gbytes = grad_bytes(p, setup)
    low = r * max(m, n)  # low-rank gradient m x r (m >= n) or r x n
    moments = bnb8_state(low) if setup.optim.is_8bit else 2 * alloc(gbytes * low)
    # galore_projector.get_orthogonal_matrix: bf16 grads -> a fresh r*min(m,n) copy;
    # fp32 grads -> a slice view that keeps the whole U or Vh (min(m,n)^2) alive.
    proj = alloc(2 * r * min(m, n)) if gbytes == 2 else alloc(4 * min(m, n) ** 2)
    return moments + proj


def optimizer_state(p: Param, setup: TrainingSetup, numel: int) -> int:
    """Persistent optimizer bytes for one parameter (or its shard of `numel`)."""
    if not p.trainable:
        return 0
    if p.galore is not None:
        return _galore_state(p, setup)
    if setup.optim.is_8bit:
        return bnb8_state(numel)
    return 2 * alloc(grad_bytes(p, setup) * numel)  # torch AdamW: exp_avg, exp_avg_sq = zeros_like(p)


def optimizer_transient(params: list[Param], setup: TrainingSetup, world: int) -> int:
    """Largest temporary during optimizer.step() (steady state)."""
    trainable = [p for p in params if p.trainable]
    if not trainable:
        return 0
    optim = setup.optim
    if optim == Optim.ADAMW_TORCH:
        # torch.optim.AdamW foreach: _foreach_sqrt(exp_avg_sqs) allocates one copy of all
        # states of a device/dtype group at once. [cal: l32-1b full, phi3 full = 5x params]
        return sum(alloc(grad_bytes(p, setup) * (shard_for(p, setup) if world > 1 else p.numel)) for p in trainable)
    if optim in (Optim.ADAMW_TORCH_FUSED, Optim.ADAMW_BNB_8BIT):
        return 0  # fused kernels update in place
    worst = 0
    for p in trainable:
        g = grad_bytes(p, setup)
        if p.galore is None:
            # galore_torch AdamW plain group: denom = exp_avg_sq.sqrt(); exp_avg / denom
            t = 0 if optim.is_8bit else 2 * alloc(g * p.numel)
        else:
            m, n = p.galore
            # project_back (m*n) then * scale (m*n); 8-bit also p.saved_data = p.data.clone()
            t = (3 if optim.is_8bit else 2) * alloc(g * m * n)
        worst = max(worst, t)
    return worst


def layerwise_hook_bytes(params: list[Param], setup: TrainingSetup) -> dict[int | None, int]:
    """Per decoder layer (None: the root), the largest full gradient plus its optimizer's
    update temporaries: what one post-accumulate-grad hook adds while it steps."""
    out: dict[int | None, int] = {}
    for p in params:
        if p.trainable:
            b = alloc(grad_bytes(p, setup) * p.numel) + optimizer_transient([p], setup, 1)
            out[p.layer] = max(out.get(p.layer, 0), b)
    return out


def svd_transient(params: list[Param]) -> int:
    """GaLore projector refresh: grad.float() + torch.linalg.svd; [notes: ~5x the fp32 matrix]."""
    worst = 0
    for p in params:
        if p.galore is not None and p.trainable:
            m, n = p.galore
            k = min(m, n)
            worst = max(worst, alloc(4 * m * n) + alloc(4 * m * k) + alloc(4 * k * n) + 2 * alloc(4 * m * n))
    return worst


def galore_refresh_phase(params: list[Param], setup: TrainingSetup, base: Phase, grads: int) -> Phase:
    """Step 0 (and every update_proj_gap steps): SVD of one fp32 gradient at a time, on
    top of `base` (the persistent bytes). Layer-wise optimizers refresh inside their
    backward hooks, where no other gradient is held."""
    layerwise = setup.optim.layerwise
    ph = Phase(PhaseKind.GALORE_REFRESH_LAYERWISE if layerwise else PhaseKind.GALORE_REFRESH, parts=dict(base.parts))
    ph.add(C.GRADIENTS, grads if not layerwise else 0)
    ph.add(C.TRANSIENT, svd_transient(params))
    return ph
