"""Optimizers: persistent state bytes per parameter (by family and library, vramplan.setup
OptimTraits), the largest temporary of a step, optimizers stepped inside backward (layer-wise,
LOMO, --optimizer-in-backward), and GaLore's projectors and SVD refresh.

Sources (read at these versions; docs/memory-model.md, "Optimizers", has the table):
torch==2.13.0 torch/optim/{adam,sgd,adagrad,rmsprop}.py; bitsandbytes==0.50.2 optim/optimizer.py,
optim/ademamix.py; torchao==0.18.0 optim/adam.py, subclass_{8,4}bit.py; transformers==5.25.0
optimization.py (Adafactor), trainer_optimizer.py (what HF passes); schedulefree==1.4.1;
galore-torch==1.0; apollo-torch==1.0.3 apollo_torch/apollo.py, random_projector.py;
lomo-optim==0.1.1 lomo.py, adalomo.py; grokadamw==0.1.2; torch-optimi==0.3.3 stableadamw.py;
llamafactory==0.9.5 third_party/muon/muon.py; adam-mini==1.1.1 adam_mini.py. A new optimizer adds
its traits (setup.py), a branch to _family_state (its states) and to _family_transient (its step's temporaries)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

from vramplan.categories import Category as C
from vramplan.errors import VramplanError
from vramplan.memory.context import StaticBytes
from vramplan.memory.fsdp import shard_for
from vramplan.memory.parameters import Param, grad_bytes
from vramplan.memory.storage import Phase, alloc
from vramplan.memory.types import ATTENTION_ROLES, MLP_ROLES, ParamKind, PhaseKind
from vramplan.model_spec import ModelSpec, narrower_than
from vramplan.setup import (
    Method,
    ModelDtype,
    OptimFamily,
    OptimLibrary,
    OptimTraits,
    StateDtype,
    StateHome,
    TrainingSetup,
)

F = OptimFamily

# bitsandbytes Optimizer{1,2}State: tensors with numel >= 4096 get uint8 states and an fp32
# absmax per block of 256; smaller tensors keep fp32 states (bitsandbytes 0.50.2
# optim/optimizer.py:502-529, 674-695). Paged: only state buffers of tensors with numel >= 1e5
# come from F.get_paged (CUDA managed memory); absmax is always a plain allocation (:374-390).
BNB_MIN_8BIT, BNB_BLOCK, BNB_PAGED_MIN = 4096, 256, 100_000
# torchao 0.18.0 optim/adam.py:71-79: quantized iff numel >= 4096 and numel % block_size == 0;
# transformers 5.25.0 trainer_optimizer.py:450-476 passes block_size=256 (AdamW4bit's own is 128).
# Per state: codes + an fp32 scale per block + a qmap of 256 (8-bit) or 16 (4-bit) fp32.
TORCHAO_MIN, TORCHAO_BLOCK, TORCHAO_QMAP = 4096, 256, {8: 256, 4: 16}
# torch Adam/AdamW with fused=True: state["step"] is a 0-d fp32 tensor on the param's device,
# one allocator block per trainable tensor (torch 2.13.0 torch/optim/adam.py:165-176)
STEP_SCALAR = alloc(4)


@dataclass(frozen=True)
class StateBytes:
    """One parameter's optimizer states by where they live."""

    device: int = 0  # ordinary CUDA allocations
    paged: int = 0  # CUDA unified memory (bitsandbytes paged): resident, outside torch's statistics
    host: int = 0  # host RAM (grokadamw)


def bnb8_state(n: int) -> int:
    """bitsandbytes 8-bit Adam state1 + state2 for n elements."""
    return sum(_bnb_buffers(F.ADAMW, 2, 8, n))


def _bnb_buffers(family: OptimFamily, moments: int, bits: int, n: int) -> tuple[int, int]:
    """(state buffers, absmax vectors) of one bitsandbytes optimizer for a tensor of n elements.
    AdEMAMix's state1 is a double buffer (2, *shape) with absmax1 (2, blocks)
    (bitsandbytes 0.50.2 optim/ademamix.py:165-173, 260-267)."""
    elems = [2 * n, n] if family == F.ADEMAMIX else [n] * moments
    if bits == 8 and n >= BNB_MIN_8BIT:
        blocks = -(-n // BNB_BLOCK)
        absmax = [2 * blocks, blocks] if family == F.ADEMAMIX else [blocks] * moments
        return sum(alloc(e) for e in elems), sum(alloc(4 * b) for b in absmax)
    return sum(alloc(4 * e) for e in elems), 0  # fp32 whatever the param dtype (:509-510)


def _bnb_state(t: OptimTraits, n: int) -> StateBytes:
    states, absmax = _bnb_buffers(t.family, t.moments, t.bits, n)
    if t.paged and n >= BNB_PAGED_MIN:
        return StateBytes(device=absmax, paged=states)
    return StateBytes(device=states + absmax)


def _torchao_state(t: OptimTraits, n: int, pbytes: int) -> int:
    """torchao AdamW8bit/AdamW4bit: exp_avg and exp_avg_sq quantized, else zeros_like(p)."""
    if n >= TORCHAO_MIN and n % TORCHAO_BLOCK == 0:
        one = alloc(n * t.bits // 8) + alloc(4 * n // TORCHAO_BLOCK) + alloc(4 * TORCHAO_QMAP[t.bits])
    else:
        one = alloc(pbytes * n)
    return t.moments * one


def _local_dims(p: Param, n: int) -> tuple[int, ...]:
    """The shape of the local tensor (FSDP2 shards dim 0)."""
    dims = p.dims
    return (dims[0] * n // p.numel, *dims[1:]) if n != p.numel else dims


def _factored(dims: tuple[int, ...]) -> int:
    """Adafactor's fp32 second moment: exp_avg_sq_row shape[:-1] + exp_avg_sq_col shape[:-2]+shape[-1:]
    for >= 2-D, a full exp_avg_sq for 1-D (transformers 5.25.0 optimization.py:1186-1189, 1233-1250)."""
    if len(dims) < 2:
        return alloc(4 * dims[0])
    return alloc(4 * prod(dims[:-1])) + alloc(4 * prod(dims[:-2]) * dims[-1])


def _adalomo_state(p: Param, n: int) -> int:
    """AdaLomo: fp32 rows (and columns for >= 2-D, of the first two dims only) for EVERY named
    parameter, trainable or not (lomo-optim 0.1.1 adalomo.py:84-96)."""
    dims = _local_dims(p, n)
    return alloc(4 * dims[0]) + (alloc(4 * dims[1]) if len(dims) >= 2 else 0)


def apollo_target(p: Param) -> bool:
    """APOLLO projects the attention and MLP Linear weights (HF optim_target_modules, as GaLore's)."""
    return p.trainable and p.kind == ParamKind.DENSE and p.role in (*ATTENTION_ROLES, *MLP_ROLES) and len(p.dims) == 2


def _apollo_state(p: Param, g: int, n: int, rank: int) -> int:
    """apollo-torch 1.0.3: AdamW moments of the r x max(m,k) projected gradient plus the random
    projector r x min(m,k), grad dtype (apollo.py:139-142, random_projector.py:108-172). The rank
    is setup.apollo_rank (HF's 128 unless optim_args name one, LLaMA-Factory's apollo_rank 16)."""
    if not apollo_target(p):
        return 2 * alloc(g * n)
    m, k = _local_dims(p, n)
    return 2 * alloc(g * rank * max(m, k)) + alloc(g * rank * min(m, k))


def _adam_mini_state(p: Param, g: int, n: int) -> int:
    """adam-mini 1.1.1 adam_mini.py:230-350, states zeros_like the parameter (its dtype): biases
    keep Adam's m and v; every other tensor keeps m and a vmean of one value per block: per head
    for q/k (a few dozen), per output row for the other >= 2-D weights (embedding, lm_head, v, o,
    MLP: m[:, 0:1]), one 0-d tensor for norm weights. q/k are counted per row too: at most
    dims[0] values, a few KiB above the per-head count on a 70B, below the allocator's rounding
    of everything else."""
    dims = _local_dims(p, n)
    if len(dims) == 1:
        return 2 * alloc(g * n) if p.role is not None else alloc(g * n) + alloc(g)  # bias / norm
    return alloc(g * n) + alloc(g * n // dims[1])


def muon_param(p: Param) -> bool:
    """LLaMA-Factory 0.9.5 train/trainer_utils.py:498-524: 2-D and not the embedding or lm_head
    (the root's 2-D tensors) -> Muon; everything else -> its AdamW."""
    return len(p.dims) == 2 and p.layer is not None


def galore_rank(p: Param, setup: TrainingSetup) -> int:
    assert p.galore is not None
    m, n = p.galore
    return min(setup.galore_rank, m, n)


def check_galore_rank(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """galore_torch's projector slices the SVD's factors (galore-torch==1.0
    galore_projector.py get_orthogonal_matrix: U[:, :rank], Vh[:rank, :]), so a rank above a
    weight's smaller dimension projects that weight at full rank (galore_rank clamps it so).
    Refused only above every decoder Linear's smaller dimension (nothing would be projected
    to a lower rank); above some of them, a note."""
    if setup.method != Method.GALORE:
        return []
    linears = [lin for layer in spec.layers for lin in layer.linears]
    if not linears:
        return []
    r, widest = setup.galore_rank, max(lin.narrow_dim for lin in linears)
    if r > widest:
        raise VramplanError(
            f"rank {r} is larger than every projected weight's smaller dimension (largest {widest}): "
            "GaLore would project nothing to a lower rank",
            "--galore-rank",
        )
    below = narrower_than(linears, r)
    return (
        [f"GaLore rank {r} is above the smaller dimension of {', '.join(below)}: those are projected at full rank"]
        if below
        else []
    )


def _galore_state(p: Param, setup: TrainingSetup) -> int:
    """GaLore: the inner optimizer's states of the low-rank gradient plus the kept projector."""
    assert p.galore is not None
    m, n = p.galore
    r = galore_rank(p, setup)
    gbytes = grad_bytes(p, setup)
    low = r * max(m, n)  # low-rank gradient m x r (m >= n) or r x n
    if setup.optim.traits.family == F.GALORE_ADAFACTOR:
        # galore_torch/adafactor.py:178-193: grad.float() before the projection: fp32 projector
        # and factored states of the low-rank gradient
        return _factored((m, r) if m >= n else (r, n)) + alloc(4 * min(m, n) ** 2)
    moments = bnb8_state(low) if setup.optim.is_8bit else 2 * alloc(gbytes * low)
    # galore_projector.get_orthogonal_matrix: bf16 grads -> a fresh r*min(m,n) copy;
    # fp32 grads -> a slice view that keeps the whole U or Vh (min(m,n)^2) alive.
    proj = alloc(2 * r * min(m, n)) if gbytes == 2 else alloc(4 * min(m, n) ** 2)
    return moments + proj


def _family_state(p: Param, setup: TrainingSetup, n: int) -> int:
    """Device bytes of the optimizers whose states are ordinary allocations, by family."""
    t, g = setup.optim.traits, grad_bytes(p, setup)
    fam = t.family
    if fam in (F.SGD, F.LOMO):
        return 0  # SGD: momentum_buffer only if momentum != 0, and HF passes only lr (torch sgd.py:~454)
    if fam in (F.ADAFACTOR, F.GALORE_ADAFACTOR):
        return _factored(_local_dims(p, n))
    if fam == F.APOLLO_ADAMW:
        return _apollo_state(p, g, n, setup.apollo_rank)
    if fam == F.MUON:
        return (1 if muon_param(p) else 2) * alloc(g * n)
    if fam == F.ADAM_MINI:
        return _adam_mini_state(p, g, n)
    if fam == F.STABLE_ADAMW:
        # torch-optimi 0.3.3 stableadamw.py:115-130 with its Triton kernels (CUDA): exp_avg and
        # exp_avg_sq, a Kahan buffer for bf16/fp16 params, else a 1-byte placeholder; eps_sq a 0-d
        # tensor and mean_square a 1-element fp32 tensor (CPU trace: full-/lora-stable_adamw, whose
        # per-tensor CPU path has no placeholder or mean_square: 2 blocks of 512 B per parameter)
        return 2 * alloc(g * n) + (alloc(2 * n) if g == 2 else STEP_SCALAR) + 2 * STEP_SCALAR
    if fam == F.GALORE_ADAMW and t.bits == 8:
        return bnb8_state(n)  # GaLoreAdamW8bit's plain group is bitsandbytes' AdamW8bit
    dtype_bytes = 4 if t.state_dtype == StateDtype.FP32 else g
    fused = STEP_SCALAR if t.fused and t.library == OptimLibrary.TORCH else 0
    # torch AdamW/Adagrad/RMSprop, schedulefree (z + exp_avg_sq), anyprecision: zeros_like states
    return t.moments * alloc(dtype_bytes * n) + fused


def optimizer_state(p: Param, setup: TrainingSetup, numel: int) -> StateBytes:
    """Persistent optimizer bytes for one parameter (or its shard of `numel`)."""
    t = setup.optim.traits
    if t.family == F.ADALOMO:
        return StateBytes(device=_adalomo_state(p, numel))
    if not p.trainable:
        return StateBytes()
    if p.galore is not None:
        return StateBytes(device=_galore_state(p, setup))
    if t.library == OptimLibrary.BITSANDBYTES:
        return _bnb_state(t, numel)
    if t.library == OptimLibrary.TORCHAO:
        return StateBytes(device=_torchao_state(t, numel, grad_bytes(p, setup)))
    if t.home == StateHome.HOST:
        # grokadamw 0.1.2 grokadamw.py:91-96: zeros_like(p, device='cpu'), three of them
        return StateBytes(host=t.moments * grad_bytes(p, setup) * numel)
    return StateBytes(device=_family_state(p, setup, numel))


def _no_decay(p: Param) -> bool:
    """HF's no-decay group: biases and norm weights, the 1-D dense tensors (trainer.py:1287-1300)."""
    return p.kind == ParamKind.DENSE and len(p.dims) == 1


def foreach_bucket(params: list[Param], setup: TrainingSetup, world: int) -> int:
    """Bytes of one copy of the largest foreach bucket: every trainable parameter in one
    group in the reference step's own loop; the larger of the decay and no-decay groups under
    transformers' Trainer (Stack.trainer_param_groups)."""
    size = [alloc(grad_bytes(p, setup) * (shard_for(p, setup) if world > 1 else p.numel)) for p in params]
    if not setup.stack.trainer_param_groups:
        return sum(size)
    decay = sum(s for p, s in zip(params, size, strict=True) if not _no_decay(p))
    return max(decay, sum(size) - decay)


def _per_param(params: list[Param], setup: TrainingSetup, rule: Callable[[Param, int, int], int]) -> int:
    """The largest of a per-parameter rule (optimizers that step one tensor at a time);
    rule(p, grad bytes per element, numel)."""
    return max(rule(p, grad_bytes(p, setup), p.numel) for p in params)


def _lowp(g: int) -> int:
    return 1 if g < 4 else 0


def _muon_transient(params: list[Param], setup: TrainingSetup) -> int:
    """LLaMA-Factory 0.9.5 third_party/muon/muon.py:48-75, 157-215. Muon params one at a time:
    nesterov g.add(buf), the bf16 Newton-Schulz iterate and its k x k products (k = min(m, n);
    an envelope of the research notes' CPU points 18n, 16n, 13n). Then its AdamW params:
    buf1 / (eps + buf2.sqrt()) (two copies), while the last Muon update `u` (bf16) is still bound."""

    def muon(p: Param, g: int, n: int) -> int:
        return alloc(g * n) + 3 * alloc(2 * n) + 6 * alloc(2 * min(p.dims) ** 2) if muon_param(p) else 0

    def adamw(p: Param, g: int, n: int) -> int:
        return 0 if muon_param(p) else 2 * alloc(g * n)

    last_u = max((alloc(2 * p.numel) for p in params if muon_param(p)), default=0)
    return max(_per_param(params, setup, muon), _per_param(params, setup, adamw) + last_u)


def _apollo_transient(p: Param, g: int, n: int, rank: int) -> int:
    """apollo-torch 1.0.3 apollo.py: low-rank grad, denom, norm_grad + two full scaled grads."""
    if not apollo_target(p):
        return 2 * alloc(g * n)
    m, k = p.dims
    return 2 * alloc(g * m * k) + 3 * alloc(g * rank * max(m, k))


def _galore_transient(p: Param, g: int, n: int, setup: TrainingSetup) -> int:
    t = setup.optim.traits
    if p.galore is None:
        if t.family == F.GALORE_ADAFACTOR:
            return (2 + 2 * _lowp(g)) * alloc(4 * n)
        # galore_torch AdamW plain group: denom = exp_avg_sq.sqrt(); exp_avg / denom
        return 0 if t.bits == 8 else 2 * alloc(g * n)
    m, k = p.galore
    if t.family == F.GALORE_ADAFACTOR:
        # the Adafactor update on the fp32 low-rank grad, then project_back and scale (m*k fp32)
        return 2 * alloc(4 * m * k) + 3 * alloc(4 * galore_rank(p, setup) * max(m, k))
    # project_back (m*n) then * scale (m*n); 8-bit also p.saved_data = p.data.clone()
    return (3 if t.bits == 8 else 2) * alloc(g * m * k)


def _family_transient(trainable: list[Param], setup: TrainingSetup, world: int) -> int:
    t = setup.optim.traits
    fam = t.family
    bucket = foreach_bucket(trainable, setup, world)
    per_family: dict[OptimFamily, Callable[[], int]] = {
        # torch foreach: _foreach_sqrt(exp_avg_sqs) one copy of the bucket (adam.py:~760)
        # [cal: l32-1b full, phi3 full = 5x params]
        F.ADAMW: lambda: bucket,
        F.RMSPROP: lambda: bucket,  # avg = _foreach_sqrt(square_avgs) (rmsprop.py)
        F.ADAGRAD: lambda: 2 * bucket,  # std = _foreach_sqrt + numerator = _foreach_mul
        F.SGD: lambda: 0,  # weight_decay 0 (HF default): nothing copied
        F.SCHEDULE_FREE_ADAMW: lambda: bucket,  # denom = _foreach_div(exp_avg_sq, bc2)
        F.SCHEDULE_FREE_RADAM: lambda: bucket,  # the same once rho_t > 4 (steady state)
        F.SCHEDULE_FREE_SGD: lambda: 0,
        F.STABLE_ADAMW: lambda: 0,  # triton kernel on CUDA (optimi utils.py:191-199)
        # transformers 5.25.0 optimization.py:1256-1293, one param at a time: `update` (grad**2+eps)
        # still referenced when _approx_sq_grad returns the next one, + grad.float() and
        # p.float() copies of a low-precision grad and param [CPU trace: 2x fp32, 4x bf16]
        F.ADAFACTOR: lambda: _per_param(trainable, setup, lambda p, g, n: (2 + 2 * _lowp(g)) * alloc(4 * n)),
        F.APOLLO_ADAMW: lambda: _per_param(
            trainable, setup, lambda p, g, n: _apollo_transient(p, g, n, setup.apollo_rank)
        ),
        F.MUON: lambda: _muon_transient(trainable, setup),
        # adam_mini.py:266-283, 306-323, 355-402, one tensor at a time: update = m * stepsize and
        # p.add_(-update) hold two copies (grad * grad, freed before, is one); a bias's
        # v.sqrt() / bias_correction is two
        F.ADAM_MINI: lambda: _per_param(trainable, setup, lambda p, g, n: 2 * alloc(g * n)),
        # lomo.py:70-133: the previous param's stored grad, and its fp32 grad and param copies
        F.LOMO: lambda: _per_param(trainable, setup, lambda p, g, n: alloc(g * n) + 2 * _lowp(g) * alloc(4 * n)),
        # adalomo.py:139-200: grad_fp32, grad**2, the factored approximation, p_fp32 (uncertain order)
        F.ADALOMO: lambda: _per_param(trainable, setup, lambda p, g, n: 4 * alloc(4 * n)),
        # grokadamw.py:100-135: the three states copied in, grok_grad (two temporaries), the sqrt
        F.GROKADAMW: lambda: _per_param(trainable, setup, lambda p, g, n: 6 * alloc(g * n)),
        F.GALORE_ADAMW: lambda: _per_param(trainable, setup, lambda p, g, n: _galore_transient(p, g, n, setup)),
        F.GALORE_ADAFACTOR: lambda: _per_param(trainable, setup, lambda p, g, n: _galore_transient(p, g, n, setup)),
    }
    return per_family.get(fam, lambda: 0)()


def optimizer_transient(params: list[Param], setup: TrainingSetup, world: int) -> int:
    """Largest temporary during optimizer.step() (steady state)."""
    trainable = [p for p in params if p.trainable]
    if not trainable:
        return 0
    t = setup.optim.traits
    if t.fused and t.library in (OptimLibrary.TORCH, OptimLibrary.BITSANDBYTES):
        return 0  # fused kernels update in place (bitsandbytes backends/cuda/ops.py:1059-1212)
    if t.library == OptimLibrary.TORCHAO:
        # torchao 0.18.0 optim/adam.py:142-207: one compiled single_param_adam per tensor, in fp32:
        # exp_avg and exp_avg_sq dequantized (+ the param upcast when bf16). Modelled from source,
        # not measured (needs inductor on CUDA)
        return _per_param(trainable, setup, lambda p, g, n: (2 + _lowp(g)) * alloc(4 * n))
    if t.library == OptimLibrary.TORCHDISTX:
        # AnyPrecisionAdamW: per param (exp_avg_sq.sqrt() / denom_correction).add_(eps)
        return _per_param(trainable, setup, lambda p, g, n: 2 * alloc(4 * n))
    return _family_transient(trainable, setup, world)


# What no CPU trace can check: the CUDA-only part of an optimizer, with its source.
# (scripts/calibrate.py has a case for each, for the next GPU session.)
CUDA_ONLY: dict[OptimLibrary, str] = {
    OptimLibrary.TORCHAO: "the step's fp32 temporaries (torchao==0.18.0 optim/adam.py:142-207, a compiled "
    "per-tensor update)",
    OptimLibrary.OPTIMI: "the triton step (torch-optimi==0.3.3 stableadamw.py, utils.py:191-199)",
    OptimLibrary.TORCHDISTX: "the states and step (torchdistx AnyPrecisionAdamW, not installable from PyPI)",
}
CUDA_ONLY_FAMILY: dict[OptimFamily, str] = {
    F.ADALOMO: "its states, allocated with .cuda() for every parameter (lomo-optim==0.1.1 adalomo.py:84-96)",
}
PAGED_SOURCE = "bitsandbytes==0.50.2 optim/optimizer.py:374-390, functional.py:91-99 (cudaMallocManaged)"


def optimizer_notes(setup: TrainingSetup, static: StaticBytes) -> list[str]:
    """What the estimate says about the optimizer: where paged or host states went, and what
    is modelled from source only."""
    t, gib = setup.optim.traits, 2**30
    notes = []
    if static.paged_states:
        notes.append(
            f"{setup.optim.value}: {static.paged_states / gib:.2f} GiB of optimizer states are paged "
            "(CUDA unified memory): resident on the GPU and counted in the per-GPU total, but outside "
            "torch.cuda.max_memory_allocated (peak allocated); modelled from source, not measured "
            f"({PAGED_SOURCE})"
        )
    if t.home == StateHome.HOST and not setup.cpu_offload:
        notes.append(
            f"{setup.optim.value}: its states live in host RAM (counted in the host column; grokadamw==0.1.2 "
            "grokadamw.py:91-96)"
        )
    why = CUDA_ONLY.get(t.library) or CUDA_ONLY_FAMILY.get(t.family)
    if t.family == F.ADAM_MINI and setup.weight_dtype != ModelDtype.FP32:
        # the CPU trace checks its states, not its step over low-precision weights
        # (verify/cputrace.incomparable_on_cpu)
        why = "the step's two update copies over bf16 weights (adam-mini==1.1.1 adam_mini.py:306-323)"
    if why:
        notes.append(f"{setup.optim.value}: {why}: modelled from source, not measured")
    if setup.steps_in_backward and not t.layerwise:  # (layer-wise GaLore's phases say it already)
        notes.append(
            f"{setup.optim.value} steps inside backward: each parameter's gradient is freed by its "
            "optimizer hook, so no full set of gradients is held and there is no optimizer-step phase"
        )
    return notes


def layerwise_hook_bytes(params: list[Param], setup: TrainingSetup) -> dict[int | None, int]:
    """Per decoder layer (None: the root), the largest gradient plus its optimizer's update
    temporaries: what one post-accumulate-grad hook adds while it steps (an optimizer per
    parameter, HF *_layerwise, torchtune optimizer_in_bwd, LOMO's tensor hooks)."""
    out: dict[int | None, int] = {}
    world = setup.fsdp
    for p in params:
        if p.trainable:
            b = alloc(grad_bytes(p, setup) * (shard_for(p, setup) if world > 1 else p.numel)) + optimizer_transient(
                [p], setup, world
            )
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
    top of `base` (the persistent bytes). Optimizers stepped in backward refresh inside
    their hooks, where no other gradient is held."""
    layerwise = setup.steps_in_backward
    ph = Phase(PhaseKind.GALORE_REFRESH_LAYERWISE if layerwise else PhaseKind.GALORE_REFRESH, parts=dict(base.parts))
    ph.add(C.GRADIENTS, grads if not layerwise else 0)
    ph.add(C.TRANSIENT, svd_transient(params))
    return ph
