"""The step assembled: its phases, in the order they are listed, from the persistent
bytes, the saved activations and each technique's transients.

The step is modelled as phases (build, forward, loss backward, layer backward,
optimizer step). Each phase gives a breakdown by Category of what is alive; the peak is
the largest phase. Steady state (step >= 1) is modelled: optimizer states exist from
the first step on, and step 0 is never larger except for GaLore's first SVD, modelled
as its own phase."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.categories import Category as C
from vramplan.memory.accumulation import (
    accumulated_grad_sizes,
    accumulation_notes,
    tied_head_grad,
    with_accumulated_grads,
)
from vramplan.memory.activations import saved_activations
from vramplan.memory.attention import FLASH_NOTE, attention_kind
from vramplan.memory.autocast import cast_cache, checkpointed_layer_cast_parts, checkpointed_layer_casts
from vramplan.memory.backward import embedding_grad_last, layer_backward_phases
from vramplan.memory.checkpointing import int8_notes, offload_note, reentrant
from vramplan.memory.compile import compiled_forward_locals
from vramplan.memory.context import EngineBuffers, StaticBytes, StepContext, activation_context
from vramplan.memory.dora import dora_layer_transient, dora_norm_locals, dora_norm_transient
from vramplan.memory.engines import engine_notes, engine_static, step_transient_applies
from vramplan.memory.freeze import freeze_notes
from vramplan.memory.fsdp import (
    engine_units,
    forward_end_gathered,
    gathering,
    head_unit_bytes,
    layer_forward_gathered,
    root_reduce_scatter,
)
from vramplan.memory.grpo import grpo_notes, grpo_phases
from vramplan.memory.layer import LayerPoints, forward_locals, layer_points, step_forward_locals_parts
from vramplan.memory.liger import liger_norms, liger_notes
from vramplan.memory.lora import lora_targeted
from vramplan.memory.lora_kernels import KERNELS_NOTE, kernels_fused
from vramplan.memory.loss import fused_head_cast, loop_token_bytes, loss_notes, loss_terms, outside_forward
from vramplan.memory.norms import (
    final_norm_backward_saved,
    final_norm_forward,
    has_rms_final_norm,
    rms_backward,
)
from vramplan.memory.optimizers import (
    galore_refresh_phase,
    layerwise_hook_bytes,
    optimizer_notes,
    optimizer_transient,
)
from vramplan.memory.orpo import orpo_notes
from vramplan.memory.parameters import Param, grad_bytes, parameters, saved_modules_note, upcast_note
from vramplan.memory.persistent import static_bytes
from vramplan.memory.precision import grad_scaler_step, precision_notes
from vramplan.memory.preference import preference_notes, reference_forward_phase, with_reference_copy
from vramplan.memory.quantization import build_phase, forward_quant_transient
from vramplan.memory.reward import is_reward, reward_notes, score_input_saved
from vramplan.memory.storage import Phase, StepModel, alloc
from vramplan.memory.types import MLP_OUT_ROLES, LinearRole, MeasuredPhase, PhaseKind
from vramplan.memory.unsloth import UNSLOTH_NOTE, unsloth_fused
from vramplan.model_spec import ModelSpec
from vramplan.setup import Attention, Engine, Method, TrainingSetup

OFFLOAD_NOTE = (
    "CPU offload: sharded parameters, gradients and optimizer states live in pinned host "
    "memory and the optimizer steps on the CPU."
)


@dataclass(frozen=True)
class Prepared:
    """The token-independent part of step_model for one (spec, setup without batch/seq).
    The planner evaluates each configuration at several token counts; sharing this part
    makes that cheaper without changing any result."""

    spec: ModelSpec
    key: TrainingSetup
    params: list[Param]
    static: StaticBytes
    units: dict[int | None, int]
    engine: EngineBuffers
    head_unit: int = 0


def _token_free_key(setup: TrainingSetup) -> TrainingSetup:
    return setup.model_copy(update={"batch_size": 1, "seq_len": 1})


def prepared_for(spec: ModelSpec, setup: TrainingSetup, prepared: Prepared | None) -> Prepared:
    """`prepared` when it was made for this spec and this setup up to batch_size/seq_len, else a new one."""
    if prepared is None or prepared.spec is not spec or prepared.key != _token_free_key(setup):
        return prepare(spec, setup)
    return prepared


def prepare(spec: ModelSpec, setup: TrainingSetup) -> Prepared:
    params = parameters(spec, setup)
    static, engine = engine_static(spec, params, setup, static_bytes)
    static = with_reference_copy(static, params, setup)  # DPO's frozen reference model (preference.py)
    units = engine_units(params, setup)
    return Prepared(spec, _token_free_key(setup), params, static, units, engine, head_unit_bytes(params, setup))


def step_context(spec: ModelSpec, setup: TrainingSetup, prepared: Prepared) -> StepContext:
    saved = saved_activations(spec, setup)
    params = prepared.params
    # optimizers stepped in backward (layer-wise, LOMO, --optimizer-in-backward): each
    # parameter's hook steps it and frees its grad
    hook = layerwise_hook_bytes(params, setup) if setup.steps_in_backward else {}
    cache = cast_cache(params, setup, spec) - fused_head_cast(spec, setup)
    return StepContext(
        spec=spec,
        setup=setup,
        params=params,
        static=prepared.static,
        units=prepared.units,
        head_unit=prepared.head_unit,
        per_layer=saved.per_layer,
        acts=saved.total,
        layer_acts=saved.layers,
        released=saved.released,
        cast_cache=cache,
        hook=hook,
        layer_gpu=saved.layer_gpu,
        reload=saved.reload,
        forward_extra=saved.forward_extra,
        buffers=saved.buffers,
        host_acts=saved.host,
        casts=saved.casts,
        down_casts=saved.down_casts,
        cast_parts=saved.cast_parts,
        forward_cache=saved.forward_cache + checkpointed_layer_casts(params, setup),
        forward_cache_layers=checkpointed_layer_cast_parts(params, setup),
        held_mlp_last=saved.held_mlp_last,
        reentrant=reentrant(setup),
        engine=prepared.engine,
        gathering=gathering(setup),
    )


# lm_head's own FSDP unit (--fsdp-embedding-units) is gathered for the loss and its backward
_HEAD_GATHERED = (PhaseKind.FORWARD_LOSS, PhaseKind.LOSS_BACKWARD)


def _at_forward_end(ctx: StepContext, kind: PhaseKind, activations: int, transient: int) -> Phase:
    ph = ctx.base(kind).add(C.ACTIVATIONS, activations).add(C.TRANSIENT, transient)
    if ctx.sharded:
        head = ctx.head_unit if kind in _HEAD_GATHERED else 0
        ph.add(C.FSDP_BUFFERS, forward_end_gathered(ctx.units, ctx.gathering) + head)
    return ph


def head_phases(ctx: StepContext) -> list[Phase]:
    """The end of forward and the start of backward: the loss and the final norm."""
    spec, n = ctx.spec, ctx.tokens
    loss = loss_terms(spec, ctx.setup)
    acts = ctx.acts + ctx.cast_cache
    final_norm = has_rms_final_norm(spec)
    # the loss runs inside the forward's autocast: its cache is cleared once the loss is computed;
    # a trainer that takes its log-probs from the returned logits does so after autocast has exited
    cache = 0 if outside_forward(ctx.setup) else ctx.forward_cache
    phases = [_at_forward_end(ctx, PhaseKind.FORWARD_LOSS, acts + cache, loss.forward)]
    if final_norm:
        # a reward model's score head saves its input after the final norm ran (memory/reward.py)
        ac = activation_context(ctx.setup)
        score = alloc(score_input_saved(spec, ctx.setup, ac.stream, ac.autocast)) if is_reward(ctx.setup) else 0
        phases.append(
            _at_forward_end(
                ctx,
                PhaseKind.FORWARD_FINAL_NORM,
                acts + ctx.forward_cache - score,
                alloc(n * final_norm_forward(spec, ctx.setup, ctx.stream, _final_norm_locals(ctx))),
            )
        )
    phases.append(_at_forward_end(ctx, PhaseKind.LOSS_BACKWARD, acts, loss.backward))
    if final_norm:
        # the final norm's fp32 backward, every layer's saved tensors still alive; of the
        # root's, only the norm's fp32 input
        kept = (
            ctx.acts - ctx.released + alloc(n * final_norm_backward_saved(spec, ctx.setup, ctx.stream)) + ctx.cast_cache
        )
        phases.append(
            _at_forward_end(
                ctx, PhaseKind.FINAL_NORM_BACKWARD, kept, alloc(n * rms_backward(spec, ctx.setup, ctx.stream))
            )
        )
    return phases


def _final_norm_locals(ctx: StepContext) -> int:
    """Per token, the forward's locals at the final norm (compiled layers: compile.py)."""
    if liger_norms(ctx.spec, ctx.setup):
        return sum(step_forward_locals_parts(ctx.spec, ctx.setup, in_last_layer=False))
    h = ctx.spec.hidden
    return compiled_forward_locals(ctx.spec, activation_context(ctx.setup), forward_locals(h, ctx.stream))


def root_hook_phase(ctx: StepContext) -> list[Phase]:
    """A layer-wise optimizer's hook on lm_head (or the embedding), all saved tensors alive."""
    if not ctx.hook.get(None) or ctx.offload:
        return []
    return [
        ctx.base(PhaseKind.OPTIMIZER_HOOK_ROOT)
        .add(C.ACTIVATIONS, ctx.acts + ctx.cast_cache)
        .add(C.TRANSIENT, alloc(ctx.tokens * ctx.stream * ctx.spec.hidden) + ctx.hook[None])
    ]


def layer_forward_phase(ctx: StepContext) -> list[Phase]:
    """The last decoder layer's forward: under checkpointing the MLP's working set (its
    recompute in backward is wider; this is forward's peak); without it, at its widest
    LoRA Linear, everything saved so far plus peft's fp32 adapter path."""
    pts = layer_points(ctx.spec, ctx.spec.layers[-1], ctx.setup)
    n, before = ctx.tokens, ctx.acts - ctx.released + ctx.forward_extra
    if ctx.ckpt:
        # LLM.int8's inputs this layer's MLP holds: act*up not made yet, its input in the working set
        ph = ctx.base(PhaseKind.FORWARD_CHECKPOINTED_LAYER).add(
            C.ACTIVATIONS, before + ctx.cast_cache + ctx.forward_cache - ctx.held_mlp_last
        )
        ph.add(C.TRANSIENT, alloc(n * pts.ckpt_fwd) + (sum(pts.dora.ckpt_weights) if pts.dora else 0))
    elif not pts.lora_fwd and not pts.lora_down:
        return []
    else:
        live, transient, _, _ = last_layer_adapter(ctx, pts)
        locals_ = alloc(n * sum(step_forward_locals_parts(ctx.spec, ctx.setup, in_last_layer=True)))
        ph = ctx.base(PhaseKind.FORWARD_LAST_LAYER).add(C.ACTIVATIONS, live + ctx.cast_cache)
        ph.add(C.TRANSIENT, transient + locals_)
    if ctx.sharded:
        ph.add(C.FSDP_BUFFERS, layer_forward_gathered(ctx.units, ctx.gathering))
    return [ph]


def last_layer_adapter(ctx: StepContext, pts: LayerPoints) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """The last layer's forward without checkpointing at its widest adapter before down
    (down's saved input and autocast's weight copy not made yet) or at down's: (saved bytes
    live, the adapter's transient, its tensors per token, DoRA's weight-sized locals there)."""
    n, before = ctx.tokens, ctx.acts - ctx.released + ctx.forward_extra
    fwd_w, down_w = (pts.dora.fwd_weights, pts.dora.down_weights) if pts.dora else ((), ())
    return max(
        (
            (
                before - alloc(n * pts.down_saved) - alloc(n * pts.down_held) - ctx.down_casts[-1],
                alloc(n * pts.lora_fwd) + sum(fwd_w),
                pts.lora_fwd_parts,
                fwd_w,
            ),
            (before - alloc(n * pts.down_absent), alloc(n * pts.lora_down) + sum(down_w), pts.lora_down_parts, down_w),
        ),
        key=lambda lt: lt[0] + lt[1] if lt[1] else -1,
    )


def dora_phase(ctx: StepContext) -> list[Phase]:
    """DoRA: the last layer's widest weight norm (dora.dora_norm_transient), everything
    before that layer saved, the forward's locals alive; at down's adapter precisely: the
    layer saved but what down saves after its norm, down's locals (the MLP's input and
    output, the norm's output, the residual stream after attention) and its own (its base
    output; checkpointed, x's copy too: dora.dora_norm_locals)."""
    setup, n = ctx.setup, ctx.tokens
    act = activation_context(setup)
    t = dora_layer_transient(ctx.spec, setup, act)
    if not t:
        return []
    locals_ = alloc(n * sum(step_forward_locals_parts(ctx.spec, ctx.setup, in_last_layer=True)))
    live = ctx.acts - ctx.released + ctx.cast_cache + ctx.forward_cache
    candidates = [(live, t + locals_)]
    pts = layer_points(ctx.spec, ctx.spec.layers[-1], setup)
    down = next((l for l in ctx.spec.layers[-1].linears if l.role in MLP_OUT_ROLES and lora_targeted(l, setup)), None)
    if down is not None and pts.dora is not None:
        own = sum(pts.dora.down_common) + sum(dora_norm_locals(down, act, saving=not ctx.ckpt))
        absent = 0 if ctx.ckpt else alloc(n * (pts.dora.norm_absent + pts.down_absent))
        candidates.append((live - absent, dora_norm_transient(down, setup, act) + locals_ + alloc(n * own)))
    at, transient = max(candidates, key=lambda c: c[0] + c[1])
    return [ctx.base(PhaseKind.DORA_NORM_FORWARD).add(C.ACTIVATIONS, at).add(C.TRANSIENT, transient)]


def embedding_backward_tensors(ctx: StepContext) -> list[int]:
    """The embedding's backward, the last node (one GPU, DDP): the [V, h] tensors it holds beside
    every gradient made, where its new grad is not simply taken as the grad. Tied to a trained
    lm_head: lm_head's grad waits in the engine's input buffer of the shared weight (torch==2.13
    torch/csrc/autograd/input_buffer.cpp `accumulate`, beside an accumulated grad under gradient
    accumulation) and the embedding's is added to it out of place (traced: `aten::add` of V·h
    under EmbeddingBackward0): the new grad and the sum; with gradient accumulation alone
    AccumulateGrad adds the new grad into the held one in place: the new grad. [CPU trace:
    group `embedding`]"""
    setup, spec = ctx.setup, ctx.spec
    if not setup.trains_embedding or setup.engine not in (Engine.SINGLE, Engine.DDP) or setup.steps_in_backward:
        return []
    copy = setup.lora_like  # peft's modules_to_save copy: a weight of its own, tied to nothing
    tied = tied_head_grad(ctx) > 0
    accumulating = setup.gradient_accumulation > 1
    if not (tied or accumulating):
        return []
    role = LinearRole.EMBED if copy else None
    embed = next(p for p in ctx.params if p.layer is None and p.trainable and p.dim0 == spec.vocab and p.role == role)
    count = (2 + accumulating) if tied else 1
    return [alloc(grad_bytes(embed, setup) * embed.numel)] * count


def embedding_backward_phase(ctx: StepContext) -> list[Phase]:
    """embedding_backward_tensors' moment: every gradient, what is left of the activations. An
    untied embedding's grad, made last (backward.embedding_grad_last), makes this moment hold every
    gradient even when the new grad is simply taken as the grad. [CPU trace: embedding untied-full]"""
    tensors = embedding_backward_tensors(ctx)
    if not tensors and embedding_grad_last(ctx) is None:
        return []
    ph = ctx.base(PhaseKind.EMBEDDING_BACKWARD, with_grads=True)
    ph.add(C.ACTIVATIONS, ctx.acts - ctx.layer_acts - ctx.released + ctx.cast_cache)
    return [ph.add(C.TRANSIENT, sum(tensors))]


def root_reduce_scatter_phase(ctx: StepContext) -> list[Phase]:
    """FSDP2's last post-backward, the root's (fsdp.root_reduce_scatter): every other unit
    resharded, every layer's sharded grad made, the root's unsharded grads and its
    reduce-scatter input alive; of the activations, only the loop's batch. On a full
    fine-tune with large embeddings it is the step's peak (Llama-3.1-8B on 8 GPUs: the
    l8b_fsdp8 case of tests/data/h200_verify.jsonl)."""
    unsharded, scatter_input, sharded = root_reduce_scatter(ctx.params, ctx.setup)
    if not scatter_input:
        return []
    ph = ctx.base(PhaseKind.ROOT_REDUCE_SCATTER, with_grads=True)
    ph.add(C.GRADIENTS, unsharded - (0 if ctx.setup.cpu_offload else sharded))
    ph.add(C.COMM_BUFFERS, scatter_input)
    return [ph.add(C.ACTIVATIONS, loop_token_bytes(ctx.setup) + ctx.buffers)]


def quantization_phases(ctx: StepContext) -> list[Phase]:
    """QLoRA: a 4-bit weight dequantized in forward, or LLM.int8's widest matmul (in backward:
    a layer point), and the build."""
    if ctx.setup.method != Method.QLORA:
        return []
    assert ctx.setup.quant is not None
    ph = ctx.base(PhaseKind.DEQUANTIZE_FORWARD).add(C.ACTIVATIONS, ctx.acts + ctx.forward_extra + ctx.forward_cache)
    act = activation_context(ctx.setup)
    ph.add(C.TRANSIENT, forward_quant_transient(ctx.spec.layers, ctx.params, act, ctx.tokens))
    if ctx.sharded:  # this unit and the one prefetched, and the root
        ph.add(C.FSDP_BUFFERS, layer_forward_gathered(ctx.units, ctx.gathering))
    return [ph, build_phase(ctx.params, ctx.world)]


def optimizer_phases(ctx: StepContext) -> list[Phase]:
    """The optimizer step (on the CPU under offload; inside backward for layer-wise
    optimizers) and GaLore's projector refresh."""
    if ctx.offload:
        return []
    phases = []
    if not ctx.setup.steps_in_backward:
        ph = ctx.base(PhaseKind.OPTIMIZER_STEP, with_grads=True).add(
            C.ACTIVATIONS, loop_token_bytes(ctx.setup) + ctx.buffers
        )
        if step_transient_applies(ctx.setup):
            ph.add(C.TRANSIENT, optimizer_transient(ctx.params, ctx.setup, ctx.world) + grad_scaler_step(ctx.setup))
        phases.append(ph)
    if ctx.setup.method == Method.GALORE:
        phases.append(galore_refresh_phase(ctx.params, ctx.setup, ctx.base(PhaseKind.GALORE_REFRESH), ctx.static.grads))
    return phases


def knob_notes(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """What the estimate rests on for knobs that run only on CUDA (modelled from source)."""
    notes = [FLASH_NOTE] if attention_kind(spec, setup) == Attention.FLASH else []
    if any(unsloth_fused(spec, layer, setup) for layer in spec.layers[:1]):
        notes.append(UNSLOTH_NOTE)
    if any(kernels_fused(spec, layer, setup) for layer in spec.layers[:1]):
        notes.append(KERNELS_NOTE)
    elif setup.lora_kernels and setup.lora_like:
        notes.append(
            "--lora-kernels: this model's layers are not the Llama shape the rule covers (separate "
            "q/k/v and gate/up/down, all adapted, RMSNorm, no experts): peft's LoRA rules, an overestimate"
        )
    notes += liger_notes(spec, setup)
    return (
        notes
        + offload_note(setup)
        + int8_notes(spec, setup)
        + saved_modules_note(spec, setup)
        + upcast_note(spec, setup)
        + freeze_notes(spec, setup)
    )


def worst_layer_only(every_layer: StepModel) -> StepModel:
    """step_model(every_layer=False) from the every-layer model of the same step: the layer
    backward phases collapsed to the largest (the first of equals), where they stood. One
    model serves the estimate's phases and the events (estimate.estimate_spec)."""
    layers = [p for p in every_layer.phases if p.kind is PhaseKind.LAYER_BACKWARD]
    if not layers:
        return every_layer
    worst = max(layers, key=lambda p: p.allocated)
    first = every_layer.phases.index(layers[0])
    rest = [p for p in every_layer.phases if p.kind is not PhaseKind.LAYER_BACKWARD]
    return StepModel([*rest[:first], worst, *rest[first:]], every_layer.host_pinned, list(every_layer.notes))


def step_model(
    spec: ModelSpec, setup: TrainingSetup, every_layer: bool = False, prepared: Prepared | None = None
) -> StepModel:
    """All phases of one step. every_layer=True keeps one "layer backward" phase per decoder
    layer instead of only the worst (each is then affine in the token count, which the
    planner relies on). `prepared` (from prepare()) is reused only when it was made for
    this spec and this setup up to batch_size/seq_len; otherwise it is recomputed."""
    prepared = prepared_for(spec, setup, prepared)
    ctx = step_context(spec, setup, prepared)
    layers = with_accumulated_grads(ctx, layer_backward_phases(ctx))
    phases = [
        *grpo_phases(ctx),
        *head_phases(ctx),
        *reference_forward_phase(ctx),
        *(layers if every_layer else [max(layers, key=lambda p: p.allocated)]),
        *root_hook_phase(ctx),
        *embedding_backward_phase(ctx),
        *root_reduce_scatter_phase(ctx),
        *layer_forward_phase(ctx),
        *dora_phase(ctx),
        *quantization_phases(ctx),
        *optimizer_phases(ctx),
    ]
    with_accumulated_grads(ctx, [p for p in phases if p.kind is not PhaseKind.LAYER_BACKWARD])  # in place
    kept = loss_terms(spec, setup).kept  # --keep-logits: the loop's output, alive at every moment of a step
    phases = [p.add(C.ACTIVATIONS, kept) if kept and p.measured != MeasuredPhase.BUILD else p for p in phases]
    notes = (
        ([OFFLOAD_NOTE] if setup.cpu_offload else [])
        + loss_notes(setup)
        + preference_notes(setup)
        + orpo_notes(setup)
        + grpo_notes(setup)
        + reward_notes(setup)
        + knob_notes(spec, setup)
        + precision_notes(setup)
        + optimizer_notes(setup, prepared.static)
        + engine_notes(spec, setup, prepared.static)
        + (accumulation_notes(setup) if accumulated_grad_sizes(ctx) else [])
    )
    return StepModel(phases=phases, host_pinned=prepared.static.host_pinned + ctx.host_acts, notes=notes)
