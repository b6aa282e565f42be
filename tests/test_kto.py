"""KTO (--objective kto, memory/kto.py) against sums done by hand from trl==1.16.0's KTOTrainer
source; the CPU trace of the real step is tests/test_cpu_trace.py's "preference" group (kto-*)."""

from __future__ import annotations

import pytest

from vramplan.configs.combine import read_config
from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory import PhaseKind, step_model
from vramplan.memory.loss import input_bytes, trl_output_bytes
from vramplan.memory.preference import reference_copy, reference_forward
from vramplan.model_loader import load_model_spec
from vramplan.setup import Objective

SPEC = load_model_spec("llama-3.1-8b", num_layers=4)


def _kto(**kw):
    return make_setup(stack="trl", objective="kto", **kw)


def test_one_row_per_example_and_the_kl_rows_ids_and_masks():
    """DataCollatorForUnpairedPreference (kto_trainer.py:304-420): B rows of input_ids,
    attention_mask, completion_mask, and under the KL term B mismatched rows of the same three."""
    kl = _kto(method="lora", batch_size=4, seq_len=1024)
    plain = _kto(method="lora", batch_size=4, seq_len=1024, kto_kl=False)
    assert kl.rows == plain.rows == 4
    assert input_bytes(kl) - input_bytes(plain) == 24 * 4 * 1024
    assert trl_output_bytes(kl) == 12  # log_probs, entropy, mean_logits (:966-970)


def test_the_reference_is_the_disabled_adapters_or_a_frozen_copy():
    lora = _kto(method="lora", batch_size=2)
    assert reference_forward(lora) and not reference_copy(lora)
    assert reference_copy(_kto(method="full", batch_size=2))
    pre = _kto(method="full", batch_size=2, precompute_ref_log_probs=True)
    assert not reference_forward(pre) and not reference_copy(pre)


def test_a_kto_step_is_a_dpo_step_over_half_the_rows_plus_the_kl_rows():
    """Per example DPO puts two rows in the batch, KTO one (and one KL row scored without grad):
    at the same batch size the KTO step's forward is narrower."""
    kto = {p.kind: p.allocated for p in step_model(SPEC, _kto(method="lora", batch_size=4, seq_len=1024)).phases}
    dpo_setup = make_setup(stack="trl", objective="dpo", method="lora", batch_size=4, seq_len=1024)
    dpo = {p.kind: p.allocated for p in step_model(SPEC, dpo_setup).phases}
    assert kto[PhaseKind.REFERENCE_FORWARD] < dpo[PhaseKind.REFERENCE_FORWARD]


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        (dict(objective="kto", stack="unsloth"), "--objective"),
        (dict(objective="kto", stack="axolotl", fp32_outputs=False), "--objective"),
        (dict(objective="kto", stack="trl", batch_size=1), "--batch-size"),
        (dict(objective="kto", stack="trl", packing="padding-free"), "--packing"),
        (dict(objective="dpo", stack="trl", kto_kl=False), "--no-kto-kl"),
        (dict(precompute_ref_log_probs=True), "--precompute-ref-log-probs"),
    ],
)
def test_what_kto_refuses_names_the_flag(fields, flag):
    with pytest.raises(VramplanError) as e:
        make_setup(**{"batch_size": 2, **fields})
    assert e.value.flag == flag


def test_a_single_row_runs_without_the_kl_term():
    assert _kto(method="lora", batch_size=1, kto_kl=False).rows == 1


def test_a_trl_kto_config_is_read_as_kto(tmp_path):
    """trl/scripts/kto.py's KTOConfig keys: desirable_weight marks the file; loss_type picks the KL term."""
    path = tmp_path / "kto.yaml"
    path.write_text(
        "model_name_or_path: Qwen/Qwen2-0.5B-Instruct\ndataset_name: trl-lib/kto-mix-14k\n"
        "per_device_train_batch_size: 4\nmax_length: 1024\nuse_peft: true\nlora_target_modules: all-linear\n"
        "desirable_weight: 1.0\nundesirable_weight: 1.0\nbeta: 0.1\n"
    )
    f = read_config([str(path)]).fields
    assert f["objective"] == Objective.KTO and f.get("kto_kl", True) is True
    make_setup(**{**f, "stack": "trl"})
    path.write_text(path.read_text() + "loss_type: apo_zero_unpaired\nprecompute_ref_log_probs: true\n")
    f = read_config([str(path)]).fields
    assert f["kto_kl"] is False and f["precompute_ref_log_probs"] is True
    path.write_text(path.read_text().replace("apo_zero_unpaired", "bco"))
    with pytest.raises(VramplanError) as e:
        read_config([str(path)])
    assert e.value.flag.endswith("loss_type")


def test_emit_writes_a_trl_kto_config_that_reads_back():
    from vramplan.configs.emit import emit

    setup = _kto(method="lora", gradient_checkpointing=True, batch_size=4, seq_len=1024, kto_kl=False)
    text = emit("trl", setup, "Qwen/Qwen2-0.5B-Instruct", {})
    assert "trl kto --config" in text and "loss_type: apo_zero_unpaired" in text and "packing" not in text
    with pytest.raises(VramplanError) as e:
        emit("axolotl", setup, "Qwen/Qwen2-0.5B-Instruct", {})
    assert e.value.flag == "--emit"


# ---- axolotl's rl: kto, trl==1.9.0's KTOTrainer (the model's logits; traced: ax-kto-*)


def test_axolotls_kto_metrics_hold_both_models_logits_and_the_entropys_copy_by_hand():
    """At 4 examples x 128 tokens the reference moment is the metrics' entropy (kto_trainer.py:1596):
    the reference's fp32 logits kept, entropy_from_logits' copy of the shifted logits and one
    128-row chunk's three tensors, beside the policy's fp32 logits (held as DPO's)."""
    from vramplan.memory.kto import trl19_head_parts
    from vramplan.memory.preference import policy_held_parts

    setup = make_setup(stack="axolotl", objective="kto", method="lora", batch_size=4, seq_len=128)
    v = SPEC.vocab
    assert policy_held_parts(SPEC, setup) == [4 * 4 * 128 * v]
    assert trl19_head_parts(SPEC, setup) == [4 * 4 * 128 * v, 4 * 4 * 127 * v] + [4 * 128 * v] * 3
    assert reference_copy(make_setup(stack="axolotl", objective="kto", method="full", batch_size=4))
    # TRL makes no copy when the log-probs are precomputed (axolotl passes its own copy to DPO only)
    pre = make_setup(stack="axolotl", objective="kto", method="full", batch_size=4, precompute_ref_log_probs=True)
    assert not reference_copy(pre)


def test_axolotls_kto_example_is_read_as_kto(tmp_path):
    """axolotl==0.19.0 examples/llama-3/qlora-1b-kto.yaml, the memory keys."""
    path = tmp_path / "kto.yaml"
    path.write_text(
        "base_model: meta-llama/Llama-3.2-1B\nload_in_4bit: true\nrl: kto\nrl_beta: 0.5\n"
        "kto_desirable_weight: 0.2\nadapter: qlora\nsequence_len: 2048\nsample_packing: false\n"
        "lora_r: 32\nlora_target_linear: true\nmicro_batch_size: 2\noptimizer: adamw_8bit\nbf16: auto\n"
        "gradient_checkpointing: true\n"
    )
    reading = read_config([str(path)])
    f = reading.fields
    assert f["objective"] == Objective.KTO
    setup = make_setup(**{**f, "stack": "axolotl"})
    assert setup.kto_kl and not setup.lora_kernels and setup.loss.value == "hf"
    assert not reading.unmodelled and not reading.unknown


# ---- LLaMA-Factory's stage: kto, CustomKTOTrainer (llamafactory==0.9.5; traced: lf-kto-*)


def test_llamafactorys_kto_reference_moment_by_hand():
    """2 examples x 128 at a 128k vocabulary: after the policy's forward its saved log-softmax (of
    every row but the last position) and the copies of its logits by kto_tags; the reference's KL
    forward, its completions' fp32 logits alive, over LLaMA-Factory's head (the logits, the
    contiguous shifted copy and its log-softmax)."""
    from vramplan.memory.parameters import parameters
    from vramplan.memory.preference import reference_forward_parts

    setup = make_setup(stack="llamafactory", objective="kto", method="lora", batch_size=2, seq_len=128)
    v, n, shifted = SPEC.vocab, 2 * 128, 2 * 127
    parts = reference_forward_parts(SPEC, setup, parameters(SPEC, setup))
    assert parts == [4 * shifted * v, 4 * n * v, 4 * n * v, 4 * n * v, 4 * shifted * v, 4 * shifted * v]


def test_llamafactorys_kto_example_is_read_as_kto(tmp_path):
    """llamafactory==0.9.5 examples/train_lora/qwen3_lora_kto.yaml's memory keys: one example a
    micro-batch is fine (LLaMA-Factory builds its KL rows itself)."""
    path = tmp_path / "kto.yaml"
    path.write_text(
        "model_name_or_path: Qwen/Qwen3-4B-Instruct-2507\nstage: kto\ndo_train: true\nfinetuning_type: lora\n"
        "lora_rank: 8\nlora_target: all\npref_beta: 0.1\ncutoff_len: 2048\nper_device_train_batch_size: 1\n"
        "gradient_accumulation_steps: 8\nbf16: true\n"
    )
    reading = read_config([str(path)])
    setup = make_setup(**{**reading.fields, "stack": "llamafactory"})
    assert setup.objective == Objective.KTO and setup.batch_size == 1 and setup.kto_kl
    assert not reading.unmodelled
    with pytest.raises(VramplanError) as e:
        make_setup(**{**reading.fields, "stack": "llamafactory", "kto_kl": False})
    assert e.value.flag == "--no-kto-kl"


def test_plan_takes_the_objective_and_refuses_a_stack_without_that_trainer(capsys):
    """`plan --objective`: every row runs that trainer; one line when the stack has none (not
    "nothing fits"); TRL's KTO rows hold two examples or more (its KL term)."""
    import json

    from vramplan.cli import main

    assert main(["plan", "llama-3.2-1b", "--gpus", "1x24GB", "--objective", "dpo"]) == 2
    assert "--objective" in capsys.readouterr().err
    argv = ["plan", "llama-3.2-1b", "--gpus", "1x24GB", "--objective", "kto", "--stack", "trl", "--format", "json"]
    assert main(argv + ["--top", "5"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows and all(r["setup"]["objective"] == "kto" and r["setup"]["batch_size"] >= 2 for r in rows)
