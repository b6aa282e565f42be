"""DPO (--objective dpo, memory/preference.py) against sums done by hand from trl==1.16.0's
source; the CPU trace of the real step is tests/test_cpu_trace.py's "preference" group."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vramplan.categories import Category as C
from vramplan.configs.combine import read_config
from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory import PhaseKind, step_model
from vramplan.memory.parameters import parameters
from vramplan.memory.preference import reference_forward_parts
from vramplan.model_loader import load_model_spec
from vramplan.setup import Objective

SPEC = load_model_spec("llama-3.1-8b", num_layers=4)
MATMUL = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=1024,
    intermediate_size=16384,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    hidden_act="silu",
)


def _phases(setup) -> dict[PhaseKind, int]:
    return {p.kind: p.allocated for p in step_model(SPEC, setup).phases if p.kind is not PhaseKind.LAYER_BACKWARD}


def _dpo(**kw):
    return make_setup(stack="trl", objective="dpo", **kw)


def test_a_pair_is_two_rows_and_the_head_one_fp32_output_more():
    """Precomputed reference: batch b of pairs is the SFT step over 2b rows, but for the
    fused head's mean_logits (4 bytes per labelled row and per token, dpo_trainer.py:943-947)."""
    kw = dict(method="lora", gradient_checkpointing=True, seq_len=1024)
    dpo = _phases(_dpo(batch_size=2, precompute_ref_log_probs=True, **kw))
    sft = _phases(make_setup(stack="trl", batch_size=4, **kw))
    rows, tokens = 4 * 1023, 4 * 1024
    assert dpo[PhaseKind.FORWARD_LOSS] - sft[PhaseKind.FORWARD_LOSS] == 4 * (rows + tokens)
    same = set(dpo) - {PhaseKind.FORWARD_LOSS}
    assert {k: dpo[k] for k in same} == {k: sft[k] for k in same}
    assert PhaseKind.REFERENCE_FORWARD not in dpo


def test_the_reference_forward_of_an_8b_lora_step_by_hand():
    """bf16 LoRA, checkpointed, 1 pair x 2048: what the policy's head left (h_sel 4094 x 4096 bf16 +
    16 B per row; 22 B per token of outputs, mask and labels), then the MLP's no-grad working set
    (two residual-sized tensors, act(gate), up and their product, 14336 wide) beside the embedding
    output and the block's input; it is wider than the head's forward (its 4094 x 32768 tile)."""
    setup = _dpo(method="lora", precision="bf16", model_dtype="bf16", gradient_checkpointing=True, seq_len=2048)
    n, rows, h, f = 4096, 4094, 4096, 14336
    held = [33_603_584, 22 * n]  # alloc(rows*h*2 + 16*rows), n*22
    layer = [n * 2 * h] * 2 + [n * 2 * h] * 2 + [n * 2 * f] * 3
    parts = reference_forward_parts(SPEC, setup, parameters(SPEC, setup))
    assert held[0] == -(-(rows * h * 2 + 16 * rows) // 512) * 512
    assert parts == held + layer
    ph = {p.kind: p for p in step_model(SPEC, setup).phases}
    ref, loss_bwd = ph[PhaseKind.REFERENCE_FORWARD], ph[PhaseKind.LOSS_BACKWARD]
    assert ref.parts[C.ACTIVATIONS] == loss_bwd.parts[C.ACTIVATIONS]  # every saved tensor of the policy
    assert ref.parts[C.TRANSIENT] == sum(held + layer)


def test_a_dequantized_weight_counts_at_the_up_projections_matmul(tmp_path):
    """A 4-bit base over TRL's fp32 stream, 1 pair x 64 tokens, a 16384-wide MLP: the layer's
    widest no-grad moment is the up projection's matmul (act(gate) fp32, the dequantized weight,
    the bf16 output before bnb casts it to fp32), not the elementwise product, which it replaces
    (the group's dpo-matmul-qlora case traces it)."""
    import json

    from vramplan.memory.quantization import dequantize_transient
    from vramplan.setup import Quant

    (tmp_path / "config.json").write_text(json.dumps(MATMUL))
    spec = load_model_spec(str(tmp_path), use_cache=False)
    setup = _dpo(method="qlora", batch_size=1, seq_len=64)
    n, h, f = 128, 1024, 16384
    held = [518_144, 3072]  # alloc(126 rows x 1024 x 4 + 16 x 126), alloc(22 x 128)
    locals_ = [n * 4 * h] * 2  # the embedding output, the block's input (fp32 stream)
    residuals, act_gate = [n * 4 * h] * 2, n * 4 * f
    matmul = [n * 2 * f, dequantize_transient(h * f, Quant.NF4)]
    parts = reference_forward_parts(spec, setup, parameters(spec, setup))
    assert parts == held + locals_ + residuals + [act_gate] + matmul
    assert sum(matmul) > 2 * n * 4 * f  # wider than up's fp32 output and the product it stands in for


def test_a_full_fine_tune_keeps_a_frozen_copy_in_the_policys_dtype():
    """dpo_trainer.py:905-919: the copy in the policy's dtype (TRL loads fp32), whole on one GPU
    and under ZeRO-2 (prepared at stage 0), sharded by FSDP2 by dim 0 and by ZeRO-3, on the host
    under FSDP's CPU offload; precomputed log-probs keep none."""
    numel = sum(p.numel for p in parameters(SPEC, make_setup(method="full")))

    def weights(**kw):
        ph = step_model(SPEC, make_setup(method="full", stack="trl", **kw)).phases[0]
        return ph.parts[C.WEIGHTS]

    one = weights(objective="dpo") - weights()
    assert one == pytest.approx(4 * numel, abs=512 * 300)
    assert weights(objective="dpo", precompute_ref_log_probs=True) == weights()
    z2 = dict(deepspeed="zero2", data_parallel=4)
    assert weights(objective="dpo", **z2) - weights(**z2) == one
    z3 = dict(deepspeed="zero3", data_parallel=4)
    assert weights(objective="dpo", **z3) - weights(**z3) == pytest.approx(one / 4, rel=1e-3)
    fsdp = dict(fsdp=4)
    assert weights(objective="dpo", **fsdp) - weights(**fsdp) == pytest.approx(one / 4, rel=1e-2)
    off = make_setup(method="full", stack="trl", fsdp=4, cpu_offload=True)
    off_dpo = make_setup(method="full", stack="trl", fsdp=4, cpu_offload=True, objective="dpo")
    on_gpu = [step_model(SPEC, s).phases[0].parts.get(C.WEIGHTS, 0) for s in (off_dpo, off)]
    assert on_gpu[0] == on_gpu[1]
    assert step_model(SPEC, off_dpo).host_pinned - step_model(SPEC, off).host_pinned == pytest.approx(one / 4, rel=1e-2)


def test_lora_keeps_no_copy():
    kw = dict(method="lora", gradient_checkpointing=True)
    dpo = step_model(SPEC, _dpo(**kw)).phases[0].parts[C.WEIGHTS]
    assert dpo == step_model(SPEC, make_setup(stack="trl", **kw)).phases[0].parts[C.WEIGHTS]


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        (dict(objective="dpo"), "--objective"),  # the plain stack has no DPO trainer
        (dict(objective="dpo", stack="torchtune"), "--objective"),  # its DPO recipes are not modelled
        (dict(objective="dpo", stack="llamafactory", fp32_outputs=False), "--objective"),  # the bf16 path
        (dict(objective="dpo", stack="axolotl", loss="chunked"), "--loss"),  # trl 1.9.0 reads the logits
        (dict(objective="dpo", stack="trl", loss="hf"), "--loss"),
        (dict(objective="dpo", stack="trl", packing="padding-free"), "--packing"),
        (dict(precompute_ref_log_probs=True), "--precompute-ref-log-probs"),
    ],
)
def test_what_dpo_does_not_model_is_refused_naming_the_flag(fields, flag):
    with pytest.raises(VramplanError) as e:
        make_setup(method="lora", **fields)
    assert e.value.flag == flag


def test_the_cli_refuses_in_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "vramplan", "estimate", "llama-3.1-8b", "--gpus", "1x24GB", "--objective", "dpo"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1 and "--objective" in out.stderr


def test_a_trl_dpo_config_is_read_as_dpo(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text(
        "model_name_or_path: Qwen/Qwen2.5-7B-Instruct\nper_device_train_batch_size: 2\nmax_length: 2048\n"
        "beta: 0.1\nprecompute_ref_log_probs: true\npadding_free: true\nuse_peft: true\n"
    )
    reading = read_config([str(path)])
    assert reading.fields["objective"] == Objective.DPO
    assert reading.fields["precompute_ref_log_probs"] is True
    assert reading.fields["packing"].value == "none"
    make_setup(**{**reading.fields, "stack": reading.stack})  # a valid step


def test_a_kto_config_is_kto_not_dpo_though_it_has_dpos_beta(tmp_path):
    """beta is DPOConfig's and KTOConfig's: desirable_weight makes the file KTO's (tests/test_kto.py)."""
    path = tmp_path / "kto.yaml"
    path.write_text("model_name_or_path: Qwen/Qwen2.5-7B-Instruct\nbeta: 0.1\ndesirable_weight: 1.0\n")
    reading = read_config([str(path)])
    assert reading.fields["objective"] == Objective.KTO
    path.write_text("model_name_or_path: Qwen/Qwen2.5-7B-Instruct\nbeta: 0.1\nnormalize_advantages: true\n")
    reading = read_config([str(path)])
    assert "objective" not in reading.fields and any("RLOO" in u.why for u in reading.unmodelled)


def test_emit_writes_a_trl_dpo_config_that_reads_back_and_refuses_other_formats():
    from vramplan.configs.emit import emit

    setup = _dpo(method="lora", gradient_checkpointing=True, precompute_ref_log_probs=True)
    text = emit("trl", setup, "meta-llama/Llama-3.1-8B", {})
    assert "trl dpo --config" in text and "beta: 0.1" in text and "packing:" not in text
    with pytest.raises(VramplanError) as e:  # axolotl's DPO is trl 1.9.0's, over the logits: not this head
        emit("axolotl", setup, "meta-llama/Llama-3.1-8B", {})
    assert e.value.flag == "--emit" and "loss=trl-chunked-nll" in str(e.value)
    with pytest.raises(VramplanError) as e:
        emit("torchtune", setup, "meta-llama/Llama-3.1-8B", {})
    assert e.value.flag == "--emit" and "objective" in str(e.value)


# ---- axolotl's rl: dpo: trl==1.9.0's DPOTrainer (axolotl 0.19.0's pin), full logits


def _ax(**kw):
    return make_setup(stack="axolotl", objective="dpo", **kw)


def test_axolotls_dpo_head_is_trl_190s_full_logits_by_hand():
    """1 pair x 1024 on Llama 3.1 8B (V 128256): the policy's bf16 logits and accelerate's fp32
    copy at the conversion (6 bytes per logit), 12 in backward (the logits saved, the gather's
    zero-filled grad, each row's grad); at the reference: the policy's fp32 logits, the
    reference's, the metrics' copy of the shifted logits and one 128-row chunk's three fp32
    tensors, wider than the reference's conversion."""
    from vramplan.memory.loss import loss_terms

    setup = _ax(method="lora", seq_len=1024)
    n, v = 2 * 1024, 128256
    terms = loss_terms(SPEC, setup)
    assert (terms.forward, terms.backward) == (6 * n * v, 12 * n * v)
    parts = reference_forward_parts(SPEC, setup, parameters(SPEC, setup))
    logits, shifted, chunk = 4 * n * v, 4 * 2 * 1023 * v, 4 * 128 * v
    assert parts == [logits, logits, shifted, chunk, chunk, chunk]


def test_axolotl_keeps_its_reference_copy_when_precomputing():
    """axolotl==0.19.0 train.py:144-164 loads the copy without reading precompute_ref_log_probs;
    TRL keeps a reference it is given. The step then has no reference forward, but the metrics
    after the loss still copy the shifted logits."""
    full = dict(method="full", seq_len=512)
    with_copy = step_model(SPEC, _ax(precompute_ref_log_probs=True, **full)).phases[0].parts[C.WEIGHTS]
    sft = step_model(SPEC, make_setup(stack="axolotl", **full)).phases[0].parts[C.WEIGHTS]
    assert with_copy > sft
    trl = dict(full, stack="trl", objective="dpo", precompute_ref_log_probs=True)
    assert (
        step_model(SPEC, make_setup(**trl)).phases[0].parts[C.WEIGHTS]
        == step_model(SPEC, make_setup(**{**trl, "objective": "sft", "precompute_ref_log_probs": False}))
        .phases[0]
        .parts[C.WEIGHTS]
    )


def test_axolotl_dpo_without_fp32_logits_is_refused():
    with pytest.raises(VramplanError) as e:
        _ax(method="lora", fp32_outputs=False)
    assert e.value.flag == "--objective"


def test_an_axolotl_dpo_config_is_read_as_dpo_and_ebft_is_not(tmp_path):
    base = "base_model: meta-llama/Llama-3.1-8B\nadapter: lora\nmicro_batch_size: 1\nsequence_len: 1024\nbf16: true\n"
    dpo = tmp_path / "dpo.yml"
    dpo.write_text(base + "rl: dpo\nprecompute_ref_log_probs: true\nchunked_cross_entropy: true\n")
    reading = read_config([str(dpo)])
    assert reading.fields["objective"] == Objective.DPO and reading.fields["precompute_ref_log_probs"] is True
    assert reading.fields["loss"].value == "hf"  # the loss patch is not on DPO's path
    assert reading.fields["lora_kernels"] is False  # axolotl leaves its kernels off under rl
    make_setup(**{**reading.fields, "stack": reading.stack})
    orpo = tmp_path / "ebft.yml"  # rl: kto and rl: orpo are modelled (tests/test_kto.py, test_orpo.py)
    orpo.write_text(base + "rl: ebft\n")
    reading = read_config([str(orpo)])
    assert "objective" not in reading.fields and any(u.key == "rl" for u in reading.unmodelled)


# ---- LLaMA-Factory's stage: dpo: CustomDPOTrainer (llamafactory==0.9.5), full logits


def test_llamafactorys_dpo_head_by_hand():
    """1 pair x 1024, V 128256: at the policy's log-softmax the fp32 logits, the contiguous copy of
    the shifted slice and the log-softmax (4 + 4 + 4 bytes per logit); the logits and the saved
    log-softmax held through the reference, whose own logits, copy and log-softmax come on top;
    12 bytes per scored logit in backward."""
    from vramplan.memory.loss import loss_terms

    setup = make_setup(stack="llamafactory", objective="dpo", method="lora", seq_len=1024)
    n, shifted, v = 2 * 1024, 2 * 1023, 128256
    terms = loss_terms(SPEC, setup)
    assert (terms.forward, terms.backward) == (4 * n * v + 8 * shifted * v, 12 * shifted * v)
    parts = reference_forward_parts(SPEC, setup, parameters(SPEC, setup))
    assert parts == [4 * n * v, 4 * shifted * v, 4 * n * v, 4 * shifted * v, 4 * shifted * v]


def test_llamafactorys_reference_copy_is_the_checkpoints_bf16_beside_an_fp32_policy():
    """load_model(is_trainable=False) with torch_dtype=auto (model/loader.py:155): the copy stays
    bf16 while the trained policy is cast to fp32 (model/adapter.py:313-328)."""
    numel = sum(p.numel for p in parameters(SPEC, make_setup(method="full")))
    kw = dict(stack="llamafactory", method="full", seq_len=512)
    dpo = step_model(SPEC, make_setup(objective="dpo", **kw)).phases[0].parts[C.WEIGHTS]
    sft = step_model(SPEC, make_setup(**kw)).phases[0].parts[C.WEIGHTS]
    assert sft == pytest.approx(4 * numel, rel=1e-3) and dpo - sft == pytest.approx(2 * numel, rel=1e-3)


def test_a_llamafactory_dpo_config_is_read_as_dpo(tmp_path):
    base = (
        "model_name_or_path: Qwen/Qwen2.5-7B-Instruct\nfinetuning_type: lora\nper_device_train_batch_size: 1\n"
        "cutoff_len: 1024\nbf16: true\nenable_liger_kernel: true\n"
    )
    dpo = tmp_path / "dpo.yaml"
    dpo.write_text(base + "stage: dpo\npref_beta: 0.1\n")
    reading = read_config([str(dpo)])
    assert reading.fields["objective"] == Objective.DPO and "precompute_ref_log_probs" not in reading.fields
    assert reading.fields["loss"].value == "hf"  # Liger's fused loss is off: DPO needs the logits
    make_setup(**{**reading.fields, "stack": reading.stack})
    simpo = tmp_path / "simpo.yaml"
    simpo.write_text(base + "stage: dpo\npref_loss: simpo\n")
    assert read_config([str(simpo)]).fields["precompute_ref_log_probs"] is True  # no reference model
    ppo = tmp_path / "ppo.yaml"  # stage: kto is KTO's (tests/test_kto.py)
    ppo.write_text(base + "stage: ppo\n")
    reading = read_config([str(ppo)])
    assert "objective" not in reading.fields and any(u.key == "stage" for u in reading.unmodelled)


# ---- WPO weights (--dpo-use-weighting: DPOConfig use_weighting, axolotl's dpo_use_weighting)


def test_wpo_weighting_by_hand_and_read_from_both_stacks(tmp_path):
    """TRL 1.16's fused head returns log_sum_sq_probs too (4 fp32 bytes per row and token); trl
    1.9.0 (axolotl) takes logsumexp(2 x logits) beside the kept logits: `2.0 * shift_logits` and
    its logsumexp's temporary, 8 bytes per shifted logit (traced: ax-dpo-lora-weighting)."""
    from vramplan.memory.loss import trl_output_bytes
    from vramplan.memory.preference import _trl19_head_parts

    assert trl_output_bytes(_dpo(dpo_use_weighting=True)) == trl_output_bytes(_dpo()) + 4
    spec = load_model_spec("llama-3.1-8b", num_layers=2)
    ax = make_setup(stack="axolotl", objective="dpo", method="lora", batch_size=1, seq_len=1024)
    shifted = 2 * 1023 * spec.vocab
    weighted = _trl19_head_parts(spec, ax.model_copy(update={"dpo_use_weighting": True}))
    assert weighted == [4 * 2 * 1024 * spec.vocab, 4 * shifted, 4 * shifted]
    trl_file = tmp_path / "dpo.yaml"
    trl_file.write_text("model_name_or_path: Qwen/Qwen2.5-7B-Instruct\nbeta: 0.1\nuse_weighting: true\n")
    assert read_config([str(trl_file)]).fields["dpo_use_weighting"] is True
    ax_file = tmp_path / "ax.yml"
    ax_file.write_text("base_model: meta-llama/Llama-3.1-8B\nadapter: lora\nrl: dpo\ndpo_use_weighting: true\n")
    assert read_config([str(ax_file)]).fields["dpo_use_weighting"] is True
    with pytest.raises(VramplanError) as e:
        make_setup(stack="llamafactory", objective="dpo", method="lora", dpo_use_weighting=True)
    assert e.value.flag == "--dpo-use-weighting"
