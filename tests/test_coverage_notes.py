"""What an estimate says about the architecture it rests on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramplan.estimate import TRACED_MODEL_TYPES, estimate_config

ROOT = Path(__file__).resolve().parent


def _config(tmp_path, cfg: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_every_model_type_claimed_as_checked_is_in_a_cpu_trace_case():
    import test_cpu_trace as t

    traced = {cfg["model_type"] for cases in (t.CASES, t.LAYER_ARCH_CASES) for cfg, _ in cases.values()}
    assert TRACED_MODEL_TYPES <= traced, TRACED_MODEL_TYPES - traced


def test_a_preset_architecture_carries_no_coverage_note():
    est = estimate_config("qwen3-8b", "1x80GB", method="lora")
    assert not [n for n in est.notes if "never checked" in n or "no rule" in n]


def test_an_untraced_architecture_says_so(tmp_path):
    """Phi (Phi-2): parallel attention and MLP on one LayerNorm; its CPU trace reads 13% low."""
    cfg = dict(
        architectures=["PhiForCausalLM"],
        model_type="phi",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
    )
    est = estimate_config(_config(tmp_path, cfg), "1x80GB", method="lora")
    assert any(n.startswith("phi:") and "never checked" in n and "--device cpu" in n for n in est.notes), est.notes


def test_linears_without_a_rule_are_named(tmp_path):
    """DeepSeek-V2's multi-head latent attention: kv_a_proj_with_mqa / kv_b_proj have no
    activation rule (the CPU trace reads the estimate about 21% low)."""
    cfg = dict(
        architectures=["DeepseekV2ForCausalLM"],
        model_type="deepseek_v2",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        kv_lora_rank=32,
        q_lora_rank=None,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        max_position_embeddings=512,
    )
    est = estimate_config(_config(tmp_path, cfg), "1x80GB", method="lora")
    note = next(n for n in est.notes if "no rule" in n)
    assert "kv_a_proj_with_mqa" in note and "underestimated" in note


def test_model_dropout_is_named(tmp_path):
    """transformers' default Seed-OSS config trains with attention_dropout = residual_dropout
    = 0.1: each dropout keeps a mask that no rule counts (its CPU trace reads 39% low)."""
    cfg = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        max_position_embeddings=512,
        attention_dropout=0.1,
    )
    est = estimate_config(_config(tmp_path, cfg), "1x80GB", method="lora")
    assert any("attention_dropout=0.1" in n and "underestimated" in n for n in est.notes), est.notes
    plain = estimate_config(_config(tmp_path, {**cfg, "attention_dropout": 0.0}), "1x80GB", method="lora")
    assert not any("dropout" in n for n in plain.notes)


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_comparison_and_plan_show_the_architecture_note(tmp_path, capsys):
    from vramplan.cli import main
    from vramplan.plan import plan_model

    cfg = dict(
        architectures=["PhiForCausalLM"],
        model_type="phi",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = _config(tmp_path, cfg)
    assert main(["estimate", model, "--gpus", "1x24GB"]) == 0
    assert "note: phi: this architecture's layers were never checked" in capsys.readouterr().out.replace("\n", " ")
    assert any("never checked" in n for n in plan_model(model, "1x24GB", top=1).notes)
    assert plan_model("llama-3.2-1b", "rtx-4090", top=1).notes == []  # a named card: no note on how it was read


def test_a_loss_dominated_peak_says_where_the_memory_goes():
    """Qwen3-0.6B with checkpointing at 4k tokens: the loss on 151,936-entry logits is most
    of the peak; the note gives the estimate's own loss-backward transient."""
    from vramplan.categories import Category as C

    est = estimate_config("qwen3-0.6b", "1x24GB", method="lora", gradient_checkpointing=True, seq_len=4096)
    assert est.per_gpu.peak_phase == "loss backward"
    loss = est.per_gpu.breakdown[C.TRANSIENT]
    note = next(n for n in est.notes if "loss backward on 151,936-entry logits" in n)
    assert f"{loss / 2**30:.2f} GiB" in note
    big = estimate_config(
        "llama-2-70b",
        "2x24GB",
        method="qlora",
        lora_r=64,
        fsdp=2,
        cpu_offload=True,
        gradient_checkpointing=True,
        batch_size=2,
    )
    assert not any("cross-entropy" in n for n in big.notes)


def test_an_image_text_checkpoint_says_its_vision_tower_is_counted():
    est = estimate_config("gemma-3-4b", "1x24GB", method="qlora", gradient_checkpointing=True)
    assert any("Gemma3ForConditionalGeneration" in n and "0.42B" in n for n in est.notes), est.notes
    assert not any("ForConditionalGeneration" in n for n in estimate_config("gemma-3-1b", "1x24GB").notes)
