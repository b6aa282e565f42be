"""4-bit base weights (QLoRA): their packed storage and quantization state, the whole
weight dequantized for one matmul, and the quantization temporaries of the build."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.categories import Category as C
from vramplan.memory.context import ActivationContext
from vramplan.memory.lora import first_in_backward, lora_saved, lora_targeted
from vramplan.memory.storage import BLOCK, Phase, alloc
from vramplan.memory.types import Param, ParamKind, PhaseKind
from vramplan.model_spec import LayerSpec
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


def quantized_store(kind: ParamKind, n: int) -> dict[C, int]:
    """Bytes of n elements of a 4-bit weight: the packed weight and its quantization state."""
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
def base_output_bytes(ctx: ActivationContext) -> int:
    """Bytes per element of a base Linear's output read from the stream (the MLP's gate/up):
    the stream's dtype behind a bitsandbytes 4-bit Linear (fp32 on an fp32 stream under
    autocast), else bf16 (autocast's matmul, or a bf16 step)."""
    return ctx.stream if ctx.quant == ParamKind.NF4 else 2


def hqq_input_bytes(ctx: ActivationContext, from_stream: bool) -> int:
    """Bytes per element of the input hqq's HQQMatmulNoCacheMul saves (core/quantize.py:322-334:
    `ctx.save_for_backward(x, bias)`, x as the Linear got it): the norm's output, in the
    stream's dtype, for q/k/v and gate/up; bf16 for o (the attention's output) and down
    (act*up of hqq's bf16 outputs). [CPU trace: qlora-hqq4-fp32w-mixed]"""
    return ctx.stream if from_stream else 2


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


def quantize_transient(p: Param, world: int) -> int:
    """Temporaries of quantizing one Linear on the device (NF4_/HQQ_QUANTIZE_* above)."""
    n, packed = p.numel, alloc(p.numel / 2)
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
        stored = quantized_store(p.kind, p.numel)
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


@dataclass(frozen=True)
class DequantizeBackward:
    """QLoRA: the first 4-bit Linear reached in backward dequantizes its whole weight to
    make its input grad (bnb MatMul4Bit.backward, hqq HQQMatmulNoCacheMul.backward)."""

    numel: int  # its weight elements (0: not QLoRA)
    grads: tuple[int, ...]  # per token: the output grad, its adapter's input grad, its own input grad (bf16)
    freed: int  # per token: what its adapter saved, freed by then (peft's adapter branch runs first)


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
    if base_output_bytes(ctx) == 4:
        # bnb on an fp32 stream: .to(inp_dtype)'s backward hands MatMul4Bit a bf16 copy of the
        # output grad; the adapter's grad is back in the input's fp32 (autocast's cast undone)
        grads = (residual, 2 * lin.out_features, *[4 * lin.in_features] * adapted, 2 * lin.in_features)
    freed = lora_saved(lin.in_features, ctx, True, x_saved=ctx.quant == ParamKind.HQQ4) if adapted else 0
    return DequantizeBackward(lin.numel, grads, freed)
