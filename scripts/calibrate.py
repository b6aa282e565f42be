#!/usr/bin/env python
"""Measurement batch: run the calibration cases, each in a fresh process, appending
MeasuredCase JSON lines to OUT (docs/verify.md).

Resumable: cases whose name is already in OUT are skipped, and no case is started once
--budget-s is nearly spent, so calling it repeatedly (about 9 minutes per call on an
H100) works through the list. --batch i/n runs only every n-th case (i = 1..n).

    python scripts/calibrate.py --out cal.jsonl                # as much as fits the budget
    python scripts/calibrate.py --out cal.jsonl --batch 2/4    # one quarter of the list
    python scripts/calibrate.py --dry-run                      # validate + estimate, no GPU
    python scripts/calibrate.py --out cal.jsonl --core         # every technique first (a 15-minute lease)

The published calibration (tests/data/h100_dev.jsonl) was measured with the library
versions pinned in constraints-verify.txt: install with
`pip install -e ".[verify]" -c constraints-verify.txt` to reproduce it.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

L1B, L8B, L70B, QW05, QW7, MIX, PHI, GEM = (
    "llama-3.2-1b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "qwen2.5-0.5b",
    "qwen2.5-7b",
    "mixtral-8x7b",
    "phi-3-mini",
    "gemma-2-2b",
)
L2_70B, MIS = "llama-2-70b", "mistral-7b"
QW3_8B, QW3_MOE, GEM3 = "qwen3-8b", "qwen3-30b-a3b", "gemma-3-1b"


def case(
    name: str,
    model: str,
    layers: int | None = None,
    steps: int = 3,
    depths: list[int] | None = None,
    seconds: int = 60,
    memory_limit_mb: int | None = None,
    **setup,
) -> dict:
    """depths: measure these truncated depths and write an extrapolated full-depth line too.
    memory_limit_mb: cap the caching allocator (set_per_process_memory_fraction) at this much."""
    return dict(
        name=name,
        model=model,
        layers=layers,
        steps=steps,
        depths=depths,
        seconds=seconds,
        memory_limit_mb=memory_limit_mb,
        setup=setup,
    )


# Issue 18 item 4: the out-of-memory edge. Each ladder steps the sequence (or the micro-batch)
# across the edge the allocator replay predicts for an allocator capped at 24 GiB
# (torch.cuda.set_per_process_memory_fraction(24 GiB / device memory): a 24 GB card without
# its CUDA context), so one run records, per rung, whether the step ran and the
# max_memory_reserved it needed. The verdict is the replay of verify's loop (loss_only_loop: the
# logits are dropped before backward). Measured on the H200 (tests/data/h200_verify.jsonl): every
# rung up to 10240 tokens ran, so the 8B and 3B ladders go on to 12288; the Qwen2.5-7B rungs at
# 7680-8192 ran, as the replay says since every checkpointed layer's forward working set is in
# its events (before, it said out-of-memory), so that ladder goes on to 9728, where the replay
# now puts its edge (9216 runs, 9728 does not). `--dry-run --capped` prints the replay's verdict
# per rung; docs/allocator.md has the table.
CAP_MIB = 24 * 1024


def capped(prefix: str, model: str, ladder: str, values: list[int], seconds: int = 60, **setup) -> list[dict]:
    """One capped case per rung of `ladder` (seq_len or batch_size)."""
    tag = "s" if ladder == "seq_len" else "b"
    return [
        case(f"{prefix}_{tag}{v}_cap24g", model, seconds=seconds, memory_limit_mb=CAP_MIB, **setup, **{ladder: v})
        for v in values
    ]


CAPPED_CASES = [
    *capped(
        "l8b_qlora_nf4_ckpt_b1",
        L8B,
        "seq_len",
        [6144, 8192, 9216, 10240, 11264, 12288],
        90,
        method="qlora",
        gradient_checkpointing=True,
        batch_size=1,
    ),
    *capped(
        "l3b_lora16_ckpt_b1",
        "llama-3.2-3b",
        "seq_len",
        [8192, 9216, 10240, 11264, 12288],
        method="lora",
        gradient_checkpointing=True,
        batch_size=1,
    ),
    *capped(
        "qw7_qlora_nf4_ckpt_b1",
        QW7,
        "seq_len",
        [4096, 6144, 7168, 7680, 8192, 8704, 9216, 9728],
        90,
        method="qlora",
        gradient_checkpointing=True,
        batch_size=1,
    ),
    *capped(
        "l3b_lora16_ckpt_s4096",
        "llama-3.2-3b",
        "batch_size",
        [1, 2, 3],
        method="lora",
        gradient_checkpointing=True,
        seq_len=4096,
    ),
]


CASES = [
    # full fine-tune, bf16 and mixed, checkpointing off/on, 8-bit AdamW
    case("l1b_full_bf16_b1s1024", L1B, method="full", batch_size=1, seq_len=1024),
    case("l1b_full_mixed_b2s1024", L1B, method="full", precision="mixed", batch_size=2, seq_len=1024),
    case("l1b_full_bf16_ckpt_b4s2048", L1B, method="full", gradient_checkpointing=True, batch_size=4, seq_len=2048),
    case("l1b_full_adamw8bit_b1s2048", L1B, method="full", optim="adamw_bnb_8bit", batch_size=1, seq_len=2048),
    case("l1b_full_fused_b1s2048", L1B, method="full", optim="adamw_torch_fused", batch_size=1, seq_len=2048),
    # LoRA
    case("l1b_lora16_b4s2048", L1B, method="lora", batch_size=4, seq_len=2048),
    case("l1b_lora16_ckpt_b4s2048", L1B, method="lora", gradient_checkpointing=True, batch_size=4, seq_len=2048),
    case(
        "l1b_lora64_attn_mixed_b2s2048",
        L1B,
        method="lora",
        lora_r=64,
        lora_targets="attention",
        precision="mixed",
        batch_size=2,
        seq_len=2048,
    ),
    case(
        "l8b_lora16_ckpt_b1s4096",
        L8B,
        method="lora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=4096,
        seconds=90,
    ),
    case("gemma2b_lora16_ckpt_b1s2048", GEM, method="lora", gradient_checkpointing=True, batch_size=1, seq_len=2048),
    # QLoRA nf4 and hqq4
    case("l1b_qlora_nf4_r64_b2s1024", L1B, method="qlora", lora_r=64, batch_size=2, seq_len=1024),
    case(
        "l8b_qlora_nf4_r16_ckpt_b1s2048",
        L8B,
        method="qlora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=60,
    ),
    case(
        "l8b_qlora_hqq4_r16_ckpt_b1s2048",
        L8B,
        method="qlora",
        quant="hqq4",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "phi3_qlora_nf4_r16_ckpt_b2s2048", PHI, method="qlora", gradient_checkpointing=True, batch_size=2, seq_len=2048
    ),
    # LLM.int8 (--quant int8), modelled from bitsandbytes' source and traced on its CPU path: the
    # CUDA MatMul8bitLt's int8 working set; every Linear's input kept past a non-reentrant
    # checkpoint (3.25 GiB on 8B at 2048 tokens) and freed by a reentrant one; the kbit path
    case("l1b_qlora_int8_r16_b2s1024", L1B, method="qlora", quant="int8", batch_size=2, seq_len=1024),
    case(
        "l8b_qlora_int8_r16_ckpt_b1s2048",
        L8B,
        method="qlora",
        quant="int8",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l8b_qlora_int8_r16_ckpt_reentrant_b1s2048",
        L8B,
        method="qlora",
        quant="int8",
        gradient_checkpointing=True,
        checkpoint_reentrant=True,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    # gradient accumulation: the last micro-batch holds every earlier grad (memory/accumulation.py);
    # peft modules_to_save: trainable copies of embed_tokens and lm_head (parameters.saved_module_copies)
    case("l1b_full_bf16_b1s1024_ga4", L1B, method="full", batch_size=1, seq_len=1024, gradient_accumulation=4),
    case(
        "l8b_lora16_modules_to_save_ckpt_b1s2048_ga2",
        L8B,
        method="lora",
        modules_to_save="embed_tokens,lm_head",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        gradient_accumulation=2,
        seconds=90,
    ),
    # freeze tuning as LLaMA-Factory runs it (memory/freeze.py): the last 2 layers in fp32 over a
    # bf16 model under autocast, its checkpoint function; and fp32 masters of an untied model under
    # autocast (the embedding never cast, o_proj reading SDPA's saved output: autocast.cast_cache)
    case(
        "l8b_freeze2_fp32layers_mixed_ckpt_b1s2048_ga2",
        L8B,
        method="full",
        train_layers=2,
        precision="mixed",
        model_dtype="bf16",
        train_layers_dtype="fp32",
        gradient_checkpointing=True,
        checkpoint_reentrant=True,
        batch_size=1,
        seq_len=2048,
        gradient_accumulation=2,
        seconds=90,
    ),
    case(
        "phi3_full_mixed_ckpt_b1s1024",
        PHI,
        method="full",
        precision="mixed",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=1024,
        seconds=90,
    ),
    case(
        "l8b_qlora_int8_r16_kbit_mixed_ckpt_b1s2048",
        L8B,
        method="qlora",
        quant="int8",
        kbit_prep=True,
        precision="mixed",
        model_dtype="bf16",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    # h100_dev.jsonl's cases whose max_memory_reserved the allocator replay misses by 3-3.3 GB
    # (docs/allocator.md, "What the dev cases leave unexplained"), again in a fresh process, each
    # with its segment list (segments_mib): which request sizes made the reserved memory
    case("phi3_lora16_ckpt_b1s2048", PHI, method="lora", gradient_checkpointing=True, batch_size=1, seq_len=2048),
    # the same step with eager attention: no SDPA backend choice or workspace, the candidate
    # docs/allocator.md names ("What the file itself says against a leftover")
    case(
        "phi3_lora16_ckpt_eager_b1s2048",
        PHI,
        method="lora",
        gradient_checkpointing=True,
        attention="eager",
        batch_size=1,
        seq_len=2048,
    ),
    case("qw05_lora16_ckpt_b8s1024", QW05, method="lora", gradient_checkpointing=True, batch_size=8, seq_len=1024),
    case("qw05_full_bf16_b4s1024", QW05, method="full", batch_size=4, seq_len=1024),
    # GaLore, 8-bit, layer-wise
    case("l1b_galore128_b1s1024", L1B, method="galore", batch_size=1, seq_len=1024),
    case("l1b_galore8bit128_b1s1024", L1B, method="galore", optim="galore_adamw_8bit", batch_size=1, seq_len=1024),
    case(
        "l1b_galore_layerwise128_ckpt_b1s2048",
        L1B,
        method="galore",
        optim="galore_adamw_layerwise",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
    ),
    case(
        "l1b_galore8bit_layerwise128_ckpt_b1s1024",
        L1B,
        method="galore",
        optim="galore_adamw_8bit_layerwise",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=1024,
    ),
    case(
        "l8b_galore8bit_layerwise128_ckpt_b1s1024",
        L8B,
        method="galore",
        optim="galore_adamw_8bit_layerwise",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=1024,
        steps=2,
        seconds=150,
    ),
    # FSDP2 rank 0 of N, simulated, with and without CPU offload
    case(
        "l1b_fsdp2_full_mixed_ckpt_b2s2048",
        L1B,
        method="full",
        precision="mixed",
        gradient_checkpointing=True,
        fsdp=2,
        batch_size=2,
        seq_len=2048,
    ),
    case(
        "l8b_fsdp4_full_bf16_ckpt_b1s2048",
        L8B,
        method="full",
        gradient_checkpointing=True,
        fsdp=4,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l8b_fsdp8_full_mixed_ckpt_b1s2048",
        L8B,
        method="full",
        precision="mixed",
        gradient_checkpointing=True,
        fsdp=8,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l8b_fsdp4_full_mixed_ckpt_offload_b1s2048",
        L8B,
        method="full",
        precision="mixed",
        gradient_checkpointing=True,
        fsdp=4,
        cpu_offload=True,
        batch_size=1,
        seq_len=2048,
        steps=2,
        seconds=180,
    ),
    case(
        "l8b_fsdp2_lora16_ckpt_b1s2048",
        L8B,
        method="lora",
        gradient_checkpointing=True,
        fsdp=2,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "qw7_fsdp8_full_mixed_ckpt_offload_b1s4096",
        QW7,
        method="full",
        precision="mixed",
        gradient_checkpointing=True,
        fsdp=8,
        cpu_offload=True,
        batch_size=1,
        seq_len=4096,
        steps=2,
        seconds=180,
    ),
    # long context
    case("l1b_lora16_ckpt_b1s16384", L1B, method="lora", gradient_checkpointing=True, batch_size=1, seq_len=16384),
    case(
        "l8b_qlora_nf4_ckpt_b1s16384",
        L8B,
        method="qlora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=16384,
        seconds=90,
    ),
    case(
        "qw05_full_bf16_ckpt_b1s32768",
        QW05,
        method="full",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=32768,
        seconds=90,
    ),
    # sliding-window SDPA past the window (Mistral-7B, window 4096): an explicit mask per
    # layer, k and v repeated to every head
    case("mistral_L4_lora16_b1s8192", MIS, layers=4, method="lora", batch_size=1, seq_len=8192, seconds=60),
    case(
        "mistral_lora16_ckpt_b1s8192",
        MIS,
        method="lora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=8192,
        seconds=90,
    ),
    # MoE (truncated mixtral: 3-D experts, router)
    case("mixtral_L2_full_bf16_b1s1024", MIX, layers=2, method="full", batch_size=1, seq_len=1024, seconds=90),
    case(
        "mixtral_L4_qlora_nf4_ckpt_b1s2048",
        MIX,
        layers=4,
        method="qlora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    # QLoRA under FSDP2 (quantization state whole per rank), and Answer.AI's 70B recipe for two
    # 24 GB cards measured as rank 0 of 2 at full depth (the README's headline configuration)
    case(
        "l8b_fsdp4_qlora_nf4_r16_ckpt_b1s2048",
        L8B,
        method="qlora",
        gradient_checkpointing=True,
        fsdp=4,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    # torch<=2.11's FSDP2 cannot shard a uint8 packed weight (_fsdp_param.py _init_sharded_param makes an
    # nn.Parameter that requires grad; 2.13 passes param.requires_grad): bf16 storage, as fsdp_qlora runs it
    case(
        "l8b_fsdp4_qlora_nf4bf16_r16_ckpt_b1s2048",
        L8B,
        method="qlora",
        quant_storage="bf16",
        gradient_checkpointing=True,
        fsdp=4,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l2-70b_fsdp2_qlora_nf4_r64_ckpt_offload_b2s2048",
        L2_70B,
        method="qlora",
        lora_r=64,
        gradient_checkpointing=True,
        fsdp=2,
        cpu_offload=True,
        batch_size=2,
        seq_len=2048,
        steps=2,
        seconds=300,
    ),
    # a short step: hqq's dequantization for an input gradient (6 bytes per weight element) is the peak
    case(
        "l8b_qlora_hqq4_r16_ckpt_b1s256",
        L8B,
        method="qlora",
        quant="hqq4",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=256,
        seconds=90,
    ),
    # 70B QLoRA on one GPU
    case(
        "l70b_qlora_nf4_r16_ckpt_b1s2048",
        L70B,
        method="qlora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        steps=2,
        seconds=240,
    ),
    # truncated-depth extrapolation checked against the full-depth run of the same config
    case(
        "l1b_lora16_ckpt_b2s2048_xp4-8",
        L1B,
        depths=[4, 8],
        method="lora",
        gradient_checkpointing=True,
        batch_size=2,
        seq_len=2048,
        seconds=90,
    ),
    case("l1b_lora16_ckpt_b2s2048", L1B, method="lora", gradient_checkpointing=True, batch_size=2, seq_len=2048),
    case(
        "l8b_full_bf16_ckpt_b1s2048_xp4-8",
        L8B,
        depths=[4, 8],
        method="full",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l8b_full_bf16_ckpt_b1s2048",
        L8B,
        method="full",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    # q/k norms inside the attention (Qwen3, Qwen3-MoE); Gemma 3: sliding layers next to full
    # ones under SDPA, one kv head, past its 512-token window
    case(
        "qw3-8b_qlora_nf4_r16_ckpt_b1s2048",
        QW3_8B,
        method="qlora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=60,
    ),
    case("qw3-8b_lora16_b1s2048", QW3_8B, method="lora", batch_size=1, seq_len=2048, seconds=60),
    case(
        "qw3moe_L4_lora16_ckpt_b1s2048",
        QW3_MOE,
        layers=4,
        method="lora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=60,
    ),
    case("gemma3-1b_lora16_b1s2048", GEM3, method="lora", batch_size=1, seq_len=2048),
    case(
        "gemma3-1b_full_bf16_ckpt_b2s4096", GEM3, method="full", gradient_checkpointing=True, batch_size=2, seq_len=4096
    ),
    # the loss over the vocabulary (memory/loss.py). Liger, CCE and Unsloth are Triton kernels, modelled
    # from source and never measured: `pip install liger-kernel==0.8.5 cut-cross-entropy==25.1.1
    # unsloth-zoo==2026.10.9 trl==1.16.0 accelerate` (and `torchtune==0.6.1 --no-deps`) first.
    # The bar: Qwen2.5-7B QLoRA at 8k tokens with Liger (modelled loss term 0.18 GiB)
    case(
        "qw7_qlora_nf4_ckpt_b1s8192_liger",
        QW7,
        method="qlora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=8192,
        loss="liger",
        seconds=90,
    ),
    # lm_head trains: Liger's grad_weight in the weight's dtype, held from forward to backward
    case("l1b_full_bf16_b1s4096_liger", L1B, method="full", batch_size=1, seq_len=4096, loss="liger"),
    case(
        "l8b_lora16_ckpt_b1s4096_cce",
        L8B,
        method="lora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=4096,
        loss="cce",
        seconds=90,
    ),
    case("l1b_full_bf16_b1s4096_cce", L1B, method="full", batch_size=1, seq_len=4096, loss="cce"),
    # Liger's layer kernels (memory/liger.py, --liger-layers), Triton, modelled from source: a full
    # fine-tune without checkpointing (every layer's norms and MLP saved: 7.6 GiB fewer for 8B at 4k
    # tokens), a QLoRA step, and Gemma 3's in_place=False norms with q/k norms and GeGLU
    case(
        "l1b_full_bf16_b1s4096_ligerall",
        L1B,
        method="full",
        batch_size=1,
        seq_len=4096,
        loss="liger",
        liger_layers="all",
    ),
    case("l8b_qlora_nf4_b1s2048_ligerall", L8B, method="qlora", batch_size=1, seq_len=2048, liger_layers="all"),
    case("gemma3-1b_lora16_b1s2048_ligerall", GEM3, method="lora", batch_size=1, seq_len=2048, liger_layers="all"),
    # LigerExperts on a truncated Mixtral: both whole expert weights' grads in a LoRA backward
    case(
        "mixtral_L4_lora16_b1s2048_ligerall",
        MIX,
        layers=4,
        method="lora",
        batch_size=1,
        seq_len=2048,
        liger_layers="all",
        seconds=90,
    ),
    # TRL 1.16's DPOTrainer (memory/preference.py, --objective dpo; CPU-traced, never on a GPU): a LoRA
    # step on TRL's defaults (fp32 weights, autocast, checkpointing: the reference forward through the
    # disabled adapters), a QLoRA one, and a full fine-tune with its frozen fp32 reference copy
    case(
        "l8b_dpo_lora16_ckpt_b1s2048_trl",
        L8B,
        stack="trl",
        objective="dpo",
        method="lora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l8b_dpo_qlora_nf4_ckpt_b2s1024_trl",
        L8B,
        stack="trl",
        objective="dpo",
        method="qlora",
        gradient_checkpointing=True,
        batch_size=2,
        seq_len=1024,
    ),
    case("l1b_dpo_full_b1s2048_trl", L1B, stack="trl", objective="dpo", method="full", batch_size=1, seq_len=2048),
    # TRL 1.16's GRPOTrainer (memory/grpo.py, --objective grpo; CPU-traced, never on a GPU): model.generate
    # over 16 completions of a LoRA policy on TRL's defaults (fp32 cache outside autocast) with the
    # training step; a full fine-tune's generation under autocast (bf16 values, fp32 keys, the weight
    # copies) with beta > 0 (a frozen copy and its scoring); a QLoRA one with 32 rows generated
    case(
        "l8b_grpo_lora16_ckpt_b4s1536_trl",
        L8B,
        stack="trl",
        objective="grpo",
        method="lora",
        gradient_checkpointing=True,
        batch_size=4,
        seq_len=1536,
        completion_len=1024,
        steps_per_generation=4,
        seconds=120,
    ),
    case(
        "l1b_grpo_full_beta_b4s1024_trl",
        L1B,
        stack="trl",
        objective="grpo",
        method="full",
        gradient_checkpointing=True,
        batch_size=4,
        seq_len=1024,
        completion_len=768,
        beta=0.04,
        seconds=90,
    ),
    case(
        "l8b_grpo_qlora_nf4_ckpt_b4s1024_trl",
        L8B,
        stack="trl",
        objective="grpo",
        method="qlora",
        gradient_checkpointing=True,
        batch_size=4,
        seq_len=1024,
        completion_len=512,
        steps_per_generation=8,
        seconds=120,
    ),
    # TRL 1.16's KTOTrainer (memory/kto.py, --objective kto; CPU-traced, never on a GPU): an 8B LoRA over
    # 4 examples with the KL rows (the policy's and the disabled-adapter reference's no-grad forwards over
    # them), a 1B full fine-tune with its frozen copy
    case(
        "l8b_kto_lora16_ckpt_b4s1024_trl",
        L8B,
        stack="trl",
        objective="kto",
        method="lora",
        gradient_checkpointing=True,
        batch_size=4,
        seq_len=1024,
        seconds=90,
    ),
    case("l1b_kto_full_b4s1024_trl", L1B, stack="trl", objective="kto", method="full", batch_size=4, seq_len=1024),
    # axolotl's rl: kto (trl 1.9.0, the logits and the metrics' copies of them; VRAMPLAN_TRL19 on the device)
    case(
        "l1b_kto_qlora_nf4_ckpt_b2s1024_axolotl",
        L1B,
        stack="axolotl",
        objective="kto",
        method="qlora",
        gradient_checkpointing=True,
        batch_size=2,
        seq_len=1024,
    ),
    # axolotl's rl: orpo (trl 1.9.0's experimental ORPOTrainer: the logits, the NLL's copy and log-softmax)
    case(
        "l1b_orpo_qlora_nf4_ckpt_b2s2048_axolotl",
        L1B,
        stack="axolotl",
        objective="orpo",
        method="qlora",
        gradient_checkpointing=True,
        batch_size=2,
        seq_len=2048,
    ),
    # axolotl's `rl: grpo`, trl 1.9.0's GRPOTrainer (memory/grpo_logits.py; CPU-traced, never on a GPU):
    # the log-probs from the model's fp32 logits over the completion, 4 x 1025 x 128256 x 4 bytes, with
    # the entropy's copy; axolotl's bf16 LoRA generating 16 rows outside autocast (peft's fp32 adapter
    # path over the bf16 stream); trl 1.9.0 must be the installed trl (scripts/device_wheels.sh)
    case(
        "l8b_grpo_lora16_ckpt_b4s1536_axolotl",
        L8B,
        stack="axolotl",
        objective="grpo",
        method="lora",
        gradient_checkpointing=True,
        batch_size=4,
        seq_len=1536,
        completion_len=1024,
        steps_per_generation=4,
        seconds=120,
    ),
    case(
        "l1b_grpo_full_b4s1024_axolotl",
        L1B,
        stack="axolotl",
        objective="grpo",
        method="full",
        gradient_checkpointing=True,
        batch_size=4,
        seq_len=1024,
        completion_len=768,
        seconds=90,
    ),
    # TRL 1.16's RewardTrainer (memory/reward.py, --objective reward; CPU-traced, never on a GPU): an 8B
    # sequence classifier (no lm_head, a one-output score head) under LoRA on TRL's defaults, a 1B full
    # fine-tune (its embedding tied, no lm_head to train), and axolotl's bf16 LoRA without checkpointing
    # (the forward peaks in the last layer's down projection: peft's fp32 copy of the bf16 stream)
    case(
        "l8b_reward_lora16_ckpt_b2s2048_trl",
        L8B,
        stack="trl",
        objective="reward",
        method="lora",
        gradient_checkpointing=True,
        batch_size=2,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l1b_reward_full_b2s2048_trl", L1B, stack="trl", objective="reward", method="full", batch_size=2, seq_len=2048
    ),
    case(
        "l8b_reward_lora16_b1s1024_axolotl",
        L8B,
        stack="axolotl",
        objective="reward",
        method="lora",
        lora_kernels=False,
        batch_size=1,
        seq_len=1024,
        seconds=90,
    ),
    # Unsloth's fused linear CE (unsloth_zoo 2026.10.9 fused_linear.py): 8191 kept rows >= 4096 and a
    # frozen head, so the tiled forward (one 4096 x 16384 fp32 tile) on any card
    case(
        "l8b_lora16_ckpt_b1s8192_unsloth",
        L8B,
        method="lora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=8192,
        loss="unsloth",
        seconds=90,
    ),
    # Unsloth's fused LoRA layers (memory/unsloth.py: LoRA_QKV, LoRA_W, LoRA_MLP, Triton RMSNorm),
    # modelled from source, never measured; the published check is Unsloth's README context table
    # (tests/data/published/unsloth_context.jsonl). Not runnable yet: verify builds transformers +
    # peft layers and refuses Unsloth's checkpoint offload (verify/build.py build_step); `--dry-run`
    # prints the estimate, and a runner through FastLanguageModel (unsloth==2026.10.9) would measure it
    case(
        "l8b_qlora32_ckpt_b1s16384_unsloth_layers",
        L8B,
        method="qlora",
        lora_r=32,
        lora_targets="all-linear",
        stack="unsloth",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=16384,
        seconds=120,
    ),
    # traced on the CPU (group "loss"); on CUDA TRL's Triton folds and the CUDA log-softmax run
    case(
        "l8b_lora16_ckpt_b1s4096_trl",
        L8B,
        method="lora",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=4096,
        loss="trl-chunked-nll",
        seconds=90,
    ),
    case("l1b_lora16_b2s2048_chunked", L1B, method="lora", batch_size=2, seq_len=2048, loss="chunked"),
    # --compile (torchtune's compile_loss; traced on the CPU, group "loss"): on CUDA, inductor's
    # Triton kernels, cuBLAS's bmm on the expanded lm_head weight (no copy, unlike the CPU's) and,
    # under full fine-tuning, the out-of-place sum of lm_head's 8 chunk weight grads; the 8B rows
    # are torchtune's README table (tests/data/published/torchtune_readme.jsonl)
    case(
        "l1b_lora16_b2s2048_chunked_compile",
        L1B,
        method="lora",
        batch_size=2,
        seq_len=2048,
        loss="chunked",
        compile=True,
    ),
    case(
        "l1b_full_bf16_b2s2048_chunked_compile",
        L1B,
        method="full",
        batch_size=2,
        seq_len=2048,
        loss="chunked",
        compile=True,
    ),
    # the torchtune "Optimization flags" row "+ Chunked Cross Entropy" (tests/data/published/
    # torchtune_flags.jsonl): a full fine-tune's compiled decoder layers without checkpointing
    # (memory/compile.py, CPU-traced group "compile"), on a transformers Llama as verify builds it
    case(
        "l3b_full_bf16_b2s4096_chunked_compile",
        "llama-3.2-3b",
        method="full",
        optim="adamw_torch_fused",
        batch_size=2,
        seq_len=4096,
        loss="chunked",
        compile=True,
        seconds=150,
    ),
    # optimizers whose CUDA step is not the CPU's: optimi's StableAdamW runs Triton kernels there
    # (modelled: no step temporaries); LOMO updates inside fused_backward (CPU-traced)
    case("l1b_full_bf16_b1s2048_stable_adamw", L1B, method="full", optim="stable_adamw", batch_size=1, seq_len=2048),
    case("l1b_full_bf16_b1s2048_lomo", L1B, method="full", optim="lomo", batch_size=1, seq_len=2048),
    # Adam-mini over bf16: its mean over grad*grad reduces in-kernel on CUDA (the CPU trace makes an
    # fp32 copy, so the bf16 step is modelled from source); APOLLO at LLaMA-Factory's rank 16
    case("l1b_full_bf16_b1s2048_adam_mini", L1B, method="full", optim="adam_mini", batch_size=1, seq_len=2048),
    case("l1b_full_bf16_b1s2048_apollo_r16", L1B, method="full", optim="apollo_adamw", apollo_rank=16, seq_len=2048),
    # axolotl's full fine-tune with sdpa: embed_tokens, lm_head and the norms fp32 over bf16 weights
    # under autocast (precision.upcast_roots); checkpointed, a layer's recompute over the fp32 stream
    # (checkpointing.recompute_input_alias) and fp32 masters' recomputed weight copies
    case("l1b_full_axolotl_sdpa_fp32_roots_b1s2048", L1B, method="full", stack="axolotl", batch_size=1, seq_len=2048),
    case(
        "l1b_full_axolotl_sdpa_fp32_roots_ckpt_b4s4096",
        L1B,
        method="full",
        stack="axolotl",
        gradient_checkpointing=True,
        batch_size=4,
        seq_len=4096,
    ),
    case(
        "l1b_full_mixed_ckpt_b4s4096",
        L1B,
        method="full",
        precision="mixed",
        gradient_checkpointing=True,
        batch_size=4,
        seq_len=4096,
    ),
    case(
        "l8b_qlora8_ckpt_b2s2048_torchtune_compile",
        L8B,
        method="qlora",
        lora_r=8,
        lora_targets="all-linear",
        gradient_checkpointing=True,
        batch_size=2,
        seq_len=2048,
        stack="torchtune",
        compile=True,
        seconds=120,
    ),
    case(
        "l1b_lora16_b2s2048_fp32out_keep",
        L1B,
        method="lora",
        batch_size=2,
        seq_len=2048,
        fp32_outputs=True,
        keep_logits=True,
    ),
    # modelled from source, not measured (docs/memory-model.md, "Activation offload, reentrant
    # checkpointing, attention and packing"): transformers' checkpoint offload (pinned memory
    # needs CUDA), FlashAttention-2 (needs flash-attn on the GPU machine; padded and varlen),
    # and SDPA's packed-sequence mask on CUDA's efficient kernel (pad_bias<16> at S % 16 != 0)
    case(
        "l8b_lora16_ckpt_offload_b1s8192",
        L8B,
        method="lora",
        gradient_checkpointing=True,
        activation_offload="checkpoints",
        batch_size=1,
        seq_len=8192,
        seconds=90,
    ),
    case(
        "l8b_lora16_ckpt_reentrant_b1s4096",
        L8B,
        method="lora",
        gradient_checkpointing=True,
        checkpoint_reentrant=True,
        batch_size=1,
        seq_len=4096,
        seconds=90,
    ),
    case("l1b_lora16_flash_b4s2048", L1B, method="lora", attention="flash", batch_size=4, seq_len=2048),
    case(
        "mistral_L4_lora16_flash_b1s8192",
        MIS,
        layers=4,
        method="lora",
        attention="flash",
        batch_size=1,
        seq_len=8192,
        seconds=60,
    ),
    case(
        "l1b_lora16_flash_padfree_b4s2048",
        L1B,
        method="lora",
        attention="flash",
        packing="padding-free",
        batch_size=4,
        seq_len=2048,
    ),
    case("l1b_lora16_sdpa_posids_b2s2040", L1B, method="lora", packing="position-ids", batch_size=2, seq_len=2040),
    # issue 13 adapters and precision, modelled from source where the CPU trace cannot run them:
    # fp16 autocast + GradScaler (fp32 masters; LoRA on an fp16 base), autocast over an fp32 stream
    # after prepare_model_for_kbit_training, DoRA's weight norm in the checkpointed recompute
    case("l1b_full_fp16_b1s1024", L1B, method="full", precision="fp16", batch_size=1, seq_len=1024),
    case("l1b_lora16_fp16_b2s2048", L1B, method="lora", precision="fp16", batch_size=2, seq_len=2048),
    case(
        "l8b_qlora_nf4_r16_kbit_mixed_ckpt_b1s2048",
        L8B,
        method="qlora",
        kbit_prep=True,
        precision="mixed",
        model_dtype="bf16",
        gradient_checkpointing=True,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l1b_lora16_bf16w_mixed_b2s2048",
        L1B,
        method="lora",
        precision="mixed",
        model_dtype="bf16",
        batch_size=2,
        seq_len=2048,
    ),
    case(
        "l1b_dora16_ckpt_b2s2048",
        L1B,
        method="lora",
        dora=True,
        gradient_checkpointing=True,
        batch_size=2,
        seq_len=2048,
    ),
    # optimizers modelled from source where the CPU cannot check them (docs/memory-model.md,
    # "Optimizers"): paged bitsandbytes states (in NVML, not in max_memory_allocated), torchao's
    # compiled low-bit step, and an optimizer stepped in backward on CUDA
    case("l1b_full_paged8bit_b1s1024", L1B, method="full", optim="paged_adamw_8bit", batch_size=1, seq_len=1024),
    case("l1b_full_paged32bit_b1s1024", L1B, method="full", optim="paged_adamw_32bit", batch_size=1, seq_len=1024),
    case(
        "l1b_full_torchao8bit_b1s1024",
        L1B,
        method="full",
        optim="adamw_torch_8bit",
        batch_size=1,
        seq_len=1024,
        seconds=120,
    ),
    case(
        "l1b_full_torchao4bit_b1s1024",
        L1B,
        method="full",
        optim="adamw_torch_4bit",
        batch_size=1,
        seq_len=1024,
        seconds=120,
    ),
    case("l1b_full_inbwd_b1s1024", L1B, method="full", optimizer_in_backward=True, batch_size=1, seq_len=1024),
    # the engines (issue 15), rank 0 of a fake group on one GPU as the FSDP2 cases: DDP's
    # buckets, FSDP1's flat units (CPU-traced; the GPU's second in-flight forward unit is not)
    case(
        "l8b_ddp2_lora16_ckpt_b1s2048",
        L8B,
        method="lora",
        gradient_checkpointing=True,
        data_parallel=2,
        batch_size=1,
        seq_len=2048,
        seconds=60,
    ),
    case("l1b_ddp2_full_bf16_b1s2048", L1B, method="full", data_parallel=2, batch_size=1, seq_len=2048),
    case(
        "l8b_fsdp1_2_full_bf16_ckpt_b1s2048",
        L8B,
        method="full",
        gradient_checkpointing=True,
        fsdp=2,
        fsdp_version=1,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l8b_fsdp1_4_lora16_b1s2048", L8B, method="lora", fsdp=4, fsdp_version=1, batch_size=1, seq_len=2048, seconds=90
    ),
]

CASES += CAPPED_CASES

# DeepSpeed ZeRO, modelled from source, not measured (vramplan/memory/deepspeed.py). verify's
# builder runs it with deepspeed.initialize (HF's "auto" bucket sizes: build.ds_config): these are
# the cases to measure (`--deepspeed` selects them), each under the `deepspeed` launcher on as
# many GPUs as its data-parallel world; without deepspeed each is refused in one line.
DEEPSPEED_CASES = [
    case(
        "l3b_zero2_offload_full_bf16_ckpt_b1s2048",
        "llama-3.2-3b",
        method="full",
        gradient_checkpointing=True,
        deepspeed="zero2",
        offload_optimizer=True,
        batch_size=1,
        seq_len=2048,
        seconds=180,
    ),
    case(
        "l8b_zero2_lora16_ckpt_b1s2048",
        L8B,
        method="lora",
        gradient_checkpointing=True,
        deepspeed="zero2",
        data_parallel=2,
        batch_size=1,
        seq_len=2048,
        seconds=90,
    ),
    case(
        "l8b_zero3_full_bf16_ckpt_b1s2048",
        L8B,
        method="full",
        gradient_checkpointing=True,
        deepspeed="zero3",
        data_parallel=4,
        batch_size=1,
        seq_len=2048,
        seconds=120,
    ),
    case(
        "l8b_zero3_offload_full_bf16_ckpt_b1s2048",
        L8B,
        method="full",
        gradient_checkpointing=True,
        deepspeed="zero3",
        offload_optimizer=True,
        offload_params=True,
        data_parallel=4,
        batch_size=1,
        seq_len=2048,
        seconds=240,
    ),
]

# A device task is lent about 15 minutes, start-up included: --core runs first the cases
# that between them touch every technique issue 3 names (full bf16/mixed, LoRA, QLoRA nf4
# and hqq4, 8-bit AdamW, GaLore 8-bit layer-wise, checkpointing on/off, FSDP 2/4/8 with and
# without offload, 16k tokens, MoE, a truncated-depth extrapolation next to its full-depth
# run, the 8B QLoRA of the 60 s bar, the architectures added since), the 70B last.
CORE = [
    "l1b_full_bf16_b1s1024",
    "l1b_full_mixed_b2s1024",
    "l1b_lora16_b4s2048",
    "l8b_qlora_nf4_r16_ckpt_b1s2048",
    "l1b_qlora_nf4_r64_b2s1024",
    "l1b_full_adamw8bit_b1s2048",
    "l1b_galore_layerwise128_ckpt_b1s2048",
    "l1b_galore8bit_layerwise128_ckpt_b1s1024",
    "l1b_fsdp2_full_mixed_ckpt_b2s2048",
    "l8b_fsdp4_qlora_nf4_r16_ckpt_b1s2048",
    "l8b_fsdp4_qlora_nf4bf16_r16_ckpt_b1s2048",
    "l8b_fsdp8_full_mixed_ckpt_b1s2048",
    "l8b_fsdp4_full_mixed_ckpt_offload_b1s2048",
    "l1b_lora16_ckpt_b1s16384",
    "mixtral_L2_full_bf16_b1s1024",
    "l1b_lora16_ckpt_b2s2048",
    "l1b_lora16_ckpt_b2s2048_xp4-8",
    "l8b_qlora_hqq4_r16_ckpt_b1s2048",
    "l8b_qlora_int8_r16_ckpt_b1s2048",  # LLM.int8: the inputs a non-reentrant checkpoint keeps
    "qw3-8b_qlora_nf4_r16_ckpt_b1s2048",
    "gemma3-1b_lora16_b1s2048",
    "qw3moe_L4_lora16_ckpt_b1s2048",
    "l70b_qlora_nf4_r16_ckpt_b1s2048",
]


# Cases whose allocator event history (--alloc-history, vramplan/verify/history.py) tells the
# allocator model's misses apart from the events' (scripts/history_replay.py): each is where the
# replay and the card disagreed on the first lease (tests/data/h200_verify.jsonl).
HISTORY_CASES = {
    # the replay runs out at step 1's fp32 logits (4.67 GB, 4.6 GB stranded); the card ran
    "qw7_qlora_nf4_ckpt_b1_s7680_cap24g": "capped edge two rungs off",
    "qw7_qlora_nf4_ckpt_b1_s8192_cap24g": "capped edge two rungs off",
    # the replay ends with 5 x 4008 MiB logits segments, the card with 4 (AdamW's states carved
    # from a cached logits segment in the replay): reserved +17.7%
    "l1b_full_bf16_ckpt_b4s2048": "reserved +17.7%",
    # allocated -7.2% at the last layer's recompute under eager attention, cause not found
    "phi3_lora16_ckpt_eager_b1s2048": "allocated -7.2%",
}
# Measured on the first lease but changed since, so measured again first: verify's LLM.int8
# weights (build.INT8_OUTPUT_STD) and FSDP2's rules (memory/fsdp.py).
REMEASURE = {
    "l8b_qlora_int8_r16_ckpt_b1s2048",
    "l8b_fsdp8_full_mixed_ckpt_b1s2048",
    "l8b_fsdp4_full_mixed_ckpt_offload_b1s2048",
}


def load_cases(path: str | None) -> list[dict]:
    if not path:
        return CASES
    out = []
    for c in json.loads(Path(path).read_text()):
        c = dict(c)
        out.append(case(**{k: v for k, v in c.items() if k != "setup"}, **c.get("setup", {})))
    return out


def select(
    cases: list[dict], batch: str | None, only: list[str] | None, core: bool = False, capped: bool = False
) -> list[dict]:
    if capped:
        cases = [c for c in cases if c.get("memory_limit_mb")]
    if core:
        by_name = {c["name"]: c for c in cases}
        cases = [by_name[n] for n in CORE if n in by_name]
    if only:
        unknown = set(only) - {c["name"] for c in cases}
        if unknown:
            raise SystemExit(f"unknown case(s): {', '.join(sorted(unknown))}")
        cases = [c for c in cases if c["name"] in only]
    if batch:
        i, n = (int(x) for x in batch.split("/"))
        if not 1 <= i <= n:
            raise SystemExit(f"--batch {batch}: need 1 <= i <= n")
        cases = cases[i - 1 :: n]
    return cases


def done_names(out: Path) -> set[str]:
    if not out.exists():
        return set()
    names = set()
    for line in out.read_text().splitlines():
        if line.strip():
            d = json.loads(line)
            names.add(d.get("case", d["name"]))
    return names


def _setup(c: dict):
    from vramplan.estimate import make_setup

    return make_setup(**c["setup"])


def dry_run(cases: list[dict]) -> int:
    """Validate every case and print its estimate on an H100 (no torch run)."""
    from vramplan.estimate import estimate_config
    from vramplan.units import GiB

    for c in cases:
        s = _setup(c)
        gpus = f"{max(s.fsdp, s.data_parallel, 1)}xh100-80gb"
        # the step verify runs: its loop keeps only the loss (TrainingSetup.loss_only_loop)
        est = estimate_config(c["model"], gpus, num_layers=c["layers"], **c["setup"], loss_only_loop=True)
        xp = f" extrapolate from {c['depths']}" if c["depths"] else ""
        print(
            f"{c['name']:48s} {s.describe():48s} est peak {est.per_gpu.peak_allocated_bytes / GiB:6.2f} GiB "
            f"{'fits' if est.fits else 'DOES NOT FIT'}{xp}{_capped_verdict(c)}"
        )
    print(f"{len(cases)} cases")
    return 0


def _capped_verdict(c: dict) -> str:
    """A capped case: what the allocator replay predicts under its limit (reserved.under_memory_limit)."""
    if not c.get("memory_limit_mb"):
        return ""
    from vramplan.model_loader import load_model_spec
    from vramplan.reserved import under_memory_limit
    from vramplan.units import GiB, MiB

    limit = c["memory_limit_mb"] * MiB
    # verify's loop keeps only the loss (setup.loss_only_loop): the step the case measures
    setup = _setup(c).model_copy(update={"loss_only_loop": True})
    r = under_memory_limit(load_model_spec(c["model"], num_layers=c["layers"]), setup, limit)
    said = "runs" if r.runs else f"OOM in {r.oom_at}"
    return f"; under {limit / GiB:.0f} GiB the replay {said}, reserved {r.peak_reserved / GiB:.2f} GiB"


def _append(out: Path, records: list[dict]) -> None:
    with out.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def run_one(
    c: dict, device: str, timeout: float, failure_log: Path | None = None, history_dir: Path | None = None
) -> list[dict]:
    """Measure one case in fresh process(es); returns the JSON lines to append. `history_dir`:
    where a HISTORY_CASES case writes its allocator history (<name>.jsonl.gz)."""
    from vramplan.verify.api import plan_ranks
    from vramplan.verify.extrapolate import extrapolate
    from vramplan.verify.launch import CaseRequest, run_isolated

    s = _setup(c)
    depths = c["depths"] or [c["layers"]]
    # the engine's N ranks launched when N GPUs are visible (verify's rule), else rank 0 simulated;
    # a truncated-depth extrapolation is one process per depth
    nproc = plan_ranks(s, device, None if not c["depths"] else False).nproc  # ZeRO: always launched
    ms = []
    for d in depths:
        limit = c["memory_limit_mb"] * 2**20 if c.get("memory_limit_mb") else None
        history = history_dir / f"{c['name']}.jsonl.gz" if history_dir and c["name"] in HISTORY_CASES else None
        req = CaseRequest(
            model=c["model"],
            setup=s,
            num_layers=d,
            steps=c["steps"],
            device=device,
            memory_limit_bytes=limit,
            alloc_history=str(history) if history and not c["depths"] else None,
        )
        ms += run_isolated(req, nproc=nproc, timeout=timeout, failure_log=failure_log)
    suffix = (lambda m: f"_L{m.num_layers}") if c["depths"] else (lambda m: f"_rank{m.rank}" if m.rank else "")
    lines = [{**json.loads(m.to_measured_case(c["name"] + suffix(m)).model_dump_json()), "case": c["name"]} for m in ms]
    if c["depths"]:
        result, _fits = extrapolate(ms)
        lines.append({**json.loads(result.to_measured_case(c["name"]).model_dump_json()), "case": c["name"]})
    return lines


#: what a case may hold on the device besides the estimate's reserved peak: the CUDA context,
#: cuBLAS/cuDNN workspaces and the estimate's own error, so that cases sharing one GPU (--jobs)
#: never push each other into out-of-memory (each process's allocator statistics are its own)
SHARE_MARGIN = 1.25
SHARE_EXTRA_BYTES = 2 * 2**30


def footprint_bytes(c: dict) -> int:
    """Device memory to set aside for case `c` when it shares the GPU: its allocator cap when it
    has one, else the estimate's peak reserved with a margin."""
    if c.get("memory_limit_mb"):
        return c["memory_limit_mb"] * 2**20 + SHARE_EXTRA_BYTES
    from vramplan.estimate import estimate_config

    s = _setup(c)
    gpus = f"{max(s.fsdp, s.data_parallel, 1)}xh100-80gb"
    est = estimate_config(c["model"], gpus, num_layers=c["layers"], **c["setup"], loss_only_loop=True)
    return int(est.per_gpu.peak_reserved_bytes * SHARE_MARGIN) + SHARE_EXTRA_BYTES


def lease_order(cases: list[dict]) -> list[dict]:
    """A GPU lease's order: the cases whose allocator history is recorded and those to measure
    again (HISTORY_CASES, REMEASURE), every technique (CORE), the out-of-memory edge (capped), the
    CUDA-only kernels (losses, attention and stacks modelled from source), then the rest."""
    first = [c for c in cases if c["name"] in HISTORY_CASES or c["name"] in REMEASURE]
    first += select(cases, None, None, core=True)
    first += [c for c in cases if c.get("memory_limit_mb")]
    first += [c for c in cases if {"loss", "attention", "stack", "liger_layers", "objective"} & set(c["setup"])]
    return list({c["name"]: c for c in [*first, *cases]}.values())  # each once, where it came first


class Batch:
    """Runs cases, `jobs` at a time on one GPU while their footprints fit `capacity` (in the
    order given: a case waits for room rather than being overtaken), appending each result."""

    def __init__(
        self,
        out: Path,
        device: str,
        budget_s: float,
        jobs: int,
        capacity: int,
        failure_log: Path | None,
        history_dir: Path | None = None,
    ):
        self.out, self.device, self.budget_s, self.jobs = out, device, budget_s, jobs
        self.capacity, self.failure_log, self.history_dir = capacity, failure_log, history_dir
        self.t0, self.failed, self.lock = time.monotonic(), 0, threading.Lock()

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def run(self, cases: list[dict]) -> int:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        running: dict = {}
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for c in cases:
                if self.left() < c["seconds"]:
                    print(f"budget: stopping before {c['name']} ({self.left():.0f} s left, needs ~{c['seconds']} s)")
                    break
                need = footprint_bytes(c) if self.jobs > 1 else 0
                while running and (len(running) >= self.jobs or sum(running.values()) + need > self.capacity):
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for f in done:
                        running.pop(f)
                running[pool.submit(self._one, c)] = need
            wait(list(running))
        return 1 if self.failed else 0

    def _one(self, c: dict) -> None:
        t = time.monotonic()
        try:
            lines = run_one(
                c, self.device, timeout=max(self.left(), 30), failure_log=self.failure_log, history_dir=self.history_dir
            )
        except Exception as e:  # noqa: BLE001 - one failed case must not stop the batch
            with self.lock:
                self.failed += 1
            print(f"FAILED {c['name']} ({time.monotonic() - t:.0f} s): {e}", flush=True)
            return
        with self.lock:
            _append(self.out, lines)
        last, took = lines[-1], time.monotonic() - t
        print(
            f"{c['name']}: peak {last['peak_alloc_mb'] or float('nan'):.0f} MiB reserved "
            f"{last.get('peak_reserved_mb') or float('nan'):.0f} MiB fits={last['fits']} ({took:.0f} s)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="calibration.jsonl")
    ap.add_argument("--batch", help="i/n: run every n-th case starting at i")
    ap.add_argument("--only", nargs="+", help="case names")
    ap.add_argument("--core", action="store_true", help="the cases covering every technique first, in CORE's order")
    ap.add_argument("--capped", action="store_true", help="only the capped-allocator cases (the out-of-memory edge)")
    ap.add_argument("--lease", action="store_true", help="every case: CORE first, then the capped ones, then the rest")
    ap.add_argument("--cases", help="JSON list of case dicts instead of the built-in list")
    ap.add_argument("--deepspeed", action="store_true", help="the DeepSpeed ZeRO cases (DEEPSPEED_CASES) instead")
    ap.add_argument("--budget-s", type=float, default=540, help="start no case that may not finish within this")
    ap.add_argument("--jobs", type=int, default=1, help="cases sharing the GPU at once (each its own process)")
    ap.add_argument("--capacity-gib", type=float, default=110, help="with --jobs: device memory the cases may share")
    ap.add_argument("--failure-log", help="append the workers' output of each failed case here")
    ap.add_argument("--alloc-history", help="write the allocator event history of HISTORY_CASES into this folder")
    ap.add_argument(
        "--skip-measured", help="skip the cases this JSONL file measured, except HISTORY_CASES and REMEASURE"
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dry-run", action="store_true", help="validate and estimate every case; run nothing")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    base = DEEPSPEED_CASES if args.deepspeed else load_cases(args.cases)
    cases = select(base, args.batch, args.only, args.core, args.capped)
    if args.lease:
        cases = lease_order(cases)
    if args.skip_measured:
        measured = done_names(Path(args.skip_measured)) - set(HISTORY_CASES) - REMEASURE
        cases = [c for c in cases if c["name"] not in measured]
    if args.list:
        print("\n".join(c["name"] for c in cases))
        return 0
    if args.dry_run:
        return dry_run(cases)
    out = Path(args.out)
    done = done_names(out)
    todo = [c for c in cases if c["name"] not in done]
    log = Path(args.failure_log) if args.failure_log else None
    history = Path(args.alloc_history) if args.alloc_history else None
    capacity = int(args.capacity_gib * 2**30)
    batch = Batch(out, args.device, args.budget_s, max(args.jobs, 1), capacity, log, history)
    return batch.run(todo)


if __name__ == "__main__":
    sys.exit(main())
