"""Unsloth's fused LoRA layers (vramplan/memory/unsloth.py), by hand from unsloth==2026.10.9's
save_for_backward calls (docs/memory-model.md, "Unsloth's fused LoRA layers")."""

from __future__ import annotations

from vramplan.estimate import make_setup
from vramplan.memory.layer import layer_points, layer_saved_per_token
from vramplan.memory.unsloth import unsloth_fused
from vramplan.model_loader import load_model_spec

H, F, Q, KV, HEADS = 4096, 14336, 4096, 1024, 32  # Llama 3.1 8B


def _setup(**fields):
    base = dict(method="qlora", lora_r=32, lora_targets="all-linear", stack="unsloth", batch_size=1, seq_len=4096)
    return make_setup(**{**base, **fields})


def test_llama_layer_saves_what_the_functions_save():
    spec = load_model_spec("llama-3.1-8b", num_layers=2)
    layer = spec.layers[1]
    # SDPA: q, k, v after RoPE, its output (o_proj's X, the same tensor), fp32 logsumexp per head
    attention = 2 * Q + 2 * KV + 2 * KV + 2 * Q + 4 * HEADS
    # input norm: r only (the checkpoint holds X); LoRA_QKV: X; post-attn norm: X + r; LoRA_MLP: X, e, g
    want = 4 + 2 * H + attention + (2 * H + 4) + 2 * H + 2 * F + 2 * F
    assert layer_saved_per_token(spec, layer, _setup(gradient_checkpointing=True)) == want
    # without checkpointing the input norm's X (the previous layer's output) is its own save
    plain = _setup(gradient_checkpointing=False, activation_offload="none")
    assert layer_saved_per_token(spec, layer, plain) == want + 2 * H
    pts = layer_points(spec, layer, plain)
    assert (pts.down_saved, pts.lora_bwd, pts.mlp_grads) == (0, 0, 2 * H + 2 * F)  # dY + DW
    assert pts.lora_fwd == 2 * F + 2 * H  # h = act(e) * g and the output i
    assert pts.quant_numel == H * F  # up's weight, dequantized in LoRA_MLP's backward


def test_peft_layers_where_unsloth_does_not_fuse():
    llama = load_model_spec("llama-3.1-8b", num_layers=1)
    qwen = load_model_spec("qwen2.5-0.5b", num_layers=1)  # q/k/v biases
    assert unsloth_fused(llama, llama.layers[0], _setup())
    assert not unsloth_fused(llama, llama.layers[0], _setup(lora_dropout=0.05))
    assert not unsloth_fused(llama, llama.layers[0], _setup(stack="plain"))
    assert not unsloth_fused(llama, llama.layers[0], _setup(lora_targets="attention"))
    assert not unsloth_fused(qwen, qwen.layers[0], _setup())
