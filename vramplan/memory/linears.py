"""A group of Linears reading one tensor: what their base weights and their adapters save."""

from __future__ import annotations

from vramplan.memory.context import ActivationContext
from vramplan.memory.dora import dora_saved
from vramplan.memory.lora import lora_saved, lora_targeted
from vramplan.memory.quantization import quant_input_bytes
from vramplan.model_spec import Linear


def linears_saved(
    linears: list[Linear],
    in_dim: int,
    ctx: ActivationContext,
    input_grad: bool,
    input_shared: bool = False,
    from_stream: bool = True,
    mlp_out: bool = False,
) -> int:
    """Saved by a group of Linears reading one tensor of width in_dim, per token; `from_stream`:
    that tensor is the norm's output (q/k/v, gate/up), not the attention's or act*up (`mlp_out`)."""
    saved, shared_saved = 0, False
    for lin in linears:
        if ctx.quant_saves_input or ctx.weights_train:
            # hqq's HQQMatmulNoCacheMul saves x, LLM.int8's MatMul8bitLt keeps it; a trained
            # weight needs x for its grad.
            if ctx.autocast and ctx.quant is None and from_stream:
                saved += 2 * in_dim  # autocast casts the fp32 input once per Linear
            elif ctx.autocast and ctx.quant is None:
                # a bf16 input on the fp32 stream (attention's output, act*up): the cast is a no-op
                # (cached_cast), so the Linear saves that tensor, which SDPA may have saved already
                # [CPU trace: full-mixed, untied, o_proj]
                if not shared_saved and not input_shared:
                    saved += 2 * in_dim
                    shared_saved = True
            elif not shared_saved and not input_shared:
                saved += (quant_input_bytes(ctx, from_stream, mlp_out) if ctx.quant else ctx.stream) * in_dim
                shared_saved = True
        # frozen bf16 / nf4 base: grad_input needs only W, nothing of x is saved [notes 1, 3]
        if lora_targeted(lin, ctx.setup):
            saved += lora_saved(in_dim, ctx, input_grad, x_saved=shared_saved or input_shared)
            saved += dora_saved(lin, ctx) if ctx.setup.dora else 0
            shared_saved = shared_saved or (ctx.adapters_bf16 and not ctx.lora_autocast)
    return saved
