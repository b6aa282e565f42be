"""What the rules read about a setup, gathered once: the activation context of a decoder
layer and the step context that the phases are assembled from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from vramplan.categories import Category as C
from vramplan.memory.precision import fp32_stream_autocast, trained_layers_fp32
from vramplan.memory.storage import Phase
from vramplan.memory.types import LayerPoint, MeasuredPhase, Param, ParamKind, PhaseKind
from vramplan.model_spec import ModelSpec
from vramplan.setup import ActivationOffload, AdapterDtype, Method, Precision, Quant, TrainingSetup


@dataclass(frozen=True)
class ActivationContext:
    """What decides which tensors autograd saves inside a decoder layer."""

    weights_train: bool  # base Linear weights need grad (full / galore)
    norms_train: bool
    stream: int  # bytes per element of the residual stream (4 under autocast)
    autocast: bool  # fp32 stream fed to autocast Linears (each casts its own copy)
    adapters_bf16: bool  # LoRA computes in bf16: under autocast, FSDP2 (param_dtype bf16), or bf16 adapters
    lora_autocast: bool  # peft's adapter input is cast under autocast (fp32 adapters or an fp32 stream)
    quant: ParamKind | None
    quant_saves_input: bool  # a node keeps the input of each quantized Linear (hqq; LLM.int8 but in a recompute)
    lora_dropout: bool
    lora_r: int
    setup: TrainingSetup


def activation_context(setup: TrainingSetup) -> ActivationContext:
    full = setup.method in (Method.FULL, Method.GALORE)
    fp32_stream = fp32_stream_autocast(setup)
    # autocast with a bf16 stream and bf16 adapters casts nothing on the adapter path
    lora_autocast = setup.autocast and (fp32_stream or setup.adapter_store_dtype == AdapterDtype.FP32)
    return ActivationContext(
        weights_train=full,
        norms_train=full,
        stream=stream_bytes(setup),
        # --train-layers-dtype fp32 over bf16 weights: a trained layer's fp32 norm weights promote
        # the norm's output to fp32 and each Linear casts its own copy; the stream stays bf16
        autocast=fp32_stream or trained_layers_fp32(setup),
        adapters_bf16=(
            lora_autocast
            or setup.deepspeed is not None
            or (setup.sharded and _unit_dtype_bf16(setup))
            or setup.adapter_store_dtype == AdapterDtype.BF16
        ),
        lora_autocast=lora_autocast,
        quant=ParamKind(cast(Quant, setup.quant).value) if setup.method == Method.QLORA else None,
        quant_saves_input=_quant_saves_input(setup),
        lora_dropout=setup.lora_dropout > 0,
        lora_r=setup.lora_r,
        setup=setup,
    )


def _quant_saves_input(setup: TrainingSetup) -> bool:
    """hqq's matmul saves its input; LLM.int8's keeps it as a ctx attribute (quantization.py),
    except in a non-reentrant checkpoint's recompute: its pack hook stores detached tensors
    (torch==2.13 torch/utils/checkpoint.py:1094-1095), so the recomputed graph, and the int8
    inputs its nodes hold, is dropped once the recompute stops. [CPU trace: qlora-int8-ckpt]"""
    if setup.method != Method.QLORA:
        return False
    if setup.quant == Quant.INT8:
        return not (setup.gradient_checkpointing and not setup.checkpoint_reentrant)
    return setup.quant == Quant.HQQ4


def _unit_dtype_bf16(setup: TrainingSetup) -> bool:
    """FSDP computes peft's fp32 adapters in bf16: FSDP2 all-gathers one param_dtype per unit
    (bf16); FSDP1 only under MixedPrecision(param_dtype=bf16) (mixed precision): without it
    each LoRA Linear is its own unit in the adapters' dtype (fp32: computes in fp32, as on one
    GPU [CPU trace]; --adapter-dtype bf16, e.g. peft before autocast_adapter_dtype: bf16)."""
    return (
        setup.fsdp_version == 2 or setup.precision == Precision.MIXED or setup.adapter_store_dtype == AdapterDtype.BF16
    )


def base_output_bytes(ctx: ActivationContext) -> int:
    """Bytes per element of a base Linear's output read from the stream (the MLP's gate/up):
    the stream's dtype behind a bitsandbytes 4-bit Linear (fp32 on an fp32 stream under
    autocast), else bf16 (autocast's matmul, or a bf16 step)."""
    return ctx.stream if ctx.quant in (ParamKind.NF4, ParamKind.INT8) else 2


def stream_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of the residual stream: fp32 under autocast over fp32 weights, else bf16."""
    return 4 if fp32_stream_autocast(setup) else 2


@dataclass(frozen=True)
class StaticBytes:
    """The persistent per-GPU bytes of the step (parameters.static_bytes)."""

    parts: dict[C, int]  # weights, quantization state, adapters on the GPU
    grads: int  # gradients held at the optimizer step
    optimizer_states: int
    host_pinned: int  # CPU offload: shards, grads and states on the host; host-side optimizer states
    paged_states: int = 0  # bitsandbytes paged optimizer states: CUDA unified memory, outside torch's statistics


@dataclass(frozen=True)
class Gathering:
    """When units are unsharded: after forward (False under SHARD_GRAD_OP) and whether a
    unit's backward all-gathers the next one early."""

    reshard_after_forward: bool = True
    backward_prefetch: bool = True


@dataclass(frozen=True)
class EngineBuffers:
    """An engine's communication buffers by measured phase (DeepSpeed's buckets and gathered
    partitions; DDP's buckets are persistent, in StaticBytes.parts)."""

    forward: int = 0
    backward: int = 0
    step: int = 0

    def at(self, phase: MeasuredPhase) -> int:
        return {
            MeasuredPhase.FORWARD: self.forward,
            MeasuredPhase.BACKWARD: self.backward,
            MeasuredPhase.OPTIMIZER: self.step,
        }.get(phase, 0)


@dataclass(frozen=True)
class StepContext:
    """Everything the phases of one step are assembled from (phases.step_model)."""

    spec: ModelSpec
    setup: TrainingSetup
    params: list[Param]
    static: StaticBytes
    units: dict[int | None, int]  # FSDP: all-gathered bytes per unit (layer index, None = root)
    per_layer: list[int]  # bytes each decoder layer saves per token (no checkpointing)
    acts: int  # every activation saved through the forward
    layer_acts: int  # of which the decoder layers' (their inputs under checkpointing)
    released: int  # saved by the final norm and lm_head, freed before the layers
    cast_cache: int  # autocast's cached bf16 weight casts
    hook: dict[int | None, int] = field(default_factory=dict)  # layer-wise optimizers' hook bytes
    # activation offload and checkpointing's variants (checkpointing.py, activations.py)
    layer_gpu: list[int] = field(default_factory=list)  # each layer's saved bytes on the GPU through the step
    reload: int = 0  # a checkpointed input back on the GPU while its layer is recomputed
    forward_extra: int = 0  # offloaded tensors still on the GPU at a layer's forward
    buffers: int = 0  # persistent GPU reload buffers (Unsloth), part of acts
    host_acts: int = 0  # activations in pinned host RAM
    casts: list[int] = field(default_factory=list)  # each layer's saved bf16 copies of frozen weights (autocast.py)
    down_casts: list[int] = field(default_factory=list)  # of which down's, freed with down's saved input
    cast_parts: list[tuple[int, ...]] = field(default_factory=list)  # the others one by one, where known
    forward_cache: int = 0  # autocast's cached copies held through the forward only (autocast.py)
    forward_cache_layers: dict[int, list[int]] = field(default_factory=dict)  # of which made at layer i's forward
    held_mlp_last: int = 0  # LLM.int8: the last layer's MLP inputs a checkpoint keeps, not made at its widest
    reentrant: bool = False  # the recompute runs whole inside the checkpoint's backward node
    engine: EngineBuffers = field(default_factory=EngineBuffers)
    gathering: Gathering = field(default_factory=Gathering)  # FSDP: when units are unsharded
    head_unit: int = 0  # FSDP: lm_head's own unit, gathered at the loss only (fsdp.head_unit_bytes)

    @property
    def tokens(self) -> int:
        return self.setup.tokens

    @property
    def world(self) -> int:
        """GPUs an FSDP shard group spans (1 without FSDP)."""
        return self.setup.shard_world if self.setup.sharded else 1

    @property
    def sharded(self) -> bool:
        """FSDP all-gathers units around their use (even on one GPU under CPU offload)."""
        return self.setup.sharded

    @property
    def offload(self) -> bool:
        """The optimizer steps on the host: FSDP's CPU offload or DeepSpeed's offload_optimizer."""
        return self.setup.cpu_offload or self.setup.offload_optimizer

    @property
    def ckpt(self) -> bool:
        return self.setup.gradient_checkpointing

    @property
    def stream(self) -> int:
        return stream_bytes(self.setup)

    @property
    def offload_all(self) -> bool:
        """OffloadActivations over every saved tensor, no checkpointing."""
        return self.setup.activation_offload == ActivationOffload.ALL and not self.ckpt

    def base(
        self, kind: PhaseKind, with_grads: bool = False, layer: int | None = None, point: LayerPoint | None = None
    ) -> Phase:
        """A phase holding the persistent bytes: weights, quantization state, adapters and
        optimizer states (and the gradients, when they are all alive)."""
        ph = Phase(kind, layer=layer, point=point)
        for c, v in self.static.parts.items():
            ph.add(c, v)
        ph.add(C.OPTIMIZER_STATES, self.static.optimizer_states)
        if self.static.paged_states:  # resident on the GPU, not in Phase.allocated (categories.ALLOCATED)
            ph.add(C.PAGED_OPTIMIZER_STATES, self.static.paged_states)
        comm = self.engine.at(kind.measured)
        if comm:  # the step's fp32 flat grad and foreach temporaries are transients
            ph.add(C.TRANSIENT if kind.measured == MeasuredPhase.OPTIMIZER else C.COMM_BUFFERS, comm)
        if with_grads:
            ph.add(C.GRADIENTS, self.static.grads)
        return ph
