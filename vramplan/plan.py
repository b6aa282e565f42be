"""`vramplan plan MODEL --gpus SPEC`: search the configurations that fit, fastest first.

The search uses the memory model itself, cheaply: for each discrete configuration
(method, precision, optimizer, rank, checkpointing, FSDP degree, offload) it runs
`step_model(every_layer=True)` at two token counts. Every phase is affine in the tokens
of a micro-batch (eager attention adds a tokens x seq term: a third call measures it),
so the per-GPU total at every (sequence length, micro-batch) point of the grid is the
max over those phases, plus the estimate's allocator overhead and CUDA context,
evaluated with numpy. The configurations reported are then re-checked one by one with
`estimate_spec` (the same engine), and any that `estimate` says does not fit is dropped.
Throughput comes from vramplan.throughput.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vramplan.assumptions import data_parallel_phrase, host_ram_phrase, stack_phrase
from vramplan.errors import VramplanError, from_validation_error
from vramplan.estimate import (
    FUSED_LOSS_SHORT,
    PROCESS_HOST_BYTES,
    context_bytes,
    coverage_notes,
    default_host_ram,
    estimate_spec,
    fp16_on_card,
    fused_expert_note,
    gpu_verdict,
    make_setup,
    ranks_per_node,
    resolve_gpus,
)
from vramplan.hardware import GpuSpec, Vendor, gpu_notes, profiles, supports_bf16
from vramplan.headroom import SAFE_SHARE, has_safe_headroom, rule_text, safe_margin
from vramplan.limits import (
    MAX_GLOBAL_BATCH,
    MAX_PLAN_BATCH,
    MAX_RANK,
    MAX_RANKS,
    MAX_SEQ_LEN,
    MAX_TOP,
    check_int,
)
from vramplan.memory import prepare, step_model
from vramplan.memory.attention import mask_from, span_terms
from vramplan.memory.checkpointing import unsloth_from
from vramplan.memory.grpo import vllm_colocated_bytes
from vramplan.memory.phases import Prepared
from vramplan.memory.types import LinearRole
from vramplan.model_loader import load_model_spec, resolve_config
from vramplan.model_spec import ModelSpec
from vramplan.plan_vary import expand_groups, parse_vary, varied_label
from vramplan.reserved import with_expandable_segments
from vramplan.setup import (
    DeepSpeedStage,
    Method,
    Objective,
    Optim,
    OptimFamily,
    Packing,
    Precision,
    Quant,
    Stack,
    TrainingSetup,
)
from vramplan.throughput import step_time
from vramplan.units import GiB, MiB, host_ram_bytes

METHOD_KEYS = ("full", "lora", "qlora-nf4", "qlora-hqq4", "galore")  # the default search
# LoRA on an LLM.int8 base only when asked: more memory than nf4 and a slower matmul
ALL_METHOD_KEYS = (*METHOD_KEYS, "qlora-int8")
ADAPTER_KEYS = ("lora", "qlora-nf4", "qlora-hqq4", "qlora-int8")
_METHOD_ALIASES = {
    "qlora": ("qlora-nf4", "qlora-hqq4"),
    "nf4": ("qlora-nf4",),
    "hqq4": ("qlora-hqq4",),
    "int8": ("qlora-int8",),
}
_ALLOWED = "full, lora, qlora, qlora-nf4, qlora-hqq4, qlora-int8, galore"
MAX_BATCH = 256
DEFAULT_CONTEXT = 32768  # when the model's config gives none (a ModelSpec passed directly)


class PlanRequest(BaseModel):
    """What the user asks for: hardware and constraints. Validation names the flag."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: GpuSpec
    nodes: int = Field(1, description="nodes the GPUs are spread over (FSDP may span them)")
    min_seq: int = Field(2048, description="shortest sequence length acceptable")
    global_batch: int | None = Field(
        None, description="sequences per optimizer step over all GPUs (via gradient accumulation)"
    )
    methods: tuple[str, ...] = Field(METHOD_KEYS, description="methods allowed")
    min_lora_rank: int = Field(16, description="smallest LoRA rank acceptable")
    min_galore_rank: int = Field(128, description="smallest GaLore rank acceptable")
    host_ram: int | None = Field(None, description="host RAM per node in bytes (None: not checked)")
    max_batch: int = Field(MAX_BATCH, description="largest micro-batch searched")
    context: int = Field(DEFAULT_CONTEXT, description="the model's maximum sequence length")
    host_ram_said: str = Field("", description="where host_ram comes from, as the output says it")
    fixed: dict[str, Any] = Field(
        default_factory=dict,
        description="setup fields the search does not vary "
        "(--config, --stack): loss, attention, packing, adapter dtype, ...",
    )
    vary: dict[str, tuple[str, ...]] = Field(
        default_factory=dict, description="stack knobs the search also tries, each value in turn (--vary)"
    )

    @model_validator(mode="after")
    def _check(self):
        for flag, v, hi in (
            ("--nodes", self.nodes, MAX_RANKS),
            ("--min-seq", self.min_seq, MAX_SEQ_LEN),
            ("--min-lora-rank", self.min_lora_rank, MAX_RANK),
            ("--min-galore-rank", self.min_galore_rank, MAX_RANK),
            ("--max-batch", self.max_batch, MAX_PLAN_BATCH),
        ):
            check_int(v, flag, hi)
        if self.global_batch is not None:
            check_int(self.global_batch, "--global-batch", MAX_GLOBAL_BATCH)
        if self.host_ram is not None:
            check_int(self.host_ram, "--host-ram", 2**60)
        if self.gpus.count % self.nodes:
            raise VramplanError(f"{self.gpus.count} GPUs cannot be spread evenly over {self.nodes} nodes", "--nodes")
        if self.min_seq > self.context:
            raise VramplanError(
                f"{self.min_seq} is longer than the model's context ({self.context} tokens)", "--min-seq"
            )
        if self.global_batch is not None and (self.global_batch < 1 or self.global_batch % self.gpus.count):
            raise VramplanError(
                f"must be a positive multiple of the GPU count ({self.gpus.count}), got {self.global_batch}",
                "--global-batch",
            )
        if not self.methods:
            raise VramplanError(f"give at least one of: {', '.join(METHOD_KEYS)}", "--methods")
        return self

    @property
    def gpus_per_node(self) -> int:
        return self.gpus.count // self.nodes


def parse_methods(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'full,galore' -> ('full', 'galore'); 'qlora' means both 4-bit formats."""
    if text is None:
        return METHOD_KEYS
    if not (isinstance(text, str) or (isinstance(text, (list, tuple)) and all(isinstance(i, str) for i in text))):
        raise VramplanError(f"give comma-separated names or a list of them, got {type(text).__name__}", "--methods")
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for raw in (i.strip().lower() for i in items):
        if not raw:
            continue
        keys = _METHOD_ALIASES.get(raw, (raw,))
        for k in keys:
            if k not in ALL_METHOD_KEYS:
                raise VramplanError(f"unknown method {raw!r}; allowed: {_ALLOWED}", "--methods")
            if k not in out:
                out.append(k)
    if not out:
        raise VramplanError(f"give at least one of: {_ALLOWED}", "--methods")
    return tuple(out)


def method_key(setup: TrainingSetup) -> str:
    if setup.quant is not None:  # set exactly when the method is qlora
        return f"qlora-{setup.quant.value}"
    return setup.method.value


# ------------------------------------------------------------------ the discrete space


def _fsdp_modes(req: PlanRequest) -> list[tuple[int, bool]]:
    """(FSDP degree, CPU offload): powers of two up to the GPU count, and the count itself.
    The GPUs outside one FSDP group are data-parallel replicas (HSDP); at degree 1 every GPU
    is a DDP rank, with DDP's gradient buckets (memory/ddp.py; candidate_groups sets
    data_parallel)."""
    n = req.gpus.count
    degrees = sorted({1, n} | {2**k for k in range(1, int(math.log2(n)) + 1) if n % 2**k == 0})
    modes = []
    for d in degrees:
        modes.append((d, False))
        if d > 1:
            modes.append((d, True))
    return modes


def _ranks(lo: int, smallest: int, count: int) -> list[int]:
    return [r for r in (lo * 2**i for i in range(count)) if r <= smallest]


def _smallest_dim(spec: ModelSpec) -> int:
    """The ranks plan tries stay within every attention and MLP weight's smaller dimension;
    other Linears (a MoE's 1-wide shared-expert gate, a linear-attention's small projections)
    do not bound them: an adapter or projector above a weight's dimension is full rank
    there (memory/lora.check_lora_rank, memory/optimizers.check_galore_rank)."""
    linears = [lin for layer in spec.layers for lin in layer.linears]
    main = [lin.narrow_dim for lin in linears if lin.role not in (LinearRole.OTHER, LinearRole.ROUTER)]
    return min(main or [lin.narrow_dim for lin in linears])


def _precisions(req: PlanRequest) -> tuple[Precision, ...]:
    """bf16 and mixed where the card has bf16; fp16 autocast with a GradScaler where it has not
    (Turing, Volta: estimate.fp16_on_card)."""
    return (Precision.BF16, Precision.MIXED) if supports_bf16(req.gpus.profile) else (Precision.FP16,)


def _nobody_asked(req: PlanRequest, rank_field: str) -> bool:
    """Neither the method (--methods) nor its minimum rank was asked for: a model narrower than
    the default rank simply leaves the method out, rather than failing on a flag not given."""
    return rank_field not in req.model_fields_set and req.methods == METHOD_KEYS


def _default_said(req: PlanRequest, rank_field: str) -> str:
    return "" if rank_field in req.model_fields_set else " (the default)"


def _ddp_world(req: PlanRequest, fsdp: int) -> int:
    """Without FSDP every GPU is a DDP rank (estimate_spec's with_data_parallel)."""
    return req.gpus.count if fsdp == 1 else 1


def _zero_modes(req: PlanRequest, method: Method) -> list[dict]:
    """DeepSpeed ZeRO over every GPU (memory/deepspeed.py): ZeRO-2 on two or more GPUs, its
    optimizer offload (ZeRO-Offload, one GPU too) and ZeRO-3 (not with 4-bit weights, which
    are not loaded under zero.Init) with both offloads. bf16 (DeepSpeed's fp32 masters are
    in the optimizer)."""
    n = req.gpus.count
    modes = [dict(deepspeed=DeepSpeedStage.ZERO2, offload_optimizer=True)]
    if n > 1:
        modes.append(dict(deepspeed=DeepSpeedStage.ZERO2))
        if method != Method.QLORA:
            modes += [
                dict(deepspeed=DeepSpeedStage.ZERO3),
                dict(deepspeed=DeepSpeedStage.ZERO3, offload_optimizer=True, offload_params=True),
            ]
    return [dict(m, data_parallel=n) for m in modes]


def candidate_groups(spec: ModelSpec, req: PlanRequest) -> list[list[dict]]:
    """Setup fields of every discrete configuration, in groups ordered by rank (a rank
    that does not fit at one sequence of min_seq means no larger rank will)."""
    smallest = _smallest_dim(spec)
    groups: list[list[dict]] = []
    modes = _fsdp_modes(req)
    for key in req.methods:
        if key == "full":
            groups.extend(_full_groups(req, modes))
        elif key in ADAPTER_KEYS:
            # FSDP does not shard an 8-bit base (TrainingSetup._check_int8): data parallel only
            unsharded: list[tuple[int, bool]] = [m for m in modes if m == (1, False)]
            groups.extend(_lora_groups(req, key, smallest, unsharded if key == "qlora-int8" else modes))
        elif key == "galore":
            groups.extend(_galore_groups(req, smallest))
    return expand_groups(groups, req.vary)


def _always_autocast(req: PlanRequest) -> bool:
    """axolotl's Trainer wraps every full fine-tune outside FSDP and DeepSpeed in bf16 autocast
    (configs/axolotl.py _precision): `bf16` without autocast is not a configuration it runs, and
    there its sdpa/eager full fine-tune keeps fp32 embeddings and norms (--fp32-embeddings-norms)."""
    stack = req.fixed.get("stack")
    return getattr(stack, "value", stack) == Stack.AXOLOTL.value


def _full_groups(req: PlanRequest, modes: list[tuple[int, bool]]) -> list[list[dict]]:
    """Full fine-tuning: one configuration per group (there is no rank to order)."""
    groups: list[list[dict]] = []
    # adamw_torch is left out: adamw_torch_fused does the same update in place
    # (no foreach temporaries) and is faster, so it dominates it.
    full_optims = (Optim.ADAMW_TORCH_FUSED, Optim.ADAMW_BNB_8BIT)
    for prec, optim, ckpt, (d, off) in itertools.product(_precisions(req), full_optims, (False, True), modes):
        if prec == Precision.BF16 and d == 1 and _always_autocast(req):
            continue
        groups.append(
            [
                dict(
                    method=Method.FULL,
                    precision=prec,
                    optim=optim,
                    gradient_checkpointing=ckpt,
                    fsdp=d,
                    cpu_offload=off,
                    data_parallel=_ddp_world(req, d),
                )
            ]
        )
    for optim, ckpt, zero in itertools.product(full_optims, (False, True), _zero_modes(req, Method.FULL)):
        groups.append([dict(method=Method.FULL, optim=optim, gradient_checkpointing=ckpt, **zero)])
    return groups


def _lora_groups(req: PlanRequest, key: str, smallest: int, modes: list[tuple[int, bool]]) -> list[list[dict]]:
    """LoRA or QLoRA (key "lora", "qlora-nf4", "qlora-hqq4" or "qlora-int8"): one group of ranks per setup;
    none when no rank fits and nobody asked for the minimum."""
    ranks = _ranks(req.min_lora_rank, smallest, 3)
    if not ranks:
        if _nobody_asked(req, "min_lora_rank"):
            return []
        raise VramplanError(
            f"{req.min_lora_rank}{_default_said(req, 'min_lora_rank')} is larger than the "
            f"smallest adapted layer dimension ({smallest})",
            "--min-lora-rank",
        )
    method = Method.LORA if key == "lora" else Method.QLORA
    quant = None if key == "lora" else Quant(key.split("-")[1])
    groups: list[list[dict]] = []
    # bf16 only: a frozen base gains nothing from fp32 masters (they only cost memory)
    for ckpt, (d, off) in itertools.product((False, True), modes):
        groups.append(
            [
                dict(
                    method=method,
                    quant=quant,
                    lora_r=r,
                    fsdp=d,
                    cpu_offload=off,
                    data_parallel=_ddp_world(req, d),
                    **_checkpointing(req, key, ckpt),
                )
                for r in ranks
            ]
        )
    for ckpt, zero in itertools.product((False, True), _zero_modes(req, method)):
        groups.append(
            [dict(method=method, quant=quant, lora_r=r, **_checkpointing(req, key, ckpt), **zero) for r in ranks]
        )
    return groups


def _checkpointing(req: PlanRequest, key: str, ckpt: bool) -> dict[str, bool]:
    """Checkpointing on or off; an LLM.int8 base checkpoints reentrantly unless the file or
    stack said how: a non-reentrant checkpoint keeps every 8-bit Linear's input (GiBs), the
    reentrant one recomputes the same (memory/quantization.py)."""
    if ckpt and key == "qlora-int8" and "checkpoint_reentrant" not in req.fixed:
        return {"gradient_checkpointing": True, "checkpoint_reentrant": True}
    return {"gradient_checkpointing": ckpt}


def _galore_groups(req: PlanRequest, smallest: int) -> list[list[dict]]:
    """GaLore: one group of ranks per precision, optimizer and checkpointing; none when no
    rank fits and nobody asked for the minimum."""
    ranks = _ranks(req.min_galore_rank, smallest, 4)
    if not ranks:
        if _nobody_asked(req, "min_galore_rank"):
            return []
        raise VramplanError(
            f"{req.min_galore_rank}{_default_said(req, 'min_galore_rank')} is larger than the "
            f"smallest projected weight dimension ({smallest})",
            "--min-galore-rank",
        )
    # galore_torch projects plain tensors: no FSDP (DTensor shards); layer-wise
    # optimizers step from per-parameter hooks, which HF Trainer refuses under
    # distributed training, so they are planned for a single GPU only.
    # the four GaLore AdamW names (galore_adafactor* is left to --optim)
    optims = [
        o for o in Optim if o.traits.family == OptimFamily.GALORE_ADAMW and (not o.layerwise or req.gpus.count == 1)
    ]
    groups: list[list[dict]] = []
    for prec, optim, ckpt in itertools.product(_precisions(req), optims, (False, True)):
        if prec == Precision.FP16 and optim.layerwise:
            continue  # the GradScaler unscales every grad before one step (setup._check)
        groups.append(
            [
                dict(
                    method=Method.GALORE,
                    precision=prec,
                    optim=optim,
                    galore_rank=r,
                    gradient_checkpointing=ckpt,
                    data_parallel=_ddp_world(req, 1),
                )
                for r in ranks
            ]
        )
    return groups


# ------------------------------------------------------------------ the grid


def seq_grid(context: int) -> np.ndarray:
    """Sequence lengths searched: 128, every 256 up to 8192, then 1, 1.25, 1.5, 1.75 x each
    power of two, up to the context (and the context itself)."""
    vals = {128} | {256 * k for k in range(1, 33)}
    vals |= {int(2**e * f) for e in range(13, 18) for f in (1, 1.25, 1.5, 1.75)}
    vals = {v for v in vals if v <= context} | {context}
    return np.array(sorted(vals), dtype=np.int64)


# The fields that choose the trainer a plan's rows all run (--objective and its knobs, the stack
# whose trainer it is): checked once, up front, so that a trainer the stack does not run is said in
# one line rather than as "nothing fits"
TRAINER_FIELDS = (
    "objective",
    "stack",
    "loss",
    "fp32_outputs",
    "packing",
    "precompute_ref_log_probs",
    "kto_kl",
    "chosen_nll",
    "dpo_use_weighting",
    "completion_len",
    "steps_per_generation",
    "num_iterations",
    "beta",
    "generation",
    "vllm_gpu_memory_utilization",
)


def check_trainer(fixed: dict[str, Any]) -> None:
    """The fixed trainer fields make a valid step (a LoRA one at the smallest micro-batch it takes):
    --objective dpo needs a stack whose DPO trainer is modelled, and so on; raises naming the flag."""
    if fixed.get("objective", Objective.SFT) == Objective.SFT:
        return
    given = {k: v for k, v in fixed.items() if k in TRAINER_FIELDS}
    probe = dict(method="lora", batch_size=max(fixed.get("batch_size", 1), 2), seq_len=fixed.get("seq_len", 2048))
    if given.get("objective") == Objective.GRPO:
        probe["seq_len"] = max(probe["seq_len"], given.get("completion_len", 512) + 1)
    make_setup(**probe, **given)


def min_batch(setup: TrainingSetup) -> int:
    """The smallest micro-batch the trainer runs: KTO's KL term pairs a row with another's completion
    (trl kto_trainer.py:844-847); LLaMA-Factory builds its KL rows itself."""
    if setup.objective == Objective.KTO and setup.kto_kl and setup.stack != Stack.LLAMAFACTORY:
        return 2
    return 1


def batch_grid(req: PlanRequest, layerwise: bool) -> np.ndarray:
    """Micro-batch sizes: 1..max_batch, or the divisors of the per-GPU share of the global
    batch; layer-wise optimizers cannot accumulate gradients (one micro-batch per step)."""
    if req.global_batch is None:
        return np.arange(1, req.max_batch + 1, dtype=np.int64)
    per_gpu = req.global_batch // req.gpus.count
    if layerwise:
        return np.array([per_gpu], dtype=np.int64)
    return np.array([b for b in range(1, min(per_gpu, req.max_batch) + 1) if per_gpu % b == 0], dtype=np.int64)


def _pareto(coef: np.ndarray) -> np.ndarray:
    """Drop phases (rows of coefficients, all multiplying non-negative features) that
    another phase matches or exceeds in every coefficient: the max over the rest is the
    same and far cheaper to evaluate on the grid."""
    ge = (coef[:, None, :] >= coef[None, :, :]).all(axis=2)  # ge[j, i]: phase j >= phase i everywhere
    same = ge & ge.T
    idx = np.arange(len(coef))
    # i goes when another phase covers it strictly, or is identical and comes first
    drop = ((ge & ~same) | (same & (idx[:, None] < idx[None, :]))).any(axis=0)
    return coef[~drop]


@dataclass
class Grid:
    """Per-GPU total bytes of one discrete configuration at every (seq, batch) point."""

    setup: TrainingSetup
    seqs: np.ndarray
    batches: np.ndarray
    total: np.ndarray  # [len(seqs), len(batches)] bytes per GPU
    host: int  # host RAM per node
    evaluated: int


def _allocs(spec: ModelSpec, setup: TrainingSetup, pre, batch: int, seq: int):
    m = step_model(spec, setup.model_copy(update={"batch_size": batch, "seq_len": seq}), every_layer=True, prepared=pre)
    return np.array([p.allocated for p in m.phases], dtype=np.float64), m.host_pinned


def _coefficients(spec: ModelSpec, setup: TrainingSetup, pre, s1: int, s2: int) -> tuple[np.ndarray, int]:
    """Per phase (c, per token, per token x seq): allocated = c + a*N + b*N*s with N = batch*seq,
    for sequences s1..s2 of one regime (_seq_regimes). Every term of the memory model scales
    with the tokens N except eager attention's probabilities and masks and SDPA's
    sliding-window masks (per token x seq); without those b = 0 and two calls do."""
    a1, pinned = _allocs(spec, setup, pre, 1, s1)
    a2, _ = _allocs(spec, setup, pre, 2, s1)
    per_n = (a2 - a1) / s1  # d/dN at fixed s = a + b*s1
    if s2 == s1 or not span_terms(spec, setup.model_copy(update={"seq_len": s1})):
        return np.stack([a1 - per_n * s1, per_n, np.zeros_like(a1)], axis=1), pinned
    a3, _ = _allocs(spec, setup, pre, 1, s2)
    if setup.packing == Packing.PADDING_FREE and s2 != 2 * s1:
        # one row of N tokens: allocated = c + a*N + b*N*N, from N = s1, 2*s1, s2
        ns = np.array([s1, 2 * s1, s2], dtype=np.float64)
        coef = np.linalg.solve(np.stack([np.ones(3), ns, ns * ns], axis=1), np.stack([a1, a2, a3]))
        return coef.T, pinned
    # a3 - c = (a + b*s2) * s2 and a1 - c = (a + b*s1) * s1 with a = per_n - b*s1
    b = (a3 - a1 - per_n * (s2 - s1)) / ((s2 - s1) * s2)
    a = per_n - b * s1
    return np.stack([a1 - a * s1 - b * s1 * s1, a, b], axis=1), pinned


def _totals(alloc: np.ndarray, gpus: GpuSpec) -> np.ndarray:
    """estimate_spec's total from the allocated peak: + allocator overhead + CUDA context."""
    overhead = np.floor(0.05 * alloc) + 32 * MiB  # allocator_overhead(), vectorised
    return alloc + overhead + context_bytes(gpus)


def host_need(pinned: int, setup: TrainingSetup, req: PlanRequest) -> int:
    """Host RAM of one node: estimate_spec's rule (one process per rank of the FSDP group
    on this host), with the ranks of one node."""
    ranks = min(req.gpus_per_node, max(setup.fsdp, setup.data_parallel, 1))
    return ranks * (PROCESS_HOST_BYTES + pinned)


def _seq_regimes(spec: ModelSpec, setup: TrainingSetup, seqs: np.ndarray) -> list[np.ndarray]:
    """Row masks of the sequences one set of coefficients covers: a sliding-window SDPA
    model gets an explicit mask from its window on, and Unsloth's offloaded checkpointing
    starts at 512 tokens, so the sequences split there."""
    breaks = sorted({b for b in (mask_from(spec, setup), unsloth_from(setup)) if b is not None})
    edges = [0, *breaks, np.inf]
    regimes = [(seqs >= lo) & (seqs < hi) for lo, hi in zip(edges, edges[1:], strict=False)]
    return [m for m in regimes if m.any()]


def evaluate(spec: ModelSpec, setup: TrainingSetup, req: PlanRequest, seqs: np.ndarray, batches: np.ndarray) -> Grid:
    """Per-GPU totals over the grid. A micro-batch that --global-batch makes accumulate holds
    every gradient through its later micro-batches (memory/accumulation.py): those columns are
    evaluated with accumulation (any count above 1 holds the same)."""
    grid = _evaluate_at(spec, setup, req, seqs, batches)
    accumulating = np.array([_accum(req, int(b)) > 1 for b in batches])
    if not accumulating.any() or setup.steps_in_backward:
        return grid
    later = _evaluate_at(spec, setup.model_copy(update={"gradient_accumulation": 2}), req, seqs, batches)
    total = np.where(accumulating[None, :], later.total, grid.total)
    return Grid(setup, seqs, batches, total, grid.host, grid.evaluated + later.evaluated)


def _evaluate_at(
    spec: ModelSpec, setup: TrainingSetup, req: PlanRequest, seqs: np.ndarray, batches: np.ndarray
) -> Grid:
    pre = prepare(spec, setup)
    if setup.objective == Objective.GRPO:
        return _evaluate_exactly(spec, setup, req, seqs, batches, pre)
    tokens = (seqs[:, None] * batches[None, :]).astype(np.float64)
    alloc = np.full(tokens.shape, -np.inf)
    pinned = 0
    for rows in _seq_regimes(spec, setup, seqs):
        sub = seqs[rows]
        coef, pinned = _coefficients(spec, setup, pre, int(sub[0]), int(sub[-1]))
        t = tokens[rows]
        part = np.full(t.shape, -np.inf)
        span = t if setup.packing == Packing.PADDING_FREE else sub[:, None]  # attention_span
        for c, a, b in _pareto(coef):  # after the Pareto filter a handful of phases remain
            np.maximum(part, c + a * t + b * t * span, out=part)
        alloc[rows] = part
    # paged optimizer states are on the GPU but outside the allocated peak (estimate_spec's total)
    total = _totals(alloc, req.gpus) + pre.static.paged_states
    return Grid(setup, seqs, batches, total, host_need(pinned, setup, req), alloc.size)


def _evaluate_exactly(
    spec: ModelSpec, setup: TrainingSetup, req: PlanRequest, seqs: np.ndarray, batches: np.ndarray, pre: Prepared
) -> Grid:
    """Every grid point's step model: a GRPO step is not affine in the token count (the head scores
    batch x completion rows, generation holds batch x steps_per_generation rows' cache)."""
    alloc = np.full((len(seqs), len(batches)), np.inf)
    pinned = 0
    outside = pre.static.paged_states + vllm_colocated_bytes(setup, req.gpus.profile.memory_bytes)
    for i, seq in enumerate(seqs):
        for j, batch in enumerate(batches):
            point = setup.model_copy(update={"seq_len": int(seq), "batch_size": int(batch)})
            model = step_model(spec, point, every_layer=True, prepared=pre)
            alloc[i, j], pinned = model.peak.allocated, model.host_pinned
            if model.peak.allocated + outside > req.gpus.profile.memory_bytes:
                break  # a larger micro-batch holds more: the rest of the row does not fit either
    total = _totals(alloc, req.gpus) + outside
    return Grid(setup, seqs, batches, total, host_need(pinned, setup, req), alloc.size)


# ------------------------------------------------------------------ rows and the search


class PlanRow(BaseModel):
    """One feasible configuration, at the shortest acceptable sequence and the fastest
    micro-batch that fits."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    setup: TrainingSetup
    label: str
    method: str
    grad_accum: int = Field(description="micro-batches per optimizer step")
    global_batch: int = Field(description="sequences per optimizer step over all GPUs")
    tokens_per_s: float = Field(description="estimated training throughput over all GPUs")
    step_s: float = Field(description="estimated seconds per optimizer step")
    comm_s: float = Field(description="collectives per step (overlapped with compute unless they are longer)")
    host_s: float = Field(description="CPU offload transfers and CPU optimizer step per step")
    per_gpu_bytes: int = Field(description="estimate_spec's per-GPU total (what nvidia-smi would show)")
    host_ram_bytes: int = Field(description="host RAM one node needs")
    headroom_bytes: int
    max_seq_len: int = Field(description="longest sequence that fits at micro-batch 1 (grid resolution)")
    max_micro_batch: int = Field(description="largest micro-batch that fits at this sequence length")


class PlanResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    gpus: str
    gpu_memory_bytes: int
    rows: list[PlanRow] = Field(description="feasible configurations, fastest first, each re-checked by estimate")
    recommended: PlanRow | None = None
    reason: str = ""
    per_method: dict[str, dict] = Field(
        default_factory=dict, description="longest sequence / largest micro-batch per method"
    )
    suggestions: list[str] = Field(default_factory=list, description="what would fit, when nothing does")
    notes: list[str] = Field(
        default_factory=list,
        description="what the estimates on these cards and this "
        "architecture rest on (hardware.gpu_notes, estimate.coverage_notes)",
    )
    rules: list[str] = Field(default_factory=list, description="how rows are ranked and the recommendation chosen")
    assumed: list[str] = Field(default_factory=list, description="what the plan assumed without being told")
    evaluated: int = Field(description="(configuration, sequence, micro-batch) points evaluated")
    discrete: int = Field(description="discrete configurations evaluated")


def label(setup: TrainingSetup, vary: dict[str, tuple[str, ...]] | None = None) -> str:
    parts = {
        Method.FULL: "full" if setup.train_layers is None else f"last {setup.train_layers} layers",
        Method.LORA: f"LoRA r{setup.lora_r}",
        Method.GALORE: f"GaLore r{setup.galore_rank}",
        Method.QLORA: f"QLoRA {setup.quant.value if setup.quant else ''} r{setup.lora_r}",
    }[setup.method].split()
    parts.append(setup.precision.value)
    parts.append(setup.optim.label + (" in backward" if setup.optimizer_in_backward else ""))
    if setup.gradient_checkpointing:
        # LLM.int8: which checkpoint decides GiBs (_checkpointing), so the row says it
        parts.append("+ reentrant ckpt" if setup.quant == Quant.INT8 and setup.checkpoint_reentrant else "+ ckpt")
    if setup.fsdp > 1:
        parts.append(f"+ FSDP{setup.fsdp}" + (" + offload" if setup.cpu_offload else ""))
    if setup.deepspeed is not None:
        parts.append(
            f"+ {setup.deepspeed.value.upper().replace('ZERO', 'ZeRO-')}x{setup.data_parallel}"
            + (" + offload" if setup.offload_optimizer else "")
        )
    parts += [f"+ {p}" for p in varied_label(setup, vary or {})]
    return " ".join(parts)


def _accum(req: PlanRequest, batch: int) -> int:
    if req.global_batch is None:
        return 1
    return req.global_batch // (req.gpus.count * batch)


def _speed(spec: ModelSpec, setup: TrainingSetup, req: PlanRequest, accum: int):
    return step_time(spec, setup, req.gpus.profile, gpus=req.gpus.count, gpus_per_node=req.gpus_per_node, accum=accum)


def _fits(grid: Grid, req: PlanRequest) -> np.ndarray:
    host_ok = req.host_ram is None or grid.host <= req.host_ram
    return (grid.total <= req.gpus.profile.memory_bytes) & host_ok


def _row_at(spec: ModelSpec, grid: Grid, req: PlanRequest, si: int, bi: int, ones: np.ndarray) -> PlanRow:
    b = int(grid.batches[bi])
    accum = _accum(req, b)
    update = {"batch_size": b, "seq_len": int(grid.seqs[si]), "gradient_accumulation": max(accum, 1)}
    setup = grid.setup.model_copy(update=update)
    t = _speed(spec, setup, req, accum)
    total = int(grid.total[si, bi])
    return PlanRow(
        setup=setup,
        label=label(setup, req.vary),
        method=method_key(setup),
        grad_accum=accum,
        global_batch=accum * b * req.gpus.count,
        tokens_per_s=req.gpus.count * t.tokens_per_s_per_gpu,
        step_s=t.step_s,
        comm_s=t.comm_s,
        host_s=t.host_s,
        per_gpu_bytes=total,
        host_ram_bytes=grid.host,
        headroom_bytes=req.gpus.profile.memory_bytes - total,
        max_seq_len=int(grid.seqs[ones[-1]]) if len(ones) else 0,
        max_micro_batch=b,
    )


def _candidate_rows(spec: ModelSpec, grid: Grid, req: PlanRequest, si: int, fits: np.ndarray) -> list[PlanRow]:
    """The fastest fitting micro-batch at sequence index si: the largest (the throughput
    model's per-micro-batch overheads only shrink per token as the micro-batch grows); and,
    when that one is under the headroom rule, the largest that keeps it, so a configuration
    is never dropped from the recommendation for want of a smaller micro-batch."""
    ok = np.nonzero(fits[si])[0]
    if not len(ok):
        return []
    ones = np.nonzero(fits[:, 0])[0] if grid.batches[0] == 1 else np.array([], dtype=np.int64)
    picks = [int(ok[-1])]
    cap = req.gpus.profile.memory_bytes
    safe = np.nonzero(fits[si] & (grid.total[si] <= cap - safe_margin(cap)))[0]
    if len(safe) and int(safe[-1]) != picks[0]:
        picks.append(int(safe[-1]))
    return [_row_at(spec, grid, req, si, bi, ones) for bi in picks]


def _candidates(spec: ModelSpec, grids: list[Grid], req: PlanRequest) -> list[PlanRow]:
    """The rows the vectorised search says fit, fastest first (not yet re-checked)."""
    candidates = []
    for g in grids:
        si = _seq_index(g, req)
        if si < len(g.seqs):
            candidates += _candidate_rows(spec, g, req, si, _fits(g, req))
    candidates.sort(key=rank_key)
    return candidates


def _recheck(spec: ModelSpec, row: PlanRow, req: PlanRequest, alloc_conf: str | None = None) -> PlanRow | None:
    """The row as estimate_spec sees it; None when estimate says it does not fit. alloc_conf:
    the PYTORCH_CUDA_ALLOC_CONF of the allocator replay (None: the environment's)."""
    single_node = req.nodes == 1
    est = estimate_spec(spec, row.setup, req.gpus, req.host_ram if single_node else None, alloc_conf=alloc_conf)
    host = row.host_ram_bytes if not single_node else est.host_ram_bytes
    if not est.fits or (req.host_ram is not None and host > req.host_ram):
        return None
    return row.model_copy(
        update={"per_gpu_bytes": est.per_gpu.total_bytes, "headroom_bytes": est.headroom_bytes, "host_ram_bytes": host}
    )


# What the search varies (candidate_groups, the grid) or plans itself (--nodes, --global-batch);
# a --config file's value for these is left to the search. DeepSpeed is not searched: the
# search shards with FSDP, which excludes it.
SEARCHED_FIELDS = frozenset(
    {
        "method",
        "quant",
        "lora_r",
        "galore_rank",
        "gradient_checkpointing",
        "fsdp",
        "cpu_offload",
        "batch_size",
        "seq_len",
        "gradient_accumulation",
        "nodes",
        "deepspeed",
        "offload_optimizer",
        "offload_params",
    }
)


def fixed_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a --config/--stack that the search keeps fixed."""
    return {k: v for k, v in fields.items() if k not in SEARCHED_FIELDS and v is not None}


def _setup(req: PlanRequest, fields: dict, seq: int) -> TrainingSetup | None:
    """A candidate on top of the fixed fields; None when they exclude it (a file's optimizer
    that the candidate's method cannot take)."""
    if not req.fixed and not req.vary:
        setup = make_setup(**fields, seq_len=seq)
    else:
        fixed = dict(req.fixed)
        if fixed.get("objective") == Objective.KTO and fixed.get("kto_kl", True):  # min_batch's floor
            fixed.setdefault("batch_size", 2)
        try:
            setup = make_setup(**{**fixed, **fields, "seq_len": seq})
        except VramplanError:
            return None
    # LoRA candidates leave the precision to the stack: fp16 on a card without bf16, as estimate does
    try:
        return fp16_on_card(setup, req.gpus, "precision" in fields or "precision" in req.fixed)[0]
    except VramplanError:
        return None  # what fp16 cannot run (an optimizer stepped inside backward)


def _grpo_seqs(seqs: np.ndarray, req: PlanRequest) -> np.ndarray:
    """GRPO's sequence is prompt + completion, set by the data and --completion-len, not a knob to
    search: that one length (--min-seq, the file's prompt + completion, or one token above the
    completion), on the grid or not, evaluated exactly at every micro-batch (_evaluate_exactly);
    none beyond the context."""
    if req.fixed.get("objective") != Objective.GRPO:
        return seqs
    completion = int(req.fixed.get("completion_len", TrainingSetup.model_fields["completion_len"].default))
    length = max(req.min_seq, completion + 1)
    return np.array([length] if length <= seqs[-1] else [], dtype=np.int64)


def search(spec: ModelSpec, req: PlanRequest) -> tuple[list[Grid], int]:
    """Evaluate every discrete configuration on the (seq, batch) grid."""
    seqs = _grpo_seqs(seq_grid(req.context), req)
    grids, evaluated = [], 0
    for group in candidate_groups(spec, req):
        for fields in group:
            setup = _setup(req, fields, int(seqs[0]))
            if setup is None:
                continue
            batches = batch_grid(req, setup.optim.layerwise)
            grid = evaluate(spec, setup, req, seqs, batches[batches >= min_batch(setup)])
            grids.append(grid)
            evaluated += grid.evaluated
            if not _fits(grid, req)[:, 0].any():
                break  # a larger rank needs more memory everywhere
    return grids, evaluated


def _seq_index(grid: Grid, req: PlanRequest) -> int:
    """The shortest grid sequence >= min_seq."""
    return int(np.searchsorted(grid.seqs, req.min_seq))


def _confirmed(spec: ModelSpec, setup: TrainingSetup, req: PlanRequest) -> bool:
    """estimate_spec's verdict (the host rule per node, as in _recheck)."""
    est = gpu_verdict(spec, setup, req.gpus)
    pinned = est.host_ram_bytes // ranks_per_node(est.setup, req.gpus) - PROCESS_HOST_BYTES
    return est.fits_gpu and (req.host_ram is None or host_need(pinned, setup, req) <= req.host_ram)


# configurations whose grid edge is above the best confirmed value that _limit confirms at most
LIMIT_TRIES = 8


@dataclass(frozen=True)
class _Edge:
    """One configuration's candidates (value, setup) around the grid's last fit, `edge`."""

    edge: int
    options: list[tuple[int, TrainingSetup]]


def _limit(spec: ModelSpec, req: PlanRequest, edges: list[_Edge]) -> tuple[int, TrainingSetup | None]:
    """The largest value estimate confirms (the grid rarely differs from it, by the 512 B
    rounding of allocations, but what is reported must fit). Configurations are tried by their
    grid edge, largest first; the first may also confirm past its edge (_edge: a step that fits
    by emptying the cache), the others up to it. Each is tried only while its edge beats the
    best confirmed value, and at most LIMIT_TRIES of them: what is reported is always confirmed,
    and may be one grid step below a configuration that was not tried."""
    best, best_setup = 0, None
    for rank, e in enumerate(sorted(edges, key=lambda e: -e.edge)):
        if e.edge <= best or rank >= LIMIT_TRIES:
            break
        for value, setup in sorted(e.options, key=lambda o: -o[0]):
            if value <= best:
                break
            if (rank == 0 or value <= e.edge) and _confirmed(spec, setup, req):
                best, best_setup = value, setup
                break
    return best, best_setup


def _edge(fitting: np.ndarray, n: int) -> list[int]:
    """Grid indices to confirm around the grid's last fit: its last two, and the next two,
    which the allocator replay's verdict (a step may fit by emptying the cache, where the
    grid's flat margin says not) can still confirm."""
    last = int(fitting[-1]) if len(fitting) else -1
    return [int(i) for i in fitting[-2:]] + [i for i in (last + 1, last + 2) if 0 <= i < n and len(fitting)]


def _grid_edges(g: Grid, req: PlanRequest) -> tuple[_Edge | None, _Edge | None]:
    """One grid's (longest sequence at micro-batch 1, largest micro-batch at the minimum
    sequence) candidates, None where the grid fits nowhere."""
    fits = _fits(g, req)
    by_seq = by_batch = None
    seq_fit = np.nonzero(fits[:, 0])[0]
    if g.batches[0] == 1 and len(seq_fit):
        opts = [
            (int(g.seqs[i]), g.setup.model_copy(update={"batch_size": 1, "seq_len": int(g.seqs[i])}))
            for i in _edge(seq_fit, len(g.seqs))
        ]
        by_seq = _Edge(int(g.seqs[seq_fit[-1]]), opts)
    si = _seq_index(g, req)
    batch_fit = np.nonzero(fits[si])[0] if si < len(g.seqs) else np.zeros(0, dtype=int)
    if len(batch_fit):
        seq = int(g.seqs[si])
        opts = [
            (int(g.batches[j]), g.setup.model_copy(update={"batch_size": int(g.batches[j]), "seq_len": seq}))
            for j in _edge(batch_fit, len(g.batches))
        ]
        by_batch = _Edge(int(g.batches[batch_fit[-1]]), opts)
    return by_seq, by_batch


def _per_method(spec: ModelSpec, grids: list[Grid], req: PlanRequest) -> dict[str, dict]:
    """Per method: the longest sequence that fits at micro-batch 1, and the largest
    micro-batch that fits at the minimum sequence, with the configuration that reaches it."""
    seq_opts: dict[str, list[_Edge]] = {}
    batch_opts: dict[str, list[_Edge]] = {}
    for g in grids:
        key = method_key(g.setup)
        by_seq, by_batch = _grid_edges(g, req)
        seq_opts.setdefault(key, []).extend([by_seq] if by_seq else [])
        batch_opts.setdefault(key, []).extend([by_batch] if by_batch else [])
    out = {}
    for key in seq_opts:
        seq, s_setup = _limit(spec, req, seq_opts[key])
        batch, b_setup = _limit(spec, req, batch_opts[key])
        out[key] = {
            "max_seq_len": seq,
            "max_seq_config": label(s_setup, req.vary) if s_setup else None,
            "max_seq_setup": s_setup.model_dump(mode="json") if s_setup else None,
            "max_micro_batch": batch,
            "max_batch_config": label(b_setup, req.vary) if b_setup else None,
            "max_batch_setup": b_setup.model_dump(mode="json") if b_setup else None,
        }
    return out


def rank_key(row: PlanRow) -> tuple[float, float, int]:
    """Fastest first by estimated tokens/s, exactly; only equal speeds go to less communication,
    then to more headroom (RANK_RULE says so in the output)."""
    return (-row.tokens_per_s, row.comm_s, -row.headroom_bytes)


RANK_RULE = (
    "rows: fastest first by estimated tokens/s (equal speeds: less communication, then more headroom); "
    "* marks the recommendation, the fastest row under the headroom rule"
)


def _adapter_notes(spec: ModelSpec, req: PlanRequest) -> list[str]:
    """The notes of the adapter methods searched (fused MoE experts stay bf16 and frozen)."""
    if any(k.startswith("qlora") for k in req.methods):
        return fused_expert_note(spec, TrainingSetup(method=Method.QLORA))
    return fused_expert_note(spec, TrainingSetup(method=Method.LORA)) if "lora" in req.methods else []


def plan_rules(req: PlanRequest, spec: ModelSpec) -> list[str]:
    """The rules the plan ranks and recommends by, printed with it."""
    rules = [RANK_RULE, rule_text(req.gpus.profile.memory_bytes)]
    if any(k in req.methods for k in ADAPTER_KEYS):
        ranks = _ranks(req.min_lora_rank, _smallest_dim(spec), 3)
        rules.append(
            f"LoRA ranks searched: {', '.join(map(str, ranks))} (--min-lora-rank {req.min_lora_rank} is the "
            "smallest rank you accept); a larger rank is ranked by its speed like any row, never preferred"
        )
    if "galore" in req.methods:
        ranks = _ranks(req.min_galore_rank, _smallest_dim(spec), 4)
        rules.append(
            f"GaLore ranks searched: {', '.join(map(str, ranks))} (--min-galore-rank {req.min_galore_rank} "
            "is the smallest you accept), ranked by speed like any row"
        )
    if "qlora-int8" in req.methods and "checkpoint_reentrant" not in req.fixed:
        rules.append(
            "LLM.int8 rows checkpoint reentrantly (use_reentrant=True; --emit writes it): a non-reentrant "
            "checkpoint keeps every 8-bit Linear's input, and the recompute is the same"
        )
    return rules


def plan_assumptions(req: PlanRequest) -> list[str]:
    """What the plan took without being told (vramplan.assumptions)."""
    seq = f"sequences of at least {req.min_seq} tokens (--min-seq), micro-batch 1..{req.max_batch} (--max-batch)"
    return [
        seq,
        stack_phrase(Stack(req.fixed.get("stack", Stack.PLAIN))),
        req.host_ram_said or host_ram_phrase(req.host_ram, True, True),
        data_parallel_phrase(req.gpus.count),
    ]


def _reason(row: PlanRow, fastest: PlanRow, req: PlanRequest) -> str:
    cap = req.gpus.profile.memory_bytes
    if row is fastest:
        why = "fastest configuration that fits"
        if not has_safe_headroom(row.headroom_bytes, cap):
            why += f" (all fit with under {SAFE_SHARE:.0%} headroom: a longer sample may not)"
    else:
        why = (
            f"fastest under the headroom rule ({fastest.label} at micro-batch {fastest.setup.batch_size} is "
            f"{fastest.tokens_per_s / row.tokens_per_s - 1:.0%} faster but leaves only "
            f"{fastest.headroom_bytes / GiB:.2f} GiB)"
        )
    trade = {
        "full": "trains every weight",
        "galore": "trains every weight with low-rank projected optimizer states",
        "lora": "frozen bf16 base with LoRA adapters",
        "qlora-nf4": "4-bit (nf4) frozen base with LoRA adapters",
        "qlora-hqq4": "4-bit (hqq) frozen base with LoRA adapters",
        "qlora-int8": "8-bit (LLM.int8) frozen base with LoRA adapters",
    }[row.method]
    if row.setup.train_layers is not None:  # freeze tuning (memory/freeze.py)
        trade = f"trains the last {row.setup.train_layers} decoder layers, the rest frozen"
    extra = []
    if row.setup.fsdp > 1:
        extra.append(f"sharded over {row.setup.fsdp} GPUs")
    if row.setup.deepspeed is not None:
        extra.append(
            f"DeepSpeed {row.setup.deepspeed.value} over {row.setup.data_parallel} GPUs"
            + (" with the optimizer in host RAM" if row.setup.offload_optimizer else "")
        )
    if row.setup.cpu_offload:
        extra.append("shards and optimizer in host RAM")
    if row.setup.gradient_checkpointing:
        extra.append("recomputes layers in backward")
    return (
        f"{why}: {trade}"
        + (f", {', '.join(extra)}" if extra else "")
        + f"; ~{row.tokens_per_s:,.0f} tokens/s, micro-batch {row.setup.batch_size} x {row.setup.seq_len}"
    )


def plan_spec(spec: ModelSpec, req: PlanRequest, top: int = 10, suggest: bool = True) -> PlanResult:
    grids, evaluated = search(spec, req)
    rows: list[PlanRow] = []
    for row in _candidates(spec, grids, req):  # re-check with the real estimate until `top` rows survive
        if len(rows) >= top:
            break
        checked = _recheck(spec, row, req)
        if checked is not None:
            rows.append(checked)
    cap = req.gpus.profile.memory_bytes
    rec = next((r for r in rows if has_safe_headroom(r.headroom_bytes, cap)), rows[0] if rows else None)
    reason = _reason(rec, rows[0], req) if rec else ""
    result = PlanResult(
        model=spec.name,
        gpus=req.gpus.label,
        gpu_memory_bytes=cap,
        rows=rows,
        recommended=rec,
        reason=reason,
        per_method=_per_method(spec, grids, req),
        evaluated=evaluated,
        discrete=len(grids),
        notes=gpu_notes(req.gpus) + coverage_notes(spec) + _adapter_notes(spec, req),
        rules=plan_rules(req, spec),
        assumed=plan_assumptions(req),
    )
    if not rows and suggest:
        result = result.model_copy(update={"suggestions": suggestions(spec, req, grids)})
    return result


# ------------------------------------------------------------------ when nothing fits


def _first_fit(spec: ModelSpec, req: PlanRequest, **update) -> PlanRow | None:
    try:
        res = plan_spec(spec, req.model_copy(update=update), top=1, suggest=False)
    except VramplanError:
        return None
    return res.rows[0] if res.rows else None


def _shorter_context(spec: ModelSpec, req: PlanRequest, grids: list[Grid]) -> list[str]:
    edges = [e for e in (_grid_edges(g, req)[0] for g in grids) if e is not None]
    best_seq, best = _limit(spec, req, edges)
    if best_seq and best is not None:
        return [f"shorter context: --min-seq {best_seq} fits ({label(best, req.vary)}, micro-batch 1)"]
    return []


def _more_host_ram(spec: ModelSpec, req: PlanRequest, grids: list[Grid]) -> list[str]:
    gpu_only = req.model_copy(update={"host_ram": None})
    host_bound = [g for g in grids if _seq_index(g, req) < len(g.seqs) and _fits(g, gpu_only)[_seq_index(g, req), 0]]
    if not host_bound or req.host_ram is None:
        return []
    g = min(host_bound, key=lambda g: g.host)
    what = label(g.setup, req.vary)
    return [
        f"more host RAM: {what} fits the GPUs and needs {g.host / GiB:.0f} GiB of host RAM per node "
        f"(--host-ram {math.ceil(g.host / GiB)}GB; {req.host_ram / GiB:.0f} GiB assumed)"
    ]


def _more_gpus(spec: ModelSpec, req: PlanRequest, grids: list[Grid]) -> list[str]:
    n = req.gpus.count
    for more in (2 * n, 4 * n, 8 * n):
        gpus = req.gpus.model_copy(update={"count": more, "label": f"{more}x{req.gpus.profile.name}"})
        nodes = max(req.nodes, -(-more // max(req.gpus_per_node, 8)))
        row = _first_fit(spec, req, gpus=gpus, nodes=nodes, global_batch=None)
        if row:
            return [
                f"more GPUs: {more}x {req.gpus.profile.display_name} fit {row.label} "
                f"(~{row.tokens_per_s:,.0f} tokens/s)"
            ]
    return []


def larger_cards(memory_bytes: int) -> list:
    """One card per size class above this memory, smallest first: NVIDIA cards with bf16 (what
    people buy or rent to train on; the estimate is of a bf16 CUDA step), the roomiest of each
    class. Every class up to the largest (80 GB, 141 GB), not only the next few."""
    by_size: dict[int, list] = {}
    for p in profiles().values():
        if p.vendor == Vendor.NVIDIA and p.bf16 and p.memory_bytes > memory_bytes:
            by_size.setdefault(round(p.nominal_memory_gb), []).append(p)
    return [max(cards, key=lambda p: (p.memory_bytes, p.training_tflops)) for _, cards in sorted(by_size.items())]


def _larger_card(spec: ModelSpec, req: PlanRequest, grids: list[Grid]) -> list[str]:
    """The smallest card class that fits. Whether a plan fits grows with the card's memory, so
    the largest class is tried first (nothing fits: done) and the smallest fitting one found by
    bisection: a handful of plans, not one per class."""
    n = req.gpus.count
    cards = larger_cards(req.gpus.profile.memory_bytes)

    def fit(i: int) -> PlanRow | None:
        return _first_fit(spec, req, gpus=GpuSpec(count=n, profile=cards[i], label=f"{n}x{cards[i].name}"))

    if not cards or (row := fit(len(cards) - 1)) is None:
        return []
    lo, hi = 0, len(cards) - 1  # cards[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        found = fit(mid)
        if found is not None:
            hi, row = mid, found
        else:
            lo = mid + 1
    prof = cards[hi]
    return [
        f"a larger card: {n}x {prof.name} ({prof.memory_bytes / GiB:.0f} GiB) fits {row.label} "
        f"(~{row.tokens_per_s:,.0f} tokens/s)"
    ]


SuggestionProvider = Callable[[ModelSpec, PlanRequest, list[Grid]], list[str]]

EXPANDABLE_RECHECKS = 10  # the fastest candidates replayed again with expandable segments


def _expandable_segments(spec: ModelSpec, req: PlanRequest, grids: list[Grid]) -> list[str]:
    """The same search's fastest candidates, which the vectorised search passed and the
    allocator replay refused, replayed with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    on top of the configured allocator (docs/allocator.md): segments mapped in pages strand
    no partly used tails, so a step that fails only for fragmentation can run. Nothing to say
    when the allocator already expands its segments."""
    conf = with_expandable_segments()
    if conf is None:
        return []
    for row in _candidates(spec, grids, req)[:EXPANDABLE_RECHECKS]:
        checked = _recheck(spec, row, req, alloc_conf=conf)
        if checked is not None:
            return [
                f"expandable segments: with PYTORCH_CUDA_ALLOC_CONF={conf} (`--alloc-conf {conf}`) the simulated "
                f"allocator fits {checked.label} ({checked.headroom_bytes / GiB:.2f} GiB left, "
                f"~{checked.tokens_per_s:,.0f} tokens/s): pages instead of whole cached segments, so partly "
                "used segments strand less"
            ]
    return []


def _with_knob(knob: str, value: str, how: str) -> SuggestionProvider:
    """A knob of the stack the user did not fix (--config, --stack), set on top of the plan's
    own search, as _larger_card sets a card: what fits then, said in the frameworks' words."""

    def provider(spec: ModelSpec, req: PlanRequest, grids: list[Grid]) -> list[str]:
        if knob in req.fixed or knob in req.vary:
            return []
        row = _first_fit(spec, req, fixed={**req.fixed, knob: value})
        return [f"{how}: fits {row.label} (~{row.tokens_per_s:,.0f} tokens/s)"] if row else []

    return provider


# What would fit instead, each a function of (model, request, evaluated grids) -> lines, in order:
# the same step with the allocator's expandable segments, then the same hardware (a shorter
# context, a loss that never builds the [N, V] logits, checkpoint inputs in pinned host RAM),
# then more host RAM, GPUs, a larger card.
SUGGESTION_PROVIDERS: list[SuggestionProvider] = [
    _expandable_segments,
    _shorter_context,
    _with_knob("loss", "liger", f"with {FUSED_LOSS_SHORT}"),
    _with_knob(
        "liger_layers",
        "all",
        "with Liger's RMSNorm and SwiGLU kernels (`--liger-layers all`; HF Trainer/TRL: `use_liger_kernel: true`, "
        "axolotl: the LigerPlugin's `liger_rms_norm`/`liger_glu_activation`; modelled from source)",
    ),
    _with_knob(
        "activation_offload",
        "checkpoints",
        "with checkpointed layers' inputs in pinned host RAM (`--activation-offload checkpoints`; transformers: "
        "`activation_checkpointing_kwargs: {offload: true}`, modelled from source)",
    ),
    _more_host_ram,
    _more_gpus,
    _larger_card,
]


def suggestions(spec: ModelSpec, req: PlanRequest, grids: list[Grid]) -> list[str]:
    """What would fit instead: every provider of SUGGESTION_PROVIDERS, in order."""
    out = [line for provider in SUGGESTION_PROVIDERS for line in provider(spec, req, grids)]
    return out or ["nothing tried fits: a smaller model, or more nodes (--nodes) with FSDP across them"]


# ------------------------------------------------------------------ entry points


def model_context(model: str | ModelSpec) -> int:
    """max_position_embeddings from the model's config (DEFAULT_CONTEXT when unknown), at most
    MAX_SEQ_LEN (the grid's longest sequence). resolve_config has checked it is a positive int."""
    if isinstance(model, ModelSpec):
        return DEFAULT_CONTEXT
    _, _, cfg = resolve_config(model)
    ctx = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    return min(int(ctx), MAX_SEQ_LEN) if ctx else DEFAULT_CONTEXT


def make_request(
    model: str | ModelSpec,
    gpus: str | GpuSpec | None,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    min_seq: int | None = None,
    global_batch: int | None = None,
    methods=None,
    min_lora_rank: int | None = None,
    min_galore_rank: int | None = None,
    host_ram: int | str | None = None,
    max_batch: int | None = None,
    gpu_tflops: float | str | None = None,
    gpu_bandwidth: float | str | None = None,
    reserve: str | int | None = None,
    fixed: dict[str, Any] | None = None,
    vary: list[str] | dict | None = None,
) -> PlanRequest:
    gspec = resolve_gpus(gpus, gpu_tflops=gpu_tflops, gpu_bandwidth=gpu_bandwidth, reserve=reserve)
    if gpus_per_node is not None:
        check_int(gpus_per_node, "--gpus-per-node", MAX_RANKS)
        if gspec.count % gpus_per_node:
            raise VramplanError(
                f"must be a positive divisor of the GPU count ({gspec.count}), got {gpus_per_node}", "--gpus-per-node"
            )
        if nodes is not None and nodes * gpus_per_node != gspec.count:
            raise VramplanError(
                f"--nodes {nodes} x --gpus-per-node {gpus_per_node} is not the {gspec.count} GPUs of --gpus",
                "--gpus-per-node",
            )
        nodes = gspec.count // gpus_per_node
    given = host_ram is not None
    host_ram = host_ram_bytes(host_ram, "--host-ram")
    if host_ram is None:  # as `vramplan estimate`
        host_ram = default_host_ram(gpus_named=gpus is not None)
    host_ram_said = host_ram_phrase(host_ram, given=given, gpus_named=gpus is not None)
    context = model_context(model)
    if min_seq is None:
        min_seq = min(2048, context)
    fields = dict(
        gpus=gspec,
        nodes=nodes,
        min_seq=min_seq,
        global_batch=global_batch,
        methods=parse_methods(methods),
        min_lora_rank=min_lora_rank,
        min_galore_rank=min_galore_rank,
        host_ram=host_ram,
        max_batch=max_batch,
        context=context,
        host_ram_said=host_ram_said,
        fixed=fixed_fields(fixed or {}),
        vary=parse_vary(vary),
    )
    try:
        return PlanRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise from_validation_error(e) from None


def plan_model(
    model: str | ModelSpec,
    gpus: str | GpuSpec | None = None,
    top: int = 10,
    num_layers: int | None = None,
    **constraints,
) -> PlanResult:
    check_int(top, "--top", MAX_TOP)
    req = make_request(model, gpus, **constraints)
    check_trainer(req.fixed)
    spec = model if isinstance(model, ModelSpec) else load_model_spec(model, num_layers=num_layers)
    return plan_spec(spec, req, top=top)
