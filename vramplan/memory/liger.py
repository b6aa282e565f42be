"""Liger's layer kernels (--liger-layers; liger-kernel==0.8.5): LigerRMSNorm on every RMSNorm
and LigerSwiGLUMLP / LigerGEGLUMLP on the dense MLPs, patched over transformers' modules by
apply_liger_kernel_to_<model_type> (transformers/monkey_patch.py), which the HF Trainer's
use_liger_kernel (transformers 5.25.0 integrations/liger.py), LLaMA-Factory's
enable_liger_kernel (llamafactory 0.9.5 model/model_utils/liger_kernel.py) and axolotl's
LigerPlugin (axolotl 0.19.0 integrations/liger/plugin.py:196-229: liger_rms_norm,
liger_glu_activation) call. The kernels are Triton (CUDA only): what each saves and allocates is
read from the source, modelled from source, not measured. docs/memory-model.md, "Liger's layer
kernels", has the lines.

- LigerRMSNormFunction (ops/rms_norm.py:653-676) saves its input X itself and RSTD, one fp32 per
  row, where transformers' eager RMSNorm saves an fp32 copy of X (and, with a trained weight, the
  normalized output): 4h (+2h) -> s*h + 4 per token. Its backward (rms_norm_backward, :526-558)
  writes dX into the incoming dY (in_place=True, the default) or into zeros_like(dY) (Gemma 2
  and 3 patch in_place=False), and sums the weight's grad in an fp32 [SMs, h] buffer (a few MiB,
  left out); transformers' fp32 backward holds 20 bytes per element (norms.RMS_NORM_BACKWARD).
- LigerSiLUMulFunction / LigerGELUMulFunction (ops/swiglu.py:240-300, ops/geglu.py:133-146) save
  gate's and up's outputs (a, b) and return act(a)*b as a new tensor; the backward recomputes
  act(a) and writes the two grads into a and b in place. So act(gate) is never saved (one f-wide
  tensor fewer than transformers' MLP) and the elementwise backward allocates nothing beside the
  incoming grad. Phi-3's fused gate_up (LigerPhi3SwiGLUMLP, transformers/swiglu.py:118-137) is
  chunked: ensure_contiguous copies gate and up (the saved a, b; the fused output dies after the
  forward) and the chunk's backward concatenates the two grads into a new [N, 2f].
- RoPE (liger_rotary_pos_emb, ops/rope.py) rotates q and k in place: it saves cos and sin as
  transformers' does, and its temporaries are attention-wide, never a layer's widest moment.
  Not modelled separately.
- MoE experts (Mixtral, Qwen3-MoE: LigerExperts) keep transformers' expert rule; their norms are
  Liger's.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import LigerLayers, TrainingSetup

LIGER_SOURCE = (
    "liger-kernel==0.8.5 liger_kernel/ops/rms_norm.py:449-676, ops/swiglu.py:159-300, ops/geglu.py:87-146, "
    "transformers/monkey_patch.py"
)
LIGER_NOTE = (
    "--liger-layers: Liger's RMSNorm and SwiGLU/GeGLU kernels in the decoder layers, modelled from source, "
    f"not measured ({LIGER_SOURCE})."
)
RSTD_BYTES = 4  # rms_norm_forward's RSTD: one fp32 per row (casting modes llama and gemma, :465-466)


@dataclass(frozen=True)
class LigerPatch:
    """What apply_liger_kernel_to_<model_type>(model=...) patches on a model instance."""

    norm_in_place: bool  # its RMSNorms' backward writes dX into dY (False: zeros_like(dY))
    glu: bool  # the dense MLPs run LigerSiLUMulFunction / LigerGELUMulFunction
    qk_norms: bool  # q_norm and k_norm are LigerRMSNorms too


# liger-kernel==0.8.5 transformers/monkey_patch.py, one apply_liger_kernel_to_* per model type
LIGER_PATCHES: dict[str, LigerPatch] = {
    "llama": LigerPatch(True, True, False),  # :259-323
    "mistral": LigerPatch(True, True, False),  # :723-790
    "mixtral": LigerPatch(True, False, False),  # :834-905 (experts: LigerExperts, not modelled)
    "gemma": LigerPatch(True, True, False),  # :1073-1140 (LigerGEGLUMLP, casting_mode gemma)
    "gemma2": LigerPatch(False, True, False),  # :1142-1214 (in_place=False)
    "gemma3_text": LigerPatch(False, True, True),  # :1216-1301 (in_place=False, q/k norms)
    "gemma3": LigerPatch(False, True, True),  # :1303-1390 (the text model through gemma3_text)
    "qwen2": LigerPatch(True, True, False),  # :1750-1815
    "qwen3": LigerPatch(True, True, True),  # :1817-1874
    "qwen3_moe": LigerPatch(True, False, True),  # :1876-1950 (experts: not modelled)
    "phi3": LigerPatch(True, True, False),  # :2371-2440 (LigerPhi3SwiGLUMLP on the fused gate_up)
}


def liger_patch(spec: ModelSpec, setup: TrainingSetup) -> LigerPatch | None:
    """Liger's patch for this model when --liger-layers asks for any kernel, else None."""
    if setup.liger_layers == LigerLayers.NONE:
        return None
    return LIGER_PATCHES.get(spec.model_type)


def liger_norms(spec: ModelSpec, setup: TrainingSetup, qk: bool = False) -> bool:
    """Whether this model's RMSNorms (its q/k norms when `qk`) are LigerRMSNorms."""
    patch = liger_patch(spec, setup)
    ok = patch is not None and setup.liger_layers.norms and spec.norm_kind != "layer"
    return ok and (patch.qk_norms if qk and patch else True)


def liger_glu(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup) -> bool:
    """Whether this layer's MLP is Liger's gated MLP (dense layers of a patched model type)."""
    patch = liger_patch(spec, setup)
    return patch is not None and patch.glu and setup.liger_layers.glu and not layer.experts


def liger_norm_saved(width: int, input_bytes: int, rows: int = 1) -> int:
    """Per token, what one LigerRMSNorm saves: its input X (`input_bytes` per element) and RSTD,
    one fp32 per row (`rows` per token: q/k norms normalize each head)."""
    return input_bytes * width + RSTD_BYTES * rows


def liger_norm_backward(spec: ModelSpec, setup: TrainingSetup, stream: int) -> int:
    """Per token, a LigerRMSNorm's backward beyond its saved tensors and the incoming grad: dX
    written into dY (nothing), or zeros_like(dY) for the patches with in_place=False."""
    patch = liger_patch(spec, setup)
    return 0 if patch is None or patch.norm_in_place else stream * spec.hidden


def liger_final_norm_forward(spec: ModelSpec, stream: int, forward_locals: int) -> int:
    """Per token, the final LigerRMSNorm's forward: its output Y in the input's dtype (not
    transformers' fp32 product) and the forward's locals."""
    return stream * spec.hidden + forward_locals


def liger_glu_grads(b: int, f: int, fused: bool) -> tuple[int, ...]:
    """Per token, the gated MLP's elementwise backward beyond the layer's output grad: the
    incoming grad of act(gate)*up (`b` bytes, f wide); gate's and up's grads are written over
    the saved a and b. Phi-3's chunk then concatenates them into a new [N, 2f]."""
    return (b * f, 2 * b * f) if fused else (b * f,)


def liger_notes(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """The estimate's note for --liger-layers: modelled from source, or what is left as
    transformers' layers for this model."""
    if setup.liger_layers == LigerLayers.NONE:
        return []
    patch = liger_patch(spec, setup)
    if patch is None:
        return [
            f"--liger-layers: Liger has no patch for model type {spec.model_type!r} modelled here; "
            "its layers are estimated as transformers' own"
        ]
    notes = [LIGER_NOTE]
    if setup.liger_layers.glu and any(l.experts for l in spec.layers):
        notes.append("--liger-layers: the MoE experts keep transformers' rule (Liger's LigerExperts not modelled)")
    return notes
