"""GRPO (--objective grpo, memory/grpo.py) against sums done by hand from trl==1.16.0's and
transformers==5.25.0's source; the CPU trace of the real step is tests/test_cpu_trace.py's "grpo"
group."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vramplan.categories import Category as C
from vramplan.configs.combine import read_config
from vramplan.errors import VramplanError
from vramplan.estimate import estimate_config, make_setup
from vramplan.memory import PhaseKind, step_model
from vramplan.memory.grpo import kv_cache_blocks
from vramplan.memory.grpo_batch import buffered_bytes
from vramplan.memory.loss import trl_scored_rows
from vramplan.model_loader import load_model_spec
from vramplan.setup import Generation, Objective

SPEC = load_model_spec("llama-3.1-8b", num_layers=4)
MiB = 2**20


def _grpo(**kw):
    return make_setup(stack="trl", objective="grpo", **kw)


def _kinds(setup) -> dict[PhaseKind, int]:
    return {p.kind: p.allocated for p in step_model(SPEC, setup).phases if p.kind is not PhaseKind.LAYER_BACKWARD}


def test_the_head_scores_the_completion_positions_only():
    """labels[:, :-logits_to_keep] = -100 (grpo_trainer.py:1496-1498): B x C rows, not B x (S-1)."""
    setup = _grpo(method="lora", batch_size=4, seq_len=1536, completion_len=1024)
    assert trl_scored_rows(setup) == 4 * 1024
    assert trl_scored_rows(make_setup(stack="trl", method="lora", batch_size=4, seq_len=1536)) == 4 * 1535


def test_the_kv_cache_of_a_lora_policy_is_fp32_on_trls_default_weights():
    """peft's generate runs outside accelerate's autocast, on TRL's fp32 weights: keys and values
    fp32, 8 KV heads x 128 x 4 bytes each per position, per layer."""
    setup = _grpo(method="lora", batch_size=2, steps_per_generation=4, seq_len=1024, completion_len=512)
    blocks = kv_cache_blocks(SPEC, setup, setup.generation_rows, 1024)
    assert setup.generation_rows == 8
    assert blocks == [8 * 1024 * 8 * 128 * 4] * (2 * 4)


def test_a_full_fine_tune_caches_fp32_keys_beside_bf16_values():
    """Under autocast over fp32 weights v_proj's output is bf16, and rotary's fp32 cos and sin
    promote the keys to fp32 (traced: grpo-prefill-full)."""
    setup = _grpo(method="full", batch_size=2, seq_len=1024, completion_len=512)
    keys, values = kv_cache_blocks(SPEC, setup, 2, 1024)[:2]
    assert (keys, values) == (2 * 1024 * 1024 * 4, 2 * 1024 * 1024 * 2)


def test_a_bf16_model_caches_bf16_and_a_sliding_window_keeps_its_window():
    gemma = load_model_spec("gemma-2-2b", num_layers=2)
    setup = _grpo(method="lora", precision="bf16", model_dtype="bf16", batch_size=1, seq_len=8192, completion_len=4096)
    windows = [layer.sliding_window for layer in gemma.layers]
    per = gemma.n_kv_heads * gemma.head_dim * 2
    expected = [min(8192, w) * per if w else 8192 * per for w in windows for _ in range(2)]
    assert kv_cache_blocks(gemma, setup, 1, 8192) == expected
    assert any(windows) and expected[0] != expected[-1]


def test_generation_comes_first_and_holds_no_gradients_when_aligned():
    """Generation runs at the first micro-step of an optimizer step (gradients set to None by
    the last step); with 4 micro-steps per optimizer step but 2 per generation it lands between
    two, the gradients alive."""
    aligned = _grpo(method="full", batch_size=1, seq_len=512, completion_len=256, gradient_accumulation=4)
    phases = step_model(SPEC, aligned).phases
    assert phases[0].kind is PhaseKind.GENERATION and not phases[0].parts.get(C.GRADIENTS)
    inside = aligned.model_copy(update={"steps_per_generation": 2})
    assert step_model(SPEC, inside).phases[0].parts[C.GRADIENTS] > 0


def test_scoring_runs_only_for_a_reference_or_old_log_probs():
    base = dict(method="lora", batch_size=2, seq_len=512, completion_len=256)
    assert PhaseKind.SCORING not in _kinds(_grpo(**base))
    assert PhaseKind.SCORING in _kinds(_grpo(beta=0.04, **base))
    assert PhaseKind.SCORING in _kinds(_grpo(num_iterations=2, **base))  # generate_every 2 > 1 micro-step
    assert PhaseKind.SCORING in _kinds(_grpo(generation="vllm-server", **base))  # importance sampling
    assert PhaseKind.GENERATION not in _kinds(_grpo(generation="vllm-server", **base))


def test_the_buffered_generation_batch_by_hand():
    """16 micro-batches of 2 rows x 1024: ids and masks int64 (16 bytes a position), the old
    log-probs fp32 per completion position (misaligned: 16 > 1 micro-step per optimizer step)."""
    setup = _grpo(method="lora", batch_size=2, steps_per_generation=16, seq_len=1024, completion_len=768)
    assert buffered_bytes(setup) == 32 * 1024 * 16 + 32 * 768 * 4


def test_a_full_fine_tune_with_beta_keeps_a_frozen_copy():
    """GRPOTrainer loads a reference model when beta > 0 and the policy is not peft
    (grpo_trainer.py:990-1003): TRL's fp32 weights once more."""
    base = dict(method="full", batch_size=1, seq_len=512, completion_len=256)
    without, with_copy = step_model(SPEC, _grpo(**base)).peak, step_model(SPEC, _grpo(beta=0.04, **base)).peak
    assert with_copy.parts[C.WEIGHTS] - without.parts[C.WEIGHTS] == without.parts[C.WEIGHTS]


def test_colocated_vllm_takes_its_share_of_the_card():
    """vllm_gpu_memory_utilization of the GPU's memory, outside the step: on a 24 GB card 0.9 of it
    leaves too little for a step that fits without it."""
    kw = dict(stack="trl", objective="grpo", method="qlora", batch_size=1, seq_len=1024, completion_len=512)
    kw.update(gradient_checkpointing=True, steps_per_generation=2)
    plain = estimate_config("llama-3.2-1b", gpus="1x24GB", **kw)
    shared = estimate_config("llama-3.2-1b", gpus="1x24GB", generation="vllm-colocate", **kw)
    share = shared.per_gpu.breakdown[C.VLLM_COLOCATED]
    assert share == int(0.3 * shared.gpu_memory_bytes)
    assert shared.per_gpu.total_bytes - share == pytest.approx(plain.per_gpu.total_bytes, rel=0.05)
    crowded = estimate_config(
        "llama-3.2-1b", gpus="1x24GB", generation="vllm-colocate", vllm_gpu_memory_utilization=0.95, **kw
    )
    assert plain.fits and not crowded.fits


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        (dict(objective="grpo", stack="llamafactory"), "--objective"),
        (dict(objective="grpo", stack="axolotl", loss="liger"), "--objective"),
        (dict(objective="grpo", stack="trl", seq_len=512, completion_len=512), "--completion-len"),
        (dict(objective="grpo", stack="trl", packing="padding-free"), "--packing"),
        (dict(objective="grpo", stack="trl", fsdp=2), "--objective"),
        (dict(beta=0.1), "--beta"),
        (dict(generation="vllm-colocate"), "--generation"),
        (dict(objective="dpo", stack="trl", steps_per_generation=2), "--steps-per-generation"),
    ],
)
def test_what_grpo_refuses_names_the_flag(fields, flag):
    with pytest.raises(VramplanError) as e:
        make_setup(**fields)
    assert e.value.flag == flag


def test_a_trl_grpo_config_is_read_as_grpo(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text(
        "model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct\nper_device_train_batch_size: 4\nnum_generations: 8\n"
        "max_completion_length: 1024\nuse_vllm: true\nvllm_gpu_memory_utilization: 0.4\nbeta: 0.04\n"
        "steps_per_generation: 2\nuse_peft: true\n"
    )
    f = read_config([str(path)]).fields
    assert f["objective"] == Objective.GRPO and f["completion_len"] == 1024 and f["seq_len"] == 1536
    assert f["generation"] == Generation.VLLM_COLOCATE and f["vllm_gpu_memory_utilization"] == 0.4
    assert f["beta"] == 0.04 and f["steps_per_generation"] == 2
    make_setup(**{**f, "stack": "trl"})  # a valid step


def test_an_older_grpo_config_gives_its_prompt_length_and_rloo_stays_sft(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("num_generations: 4\nmax_prompt_length: 256\nmax_completion_length: 128\n")
    f = read_config([str(old)]).fields
    assert f["objective"] == Objective.GRPO and f["seq_len"] == 384
    rloo = tmp_path / "rloo.yaml"
    rloo.write_text("num_generations: 4\nnormalize_advantages: true\n")
    reading = read_config([str(rloo)])
    assert "objective" not in reading.fields and any("RLOO" in u.why for u in reading.unmodelled)


def test_emit_writes_a_trl_grpo_config_that_reads_back():
    from vramplan.configs.emit import emit

    setup = _grpo(method="lora", gradient_checkpointing=True, batch_size=4, seq_len=1536, completion_len=1024)
    setup = setup.model_copy(update={"beta": 0.04})
    text = emit("trl", setup, "Qwen/Qwen2.5-1.5B-Instruct", {})
    assert "trl grpo --config" in text and "max_completion_length: 1024" in text and "max_length" not in text
    assert "num_generations: 4" in text
    with pytest.raises(VramplanError) as e:
        emit("axolotl", setup, "Qwen/Qwen2.5-1.5B-Instruct", {})
    assert e.value.flag == "--emit"


def test_the_cli_says_where_completions_are_generated():
    out = subprocess.run(
        [sys.executable, "-m", "vramplan", "estimate", "llama-3.2-1b", "--gpus", "1x24GB", "--stack", "trl"]
        + ["--objective", "grpo", "--method", "lora", "--seq-len", "1024", "--completion-len", "768"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "generation (GRPO, no grad)" in out or "GRPOTrainer" in out
    assert "model.generate" in " ".join(out.split())


# ---- axolotl's `rl: grpo`: trl==1.9.0's GRPOTrainer, log-probs from the model's logits
# (memory/grpo_logits.py); its CPU-traced rows are the grpo group's ax-grpo-* cases


def _ax_grpo(**kw):
    return make_setup(stack="axolotl", objective="grpo", **kw)


def test_axolotls_head_holds_the_fp32_logits_and_the_entropys_copy_by_hand():
    """B=2 completions of C=128: logits over K = 2 x 129 positions (logits_to_keep = C + 1), fp32
    after accelerate's conversion (axolotl's bf16 autocast); the entropy's [B*C, V] copy of the
    sliced views and one 128-row chunk's log_softmax, exp and product; backward 2 x 4 bytes over
    K + B*C positions (traced: trl 1.9.0's selective_log_softmax and entropy_from_logits)."""
    from vramplan.memory.loss import loss_terms

    v = SPEC.vocab
    setup = _ax_grpo(method="lora", batch_size=2, seq_len=640, completion_len=128)
    terms = loss_terms(SPEC, setup)
    assert terms.forward == 4 * 258 * v + 4 * 256 * v + 3 * 4 * 128 * v
    assert terms.backward == 8 * (258 + 256) * v
    # one row: the sliced views are contiguous, entropy_from_logits reshapes without a copy
    one = loss_terms(SPEC, _ax_grpo(method="lora", batch_size=1, seq_len=640, completion_len=128))
    assert one.forward == 4 * 129 * v + 3 * 4 * 128 * v


def test_axolotls_head_is_far_below_the_sft_loss_over_every_position():
    """Only the completion's positions get logits: at 3072 prompt + 512 completion tokens the
    GRPO step's loss moment is a fraction of an SFT step's over all 3584 positions."""
    grpo = {
        p.kind: p.allocated
        for p in step_model(SPEC, _ax_grpo(method="lora", batch_size=2, seq_len=3584, completion_len=512)).phases
    }
    sft = {
        p.kind: p.allocated
        for p in step_model(SPEC, make_setup(stack="axolotl", method="lora", batch_size=2, seq_len=3584)).phases
    }
    assert grpo[PhaseKind.FORWARD_LOSS] < sft[PhaseKind.FORWARD_LOSS] - 4 * 2 * 3000 * SPEC.vocab


def test_an_axolotl_grpo_config_is_read_with_its_trl_section(tmp_path):
    """axolotl==0.19.0's examples/llama-3/qlora-1b-gdpo.yaml, shortened: rl gdpo runs the GRPO
    trainer; max_completion_length and beta from `trl:`; no prompt bound, so 512 assumed."""
    path = tmp_path / "gdpo.yaml"
    path.write_text(
        "base_model: meta-llama/Llama-3.2-1B-Instruct\nrl: gdpo\nadapter: qlora\nload_in_4bit: true\n"
        "lora_target_linear: true\nsequence_len: 512\nmicro_batch_size: 1\ngradient_accumulation_steps: 8\n"
        "bf16: auto\ngradient_checkpointing: true\nchunked_cross_entropy: true\n"
        "trl:\n  beta: 0.001\n  max_completion_length: 128\n  num_generations: 2\n  use_vllm: false\n"
    )
    reading = read_config([str(path)])
    f = reading.fields
    assert f["objective"] == Objective.GRPO and f["completion_len"] == 128 and f["seq_len"] == 640
    assert (
        f["beta"] == 0.001
        and f["loss"].value == "hf"
        and f.get("generation", Generation.TRANSFORMERS) == Generation.TRANSFORMERS
    )
    setup = make_setup(**{**f, "stack": "axolotl"})
    assert setup.lora_kernels is False  # axolotl does not turn them on for rl
    assert not any(u.key == "rl" for u in reading.unmodelled)


def test_axolotls_colocated_vllm_takes_its_vllm_sections_share(tmp_path):
    """GRPOStrategy passes vllm.gpu_memory_utilization (axolotl's default 0.9) for colocate."""
    path = tmp_path / "grpo.yaml"
    body = "base_model: Qwen/Qwen2.5-1.5B-Instruct\nrl: grpo\nmicro_batch_size: 4\n"
    path.write_text(body + "trl:\n  use_vllm: true\n  use_liger_loss: true\n")
    reading = read_config([str(path)])
    assert reading.fields["generation"] == Generation.VLLM_COLOCATE
    assert reading.fields["vllm_gpu_memory_utilization"] == 0.9
    assert reading.fields["completion_len"] == 256  # trl 1.9.0's GRPOConfig default
    assert any(u.key == "trl.use_liger_loss" for u in reading.unmodelled)
    path.write_text(body + "trl:\n  use_vllm: true\n  vllm_mode: server\n  generation_batch_size: 32\n")
    f = read_config([str(path)]).fields
    assert f["generation"] == Generation.VLLM_SERVER and f["steps_per_generation"] == 8
    path.write_text(body + "trl:\n  use_vllm: yes please\n")
    with pytest.raises(VramplanError) as e:
        read_config([str(path)])
    assert e.value.flag.endswith("trl.use_vllm")


def test_emit_writes_an_axolotl_grpo_config_that_reads_back():
    from vramplan.configs.emit import emit

    setup = _ax_grpo(method="lora", gradient_checkpointing=True, batch_size=4, seq_len=1536, completion_len=1024)
    setup = setup.model_copy(update={"beta": 0.04, "steps_per_generation": 4, "generation": Generation.VLLM_COLOCATE})
    text = emit("axolotl", setup, "Qwen/Qwen2.5-1.5B-Instruct", {})
    assert "rl: grpo" in text and "max_completion_length: 1024" in text and "generation_batch_size: 16" in text
    assert "gpu_memory_utilization: 0.3" in text and "prompts up to 512 tokens" in text
    with pytest.raises(VramplanError) as e:  # TRL's fused head is not axolotl's
        emit("trl", setup, "Qwen/Qwen2.5-1.5B-Instruct", {})
    assert e.value.flag == "--emit"


def test_peft_adapters_run_through_generation():
    """Every Linear adapted: generation's layer moment carries peft's adapter path (the scaled B
    output and the sum; for a bf16 stream with fp32 adapters the input's fp32 copy too), which a
    q/v-only LoRA's MLP does not. [CPU trace: grpo-prefill-lora-all, ax-grpo-decode-lora]"""
    kw = dict(method="lora", batch_size=2, seq_len=640, completion_len=128, steps_per_generation=8)
    every = _kinds(_ax_grpo(**kw))[PhaseKind.GENERATION]
    qv = _kinds(_ax_grpo(lora_target_modules=["q_proj", "v_proj"], **kw))[PhaseKind.GENERATION]
    assert every > qv


def test_plan_keeps_the_files_prompt_plus_completion(tmp_path, capsys):
    """A GRPO step's length is the data's prompt + the completion, not a searched knob: the plan
    evaluates that length itself (640 here), not the next grid length."""
    import json

    from vramplan.cli import main

    path = tmp_path / "grpo.yaml"
    path.write_text(
        "base_model: meta-llama/Llama-3.2-1B-Instruct\nrl: grpo\nadapter: lora\nlora_target_linear: true\n"
        "micro_batch_size: 1\ngradient_checkpointing: true\ntrl:\n  max_completion_length: 128\n"
    )
    assert main(["plan", "--config", str(path), "--gpus", "1x24GB", "--format", "json", "--top", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows and {r["setup"]["seq_len"] for r in rows} == {640}
