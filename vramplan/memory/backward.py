"""Each decoder layer's backward (top to bottom), as its widest moments: the recompute
of a LoRA Linear (checkpointing), the MLP's elementwise backward (down's saved input
already freed, only down's weight grads made), the layer's end (its saved tensors
freed, all its grads made), and the 4-bit, post-MLP-norm, MoE and layer-wise optimizer
moments. What the final norm and lm_head saved is freed before."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.categories import Category as C
from vramplan.memory import deepspeed
from vramplan.memory.checkpointing import recompute_input_alias
from vramplan.memory.context import StepContext, activation_context
from vramplan.memory.dora import dora_recompute
from vramplan.memory.freeze import frozen_prefix
from vramplan.memory.fsdp import (
    fsdp1_compute_bytes,
    fsdp1_views_grads,
    fsdp2_streams,
    layer_backward_gathered,
    offload_grads_held,
    reduce_bytes,
    root_early_grad_sizes,
    shard_for,
    unit_grad_bytes,
)
from vramplan.memory.layer import LayerPoints, ShapeKey, layer_points, shape_key
from vramplan.memory.norms import post_mlp_norm_backward
from vramplan.memory.parameters import Param, grad_bytes
from vramplan.memory.reward import is_reward
from vramplan.memory.storage import Phase, alloc
from vramplan.memory.types import MLP_OUT_ROLES, LayerPoint, LinearRole, PhaseKind
from vramplan.setup import Engine, TrainingSetup


@dataclass(frozen=True)
class LayerMoment:
    """One widest moment of a layer's backward, in bytes (tokens applied)."""

    point: LayerPoint
    live: int  # this layer's saved activations still alive
    transient: int  # grads and temporaries in flight
    grads: int  # parameter gradients held
    fsdp: int  # FSDP buffers: gathered units, unsharded grads, reduce-scatter inputs


@dataclass(frozen=True)
class GradBook:
    """Gradient bytes by decoder layer (None: the root) as backward makes them."""

    sharded: dict[int | None, int]  # each layer's grads as held after its backward (0: offloaded/stepped)
    down: dict[int | None, int]  # the down projection's full grads, made first in a layer's backward
    by_layer: dict[int | None, list[Param]]


@dataclass(frozen=True)
class LayerFsdp:
    """FSDP2 buffers at one layer's backward moments."""

    gathered: int  # this unit + the one it prefetches + the root
    down_share: int  # the unsharded grads of down, made first
    unit_grads: int  # the unit's unsharded grads until its post-backward reduce-scatter
    reduce: int  # its reduce-scatter input (reduce dtype)
    reduce_prev: int  # the previous unit's reduce-scatter input, held until this unit's post-backward


def held_grad(p: Param, setup: TrainingSetup) -> int:
    """A trainable parameter's grad bytes held on the GPU once its layer's backward is done."""
    if setup.engine == Engine.DEEPSPEED:
        return deepspeed.held_grad(p, setup)
    return alloc(grad_bytes(p, setup) * shard_for(p, setup))


def embedding_grad_last(ctx: StepContext) -> Param | None:
    """The trained input embedding (whole, or peft's modules_to_save copy) when it is a weight of
    its own, on one GPU or DDP with one micro-batch per step: EmbeddingBackward, whose input is the
    batch's ids, is the last node of backward, so its grad is made after every decoder layer's
    backward (the embedding-backward phase and the optimizer step hold it; under accumulation it is
    alive from the start: accumulation.py). Tied, that weight is lm_head's, whose grad the loss
    backward makes (accumulation.tied_head_grad); a reward model has no lm_head.
    [CPU trace: the axolotl-*-fp32-roots cases and
    axolotl-chunked-full, where its fp32 grad decides whether a layer's backward is the peak]"""
    setup, spec = ctx.setup, ctx.spec
    own = bool(spec.lm_head_numel) or setup.lora_like or is_reward(setup)  # a reward model has no lm_head
    if not own or setup.engine not in (Engine.SINGLE, Engine.DDP) or setup.gradient_accumulation > 1:
        return None
    if setup.steps_in_backward or setup.cpu_offload:
        return None
    return next(
        (
            p
            for p in ctx.params
            if p.layer is None and p.trainable and p.dim0 == spec.vocab and p.role != LinearRole.HEAD
        ),
        None,
    )


def grad_book(ctx: StepContext) -> GradBook:
    setup = ctx.setup
    sharded: dict[int | None, int] = {}
    down: dict[int | None, int] = {}
    per_key: dict[tuple, tuple[int, int]] = {}  # (held, full grad) per Param.storage_key
    for p in ctx.params:
        if p.trainable:
            if p.storage_key not in per_key:
                per_key[p.storage_key] = (held_grad(p, setup), alloc(grad_bytes(p, setup) * p.numel))
            held, full = per_key[p.storage_key]
            sharded[p.layer] = sharded.get(p.layer, 0) + held
            if p.role in MLP_OUT_ROLES:
                down[p.layer] = down.get(p.layer, 0) + full
    if (setup.cpu_offload and not offload_grads_held(setup)) or setup.steps_in_backward:
        sharded = {k: 0 for k in sharded}
    if setup.steps_in_backward:
        down = {}
    by_layer: dict[int | None, list[Param]] = {}
    for p in ctx.params:  # unit_grad_bytes filters by layer: give it only that layer's (same result, O(P))
        by_layer.setdefault(p.layer, []).append(p)
    return GradBook(sharded=sharded, down=down, by_layer=by_layer)


def layer_fsdp(ctx: StepContext, book: GradBook, i: int) -> LayerFsdp:
    if not ctx.sharded:
        return LayerFsdp(0, 0, 0, 0, 0)
    params = book.by_layer.get(i, [])
    ug, rs = unit_grad_bytes(params, i, reduce_bytes(ctx.setup))
    full = max(sum(alloc(grad_bytes(p, ctx.setup) * p.numel) for p in params if p.trainable), 1)
    rs_prev = alloc(rs) if i < len(ctx.spec.layers) - 1 else 0
    if ctx.setup.fsdp_version == 1:
        # the views' grads and their concatenation into the flat grad; the reduce-scatter
        # output is the shard in the parameter dtype (bf16: accelerate's reduce_dtype), copied
        # into the sharded grad at once (no input kept until the next unit)
        ug, rs_prev = 2 * sum(fsdp1_compute_bytes(p, ctx.setup) for p in params if p.trainable), 0
        rs = sum(fsdp1_compute_bytes(p, ctx.setup) * -(-p.numel // ctx.world) // p.numel for p in params if p.trainable)
    return LayerFsdp(
        gathered=layer_backward_gathered(ctx.units, i, ctx.gathering),
        down_share=alloc(ug * book.down.get(i, 0) // full),
        unit_grads=alloc(ug),
        reduce=alloc(rs),
        reduce_prev=rs_prev,
    )


def _grads_made_first(ctx: StepContext, book: GradBook, i: int) -> int:
    """down's weight grads, made before the MLP's elementwise backward (FSDP: in its buffers)."""
    return 0 if ctx.sharded else book.down.get(i, 0)


def _down_freed(ctx: StepContext, pts: LayerPoints, i: int) -> int:
    """What down's backward frees (or, in the recompute, is not made yet): its saved input and
    autocast's saved copy of its frozen weight."""
    return alloc(ctx.tokens * pts.down_saved) + ctx.down_casts[i]


def _core_moments(
    ctx: StepContext, pts: LayerPoints, this: int, book: GradBook, i: int, done: int, fs: LayerFsdp
) -> list[LayerMoment]:
    n = ctx.tokens
    return [
        LayerMoment(
            LayerPoint.MLP,
            this - _down_freed(ctx, pts, i),
            alloc(n * pts.mlp_grads) + sum(pts.mlp_weights),
            done + _grads_made_first(ctx, book, i),
            fs.gathered + fs.down_share + fs.reduce_prev,
        ),
        LayerMoment(
            LayerPoint.END,
            0,
            alloc(n * pts.end_grads),
            done + book.sharded.get(i, 0),
            fs.gathered + fs.unit_grads + fs.reduce,
        ),
    ]


def _extra_moments(ctx: StepContext, pts: LayerPoints, this: int, i: int) -> list[tuple[LayerPoint, int, int]]:
    """(point, live, transient) of the moments that only some setups have."""
    n, ckpt, setup = ctx.tokens, ctx.ckpt, ctx.setup
    out: list[tuple[LayerPoint, int, int]] = []
    if pts.lora_bwd:
        out.append((LayerPoint.LORA, this, alloc(n * pts.lora_bwd)))
    if pts.quant_numel:
        assert setup.quant is not None
        out.append(
            (
                LayerPoint.DEQUANTIZE,
                this - alloc(n * pts.quant_freed),
                alloc(n * pts.quant_bwd) + sum(pts.quant_parts),
            )
        )
    # non-reentrant: the recompute starts inside the first adapter's backward and stops once
    # lora_B saved its input; reentrant: it runs whole before the layer's backward, with only
    # the layer's output grad in flight (checkpointing.reentrant)
    inflight = ctx.stream * ctx.spec.hidden if ctx.reentrant else pts.lora_inflight
    down_rc = pts.lora_down if ctx.reentrant else pts.lora_down_rc
    # DoRA: the adapted Linear's weight-sized locals (its lora_weight graph and weight copy) on top
    fwd_w, down_w = (sum(pts.dora.fwd_weights), sum(pts.dora.down_weights)) if pts.dora else (0, 0)
    if ckpt and pts.lora_fwd:
        out.append(
            (
                LayerPoint.LORA_RECOMPUTE,
                this - _down_freed(ctx, pts, i) - alloc(n * pts.recompute_absent),
                alloc(n * (pts.lora_fwd + inflight)) + fwd_w,
            )
        )
    if ckpt and down_rc:
        out.append(
            (
                LayerPoint.LORA_RECOMPUTE_DOWN,
                this - alloc(n * pts.down_absent),
                alloc(n * (down_rc + inflight)) + down_w,
            )
        )
    if ctx.spec.layers[i].post_mlp_norm and ctx.spec.norm_kind != "layer":
        # a post-MLP norm (Gemma 2) runs its fp32 backward first, with the whole layer alive
        out.append((LayerPoint.POST_MLP_NORM, this, alloc(n * post_mlp_norm_backward(ctx.spec, ctx.setup, ctx.stream))))
    if ckpt and pts.moe_fwd:
        out.append((LayerPoint.MOE_RECOMPUTE, this, alloc(n * pts.moe_fwd)))
    if ctx.hook.get(i):
        # a weight's grad is accumulated: its optimizer steps inside the hook while its
        # matmul's input grad and the MLP's other grads are in flight
        out.append(
            (LayerPoint.OPTIMIZER_HOOK, this - _down_freed(ctx, pts, i), alloc(n * pts.hook_grads) + ctx.hook[i])
        )
    return out


def _dora_moments(
    ctx: StepContext, pts: LayerPoints, this: int, i: int, grads: tuple[int, int], fsdp: tuple[int, int]
) -> list[LayerMoment]:
    """DoRA's moments (memory/dora.py, layer.DoraPoints): the recompute at the last adapted
    Linear's weight norm (what that Linear saves after its norm not made yet), and the backward
    at the magnitude's grad of the first adapter reached (the whole layer saved) and of the
    MLP's input adapter (down's and the elementwise backward's saves released). `grads`: the
    grads held before and after down's; `fsdp`: the buffers at the layer's extra moments and
    at the MLP's."""
    d, n = pts.dora, ctx.tokens
    if d is None:
        return []
    out = []
    norm = dora_recompute(ctx.spec.layers[i], ctx.setup, activation_context(ctx.setup))
    if norm:
        inflight = ctx.stream * ctx.spec.hidden if ctx.reentrant else pts.lora_inflight
        out.append(
            LayerMoment(
                LayerPoint.DORA_RECOMPUTE,
                this - alloc(n * (d.norm_absent + pts.down_absent)),
                norm + alloc(n * (inflight + sum(d.down_common))),
                grads[0],
                fsdp[0],
            )
        )
    if d.bwd_parts:
        out.append(LayerMoment(LayerPoint.DORA, this, alloc(n * sum(d.bwd_parts)), grads[0], fsdp[0]))
    if d.mlp_parts:
        live = this - _down_freed(ctx, pts, i) - alloc(n * d.mlp_freed)
        out.append(LayerMoment(LayerPoint.DORA_MLP, live, alloc(n * sum(d.mlp_parts)), grads[1], fsdp[1]))
    return out


def recomputed_bytes(ctx: StepContext, i: int) -> int:
    """Layer i's saved tensors in its backward, autocast's weight copies apart: what its forward
    saved, or, under checkpointing, what its recompute saves that is not the kept input itself
    (checkpointing.recompute_input_alias)."""
    n = ctx.tokens
    alias = recompute_input_alias(ctx.spec, ctx.spec.layers[i], ctx.setup)
    return alloc(n * ctx.per_layer[i]) - alloc(n * alias)


def layer_moments(ctx: StepContext, pts: LayerPoints, book: GradBook, i: int, done: int) -> list[LayerMoment]:
    """Layer i's backward moments; `done`: the grads of the layers above, already made."""
    this = recomputed_bytes(ctx, i) + ctx.casts[i]
    fs = layer_fsdp(ctx, book, i)
    moments = _core_moments(ctx, pts, this, book, i, done, fs)
    in_flight = fs.gathered + fs.reduce_prev
    moments += [LayerMoment(tag, live, tr, done, in_flight) for tag, live, tr in _extra_moments(ctx, pts, this, i)]
    moments += _dora_moments(
        ctx,
        pts,
        this,
        i,
        (done, done + _grads_made_first(ctx, book, i)),
        (in_flight, fs.gathered + fs.down_share + fs.reduce_prev),
    )
    if ctx.ckpt or ctx.offload_all:
        moments = [_offload_moment(ctx, pts, i, m) for m in moments]
    return moments


RECOMPUTE_POINTS = (
    LayerPoint.LORA_RECOMPUTE,
    LayerPoint.LORA_RECOMPUTE_DOWN,
    LayerPoint.DORA_RECOMPUTE,
    LayerPoint.MOE_RECOMPUTE,
)


def _offload_moment(ctx: StepContext, pts: LayerPoints, i: int, m: LayerMoment) -> LayerMoment:
    """A moment under activation offload or reentrant checkpointing. An offloaded checkpoint
    input is back on the GPU while its layer is recomputed (reentrant: through the layer's
    whole backward, held by the checkpoint's backward); reentrant checkpointing also holds the
    recomputed layer's output until the layer's backward is done. Offloading every saved
    tensor, a layer's backward holds its GPU-resident saves and what about two autograd nodes
    restored (trl activation_offloading.py:385-535: a node's restored tensors are dropped once
    the next node starts), bounded by down's and the MLP's elementwise saves."""
    n = ctx.tokens
    transient = m.transient
    during = m.point in RECOMPUTE_POINTS
    if ctx.ckpt and (ctx.reentrant or during):
        transient += ctx.reload
    if ctx.reentrant and not during:
        transient += alloc(n * ctx.stream * ctx.spec.hidden)
    live = m.live
    if ctx.offload_all:
        restored = pts.down_saved + pts.mlp_grads - ctx.stream * ctx.spec.hidden
        live = min(live, ctx.layer_gpu[i] + alloc(n * restored))
    return LayerMoment(m.point, live, transient, m.grads, m.fsdp)


def layer_backward_phases(ctx: StepContext) -> list[Phase]:
    book = grad_book(ctx)
    points_of: dict[ShapeKey, LayerPoints] = {}
    non_layer = ctx.acts - ctx.layer_acts - ctx.released
    out: list[Phase] = []
    embedding = embedding_grad_last(ctx)  # made after every layer's backward
    done = book.sharded.get(None, 0) - (held_grad(embedding, ctx.setup) if embedding else 0)
    if fsdp2_streams(ctx.setup) or fsdp1_views_grads(ctx.setup):  # the root's unsharded early grads
        done = sum(root_early_grad_sizes(ctx.params, ctx.setup))
    remaining = ctx.layer_acts
    # a frozen prefix (--train-layers) has no backward: autograd's graph ends at the first trained layer
    for i in range(len(ctx.spec.layers) - 1, frozen_prefix(ctx.spec, ctx.setup) - 1, -1):
        key = shape_key(ctx.spec.layers[i])
        if key not in points_of:
            points_of[key] = layer_points(ctx.spec, ctx.spec.layers[i], ctx.setup)
        this = ctx.layer_gpu[i]  # on the GPU: the layer's saves, its input (checkpointing) or neither (offload)
        kept = non_layer + remaining - (0 if ctx.ckpt else this)  # saved outside this layer's own
        for m in layer_moments(ctx, points_of[key], book, i, done):
            ph = ctx.base(PhaseKind.LAYER_BACKWARD, layer=i, point=m.point)
            ph.add(C.ACTIVATIONS, kept + m.live + ctx.cast_cache).add(C.TRANSIENT, m.transient)
            ph.add(C.GRADIENTS, m.grads)
            if ctx.sharded:
                ph.add(C.FSDP_BUFFERS, m.fsdp)
            out.append(ph)
        done += book.sharded.get(i, 0)
        remaining -= this
    return out
