"""Liger's layer kernels (vramplan/memory/liger.py, --liger-layers), by hand from
liger-kernel==0.8.5's save_for_backward calls and backward allocations (ops/rms_norm.py,
ops/swiglu.py, ops/geglu.py) and its per-model patches (transformers/monkey_patch.py);
docs/memory-model.md, "Liger's layer kernels". Not measured: the kernels are Triton."""

from __future__ import annotations

import pytest

from vramplan.configs import emit, read_config
from vramplan.estimate import make_setup
from vramplan.memory.checkpointing import offload_all_resident
from vramplan.memory.context import activation_context
from vramplan.memory.layer import layer_points, layer_saved_per_token, step_forward_locals_parts
from vramplan.memory.liger import liger_notes
from vramplan.memory.mlp import mlp_saved_parts
from vramplan.memory.norms import final_norm_backward_saved, norm_saved, rms_backward
from vramplan.model_loader import load_model_spec
from vramplan.setup import LigerLayers, Loss

H, F, Q, KV, HEADS = 4096, 14336, 4096, 1024, 32  # Llama 3.1 8B
ATTENTION = 2 * Q + 2 * KV + 2 * KV + 2 * Q + 4 * HEADS  # SDPA: q, k, v after RoPE, output, fp32 logsumexp
LIGER_NORM = 2 * H + 4  # its bf16 input X and one fp32 RSTD per row


def _setup(**fields):
    return make_setup(**{"batch_size": 1, "seq_len": 4096, "liger_layers": "all", **fields})


@pytest.fixture(scope="module")
def llama():
    return load_model_spec("llama-3.1-8b", num_layers=2)


def test_full_fine_tune_layer_saves_what_the_kernels_save(llama):
    layer = llama.layers[1]
    # two LigerRMSNorms; q/k/v's shared input (the norm's output); SDPA (o_proj's input is its
    # output); gate/up's shared input; gate and up (LigerSiLUMulFunction's a, b); down's input
    liger = LIGER_NORM + 2 * H + ATTENTION + LIGER_NORM + 2 * H + 2 * F + 2 * F + 2 * F
    assert layer_saved_per_token(llama, layer, _setup(method="full")) == liger
    # transformers' layer: each RMSNorm saves an fp32 copy (4h) and, trained, its bf16 output
    # (2h); act(gate) is saved too (2f)
    eager = liger + 2 * (4 * H + 2 * H - LIGER_NORM) + 2 * F
    assert layer_saved_per_token(llama, layer, _setup(method="full", liger_layers="none")) == eager


def test_one_kernel_at_a_time(llama):
    layer = llama.layers[1]
    full = {kind: layer_saved_per_token(llama, layer, _setup(method="full", liger_layers=kind)) for kind in LigerLayers}
    assert full[LigerLayers.NONE] - full[LigerLayers.GLU] == 2 * F  # act(gate)
    assert full[LigerLayers.NONE] - full[LigerLayers.RMS_NORM] == 2 * (6 * H - LIGER_NORM)
    assert full[LigerLayers.ALL] == full[LigerLayers.NONE] - 2 * F - 2 * (6 * H - LIGER_NORM)


def test_qlora_layer_frozen_norms(llama):
    """Frozen norm weights, an input that needs grad: transformers saves the fp32 copy (4h)."""
    layer = llama.layers[1]
    liger = layer_saved_per_token(llama, layer, _setup(method="qlora"))
    eager = layer_saved_per_token(llama, layer, _setup(method="qlora", liger_layers="none"))
    assert eager - liger == 2 * (4 * H - LIGER_NORM) + 2 * F


def test_mlp_backward_writes_the_grads_over_gate_and_up(llama):
    pts = layer_points(llama, llama.layers[1], _setup(method="full"))
    assert pts.mlp_grads == 2 * H + 2 * F  # the layer's output grad and act*up's grad only
    eager = layer_points(llama, llama.layers[1], _setup(method="full", liger_layers="none"))
    assert eager.mlp_grads == 2 * H + 3 * 2 * F
    # phi-3's fused gate_up: the chunk's backward concatenates the two grads into a new [N, 2f]
    phi3 = load_model_spec("phi-3-mini", num_layers=2)
    h, f = phi3.hidden, 8192
    assert layer_points(phi3, phi3.layers[1], _setup(method="full")).mlp_grads == 2 * h + 2 * f + 4 * f


def test_phi3_saves_the_contiguous_copies_not_the_fused_output():
    phi3 = load_model_spec("phi-3-mini", num_layers=2)
    layer, f = phi3.layers[1], 8192
    eager = layer_saved_per_token(phi3, layer, _setup(method="full", liger_layers="none"))
    glu = layer_saved_per_token(phi3, layer, _setup(method="full", liger_layers="glu"))
    assert eager - glu == 2 * f  # [fused 4f + act 2f] -> copies of gate and up, 4f
    # checkpointing's first pass: the fused output, both copies, then act*up
    ckpt = layer_points(phi3, layer, _setup(method="full", liger_layers="glu", gradient_checkpointing=True))
    plain = layer_points(phi3, layer, _setup(method="full", liger_layers="none", gradient_checkpointing=True))
    assert ckpt.ckpt_fwd - plain.ckpt_fwd == 2 * f


def test_qk_norms_save_their_input_and_one_rstd_per_head():
    qwen3 = load_model_spec("qwen3-8b", num_layers=1)
    ctx = activation_context(_setup(method="lora"))
    q_dim = qwen3.n_heads * qwen3.head_dim
    assert norm_saved(qwen3, ctx, True, width=q_dim) == 2 * q_dim + 4 * qwen3.n_heads


def test_final_norm_backward_in_place_or_zeroed():
    gemma2 = load_model_spec("gemma-2-2b", num_layers=1)
    llama = load_model_spec("llama-3.2-1b", num_layers=1)
    setup = _setup(method="full")
    assert rms_backward(llama, setup, 2) == 0  # dX written into dY (in_place=True)
    assert rms_backward(gemma2, setup, 2) == 2 * gemma2.hidden  # Gemma 2's in_place=False: zeros_like(dY)
    assert rms_backward(llama, _setup(method="full", liger_layers="none"), 2) == 20 * llama.hidden
    assert final_norm_backward_saved(llama, setup, 2) == 2 * llama.hidden + 4
    # glu alone leaves the norms as transformers runs them
    assert rms_backward(llama, _setup(method="full", liger_layers="glu"), 2) == 20 * llama.hidden


def test_forward_locals_the_norms_saved_are_not_counted_twice(llama):
    h = llama.hidden
    # full fine-tune: the embedding output is the first layer's saved norm input; the last
    # layer's input is its input norm's
    assert step_forward_locals_parts(llama, _setup(method="full"), in_last_layer=False) == [2 * h]
    assert step_forward_locals_parts(llama, _setup(method="full"), in_last_layer=True) == []
    # LoRA, frozen embedding, no checkpointing: the first norm has no autograd node
    assert step_forward_locals_parts(llama, _setup(method="lora"), in_last_layer=True) == [2 * h]
    # checkpointed: the eager locals
    ckpt = _setup(method="lora", gradient_checkpointing=True)
    assert step_forward_locals_parts(llama, ckpt, in_last_layer=True) == [2 * h, 2 * h]


def test_offloaded_norms_leave_nothing_on_the_gpu(llama):
    """OffloadActivations keeps a storage saved twice on the GPU: Liger's norm saves its input once."""
    layer = llama.layers[1]
    liger = activation_context(_setup(method="lora", activation_offload="all"))
    eager = activation_context(_setup(method="lora", activation_offload="all", liger_layers="none"))
    assert offload_all_resident(llama, layer, liger, True) == 0
    assert offload_all_resident(llama, layer, eager, True) == 2 * 4 * H


def test_liger_experts_save_pre_act_and_make_both_weight_grads():
    """LigerFusedMoEFunction (ops/fused_moe.py): saves x and pre_act; its backward makes
    zeros_like(down_proj) and zeros_like(gate_up_proj) whether the experts train or not."""
    mixtral = load_model_spec("mixtral-8x7b", num_layers=2)
    layer, h, i, k, e = mixtral.layers[1], 4096, 14336, 2, 8
    router_fp32 = 4 * e * 2  # the router's fp32 softmax and its output
    full = activation_context(_setup(method="full"))
    # full fine-tune: the trained router saved x already; pre_act, k rows of 2I in bf16
    assert mlp_saved_parts(mixtral, layer, full, True)[0] == k * 2 * 2 * i + 2 * h + router_fp32
    lora = activation_context(_setup(method="lora"))
    assert mlp_saved_parts(mixtral, layer, lora, True)[0] == k * 2 * 2 * i + 2 * h + router_fp32
    for method in ("full", "lora"):
        pts = layer_points(mixtral, layer, _setup(method=method))
        # dO, d_pre_act, the weighted act, the expanded and the summed input grads
        assert pts.mlp_grads == 2 * h + k * 4 * i + k * 2 * i + k * 2 * h + 2 * h
        assert pts.mlp_weights == (e * h * i * 2, e * 2 * i * h * 2)  # bf16 weights, 2.6 GiB per layer
    # glu off: transformers' experts, no weight-sized grads for frozen experts
    assert layer_points(mixtral, layer, _setup(method="lora", liger_layers="rms_norm")).mlp_weights == ()


def test_model_types_the_patches_leave():
    llama = load_model_spec("llama-3.2-1b", num_layers=1)
    other = llama.model_copy(update={"model_type": "olmo2"})  # no patch modelled for this type
    assert layer_saved_per_token(other, other.layers[0], _setup(method="full")) == layer_saved_per_token(
        other, other.layers[0], _setup(method="full", liger_layers="none")
    )
    assert "no patch" in liger_notes(other, _setup(method="full"))[0]


def test_liger_layers_cut_the_full_step_peak(llama):
    """The point of the kernels: 8B full fine-tune at 4k tokens, no checkpointing."""
    from vramplan.estimate import estimate_spec, resolve_gpus

    spec = load_model_spec("llama-3.1-8b")
    kw = dict(method="full", optim="adamw_8bit", precision="bf16")
    gpus = resolve_gpus("1x80GB", reserve=0)
    liger = estimate_spec(spec, _setup(**kw), gpus)
    eager = estimate_spec(spec, _setup(**kw, liger_layers="none"), gpus)
    saved = (eager.per_gpu.peak_allocated_bytes - liger.per_gpu.peak_allocated_bytes) / 2**30
    # per token and layer 2(6h - 2h - 4) + 2f fewer bytes, over 32 layers and 4096 tokens: 7.5 GiB
    assert saved == pytest.approx(61_432 * 32 * 4096 / 2**30, rel=0.02)


def test_unsloth_refuses_in_one_line(capsys):
    from vramplan.cli import main

    argv = ["estimate", "llama-3.2-1b", "--gpus", "1x24GB", "--method", "lora", "--stack", "unsloth"]
    assert main([*argv, "--liger-layers", "all"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--liger-layers" in err and "Traceback" not in err


# ---- the frameworks' keys


def _read(tmp_path, text: str, name: str = "c.yaml"):
    f = tmp_path / name
    f.write_text(text)
    return read_config([str(f)])


def test_trainer_liger_kernel_config(tmp_path):
    """transformers 5.25.0 integrations/liger.py: liger_kernel_config's keywords, each defaulting
    to True in apply_liger_kernel_to_<type>."""
    r = _read(tmp_path, "output_dir: o\nuse_liger_kernel: true\nliger_kernel_config: {swiglu: false}\n")
    assert r.fields["liger_layers"] == LigerLayers.RMS_NORM and r.fields["loss"] == Loss.LIGER
    no_fused = "liger_kernel_config:\n  fused_linear_cross_entropy: false\n"
    r = _read(tmp_path, "output_dir: o\nuse_liger_kernel: true\n" + no_fused)
    assert r.fields["liger_layers"] == LigerLayers.ALL and "loss" not in r.fields


def test_trl_applies_only_the_layer_kernels(tmp_path):
    """trl==1.16.0 sft_trainer.py:1125-1140: fused_linear_cross_entropy forced off, raises if asked."""
    r = _read(tmp_path, "model_name_or_path: Qwen/Qwen2.5-7B\nuse_liger_kernel: true\nmax_length: 2048\n")
    assert r.fields["liger_layers"] == LigerLayers.ALL and r.fields["loss"] == Loss.TRL_CHUNKED_NLL
    bad = "model_name_or_path: Qwen/Qwen2.5-7B\nuse_liger_kernel: true\nliger_kernel_config:\n"
    with pytest.raises(Exception) as err:
        _read(tmp_path, bad + "  fused_linear_cross_entropy: true\n")
    assert "fused_linear_cross_entropy" in str(err.value)


def test_llamafactory_and_axolotl_keys(tmp_path):
    lf = "model_name_or_path: meta-llama/Llama-3.1-8B\nstage: sft\ndo_train: true\nfinetuning_type: lora\n"
    r = _read(tmp_path, lf + "enable_liger_kernel: true\n")
    assert (r.fields["liger_layers"], r.fields["loss"]) == (LigerLayers.ALL, Loss.LIGER)
    ax = "base_model: meta-llama/Llama-3.1-8B\nmicro_batch_size: 1\n"
    ax += "plugins:\n  - axolotl.integrations.liger.LigerPlugin\n"
    r = _read(tmp_path, ax + "liger_rms_norm: true\nliger_rope: true\n")
    assert r.fields["liger_layers"] == LigerLayers.RMS_NORM and r.unknown == () and r.unmodelled == ()
    # without the plugin the keys do nothing
    r = _read(tmp_path, "base_model: meta-llama/Llama-3.1-8B\nmicro_batch_size: 1\nliger_glu_activation: true\n")
    assert "liger_layers" not in r.fields and r.unmodelled


def test_emitted_keys_read_back(tmp_path):
    setup = _setup(method="lora", stack="axolotl", liger_layers="glu")
    text = emit("axolotl", setup, "meta-llama/Llama-3.1-8B", {})
    assert "liger_glu_activation: true" in text and "liger_rms_norm: false" in text
    # LLaMA-Factory's one switch cannot say the layer kernels without the fused loss
    with pytest.raises(Exception) as err:
        emit("llamafactory", _setup(method="lora", stack="llamafactory"), "meta-llama/Llama-3.1-8B", {})
    assert "cannot express" in str(err.value)


def test_checkpointed_recompute_input_norm_saves_the_kept_input(llama):
    """Under checkpointing the recompute's input LigerRMSNorm saves the checkpoint's own input:
    only its RSTD is new (transformers' saves an fp32 copy on a bf16 stream)."""
    from vramplan.memory.checkpointing import recompute_input_alias

    layer = llama.layers[1]
    assert recompute_input_alias(llama, layer, _setup(method="qlora", gradient_checkpointing=True)) == 2 * H
    eager = _setup(method="qlora", gradient_checkpointing=True, liger_layers="none")
    assert recompute_input_alias(llama, layer, eager) == 0
    assert recompute_input_alias(llama, layer, _setup(method="qlora")) == 0  # no recompute


def test_verify_on_the_cpu_refuses_in_one_line_before_any_notice(capsys):
    """Liger's kernels are Triton: verify refuses them on the CPU before its cost notice."""
    from vramplan.cli import main

    argv = ["verify", "llama-3.2-1b", "--num-layers", "2", "--device", "cpu", "--method", "full"]
    assert main([*argv, "--liger-layers", "all", "--seq-len", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--liger-layers" in err and "Traceback" not in err
