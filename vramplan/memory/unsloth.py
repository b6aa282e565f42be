"""Unsloth's fused LoRA decoder layer (unsloth==2026.10.9): its own autograd Functions
replace peft's LoRA Linears (LoRA_QKV, LoRA_W for o_proj, LoRA_MLP) and its Triton RMSNorm
replaces transformers' eager one. What each saves for backward and what its backward
allocates, read from the source (the kernels are CUDA/Triton): modelled from source, not
measured. docs/memory-model.md, "Unsloth's fused LoRA layers", has the lines.

When (unsloth/models/llama.py:5325-5337, FastLlamaModel.patch_peft_model): peft's
lora_dropout == 0 (non-zero dropout also fuses under UNSLOTH_FUSED_LORA_DROPOUT=1, saving the
dropout masks too: not modelled here, peft's rule stays), bias="none", a 16-bit base (not
fp32) and no FSDP1 wrap; per layer (:5341-5419) every one of gate/up/down, q/k/v and o has an
adapter, no base bias, no DoRA magnitude. At call time (kernels/fast_lora.py:188-218, 222)
the autocast dtype must equal the input's (bf16 model under bf16 autocast: yes). vramplan
applies the rule to a layer only when all seven projections fuse (Llama-shaped: separate
q/k/v and gate/up/down, RMSNorm, pre-norm, no q/k norms, no post-MLP norm, no experts).

LoRA A/B: Unsloth's prepare_model_for_kbit_training upcasts them to fp32
(unsloth_zoo/training_utils.py:410-455, the stack's adapter_dtype), and every Function casts
them to the input's dtype (bf16) before the matmuls (fast_lora.py:481-490, 884-893, 1091;
matmul_lora: A.to(dtype)), so the adapter path computes in bf16 on the bf16 input: no fp32
copy of any activation.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.memory.context import ActivationContext
from vramplan.memory.lora import lora_targeted
from vramplan.memory.types import LinearRole
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import Method, ModelDtype, Precision, Stack, TrainingSetup

UNSLOTH_SOURCE = "unsloth==2026.10.9 unsloth/kernels/fast_lora.py, rms_layernorm.py; unsloth/models/llama.py:5325-5419"
UNSLOTH_NOTE = (
    "--stack unsloth: the decoder layers are Unsloth's fused LoRA Functions (LoRA_QKV, LoRA_W, LoRA_MLP) and "
    f"Triton RMSNorm, modelled from source, not measured ({UNSLOTH_SOURCE})."
)

# fast RMSNorm's saved inverse RMS: one fp32 per row (rms_layernorm.py:711 r = empty(n_rows, fp32))
RMS_INV_BYTES = 4

_FUSED = (LinearRole.Q, LinearRole.K, LinearRole.V, LinearRole.O, LinearRole.GATE, LinearRole.UP, LinearRole.DOWN)


def unsloth_applies(setup: TrainingSetup) -> bool:
    """The setup side of patch_peft_model's condition (llama.py:5333-5337): --stack unsloth,
    LoRA/QLoRA without DoRA, lora_dropout 0, a bf16 model (not fp32: float32_base), no FSDP
    or DeepSpeed (not modelled), and no fp16 autocast over the bf16 model (fast_lora.py:171-185:
    an autocast dtype other than the input's falls back to peft)."""
    return (
        setup.stack == Stack.UNSLOTH
        and setup.method in (Method.LORA, Method.QLORA)
        and setup.lora_dropout == 0
        and not setup.dora
        and not setup.sharded
        and setup.deepspeed is None
        and setup.weight_dtype == ModelDtype.BF16
        and setup.precision != Precision.FP16
    )


def unsloth_fused(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup) -> bool:
    """Whether this layer runs Unsloth's three fused Functions (module docstring)."""
    if not unsloth_applies(setup):
        return False
    if layer.experts or layer.attn_norm_dims or layer.post_mlp_norm or not layer.pre_norm:
        return False
    if spec.norm_kind != "rms":
        return False
    by_role = {r: layer.linears_with(r) for r in _FUSED}
    if any(len(lins) != 1 for lins in by_role.values()):
        return False
    lins = [lins[0] for lins in by_role.values()]
    return all(lora_targeted(l, setup) and not l.bias for l in lins)


def unsloth_components(
    spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, input_grad: bool, attention: list[int], o_shared: bool
) -> tuple[list[int], tuple[int, ...]]:
    """Per token, what one fused layer saves, in forward order, with the norms' positions
    (events.layer_components' shape: input norm, QKV, q/k norms, attention, o, other norms,
    the MLP's tensors, down's last):
    - Fast_RMS_Layernorm (rms_layernorm.py:981, UNSLOTH_RMSNORM_SAVE_OUTPUT off by default,
      :925): its input X itself (X.reshape(...).contiguous() is no copy) in the stream dtype,
      and r (one fp32 per row). The input norm's X is the layer's input: under checkpointing
      the checkpoint holds that tensor already (the recompute runs on it: the kept input or
      Unsloth's reload buffer, checkpointing.checkpoint_offload), so only r is the norm's own;
      it saves nothing when neither its input nor its frozen weight needs grad (the first layer).
    - LoRA_QKV (fast_lora.py:845-853): X, the norm's bf16 output, once for q, k and v.
    - attention: SDPA's own saves (attention.attention_saved_parts, as for transformers).
    - LoRA_W (fast_lora.py:1073): X, the attention output reshaped; SDPA's output already is
      that tensor (A.transpose(1, 2).reshape is a view of flash's [b, s, h, d] output) unless eager.
    - LoRA_MLP (fast_lora.py:448): X (2h), e = gate (2f), g = up (2f); down saves nothing apart
      (h = act(e)*g is recomputed in backward), so down's part is 0."""
    h, s = spec.hidden, ctx.stream
    f = layer.linears_with(LinearRole.DOWN)[0].in_features
    norm = s * h + RMS_INV_BYTES
    input_norm = (RMS_INV_BYTES if ctx.setup.gradient_checkpointing else norm) if input_grad else 0
    o_x = 0 if o_shared else 2 * spec.q_dim
    parts = [input_norm, 2 * h, 0, *attention, o_x, norm, 2 * h, 2 * f, 2 * f, 0]
    return parts, (0, 2, 4 + len(attention))


@dataclass(frozen=True)
class FusedLoraPoints:
    """Per token, the tensors of a fused LoRA layer's widest moments, oldest first (Unsloth's,
    here; axolotl's kernels, memory/lora_kernels.py)."""

    mlp_bwd: tuple[int, ...]  # LoRA_MLP.backward: dY and DW (then h, df, de written in place)
    mlp_fwd: tuple[int, ...]  # LoRA_MLP.forward's end, everything saved: h = act(e)*g and its output i
    ckpt_fwd: tuple[int, ...]  # the same forward saving nothing (checkpointing's first pass)
    quant_numel: int  # the widest weight dequantized in LoRA_MLP.backward (up's / gate's)
    quant_bwd: tuple[int, ...] | None = None  # the tensors beside that weight; None: mlp_bwd's


def unsloth_points(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext) -> FusedLoraPoints:
    """LoRA_MLP, the widest Function of a Llama layer (backward: fast_lora.py:458-600):
    - DW = matmul_lora(dY, downW, ...): a new [N, f] in dY's dtype (bf16; the dequantized
      downW sits in the global scratch buffer, utils.py:777-801); swiglu_DWf_DW_dfg_kernel
      writes h, df, de into DW, e, g in place (:522-523); the LoRA grads are [r x in] only;
      dX = matmul(df, upW.t(), out=X) overwrites the saved X (:565, ctx.inplace), up's and
      gate's weights dequantized one at a time into fresh tensors (:563, :569).
      Widest: the saved X, e, g + dY (the layer's output grad) + DW + one dequantized weight.
    - forward (:413-420): e, g, then h = swiglu(e, g) (a new [N, f]), then i (a new [N, h])
      while e, g, X are saved. Under checkpointing's no-grad first pass the same tensors are
      locals, with the norm's output and the residual stream after attention."""
    h, s = spec.hidden, ctx.stream
    f = layer.linears_with(LinearRole.DOWN)[0].in_features
    up = layer.linears_with(LinearRole.UP)[0]
    return FusedLoraPoints(
        mlp_bwd=(s * h, 2 * f),
        mlp_fwd=(2 * f, 2 * h),
        ckpt_fwd=(s * h, 2 * h, 2 * f, 2 * f, 2 * f, 2 * h),
        quant_numel=up.numel if ctx.quant is not None else 0,
    )
