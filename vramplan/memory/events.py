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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from vramplan.allocator import EventStream, Op
from vramplan.categories import ALLOCATED
from vramplan.categories import Category as C
from vramplan.memory import grpo_logits, reward
from vramplan.memory.accumulation import accumulated_grad_sizes
from vramplan.memory.activations import input_needs_grad, rope_saved
from vramplan.memory.attention import attention_kind, attention_saved_parts, step_masks
from vramplan.memory.backward import RECOMPUTE_POINTS, embedding_grad_last
from vramplan.memory.checkpointing import (
    UNSLOTH_RELOAD_BUFFERS,
    CheckpointOffload,
    checkpoint_offload,
    recompute_input_alias,
)
from vramplan.memory.compile import compiled_mlp_parts, compiled_norm_saved
from vramplan.memory.context import StepContext, activation_context
from vramplan.memory.freeze import frozen_prefix
from vramplan.memory.fsdp import (
    ALL_GATHER_COPY_IN_STREAM,
    PRE_UNSHARD_STREAM,
    REDUCE_SCATTER_STREAM,
    fsdp1_compute_bytes,
    fsdp1_views_grads,
    fsdp2_streams,
    gathered_blocks,
    grad_stream,
    offload_grads_held,
    offload_shard_copy,
    reduce_bytes,
    root_all_gather_steps,
    root_and_layer_unit,
    root_early_grad_sizes,
    root_grads_before_layers,
    shard_for,
    unsharded_grad_bytes,
)
from vramplan.memory.grpo import generation_parts, scoring_parts
from vramplan.memory.layer import LayerPoints, ShapeKey, layer_points, shape_key, step_forward_locals_parts
from vramplan.memory.linears import linears_saved
from vramplan.memory.lora_kernels import kernels_components, kernels_fused
from vramplan.memory.loss import held_output_bytes, input_bytes, loop_token_bytes
from vramplan.memory.mlp import mlp_saved_parts
from vramplan.memory.norms import norm_saved
from vramplan.memory.optimizers import optimizer_state
from vramplan.memory.parameters import Param, grad_bytes, store
from vramplan.memory.phases import (
    Prepared,
    embedding_backward_tensors,
    last_layer_adapter,
    prepared_for,
    step_context,
    step_model,
)
from vramplan.memory.preference import reference_copy_blocks, reference_forward_parts
from vramplan.memory.quantization import (
    nf4_quantize_temporaries,
    quantize_transient,
    quantized_store,
)
from vramplan.memory.reward import is_reward
from vramplan.memory.storage import MiB, Phase, StepModel, alloc
from vramplan.memory.types import ATTENTION_IN_ROLES, MLP_OUT_ROLES, LayerPoint, LinearRole, ParamKind, PhaseKind
from vramplan.memory.unsloth import unsloth_components, unsloth_fused
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import Attention, Engine, Loss, Optim, Stack, TrainingSetup

CATEGORIES = tuple(C)
_CAT_INDEX = {c: i for i, c in enumerate(CATEGORIES)}
_ALLOC, _FREE = int(Op.ALLOC), int(Op.FREE)  # plain ints: the ledger emits one per event


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
    streams: list[int] = field(default_factory=list)
    live: dict[int, tuple[C, int]] = field(default_factory=dict)
    by_cat: dict[C, dict[int, None]] = field(default_factory=dict)  # live ids per category, in order
    live_bytes: dict[C, int] = field(default_factory=dict)
    next_id: int = 0
    trimmed: int = 0

    def alloc(self, cat: C, size: int, stream: int = 0) -> int | None:
        if size <= 0:
            return None
        tid, self.next_id = self.next_id, self.next_id + 1
        self._emit(_ALLOC, tid, size, cat, stream)
        self.live[tid] = (cat, size)
        self.by_cat.setdefault(cat, {})[tid] = None
        self.live_bytes[cat] = self.live_bytes.get(cat, 0) + size
        return tid

    def free(self, tid: int | None) -> None:
        if tid is None or tid not in self.live:
            return  # never made (size 0) or already freed to meet a phase
        cat, size = self.live.pop(tid)
        self._emit(_FREE, tid, 0, cat)
        del self.by_cat[cat][tid]
        self.live_bytes[cat] -= size

    def _emit(self, op: int, tid: int, size: int, cat: C, stream: int = 0) -> None:
        self.ops.append(op)
        self.ids.append(tid)
        self.sizes.append(size)
        self.cats.append(_CAT_INDEX[cat])
        self.streams.append(stream)

    def settle(
        self,
        target: dict[C, int],
        split: dict[C, list[int]],
        skip: frozenset[C] = frozenset(),
        split_stream: dict[C, tuple[int, ...]] | None = None,
    ) -> list[int]:
        """Make the live bytes of every allocated category equal `target`: a balance block
        for what is missing (split into the given sizes first, each on the stream at its
        place in `split_stream`'s entry for that category, else the compute stream's), and,
        where tensor-level blocks exceed it, the latest of them freed. Returns the balance
        blocks' ids."""
        streams = split_stream or {}
        out: list[int] = []
        for cat in ALLOCATED:
            if cat in skip:
                continue
            diff = target.get(cat, 0) - self.live_bytes.get(cat, 0)
            while diff < 0:
                tid = next(reversed(self.by_cat[cat]))
                diff += self.live[tid][1]
                self.trimmed += self.live[tid][1]
                self.free(tid)
            on = streams.get(cat, ())
            for k, size in enumerate(split.get(cat, [])):
                if 0 < size <= diff:
                    out.append(self.alloc(cat, size, on[k] if k < len(on) else 0))  # type: ignore[arg-type]
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
                np.asarray(self.streams, np.int64) if n else np.zeros(0, np.int64),
            ),
            np.asarray(self.cats, np.int8),
        )


def layer_components(
    spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup, input_grad: bool
) -> tuple[list[int], tuple[int, ...]]:
    """Per token, what one decoder layer saves, by component in forward order: the input
    norm, the attention's input Linears, q/k norms, attention's tensors, o_proj, the other
    norms, the MLP's tensors (down's last); and where the norms' terms are in that list. The
    terms of layer.layer_saved_per_token, read one by one (its sum is theirs)."""
    ctx = activation_context(setup)
    n_norms = max(spec.norms_per_layer, 1)
    attention = attention_saved_parts(spec, layer, ctx, setup.seq_len)
    if unsloth_fused(spec, layer, setup):
        o_shared = attention_kind(spec, setup) != Attention.EAGER
        return unsloth_components(spec, layer, ctx, input_grad, attention, o_shared)
    if kernels_fused(spec, layer, setup):
        o_shared = attention_kind(spec, setup) != Attention.EAGER
        return kernels_components(spec, layer, ctx, input_grad, attention, o_shared)
    parts = [
        compiled_norm_saved(spec, ctx, norm_saved(spec, ctx, input_grad)),
        linears_saved(layer.linears_with(*ATTENTION_IN_ROLES), spec.hidden, ctx, input_grad),
        sum(norm_saved(spec, ctx, True, width=w) for w in layer.attn_norm_dims),
        *attention,
        linears_saved(
            layer.linears_with(LinearRole.O),
            spec.q_dim,
            ctx,
            True,
            input_shared=spec.attn_implementation == "sdpa",
            from_stream=False,
        ),
        compiled_norm_saved(spec, ctx, norm_saved(spec, ctx, True)) * (n_norms - 1),
        *compiled_mlp_parts(spec, layer, ctx, mlp_saved_parts(spec, layer, ctx, True)),
    ]
    # the input norm, the q/k norms, the other norms
    return parts, (0, 2, 4 + len(attention))


def layer_blocks(tokens: int, this: int, down: int, parts: list[int]) -> list[int]:
    """Block sizes of one layer's saved tensors (`this` bytes in all, of which `down` is
    down's input, the last part, saved last): each part rounded, the MLP's last block before
    down's taking what is left so the blocks sum to `this` exactly; two blocks (rest, down)
    where rounding leaves none."""
    blocks = [alloc(tokens * x) for x in parts[:-1]]
    rest = this - down - sum(blocks)
    if not blocks or blocks[-1] + rest <= 0:
        return [this - down, down]
    blocks[-1] += rest
    return [*blocks, down]


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
    LayerPoint.DORA_RECOMPUTE: 1,  # the recompute's last adapted Linear at its norm (dora.dora_recompute)
    LayerPoint.LORA_RECOMPUTE_DOWN: 2,  # ... and where the recompute stops
    LayerPoint.MOE_RECOMPUTE: 3,
    LayerPoint.POST_MLP_NORM: 4,
    LayerPoint.DORA: 5,  # the first adapter's magnitude grad, before its lora_A's input grad
    LayerPoint.LORA: 6,
    LayerPoint.DEQUANTIZE: 7,
    LayerPoint.OPTIMIZER_HOOK: 8,
    LayerPoint.MLP: 9,
    LayerPoint.DORA_MLP: 10,  # the MLP's input adapter, after the elementwise backward
    LayerPoint.END: 11,
}


@dataclass
class _Builder:
    ctx: StepContext
    ledger: Ledger
    by_kind: dict[PhaseKind, list[Phase]]
    by_layer: dict[int, list[Phase]]
    off: CheckpointOffload | None = None  # checkpointing: where the layers' inputs live
    record: bool = False
    skip: frozenset[C] = frozenset()
    moments: list[Moment] = field(default_factory=list)
    layer_blocks: dict[int, list[int | None]] = field(default_factory=dict)
    # activation offload: saved tensors copied to the host that the forward still holds on the GPU
    stash: dict[int, list[int | None]] = field(default_factory=dict)
    buffers_made: bool = False  # Unsloth's GPU reload buffers, made in step 0 and kept
    _points: dict[ShapeKey, LayerPoints] = field(default_factory=dict)
    _parts: dict[tuple[ShapeKey, bool], tuple[list[int], tuple[int, ...]]] = field(default_factory=dict)
    _gathered: tuple[list[int], tuple[int, ...]] | None = None
    _foreach_temps: list[int] | None = None
    held: list[int] | None = None  # FSDP's gathered blocks held across a layer's moments (hold_gathered)

    def saved_blocks(self, i: int) -> list[int]:
        """Layer i's saved tensors as blocks in forward order, down's input last."""
        ctx = self.ctx
        layer = ctx.spec.layers[i]
        key = (shape_key(layer), _input_grad(ctx, i))
        if key not in self._parts:
            self._parts[key] = layer_components(ctx.spec, layer, ctx.setup, key[1])
        held = alloc(ctx.tokens * self.points(i).down_held)  # made at down, kept to the layer's end
        blocks = layer_blocks(
            ctx.tokens,
            alloc(ctx.tokens * ctx.per_layer[i]) - held,
            alloc(ctx.tokens * self.down_saved(i)),
            self._parts[key][0],
        )
        if held:
            blocks = [*blocks[:-1], held, blocks[-1]]
        # autocast's saved copies of frozen weights (autocast.frozen_casts): down's with down's input
        down, rest = ctx.down_casts[i], ctx.casts[i] - ctx.down_casts[i]
        others = list(ctx.cast_parts[i]) if ctx.cast_parts else [rest]  # one block per copy where known
        return [*blocks[:-1], *others, blocks[-1] + down] if ctx.casts[i] else blocks

    def recompute_blocks(self, i: int) -> list[int]:
        """Layer i's recompute's saved tensors: saved_blocks less what aliases its kept input
        (checkpointing.recompute_input_alias), taken from the input norm's block."""
        blocks = self.saved_blocks(i)
        ctx = self.ctx
        blocks[0] -= alloc(ctx.tokens * recompute_input_alias(ctx.spec, ctx.spec.layers[i], ctx.setup))
        return blocks

    def offloaded_blocks(self, i: int) -> list[int]:
        """Offloading every saved tensor: layer i's saves beyond what stays on the GPU
        (ctx.layer_gpu, its norms' saves: checkpointing.offload_all_resident), as blocks in
        forward order, down's input last."""
        ctx = self.ctx
        self.saved_blocks(i)  # fills the layer's components
        components, norms = self._parts[(shape_key(ctx.spec.layers[i]), _input_grad(ctx, i))]
        parts = list(components)
        if ctx.spec.norm_kind != "layer":
            for k in norms:
                parts[k] = 0
        this = alloc(ctx.tokens * ctx.per_layer[i]) - ctx.layer_gpu[i]
        return layer_blocks(ctx.tokens, this, alloc(ctx.tokens * self.down_saved(i)), parts)

    def down_saved(self, i: int) -> int:
        """Per token, what layer i's down projection saves (layer.LayerPoints.down_saved)."""
        return self.points(i).down_saved

    def points(self, i: int) -> LayerPoints:
        """Layer i's backward moments per token (layer.layer_points), once per shape."""
        layer = self.ctx.spec.layers[i]
        key = shape_key(layer)
        if key not in self._points:
            self._points[key] = layer_points(self.ctx.spec, layer, self.ctx.setup)
        return self._points[key]

    def at(self, phase: Phase) -> None:
        """The phase's moment: balance blocks in, the moment recorded, balance blocks out
        (FSDP's, while a layer holds them, at the layer's end: hold_gathered)."""
        gathered, on = self._fsdp_split()
        split = {C.FSDP_BUFFERS: gathered, C.TRANSIENT: self._transient_split(phase)}
        # the all-gathered units: blocks of FSDP1's unshard stream, FSDP2's copy-in and compute streams
        stream = {C.FSDP_BUFFERS: on}
        balance = self.ledger.settle(phase.parts, split, self.skip, stream)
        if self.record:
            self.moments.append(Moment(phase, len(self.ledger.ops)))
        for tid in balance:
            if self.held is not None and self.ledger.live[tid][0] is C.FSDP_BUFFERS:
                self.held.append(tid)
            else:
                self.ledger.free(tid)

    @contextmanager
    def hold_gathered(self) -> Iterator[None]:
        """A unit's all-gathered parameters stay from its pre-backward to its post-backward
        (torch==2.13.0 FSDP2 _fsdp_param_group.pre_backward/post_backward; FSDP1
        _runtime_utils._pre_backward_hook/_post_backward_hook), so across all of a layer's
        backward moments they are one set of blocks, made at its first and freed after its last."""
        self.held = []
        try:
            yield
        finally:
            for tid in self.held:
                self.ledger.free(tid)
            self.held = None

    def at_kind(self, *kinds: PhaseKind) -> None:
        for kind in kinds:
            for ph in self.by_kind.get(kind, []):
                self.at(ph)

    def _transient_split(self, phase: Phase) -> list[int]:
        """A phase's transient as the tensors its rule counts, where the rule names them."""
        setup, n, v, kind = self.ctx.setup, self.ctx.tokens, self.ctx.spec.vocab, phase.kind
        if kind is PhaseKind.LAYER_BACKWARD and phase.layer is not None:
            return self._layer_split(phase.layer, phase.point)
        if kind is PhaseKind.FORWARD_CHECKPOINTED_LAYER:
            return self.checkpointed_forward_blocks(len(self.ctx.spec.layers) - 1)
        if kind is PhaseKind.FORWARD_LAST_LAYER:
            # the forward's locals, then the adapter's path (phases.last_layer_adapter), DoRA's weights
            _, _, parts, weights = last_layer_adapter(self.ctx, self.points(len(self.ctx.spec.layers) - 1))
            locals_ = step_forward_locals_parts(self.ctx.spec, self.ctx.setup, in_last_layer=True)
            return [alloc(n * x) for x in (*locals_, *parts)] + list(weights)
        if kind is PhaseKind.OPTIMIZER_STEP and setup.optim == Optim.ADAMW_TORCH:
            # foreach AdamW: one temporary per parameter of the group (optimizers.optimizer_transient)
            if self._foreach_temps is None:
                self._foreach_temps = [
                    alloc(grad_bytes(p, setup) * _held(p, self.ctx)) for p in self.ctx.params if p.trainable
                ]
            return self._foreach_temps
        if kind is PhaseKind.EMBEDDING_BACKWARD:
            return embedding_backward_tensors(self.ctx)
        if kind is PhaseKind.REFERENCE_FORWARD:
            return reference_forward_parts(self.ctx.spec, setup, self.ctx.params)
        if kind is PhaseKind.GENERATION:
            return generation_parts(self.ctx.spec, setup, self.ctx.params)
        if kind is PhaseKind.SCORING:
            return scoring_parts(self.ctx.spec, setup, self.ctx.params)
        if kind is PhaseKind.FORWARD_LOSS and grpo_logits.from_logits(setup):
            return grpo_logits.train_forward_parts(self.ctx.spec, setup)
        if kind in (PhaseKind.FORWARD_LOSS, PhaseKind.LOSS_BACKWARD) and is_reward(setup):
            return self._reward_split(kind)
        if kind in (PhaseKind.FORWARD_LOSS, PhaseKind.LOSS_BACKWARD):
            # loss.loss_terms: bf16 logits (+ the softcap's tanh output), then fp32 tensors of n x V;
            # in the hf loss's backward the logits only where the loop holds its output
            copies = 2 if self.ctx.spec.final_logit_softcapping else 1
            if kind is PhaseKind.LOSS_BACKWARD and setup.loss == Loss.HF:
                copies -= 0 if held_output_bytes(self.ctx.spec, setup) else 1
            logits = [alloc(2 * n * v)] * copies
            return logits + [alloc(4 * n * v)] * (2 if kind is PhaseKind.FORWARD_LOSS else 3)
        return []

    def _reward_split(self, kind: PhaseKind) -> list[int]:
        """The reward head's tensors (memory/reward.py): the score's, or LLaMA-Factory's value head
        at its widest (the LM loss's when wider: one block) beside the held hidden states."""
        spec, setup = self.ctx.spec, self.ctx.setup
        if not reward.value_head(setup):
            return reward.forward_parts(setup) if kind is PhaseKind.FORWARD_LOSS else reward.backward_parts(spec, setup)
        if kind is PhaseKind.LOSS_BACKWARD:
            return reward.value_head_backward_parts(spec, setup)
        held = reward.held_hidden_states(spec, setup, self.ctx.stream)
        return [held] * bool(held) + reward.value_head_forward_parts(spec, setup)

    def checkpointed_forward_blocks(self, i: int) -> list[int]:
        """Layer i's checkpointed forward's working set (checkpointing.checkpointed_forward),
        DoRA's weights after it."""
        pts = self.points(i)
        return [alloc(self.ctx.tokens * x) for x in pts.ckpt_fwd_parts] + list(
            pts.dora.ckpt_weights if pts.dora else ()
        )

    def _layer_split(self, i: int, point: LayerPoint | None) -> list[int]:
        """The tensors in flight at one of layer i's backward moments, oldest first (the
        dequantized weight last)."""
        pts, quant = self.points(i), self.ctx.setup.quant
        out = [alloc(self.ctx.tokens * x) for x in self._layer_point_parts(i, point)]
        if point == LayerPoint.DEQUANTIZE and quant is not None:
            out += pts.quant_parts
        if point == LayerPoint.MLP:
            out += pts.mlp_weights
        if pts.dora and point in (LayerPoint.LORA_RECOMPUTE, LayerPoint.LORA_RECOMPUTE_DOWN):
            out += pts.dora.fwd_weights if point == LayerPoint.LORA_RECOMPUTE else pts.dora.down_weights
        return out

    def _layer_point_parts(self, i: int, point: LayerPoint | None) -> list[int]:
        """Per token, the tensors in flight at one of layer i's backward moments, oldest first
        (backward._extra_moments, _core_moments, _offload_moment)."""
        ctx, pts = self.ctx, self.points(i)
        out = [ctx.stream * ctx.spec.hidden] if ctx.reentrant and point not in RECOMPUTE_POINTS else []
        inflight = (ctx.stream * ctx.spec.hidden,) if ctx.reentrant else pts.lora_inflight_parts
        if point == LayerPoint.LORA_RECOMPUTE:
            out += [*inflight, *pts.lora_fwd_parts]
        elif point == LayerPoint.LORA_RECOMPUTE_DOWN:
            out += [*inflight, *(pts.lora_down_parts if ctx.reentrant else pts.lora_down_rc_parts)]
        elif point == LayerPoint.LORA:
            out += pts.lora_bwd_parts
        elif point == LayerPoint.DORA_RECOMPUTE and pts.dora:
            out += [*inflight, *pts.dora.down_common]
        elif point == LayerPoint.DORA and pts.dora:
            out += pts.dora.bwd_parts
        elif point == LayerPoint.DORA_MLP and pts.dora:
            out += pts.dora.mlp_parts
        elif point == LayerPoint.DEQUANTIZE:
            out += pts.quant_bwd_parts
        elif point == LayerPoint.MLP:
            out += pts.mlp_grads_parts
        elif point == LayerPoint.END:
            out += pts.end_grads_parts
        return out

    def _fsdp_split(self) -> tuple[list[int], tuple[int, ...]]:
        """FSDP's buffers as its all-gathers make them, and their streams (fsdp.gathered_blocks):
        the same at every moment of the step, so made once."""
        ctx = self.ctx
        if not ctx.units:
            return [], ()
        if self._gathered is None:
            self._gathered = gathered_blocks(ctx.params, ctx.setup, ctx.units, ctx.head_unit)
        return self._gathered


def _input_grad(ctx: StepContext, i: int) -> bool:
    """Layer i's input needs grad (activations.input_needs_grad)."""
    return input_needs_grad(i, frozen_prefix(ctx.spec, ctx.setup), ctx.setup)


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
    """Each trainable parameter's optimizer states (AdamW: exp_avg and exp_avg_sq), in the
    order the optimizer makes them (_in_module_order)."""
    if b.ctx.offload:
        return
    for p in _in_module_order(b.ctx.params):
        s = optimizer_state(p, b.ctx.setup, _held(p, b.ctx)).device
        half = alloc(s // 2)
        b.ledger.alloc(C.OPTIMIZER_STATES, half)
        b.ledger.alloc(C.OPTIMIZER_STATES, s - half)


def _in_module_order(params: list[Param]) -> list[Param]:
    """The parameters in model.parameters() order, the order torch's optimizers make their
    states in at the first step (torch==2.13 optim/adamw.py `_init_group` loops
    `group["params"]`; verify, the reference harness and the Trainer build the groups from
    named_parameters()): the input embedding first, then the decoder layers, then the root's
    other parameters. parameters.parameters lists the embedding after the layers; with
    best fit, which states share a segment cached from the loss's logits depends on it."""
    roots = [p for p in params if p.layer is None]
    if not roots:
        return params
    embedding = roots[0]  # parameters.parameters: the first root parameter it lists
    return [embedding, *(p for p in params if p is not embedding)]


# torch==2.13.0 distributed/fsdp/_init_utils.py:60 (sync_module_states broadcasts in buckets)
BROADCAST_BUCKET = 250 * MiB


def _fsdp1_units(params: list[Param]) -> list[list[Param]]:
    """FSDP1 units in the order auto-wrap makes them (children first): in each decoder layer
    every trainable parameter's own unit (fsdp_qlora's lambda policy wraps each LoRA Linear),
    then the layer's frozen parameters; the root (embedding, final norm, lm_head) last."""
    layers: dict[int | None, list[Param]] = {}
    for p in params:
        layers.setdefault(p.layer, []).append(p)
    order = sorted(k for k in layers if k is not None) + ([None] if None in layers else [])
    units: list[list[Param]] = []
    for k in order:
        units += [[p] for p in layers[k] if p.trainable]
        frozen = [p for p in layers[k] if not p.trainable]
        if frozen:
            units.append(frozen)
    return units


def _broadcast(led: Ledger, sizes: list[int]) -> None:
    """sync_module_states' broadcast of one unit (torch==2.13.0 csrc/distributed/c10d/comm.cpp
    broadcast_coalesced): the tensors in buckets closed once they reach 250 MiB
    (compute_bucket_assignment_by_size), each bucket flattened into one new tensor (a lone
    tensor is only viewed: flatten_dense_tensors), at most 2 buckets in flight."""
    buckets: list[list[int]] = [[]]
    for size in sizes:
        if sum(buckets[-1]) >= BROADCAST_BUCKET:
            buckets.append([])
        buckets[-1].append(size)
    in_flight: list[int | None] = []
    for bucket in buckets:
        if len(in_flight) >= 2:
            led.free(in_flight.pop(0))
        in_flight.append(led.alloc(C.TRANSIENT, alloc(sum(bucket))) if len(bucket) > 1 else None)
    for tid in in_flight:
        led.free(tid)


def _fsdp1_init(b: _Builder) -> None:
    """Answer.AI's train.py on FSDP1: rank 0 loads (and quantizes) the weights into host memory
    (train.py:652-657, to_cpu) and empties the CUDA cache (:663), so nothing of the loading
    stays; the FSDP(...) wrap (:753-766, device_id, sync_module_states) then builds each unit
    on the GPU (torch==2.13.0 distributed/fsdp/_init_utils.py): the unit's parameters moved to
    the device (:603-608), broadcast from rank 0 in 250 MiB buckets (:1110-1166), flattened
    into one new FlatParameter (_flat_param.py flatten_tensors, torch.cat), the rank's shard
    cloned and the full flat storage freed (:955-971, _get_shard :1128-1139), the shard moved
    to the host under CPU offload (_init_utils.py:672-673); the moved parameters are freed
    last, when the unit's init returns. NO_SHARD keeps the flat parameter."""
    led, setup = b.ledger, b.ctx.setup
    sharded = b.ctx.world > 1
    for unit in _fsdp1_units(b.ctx.params):
        moved = [led.alloc(C.TRANSIENT, alloc(fsdp1_compute_bytes(p, setup))) for p in unit]
        _broadcast(led, [fsdp1_compute_bytes(p, setup) for p in unit])
        size = sum(fsdp1_compute_bytes(p, setup) for p in unit)
        flat = led.alloc(C.TRANSIENT, alloc(size)) if sharded else None
        _persistent(b, unit, built=False)
        led.free(flat)
        for tid in moved:  # managed_params holds them until the unit's init returns (:617-640)
            led.free(tid)


def _build(b: _Builder) -> None:
    """QLoRA's build: each Linear quantized on the device in order (its temporaries, then
    its packed weight and state), then every other parameter (the fsdp-qlora stack on FSDP1:
    its own loading and wrap, _fsdp1_init)."""
    world = b.ctx.world
    if b.ctx.setup.engine == Engine.FSDP1 and b.ctx.setup.stack == Stack.FSDP_QLORA:
        _fsdp1_init(b)
        return
    quantized = [p for p in b.ctx.params if p.kind.quantized]
    for p in quantized:
        if p.kind == ParamKind.NF4 and world == 1:
            _quantize_nf4(b.ledger, p)
            continue
        t = b.ledger.alloc(C.TRANSIENT, quantize_transient(p, world))
        stored = quantized_store(p.kind, p.numel, p.dim0)
        # int8_vectorwise_quant allocates the row scales before the int8 weight (backends/cuda/ops.py:223-224)
        order = (C.QUANT_STATE, C.WEIGHTS) if p.kind == ParamKind.INT8 else (C.WEIGHTS, C.QUANT_STATE)
        for cat in order:
            if cat == C.QUANT_STATE or world == 1:
                b.ledger.alloc(cat, stored[cat])
        b.ledger.free(t)
    saved_record, b.record = b.record, True
    b.at_kind(PhaseKind.BUILD_QUANTIZE)
    b.record = saved_record
    _persistent(b, b.ctx.params, built=bool(quantized))
    for size in reference_copy_blocks(b.ctx.params, b.ctx.setup):  # DPO's frozen copy, made after the policy
        b.ledger.alloc(C.WEIGHTS, size)


def _checkpointed_input(b: _Builder, i: int) -> None:
    """Layer i's input, which its checkpoint keeps: on the GPU through the step, or, offloaded
    (checkpointing.checkpoint_offload), copied to pinned host RAM and dropped from the GPU once
    the forward no longer holds it: the embedding output (layer 0's input, a local of the
    model's forward) when the decoder loop ends, the others once `stash` newer inputs are
    packed. Unsloth copies into its host buffers through two GPU buffers, made at step 0's
    first offload (unsloth-zoo==2026.10.9 gradient_checkpointing.py:1405-1470) and kept."""
    off, led = b.off, b.ledger
    assert off is not None
    x = led.alloc(C.ACTIVATIONS, off.input)
    if i - off.stash >= 1:
        for tid in b.stash.pop(i - off.stash, []):
            led.free(tid)
    if i >= len(b.ctx.spec.layers) - off.kept_layers:
        # LLM.int8's inputs the checkpoint cannot drop (checkpointing.int8_kept); the last layer's
        # MLP's once its widest moment is past (_forward)
        last = i == len(b.ctx.spec.layers) - 1
        held = [led.alloc(C.ACTIVATIONS, off.held[i] - (off.held_mlp_last if last else 0))] if off.held else []
        b.layer_blocks[i] = [x, *held]
        return
    b.layer_blocks[i] = []
    b.stash[i] = [x]
    if off.buffers and not b.buffers_made:
        for _ in range(UNSLOTH_RELOAD_BUFFERS):
            led.alloc(C.ACTIVATIONS, off.buffers // UNSLOTH_RELOAD_BUFFERS)
        b.buffers_made = True


def _checkpointed_working_set(b: _Builder, i: int) -> None:
    """Layer i's checkpointed forward before the last layer's: the checkpoint runs the whole
    layer without saving (torch==2.13 torch/utils/checkpoint.py: under no_grad, reentrant or
    not), so its working set (checkpointing.checkpointed_forward, the moment the last layer's
    phase counts) comes and goes before the layer's output, the next layer's kept input, is
    made. The totals of the phases do not move (the last layer's moment holds more inputs);
    where the allocator places the kept inputs does: in the blocks the working set freed."""
    for tid in [b.ledger.alloc(C.TRANSIENT, x) for x in b.checkpointed_forward_blocks(i)]:
        b.ledger.free(tid)


def _offloaded_layer(b: _Builder, i: int, last: bool) -> None:
    """Offloading every saved tensor without checkpointing (activations.offload_all_layers):
    layer i's deduplicated saves stay on the GPU to its backward's end; the rest is copied to
    pinned host RAM and dropped once the next layer's packs push it out of the forward stash,
    so at the last layer's forward that layer's saves are all there. In backward the restored
    copies come and go per autograd node: the moments' balance blocks."""
    ctx, led = b.ctx, b.ledger
    b.layer_blocks[i] = [led.alloc(C.ACTIVATIONS, ctx.layer_gpu[i])]
    for tid in b.stash.pop(i - 1, []):
        led.free(tid)
    sizes = b.offloaded_blocks(i)
    if last:  # the last layer's weight norm, its saves not yet made (phases.dora_phase)
        b.at_kind(PhaseKind.DORA_NORM_FORWARD)
    blocks = [led.alloc(C.ACTIVATIONS, x) for x in sizes[:-1]]
    if last:
        b.at_kind(PhaseKind.FORWARD_LAST_LAYER)
    b.stash[i] = [*blocks, led.alloc(C.ACTIVATIONS, sizes[-1])]


def _quantize_nf4(led: Ledger, p: Param) -> None:
    """One Linear quantized to nf4 on the device, tensor by tensor
    (quantization.nf4_quantize_temporaries): the bf16 source, the fp32 absmax, the packed
    weight, the absmax's offset copy, the nested state; then the copy, the absmax and the
    source freed. The 1-10 MiB absmax tensors take 20 MiB segments of their own and the
    packed weights fill the freed sources' segments, as the allocator places them."""
    source, absmax, copy = nf4_quantize_temporaries(p.numel)
    stored = quantized_store(p.kind, p.numel, p.dim0)
    temps = [led.alloc(C.TRANSIENT, source), led.alloc(C.TRANSIENT, absmax)]
    led.alloc(C.WEIGHTS, stored[C.WEIGHTS])
    temps.append(led.alloc(C.TRANSIENT, copy))
    led.alloc(C.QUANT_STATE, stored[C.QUANT_STATE])
    for tid in reversed(temps):
        led.free(tid)


def _forward(b: _Builder) -> list[int | None]:
    """The forward's saved tensors, layer by layer; returns the step-wide blocks."""
    ctx, led = b.ctx, b.ledger
    spec = ctx.spec
    # CPU offload: the root's shard copied in for forward's first all-gather (fsdp.py)
    led.free(led.alloc(C.TRANSIENT, offload_shard_copy(ctx.params, ctx.setup), PRE_UNSHARD_STREAM))
    _root_all_gather(b)
    b.at_kind(PhaseKind.GENERATION, PhaseKind.SCORING)  # GRPO: before the step's batch exists (grpo.py)
    loop = led.alloc(C.ACTIVATIONS, loop_token_bytes(ctx.setup))
    rope = rope_saved(spec, ctx.setup)
    step_wide = [
        led.alloc(C.ACTIVATIONS, input_bytes(ctx.setup) - loop_token_bytes(ctx.setup)),
        led.alloc(C.ACTIVATIONS, rope // 2),
        led.alloc(C.ACTIVATIONS, rope - rope // 2),
        led.alloc(C.ACTIVATIONS, step_masks(spec, ctx.setup)),
        led.alloc(C.ACTIVATIONS, ctx.cast_cache),
    ]
    # autocast's, until the forward's autocast exits: the layers' weight copies where each layer runs
    per_layer = ctx.forward_cache_layers
    cache = [led.alloc(C.ACTIVATIONS, ctx.forward_cache - sum(sum(v) for v in per_layer.values()))]
    last = len(spec.layers) - 1
    first = frozen_prefix(spec, ctx.setup)  # --train-layers: the frozen prefix saves nothing
    for i in range(first, len(spec.layers)):
        if ctx.ckpt:
            cache += [led.alloc(C.ACTIVATIONS, x) for x in per_layer.get(i, [])]
            _checkpointed_input(b, i)
            if i == last:  # DoRA's widest weight norm, then the layer's widest moment (phases.dora_phase)
                b.at_kind(PhaseKind.DORA_NORM_FORWARD, PhaseKind.FORWARD_CHECKPOINTED_LAYER)
                if b.off is not None and b.off.held_mlp_last:
                    b.layer_blocks[i].append(led.alloc(C.ACTIVATIONS, b.off.held_mlp_last))
            else:
                _checkpointed_working_set(b, i)
            continue
        if ctx.offload_all:
            _offloaded_layer(b, i, i == last)
            continue
        if i == last:  # the last layer's weight norm, its saves not yet made
            b.at_kind(PhaseKind.DORA_NORM_FORWARD)
        sizes = b.saved_blocks(i)
        tail = 2 if b.points(i).down_held else 1  # what down saves (and holds) comes after its adapter
        blocks = [led.alloc(C.ACTIVATIONS, x) for x in sizes[:-tail]]
        if i == last:
            b.at_kind(PhaseKind.FORWARD_LAST_LAYER)
        b.layer_blocks[i] = [*blocks, *[led.alloc(C.ACTIVATIONS, x) for x in sizes[-tail:]]]
    released = led.alloc(C.ACTIVATIONS, ctx.released)
    b.at_kind(PhaseKind.DEQUANTIZE_FORWARD)
    for blocks in b.stash.values():  # offload: the decoder loop is done, its locals and stash go
        for tid in blocks:
            led.free(tid)
    b.stash.clear()
    b.at_kind(PhaseKind.FORWARD_FINAL_NORM, PhaseKind.FORWARD_LOSS)
    for tid in cache:
        led.free(tid)
    b.at_kind(PhaseKind.REFERENCE_FORWARD)  # DPO: after the policy's forward returned (preference.py)
    b.at_kind(PhaseKind.LOSS_BACKWARD)
    led.free(released)
    b.at_kind(PhaseKind.FINAL_NORM_BACKWARD)
    return [loop, *step_wide]


def _grads(b: _Builder, params: list[Param]) -> list[int | None]:
    setup = b.ctx.setup
    if (setup.cpu_offload and not offload_grads_held(setup)) or setup.steps_in_backward:
        return []
    if setup.gradient_accumulation > 1:  # added into the accumulated ones (_one_step), in place
        return []
    stream = grad_stream(setup)
    sizes = [alloc(grad_bytes(p, setup) * _held(p, b.ctx)) for p in params if p.trainable]
    if fsdp2_streams(setup):  # the unit's sharded grads: views of its one reduce-scatter output (fsdp.py)
        sizes = [sum(sizes)]
    return [b.ledger.alloc(C.GRADIENTS, size, stream) for size in sizes]


def _offloaded_reduce_output(b: _Builder, params: list[Param]) -> None:
    """FSDP2 under CPU offload: the unit's reduce-scatter output, a block of the reduce-scatter
    stream, copied to the host and dropped at once (fsdp.REDUCE_SCATTER_STREAM): each decoder
    unit's at its backward's end, the root's after them (its post-backward is the last)."""
    if not (b.ctx.setup.cpu_offload and fsdp2_streams(b.ctx.setup)):
        return
    n = sum(_held(p, b.ctx) for p in params if p.trainable)
    b.ledger.free(b.ledger.alloc(C.TRANSIENT, alloc(n * reduce_bytes(b.ctx.setup)), REDUCE_SCATTER_STREAM))


def _root_all_gather(b: _Builder) -> None:
    """FSDP2's first all-gathers of a step on the copy-in stream (fsdp.root_all_gather_steps):
    the root's copies and its flat output, which AllGatherState holds until the first decoder
    unit's wait_for_unshard, so that unit's own flat output cannot reuse it."""
    led, ctx = b.ledger, b.ctx
    steps = root_all_gather_steps(ctx.params, ctx.setup)
    if not steps:
        return
    kept: list[int | None] = []
    for copied, cast in steps:
        copy = led.alloc(C.TRANSIENT, copied, ALL_GATHER_COPY_IN_STREAM)  # (0 bytes: no block)
        kept.append(led.alloc(C.TRANSIENT, cast, ALL_GATHER_COPY_IN_STREAM))
        led.free(copy)
    root, layer = root_and_layer_unit(ctx.units)
    flat = led.alloc(C.TRANSIENT, root, ALL_GATHER_COPY_IN_STREAM)
    for tid in kept:
        led.free(tid)
    first = led.alloc(C.TRANSIENT, layer, ALL_GATHER_COPY_IN_STREAM)
    led.free(flat)
    led.free(first)


def _layer_backward(b: _Builder, i: int, params: list[Param], grads: list[int | None]) -> None:
    ctx, led = b.ctx, b.ledger
    # an offloaded checkpoint input back on the GPU for the recompute (backward._offload_moment):
    # non-reentrant until the recompute is done, reentrant through the layer's backward
    reload = led.alloc(C.TRANSIENT, ctx.reload) if ctx.ckpt else None
    kept = len(b.layer_blocks[i]) if ctx.ckpt else 0  # checkpointing: its input, when it stays on the GPU
    if ctx.ckpt:  # the recompute makes the layer's saved tensors again, but not its kept input
        b.layer_blocks[i] += [led.alloc(C.ACTIVATIONS, x) for x in b.recompute_blocks(i)]
    blocks = b.layer_blocks.pop(i)
    # down's saved input, freed once down's backward ran (offloaded: its restored copy is a balance block)
    down = None if ctx.offload_all else blocks[-1]
    downs = [p for p in params if p.role in MLP_OUT_ROLES]
    others = [p for p in params if p.role not in MLP_OUT_ROLES]
    with b.hold_gathered():
        for ph in sorted(b.by_layer.get(i, []), key=lambda p: _POINT_ORDER[p.point] if p.point else 0):
            if not ctx.reentrant and ph.point not in RECOMPUTE_POINTS:
                led.free(reload)
            if ph.point == LayerPoint.MLP:
                led.free(down)
                if ctx.world == 1:
                    grads += _grads(b, downs)
            if ph.point == LayerPoint.END:
                for tid in blocks[kept:]:  # the rest it saved (checkpointing: its input stays to the end)
                    led.free(tid)
                _offloaded_reduce_output(b, params)
                grads += _grads(b, others if ctx.world == 1 else params)
            b.at(ph)
    for tid in blocks:
        led.free(tid)
    led.free(reload)


def _one_step(b: _Builder) -> list[int | None]:
    """Forward, backward and the optimizer step; returns the gradients' blocks (freed by
    zero_grad at the start of the next step)."""
    led, ctx = b.ledger, b.ctx
    # gradient accumulation: the earlier micro-batches' gradients, alive from the forward on
    accumulated = [led.alloc(C.GRADIENTS, size, grad_stream(ctx.setup)) for size in accumulated_grad_sizes(ctx)]
    step_wide = _forward(b)
    by_layer: dict[int | None, list[Param]] = {}
    for p in ctx.params:
        by_layer.setdefault(p.layer, []).append(p)
    embedding = embedding_grad_last(ctx)  # its grad is made after every layer's backward
    # FSDP: the root's unsharded early grads until its post-backward, its sharded ones made there
    early = root_grads_before_layers(ctx.params, ctx.setup)
    unsharded = [led.alloc(C.GRADIENTS, size) for size in root_early_grad_sizes(ctx.params, ctx.setup)]
    grads = accumulated + ([] if early else _grads(b, [p for p in by_layer.get(None, []) if p is not embedding]))
    b.at_kind(PhaseKind.OPTIMIZER_HOOK_ROOT)
    for i in range(len(ctx.spec.layers) - 1, frozen_prefix(ctx.spec, ctx.setup) - 1, -1):
        _layer_backward(b, i, by_layer.get(i, []), grads)
    if embedding is not None:
        grads += _grads(b, [embedding])
    b.at_kind(PhaseKind.EMBEDDING_BACKWARD)
    if early and fsdp1_views_grads(ctx.setup):  # FSDP1's root post-backward: the flat grad, sharded
        for tid in unsharded:
            led.free(tid)
        grads += _grads(b, [p for p in by_layer.get(None, []) if p.trainable])
    elif early:  # the root's post-backward (fsdp.root_reduce_scatter), the last of backward
        trained = [p for p in by_layer.get(None, []) if p.trainable]
        unsharded += [led.alloc(C.GRADIENTS, unsharded_grad_bytes(p)) for p in trained if p not in early]
        b.at_kind(PhaseKind.ROOT_REDUCE_SCATTER)
        for tid in unsharded:
            led.free(tid)
        grads += _grads(b, trained)
    _offloaded_reduce_output(b, by_layer.get(None, []))
    for tid in step_wide[1:]:
        led.free(tid)
    if offload_grads_held(ctx.setup):  # FSDP1 drops the GPU copies at backward's end (fsdp.py)
        for tid in grads:
            led.free(tid)
        grads = []
    b.at_kind(PhaseKind.GALORE_REFRESH_LAYERWISE)
    if C.OPTIMIZER_STATES in b.skip:  # step 0: torch.optim makes its states at the first step
        b.skip = frozenset()
        _states(b)
    b.at_kind(PhaseKind.OPTIMIZER_STEP, PhaseKind.GALORE_REFRESH)
    led.free(step_wide[0])
    return grads


def step_events(
    spec: ModelSpec, setup: TrainingSetup, every_layer: StepModel | None = None, prepared: Prepared | None = None
) -> StepEvents:
    """The build, step 0 and the steady step as allocation events; the steady step's
    moments are step_model's phases (every layer's: `every_layer`, step_model(spec, setup,
    every_layer=True), when the caller has it already), in the order they happen."""
    prepared = prepared_for(spec, setup, prepared)  # (the caller's, when it made one for this step)
    ctx = step_context(spec, setup, prepared)
    model = every_layer or step_model(spec, setup, every_layer=True, prepared=prepared)
    phases = model.phases
    by_kind: dict[PhaseKind, list[Phase]] = {}
    by_layer: dict[int, list[Phase]] = {}
    for ph in phases:
        if ph.kind is PhaseKind.LAYER_BACKWARD and ph.layer is not None:
            by_layer.setdefault(ph.layer, []).append(ph)
        else:
            by_kind.setdefault(ph.kind, []).append(ph)
    off = checkpoint_offload(spec, setup) if setup.gradient_checkpointing else None
    b = _Builder(ctx, Ledger(), by_kind, by_layer, off)
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
