"""Quantized base weights (QLoRA's 4-bit, LLM.int8's 8-bit): their storage and quantization
state, the whole weight dequantized for one matmul, the inputs an 8-bit Linear holds, and the
quantization temporaries of the build."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from vramplan.categories import Category as C
from vramplan.memory.context import ActivationContext, base_output_bytes
from vramplan.memory.lora import first_in_backward, lora_saved, lora_targeted
from vramplan.memory.storage import BLOCK, Phase, alloc
from vramplan.memory.types import (
    ATTENTION_IN_ROLES,
    MLP_IN_ROLES,
    MLP_OUT_ROLES,
    LinearRole,
    Param,
    ParamKind,
    PhaseKind,
)
from vramplan.model_spec import LayerSpec, Linear
from vramplan.setup import Quant

# bitsandbytes 4-bit (functional.quantize_4bit, blocksize 64, compress_statistics=True):
# packed n/2 uint8 + absmax re-quantized to uint8 (n/64) + fp32 absmax per 256 blocks.
NF4_BLOCK, NF4_NESTED_BLOCK = 64, 256
NF4_SMALL_TENSORS = 3  # offset, 16-entry nf4 code, nested 256-entry code: one 512 B block each
# hqq 0.2.x, nbits=4, group_size=64: packed n/2 uint8 + bf16 scale and bf16 zero per group.
HQQ_GROUP = 64
# Quantizing one Linear on the device (verify's build; bytes per weight element beyond what
# the finished 4-bit layer keeps). bitsandbytes quantize_4bit (CUDA kernel): the bf16
# source 2, plus per block of 64 the fp32 absmax and its offset-subtracted copy for the
# nested quantization. hqq Quantizer.quantize (optimize_weights_proximal, fp16 working
# dtype on CUDA): the bf16 source 2 + W.float() 4 + the fp16 copy W_f 2 + eight fp16
# full-size iterates and temporaries at its peak inside shrink_lp_op 16 = 24 (traced on
# hqq's own code run with its CUDA dtype), plus fp32 min, max, scale, zero and fp16
# scale, zero per group of 64.
NF4_QUANTIZE_BYTES, NF4_QUANTIZE_BLOCK_BYTES = 2, 8
HQQ_QUANTIZE_BYTES, HQQ_QUANTIZE_GROUP_BYTES = 24, 4 * 4 + 2 * 2


# LLM.int8 (bitsandbytes==0.50.2 nn/modules.py:737-747 Int8Params._quantize): the weight becomes
# CB, int8 row-major, one byte per element (`self.data = CB`, the same tensor the MatmulLtState
# reads), and SCB, one fp32 absmax per output row. Nothing else stays on the device.
INT8_ROW_STATE = 4


def quantized_store(kind: ParamKind, n: int, rows: int = 0) -> dict[C, int]:
    """Bytes of n elements of a quantized weight of `rows` output rows: the packed (4-bit) or
    int8 weight and its quantization state."""
    if kind == ParamKind.INT8:
        return {C.WEIGHTS: alloc(n), C.QUANT_STATE: alloc(INT8_ROW_STATE * rows)}
    if kind == ParamKind.NF4:
        blocks = -(-n // NF4_BLOCK)
        state = alloc(blocks) + alloc(4 * -(-blocks // NF4_NESTED_BLOCK)) + NF4_SMALL_TENSORS * BLOCK
        return {C.WEIGHTS: alloc(n / 2), C.QUANT_STATE: state}
    groups = -(-n // HQQ_GROUP)
    return {C.WEIGHTS: alloc(n / 2), C.QUANT_STATE: 2 * alloc(2 * groups)}


# bitsandbytes==0.50.2 nn/modules.py:626-637 (Linear4bit.forward): `inp_dtype = x.dtype`, the input
# cast to compute_dtype (bf16), `matmul_4bit(...).to(inp_dtype)`: on the fp32 stream under autocast
# its output is fp32 (the matmul itself, MatMul4Bit / gemm_4bit, runs in bf16 and saves only the
# packed weight: autograd/_functions.py:353-360). peft's `result + lora_B(...) * scaling` adds the
# bf16 adapter output to it and type promotion keeps fp32, so the gated MLP's gate, act(gate) and
# up (and down's input, act*up) are fp32 tensors, saved as such. hqq's HQQLinear
# (hqq==0.2.8.post1 core/quantize.py:880-889) runs torch.matmul under autocast: bf16, as a dense
# Linear's F.linear. The CPU trace runs bitsandbytes' default gemm_4bit (dequantize, then
# F.linear in the input's dtype: backends/default/ops.py:323-342), CUDA its fused kernel or the
# same dequantize + F.linear (backends/cuda/ops.py:919-960): the same output dtype either way.
# [CPU trace: known-gaps-adapters' qlora-nf4-fp32w-mixed, adapters' qlora-nf4-fp32w-mixed-ckpt]
# LLM.int8's output is in its input's dtype too: MatMul8bitLt.forward ends in
# int8_scaled_mm(..., dtype=A.dtype) (bitsandbytes==0.50.2 autograd/_functions.py:162-176), so
# base_output_bytes treats it as bitsandbytes' 4-bit. Its forward keeps the input A itself,
# as a ctx attribute, not through save_for_backward (`ctx.tensors = (CAt, subA, A)`, :186-188;
# CAt is None for a frozen weight, subA is A's outlier columns, few and not modelled). The CPU's
# MatMul8bitFp keeps it the same way (`ctx.A = A`, :268). A ctx attribute is out of reach of
# saved-tensor hooks: non-reentrant checkpointing cannot drop it, so under checkpointing every
# layer still holds its 8-bit Linears' inputs from the forward (int8_held); the recompute's own
# go when it stops (context.quant_saves_input). [CPU trace: qlora-int8, qlora-int8-ckpt]
def quant_input_bytes(ctx: ActivationContext, from_stream: bool, mlp_out: bool = False) -> int:
    """Bytes per element of the input a quantized Linear keeps, x as the Linear got it (hqq's
    HQQMatmulNoCacheMul: `ctx.save_for_backward(x, bias)`, hqq==0.2.8.post1 core/quantize.py:322-334;
    bitsandbytes' MatMul8bitLt, above): the norm's output in the stream's dtype for q/k/v and
    gate/up; bf16 for o (the attention's output); for down, act*up in the dtype of gate/up's
    outputs (bf16 behind hqq, the stream's behind LLM.int8: base_output_bytes).
    [CPU trace: qlora-hqq4-fp32w-mixed, qlora-int8]"""
    if from_stream:
        return ctx.stream
    return base_output_bytes(ctx) if mlp_out else 2


def packed_compute_bytes(numel: int) -> int:
    """A 4-bit weight as FSDP all-gathers it: still packed, two elements per byte."""
    return -(-numel // 2)


def dequantize_transient(n: int, quant: Quant) -> int:
    """A 4-bit Linear's whole weight, dequantized for one matmul. bitsandbytes: the bf16
    weight plus the nested absmax dequantized to fp32. hqq (PyTorch backend,
    Quantizer.dequantize): unpacked into the compute dtype, minus zero, times scale: three
    bf16 copies alive at once. [CPU trace: 2.11 and 6.02 bytes per element]"""
    return sum(dequantize_transient_parts(n, quant))


def dequantize_transient_parts(n: int, quant: Quant) -> list[int]:
    """dequantize_transient's tensors: bitsandbytes the bf16 weight and the fp32 absmax, hqq
    its three bf16 copies."""
    if quant == Quant.NF4:
        return [alloc(2 * n), alloc(n // 8)]
    return [alloc(2 * n)] * 3


def int8_dequantize_parts(lin: Linear, input_bytes: int) -> list[int]:
    """MatMul8bitLt.backward's input grad (autograd/_functions.py:235-238): `CB.to(dtype_A,
    copy=True).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))`, the whole weight in the input's dtype
    and the scaled row absmax, then `grad_output.to(dtype_A) @ CB`."""
    return [alloc(input_bytes * lin.numel), alloc(INT8_ROW_STATE * lin.out_features)]


def int8_forward_parts(lin: Linear, out_bytes: int, with_output: bool = True) -> list[int]:
    """Per token, the wider of MatMul8bitLt.forward's two moments on CUDA (bitsandbytes==0.50.2
    autograd/_functions.py:137-176, backends/cuda/ops.py:171-260): quantizing the input, A.to(fp16),
    its int8 copy CA and the outlier search's |A| and its bool mask (A.abs() >= threshold); then
    the int8 matmul's int32 product, int8_mm_dequant's fp16 output and its cast to A's dtype,
    beside CA; `with_output` False where the caller counts the Linear's output itself. The CPU
    runs MatMul8bitFp instead (dequantize the weight, F.linear): the CPU trace checks where these
    moments sit, with the CPU's tensors (cputrace.cpu_int8_forward_parts), not their CUDA sizes.
    [modelled from source, not measured]"""
    i, o = lin.in_features, lin.out_features
    quantize = [2 * i, i, 2 * i, i]
    matmul = [i, 4 * o, 2 * o, *([out_bytes * o] if with_output else [])]
    return quantize if sum(quantize) > sum(matmul) else matmul


def nf4_quantize_temporaries(n: int) -> tuple[int, int, int]:
    """The temporaries of quantizing one n-element Linear to nf4 on one device, in the order
    verify's build allocates them (build._nf4: the bf16 source, then Params4bit.to ->
    Params4bit._quantize, bitsandbytes 0.50.2 nn/modules.py:381-395): the bf16 source;
    quantize_4bit's fp32 absmax (backends/cuda/ops.py:391, before the packed output at :392);
    the offset-subtracted copy of it handed to the nested quantize_blockwise
    (functional.py:939-940). The copy is freed when that call returns, the absmax at the
    `del _absmax` after it (:941), the source when build._nf4 returns. Their sum is
    NF4_QUANTIZE_BYTES per element plus NF4_QUANTIZE_BLOCK_BYTES per block."""
    blocks = -(-n // NF4_BLOCK)
    half = NF4_QUANTIZE_BLOCK_BYTES // 2
    return alloc(NF4_QUANTIZE_BYTES * n), alloc(half * blocks), alloc(half * blocks)


# Int8Params._quantize on the device (nn/modules.py:742-747): the weight, handed over on the host,
# arrives as an fp16 copy (`.to(device=device, dtype=torch.float16)`); int8_vectorwise_quant
# allocates CB and SCB beside it (backends/cuda/ops.py:220-224, threshold 0 for weights: no mask).
INT8_QUANTIZE_BYTES = 2


def quantize_transient(p: Param, world: int) -> int:
    """Temporaries of quantizing one Linear on the device (NF4_/HQQ_/INT8_QUANTIZE_* above)."""
    n, packed = p.numel, alloc(p.numel / 2)
    if p.kind == ParamKind.INT8:
        return alloc(INT8_QUANTIZE_BYTES * n)
    if p.kind == ParamKind.NF4:  # the packed output exists while the source is still alive
        held = packed if world > 1 else 0
        return alloc(NF4_QUANTIZE_BYTES * n) + alloc(NF4_QUANTIZE_BLOCK_BYTES * -(-n // NF4_BLOCK)) + held
    # hqq packs only after its optimization loop has freed the working copies
    done = packed if world == 1 else 0
    return alloc(HQQ_QUANTIZE_BYTES * n) + alloc(HQQ_QUANTIZE_GROUP_BYTES * -(-n // HQQ_GROUP)) - done


def build_phase(params: list[Param], world: int) -> Phase:
    """QLoRA's build peak: verify quantizes the decoder's Linears one at a time on the
    device before anything else is materialized, so at the largest Linear the device holds
    the 4-bit decoder so far plus that Linear's quantization temporaries. Under FSDP2 each
    packed weight goes back to meta once quantized (its shard is allocated later), and
    only the quantization state, which stays whole on every rank, accumulates."""
    quantized = [p for p in params if p.kind.quantized]
    ph = Phase(PhaseKind.BUILD_QUANTIZE)
    for p in quantized:
        stored = quantized_store(p.kind, p.numel, p.dim0)
        ph.add(C.QUANT_STATE, stored[C.QUANT_STATE])
        if world == 1:
            ph.add(C.WEIGHTS, stored[C.WEIGHTS])
    if quantized:
        ph.add(C.TRANSIENT, quantize_transient(max(quantized, key=lambda p: p.numel), world))
    return ph


def largest_dequantize(params: list[Param], quant: Quant) -> int:
    """The forward's dequantize transient: the largest 4-bit weight, whole."""
    biggest = max((p.numel for p in params if p.kind.quantized), default=0)
    return dequantize_transient(biggest, quant)


def forward_quant_transient(layers: list[LayerSpec], params: list[Param], ctx: ActivationContext, tokens: int) -> int:
    """The forward's widest quantized-matmul temporaries: a 4-bit weight dequantized whole
    (largest_dequantize), or LLM.int8's token-sized working set at its widest Linear without an
    adapter (an adapted one's is a moment of its own, at its place in the layer: layer.py)."""
    quant = ctx.setup.quant
    assert quant is not None
    if quant != Quant.INT8:
        return largest_dequantize(params, quant)
    linears = {
        (l.in_features, l.out_features, l.role): l
        for layer in layers
        for l in layer.linears
        if not lora_targeted(l, ctx.setup)
    }
    return max((sum(int8_forward_list(l, ctx, tokens)) for l in linears.values()), default=0)


def int8_forward_list(lin: Linear, ctx: ActivationContext, tokens: int) -> list[int]:
    """int8_forward_parts for `tokens` tokens, as allocations (the output in A's dtype: the
    stream's, bf16 for o_proj's attention output)."""
    out_bytes = 2 if lin.role == LinearRole.O else ctx.stream
    return [alloc(tokens * x) for x in int8_forward_parts(lin, out_bytes)]


def int8_held(layer: LayerSpec, ctx: ActivationContext) -> int:
    """Per token, the inputs one layer's 8-bit Linears keep as ctx attributes (int8_held_parts)."""
    return sum(int8_held_parts(layer, ctx))


def int8_held_parts(layer: LayerSpec, ctx: ActivationContext) -> tuple[int, int]:
    """Per token, the inputs one layer's 8-bit Linears keep as ctx attributes, one tensor per
    input they read: (the attention's: the norm's output q/k/v share, the attention's output o
    reads; the MLP's: the norm's output gate/up share, act*up down reads). Under checkpointing
    the forward's copies outlive the checkpoint (quant_input_bytes above); 0 for other bases."""
    if ctx.quant != ParamKind.INT8:
        return 0, 0
    roles = {LinearRole(l.role) for l in layer.linears}
    # post-norm (OLMo2): q/k/v read the layer's input itself, which the checkpoint keeps anyway
    reads_norm = roles & set(ATTENTION_IN_ROLES) and layer.pre_norm
    attn = quant_input_bytes(ctx, True) * layer_hidden(layer) if reads_norm else 0
    if LinearRole.O in roles:
        attn += 2 * next(l.in_features for l in layer.linears if l.role == LinearRole.O)
    if layer.experts:
        return attn, 0
    mlp = quant_input_bytes(ctx, True) * layer_hidden(layer) if roles & set(MLP_IN_ROLES) else 0
    downs = [l for l in layer.linears if l.role in MLP_OUT_ROLES]
    if downs:
        mlp += quant_input_bytes(ctx, False, mlp_out=True) * downs[0].in_features
    return attn, mlp


def layer_hidden(layer: LayerSpec) -> int:
    """The width a layer's first Linears read (the residual stream's)."""
    return next(l.in_features for l in layer.linears if l.role in (*ATTENTION_IN_ROLES, *MLP_IN_ROLES))


@dataclass(frozen=True)
class DequantizeBackward:
    """QLoRA: the first 4-bit Linear reached in backward dequantizes its whole weight to
    make its input grad (bnb MatMul4Bit.backward, hqq HQQMatmulNoCacheMul.backward)."""

    numel: int  # its weight elements (0: not QLoRA)
    grads: tuple[int, ...]  # per token: the output grad, its adapter's input grad, its own input grad (bf16)
    freed: int  # per token: what its adapter saved, freed by then (peft's adapter branch runs first)
    parts: tuple[int, ...] = ()  # bytes: the dequantized weight's tensors (dequantize_transient_parts)


def dequantize_backward(layer: LayerSpec, ctx: ActivationContext, residual: int) -> DequantizeBackward:
    if ctx.quant is None:
        return DequantizeBackward(0, (), 0)
    lin = first_in_backward(layer.linears)
    if lin is None:
        return DequantizeBackward(0, (), 0)
    # autograd runs the adapter branch (created after the base's node) first: its input
    # grad is back in bf16 and what it saved is freed when the base dequantizes
    adapted = lora_targeted(lin, ctx.setup)
    grads = (residual, *[2 * lin.in_features] * (2 if adapted else 1))
    if ctx.quant == ParamKind.INT8:
        # no .to(inp_dtype) around MatMul8bitLt: its grads are in its input's dtype, and so is
        # the adapter's once autocast's cast is undone; the int8 input stays held (int8_held)
        a = quant_input_bytes(ctx, False, mlp_out=lin.role in MLP_OUT_ROLES)
        grads = (residual, *[a * lin.in_features] * (2 if adapted else 1))
        freed = lora_saved(lin.in_features, ctx, True, x_saved=ctx.quant_saves_input) if adapted else 0
        return DequantizeBackward(lin.numel, grads, freed, tuple(int8_dequantize_parts(lin, a)))
    if base_output_bytes(ctx) == 4:
        # bnb on an fp32 stream: .to(inp_dtype)'s backward hands MatMul4Bit a bf16 copy of the
        # output grad; the adapter's grad is back in the input's fp32 (autocast's cast undone)
        grads = (residual, 2 * lin.out_features, *[4 * lin.in_features] * adapted, 2 * lin.in_features)
    freed = lora_saved(lin.in_features, ctx, True, x_saved=ctx.quant == ParamKind.HQQ4) if adapted else 0
    quant = cast(Quant, ctx.setup.quant)
    return DequantizeBackward(lin.numel, grads, freed, tuple(dequantize_transient_parts(lin.numel, quant)))
