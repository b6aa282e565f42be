"""The memory model against the real reference step run on the CPU.

vramplan.verify.cputrace builds the step with verify's own builder (transformers, peft,
bitsandbytes, hqq, galore-torch, FSDP2 on a fake process group) and traces every CPU
allocation (profiler, profile_memory=True), phase by phase. Structure is device-agnostic:
which tensors exist, how long autograd keeps them, what FSDP2 all-gathers, holds and
frees. Kernels are not, so the comparison leaves out what differs on the CPU
(docs/verify.md, "CPU trace"): bf16 autocast (CPU's cast policy) and bitsandbytes' 8-bit
optimizer step (a CPU fallback with temporaries; the CUDA kernel updates in place), and the
loss backward is compared with the model's minus 2·N·V (CPU's log-softmax/NLL backward
keeps 12·N·V, CUDA's 14·N·V, measured on the H100). Dropout runs as CUDA holds it (a bool
mask; cputrace.cuda_like_steps). Tolerance 1.5% of each phase's traced peak.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Callable

import pytest

pytest.importorskip("peft")
from vramplan.categories import Category  # noqa: E402
from vramplan.estimate import make_setup  # noqa: E402
from vramplan.memory import LayerPoint, MeasuredPhase, PhaseKind, step_model  # noqa: E402
from vramplan.memory.loss import head_trains, held_output_bytes  # noqa: E402
from vramplan.model_loader import load_model_spec  # noqa: E402
from vramplan.setup import Loss, Quant, Stack  # noqa: E402
from vramplan.verify.cputrace import (  # noqa: E402
    cpu_head_bmm_copy,
    cpu_int8_dequantize_delta,
    cpu_int8_forward_parts,
)

TOL = 0.015
LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    hidden_act="silu",
)
MIXTRAL = dict(
    LLAMA,
    architectures=["MixtralForCausalLM"],
    model_type="mixtral",
    num_local_experts=4,
    num_experts_per_tok=2,
    intermediate_size=384,
)
PHI3 = dict(LLAMA, architectures=["Phi3ForCausalLM"], model_type="phi3", num_key_value_heads=8, pad_token_id=0)
GEMMA2 = dict(
    architectures=["Gemma2ForCausalLM"],
    model_type="gemma2",
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=4096,
    sliding_window=128,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
    query_pre_attn_scalar=64,
    max_position_embeddings=4096,
    hidden_activation="gelu_pytorch_tanh",
)
QWEN2 = dict(
    LLAMA, architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True, use_sliding_window=False
)  # q/k/v with bias, embeddings tied to the head
MISTRAL = dict(LLAMA, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128)
# q_norm / k_norm inside the attention, over q_dim (here twice the hidden size, as Qwen3-0.6B) and kv_dim
QWEN3 = dict(LLAMA, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=64, use_sliding_window=False)
QWEN3MOE = dict(
    QWEN3,
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=192,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)
# sliding layers (5 of 6) next to full-attention ones under SDPA, q/k norms, four norms per layer
GEMMA3 = dict(
    GEMMA2,
    architectures=["Gemma3ForCausalLM"],
    model_type="gemma3_text",
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
)


def _mistral3() -> dict:
    """An image-text checkpoint with no causal-LM class (Mistral Small 3.1's form): built as
    AutoModelForImageTextToText, its Pixtral tower idle in a text step. transformers' defaults,
    shrunk."""
    from transformers import AutoConfig

    d = AutoConfig.for_model("mistral3").to_dict()
    d["text_config"].update(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=4096,
        max_position_embeddings=4096,
    )
    d["vision_config"].update(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=32
    )
    return {k: v for k, v in d.items() if k not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype")}


MISTRAL3 = _mistral3()
# post-norm only (no norm before attention or MLP), q/k norms over q_dim / kv_dim, an
# RMSNorm that multiplies its weight in fp32
OLMO2 = dict(LLAMA, architectures=["Olmo2ForCausalLM"], model_type="olmo2")
GRANITE = dict(
    LLAMA,
    architectures=["GraniteForCausalLM"],
    model_type="granite",
    embedding_multiplier=12.0,
    logits_scaling=8.0,
    residual_multiplier=0.22,
    attention_multiplier=0.0078125,
)
B2S256 = dict(batch_size=2, seq_len=256, lora_dropout=0.0)
SAVE_BOTH = "embed_tokens,lm_head"
FREEZE_LF = dict(precision="mixed", model_dtype="bf16", train_layers_dtype="fp32")  # finetuning_type: freeze, bf16
CASES = {
    "full": (LLAMA, dict(method="full")),
    "lora": (LLAMA, dict(method="lora")),
    "qlora-nf4": (LLAMA, dict(method="qlora", quant="nf4")),
    "qlora-hqq4-ckpt": (LLAMA, dict(method="qlora", quant="hqq4", gradient_checkpointing=True)),
    "galore": (LLAMA, dict(method="galore", galore_rank=32)),
    "galore-layerwise": (LLAMA, dict(method="galore", galore_rank=32, optim="galore_adamw_layerwise")),
    "fsdp2-mixed-ckpt": (LLAMA, dict(method="full", precision="mixed", fsdp=2, gradient_checkpointing=True)),
    "fsdp8": (LLAMA, dict(method="full", fsdp=8)),
    "fsdp2-lora-ckpt": (LLAMA, dict(method="lora", fsdp=2, gradient_checkpointing=True)),
    "moe-full": (MIXTRAL, dict(method="full")),
    "moe-lora": (MIXTRAL, dict(method="lora")),
    "moe-fsdp4": (MIXTRAL, dict(method="full", fsdp=4)),
    "qlora-hqq4": (LLAMA, dict(method="qlora", quant="hqq4")),
    "fsdp2-qlora-nf4-ckpt": (LLAMA, dict(method="qlora", quant="nf4", fsdp=2, gradient_checkpointing=True)),
    "fsdp4-qlora-hqq4": (LLAMA, dict(method="qlora", quant="hqq4", fsdp=4)),
    "phi3-fused-full": (PHI3, dict(method="full")),
    # a sequence past the sliding window: an explicit mask, k and v repeated to every head
    "mistral-window-full": (MISTRAL, dict(method="full")),
    "mistral-window-lora-ckpt": (MISTRAL, dict(method="lora", gradient_checkpointing=True)),
    "gemma2-eager-lora": (GEMMA2, dict(method="lora")),
    "qwen2-tied-full": (QWEN2, dict(method="full")),
    "qwen2-tied-qlora-nf4": (QWEN2, dict(method="qlora", quant="nf4")),
    # LoRA dropout as CUDA holds it (cputrace.cuda_like_steps: output + bool mask)
    "lora-dropout": (LLAMA, dict(method="lora", lora_dropout=0.05)),
    "fsdp2-qlora-nf4-dropout": (LLAMA, dict(method="qlora", quant="nf4", fsdp=2, lora_dropout=0.05)),
    "qwen3-qknorm-full": (QWEN3, dict(method="full")),
    "qwen3-qknorm-qlora-hqq4": (QWEN3, dict(method="qlora", quant="hqq4")),
    "qwen3moe-lora": (QWEN3MOE, dict(method="lora")),
    "gemma3-window-full": (GEMMA3, dict(method="full")),
    "gemma3-window-lora-ckpt": (GEMMA3, dict(method="lora", gradient_checkpointing=True)),
    "granite-lora": (GRANITE, dict(method="lora")),
    "olmo2-postnorm-full": (OLMO2, dict(method="full")),
    "olmo2-postnorm-lora": (OLMO2, dict(method="lora")),
    "mistral3-imagetext-lora": (MISTRAL3, dict(method="lora")),
    "mistral3-imagetext-full": (MISTRAL3, dict(method="full")),
    # LLM.int8 (bitsandbytes Linear8bitLt, as load_in_8bit builds it): each 8-bit Linear keeps
    # its input as a ctx attribute, which a non-reentrant checkpoint cannot drop
    "qlora-int8": (LLAMA, dict(method="qlora", quant="int8")),
    "qlora-int8-ckpt": (LLAMA, dict(method="qlora", quant="int8", gradient_checkpointing=True)),
    "qlora-int8-ckpt-reentrant": (
        LLAMA,
        dict(method="qlora", quant="int8", gradient_checkpointing=True, checkpoint_reentrant=True),
    ),
    "qlora-int8-dropout": (LLAMA, dict(method="qlora", quant="int8", lora_dropout=0.05)),
    "qlora-int8-eager": (LLAMA, dict(method="qlora", quant="int8", attention="eager")),
    "qlora-int8-attention": (LLAMA, dict(method="qlora", quant="int8", lora_targets="attention")),
    "qlora-int8-bf16-adapters": (LLAMA, dict(method="qlora", quant="int8", adapter_dtype="bf16")),
    "qwen2-tied-qlora-int8": (QWEN2, dict(method="qlora", quant="int8")),
    "gemma2-eager-qlora-int8-ckpt": (GEMMA2, dict(method="qlora", quant="int8", gradient_checkpointing=True)),
    # gradient accumulation: the last micro-batch's forward and backward, with every earlier grad alive
    "full-ga2": (LLAMA, dict(method="full", gradient_accumulation=2)),
    "full-ckpt-ga2": (LLAMA, dict(method="full", gradient_accumulation=2, gradient_checkpointing=True)),
    "lora-ga2": (LLAMA, dict(method="lora", gradient_accumulation=2)),
    "lora-modules-to-save-ga2": (LLAMA, dict(method="lora", modules_to_save=SAVE_BOTH, gradient_accumulation=2)),
    "fsdp2-mixed-ckpt-ga2": (
        LLAMA,
        dict(method="full", precision="mixed", fsdp=2, gradient_checkpointing=True, gradient_accumulation=2),
    ),
    "moe-full-ga2": (MIXTRAL, dict(method="full", gradient_accumulation=2)),
    # autocast over fp32 masters, checkpointed: the forward's cache holds every layer's bf16 copies
    # (LLAMA is untied: the input embedding is a lookup, never cast; o_proj reads SDPA's saved output)
    "full-mixed": (LLAMA, dict(method="full", precision="mixed")),
    "full-mixed-ckpt": (LLAMA, dict(method="full", precision="mixed", gradient_checkpointing=True)),
    # --train-layers (memory/freeze.py): the last N layers train, the prefix records nothing;
    # LLaMA-Factory's fp32 cast of the trained layers over a bf16 model, its checkpoint function
    "freeze-last2": (LLAMA, dict(method="full", train_layers=2)),
    "freeze-last2-ckpt": (LLAMA, dict(method="full", train_layers=2, gradient_checkpointing=True)),
    "freeze-last2-fp32-layers-mixed": (LLAMA, dict(method="full", train_layers=2, **FREEZE_LF)),
    "freeze-last2-fp32-layers-mixed-ckpt": (
        LLAMA,
        dict(method="full", train_layers=2, gradient_checkpointing=True, **FREEZE_LF),
    ),
    "freeze-last2-fp32-layers-mixed-ckpt-reentrant": (  # LLaMA-Factory's default use_reentrant_gc
        LLAMA,
        dict(method="full", train_layers=2, gradient_checkpointing=True, checkpoint_reentrant=True, **FREEZE_LF),
    ),
    "freeze-last1-fp32w-mixed-ckpt-ga2": (
        LLAMA,
        dict(method="full", train_layers=1, precision="mixed", gradient_checkpointing=True, gradient_accumulation=2),
    ),
    "qwen3-freeze-last1-fp32-layers-mixed": (QWEN3, dict(method="full", train_layers=1, **FREEZE_LF)),
    # axolotl's full fine-tune with sdpa: embed_tokens, lm_head and the norms upcast to fp32 over
    # the bf16 model under autocast (memory/precision.py upcast_roots); Qwen2: one tied matrix
    "axolotl-full-fp32-roots": (LLAMA, dict(stack="axolotl", method="full")),
    "axolotl-full-fp32-roots-ckpt": (LLAMA, dict(stack="axolotl", method="full", gradient_checkpointing=True)),
    "qwen2-tied-axolotl-full-fp32-roots": (QWEN2, dict(stack="axolotl", method="full")),
    # peft modules_to_save: a trainable copy of the embedding and/or lm_head beside the frozen original
    "lora-modules-to-save": (LLAMA, dict(method="lora", modules_to_save=SAVE_BOTH)),
    "lora-modules-to-save-ckpt": (LLAMA, dict(method="lora", modules_to_save=SAVE_BOTH, gradient_checkpointing=True)),
    "lora-embed-to-save-mixed": (LLAMA, dict(method="lora", modules_to_save="embed_tokens", precision="mixed")),
    "lora-head-to-save-mixed": (LLAMA, dict(method="lora", modules_to_save="lm_head", precision="mixed")),
    # LLaMA-Factory casts every trainable parameter to fp32: the copies of a bf16 model too
    "lora-head-to-save-fp32-copy": (
        LLAMA,
        dict(
            method="lora",
            modules_to_save="lm_head",
            modules_to_save_dtype="fp32",
            precision="mixed",
            model_dtype="bf16",
        ),
    ),
    "lora-modules-to-save-fp32-copies": (
        LLAMA,
        dict(
            method="lora",
            modules_to_save=SAVE_BOTH,
            modules_to_save_dtype="fp32",
            precision="mixed",
            model_dtype="bf16",
        ),
    ),
    "qwen2-tied-lora-modules-to-save": (QWEN2, dict(method="lora", modules_to_save=SAVE_BOTH)),
    "qwen2-tied-lora-head-to-save": (QWEN2, dict(method="lora", modules_to_save="lm_head")),
    "qlora-nf4-kbit-modules-to-save": (
        LLAMA,
        dict(method="qlora", quant="nf4", kbit_prep=True, precision="mixed", modules_to_save=SAVE_BOTH),
    ),
    "qlora-nf4-kbit-bf16-adapters-modules-to-save": (
        LLAMA,
        dict(
            method="qlora",
            quant="nf4",
            kbit_prep=True,
            precision="mixed",
            adapter_dtype="bf16",
            modules_to_save=SAVE_BOTH,
            modules_to_save_dtype="bf16",
            gradient_checkpointing=True,
        ),
    ),
}


def _bmm_copied(setup) -> bool:
    """The compiled chunked loss under a frozen lm_head: the CPU's bmm copy is the loss's peak."""
    return setup.loss == Loss.CHUNKED and setup.compile and not head_trains(setup) and setup.stack != Stack.AXOLOTL


def _model_phases(spec, setup) -> dict[str, int]:
    """The model's widest phase inside each measured phase (Phase.measured), as the
    trace's step 1 sees it: verify's loop holds no logits in the hf loss backward
    (loss.held_output_bytes), the CPU's bmm copies lm_head's weight per batch row around the
    compiled chunked loss (cputrace.cpu_head_bmm_copy), GaLore's SVD refresh runs at step 0 only,
    and layer-wise optimizers step inside backward."""
    refresh = (PhaseKind.GALORE_REFRESH, PhaseKind.GALORE_REFRESH_LAYERWISE)
    out: dict[str, int] = {}
    with cpu_int8_kernels(setup):
        phases = step_model(spec, setup).phases
    for p in phases:
        # bitsandbytes' paged states fall back to plain tensors on the CPU (optimizer.py:375-382)
        k, b = p.measured.value, p.allocated + p.parts.get(Category.PAGED_OPTIMIZER_STATES, 0)
        if p.measured == MeasuredPhase.BUILD or p.kind in refresh:
            continue
        if p.kind == PhaseKind.LOSS_BACKWARD:  # the logits the reference loop holds, verify's does not
            b -= held_output_bytes(spec, setup)
        if p.kind in (PhaseKind.FORWARD_LOSS, PhaseKind.LOSS_BACKWARD) and _bmm_copied(setup):
            b += cpu_head_bmm_copy(setup.batch_size, spec.vocab, spec.hidden)
        out[k] = max(out.get(k, 0), b)
    if setup.quant == Quant.INT8:
        out["backward"] = max(out["backward"], _cpu_int8_dequantize(spec, setup))
    return out


def phases_off(phases: dict[str, int], traced, tol: float) -> dict[str, str]:
    """The measured phases whose model bytes differ from the trace's step-1 peak by more than `tol`."""
    return {
        p: f"traced {traced.peak(p, step=1) / 2**20:.2f} MiB, model {b / 2**20:.2f} MiB"
        for p, b in phases.items()
        if abs(b - traced.peak(p, step=1)) > tol * traced.peak(p, step=1)
    }


@contextlib.contextmanager
def cpu_int8_kernels(setup):
    """The estimate with LLM.int8's forward as the CPU runs it (cputrace.cpu_int8_forward_parts)."""
    from unittest import mock

    if setup.quant != Quant.INT8:
        yield
        return

    def cpu_parts(lin, out_bytes, with_output=True):
        return cpu_int8_forward_parts(lin, out_bytes, setup.tokens, with_output)

    with (
        mock.patch("vramplan.memory.layer.int8_forward_parts", cpu_parts),
        mock.patch("vramplan.memory.quantization.int8_forward_parts", cpu_parts),
    ):
        yield


def _cpu_int8_dequantize(spec, setup) -> int:
    """The estimate's LLM.int8 backward dequantize moments as the CPU holds them
    (cputrace.cpu_int8_dequantize_delta)."""
    from vramplan.memory import prepare
    from vramplan.memory.backward import layer_backward_phases
    from vramplan.memory.layer import layer_points
    from vramplan.memory.phases import step_context
    from vramplan.model_spec import Linear

    widest = 0
    with cpu_int8_kernels(setup):
        moments = layer_backward_phases(step_context(spec, setup, prepare(spec, setup)))
    for p in moments:
        if p.point != LayerPoint.DEQUANTIZE or p.layer is None:
            continue
        pts = layer_points(spec, spec.layers[p.layer], setup)
        first = max(spec.layers[p.layer].linears, key=lambda l: (l.numel == pts.quant_numel, l.role == "down"))
        assert isinstance(first, Linear)
        widest = max(
            widest, p.allocated + cpu_int8_dequantize_delta(pts.quant_numel, first.in_features, setup.tokens, 2)
        )
    return widest


def _build_compared(setup) -> bool:
    """The build's quantization peak is compared for hqq only: the trace runs hqq's CUDA
    working dtype, but bitsandbytes' CPU quantize_4bit is not its CUDA kernel."""
    return setup.method.value == "qlora" and setup.quant == Quant.HQQ4


def _model_build_peak(spec, setup) -> int:
    from vramplan.memory import parameters, static_bytes

    static = static_bytes(parameters(spec, setup), setup).parts
    build = next(p.allocated for p in step_model(spec, setup).phases if p.kind == PhaseKind.BUILD_QUANTIZE)
    return max(build, sum(static.values()))


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(CASES))
def test_step_phases_match_the_cpu_trace(name, tmp_path):
    from vramplan.memory import parameters, static_bytes
    from vramplan.verify.cputrace import trace_step

    cfg, fields = CASES[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = str(tmp_path)
    setup = make_setup(**{**B2S256, **fields})
    spec = load_model_spec(model, use_cache=False)
    traced = trace_step(model, setup)
    static = static_bytes(parameters(spec, setup), setup).parts
    checks = {"build": (next(p.end_bytes for p in traced.phases if p.name == "build"), sum(static.values()))}
    if _build_compared(setup):
        checks["build peak"] = (traced.peak("build"), _model_build_peak(spec, setup))
    for phase, predicted in _model_phases(spec, setup).items():
        checks[phase] = (traced.peak(phase, step=1), predicted)
    off = {
        k: f"traced {t / 2**20:.2f} MiB, model {p / 2**20:.2f} MiB"
        for k, (t, p) in checks.items()
        if abs(p - t) > TOL * t
    }
    assert not off, off


# A 64-token vocabulary makes a decoder layer's backward the peak of the step, the phase
# the H100 calibration never pins (memory-model.md, "Inside a decoder layer"). The whole
# step's peak and each measured phase's (verify compares them too) are held to 1.5%, as
# the structure cases: a checkpointed forward's peak is the layer's working set (eager
# attention's fp32 softmax, peft's adapter path), which nothing else pins.
TINY_VOCAB = dict(LLAMA, vocab_size=64, intermediate_size=1024, num_hidden_layers=4)
V64_SHAPE = dict(batch_size=2, seq_len=512, lora_dropout=0.0)
LAYER_CASES = {
    "full-ckpt": dict(method="full", gradient_checkpointing=True),
    "fsdp2-ckpt": dict(method="full", fsdp=2, gradient_checkpointing=True),
    "lora-ckpt": dict(method="lora", gradient_checkpointing=True),
    "galore-layerwise-ckpt": dict(
        method="galore", galore_rank=32, optim="galore_adamw_layerwise", gradient_checkpointing=True
    ),
}


# Other architectures and FSDP2 with a 64-token vocabulary.
LAYER_ARCH_CASES = {
    "moe-full-ckpt": (dict(MIXTRAL, vocab_size=64), dict(method="full", gradient_checkpointing=True)),
    "moe-lora-ckpt": (dict(MIXTRAL, vocab_size=64), dict(method="lora", gradient_checkpointing=True)),
    "phi3-fused-lora-ckpt": (dict(PHI3, vocab_size=64), dict(method="lora", gradient_checkpointing=True)),
    "gemma2-eager-lora-ckpt": (dict(GEMMA2, vocab_size=64), dict(method="lora", gradient_checkpointing=True)),
    "fsdp4-lora-ckpt": (TINY_VOCAB, dict(method="lora", fsdp=4, gradient_checkpointing=True)),
    "qlora-hqq4-ckpt": (TINY_VOCAB, dict(method="qlora", quant="hqq4", gradient_checkpointing=True)),
    "qwen2-lora-ckpt": (
        dict(QWEN2, vocab_size=64, intermediate_size=1024, num_hidden_layers=4),
        dict(method="lora", gradient_checkpointing=True),
    ),
    "qwen2-full": (dict(QWEN2, vocab_size=64, intermediate_size=1024, num_hidden_layers=4), dict(method="full")),
    # axolotl's fp32 embeddings and norms over bf16 weights: an fp32 residual stream through backward
    "axolotl-full-fp32-roots": (TINY_VOCAB, dict(stack="axolotl", method="full")),
    "axolotl-full-fp32-roots-ckpt": (TINY_VOCAB, dict(stack="axolotl", method="full", gradient_checkpointing=True)),
    "full-mixed-ckpt": (TINY_VOCAB, dict(method="full", precision="mixed", gradient_checkpointing=True)),
    # with dropout lora_A saves dropout(x): x's copy and the norm's output become locals, and
    # down's adapter (the recompute stops early right after it) can be the widest moment
    "lora-ckpt-dropout": (TINY_VOCAB, dict(method="lora", gradient_checkpointing=True, lora_dropout=0.05)),
    "fsdp2-lora-ckpt-dropout": (
        TINY_VOCAB,
        dict(method="lora", fsdp=2, gradient_checkpointing=True, lora_dropout=0.05),
    ),
    "h512-lora-ckpt-dropout": (
        dict(TINY_VOCAB, hidden_size=512),
        dict(method="lora", gradient_checkpointing=True, lora_dropout=0.05),
    ),
    "lora-dropout": (TINY_VOCAB, dict(method="lora", lora_dropout=0.05)),
    "qwen3-qknorm-full": (dict(QWEN3, vocab_size=64, intermediate_size=1024, num_hidden_layers=4), dict(method="full")),
    "qwen3-qknorm-lora-ckpt": (
        dict(QWEN3, vocab_size=64, intermediate_size=1024, num_hidden_layers=4),
        dict(method="lora", gradient_checkpointing=True),
    ),
    # one kv head (Gemma 3 1B): with the sliding-window mask repeat_kv is a view, no copy of k/v
    "gemma3-mqa-window-lora": (
        dict(GEMMA3, vocab_size=64, num_key_value_heads=1, sliding_window=256, intermediate_size=1024),
        dict(method="lora"),
    ),
    "mistral-mqa-window-full": (
        dict(MISTRAL, vocab_size=64, num_key_value_heads=1, sliding_window=256, intermediate_size=1024),
        dict(method="full"),
    ),
    # post-norm: the blocks read the residual stream itself, and a norm follows the MLP
    "olmo2-postnorm-full": (
        dict(OLMO2, vocab_size=64, intermediate_size=1024, num_hidden_layers=4),
        dict(method="full"),
    ),
    "olmo2-postnorm-lora-ckpt": (
        dict(OLMO2, vocab_size=64, intermediate_size=1024, num_hidden_layers=4),
        dict(method="lora", gradient_checkpointing=True),
    ),
    # LLM.int8: the 8-bit base's matmuls and its whole weight dequantized in backward as the
    # CPU runs them (cpu_int8_kernels), its inputs held past a non-reentrant checkpoint
    "qlora-int8": (TINY_VOCAB, dict(method="qlora", quant="int8")),
    "qlora-int8-bf16-adapters": (TINY_VOCAB, dict(method="qlora", quant="int8", adapter_dtype="bf16")),
    "qlora-int8-eager": (TINY_VOCAB, dict(method="qlora", quant="int8", attention="eager")),
    "qlora-int8-ckpt": (TINY_VOCAB, dict(method="qlora", quant="int8", gradient_checkpointing=True)),
    "qlora-int8-ckpt-dropout": (
        TINY_VOCAB,
        dict(method="qlora", quant="int8", gradient_checkpointing=True, lora_dropout=0.05),
    ),
    "qlora-int8-ckpt-reentrant": (
        TINY_VOCAB,
        dict(method="qlora", quant="int8", gradient_checkpointing=True, checkpoint_reentrant=True),
    ),
    "qlora-int8-ckpt-bf16-adapters": (
        TINY_VOCAB,
        dict(method="qlora", quant="int8", gradient_checkpointing=True, adapter_dtype="bf16"),
    ),
    "qlora-int8-ckpt-reentrant-bf16-adapters": (
        TINY_VOCAB,
        dict(
            method="qlora", quant="int8", gradient_checkpointing=True, checkpoint_reentrant=True, adapter_dtype="bf16"
        ),
    ),
}
LAYER_ALL = {**{n: (TINY_VOCAB, f) for n, f in LAYER_CASES.items()}, **LAYER_ARCH_CASES}


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(LAYER_ALL))
def test_layer_dominated_step_phases_match_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    cfg, fields = LAYER_ALL[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    setup = make_setup(**{**V64_SHAPE, **fields})
    spec = load_model_spec(str(tmp_path), use_cache=False)
    phases = _model_phases(spec, setup)
    traced = trace_step(str(tmp_path), setup)
    measured = {p: traced.peak(p, step=1) for p in phases}
    checks = {**{p: (measured[p], phases[p]) for p in phases}, "step": (max(measured.values()), max(phases.values()))}
    off = {
        k: f"traced {t / 2**20:.2f} MiB, model {p / 2**20:.2f} MiB"
        for k, (t, p) in checks.items()
        if abs(p - t) > TOL * t
    }
    assert not off, off


# Group "offload-attention", a 64-token vocabulary so the layers dominate: reentrant
# checkpointing (torch.utils.checkpoint use_reentrant=True: the whole layer recomputed inside
# the checkpoint's backward, its output held through the layer's backward), packed sequences
# under SDPA (transformers builds a packed-sequence mask from position_ids: every layer's SDPA
# keeps a bf16 copy, and k and v are repeated to every head), padding-free (one row of
# batch x seq tokens) and eager attention on a model whose default is SDPA.
KNOB_CASES = {
    "lora-ckpt-reentrant": dict(method="lora", gradient_checkpointing=True, checkpoint_reentrant=True),
    "lora-ckpt-dropout-reentrant": dict(
        method="lora", gradient_checkpointing=True, checkpoint_reentrant=True, lora_dropout=0.05
    ),
    "full-ckpt-reentrant": dict(method="full", gradient_checkpointing=True, checkpoint_reentrant=True),
    "sdpa-position-ids-full": dict(method="full", packing="position-ids"),
    "sdpa-position-ids-lora-ckpt": dict(method="lora", gradient_checkpointing=True, packing="position-ids"),
    "sdpa-padding-free-lora": dict(method="lora", packing="padding-free"),
    "eager-llama-lora": dict(method="lora", attention="eager"),
    "eager-llama-lora-ckpt": dict(method="lora", attention="eager", gradient_checkpointing=True),
}


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(KNOB_CASES))
def test_offload_attention_knobs_match_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    (tmp_path / "config.json").write_text(json.dumps(TINY_VOCAB))
    setup = make_setup(**{**V64_SHAPE, **KNOB_CASES[name]})
    spec = load_model_spec(str(tmp_path), use_cache=False)
    phases = _model_phases(spec, setup)
    traced = trace_step(str(tmp_path), setup)
    measured = {p: traced.peak(p, step=1) for p in phases}
    # eager attention without checkpointing: its softmax backward, a moment the model does not
    # have (it reads -1.8% on its backward), held to the looser 2%
    tol = 0.02 if name == "eager-llama-lora" else TOL
    off = {
        p: f"traced {measured[p] / 2**20:.2f} MiB, model {b / 2**20:.2f} MiB"
        for p, b in phases.items()
        if abs(b - measured[p]) > tol * measured[p]
    }
    assert not off, off


# Short sequences on wide Linears: quantizing the largest Linear is the peak of the whole
# step (hqq's optimization loop holds ~24 bytes per weight element), and under FSDP2
# each packed weight must go back to meta as soon as it is quantized.
WIDE = dict(LLAMA, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, vocab_size=256)
BUILD_CASES = {f"hqq4-fsdp{w}": dict(method="qlora", quant="hqq4", fsdp=w, gradient_checkpointing=True) for w in (1, 4)}


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(BUILD_CASES))
def test_build_dominated_step_peak_matches_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    (tmp_path / "config.json").write_text(json.dumps(WIDE))
    setup = make_setup(batch_size=1, seq_len=64, lora_dropout=0.0, **BUILD_CASES[name])
    spec = load_model_spec(str(tmp_path), use_cache=False)
    build = _model_build_peak(spec, setup)
    predicted = max(build, *_model_phases(spec, setup).values())
    traced = trace_step(str(tmp_path), setup)
    assert predicted == build, "the build is not the model's peak here: the case tests nothing"
    assert abs(predicted - traced.peak_bytes) <= TOL * traced.peak_bytes, (predicted / 2**20, traced.peak_bytes / 2**20)


# A large vocabulary and few tokens: a trained embedding's backward, the last node, is the
# backward's peak. Tied to lm_head, lm_head's grad waits in the engine's input buffer and the
# embedding's is added to it out of place (phases.embedding_backward_phase); with gradient
# accumulation beside the held grad. Untied and one micro-batch: nothing beyond the grads.
EMBED_VOCAB = dict(LLAMA, vocab_size=65536, num_hidden_layers=2)
EMBED_SHAPE = dict(batch_size=1, seq_len=64, lora_dropout=0.0)
EMBED_CASES = {
    f"{'tied' if tie else 'untied'}-full{'-ga2' if ga > 1 else ''}": (
        dict(EMBED_VOCAB, tie_word_embeddings=tie),
        dict(method="full", gradient_accumulation=ga),
    )
    for tie in (True, False)
    for ga in (1, 2)
} | {
    "tied-lora-embed-to-save-ga2": (
        dict(EMBED_VOCAB, tie_word_embeddings=True),
        dict(method="lora", modules_to_save="embed_tokens,lm_head", gradient_accumulation=2),
    )
}


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(EMBED_CASES))
def test_embedding_backward_matches_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    cfg, fields = EMBED_CASES[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    setup = make_setup(**EMBED_SHAPE, **fields)
    spec = load_model_spec(str(tmp_path), use_cache=False)
    traced = trace_step(str(tmp_path), setup)
    off = {
        k: (traced.peak(k, step=1) / 2**20, p / 2**20)
        for k, p in _model_phases(spec, setup).items()
        if abs(p - traced.peak(k, step=1)) > TOL * traced.peak(k, step=1)
    }
    assert not off, off


# Short sequences with QLoRA: a 4-bit Linear dequantized for a matmul is the widest moment
# of forward and of each layer's backward. hqq's PyTorch backend is plain torch ops, the
# same on the CPU as on CUDA (bitsandbytes' CPU gemm_4bit is not its CUDA path).
DEQ_CASES = {
    f"hqq4-fsdp{w}{'-ckpt' if ck else ''}": dict(method="qlora", quant="hqq4", fsdp=w, gradient_checkpointing=ck)
    for w, ck in ((1, True), (1, False), (2, True), (8, False))
}


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(DEQ_CASES))
def test_dequantize_dominated_step_peak_matches_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    (tmp_path / "config.json").write_text(json.dumps(dict(WIDE, vocab_size=1024)))
    setup = make_setup(batch_size=1, seq_len=64, lora_dropout=0.0, **DEQ_CASES[name])
    spec = load_model_spec(str(tmp_path), use_cache=False)
    steps = [p for p in step_model(spec, setup).phases if p.measured != MeasuredPhase.BUILD]
    widest = max(steps, key=lambda p: p.allocated)
    dequantize = widest.kind == PhaseKind.DEQUANTIZE_FORWARD or widest.point == LayerPoint.DEQUANTIZE
    assert dequantize, f"{widest.name} is the model's peak here: the case tests nothing"
    traced = trace_step(str(tmp_path), setup)
    measured = max(traced.peak(p, step=1) for p in _model_phases(spec, setup))
    assert abs(widest.allocated - measured) <= 0.05 * measured, (widest.allocated / 2**20, measured / 2**20)


# A 16k-token sequence on a two-layer model with a 64-token vocabulary: the forward's own
# peak is the last layer's widest adapter (or the final norm), the backward's the final
# norm or a layer point, each holding locals the short cases barely see (the embedding
# output, the layer's input, the batch's ids through the optimizer step). Structure only,
# like the short cases: held to 1.5% per phase.
LONG = dict(LLAMA, vocab_size=64, num_hidden_layers=2, max_position_embeddings=32768)
LONG_CASES = {"full-16k": dict(method="full"), "lora-16k": dict(method="lora")}
LONG_SHAPE = dict(batch_size=1, seq_len=16384, lora_dropout=0.0)


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(LONG_CASES))
def test_long_context_phases_match_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    (tmp_path / "config.json").write_text(json.dumps(LONG))
    setup = make_setup(**LONG_SHAPE, **LONG_CASES[name])
    spec = load_model_spec(str(tmp_path), use_cache=False)
    phases = _model_phases(spec, setup)
    traced = trace_step(str(tmp_path), setup)
    off = phases_off(phases, traced, TOL)
    assert not off, off


# FSDP2 CPU offload on the CPU: host and device are one memory, so the trace's forward sees
# the device's working set (gathered units, activations, the quantization state that stays
# on the device) plus the host's sharded parameters and optimizer states. Gradients were
# freed by zero_grad(set_to_none=True) before this forward; the host estimate is a peak and
# counts them. Backward is left out: host gradients accumulate layer by layer there.
OFFLOAD_CASES = {
    f"fsdp2-offload-{m}": dict(
        method=m, fsdp=2, cpu_offload=True, gradient_checkpointing=True, **({"quant": "hqq4"} if m == "qlora" else {})
    )
    for m in ("full", "lora", "qlora")
}


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(OFFLOAD_CASES))
def test_offload_forward_is_device_plus_host_on_the_cpu(name, tmp_path):
    from vramplan.memory import alloc, grad_bytes, parameters
    from vramplan.memory.fsdp import shard
    from vramplan.verify.cputrace import trace_step

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    setup = make_setup(**B2S256, **OFFLOAD_CASES[name])
    spec = load_model_spec(str(tmp_path), use_cache=False)
    host_grads = sum(alloc(grad_bytes(p, setup) * shard(p, setup.fsdp)) for p in parameters(spec, setup) if p.trainable)
    predicted = _model_phases(spec, setup)["forward"] + step_model(spec, setup).host_pinned - host_grads
    traced = trace_step(str(tmp_path), setup).peak("forward", step=1)
    assert abs(predicted - traced) <= TOL * traced, (predicted / 2**20, traced / 2**20)


def test_cpu_trace_doc_is_rendered_from_the_committed_trace():
    """docs/cpu-trace.md is what `scripts/cpu_trace_report.py --render-only` makes of the
    committed trace files (regenerate it after tracing again)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("cpu_trace_report", root / "scripts" / "cpu_trace_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    before = {(r["group"], r["name"]): r for r in report.load_rows(report.BEFORE)}
    rendered = report.render(report.load_rows(report.DATA / "trace.jsonl"), before)
    assert (root / "docs" / "cpu-trace.md").read_text() == rendered


# The loss over the vocabulary (group "loss"; docs/memory-model.md, "The loss over the
# vocabulary"), each run by its library: accelerate's convert_outputs_to_fp32 around the
# model's own loss, the loop keeping the output (--keep-logits), torchtune 0.6.1's
# CEWithChunkedOutputLoss on its decoder's 8 output chunks, its unreleased LinearCrossEntropyLoss
# (the output layer inside the loss; pytorch/torchtune@bd2a0fc, its source on PYTHONPATH), TRL
# 1.16's fused LM head (its Triton folds as CUDA runs them: cputrace.cuda_like_trl). Held to 1.5%
# per phase.
LOSS_CASES = {
    "hf-fp32-outputs-lora": (LLAMA, dict(method="lora", fp32_outputs=True)),
    "hf-fp32-outputs-full": (LLAMA, dict(method="full", fp32_outputs=True)),
    "hf-keep-logits-lora": (LLAMA, dict(method="lora", keep_logits=True)),
    "hf-fp32-keep-logits-lora": (LLAMA, dict(method="lora", fp32_outputs=True, keep_logits=True)),
    "torchtune-chunked-lora": (LLAMA, dict(method="lora", loss="chunked")),
    "torchtune-chunked-full": (LLAMA, dict(method="full", loss="chunked")),
    "torchtune-chunked-fp32-outputs-lora": (LLAMA, dict(method="lora", loss="chunked", fp32_outputs=True)),
    "torchtune-chunked-keep-logits-lora": (LLAMA, dict(method="lora", loss="chunked", keep_logits=True)),
    "gemma2-softcap-torchtune-chunked-lora": (GEMMA2, dict(method="lora", loss="chunked")),
    "torchtune-chunked-compile-lora": (LLAMA, dict(method="lora", loss="chunked", compile=True)),
    "torchtune-chunked-compile-full": (LLAMA, dict(method="full", loss="chunked", compile=True)),
    # torchtune's LinearCrossEntropyLoss, eager and under compile_loss; Gemma 2: torchtune caps
    # its hidden state, not the logits, so the loss runs on the norm's output uncapped
    "torchtune-linear-ce-lora": (LLAMA, dict(method="lora", loss="torchtune-linear-ce")),
    "torchtune-linear-ce-full": (LLAMA, dict(method="full", loss="torchtune-linear-ce")),
    "torchtune-linear-ce-compile-lora": (LLAMA, dict(method="lora", loss="torchtune-linear-ce", compile=True)),
    "torchtune-linear-ce-compile-full": (LLAMA, dict(method="full", loss="torchtune-linear-ce", compile=True)),
    "gemma2-torchtune-linear-ce-lora": (GEMMA2, dict(method="lora", loss="torchtune-linear-ce")),
    # axolotl's chunked_cross_entropy: its patch over the model's full logits, always compiled
    # (axolotl==0.19.0 monkeypatch/loss/chunked.py), with axolotl's defaults (mixed precision
    # over bf16 weights, fp32 outputs); batch 1: the chunks are views of the logits, not copies
    # verify builds peft's LoRA layers: axolotl's default-on fused kernels off (memory/lora_kernels.py)
    "axolotl-chunked-lora": (LLAMA, dict(stack="axolotl", method="lora", loss="chunked", lora_kernels=False)),
    "axolotl-chunked-full": (LLAMA, dict(stack="axolotl", method="full", loss="chunked")),
    "axolotl-chunked-b1-lora": (
        LLAMA,
        dict(stack="axolotl", method="lora", loss="chunked", batch_size=1, seq_len=512, lora_kernels=False),
    ),
    "trl-fused-head-lora": (LLAMA, dict(method="lora", loss="trl-chunked-nll")),
    "trl-fused-head-full": (LLAMA, dict(method="full", loss="trl-chunked-nll")),
    # peft's trainable lm_head copy: the fused head reads it through the wrapper's `.weight`
    "trl-fused-head-lora-head-to-save": (LLAMA, dict(method="lora", loss="trl-chunked-nll", modules_to_save="lm_head")),
    "axolotl-chunked-lora-modules-to-save": (
        LLAMA,
        dict(
            stack="axolotl", method="lora", loss="chunked", modules_to_save="embed_tokens,lm_head", lora_kernels=False
        ),
    ),
    "torchtune-linear-ce-lora-head-to-save": (
        LLAMA,
        dict(method="lora", loss="torchtune-linear-ce", modules_to_save="lm_head"),
    ),
    # on TRL's own default: LoRA on fp32 weights under autocast (an fp32 final norm output, its
    # rows and each lm_head slice cast to bf16 per tile: at most V rows of the weight)
    "trl-fused-head-lora-fp32w-mixed": (
        LLAMA,
        dict(method="lora", loss="trl-chunked-nll", model_dtype="fp32", precision="mixed"),
    ),
    # a 65536-token vocabulary and 4398 labelled rows: two vocabulary tiles and two row chunks, so
    # the backward's `w_chunk` and both loops' `hidden_chunk` casts are rebound while alive
    "trl-fused-head-lora-fp32w-mixed-v64k": (
        {**LLAMA, "vocab_size": 65536, "num_hidden_layers": 2},
        dict(method="lora", loss="trl-chunked-nll", model_dtype="fp32", precision="mixed", seq_len=2200),
    ),
}
LOSS_LIBRARY = {
    "chunked": "torchtune",
    "torchtune-linear-ce": "torchtune",
    "trl-chunked-nll": "trl",
    "hf": "accelerate",
}
# a file the loss needs beyond its package (torchtune's unreleased loss: no release has it)
LOSS_FILE = {"torchtune-linear-ce": ("modules", "loss", "cross_entropy_loss.py")}


def _loss_source_missing(library: str, loss: str) -> bool:
    from pathlib import Path

    found = importlib.util.find_spec(library)  # torchtune's __init__ needs torchao: only find it
    if found is None or found.origin is None:
        return True
    return loss in LOSS_FILE and not Path(found.origin).parent.joinpath(*LOSS_FILE[loss]).exists()


# The compiled decoder layers (group "compile"; docs/memory-model.md, "torch.compile"): a full
# fine-tune without checkpointing, each transformers LlamaDecoderLayer `.compile()`d as
# torchtune's compile_model does (torch 2.13 inductor on the CPU), two layers, with the eager HF
# loss ("+ Compile" of torchtune's flags table), torchtune's compiled chunked loss, and a 64-token
# vocabulary where the forward peaks at the final norm and a layer's backward comes within 3% of
# the backward's peak (the final norm's). Held to 2% per phase.
LLAMA_2L = {**LLAMA, "num_hidden_layers": 2}
COMPILE_CASES = {
    "torchtune-compile-layers-full-hf": (LLAMA_2L, dict(method="full", compile=True), B2S256),
    "torchtune-compile-layers-full-chunked": (LLAMA_2L, dict(method="full", loss="chunked", compile=True), B2S256),
    "torchtune-compile-layers-full-hf-b1s512": (
        LLAMA_2L,
        dict(method="full", compile=True),
        dict(batch_size=1, seq_len=512, lora_dropout=0.0),
    ),
    # a 64-token vocabulary: the loss is no longer the peak
    "torchtune-compile-layers-full-hf-v64": (
        {**LLAMA_2L, "vocab_size": 64, "intermediate_size": 1024},
        dict(method="full", compile=True),
        dict(batch_size=2, seq_len=512, lora_dropout=0.0),
    ),
}
COMPILE_TOL = 0.02


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(LOSS_CASES))
def test_loss_phases_match_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    cfg, fields = LOSS_CASES[name]
    loss = fields.get("loss", "hf")
    library = "axolotl" if fields.get("stack") == "axolotl" else LOSS_LIBRARY[loss]
    if _loss_source_missing(library, loss):
        pytest.skip(f"needs {library}" + (" at pytorch/torchtune@bd2a0fc" if loss in LOSS_FILE else ""))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    setup = make_setup(**{**B2S256, **fields})
    spec = load_model_spec(str(tmp_path), use_cache=False)
    phases = _model_phases(spec, setup)
    traced = trace_step(str(tmp_path), setup)
    off = phases_off(phases, traced, TOL)
    assert not off, off


# Presets at their real width and vocabulary, a few layers (group "real-width" of the
# committed trace: `python scripts/cpu_trace_report.py --group real-width`, minutes on a CPU).
# Tracing them again is too slow for CI; the model's side is not: the memory model of this
# commit against the committed traced bytes, per phase, to the same 1.5%.
def _committed(group: str) -> list[dict]:
    from pathlib import Path

    path = Path(__file__).resolve().parent / "data" / "cpu" / "trace.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["group"] == group]


def test_the_real_width_group_is_committed():
    names = {r["name"].split("/")[0] for r in _committed("real-width")}
    assert {"qwen3-8b", "qwen3-30b-a3b", "gemma-3-1b", "gemma-3-4b", "llama-3.1-8b"} <= names


def test_every_loss_case_is_committed():
    assert {r["name"] for r in _committed("loss")} == set(LOSS_CASES)


@pytest.mark.parametrize(
    ("which", "count"),
    [("axolotl", 4), ("torchtune-linear-ce", 6)],
)
def test_the_committed_rows_of_rarely_installed_losses_match_the_model(tmp_path, which, count):
    """axolotl is rarely installed where the tests run (the trace needs its chunked.py: an
    installed axolotl==0.19.0 or its source on PYTHONPATH), nor is torchtune's unreleased
    source (pytorch/torchtune@bd2a0fc, for LinearCrossEntropyLoss): the memory model of this
    commit against the committed traced bytes of their cases, per phase, to the same tolerance."""
    rows = [r for r in _committed("loss") if which in (r["setup"]["stack"], r["setup"]["loss"])]
    assert len(rows) == count
    off = {}
    for r in rows:
        (tmp_path / "config.json").write_text(json.dumps(r["config"]))
        phases = _model_phases(load_model_spec(str(tmp_path), use_cache=False), make_setup(**r["setup"]))
        for p in ("forward", "backward", "optimizer"):
            t = r[p]["traced_bytes"]
            if abs(phases[p] - t) > TOL * t:
                off[f"{r['name']}/{p}"] = f"traced {t / 2**20:.2f} MiB, model {phases[p] / 2**20:.2f} MiB"
    assert not off, off


# Adapters (issue 13; docs/memory-model.md "Adapter dtype" .. "DoRA"): bf16 adapters
# (get_peft_model(autocast_adapter_dtype=False); on a 4-bit base cast as TRL does), an
# explicit target_modules list (peft matches the names), DoRA (use_dora=True; with a wide
# MLP and a short sequence its weight norm, eye(in) and all, is the forward's peak), and
# bf16 weights under autocast (--model-dtype bf16 --precision mixed), and fp32 weights under
# autocast with a frozen base (--model-dtype fp32 --precision mixed: TRL's LoRA default), whose
# per-call bf16 weight copies autograd saves (memory/autocast.py frozen_casts). Those run CPU
# autocast: every autocast op this Llama runs sees the same dtypes on the CPU as on CUDA, on a
# bf16 stream and on an fp32 one (linear, matmul, SDPA cast to bf16 on both; CUDA's fp32 ops
# it runs, pow/rsqrt in the norms and log_softmax/nll_loss in the loss, get tensors an explicit
# .float() made fp32 already). Held to 1.5% per phase, like the structure cases.
WIDE_SHORT = dict(batch_size=1, seq_len=64, lora_dropout=0.0)
ADAPTER_MLP16K = {**LLAMA, "vocab_size": 64, "intermediate_size": 16384, "num_hidden_layers": 2}
ADAPTER_MLP16K_SHAPE = dict(batch_size=4, seq_len=256, lora_dropout=0.0)
LF_LORA = dict(stack="llamafactory", method="lora")
ADAPTER_CASES = {
    "lora-bf16": (LLAMA, dict(method="lora", adapter_dtype="bf16"), B2S256),
    "qlora-nf4-bf16": (LLAMA, dict(method="qlora", quant="nf4", adapter_dtype="bf16"), B2S256),
    "v64-lora-bf16": (TINY_VOCAB, dict(method="lora", adapter_dtype="bf16"), V64_SHAPE),
    "v64-lora-bf16-ckpt": (
        TINY_VOCAB,
        dict(method="lora", adapter_dtype="bf16", gradient_checkpointing=True),
        V64_SHAPE,
    ),
    "lora-targets-q,v": (LLAMA, dict(method="lora", lora_target_modules="q_proj,v_proj"), B2S256),
    "lora-bf16w-mixed": (LLAMA, dict(method="lora", model_dtype="bf16", precision="mixed"), B2S256),
    "full-bf16w-mixed": (LLAMA, dict(method="full", model_dtype="bf16", precision="mixed"), B2S256),
    "lora-fp32w-mixed": (LLAMA, dict(method="lora", model_dtype="fp32", precision="mixed"), B2S256),
    "lora-fp32w-mixed-ckpt": (
        LLAMA,
        dict(method="lora", model_dtype="fp32", precision="mixed", gradient_checkpointing=True),
        B2S256,
    ),
    "lora-attn-fp32w-mixed": (
        LLAMA,
        dict(method="lora", lora_targets="attention", model_dtype="fp32", precision="mixed"),
        B2S256,
    ),
    "qwen2-tied-lora-fp32w-mixed": (QWEN2, dict(method="lora", model_dtype="fp32", precision="mixed"), B2S256),
    "qlora-nf4-fp32w-mixed-ckpt": (
        LLAMA,
        dict(method="qlora", quant="nf4", model_dtype="fp32", precision="mixed", gradient_checkpointing=True),
        B2S256,
    ),
    # a 4-bit base on the fp32 stream: bitsandbytes' Linear4bit returns its output in the input's
    # dtype (fp32 gate/up, so the MLP saves fp32 tensors), hqq saves its fp32 input
    # (memory/quantization.py base_output_bytes, quant_input_bytes)
    "qlora-nf4-fp32w-mixed": (LLAMA, dict(method="qlora", quant="nf4", model_dtype="fp32", precision="mixed"), B2S256),
    "qlora-hqq4-fp32w-mixed": (
        LLAMA,
        dict(method="qlora", quant="hqq4", model_dtype="fp32", precision="mixed"),
        B2S256,
    ),
    # a 64-token vocabulary: the last layer's forward at gate/up's adapter is the forward's peak
    # (peft's sum in fp32, the base result's dtype: lora.lora_output_parts)
    "v64-qlora-nf4-fp32w-mixed": (
        TINY_VOCAB,
        dict(method="qlora", quant="nf4", model_dtype="fp32", precision="mixed"),
        V64_SHAPE,
    ),
    # no --model-dtype: fp32 masters under mixed for QLoRA too, as TRL loads the model (verify/build.py)
    "qlora-nf4-mixed": (LLAMA, dict(method="qlora", quant="nf4", precision="mixed"), B2S256),
    # torchtune's output layer runs on each of 8 chunks: eight saved copies of the frozen lm_head
    "torchtune-chunked-lora-fp32w-mixed": (
        LLAMA,
        dict(method="lora", loss="chunked", model_dtype="fp32", precision="mixed"),
        B2S256,
    ),
    "lora-dora": (LLAMA, dict(method="lora", dora=True), B2S256),
    "lora-dora-dropout": (LLAMA, dict(method="lora", dora=True, lora_dropout=0.05), B2S256),
    "lora-bf16-dora": (LLAMA, dict(method="lora", dora=True, adapter_dtype="bf16"), B2S256),
    "qlora-nf4-dora": (LLAMA, dict(method="qlora", quant="nf4", dora=True), B2S256),
    "wide-qlora-nf4-dora": (WIDE, dict(method="qlora", quant="nf4", dora=True), WIDE_SHORT),
    # the weight norm the forward's peak, the MLP's input adapter's magnitude grad the backward's
    "wide-lora-dora": (WIDE, dict(method="lora", dora=True), WIDE_SHORT),
    # a decoder layer dominating (64-token vocabulary): DoRA's per-token products and grads
    "v64-lora-dora": (TINY_VOCAB, dict(method="lora", dora=True), V64_SHAPE),
    # checkpointing: the checkpointed forward's DoRA locals, the recompute up to its early stop
    "v64-lora-dora-ckpt": (TINY_VOCAB, dict(method="lora", dora=True, gradient_checkpointing=True), V64_SHAPE),
    "wide-lora-bf16-dora-ckpt": (
        WIDE,
        dict(method="lora", dora=True, adapter_dtype="bf16", gradient_checkpointing=True),
        WIDE_SHORT,
    ),
    # LLaMA-Factory's default LoRA (bf16 weights, fp32 adapters, autocast) checkpointed at a 16384-wide
    # MLP: peft's x.to(fp32) of down's bf16 input is the recompute's local (lora.fp32_copy_local; the
    # known gap of 2026-12-05, 10.7% under before it); LLaMA-Factory checkpoints reentrant, torch's default is not
    "lf-mlp16k-lora-ckpt": (ADAPTER_MLP16K, dict(LF_LORA, gradient_checkpointing=True), ADAPTER_MLP16K_SHAPE),
    "lf-mlp16k-lora-ckpt-nonreentrant": (
        ADAPTER_MLP16K,
        dict(LF_LORA, gradient_checkpointing=True, checkpoint_reentrant=False),
        ADAPTER_MLP16K_SHAPE,
    ),
}


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(ADAPTER_CASES))
def test_adapter_phases_match_the_cpu_trace(name, tmp_path):
    from vramplan.memory import parameters, static_bytes
    from vramplan.verify.cputrace import trace_step

    cfg, fields, shape = ADAPTER_CASES[name]
    if "loss" in fields and importlib.util.find_spec(LOSS_LIBRARY[fields["loss"]]) is None:
        pytest.skip(f"needs {LOSS_LIBRARY[fields['loss']]}")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    setup = make_setup(**{**shape, **fields})
    spec = load_model_spec(str(tmp_path), use_cache=False)
    traced = trace_step(str(tmp_path), setup)
    static = sum(static_bytes(parameters(spec, setup), setup).parts.values())
    checks = {"build": (next(p.end_bytes for p in traced.phases if p.name == "build"), static)}
    checks |= {p: (traced.peak(p, step=1), b) for p, b in _model_phases(spec, setup).items()}


# The engines (issue 15): DDP and FSDP1 on rank 0 of a fake process group (verify/build.py
# wrap_ddp, shard_fsdp1; DDP with a no-op comm hook, NCCL's all-reduce being in place).
# The FSDP2 cases above are unchanged. On the CPU nothing runs ahead of the device, so
# FSDP1's forward holds one unsharded unit where a GPU, its CPU thread issuing the next
# all-gather early, holds up to two (limit_all_gathers: _FreeEventQueue max 2 in flight,
# torch==2.13.0 distributed/fsdp/_limiter_utils.py): the forward is compared less that
# second unit (FULL_SHARD only: SHARD_GRAD_OP keeps every unit anyway).
ENGINE_CASES = {
    "ddp2-full": dict(method="full", data_parallel=2),
    "ddp2-lora": dict(method="lora", data_parallel=2),
    "fsdp1-2-full": dict(method="full", fsdp=2, fsdp_version=1),
    "fsdp1-4-full-ckpt": dict(method="full", fsdp=4, fsdp_version=1, gradient_checkpointing=True),
    "fsdp1-2-shard-grad-op": dict(method="full", fsdp=2, fsdp_version=1, fsdp_sharding="shard-grad-op"),
    "fsdp1-2-lora": dict(method="lora", fsdp=2, fsdp_version=1),
    "fsdp1-2-lora-ckpt": dict(method="lora", fsdp=2, fsdp_version=1, gradient_checkpointing=True),
    # a reward model (memory/reward.py) replicated: the score head in lm_head's place
    "ddp2-reward-lora": dict(method="lora", data_parallel=2, stack="trl", objective="reward"),
    # FSDP1 under a Trainer's mixed precision: accelerate's MixedPrecision (bf16 param, reduce and
    # buffer dtypes) and its fp32 upcast of trainable bf16 weights, which verify's FSDP1 build lacked
    # until 2026-12-05 (build.fsdp1_mixed_precision, accelerate_fsdp_upcast): TRL's fp32 masters,
    # axolotl's bf16 weights upcast
    "fsdp1-2-trl-full": dict(method="full", fsdp=2, fsdp_version=1, stack="trl"),
    "fsdp1-2-axolotl-reward-full": dict(method="full", fsdp=2, fsdp_version=1, stack="axolotl", objective="reward"),
    # the root's early grads under FSDP1 wait as views' grads (fsdp.root_grads_before_layers): a reward
    # model's backward peaks in a decoder layer, where the model held the root's sharded grads before
    # (+4.8% and +8%); LLaMA-Factory's (its source on PYTHONPATH, VRAMPLAN_TRL_VALUE_HEAD set: committed
    # row held here) also pins lm_head's zero gradient and AdamW states in FSDP1's flat root parameter
    "fsdp1-2-trl-reward-full": dict(method="full", fsdp=2, fsdp_version=1, stack="trl", objective="reward"),
    "fsdp1-2-lf-reward-full": dict(method="full", fsdp=2, fsdp_version=1, stack="llamafactory", objective="reward"),
}


def engine_model_phases(spec, setup) -> dict[str, int]:
    """_model_phases, the forward less FSDP1's second in-flight unit (a GPU-only overlap)."""
    from vramplan.memory.fsdp import engine_units, gathering, root_and_layer_unit
    from vramplan.memory.parameters import parameters
    from vramplan.setup import Engine

    phases = _model_phases(spec, setup)
    if setup.engine == Engine.FSDP1 and gathering(setup).reshard_after_forward:
        phases["forward"] -= root_and_layer_unit(engine_units(parameters(spec, setup), setup))[1]
    return phases


def _engine_static(spec, setup) -> int:
    from vramplan.memory import prepare

    return sum(prepare(spec, setup).static.parts.values())


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(ENGINE_CASES))
def test_engine_step_phases_match_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    if ENGINE_CASES[name].get("stack") == "llamafactory" and importlib.util.find_spec("llamafactory") is None:
        pytest.skip("needs llamafactory==0.9.5's source and trl 0.24's value head (VRAMPLAN_TRL_VALUE_HEAD)")

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    setup = make_setup(**B2S256, **ENGINE_CASES[name])
    spec = load_model_spec(str(tmp_path), use_cache=False)
    traced = trace_step(str(tmp_path), setup)
    checks = {"build": (next(p.end_bytes for p in traced.phases if p.name == "build"), _engine_static(spec, setup))}
    for phase, predicted in engine_model_phases(spec, setup).items():
        checks[phase] = (traced.peak(phase, step=1), predicted)
    off = {
        k: f"traced {t / 2**20:.2f} MiB, model {p / 2**20:.2f} MiB"
        for k, (t, p) in checks.items()
        if abs(p - t) > TOL * t
    }
    assert not off, off


# prepare_model_for_kbit_training: the parameters it leaves (every non-4-bit one in fp32,
# hqq exempt) against the built model. The step runs under autocast (--kbit-prep needs it),
# which the CPU trace leaves out, so only the build is compared.
KBIT_CASES = {
    "qlora-nf4-ckpt": dict(method="qlora", quant="nf4", gradient_checkpointing=True),
    "qlora-hqq4": dict(method="qlora", quant="hqq4"),
    "lora": dict(method="lora"),
}


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(KBIT_CASES))
def test_kbit_prep_parameters_match_the_cpu_trace(name, tmp_path):
    from vramplan.memory import parameters, static_bytes
    from vramplan.verify.cputrace import trace_step

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    setup = make_setup(**B2S256, kbit_prep=True, precision="mixed", model_dtype="bf16", **KBIT_CASES[name])
    spec = load_model_spec(str(tmp_path), use_cache=False)
    traced = trace_step(str(tmp_path), setup, steps=0)
    built = next(p.end_bytes for p in traced.phases if p.name == "build")
    static = sum(static_bytes(parameters(spec, setup), setup).parts.values())
    assert abs(static - built) <= TOL * built, (static / 2**20, built / 2**20)


# Optimizers with the real libraries (verify/build.py's make_optimizer, the kwargs transformers'
# Trainer passes): states are held through forward and backward of step 1, so those phases
# check them; the optimizer phase checks the step's temporaries where the CPU runs CUDA's ops
# (torch foreach, transformers Adafactor, schedulefree) and is left out where it does not
# (bitsandbytes' CPU fallback, torchao's inductor CPU kernels: cputrace.incomparable_on_cpu).
# Optimizer in backward: per-parameter optimizers stepped from post-accumulate-grad hooks.
OPTIMIZER_CASES = {
    **{
        f"full-{o}": dict(method="full", optim=o)
        for o in (
            "adamw_torch_fused",
            "sgd",
            "adagrad",
            "rmsprop",
            "adafactor",
            "schedule_free_adamw",
            "adamw_8bit",
            "paged_adamw_8bit",
            "paged_adamw_32bit",
            "lion_8bit",
            "lion_32bit",
            "paged_lion_8bit",
            "ademamix_8bit",
            "rmsprop_bnb_8bit",
            "adamw_torch_8bit",
            "adamw_torch_4bit",
        )
    },
    "lora-paged_adamw_8bit": dict(method="lora", optim="paged_adamw_8bit"),
    "full-in-backward": dict(method="full", optimizer_in_backward=True),
    "full-adafactor-in-backward": dict(method="full", optim="adafactor", optimizer_in_backward=True),
    "lora-in-backward": dict(method="lora", optimizer_in_backward=True),
    "full-muon": dict(method="full", optim="muon"),
    "lora-muon": dict(method="lora", optim="muon"),
    "full-apollo_adamw": dict(method="full", optim="apollo_adamw"),
    "full-apollo_adamw_layerwise": dict(method="full", optim="apollo_adamw_layerwise"),
    "full-apollo_adamw-rank16": dict(method="full", optim="apollo_adamw", apollo_rank=16),
    "full-adam_mini": dict(method="full", optim="adam_mini"),
    "full-mixed-adam_mini": dict(method="full", optim="adam_mini", precision="mixed"),
    "full-stable_adamw": dict(method="full", optim="stable_adamw"),
    "lora-stable_adamw": dict(method="lora", optim="stable_adamw"),
    "full-lomo": dict(method="full", optim="lomo"),
    "lora-lomo": dict(method="lora", optim="lomo"),
}
OPTIMIZER_LIBRARIES = {
    "adamw_torch_8bit": "torchao",
    "adamw_torch_4bit": "torchao",
    "schedule_free_adamw": "schedulefree",
    "muon": "llamafactory",
    "apollo_adamw": "apollo_torch",
    "apollo_adamw_layerwise": "apollo_torch",
    "adam_mini": "adam_mini",
    "stable_adamw": "optimi",
    "lomo": "lomo_optim",
}
OPTIMIZER_TOL = 0.02


def optimizer_step_compared(setup) -> bool:
    from vramplan.verify.cputrace import incomparable_on_cpu

    return not any("optimizer step" in why or "low-bit step" in why for why in incomparable_on_cpu(setup))


def optimizer_model_phases(spec, setup) -> dict[str, int]:
    phases = _model_phases(spec, setup)
    if not optimizer_step_compared(setup):
        phases.pop("optimizer", None)
    return phases


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(OPTIMIZER_CASES))
def test_optimizer_states_and_steps_match_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    fields = OPTIMIZER_CASES[name]
    if fields.get("optim") in OPTIMIZER_LIBRARIES:
        pytest.importorskip(OPTIMIZER_LIBRARIES[fields["optim"]])
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    setup = make_setup(**{**B2S256, **fields})
    spec = load_model_spec(str(tmp_path), use_cache=False)
    traced = trace_step(str(tmp_path), setup)
    off = {
        p: f"traced {traced.peak(p, step=1) / 2**20:.2f} MiB, model {b / 2**20:.2f} MiB"
        for p, b in optimizer_model_phases(spec, setup).items()
        if abs(b - traced.peak(p, step=1)) > OPTIMIZER_TOL * traced.peak(p, step=1)
    }
    assert not off, off


def test_every_compile_case_is_committed():
    assert {r["name"] for r in _committed("compile")} == set(COMPILE_CASES)


@pytest.mark.cputrace
@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_compiled_layers_match_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    cfg, fields, shape = COMPILE_CASES[name]
    if fields.get("loss") == "chunked" and importlib.util.find_spec("torchtune") is None:
        pytest.skip("needs torchtune")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    setup = make_setup(**{**shape, **fields})
    phases = _model_phases(load_model_spec(str(tmp_path), use_cache=False), setup)
    traced = trace_step(str(tmp_path), setup)
    off = phases_off(phases, traced, COMPILE_TOL)
    assert not off, off


def test_the_optimizer_group_is_committed():
    names = {r["name"] for r in _committed("optimizers")}
    assert {"full-paged_adamw_8bit", "full-adafactor", "full-lion_8bit", "full-sgd", "full-in-backward"} <= names


def test_the_engines_group_is_committed():
    assert {r["name"] for r in _committed("engines")} == set(ENGINE_CASES)


# The committed rows of these groups against this commit's model, per phase, without tracing:
# the fast tier holds every traced case of them, whether or not its library is installed.
_COMMITTED_RULES = {
    "real-width": (_model_phases, TOL),
    "adapters": (_model_phases, TOL),
    "loss": (_model_phases, TOL),
    "compile": (_model_phases, COMPILE_TOL),
    "optimizers": (optimizer_model_phases, OPTIMIZER_TOL),
    "engines": (engine_model_phases, TOL),
}


@pytest.mark.parametrize(
    "row", [r for g in _COMMITTED_RULES for r in _committed(g)], ids=lambda r: f"{r['group']}/{r['name']}"
)
def test_committed_rows_match_this_model(row, tmp_path):
    rule, tol = _COMMITTED_RULES[row["group"]]
    (tmp_path / "config.json").write_text(json.dumps(row["config"]))
    spec = load_model_spec(str(tmp_path), use_cache=False)
    phases = rule(spec, make_setup(**row["setup"]))
    off = {
        p: f"traced {row[p]['traced_bytes'] / 2**20:.2f} MiB, model {b / 2**20:.2f} MiB"
        for p, b in phases.items()
        if abs(b - row[p]["traced_bytes"]) > tol * row[p]["traced_bytes"]
    }
    assert phases and not off, off


# DPO (group "preference"; docs/memory-model.md, "Preference steps (DPO)"): trl==1.16.0's
# DPOTrainer step as verify runs it (verify/losses.py dpo_step: TRL's fused head on the chosen and
# rejected rows, then the no-grad reference forward through peft's disabled adapters or the frozen
# copy), on TRL's defaults (fp32 weights under bf16 autocast, checkpointing) and in bf16, saving and
# checkpointed, LoRA, QLoRA and full, and with the reference log-probs precomputed. PREF_WIDE (a
# 16384-wide MLP, a 64-token vocabulary): the reference forward's decoder layer is the forward's
# peak, not the fused head's 32768-column tile. Held to 1.5% per phase.
PREF_WIDE = {**LLAMA, "vocab_size": 64, "intermediate_size": 16384, "num_hidden_layers": 2}
# 1024 wide, 64 tokens a row: the dequantized weight at the up projection's matmul is the layer's widest
PREF_MATMUL = {**PREF_WIDE, "hidden_size": 1024}
DPO = dict(stack="trl", objective="dpo")
KTO = dict(stack="trl", objective="kto")
AX_KTO = dict(stack="axolotl", objective="kto")
LF_KTO = dict(stack="llamafactory", objective="kto")
AX_ORPO = dict(stack="axolotl", objective="orpo")
AX_DPO = dict(stack="axolotl", objective="dpo")
LF_DPO = dict(stack="llamafactory", objective="dpo")
# a 32768-token vocabulary on two layers: the logits (4 bytes x 2 rows x 128 x 32768 each copy) lead
PREF_BIGV = {**LLAMA, "vocab_size": 32768, "num_hidden_layers": 2}
PREFERENCE_CASES = {
    "dpo-lora": (LLAMA, dict(DPO, method="lora")),
    "dpo-full": (LLAMA, dict(DPO, method="full")),
    "dpo-full-saving": (LLAMA, dict(DPO, method="full", gradient_checkpointing=False)),
    "dpo-lora-precomputed": (LLAMA, dict(DPO, method="lora", precompute_ref_log_probs=True)),
    "dpo-wide-lora": (PREF_WIDE, dict(DPO, method="lora")),
    "dpo-wide-lora-saving": (PREF_WIDE, dict(DPO, method="lora", gradient_checkpointing=False)),
    "dpo-wide-qlora": (PREF_WIDE, dict(DPO, method="qlora")),
    "dpo-wide-lora-bf16": (PREF_WIDE, dict(DPO, method="lora", precision="bf16", model_dtype="bf16")),
    "dpo-wide-full-bf16": (PREF_WIDE, dict(DPO, method="full", precision="bf16", model_dtype="bf16")),
    "dpo-matmul-qlora": (PREF_MATMUL, dict(DPO, method="qlora", batch_size=1, seq_len=64)),
    # WPO weights (use_weighting): TRL's fused head returns log_sum_sq_probs too
    "dpo-lora-weighting": (LLAMA, dict(DPO, method="lora", dpo_use_weighting=True)),
    # axolotl==0.19.0's rl: dpo, trl==1.9.0's DPOTrainer._compute_loss run as it is (its pin; traced
    # with trl 1.9.0's wheel first on PYTHONPATH, so only the committed rows are held here): the
    # policy's and the reference's fp32 logits, the metrics' copy, the reference copy (fp32
    # embeddings and norms, as axolotl loads it), kept under precompute_ref_log_probs too
    "ax-dpo-lora": (LLAMA, dict(AX_DPO, method="lora")),
    "ax-dpo-lora-ckpt": (LLAMA, dict(AX_DPO, method="lora", gradient_checkpointing=True)),
    "ax-dpo-full": (LLAMA, dict(AX_DPO, method="full")),
    "ax-dpo-lora-precomputed": (LLAMA, dict(AX_DPO, method="lora", precompute_ref_log_probs=True)),
    "ax-dpo-full-precomputed": (LLAMA, dict(AX_DPO, method="full", precompute_ref_log_probs=True)),
    "ax-dpo-qlora-ckpt": (LLAMA, dict(AX_DPO, method="qlora", gradient_checkpointing=True)),
    "ax-dpo-wide-lora": (PREF_WIDE, dict(AX_DPO, method="lora")),
    "ax-dpo-bigv-lora": (PREF_BIGV, dict(AX_DPO, method="lora", batch_size=1, seq_len=128)),
    # dpo_use_weighting: trl 1.9.0's two logsumexps over the fp32 logits (dpo_trainer.py:1565-1576)
    "ax-dpo-bigv-lora-weighting": (
        PREF_BIGV,
        dict(AX_DPO, method="lora", batch_size=1, seq_len=128, dpo_use_weighting=True),
    ),
    "ax-dpo-lora-weighting": (LLAMA, dict(AX_DPO, method="lora", dpo_use_weighting=True)),
    # llamafactory==0.9.5's stage: dpo, CustomDPOTrainer's own get_batch_loss_metrics, concatenated_forward
    # and get_batch_logps executed from its source (its source on PYTHONPATH: committed rows held here):
    # the fp32 logits and their log-softmax (over a contiguous copy of the shifted slice) of the
    # policy and the reference; a bf16 reference copy beside the fp32 policy; simpo, no reference
    "lf-dpo-lora": (LLAMA, dict(LF_DPO, method="lora")),
    "lf-dpo-full": (LLAMA, dict(LF_DPO, method="full")),
    "lf-dpo-lora-saving": (LLAMA, dict(LF_DPO, method="lora", gradient_checkpointing=False)),
    "lf-dpo-bigv-lora": (PREF_BIGV, dict(LF_DPO, method="lora", batch_size=1, seq_len=128)),
    "lf-dpo-lora-simpo": (LLAMA, dict(LF_DPO, method="lora", precompute_ref_log_probs=True)),
    # a 64x-wide MLP under autocast over bf16 weights with fp32 adapters, saving and checkpointed (the
    # checkpointed one was a known gap of the SFT step's backward until lora.fp32_copy_local)
    "lf-dpo-wide-lora": (PREF_WIDE, dict(LF_DPO, method="lora", gradient_checkpointing=False)),
    "lf-dpo-wide-lora-ckpt": (PREF_WIDE, dict(LF_DPO, method="lora", gradient_checkpointing=True)),
    # trl==1.16.0's KTOTrainer._compute_loss (verify/losses.py kto_step): one row per example, the KL
    # rows scored without grad by the policy and the reference (peft: adapters disabled; full: the copy)
    "kto-lora": (LLAMA, dict(KTO, method="lora")),
    "kto-full": (LLAMA, dict(KTO, method="full")),
    "kto-qlora": (LLAMA, dict(KTO, method="qlora")),
    "kto-lora-no-kl": (LLAMA, dict(KTO, method="lora", kto_kl=False)),
    "kto-full-precomputed": (LLAMA, dict(KTO, method="full", precompute_ref_log_probs=True)),
    "kto-wide-lora": (PREF_WIDE, dict(KTO, method="lora")),
    "kto-wide-full-saving": (PREF_WIDE, dict(KTO, method="full", gradient_checkpointing=False)),
    # axolotl==0.19.0's rl: kto, trl==1.9.0's KTOTrainer._compute_loss (trl 1.9.0 first on PYTHONPATH:
    # committed rows held here): the policy's and the reference's fp32 logits, the KL rows' forwards,
    # the metrics' copies of the desirable and undesirable rows' logits
    "ax-kto-lora": (LLAMA, dict(AX_KTO, method="lora")),
    "ax-kto-full": (LLAMA, dict(AX_KTO, method="full")),
    "ax-kto-qlora-ckpt": (LLAMA, dict(AX_KTO, method="qlora", gradient_checkpointing=True)),
    "ax-kto-lora-no-kl": (LLAMA, dict(AX_KTO, method="lora", kto_kl=False)),
    "ax-kto-lora-precomputed": (LLAMA, dict(AX_KTO, method="lora", precompute_ref_log_probs=True)),
    "ax-kto-bigv-lora": (PREF_BIGV, dict(AX_KTO, method="lora", seq_len=128)),
    # axolotl==0.19.0's rl: orpo / rl: simpo, trl==1.9.0's experimental ORPOTrainer / CPOTrainer
    # get_batch_loss_metrics as they are (trl 1.9.0 first on PYTHONPATH: committed rows held here)
    "ax-orpo-lora": (LLAMA, dict(AX_ORPO, method="lora")),
    "ax-orpo-full": (LLAMA, dict(AX_ORPO, method="full")),
    "ax-orpo-qlora-ckpt": (LLAMA, dict(AX_ORPO, method="qlora", gradient_checkpointing=True)),
    "ax-simpo-lora-no-nll": (LLAMA, dict(AX_ORPO, method="lora", chosen_nll=False)),
    "ax-orpo-bigv-lora": (PREF_BIGV, dict(AX_ORPO, method="lora", batch_size=1, seq_len=128)),
    # llamafactory==0.9.5's stage: kto, CustomKTOTrainer's own get_batch_loss_metrics, forward and
    # concatenated_forward executed from its source (its source on PYTHONPATH: committed rows held here)
    "lf-kto-lora": (LLAMA, dict(LF_KTO, method="lora")),
    "lf-kto-full": (LLAMA, dict(LF_KTO, method="full")),
    "lf-kto-lora-saving": (LLAMA, dict(LF_KTO, method="lora", gradient_checkpointing=False)),
    "lf-kto-bigv-lora": (PREF_BIGV, dict(LF_KTO, method="lora", seq_len=128)),
    "lf-kto-wide-lora": (PREF_WIDE, dict(LF_KTO, method="lora", gradient_checkpointing=False)),
}


# GRPO (group "grpo"; docs/memory-model.md, "GRPO"): trl==1.16.0's GRPOTrainer as verify runs it
# (verify/losses.py grpo_step: model.generate over the generation batch, the no-grad scoring of
# TRL's own _get_per_token_logps_and_entropies, then its own _compute_loss), on TRL's defaults (fp32
# weights, bf16 autocast, checkpointing). GRPO_MHA (8 KV heads) with 16 micro-batches per generation
# (32 rows): the generation is the forward's peak, at the last decode step (a long completion) or
# at the prefill (a short one): the cases pin the generation rule.
GRPO_MHA = {**LLAMA, "num_key_value_heads": 8}
GRPO = dict(stack="trl", objective="grpo")
GRPO_GEN = dict(GRPO, steps_per_generation=16)
AX_GRPO = dict(stack="axolotl", objective="grpo")
GRPO_CASES = {
    "grpo-lora": (LLAMA, dict(GRPO, method="lora", completion_len=128)),
    "grpo-full": (LLAMA, dict(GRPO, method="full", completion_len=128)),
    "grpo-beta-full": (LLAMA, dict(GRPO, method="full", completion_len=128, beta=0.04)),
    "grpo-beta-lora-iter": (LLAMA, dict(GRPO, method="lora", completion_len=128, beta=0.04, num_iterations=2)),
    "grpo-decode-lora": (GRPO_MHA, dict(GRPO_GEN, method="lora", completion_len=160)),
    "grpo-decode-full": (GRPO_MHA, dict(GRPO_GEN, method="full", completion_len=160)),
    "grpo-decode-lora-bf16": (
        GRPO_MHA,
        dict(GRPO_GEN, method="lora", completion_len=160, precision="bf16", model_dtype="bf16"),
    ),
    "grpo-prefill-lora": (GRPO_MHA, dict(GRPO_GEN, method="lora", completion_len=32)),
    # every Linear adapted: peft's adapter path runs through generation (fp32 weights and adapters)
    "grpo-prefill-lora-all": (GRPO_MHA, dict(GRPO_GEN, method="lora", completion_len=32, lora_targets="all-linear")),
    "grpo-prefill-full": (GRPO_MHA, dict(GRPO_GEN, method="full", completion_len=32)),
    "grpo-prefill-qlora": (GRPO_MHA, dict(GRPO_GEN, method="qlora", completion_len=32)),
    # axolotl==0.19.0's `rl: grpo`: trl==1.9.0's GRPOTrainer (trl 1.9.0 first on PYTHONPATH: committed rows
    # held here), the log-probs from the model's logits over the completion (logits_to_keep), converted
    # to fp32 by accelerate; axolotl's bf16 weights, fp32 adapters, peft's layers (no LoRA kernels for RL)
    "ax-grpo-lora": (LLAMA, dict(AX_GRPO, method="lora", completion_len=128)),
    "ax-grpo-full": (LLAMA, dict(AX_GRPO, method="full", completion_len=128)),
    "ax-grpo-beta-lora-ckpt": (
        LLAMA,
        dict(AX_GRPO, method="lora", completion_len=128, beta=0.04, gradient_checkpointing=True),
    ),
    "ax-grpo-qlora-ckpt-iter": (
        LLAMA,
        dict(AX_GRPO, method="qlora", completion_len=192, num_iterations=2, gradient_checkpointing=True),
    ),
    "ax-grpo-bigv-lora": (PREF_BIGV, dict(AX_GRPO, method="lora", completion_len=96)),
    "ax-grpo-decode-lora": (GRPO_MHA, dict(AX_GRPO, steps_per_generation=16, method="lora", completion_len=160)),
}
# Reward models (group "reward"; docs/memory-model.md, "Reward models"): trl==1.16.0's
# RewardTrainer.compute_loss as verify runs it (verify/losses.py reward_step) over
# AutoModelForSequenceClassification(num_labels=1): no lm_head, a one-output score head trained
# (peft's SEQ_CLS modules_to_save copy under LoRA), chosen and rejected rows. TRL's defaults (fp32
# weights, bf16 autocast, checkpointing) and axolotl's (bf16 weights, fp32 adapters, peft's layers: its fused
# LoRA kernels are Triton); a tied model keeps its embedding. Without checkpointing the forward peaks in the
# last layer (no logits): axolotl's peaks at down's adapter, where peft's x.to(fp32) of the bf16 stream is a
# local (lora.lora_copy_local).
REWARD = dict(stack="trl", objective="reward")
AX_REWARD = dict(stack="axolotl", objective="reward")
AX_REWARD_PEFT = dict(AX_REWARD, lora_kernels=False)
LF_REWARD = dict(stack="llamafactory", objective="reward")
REWARD_TIED = {**LLAMA, "tie_word_embeddings": True}
REWARD_CASES = {
    "reward-lora": (LLAMA, dict(REWARD, method="lora")),
    "reward-full": (LLAMA, dict(REWARD, method="full")),
    "reward-lora-saving": (LLAMA, dict(REWARD, method="lora", gradient_checkpointing=False)),
    "reward-full-saving": (LLAMA, dict(REWARD, method="full", gradient_checkpointing=False)),
    "reward-qlora": (LLAMA, dict(REWARD, method="qlora")),
    "reward-full-bf16": (LLAMA, dict(REWARD, method="full", precision="bf16", model_dtype="bf16")),
    "reward-tied-full": (REWARD_TIED, dict(REWARD, method="full")),
    "reward-wide-lora": (PREF_WIDE, dict(REWARD, method="lora")),
    "ax-reward-lora": (LLAMA, dict(AX_REWARD_PEFT, method="lora")),
    "ax-reward-full": (LLAMA, dict(AX_REWARD, method="full")),
    "ax-reward-lora-dropout": (LLAMA, dict(AX_REWARD_PEFT, method="lora", lora_dropout=0.05)),
    "ax-reward-qlora-ckpt": (LLAMA, dict(AX_REWARD_PEFT, method="qlora", gradient_checkpointing=True)),
    # llamafactory==0.9.5's stage rm: PairwiseTrainer.compute_loss and trl 0.24's value head, executed
    # from their source (llamafactory's on PYTHONPATH, VRAMPLAN_TRL_VALUE_HEAD naming trl 0.24's file:
    # committed rows held here): the whole causal LM with its LM loss, dropped; lm_head given no gradient
    "lf-reward-lora": (LLAMA, dict(LF_REWARD, method="lora")),
    "lf-reward-full": (LLAMA, dict(LF_REWARD, method="full")),
    "lf-reward-lora-saving": (LLAMA, dict(LF_REWARD, method="lora", gradient_checkpointing=False)),
    "lf-reward-bigv-lora": (PREF_BIGV, dict(LF_REWARD, method="lora", batch_size=1, seq_len=128)),
}

# the cases whose forward peak is the generation (the rule they pin)
GRPO_GENERATION_PEAK = (
    "grpo-decode-lora",
    "grpo-decode-full",
    "grpo-decode-lora-bf16",
    "grpo-prefill-lora",
    "grpo-prefill-lora-all",
    "ax-grpo-decode-lora",
)


def _forward_peak_kind(spec, setup) -> PhaseKind:
    forward = [p for p in step_model(spec, setup).phases if p.measured == MeasuredPhase.FORWARD]
    return max(forward, key=lambda p: p.allocated).kind


# traced again in the CPU-trace tier: one of each kind (peft's disabled adapters, the copy, the
# reference's layer moment at the product and at the matmul); every case's committed row is held
# by the fast tier below
PREFERENCE_RETRACED = ("dpo-lora", "dpo-full", "dpo-wide-lora", "dpo-matmul-qlora", "kto-lora")


@pytest.mark.cputrace
@pytest.mark.parametrize("name", PREFERENCE_RETRACED)
def test_dpo_step_phases_match_the_cpu_trace(name, tmp_path):
    from vramplan.verify.cputrace import trace_step

    if importlib.util.find_spec("trl") is None:
        pytest.skip("needs trl==1.16.0 (the [test] extra)")
    cfg, fields = PREFERENCE_CASES[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    setup = make_setup(**{**B2S256, **fields})
    spec = load_model_spec(str(tmp_path), use_cache=False)
    if cfg in (PREF_WIDE, PREF_MATMUL):  # the case pins the reference forward's rule
        assert _forward_peak_kind(spec, setup) == PhaseKind.REFERENCE_FORWARD
    phases = _model_phases(spec, setup)
    traced = trace_step(str(tmp_path), setup)
    off = phases_off(phases, traced, TOL)
    assert not off, off


def test_every_preference_case_is_committed():
    assert {r["name"] for r in _committed("preference")} == set(PREFERENCE_CASES)


def committed_rows_off(group: str, tmp_path, peak_kind: Callable[[dict], PhaseKind | None]) -> dict[str, str]:
    """Every committed row of `group` against this commit's model, per phase, to TOL; a row whose
    `peak_kind(row)` names a kind must have its forward peak there (the rule the case pins)."""
    off = {}
    for r in _committed(group):
        (tmp_path / "config.json").write_text(json.dumps(r["config"]))
        spec = load_model_spec(str(tmp_path), use_cache=False)
        setup = make_setup(**r["setup"])
        kind = peak_kind(r)
        if kind is not None:
            assert _forward_peak_kind(spec, setup) == kind, r["name"]
        phases = _model_phases(spec, setup)
        for p in ("forward", "backward", "optimizer"):
            t = r[p]["traced_bytes"]
            if abs(phases[p] - t) > TOL * t:
                off[f"{r['name']}/{p}"] = f"traced {t / 2**20:.2f} MiB, model {phases[p] / 2**20:.2f} MiB"
    return off


def test_the_committed_dpo_rows_match_the_model(tmp_path):
    """The memory model of this commit against every committed traced row of the preference
    group (trl==1.16.0's DPOTrainer step on the CPU), per phase, to the same tolerance; the
    64-token-vocabulary cases pin the reference forward's rule."""
    off = committed_rows_off(
        "preference",
        tmp_path,
        # LLaMA-Factory's checkpointed wide case pins the checkpointed layer's forward instead
        lambda r: (
            PhaseKind.FORWARD_CHECKPOINTED_LAYER
            if r["name"] == "lf-dpo-wide-lora-ckpt"
            else PhaseKind.REFERENCE_FORWARD
            if r["config"]["vocab_size"] == 64
            else None
        ),
    )
    assert len(_committed("preference")) == len(PREFERENCE_CASES)
    assert not off, off


def _retrace_trl_case(cases: dict, name: str, tmp_path) -> None:
    """Trace one case of a TRL trainer's group (grpo, reward) and hold every phase to TOL."""
    from vramplan.verify.cputrace import trace_step

    if importlib.util.find_spec("trl") is None:
        pytest.skip("needs trl==1.16.0 (the [test] extra)")
    cfg, fields = cases[name]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    setup = make_setup(**{**B2S256, **fields})
    spec = load_model_spec(str(tmp_path), use_cache=False)
    off = phases_off(_model_phases(spec, setup), trace_step(str(tmp_path), setup), TOL)
    assert not off, off


# traced again in the CPU-trace tier: the training step, a decode-step peak and a prefill peak
GRPO_RETRACED = ("grpo-lora", "grpo-decode-full", "grpo-prefill-lora")


@pytest.mark.cputrace
@pytest.mark.parametrize("name", GRPO_RETRACED)
def test_grpo_step_phases_match_the_cpu_trace(name, tmp_path):
    _retrace_trl_case(GRPO_CASES, name, tmp_path)


def test_every_grpo_case_is_committed():
    assert [r["name"] for r in _committed("grpo")] == list(GRPO_CASES)


def test_the_committed_grpo_rows_match_the_model(tmp_path):
    """The memory model of this commit against every committed traced row of the grpo group
    (trl==1.16.0's GRPOTrainer on the CPU: generation, scoring and its _compute_loss), per phase, to
    the same tolerance; the generation cases' forward peak is the generation."""
    off = committed_rows_off(
        "grpo", tmp_path, lambda r: PhaseKind.GENERATION if r["name"] in GRPO_GENERATION_PEAK else None
    )
    assert not off, off


# where each reward case's forward peaks, the rule it pins: no logits, so the peak is a decoder
# layer's forward or the final norm
REWARD_PEAKS = {
    "reward-lora-saving": PhaseKind.FORWARD_FINAL_NORM,
    "reward-full-saving": PhaseKind.FORWARD_FINAL_NORM,
    "ax-reward-full": PhaseKind.FORWARD_FINAL_NORM,
    "ax-reward-lora": PhaseKind.FORWARD_LAST_LAYER,
    "ax-reward-lora-dropout": PhaseKind.FORWARD_LAST_LAYER,
    "ax-reward-qlora-ckpt": PhaseKind.FORWARD_CHECKPOINTED_LAYER,
    # LLaMA-Factory's value head: the causal LM's LM loss and the wrapper's fp32 logits
    "lf-reward-lora-saving": PhaseKind.FORWARD_LOSS,
    "lf-reward-bigv-lora": PhaseKind.FORWARD_LOSS,
}
# traced again in the CPU-trace tier: TRL's checkpointed LoRA, a tied full fine-tune, axolotl's LoRA
REWARD_RETRACED = ("reward-lora", "reward-tied-full", "ax-reward-lora")


@pytest.mark.cputrace
@pytest.mark.parametrize("name", REWARD_RETRACED)
def test_reward_step_phases_match_the_cpu_trace(name, tmp_path):
    _retrace_trl_case(REWARD_CASES, name, tmp_path)


def test_every_reward_case_is_committed():
    assert [r["name"] for r in _committed("reward")] == list(REWARD_CASES)


def test_the_committed_reward_rows_match_the_model(tmp_path):
    """The memory model of this commit against every committed traced row of the reward group
    (trl==1.16.0's RewardTrainer.compute_loss over a sequence-classification model on the CPU), per
    phase, to the same tolerance, each pinned case's forward peak where REWARD_PEAKS says."""
    off = committed_rows_off("reward", tmp_path, lambda r: REWARD_PEAKS.get(r["name"]))
    assert not off, off
