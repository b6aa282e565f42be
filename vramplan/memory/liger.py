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
- LigerSiLUMulFunction / LigerGELUMulFunction (ops/swiglu.py:240-307, ops/geglu.py:133-146) save
  gate's and up's outputs (a, b) and return act(a)*b as a new tensor; the backward recomputes
  act(a) and writes the two grads into a and b in place. So act(gate) is never saved (one f-wide
  tensor fewer than transformers' MLP) and the elementwise backward allocates nothing beside the
  incoming grad. Phi-3's fused gate_up (LigerPhi3SwiGLUMLP, transformers/swiglu.py:118-137) is
  chunked: ensure_contiguous copies gate and up (the saved a, b; the fused output dies after the
  forward) and the chunk's backward concatenates the two grads into a new [N, 2f].
- RoPE (liger_rotary_pos_emb, ops/rope.py) rotates q and k in place: it saves cos and sin as
  transformers' does, and its temporaries are attention-wide, never a layer's widest moment.
  Not modelled separately.
- LigerExperts (transformers v5's fused MoE experts of Mixtral and Qwen3-MoE, ops/fused_moe.py:
  LigerFusedMoEFunction, :160-434): the forward makes pre_act (the routed rows' gate_up output,
  [N·k, 2I]), act(gate)·up ([N·k, I]) and the routed outputs ([N·k, H]) and saves only the block's
  input x and pre_act (with the routing weights and small index tensors); its backward allocates
  d_pre_act, the weighted act, the expanded input grad ([N·k, H]) and the input grad ([N, H]), and
  ddown_proj = zeros_like(down_proj) and dgate_up_proj = zeros_like(gate_up_proj): both expert
  weights' grads, whole, whether the experts train or not (a LoRA step too).
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import LigerLayers, TrainingSetup

LIGER_SOURCE = (
    "liger-kernel==0.8.5 liger_kernel/ops/rms_norm.py:449-676, ops/swiglu.py:159-307, ops/geglu.py:87-146, "
    "ops/fused_moe.py:160-434, transformers/monkey_patch.py"
)
LIGER_NOTE = (
    "--liger-layers: Liger's RMSNorm, SwiGLU/GeGLU and MoE kernels in the decoder layers, modelled from source, "
    f"not measured ({LIGER_SOURCE})."
)
RSTD_BYTES = 4  # rms_norm_forward's RSTD: one fp32 per row (casting modes llama and gemma, :465-466)


@dataclass(frozen=True)
class LigerPatch:
    """What apply_liger_kernel_to_<model_type>(model=...) patches on a model instance."""

    norm_in_place: bool  # its RMSNorms' backward writes dX into dY (False: zeros_like(dY))
    glu: bool  # the dense MLPs run LigerSiLUMulFunction / LigerGELUMulFunction
    qk_norms: bool  # q_norm and k_norm are LigerRMSNorms too
    experts: bool = False  # transformers v5's fused MoE experts are LigerExperts (swiglu=True)


# liger-kernel==0.8.5 transformers/monkey_patch.py, one apply_liger_kernel_to_* per model type
LIGER_PATCHES: dict[str, LigerPatch] = {
    "llama": LigerPatch(True, True, False),  # :259-324
    "mistral": LigerPatch(True, True, False),  # :723-786
    "mixtral": LigerPatch(True, False, False, experts=True),  # :834-906 (LigerExperts under transformers v5)
    "gemma": LigerPatch(True, True, False),  # :1073-1141 (LigerGEGLUMLP, casting_mode gemma)
    "gemma2": LigerPatch(False, True, False),  # :1142-1215 (in_place=False)
    "gemma3_text": LigerPatch(False, True, True),  # :1216-1302 (in_place=False, q/k norms)
    "gemma3": LigerPatch(False, True, True),  # :1303-1394 (the text model through gemma3_text)
    "qwen2": LigerPatch(True, True, False),  # :1750-1816
    "qwen3": LigerPatch(True, True, True),  # :1817-1875
    "qwen3_moe": LigerPatch(True, False, True, experts=True),  # :1876-1942 (LigerExperts)
    "phi3": LigerPatch(True, True, False),  # :2371-2434 (LigerPhi3SwiGLUMLP on the fused gate_up)
}


def liger_patch(spec: ModelSpec, setup: TrainingSetup) -> LigerPatch | None:
    """Liger's patch for this model when --liger-layers asks for any kernel, else None."""
    if setup.liger_layers == LigerLayers.NONE:
        return None
    return LIGER_PATCHES.get(spec.model_type)


def liger_norms(spec: ModelSpec, setup: TrainingSetup, qk: bool = False) -> bool:
    """Whether this model's RMSNorms (its q/k norms when `qk`) are LigerRMSNorms."""
    patch = liger_patch(spec, setup)
    if patch is None or not setup.liger_layers.norms or spec.norm_kind == "layer":
        return False
    return patch.qk_norms or not qk


def liger_glu(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup) -> bool:
    """Whether this layer's MLP is Liger's gated MLP (dense layers of a patched model type)."""
    patch = liger_patch(spec, setup)
    return patch is not None and patch.glu and setup.liger_layers.glu and not layer.experts


def liger_experts(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup) -> bool:
    """Whether this MoE layer's experts are LigerExperts (LigerFusedMoEFunction)."""
    patch = liger_patch(spec, setup)
    return patch is not None and patch.experts and setup.liger_layers.glu and layer.experts is not None


def liger_experts_saved(layer: LayerSpec, router_saves_input: bool, h: int) -> int:
    """Per token, what LigerFusedMoEFunction saves (module docstring): pre_act, k rows of 2I in
    the input's dtype (bf16), and the block's input x unless the trained router saved that tensor
    already; the routing weights and indices are a few bytes per route, left out."""
    assert layer.experts is not None
    e = layer.experts
    return e.top_k * 2 * 2 * e.intermediate + (0 if router_saves_input else 2 * h)


def liger_experts_grads(layer: LayerSpec, h: int) -> tuple[int, ...]:
    """Per token, LigerFusedMoEFunction.backward's tensors at its widest (its end, every local
    alive until it returns), beside the incoming grad: d_pre_act, the weighted act, the expanded
    input grad, the input grad, all bf16."""
    assert layer.experts is not None
    e = layer.experts
    return (e.top_k * 2 * 2 * e.intermediate, e.top_k * 2 * e.intermediate, e.top_k * 2 * h, 2 * h)


def liger_experts_weight_grads(layer: LayerSpec, weight_bytes: int) -> tuple[int, ...]:
    """Bytes: ddown_proj and dgate_up_proj, zeros_like each whole expert weight in its dtype,
    made by the backward whether the experts train or not."""
    assert layer.experts is not None
    e = layer.experts
    down = e.num_experts * e.hidden * e.intermediate * weight_bytes
    return (down, 2 * down)


def liger_experts_forward_end(layer: LayerSpec, h: int, residual: int) -> int:
    """Per token, at the end of LigerFusedMoEFunction's forward in a recompute: act(gate)·up and
    the routed outputs (k rows each), the aggregated output, the residual stream after attention
    and the layer's output grad in flight (pre_act and x are saved, counted with the layer)."""
    assert layer.experts is not None
    e = layer.experts
    return e.top_k * 2 * e.intermediate + e.top_k * 2 * h + 2 * h + 2 * residual


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
    if setup.liger_layers.glu and not patch.experts and any(l.experts for l in spec.layers):
        notes.append("--liger-layers: this model's MoE experts keep transformers' rule (no Liger experts kernel)")
    return notes
