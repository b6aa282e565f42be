"""The step as allocation events: the order and size of every allocation and free the
memory model knows, derived from its own outputs, for the caching-allocator replay
(vramplan/allocator.py).

What is at tensor granularity: each parameter's storage (and quantization state, and the
build's quantize temporaries per Linear, in order), each parameter's gradient when its
layer's backward ends (down's first, at the MLP's backward), each parameter's optimizer
states (two moments), the batch's token buffers, RoPE's cos/sin, the masks, autocast's
cast cache, each decoder layer's saved tensors in forward order by component (norms,
attention's Linears, attention, o_proj, MLP, and down's saved input last, freed first;
under checkpointing the kept input and the recompute's), what the final norm and lm_head
save. Everything a phase holds
beyond that (transients, FSDP's gathered units and reduce-scatter buffers, the parts of
a moment the tensors above do not explain) is a "balance" block per category, allocated
just before the phase's moment and freed just after, FSDP's split into unit-sized
gathers. So the live bytes at each phase's moment equal that phase's parts exactly, by
construction; tests/test_events.py checks it over every preset.

The step is replayed twice: step 0 (optimizer states made at its optimizer step, as
torch.optim makes them lazily) and the steady step whose moments are the phases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vramplan.allocator import EventStream, Op
from vramplan.categories import ALLOCATED
from vramplan.categories import Category as C
from vramplan.memory.activations import rope_saved
from vramplan.memory.attention import attention_saved, step_masks
from vramplan.memory.checkpointing import kept_per_layer
from vramplan.memory.context import StepContext, activation_context, stream_bytes
from vramplan.memory.fsdp import shard_for
from vramplan.memory.layer import ShapeKey, layer_points, shape_key
from vramplan.memory.linears import linears_saved
from vramplan.memory.loss import input_bytes, loop_token_bytes
from vramplan.memory.mlp import mlp_saved
from vramplan.memory.norms import norm_saved
from vramplan.memory.optimizers import optimizer_state
from vramplan.memory.parameters import Param, grad_bytes, store
from vramplan.memory.phases import prepare, step_context, step_model
from vramplan.memory.quantization import quantize_transient, quantized_store
from vramplan.memory.storage import Phase, alloc
from vramplan.memory.types import ATTENTION_IN_ROLES, MLP_OUT_ROLES, LayerPoint, LinearRole, PhaseKind
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import Method, Optim, TrainingSetup

CATEGORIES = tuple(C)
_CAT_INDEX = {c: i for i, c in enumerate(CATEGORIES)}


@dataclass(frozen=True)
class Moment:
    """A modelled phase and where it is in the event stream: the live tensors after
    events[:index] are the phase's."""

    phase: Phase
    index: int


@dataclass(frozen=True, eq=False)
class StepEvents:
    events: EventStream
    categories: np.ndarray  # int8 index into CATEGORIES per event (the allocation's category)
    moments: list[Moment]  # the steady step's phases, in the order they happen
    trimmed: int  # bytes of tensor-level blocks freed early to meet a phase (0: none needed)
    step_start: int  # index of the steady step's first event


@dataclass
class Ledger:
    """Builds the event stream and tracks what is live, by category."""

    ops: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    cats: list[int] = field(default_factory=list)
    live: dict[int, tuple[C, int]] = field(default_factory=dict)
    by_cat: dict[C, list[int]] = field(default_factory=dict)
    live_bytes: dict[C, int] = field(default_factory=dict)
    next_id: int = 0
    trimmed: int = 0

    def alloc(self, cat: C, size: int) -> int | None:
        if size <= 0:
            return None
        tid, self.next_id = self.next_id, self.next_id + 1
        self._emit(Op.ALLOC, tid, size, cat)
        self.live[tid] = (cat, size)
        self.by_cat.setdefault(cat, []).append(tid)
        self.live_bytes[cat] = self.live_bytes.get(cat, 0) + size
        return tid

    def free(self, tid: int | None) -> None:
        if tid is None or tid not in self.live:
            return  # never made (size 0) or already freed to meet a phase
        cat, size = self.live.pop(tid)
        self._emit(Op.FREE, tid, 0, cat)
        self.by_cat[cat].remove(tid)
        self.live_bytes[cat] -= size

    def _emit(self, op: Op, tid: int, size: int, cat: C) -> None:
        self.ops.append(int(op))
        self.ids.append(tid)
        self.sizes.append(size)
        self.cats.append(_CAT_INDEX[cat])

    def settle(self, target: dict[C, int], split: dict[C, list[int]], skip: frozenset[C] = frozenset()) -> list[int]:
        """Make the live bytes of every allocated category equal `target`: a balance block
        for what is missing (split into the given sizes first), and, where tensor-level
        blocks exceed it, the latest of them freed. Returns the balance blocks' ids."""
        out: list[int] = []
        for cat in ALLOCATED:
            if cat in skip:
                continue
            diff = target.get(cat, 0) - self.live_bytes.get(cat, 0)
            while diff < 0:
                tid = self.by_cat[cat][-1]
                diff += self.live[tid][1]
                self.trimmed += self.live[tid][1]
                self.free(tid)
            for size in split.get(cat, []):
                if 0 < size <= diff:
                    out.append(self.alloc(cat, size))  # type: ignore[arg-type]
                    diff -= size
            if diff > 0:
                out.append(self.alloc(cat, diff))  # type: ignore[arg-type]
        return out

    def stream(self) -> tuple[EventStream, np.ndarray]:
        n = len(self.ops)
        return (
            EventStream(
                np.asarray(self.ops, np.int8),
                np.asarray(self.ids, np.int64),
                np.asarray(self.sizes, np.int64),
                np.zeros(n, np.int64),
            ),
            np.asarray(self.cats, np.int8),
        )


def layer_components(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup, input_grad: bool) -> list[int]:
    """Per token, what one decoder layer saves, by component in forward order: the input
    norm, the attention's input Linears, q/k norms, attention, o_proj, the other norms, the
    MLP. The terms of layer.layer_saved_per_token, read one by one (its sum is theirs)."""
    ctx = activation_context(setup)
    n_norms = max(spec.norms_per_layer, 1)
    return [
        norm_saved(spec, ctx, input_grad),
        linears_saved(layer.linears_with(*ATTENTION_IN_ROLES), spec.hidden, ctx, input_grad),
        sum(norm_saved(spec, ctx, True, width=w) for w in layer.attn_norm_dims),
        attention_saved(spec, layer, ctx, setup.seq_len),
        linears_saved(
            layer.linears_with(LinearRole.O), spec.q_dim, ctx, True, input_shared=spec.attn_implementation == "sdpa"
        ),
        norm_saved(spec, ctx, True) * (n_norms - 1),
        mlp_saved(spec, layer, ctx, True),
    ]


def layer_blocks(tokens: int, this: int, down: int, parts: list[int]) -> list[int]:
    """Block sizes of one layer's saved tensors (`this` bytes in all, of which `down` is
    down's input, saved last): each component rounded, the MLP's block taking what is left
    so the blocks sum to `this` exactly; two blocks (rest, down) where rounding leaves none."""
    blocks = [alloc(tokens * x) for x in parts[:-1]]
    mlp_rest = this - down - sum(blocks)
    if mlp_rest < 0:
        return [this - down, down]
    return [*blocks, mlp_rest, down]


# The order the phases happen in one step (step_model lists them by kind, not by time).
_ORDER = {
    PhaseKind.BUILD_QUANTIZE: 0,
    PhaseKind.FORWARD_CHECKPOINTED_LAYER: 1,
    PhaseKind.FORWARD_LAST_LAYER: 1,
    PhaseKind.DEQUANTIZE_FORWARD: 2,
    PhaseKind.FORWARD_FINAL_NORM: 3,
    PhaseKind.FORWARD_LOSS: 4,
    PhaseKind.LOSS_BACKWARD: 5,
    PhaseKind.FINAL_NORM_BACKWARD: 6,
    PhaseKind.OPTIMIZER_HOOK_ROOT: 7,
    PhaseKind.LAYER_BACKWARD: 8,
    PhaseKind.GALORE_REFRESH_LAYERWISE: 9,
    PhaseKind.OPTIMIZER_STEP: 10,
    PhaseKind.GALORE_REFRESH: 11,
}
# Within a layer's backward: the recompute (checkpointing), the moments with the whole layer
# alive, the 4-bit and hook moments, the MLP's elementwise backward, the layer's end.
_POINT_ORDER = {
    LayerPoint.LORA_RECOMPUTE: 0,
    LayerPoint.LORA_RECOMPUTE_DOWN: 1,
    LayerPoint.MOE_RECOMPUTE: 2,
    LayerPoint.POST_MLP_NORM: 3,
    LayerPoint.LORA: 4,
    LayerPoint.DEQUANTIZE: 5,
    LayerPoint.OPTIMIZER_HOOK: 6,
    LayerPoint.MLP: 7,
    LayerPoint.END: 8,
}


@dataclass
class _Builder:
    ctx: StepContext
    ledger: Ledger
    by_kind: dict[PhaseKind, list[Phase]]
    by_layer: dict[int, list[Phase]]
    record: bool = False
    skip: frozenset[C] = frozenset()
    moments: list[Moment] = field(default_factory=list)
    layer_blocks: dict[int, list[int | None]] = field(default_factory=dict)
    _down: dict[ShapeKey, int] = field(default_factory=dict)
    _parts: dict[tuple[ShapeKey, bool], list[int]] = field(default_factory=dict)

    def saved_blocks(self, i: int) -> list[int]:
        """Layer i's saved tensors as blocks in forward order, down's input last."""
        ctx = self.ctx
        layer = ctx.spec.layers[i]
        first_grad = ctx.setup.method in (Method.FULL, Method.GALORE) or ctx.ckpt
        key = (shape_key(layer), i > 0 or first_grad)
        if key not in self._parts:
            self._parts[key] = layer_components(ctx.spec, layer, ctx.setup, key[1])
        blocks = layer_blocks(
            ctx.tokens, alloc(ctx.tokens * ctx.per_layer[i]), alloc(ctx.tokens * self.down_saved(i)), self._parts[key]
        )
        # autocast's saved copies of frozen weights (autocast.frozen_casts): down's with down's input
        down, rest = ctx.down_casts[i], ctx.casts[i] - ctx.down_casts[i]
        return [*blocks[:-1], rest, blocks[-1] + down] if ctx.casts[i] else blocks

    def down_saved(self, i: int) -> int:
        """Per token, what layer i's down projection saves (layer.LayerPoints.down_saved)."""
        layer = self.ctx.spec.layers[i]
        key = shape_key(layer)
        if key not in self._down:
            self._down[key] = layer_points(self.ctx.spec, layer, self.ctx.setup).down_saved
        return self._down[key]

    def at(self, phase: Phase) -> None:
        """The phase's moment: balance blocks in, the moment recorded, balance blocks out."""
        split = {C.FSDP_BUFFERS: self._fsdp_split(), C.TRANSIENT: self._transient_split(phase.kind)}
        balance = self.ledger.settle(phase.parts, split, self.skip)
        if self.record:
            self.moments.append(Moment(phase, len(self.ledger.ops)))
        for tid in balance:
            self.ledger.free(tid)

    def at_kind(self, *kinds: PhaseKind) -> None:
        for kind in kinds:
            for ph in self.by_kind.get(kind, []):
                self.at(ph)

    def _transient_split(self, kind: PhaseKind) -> list[int]:
        """A phase's transient as the tensors its rule counts, where the rule names them."""
        setup, n, v = self.ctx.setup, self.ctx.tokens, self.ctx.spec.vocab
        if kind is PhaseKind.OPTIMIZER_STEP and setup.optim == Optim.ADAMW_TORCH:
            # foreach AdamW: one temporary per parameter of the group (optimizers.optimizer_transient)
            return [alloc(grad_bytes(p, setup) * _held(p, self.ctx)) for p in self.ctx.params if p.trainable]
        if kind in (PhaseKind.FORWARD_LOSS, PhaseKind.LOSS_BACKWARD):
            # loss.loss_terms: bf16 logits (+ the softcap's tanh output), then fp32 tensors of n x V
            logits = [alloc(2 * n * v)] * (2 if self.ctx.spec.final_logit_softcapping else 1)
            return logits + [alloc(4 * n * v)] * (2 if kind is PhaseKind.FORWARD_LOSS else 3)
        return []

    def _fsdp_split(self) -> list[int]:
        """FSDP's buffers as its all-gathers: the root unit, then decoder units."""
        units = self.ctx.units
        if not units:
            return []
        layer = max((v for k, v in units.items() if k is not None), default=0)
        return [units.get(None, 0), layer, layer]


def _persistent(b: _Builder, params: list[Param], built: bool) -> None:
    """Every parameter's storage on this rank; `built`: the 4-bit weights are there already."""
    setup, world = b.ctx.setup, b.ctx.world
    for p in params:
        n = _held(p, b.ctx)
        stored = store(p, setup, n)
        if p.kind.quantized:
            if world > 1:
                stored[C.QUANT_STATE] = store(p, setup)[C.QUANT_STATE]
            if built:
                stored = {C.WEIGHTS: stored[C.WEIGHTS]} if world > 1 else {}
                if setup.cpu_offload:
                    stored = {}
        if setup.cpu_offload:
            stored = {c: v for c, v in stored.items() if c == C.QUANT_STATE}
        for cat, v in stored.items():
            b.ledger.alloc(cat, v)


def _held(p: Param, ctx) -> int:
    """Elements of one parameter this GPU holds: its FSDP shard (FSDP1 flat or FSDP2 dim-0), else all."""
    return shard_for(p, ctx.setup) if ctx.world > 1 else p.numel


def _states(b: _Builder) -> None:
    """Each trainable parameter's optimizer states (AdamW: exp_avg and exp_avg_sq)."""
    if b.ctx.offload:
        return
    for p in b.ctx.params:
        s = optimizer_state(p, b.ctx.setup, _held(p, b.ctx)).device
        half = alloc(s // 2)
        b.ledger.alloc(C.OPTIMIZER_STATES, half)
        b.ledger.alloc(C.OPTIMIZER_STATES, s - half)


def _build(b: _Builder) -> None:
    """QLoRA's build: each Linear quantized on the device in order (its temporaries, then
    its packed weight and state), then every other parameter."""
    world = b.ctx.world
    quantized = [p for p in b.ctx.params if p.kind.quantized]
    for p in quantized:
        t = b.ledger.alloc(C.TRANSIENT, quantize_transient(p, world))
        stored = quantized_store(p.kind, p.numel)
        if world == 1:
            b.ledger.alloc(C.WEIGHTS, stored[C.WEIGHTS])
        b.ledger.alloc(C.QUANT_STATE, stored[C.QUANT_STATE])
        b.ledger.free(t)
    saved_record, b.record = b.record, True
    b.at_kind(PhaseKind.BUILD_QUANTIZE)
    b.record = saved_record
    _persistent(b, b.ctx.params, built=bool(quantized))


def _forward(b: _Builder) -> list[int | None]:
    """The forward's saved tensors, layer by layer; returns the step-wide blocks."""
    ctx, led = b.ctx, b.ledger
    n, spec = ctx.tokens, ctx.spec
    loop = led.alloc(C.ACTIVATIONS, loop_token_bytes(ctx.setup))
    rope = rope_saved(spec, ctx.setup)
    step_wide = [
        led.alloc(C.ACTIVATIONS, input_bytes(ctx.setup) - loop_token_bytes(ctx.setup)),
        led.alloc(C.ACTIVATIONS, rope // 2),
        led.alloc(C.ACTIVATIONS, rope - rope // 2),
        led.alloc(C.ACTIVATIONS, step_masks(spec, ctx.setup)),
        led.alloc(C.ACTIVATIONS, ctx.cast_cache),
    ]
    cache = led.alloc(C.ACTIVATIONS, ctx.forward_cache)  # autocast's, until the forward's autocast exits
    last = len(spec.layers) - 1
    for i in range(len(spec.layers)):
        if ctx.ckpt:
            b.layer_blocks[i] = [led.alloc(C.ACTIVATIONS, alloc(n * kept_per_layer(spec, stream_bytes(ctx.setup))))]
            if i == last:
                b.at_kind(PhaseKind.FORWARD_CHECKPOINTED_LAYER)
            continue
        sizes = b.saved_blocks(i)
        blocks = [led.alloc(C.ACTIVATIONS, x) for x in sizes[:-1]]
        if i == last:
            b.at_kind(PhaseKind.FORWARD_LAST_LAYER)
        b.layer_blocks[i] = [*blocks, led.alloc(C.ACTIVATIONS, sizes[-1])]
    released = led.alloc(C.ACTIVATIONS, ctx.released)
    b.at_kind(PhaseKind.DEQUANTIZE_FORWARD, PhaseKind.FORWARD_FINAL_NORM, PhaseKind.FORWARD_LOSS)
    led.free(cache)
    b.at_kind(PhaseKind.LOSS_BACKWARD)
    led.free(released)
    b.at_kind(PhaseKind.FINAL_NORM_BACKWARD)
    return [loop, *step_wide]


def _grads(b: _Builder, params: list[Param]) -> list[int | None]:
    setup = b.ctx.setup
    if setup.cpu_offload or setup.steps_in_backward:
        return []
    return [b.ledger.alloc(C.GRADIENTS, alloc(grad_bytes(p, setup) * _held(p, b.ctx))) for p in params if p.trainable]


def _layer_backward(b: _Builder, i: int, params: list[Param], grads: list[int | None]) -> None:
    ctx, led = b.ctx, b.ledger
    if ctx.ckpt:  # the recompute makes the layer's saved tensors again
        b.layer_blocks[i] += [led.alloc(C.ACTIVATIONS, x) for x in b.saved_blocks(i)]
    blocks = b.layer_blocks.pop(i)
    downs = [p for p in params if p.role in MLP_OUT_ROLES]
    others = [p for p in params if p.role not in MLP_OUT_ROLES]
    for ph in sorted(b.by_layer.get(i, []), key=lambda p: _POINT_ORDER[p.point] if p.point else 0):
        if ph.point == LayerPoint.MLP:
            led.free(blocks[-1])  # down's saved input, freed once down's backward ran
            if ctx.world == 1:
                grads += _grads(b, downs)
        if ph.point == LayerPoint.END:
            for tid in blocks[(1 if ctx.ckpt else 0) : -1]:  # the rest it saved (checkpointing: its input stays)
                led.free(tid)
            grads += _grads(b, others if ctx.world == 1 else params)
        b.at(ph)
    for tid in blocks:
        led.free(tid)


def _one_step(b: _Builder) -> list[int | None]:
    """Forward, backward and the optimizer step; returns the gradients' blocks (freed by
    zero_grad at the start of the next step)."""
    led, ctx = b.ledger, b.ctx
    step_wide = _forward(b)
    by_layer: dict[int | None, list[Param]] = {}
    for p in ctx.params:
        by_layer.setdefault(p.layer, []).append(p)
    grads = _grads(b, by_layer.get(None, []))
    b.at_kind(PhaseKind.OPTIMIZER_HOOK_ROOT)
    for i in range(len(ctx.spec.layers) - 1, -1, -1):
        _layer_backward(b, i, by_layer.get(i, []), grads)
    for tid in step_wide[1:]:
        led.free(tid)
    b.at_kind(PhaseKind.GALORE_REFRESH_LAYERWISE)
    if C.OPTIMIZER_STATES in b.skip:  # step 0: torch.optim makes its states at the first step
        b.skip = frozenset()
        _states(b)
    b.at_kind(PhaseKind.OPTIMIZER_STEP, PhaseKind.GALORE_REFRESH)
    led.free(step_wide[0])
    return grads


def step_events(spec: ModelSpec, setup: TrainingSetup) -> StepEvents:
    """The build, step 0 and the steady step as allocation events; the steady step's
    moments are step_model's phases (every layer's), in the order they happen."""
    prepared = prepare(spec, setup)
    ctx = step_context(spec, setup, prepared)
    phases = step_model(spec, setup, every_layer=True, prepared=prepared).phases
    by_kind: dict[PhaseKind, list[Phase]] = {}
    by_layer: dict[int, list[Phase]] = {}
    for ph in phases:
        if ph.kind is PhaseKind.LAYER_BACKWARD and ph.layer is not None:
            by_layer.setdefault(ph.layer, []).append(ph)
        else:
            by_kind.setdefault(ph.kind, []).append(ph)
    b = _Builder(ctx, Ledger(), by_kind, by_layer)
    _build(b)
    b.skip = frozenset({C.OPTIMIZER_STATES})
    grads = _one_step(b)
    for tid in grads:  # optimizer.zero_grad(set_to_none=True)
        b.ledger.free(tid)
    start, b.record = len(b.ledger.ops), True
    b.ledger.trimmed = 0
    for tid in _one_step(b):
        b.ledger.free(tid)
    events, cats = b.ledger.stream()
    return StepEvents(events, cats, b.moments, b.ledger.trimmed, start)
