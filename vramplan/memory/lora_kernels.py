"""axolotl's fused LoRA kernels (--lora-kernels; axolotl==0.19.0 kernels/lora.py, applied by
monkeypatch/lora_kernels.py): three autograd Functions replace peft's LoRA Linears in a decoder
layer, LoRA_QKV (q, k, v), LoRA_O (o_proj) and LoRA_MLP (gate, up, down with a Triton SwiGLU
or GeGLU), while transformers' own RMSNorms and attention stay. What each saves for backward
and what its backward allocates, read from the source (Triton kernels, CUDA only): modelled
from source, not measured. docs/memory-model.md, "axolotl's LoRA kernels", has the lines.

When: axolotl turns them on for every LoRA/QLoRA config that sets none of the three keys
(utils/schemas/config.py:1974-2085, check_auto_enable_lora_kernels: not for 8-bit LoRA, RL,
trust_remote_code or multi-GPU FSDP1), the --stack axolotl bundle's rule. Per layer
(monkeypatch/lora_kernels.py:540-655) QKV is patched only when q, k and v all carry an adapter,
O when o_proj does, the MLP when gate, up and down do. vramplan applies the rule to a layer
whose seven projections all carry one (separate q/k/v and gate/up/down, RMSNorm before
attention and MLP, no post-MLP norm, no experts); q/k norms (Qwen3) and biases (Qwen2) are
allowed: the bias is added into the matmul's output (matmul_lora), q/k norms run after
LoRA_QKV in the model's attention. Any other layer keeps peft's rules.

Differences from Unsloth's Functions (memory/unsloth.py), which they derive from: the norms are
transformers' (no Triton RMSNorm), LoRA dropout is supported (one dropout output per group,
X_drop, shared by q/k/v and by gate/up, applied outside the Function so autograd keeps its bool
mask), and the MLP backward writes its input grad into a new tensor, not into the saved input.
Each Function also saves its adapters cast to the input's dtype (A.to(dtype), B.to(dtype):
a bf16 copy of fp32 adapters, r x (in + out) per projection: 2.5 MiB per layer for Llama 3.1
8B at r16): per-layer
bytes, not per token, left out.
"""

from __future__ import annotations

from vramplan.memory.compile import compiled_norm_saved
from vramplan.memory.context import ActivationContext
from vramplan.memory.lora import lora_targeted
from vramplan.memory.norms import norm_saved
from vramplan.memory.types import LinearRole
from vramplan.memory.unsloth import FusedLoraPoints
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import Method, TrainingSetup

KERNELS_SOURCE = "axolotl==0.19.0 axolotl/kernels/lora.py, swiglu.py; monkeypatch/lora_kernels.py:458-655"
KERNELS_NOTE = (
    "--lora-kernels: the decoder layers run axolotl's fused LoRA Functions (LoRA_QKV, LoRA_O, LoRA_MLP), "
    f"modelled from source, not measured ({KERNELS_SOURCE})."
)
MASK_BYTES = 1  # native dropout's saved bool mask, one byte per element

_FUSED = (LinearRole.Q, LinearRole.K, LinearRole.V, LinearRole.O, LinearRole.GATE, LinearRole.UP, LinearRole.DOWN)


def kernels_fused(spec: ModelSpec, layer: LayerSpec, setup: TrainingSetup) -> bool:
    """Whether this layer runs axolotl's three fused Functions (module docstring)."""
    if not setup.lora_kernels or setup.method not in (Method.LORA, Method.QLORA):
        return False
    if layer.experts or layer.post_mlp_norm or not layer.pre_norm or spec.norm_kind != "rms":
        return False
    by_role = {r: layer.linears_with(r) for r in _FUSED}
    if any(len(lins) != 1 for lins in by_role.values()):
        return False
    return all(lora_targeted(lins[0], setup) for lins in by_role.values())


def _dropout(setup: TrainingSetup, width: int, input_grad: bool) -> int:
    """Per token, one group's dropout: X_drop (bf16, saved by the Function) and, where the
    input needs grad (autograd records the dropout then), its bool mask; none at p = 0
    (peft's Identity: _apply_dropout returns None, kernels/lora.py:118-127)."""
    if setup.lora_dropout == 0:
        return 0
    return 2 * width + (MASK_BYTES * width if input_grad else 0)


def kernels_components(
    spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, input_grad: bool, attention: list[int], o_shared: bool
) -> tuple[list[int], tuple[int, ...]]:
    """Per token, what one fused layer saves, in forward order, with the norms' positions
    (events.layer_components' shape: input norm, QKV, q/k norms, attention, o, other norms,
    the MLP's tensors, down's last):
    - the input and post-attention RMSNorms: transformers' own (norms.norm_saved);
    - LoRA_QKV (lora.py:960-980): X, the norm's bf16 output, once for q, k and v, and X_drop;
    - q/k norms (Qwen3): as transformers runs them on LoRA_QKV's outputs;
    - attention: SDPA's own saves (attention.attention_saved_parts);
    - LoRA_O (lora.py:1680-1690): X, the attention output (SDPA's saved output unless eager),
      and X_drop;
    - LoRA_MLP (lora.py:454-468): X (2h), X_drop, gate (2f) and up (2f); down saves nothing
      apart: h = act(gate)*up is recomputed in backward, so down's part is 0."""
    setup, h = ctx.setup, spec.hidden
    f = layer.linears_with(LinearRole.DOWN)[0].in_features
    n_norms = max(spec.norms_per_layer, 1)
    input_norm = compiled_norm_saved(spec, ctx, norm_saved(spec, ctx, input_grad))
    other_norms = compiled_norm_saved(spec, ctx, norm_saved(spec, ctx, True)) * (n_norms - 1)
    qk_norms = sum(norm_saved(spec, ctx, True, width=w) for w in layer.attn_norm_dims)
    qkv = 2 * h + _dropout(setup, h, input_grad)
    o_x = (0 if o_shared else 2 * spec.q_dim) + _dropout(setup, spec.q_dim, True)
    parts = [input_norm, qkv, qk_norms, *attention, o_x, other_norms, 2 * h + _dropout(setup, h, True), 2 * f, 2 * f, 0]
    return parts, (0, 2, 4 + len(attention))


def kernels_points(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext) -> FusedLoraPoints:
    """LoRA_MLP, the widest Function of a Llama layer (backward: lora.py:480-700):
    - grad_down = matmul_lora(dY, downW.t(), ...): a new [N, f] (bf16); swiglu_backward writes
      h, df, de into grad_down, gate and up in place (swiglu.py:159-178);
    - dX = matmul(grad_up, upW_deq.t()): a new [N, h] (not written into the saved X, :640-643),
      while up's weight, dequantized into a fresh tensor (QLoRA), lives; then gate's, one at a
      time; with dropout dX_drop = zeros_like(X_drop) (:648-656) after both are freed.
      Widest: the saved tensors + dY (the layer's output grad) + grad_down + dX (+ dX_drop);
      the 4-bit moment the same without dX_drop, with one dequantized weight.
    - forward (:387-426): gate, up, then hidden = act(gate, up) (a new [N, f]) and the output
      (a new [N, h]) while X, X_drop, gate and up are saved. Under checkpointing's no-grad first
      pass the same tensors are locals, with the norm's output, its dropout and the stream."""
    setup, h, s = ctx.setup, spec.hidden, ctx.stream
    f = layer.linears_with(LinearRole.DOWN)[0].in_features
    up = layer.linears_with(LinearRole.UP)[0]
    drop = 2 * h if setup.lora_dropout else 0
    at_dx = (s * h, 2 * f, 2 * h)
    return FusedLoraPoints(
        mlp_bwd=at_dx + ((drop,) if drop else ()),
        mlp_fwd=(2 * f, 2 * h),
        ckpt_fwd=(s * h, 2 * h, *((drop,) if drop else ()), 2 * f, 2 * f, 2 * f, 2 * h),
        quant_numel=up.numel if ctx.quant is not None else 0,
        quant_bwd=at_dx,
    )
