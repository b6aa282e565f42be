"""The throughput model: seconds per optimizer step and tokens/s of one configuration.

Additive roofline per micro-batch on one GPU (docs/throughput.md has the derivation and
the measured-vs-estimated table):

    t_gpu = FLOPs / (peak bf16 * MFU)          matmuls, attention, recomputation, GaLore projections
          + bytes / (bandwidth * BW_EFF)       weights read per pass, 4-bit dequantization,
                                               activations, loss, LoRA glue, optimizer update
          + kernels * LAUNCH_S                 eager PyTorch: every op costs a dispatch + launch
    t_comm = FSDP all-gathers / reduce-scatters (or DDP all-reduce) over the GPU link,
             overlapped with compute (FSDP prefetch, DDP buckets): max(t_gpu, t_comm)
    t_host = CPU offload: shards H2D and gradients D2H over the host link (not overlapped)
             + the CPU optimizer step
    GaLore: one SVD per projected weight every update_proj_gap steps, amortized.

MFU, BW_EFF and LAUNCH_S are three global constants fitted once (least squares on the
relative error, `fit_constants`) to the steady-state steps of tests/data/h100_dev.jsonl;
nothing is fitted per case. Every other number comes from the model's shapes, the
memory model (saved activation bytes) or the GPU's hardware profile.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

from pydantic import BaseModel, ConfigDict, Field

from vramplan.hardware import HardwareProfile
from vramplan.memory import layer_saved_per_token, lora_targeted
from vramplan.memory.context import stream_bytes
from vramplan.memory.freeze import first_trained_layer
from vramplan.memory.reward import NUM_LABELS, sequence_classifier
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import (
    ActivationOffload,
    Attention,
    DeepSpeedStage,
    Loss,
    Method,
    Optim,
    OptimFamily,
    OptimLibrary,
    Precision,
    Quant,
    StateDtype,
    StateHome,
    TrainingSetup,
)

# ---- the three global constants (fit_constants on tests/data/h100_dev.jsonl, steady steps)
MFU = 0.65  # achieved fraction of the dense bf16 peak on the matmul FLOPs
BW_EFF = 0.94  # achieved fraction of the memory bandwidth on the memory-bound traffic
LAUNCH_S = 18e-6  # seconds per eager op (Python dispatch + autograd + kernel launch)

# ---- assumptions not covered by the calibration file (documented in docs/throughput.md)
# torch.linalg.svd (cuSOLVER gesvd, fp32) is bound by its BLAS-2 bidiagonalization, i.e.
# by memory bandwidth, not by the tensor cores: the two GaLore cases' first steps (24.7 s,
# 21.4 s for ~1.94e12 m*n*min(m,n) over the projected weights) less a normal first step
# (~0.3 s) give ~8.6e10 mnk/s on the H100's 3350 GB/s; scaled with bandwidth elsewhere.
SVD_MNK_PER_BYTE = 8.6e10 / 3350e9
# torch.optim.AdamW on the CPU (foreach, fp32): parameters updated per second per rank.
CPU_ADAM_PARAMS_PER_S = 3.0e8
# Between nodes: a 200 Gb/s NIC per node (InfiniBand HDR / RoCE), one direction.
INTERNODE_GBPS = 25.0

_FLASH_BWD = 2.5  # flash-attention backward does 5 matmuls to the forward's 2


class StepTime(BaseModel):
    """Seconds per optimizer step of one GPU, by term."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    compute_s: float = Field(description="matmul FLOPs at the achieved MFU")
    memory_s: float = Field(description="memory-bound traffic at the achieved bandwidth")
    launch_s: float = Field(description="eager op dispatch")
    comm_s: float = Field(description="FSDP / data-parallel collectives (overlapped with the GPU work)")
    host_s: float = Field(description="CPU offload transfers and the CPU optimizer step")
    svd_s: float = Field(description="GaLore SVD refresh, amortized over update_proj_gap steps")
    step_s: float = Field(description="one optimizer step")
    tokens_per_step: int = Field(description="tokens one GPU processes per optimizer step")

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_s


class Shapes(BaseModel):
    """What the throughput model reads from a ModelSpec, summed once."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    layers: int
    matmul_params: int = Field(description="decoder Linear + active expert params per token")
    head_params: int
    q_dim: int
    hidden: int
    vocab: int
    linears_per_layer: int
    lora_in_out: tuple[int, int] = Field(description="summed in/out features of all-linear LoRA targets per layer")
    lora_in_out_attn: tuple[int, int]
    lora_targets_all: int
    lora_targets_attn: int
    galore_mats: list[tuple[int, int]] = Field(description="(m, n) of every projected weight")
    total_params: int
    eager: bool


# The shapes of the last few specs: plan and the strategy comparison ask for one spec many
# times. Bounded (issue 17: an unbounded dict kept every spec of a long session alive); an
# entry holds its spec so the id cannot be reused while it is cached.
_SHAPES: OrderedDict[int, tuple[ModelSpec, Shapes]] = OrderedDict()
SHAPES_CACHE_SIZE = 8


def _shapes(spec: ModelSpec) -> Shapes:
    from vramplan.setup import LoraTargets

    matmul, mats = 0, []
    all_setup = TrainingSetup(method="lora")
    attn_setup = TrainingSetup(method="lora", lora_targets=LoraTargets.ATTENTION)
    io_all, io_attn, n_all, n_attn = [0, 0], [0, 0], 0, 0
    for layer in spec.layers:
        for lin in layer.linears:
            matmul += lin.numel
            if lin.role != "other":
                mats.append((lin.out_features, lin.in_features))
            for (
                setup,
                io,
            ) in (all_setup, io_all), (attn_setup, io_attn):
                if lora_targeted(lin, setup):
                    io[0] += lin.in_features
                    io[1] += lin.out_features
            n_all += lora_targeted(lin, all_setup)
            n_attn += lora_targeted(lin, attn_setup)
        if layer.experts:
            matmul += layer.experts.numel * layer.experts.top_k // layer.experts.num_experts
    L = max(len(spec.layers), 1)
    return Shapes(
        layers=len(spec.layers),
        matmul_params=matmul,
        head_params=spec.vocab * spec.hidden,
        q_dim=spec.q_dim,
        hidden=spec.hidden,
        vocab=spec.vocab,
        linears_per_layer=sum(len(l.linears) for l in spec.layers) // L,
        lora_in_out=(io_all[0] // L, io_all[1] // L),
        lora_in_out_attn=(io_attn[0] // L, io_attn[1] // L),
        lora_targets_all=n_all,
        lora_targets_attn=n_attn,
        galore_mats=mats,
        total_params=spec.params_total,
        eager=spec.attn_implementation != "sdpa",
    )


def objective_shapes(sh: Shapes, setup: TrainingSetup) -> Shapes:
    """A sequence-classification reward model's head is its score head, hidden x 1, with no
    logits over the vocabulary (memory/reward.py); every other step's is lm_head."""
    if not sequence_classifier(setup):
        return sh
    return sh.model_copy(update={"head_params": sh.hidden * NUM_LABELS, "vocab": NUM_LABELS})


def shapes(spec: ModelSpec) -> Shapes:
    """Cached per spec object (ModelSpec holds lists, so it is not hashable; the cache keeps
    the spec alive so its id cannot be reused)."""
    hit = _SHAPES.get(id(spec))
    if hit is None or hit[0] is not spec:
        hit = _SHAPES[id(spec)] = (spec, _shapes(spec))
        while len(_SHAPES) > SHAPES_CACHE_SIZE:
            _SHAPES.popitem(last=False)
    _SHAPES.move_to_end(id(spec))
    return hit[1]


# ------------------------------------------------------------------ per micro-batch terms


def _weights_train(setup: TrainingSetup) -> bool:
    return setup.method in (Method.FULL, Method.GALORE)


def _backward_fraction(sh: Shapes, setup: TrainingSetup) -> float:
    """The share of decoder layers that run a backward (and a recomputation): all of them, or
    the trained last N under --train-layers, whose frozen prefix records nothing for autograd
    (memory/freeze.py; LLaMA-Factory checkpoints only the trained layers,
    model_utils/checkpointing.py:100-122)."""
    if setup.train_layers is None or sh.layers == 0:
        return 1.0
    return min(setup.train_layers, sh.layers) / sh.layers


def _lora_io(sh: Shapes, setup: TrainingSetup) -> tuple[int, int, int]:
    """(in, out) features per layer and number of adapted Linears in the model."""
    from vramplan.setup import LoraTargets

    if not setup.lora_like:
        return 0, 0, 0
    if setup.lora_targets == LoraTargets.ATTENTION:
        return (*sh.lora_in_out_attn, sh.lora_targets_attn)
    return (*sh.lora_in_out, sh.lora_targets_all)


def micro_flops(sh: Shapes, setup: TrainingSetup) -> float:
    """Matmul FLOPs of forward + backward (+ recomputation) for one micro-batch."""
    N, s = setup.tokens, setup.seq_len
    lin = 2.0 * N * sh.matmul_params
    # causal attention: QK^T and PV, 2*s*q per token per layer; flash skips the masked half,
    # eager attention computes the full square
    eager = sh.eager if setup.attention is None else setup.attention == Attention.EAGER
    attn = 2.0 * N * s * sh.q_dim * sh.layers * (2 if eager else 1)
    lin_in, lin_out, _ = _lora_io(sh, setup)
    lora = 2.0 * N * setup.lora_r * (lin_in + lin_out) * sh.layers
    head = 2.0 * N * sh.head_params
    fwd = lin + attn + lora
    f = _backward_fraction(sh, setup)
    bwd = (lin + _FLASH_BWD * attn + 2 * lora) * f + head  # grad of the input through every layer that trains
    if _weights_train(setup):
        bwd += lin * f + (head if setup.train_layers is None else 0.0)  # grad of the weights (lm_head frozen)
    recompute = fwd * f if setup.gradient_checkpointing else 0.0
    return fwd + head + bwd + recompute + _loss_recompute_flops(sh, setup)


def _loss_recompute_flops(sh: Shapes, setup: TrainingSetup) -> float:
    """Cut Cross-Entropy never stores the logits: its backward recomputes them tile by tile
    (cut-cross-entropy==25.1.1 cut_cross_entropy/cce_backward.py), one more N x h x V matmul.
    [modelled from source, not measured]"""
    return 2.0 * setup.tokens * sh.head_params if setup.loss == Loss.CCE else 0.0


# HBM bytes per logit element of the loss (memory-bound traffic). The model's own loss and
# torchtune's chunks (upcast per chunk) write bf16 logits, an fp32 copy, the log-softmax and
# its gradient: ~24 B. The fused kernels (Liger's fused linear CE, TRL's chunked NLL,
# Unsloth's) write one bf16 chunk, turn it into its gradient in place and read it for the two
# gradient matmuls: ~8 B. Cut Cross-Entropy keeps its tiles in shared memory: ~0.
# [modelled from the kernels' source (liger-kernel==0.6.4 fused_linear_cross_entropy.py,
# trl==1.16.0 chunked loss, cut-cross-entropy==25.1.1), not measured]
LOSS_BYTES_PER_LOGIT = {
    Loss.HF: 24.0,
    Loss.CHUNKED: 24.0,
    Loss.TORCHTUNE_LINEAR_CE: 24.0,  # the same per chunk, the projection inside the loss
    Loss.TRL_CHUNKED_NLL: 8.0,
    Loss.LIGER: 8.0,
    Loss.UNSLOTH: 8.0,
    Loss.CCE: 0.0,
}


def _dequant_bytes_per_param(setup: TrainingSetup) -> float:
    """HBM traffic of one 4-bit dequantization, per weight element: nf4 is one fused
    bitsandbytes kernel (read 0.5 B, write 2 B bf16); hqq's PyTorch backend unpacks and
    rescales with separate elementwise ops (shift/mask of both nibbles, cat, cast to bf16,
    - zero, * scale: ~14 B)."""
    if setup.method != Method.QLORA:
        return 0.0
    # LLM.int8's backward (bitsandbytes==0.50.2 autograd/_functions.py:235-238): CB.to(bf16) reads
    # 1 B and writes 2 B, the in-place scaling reads and writes 2 B each; its forward multiplies in
    # int8 and quantizes the tokens, not the weight
    return {Quant.NF4: 2.5, Quant.INT8: 7.0}.get(cast(Quant, setup.quant), 14.0)


def micro_bytes(spec: ModelSpec, sh: Shapes, setup: TrainingSetup) -> float:
    """Memory-bound HBM traffic of one micro-batch (bytes)."""
    N, f = setup.tokens, _backward_fraction(sh, setup)
    passes = 1 + f * (2 if setup.gradient_checkpointing else 1)  # forward, backward (dgrad), recompute
    wbytes = 4 if (setup.autocast and setup.method != Method.QLORA) else 2
    if setup.autocast:
        wbytes += 2 + 2  # autocast writes and re-reads a bf16 copy of every fp32 weight
    weights = passes * sh.matmul_params * (0.5 if setup.method == Method.QLORA else wbytes)
    weights += passes * sh.matmul_params * _dequant_bytes_per_param(setup)
    if _weights_train(setup):
        weights += sh.matmul_params * 2 * wbytes * f  # wgrad: write the gradient, accumulate
    # saved activations (memory model; the first layer stands for all, they are alike):
    # written in forward, read in backward, and their gradients the same
    acts = 4.0 * N * sum(layer_saved_per_token(spec, l, setup) for l in spec.layers[:1]) * sh.layers * f
    if setup.gradient_checkpointing:
        acts *= 1.25  # recomputation writes them again
    loss = LOSS_BYTES_PER_LOGIT[setup.loss] * N * sh.vocab
    lin_in, lin_out, _ = _lora_io(sh, setup)
    # peft LoRA glue per token and adapted Linear (adapters are fp32): the input cast to fp32
    # and dropped out, the output scaled, cast and added (~10 in + 8 out bytes); backward
    # twice that, recomputation once more
    lora = (3.0 + setup.gradient_checkpointing) * N * (10 * lin_in + 8 * lin_out) * sh.layers
    return weights + acts + loss + lora


# Eager dispatches (Python + autograd + kernel launch), counted from the modules' code:
# a Llama-style decoder layer forward is ~50 ops (2 RMSNorms of 8, q/k/v/o with views,
# RoPE ~14, SDPA, SiLU-gated MLP, residuals); autograd's backward ~2x that; non-reentrant
# checkpointing replays the forward and packs/unpacks every saved tensor through hooks
# (~1.5x a forward). A peft LoRA Linear adds ~10 forward (cast, dropout, A, B, scale, add,
# adapter bookkeeping) and ~20 backward; 4-bit dequantization ~5 (bitsandbytes' fused
# kernel plus its Python wrapper's checks and allocations, MatMul4Bit) or ~12 (hqq's
# unpack/cast/rescale ops) per Linear and pass.
FWD_OPS_PER_LAYER = 50
LORA_FWD_OPS = 10


def micro_kernels(sh: Shapes, setup: TrainingSetup) -> float:
    """Eager ops dispatched per micro-batch."""
    _, _, n_lora = _lora_io(sh, setup)
    base = FWD_OPS_PER_LAYER * sh.layers
    lora = LORA_FWD_OPS * n_lora
    dq = 0
    if setup.method == Method.QLORA:
        # kernels per quantized Linear and pass: nf4 one fused dequantize (+ its helpers), hqq's
        # elementwise unpacking, LLM.int8 about fourteen over forward and backward (to fp16, |x|,
        # the outlier search, quantize, int8 matmul, dequantize, cast; dequantize, scale, matmul)
        dq = {Quant.NF4: 5, Quant.INT8: 7}.get(cast(Quant, setup.quant), 12) * sh.linears_per_layer * sh.layers
    f = _backward_fraction(sh, setup)
    recompute = (1.5 * base + lora + dq) * f if setup.gradient_checkpointing else 0
    return (1 + 2 * f) * (base + lora) + 2 * dq + recompute


# ------------------------------------------------------------------ optimizer step


def _trainable(spec: ModelSpec, sh: Shapes, setup: TrainingSetup) -> int:
    if setup.train_layers is not None:
        return sum(layer.numel for layer in _trained_layers(spec, setup))
    if _weights_train(setup):
        return sh.total_params
    lin_in, lin_out, _ = _lora_io(sh, setup)
    return setup.lora_r * (lin_in + lin_out) * sh.layers


def _trained_layers(spec: ModelSpec, setup: TrainingSetup) -> list[LayerSpec]:
    return spec.layers[first_trained_layer(len(spec.layers), setup) :]


def _n_tensors(spec: ModelSpec, setup: TrainingSetup, sh: Shapes) -> int:
    if setup.train_layers is not None:
        return sum(len(l.linears) + len(l.norm_numels) for l in _trained_layers(spec, setup))
    if _weights_train(setup):
        return sum(len(l.linears) + len(l.norm_numels) for l in spec.layers) + 3
    return 2 * _lora_io(sh, setup)[2]


def optimizer_bytes_and_kernels(
    spec: ModelSpec, sh: Shapes, setup: TrainingSetup, shard: int
) -> tuple[float, float, float]:
    """(HBM bytes, ops, FLOPs) of one optimizer step on one GPU (its 1/shard of the states)."""
    n = _trainable(spec, sh, setup) / shard
    tensors = _n_tensors(spec, setup, sh)
    lora = setup.lora_like
    dt = 4 if (lora or setup.precision == Precision.MIXED) else 2
    optim = setup.optim
    flops = 0.0
    if optim == Optim.ADAMW_TORCH:
        # _multi_tensor_adamw: ~11 passes of n elements that stay in L2-unfriendly HBM
        # (read p, g, m, v, write p, m, v, and the sqrt/denominator temporaries); ~15 launches
        return 11 * dt * n, 15, flops
    if optim == Optim.ADAMW_TORCH_FUSED:
        return 7 * dt * n, 2, flops
    if optim == Optim.ADAMW_BNB_8BIT:
        return (3 * dt + 4) * n, 3 * tensors, flops
    if not optim.is_galore:
        return _other_optimizer_cost(sh, setup, n, tensors, dt)
    # GaLore: per projected weight project the grad down and the update back (two matmuls
    # with the m x r projector), then a full-size scale-and-add; others as plain Adam
    state = 1 if optim.is_8bit else dt
    proj_mn = sum(m * k for m, k in sh.galore_mats)
    proj_low = sum(setup.galore_rank * max(m, k) for m, k in sh.galore_mats)
    flops = 4.0 * setup.galore_rank * proj_mn
    # galore_torch steps parameter by parameter: ~3 launches per tensor for the Adam update
    # of the small (low-rank) states, ~4 more per projected weight (project down, up, scale, add)
    bytes_ = dt * 5 * proj_mn + (4 * state + 3 * dt) * proj_low + 11 * dt * max(n - proj_mn, 0)
    return bytes_, 3 * tensors + 4 * len(sh.galore_mats), flops


# Optimizers outside the calibration file (tests/data/h100_dev.jsonl has AdamW, AdamW fused,
# 8-bit AdamW and GaLore only): one pass reading p and g and writing p (3 x param bytes), a read
# and a write of each state, and, for torch's foreach families, a write and a read of each
# foreach temporary. Uncalibrated; docs/throughput.md.
_FOREACH_COPIES = {
    OptimFamily.ADAMW: 2,
    OptimFamily.RMSPROP: 1,
    OptimFamily.ADAGRAD: 2,
    OptimFamily.SGD: 0,
    OptimFamily.SCHEDULE_FREE_ADAMW: 1,
    OptimFamily.SCHEDULE_FREE_RADAM: 1,
    OptimFamily.SCHEDULE_FREE_SGD: 0,
}
_NS_STEPS = 5  # Muon's Newton-Schulz iterations (llamafactory 0.9.5 third_party/muon/muon.py: ns_steps=5)


def _state_bytes_per_element(setup: TrainingSetup, dt: int) -> float:
    t = setup.optim.traits
    if t.factored or t.home == StateHome.HOST:
        return 0.0  # factored: a row and a column per matrix; host states cross PCIe (host_s not modelled)
    if t.bits < 32:
        return t.moments * t.bits / 8
    return t.moments * (4 if t.state_dtype == StateDtype.FP32 else dt)


def _other_optimizer_cost(
    sh: Shapes, setup: TrainingSetup, n: float, tensors: int, dt: int
) -> tuple[float, float, float]:
    t = setup.optim.traits
    state = _state_bytes_per_element(setup, dt)
    copies = 0 if t.fused else _FOREACH_COPIES.get(t.family)
    if copies is not None and t.library == OptimLibrary.TORCH:
        return (3 * dt + 2 * state + 2 * copies * dt) * n, 5 + 5 * t.moments, 0.0
    flops = 0.0
    if t.family == OptimFamily.MUON:
        # X @ X.T, A @ A and B @ X per iteration on each 2-D layer matrix (k = min(m, n))
        flops = _NS_STEPS * sum(4.0 * min(m, k) ** 2 * max(m, k) + 2.0 * min(m, k) ** 3 for m, k in sh.galore_mats)
    # fused per-tensor kernels (bitsandbytes, torch fused) or per-parameter loops (~10 ops each)
    return (3 * dt + 2 * state) * n, (3 if t.fused else 10) * tensors, flops


def svd_seconds(sh: Shapes, profile: HardwareProfile) -> float:
    """All projected weights' SVDs (one refresh)."""
    mnk = sum(m * k * min(m, k) for m, k in sh.galore_mats)
    return mnk / (SVD_MNK_PER_BYTE * profile.memory_bandwidth_gbps * 1e9)


# ------------------------------------------------------------------ communication


def comm_seconds(
    sh: Shapes, setup: TrainingSetup, gpus: int, gpus_per_node: int, link_gbps: float, trainable: int, accum: int
) -> float:
    """Collectives per optimizer step on one GPU. FSDP (degree W): all-gather the parameters
    in forward and again in backward, reduce-scatter the gradients, every micro-batch;
    data-parallel replicas (gpus / W of them): all-reduce the (sharded) gradients once per
    step. Ring collectives move (k-1)/k of the buffer through each GPU's link. DeepSpeed:
    zero_comm_seconds."""
    param_b = 0.5 if setup.method == Method.QLORA else 2.0
    if setup.deepspeed is not None:
        return zero_comm_seconds(sh, setup, gpus, gpus_per_node, link_gbps, trainable, accum, param_b)
    W = setup.fsdp
    reduce_b = 4 if setup.precision == Precision.MIXED or setup.lora_like else 2
    t = 0.0
    if W > 1:
        link = INTERNODE_GBPS if W > gpus_per_node else link_gbps
        per_micro = (W - 1) / W * (2 * param_b * sh.total_params + reduce_b * trainable)
        t += accum * per_micro / (link * 1e9)
    replicas = gpus // W
    if replicas > 1:
        link = INTERNODE_GBPS if gpus > gpus_per_node else link_gbps
        t += 2 * (replicas - 1) / replicas * reduce_b * trainable / W / (link * 1e9)
    return t


def zero_comm_seconds(
    sh: Shapes,
    setup: TrainingSetup,
    gpus: int,
    gpus_per_node: int,
    link_gbps: float,
    trainable: int,
    accum: int,
    param_b: float,
) -> float:
    """DeepSpeed ZeRO over all `gpus` (/work/research/engines.md section 6): every micro-batch
    reduces the bf16 grads (ZeRO-1/2: buckets, ZeRO-3: reduce-scatter), and ZeRO-3 gathers the
    parameters for forward and again for backward; after the step the updated bf16 partitions
    are all-gathered (ZeRO-1/2). The link is the inter-node one as soon as the GPUs span nodes."""
    if gpus < 2:
        return 0.0
    f = (gpus - 1) / gpus
    link = INTERNODE_GBPS if gpus > gpus_per_node else link_gbps
    per_micro = f * 2 * trainable
    if setup.deepspeed == DeepSpeedStage.ZERO3:
        per_micro += f * 2 * param_b * sh.total_params
        per_step = 0.0
    else:
        per_step = f * 2 * trainable
    return (accum * per_micro + per_step) / (link * 1e9)


def zero_host_seconds(sh: Shapes, setup: TrainingSetup, profile: HardwareProfile, trainable: int, accum: int) -> float:
    """DeepSpeed offload over PCIe: the grad partition down every micro-batch and the updated
    bf16 partition up (offload_optimizer), the CPU Adam step; offload_param copies the bf16
    partitions up for every forward and backward gather."""
    W = max(setup.data_parallel, 1)
    t = 0.0
    if setup.offload_optimizer:
        t += (accum * 2 * trainable / W + 2 * trainable / W) / (profile.host_link_gbps * 1e9)
        t += trainable / W / CPU_ADAM_PARAMS_PER_S
    if setup.offload_params:
        passes = 2 + (1 if setup.gradient_checkpointing else 0)
        t += accum * passes * 2 * sh.total_params / W / (profile.host_link_gbps * 1e9)
    return t


def host_seconds(sh: Shapes, setup: TrainingSetup, profile: HardwareProfile, trainable: int, accum: int) -> float:
    """CPU offload: every micro-batch copies the rank's parameter shards host->GPU for the
    forward and backward all-gathers (and the recomputation) and its gradient shard back;
    then the optimizer steps on the CPU."""
    if setup.deepspeed is not None:
        return zero_host_seconds(sh, setup, profile, trainable, accum)
    if not setup.cpu_offload:
        return 0.0
    W = setup.fsdp
    store_b = 0.5 if setup.method == Method.QLORA else (4 if setup.precision == Precision.MIXED else 2)
    passes = 2 + (1 if setup.gradient_checkpointing else 0)
    grad_b = 4 if (setup.lora_like or setup.precision == Precision.MIXED) else 2
    per_micro = (passes * store_b * sh.total_params + grad_b * trainable) / W
    return accum * per_micro / (profile.host_link_gbps * 1e9) + trainable / W / CPU_ADAM_PARAMS_PER_S


def offload_seconds(spec: ModelSpec, sh: Shapes, setup: TrainingSetup, profile: HardwareProfile) -> float:
    """Activation offload over the host link, per micro-batch: every offloaded byte goes down
    in forward and back up in backward. Checkpoint offload moves each layer's input
    (stream x hidden per token); OffloadActivations without checkpointing moves every saved
    tensor (the memory model's saved bytes per token). [modelled from source, not measured]"""
    mode = setup.activation_offload
    if mode == ActivationOffload.NONE:
        return 0.0
    if setup.gradient_checkpointing or mode != ActivationOffload.ALL:
        per_token = stream_bytes(setup) * sh.hidden * sh.layers
    else:
        per_token = sum(layer_saved_per_token(spec, l, setup) for l in spec.layers[:1]) * sh.layers
    return 2.0 * setup.tokens * per_token / (profile.host_link_gbps * 1e9)


def offload_overlaps(setup: TrainingSetup) -> bool:
    """transformers' checkpoint offload copies synchronously on the compute stream
    (torch==2.13 torch/autograd/graph.py save_on_cpu: packed.copy_(tensor)); OffloadActivations
    and Unsloth copy on side streams (non_blocking), hidden behind compute."""
    return setup.activation_offload in (ActivationOffload.ALL, ActivationOffload.UNSLOTH)


# ------------------------------------------------------------------ the step


def gpu_link_gbps(profile: HardwareProfile) -> float:
    """GPU-to-GPU bandwidth inside a node: NVLink where the card has it, else PCIe P2P."""
    return profile.nvlink_gbps or profile.host_link_gbps


def raw_terms(
    spec: ModelSpec, setup: TrainingSetup, profile: HardwareProfile, accum: int = 1
) -> tuple[float, float, float]:
    """(seconds at the bf16 peak, seconds at the full bandwidth, ops) of one optimizer step
    on the GPU: the three quantities the global constants scale."""
    sh = objective_shapes(shapes(spec), setup)
    shard = setup.data_parallel if setup.deepspeed is not None else setup.fsdp
    on_host = setup.cpu_offload or setup.offload_optimizer
    ob, ok, of = (0.0, 0.0, 0.0) if on_host else optimizer_bytes_and_kernels(spec, sh, setup, shard)
    flops_s = (accum * micro_flops(sh, setup) + of) / (profile.training_tflops * 1e12)
    bytes_s = (accum * micro_bytes(spec, sh, setup) + ob) / (profile.memory_bandwidth_gbps * 1e9)
    return flops_s, bytes_s, accum * micro_kernels(sh, setup) + ok


def step_time(
    spec: ModelSpec,
    setup: TrainingSetup,
    profile: HardwareProfile,
    gpus: int = 1,
    gpus_per_node: int | None = None,
    accum: int = 1,
    collectives: bool = True,
    amortize_svd: bool = True,
) -> StepTime:
    """Seconds per optimizer step (accum micro-batches + one update) on each of `gpus` GPUs.
    collectives=False drops communication (the calibration's FSDP case ran on a fake
    process group); amortize_svd=False gives a steady step between GaLore refreshes."""
    sh = objective_shapes(shapes(spec), setup)
    gpn = gpus_per_node or gpus
    flops_s, bytes_s, kernels = raw_terms(spec, setup, profile, accum)
    compute, memory, launch = flops_s / MFU, bytes_s / BW_EFF, kernels * LAUNCH_S
    trainable = _trainable(spec, sh, setup)
    comm = comm_seconds(sh, setup, gpus, gpn, gpu_link_gbps(profile), trainable, accum) if collectives else 0.0
    host = host_seconds(sh, setup, profile, trainable, accum)
    svd = (
        svd_seconds(sh, profile) / setup.galore_update_proj_gap
        if (amortize_svd and setup.method == Method.GALORE)
        else 0.0
    )
    offload = accum * offload_seconds(spec, sh, setup, profile)
    overlapped = offload if offload_overlaps(setup) else 0.0
    host += offload - overlapped
    gpu = compute + memory + launch
    step = max(gpu, comm, overlapped) + host + svd
    return StepTime(
        compute_s=compute,
        memory_s=memory,
        launch_s=launch,
        comm_s=comm,
        host_s=host,
        svd_s=svd,
        step_s=step,
        tokens_per_step=accum * setup.tokens,
    )


def tokens_per_s(spec: ModelSpec, setup: TrainingSetup, profile: HardwareProfile, **kw) -> float:
    """Tokens per second of one GPU."""
    return step_time(spec, setup, profile, **kw).tokens_per_s_per_gpu


# ------------------------------------------------------------------ calibration


def fit_constants(rows: list[tuple[float, float, float, float]]) -> tuple[float, float, float]:
    """(MFU, BW_EFF, LAUNCH_S) minimizing the squared relative error of
    t = flops_s_at_peak / MFU + bytes_s_at_peak / BW_EFF + kernels * LAUNCH_S, over rows of
    (flops / peak, bytes / bandwidth, kernels, measured seconds). Linear in the inverses."""
    import numpy as np

    A = np.array([[f / t, b / t, k / t] for f, b, k, t in rows])
    x, *_ = np.linalg.lstsq(A, np.ones(len(rows)), rcond=None)
    return 1 / x[0], 1 / x[1], x[2]
