"""Gradient checkpointing (torch.utils.checkpoint, non-reentrant, as transformers enables
it): what each checkpointed layer keeps, and its forward's working set when nothing is
saved. The recompute's own moments are layer backward points (layer.py)."""
from __future__ import annotations

from vramplan.memory.attention import attention_forward
from vramplan.memory.context import ActivationContext
from vramplan.memory.mlp import ckpt_forward
from vramplan.model_spec import LayerSpec, ModelSpec


def kept_per_layer(spec: ModelSpec, stream: int) -> int:
    """Per token, what a checkpointed layer keeps: its input hidden state."""
    return stream * spec.hidden


def checkpointed_forward(spec: ModelSpec, layer: LayerSpec, ctx: ActivationContext, f: int, gated: bool,
                         residual: int, lora_mlp: int) -> int:
    """Per token, a checkpointed forward (nothing saved) at its widest: the MLP's working
    set, or the attention's with the norm's output (post-norm: the layer's input, which the
    checkpoint holds anyway). [CPU trace]"""
    return max(ckpt_forward(spec, layer, f, gated, residual, lora_mlp),
               attention_forward(spec, layer, ctx, ctx.setup.seq_len) + (residual if layer.pre_norm else 0))
