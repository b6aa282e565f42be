"""Gradient checkpointing (torch.utils.checkpoint as transformers enables it; non-reentrant
unless --checkpoint-reentrant): what each checkpointed layer keeps, its forward's working
set when nothing is saved, and where the kept inputs live under activation offload
(--activation-offload). The recompute's own moments are layer backward points (layer.py,
backward.py)."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.memory.attention import attention_forward_parts, attention_kind, attention_span
from vramplan.memory.context import ActivationContext, activation_context, stream_bytes
from vramplan.memory.liger import liger_glu, liger_norms
from vramplan.memory.mlp import ckpt_forward_parts
from vramplan.memory.norms import norm_saved
from vramplan.memory.quantization import base_output_bytes, int8_held, int8_held_parts
from vramplan.memory.storage import alloc
from vramplan.memory.types import ParamKind
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import ActivationOffload, Attention, Quant, TrainingSetup
from vramplan.units import GiB

# Unsloth's offloaded checkpointing (unsloth-zoo==2026.10.9 unsloth_zoo/gradient_checkpointing.py:63-66, 1326):
# a layer's input is offloaded when its stored bytes exceed MINIMUM_SIZE; the host pool starts with
# INITIAL_CPU_BUFFER_COUNT buffers of INITIAL_CPU_BUFFER_SIZE elements, each grown to the largest stored
# input; unsloth/models/_utils.py:503-507 falls back to plain checkpointing below max_seq_length 512.
UNSLOTH_MINIMUM_SIZE = 2 * 1024 * 1024
UNSLOTH_CPU_BUFFERS, UNSLOTH_CPU_BUFFER_ELEMENTS = 200, 128 * 1024
UNSLOTH_MIN_SEQ = 512
UNSLOTH_STORE_BYTES = 2  # fp32 hidden states are stored as bf16 (UNSLOTH_OFFLOAD_FP32 default, :424)
UNSLOTH_RELOAD_BUFFERS = 2  # GPU_BUFFERS + GPU_BUFFERS_B (double buffering from step 2 with > 512 MiB free, :1428-1447)
# TRL/torchtune OffloadActivations (trl==1.16.0 trl/models/activation_offloading.py:124-180): the
# forward stash keeps the last max_fwd_stash_size packed originals on the GPU until their copy is done.
OFFLOAD_STASH = 5

OFFLOAD_SOURCES = {
    ActivationOffload.CHECKPOINTS: "transformers==5.25.0 modeling_utils.py:3159-3170 (save_on_cpu(pin_memory=True) "
    "around checkpoint), torch==2.13 torch/autograd/graph.py:400-420",
    ActivationOffload.ALL: "trl==1.16.0 trl/models/activation_offloading.py:200-340 (OffloadActivations, as torchtune "
    "and axolotl use it)",
    ActivationOffload.UNSLOTH: "unsloth-zoo==2026.10.9 unsloth_zoo/gradient_checkpointing.py:1337-1640",
}


def recompute_input_alias(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup) -> int:
    """Per token, what a checkpointed layer's recompute saves that is its kept input itself, not a
    new tensor: over an fp32 stream the input RMSNorm's ``hidden_states.to(torch.float32)`` is a
    no-op (transformers LlamaRMSNorm.forward), so the input pow and mul save is the tensor the
    checkpoint kept (its recompute runs on that tensor, or on a detached view of it, reentrant),
    which norms.norm_saved counts as the layer's own 4h. A bf16 stream's cast is a copy; a
    LayerNorm or a post-norm layer is left as it is (not traced). [CPU trace: layer-backward
    axolotl-full-fp32-roots-ckpt and full-mixed-ckpt: one fp32 [N, h] fewer than every saved tensor
    of the layer plus its input]"""
    plain = setup.activation_offload == ActivationOffload.NONE and not setup.compile
    if not (setup.gradient_checkpointing and plain) or spec.norm_kind == "layer" or not layer.pre_norm:
        return 0
    if liger_norms(spec, setup):
        # LigerRMSNorm saves its input X itself (memory/liger.py): the kept input, whatever its dtype
        return stream_bytes(setup) * spec.hidden
    return 4 * spec.hidden if stream_bytes(setup) == 4 else 0


def kept_per_layer(spec: ModelSpec, stream: int) -> int:
    """Per token, what a checkpointed layer keeps: its input hidden state."""
    return stream * spec.hidden


def checkpointed_forward(
    spec: ModelSpec,
    layer: LayerSpec,
    ctx: ActivationContext,
    f: int,
    gated: bool,
    residual: int,
    lora_mlp: list[int],
    at_base: bool = False,
) -> list[int]:
    """Per token, the tensors of a checkpointed forward (nothing saved) at its widest, oldest
    first: the MLP's working set (mlp.ckpt_forward_parts), or the attention's
    (attention.attention_forward_parts) with the norm's output (post-norm: the layer's input,
    which the checkpoint holds anyway). [CPU trace]"""
    copies = liger_glu(spec, layer, ctx.setup)
    mlp = ckpt_forward_parts(spec, layer, f, gated, residual, lora_mlp, base_output_bytes(ctx), at_base, copies)
    attn = [residual] if layer.pre_norm else []
    attn += attention_forward_parts(spec, layer, ctx, attention_span(ctx.setup))
    return attn if sum(attn) > sum(mlp) else mlp


def reentrant(setup: TrainingSetup) -> bool:
    """The recompute runs the whole layer's forward, then its backward, inside the checkpoint's
    own backward node (torch==2.13 torch/utils/checkpoint.py CheckpointFunction.backward), with
    no early stop, and that forward's output stays referenced (`outputs`) until the layer's
    backward is done. Unsloth's UnslothCheckpointFunction.backward does the same whatever
    use_reentrant says (unsloth_zoo gradient_checkpointing.py:1551-1570)."""
    return setup.gradient_checkpointing and (
        setup.checkpoint_reentrant or setup.activation_offload == ActivationOffload.UNSLOTH
    )


def unsloth_offloads(spec: ModelSpec, setup: TrainingSetup) -> bool:
    """Whether use_gradient_checkpointing="unsloth" offloads at this size (else plain checkpointing)."""
    return (
        setup.activation_offload == ActivationOffload.UNSLOTH
        and setup.seq_len >= UNSLOTH_MIN_SEQ
        and setup.tokens * spec.hidden * UNSLOTH_STORE_BYTES > UNSLOTH_MINIMUM_SIZE
    )


def unsloth_from(setup: TrainingSetup) -> int | None:
    """The sequence length from which Unsloth offloads (None: another mode)."""
    return UNSLOTH_MIN_SEQ if setup.activation_offload == ActivationOffload.UNSLOTH else None


def pinned(nbytes: int) -> int:
    """A pinned host allocation: torch's CachingHostAllocator rounds it up to a power of two
    (torch==2.13 ATen/core/CachingHostAllocator.h: PowerOf2Ceil; no threshold by default)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


@dataclass(frozen=True)
class CheckpointOffload:
    """Where the checkpointed layers' inputs live (bytes, tokens applied)."""

    kept_layers: int  # the last kept_layers layers keep their input on the GPU through the step
    input: int  # one layer's input
    host: int  # pinned host RAM
    buffers: int  # persistent GPU reload buffers (Unsloth)
    reload: int  # the input of the layer being recomputed, back on the GPU (transient)
    forward_extra: int  # inputs still referenced on the GPU at a layer's forward, beyond those kept
    # offloaded inputs the forward still holds on the GPU besides the embedding output (a local of
    # the model's forward): the newest `stash`, the current layer's included (0: nothing offloaded)
    stash: int = 0
    # per layer, LLM.int8's inputs the forward's graph still holds (quantization.int8_held), and
    # of the last layer's those its MLP makes (not yet there, or its working set, at its widest)
    held: tuple[int, ...] = ()
    held_mlp_last: int = 0

    def layer_gpu(self, layers: int) -> list[int]:
        kept = [0] * (layers - self.kept_layers) + [self.input] * self.kept_layers
        return [k + h for k, h in zip(kept, self.held or (0,) * layers, strict=True)]


def checkpoint_offload(spec: ModelSpec, setup: TrainingSetup) -> CheckpointOffload:
    """Checkpointing's kept inputs, per offload mode. transformers' offload (save_on_cpu) and
    TRL's OffloadActivations under checkpointing move each layer's positional input only (RoPE's
    cos/sin and the mask are partial-bound kwargs and stay); the GPU keeps the current layer's
    input and the embedding output (locals of the model's forward), TRL also its last
    OFFLOAD_STASH packed inputs. In backward each input comes back as a fresh GPU tensor
    (.to(device)). Unsloth copies each input but the last into host buffers and reloads into
    persistent GPU buffers; the last layer's input stays. [modelled from source]"""
    n, layers, stream = setup.tokens, len(spec.layers), stream_bytes(setup)
    one = alloc(n * kept_per_layer(spec, stream))
    mode = setup.activation_offload
    if mode in (ActivationOffload.CHECKPOINTS, ActivationOffload.ALL):
        stash = OFFLOAD_STASH if mode == ActivationOffload.ALL else 1
        host = layers * pinned(n * kept_per_layer(spec, stream))
        return CheckpointOffload(
            kept_layers=0,
            input=one,
            host=host,
            buffers=0,
            reload=one,
            forward_extra=min(layers, stash + 1) * one,
            stash=stash,
        )
    if unsloth_offloads(spec, setup):
        stored = n * spec.hidden * UNSLOTH_STORE_BYTES
        # step 0 offloads every layer (the last is learnt then), so every slot has grown
        slots = layers * pinned(max(stored, UNSLOTH_CPU_BUFFER_ELEMENTS * UNSLOTH_STORE_BYTES))
        spare = max(UNSLOTH_CPU_BUFFERS - layers, 0) * UNSLOTH_CPU_BUFFER_ELEMENTS * UNSLOTH_STORE_BYTES
        # an fp32 stream is stored as bf16 and cast back into a new fp32 tensor on reload
        return CheckpointOffload(
            kept_layers=1,
            input=one,
            host=slots + spare,
            buffers=UNSLOTH_RELOAD_BUFFERS * alloc(stored),
            reload=one if stream != UNSLOTH_STORE_BYTES else 0,
            forward_extra=(min(layers, 2) - 1) * one,  # the embedding output, beside the last layer's input
            stash=1,
        )
    held = int8_kept(spec, setup)
    mlp_last = alloc(n * int8_held_parts(spec.layers[-1], activation_context(setup))[1]) if held else 0
    return CheckpointOffload(
        kept_layers=layers,
        input=one,
        host=0,
        buffers=0,
        reload=0,
        forward_extra=0,
        held=held,
        held_mlp_last=mlp_last,
    )


def int8_kept(spec: ModelSpec, setup: TrainingSetup) -> tuple[int, ...]:
    """Per layer, what LLM.int8's Linears keep past a non-reentrant checkpoint: their inputs,
    ctx attributes its saved-tensor hooks never see (quantization.int8_held). A reentrant
    checkpoint runs the forward without grad, so no node keeps anything."""
    ctx = activation_context(setup)
    if ctx.quant != ParamKind.INT8 or reentrant(setup):
        return ()
    return tuple(alloc(setup.tokens * int8_held(layer, ctx)) for layer in spec.layers)


def offload_all_resident(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, input_grad: bool) -> int:
    """Per token, what OffloadActivations leaves on the GPU of a layer's saved tensors without
    checkpointing. It offloads every saved tensor of at least 1024 B that is not a parameter,
    but a storage saved again while its first save is still in the forward stash (the last
    OFFLOAD_STASH packs) is kept on the GPU, and from then on every later save of it
    (trl==1.16.0 activation_offloading.py:215-224, dedup by storage pointer and dtype). An
    RMSNorm saves its fp32 input twice (pow, then the mul by rsqrt), and a trained norm's
    output is saved by the weight multiply and again by the next Linear; with trained
    weights o_proj saves attention's output, which attention saved two packs before. So the
    norms' saved tensors (and, full fine-tune, attention's output) stay. [modelled from source]"""
    if spec.norm_kind == "layer" or liger_norms(spec, ctx.setup):
        norms = 0  # native_layer_norm, LigerRMSNorm save their input once: offloaded
    else:
        n_norms = max(spec.norms_per_layer, 1)
        norms = norm_saved(spec, ctx, input_grad) + norm_saved(spec, ctx, True) * (n_norms - 1)
        norms += sum(norm_saved(spec, ctx, True, width=w) for w in layer.attn_norm_dims)
    shared_out = ctx.weights_train and attention_kind(spec, ctx.setup) != Attention.EAGER
    return norms + (2 * spec.q_dim if shared_out else 0)


def offload_note(setup: TrainingSetup) -> list[str]:
    """The estimate's note for an offload mode that needs CUDA (pinned memory, streams)."""
    source = OFFLOAD_SOURCES.get(setup.activation_offload)
    if source is None:
        return []
    return [
        f"--activation-offload {setup.activation_offload.value}: modelled from source, not measured ({source}); "
        "the host column counts its pinned RAM."
    ]


INT8_NOTE = (
    "LLM.int8 (--quant int8): the int8 weights and row scales, the input each 8-bit Linear keeps "
    "and the whole weight it dequantizes in backward rest on bitsandbytes==0.50.2's source and the "
    "CPU trace of its CPU path (docs/cpu-trace.md); the CUDA matmul's working set (the input "
    "quantized to int8, the int32 product) is modelled from source, not measured; the outlier "
    "columns it also keeps (threshold 6.0, as many as the data has) are not counted"
)


def int8_notes(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """What an LLM.int8 estimate rests on, and what non-reentrant checkpointing costs it."""
    if setup.quant != Quant.INT8:
        return []
    held = sum(int8_kept(spec, setup))
    if not held:
        return [INT8_NOTE]
    return [
        INT8_NOTE,
        f"LLM.int8 under non-reentrant checkpointing: each 8-bit Linear keeps its input as an "
        f"attribute of its autograd node (bitsandbytes autograd/_functions.py:186-188), which the "
        f"checkpoint's hooks never see, so every layer still holds them: {held / GiB:.2f} GiB of this "
        f"step's activations. --checkpoint-reentrant (gradient_checkpointing_kwargs: "
        f"{{use_reentrant: true}}) frees them",
    ]
