"""axolotl's fused LoRA kernels (vramplan/memory/lora_kernels.py, --lora-kernels), by hand from
axolotl==0.19.0 kernels/lora.py's save_for_backward calls and backward allocations
(docs/memory-model.md, "axolotl's LoRA kernels"). Not measured: the kernels are Triton."""

from __future__ import annotations

import pytest

from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory.layer import layer_points, layer_saved_per_token
from vramplan.memory.lora_kernels import kernels_fused
from vramplan.model_loader import load_model_spec

H, F, Q, KV, HEADS = 4096, 14336, 4096, 1024, 32  # Llama 3.1 8B


def _setup(**fields):
    base = dict(method="qlora", lora_r=16, lora_targets="all-linear", lora_kernels=True, batch_size=1, seq_len=4096)
    return make_setup(**{**base, **fields})


def test_llama_layer_saves_what_the_functions_save():
    spec = load_model_spec("llama-3.1-8b", num_layers=2)
    layer = spec.layers[1]
    # SDPA: q, k, v after RoPE, its output (o_proj's X, the same tensor), fp32 logsumexp per head
    attention = 2 * Q + 2 * KV + 2 * KV + 2 * Q + 4 * HEADS
    # transformers' RMSNorm (frozen weight, input needs grad): its fp32 upcast, 4h, twice;
    # LoRA_QKV: X; LoRA_MLP: X, gate, up; no dropout at p = 0
    no_dropout = 4 * H + 2 * H + attention + 4 * H + 2 * H + 2 * F + 2 * F
    assert layer_saved_per_token(spec, layer, _setup(lora_dropout=0.0)) == no_dropout
    # dropout: X_drop (bf16) and the bool mask for the QKV, O and MLP groups, once per group
    dropout = (2 * H + H) + (2 * Q + Q) + (2 * H + H)
    assert layer_saved_per_token(spec, layer, _setup(lora_dropout=0.05)) == no_dropout + dropout


def test_llama_layer_backward_moments():
    spec = load_model_spec("llama-3.1-8b", num_layers=2)
    layer = spec.layers[1]
    pts = layer_points(spec, layer, _setup(lora_dropout=0.05))
    # dY + grad_down [N, f] + dX [N, h], a new tensor (not the saved X) + dX_drop
    assert (pts.down_saved, pts.lora_bwd, pts.mlp_grads) == (0, 0, 2 * H + 2 * F + 2 * H + 2 * H)
    # beside a dequantized weight: dX_drop comes after both weights are freed
    assert pts.quant_bwd == 2 * H + 2 * F + 2 * H and pts.quant_numel == H * F
    assert pts.lora_fwd == 2 * F + 2 * H  # hidden = act(gate, up) and the output
    # checkpointing's first pass: stream, norm output, its dropout, gate, up, hidden, output
    assert pts.ckpt_fwd == 2 * H + 2 * H + 2 * H + 3 * 2 * F + 2 * H


def test_fewer_activations_than_peft():
    """The point of the kernels (axolotl's lora_optims docs): per layer, less than peft's."""
    spec = load_model_spec("llama-3.1-8b", num_layers=2)
    layer = spec.layers[1]
    for dropout in (0.0, 0.05):
        fused = layer_saved_per_token(spec, layer, _setup(lora_dropout=dropout))
        peft = layer_saved_per_token(spec, layer, _setup(lora_dropout=dropout, lora_kernels=False))
        assert fused < peft, dropout


def test_layers_the_rule_does_not_cover_keep_peft():
    llama = load_model_spec("llama-3.1-8b", num_layers=1)
    qwen3 = load_model_spec("qwen3-0.6b", num_layers=1)  # q/k norms: fused, run after LoRA_QKV
    qwen2 = load_model_spec("qwen2.5-0.5b", num_layers=1)  # q/k/v biases: added in matmul_lora
    phi3 = load_model_spec("phi-3-mini", num_layers=1)  # fused qkv_proj: axolotl does not patch it
    assert kernels_fused(llama, llama.layers[0], _setup())
    assert kernels_fused(qwen3, qwen3.layers[0], _setup())
    assert kernels_fused(qwen2, qwen2.layers[0], _setup())
    assert not kernels_fused(phi3, phi3.layers[0], _setup())
    assert not kernels_fused(llama, llama.layers[0], _setup(lora_targets="attention"))
    assert not kernels_fused(llama, llama.layers[0], _setup(lora_kernels=False))


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"quant": "int8"}, "--quant"),
        ({"dora": True}, "--dora"),
        ({"stack": "unsloth", "lora_dropout": 0.0}, "--stack"),
    ],
)
def test_what_the_rule_does_not_model_is_refused(fields, flag):
    with pytest.raises(VramplanError) as err:
        _setup(**fields)
    assert err.value.flag == flag or flag in str(err.value)


def test_a_full_fine_tune_with_lora_kernels_is_one_line(capsys):
    from vramplan.cli import main

    assert main(["estimate", "llama-3.2-1b", "--gpus", "1x80GB", "--method", "full", "--lora-kernels"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lora-kernels" in err and "Traceback" not in err
