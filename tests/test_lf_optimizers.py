"""Adam-mini, APOLLO's rank and LLaMA-Factory's optimizer switches (use_apollo, use_muon,
use_adam_mini): states and step temporaries derived by hand from the libraries' sources
(adam-mini==1.1.1 adam_mini.py, apollo-torch==1.0.3, llamafactory==0.9.5
train/trainer_utils.py), the allocator's 512-byte rounding R(x) written out. The CPU trace of
the real optimizers is tests/test_cpu_trace.py (group "optimizers": full-adam_mini,
full-mixed-adam_mini, full-apollo_adamw-rank16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramplan.cli import main
from vramplan.configs import combine
from vramplan.configs.emit import emit
from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory import ParamKind
from vramplan.memory.optimizers import optimizer_state, optimizer_transient
from vramplan.memory.types import Param
from vramplan.setup import Method, Optim, check_method_fields


def R(x: int) -> int:
    return -(-x // 512) * 512


def dense(numel: int, dim0: int, layer: int | None = 0, role: str | None = None) -> Param:
    return Param(numel, dim0, ParamKind.DENSE, True, layer, role=role)


def device_state(p: Param, **fields) -> int:
    setup = make_setup(**{"method": "full", **fields})
    return optimizer_state(p, setup, p.numel).device


# ---------------------------------------------------------------- Adam-mini


def test_adam_mini_keeps_one_momentum_and_one_value_per_output_row():
    """adam_mini.py:292-304: m = zeros_like(grad), vmean = zeros_like(m[:, 0:1]); bf16 params."""
    embed = dense(4096 * 1024, 4096, layer=None)  # 4096 rows of 1024
    assert device_state(embed, optim="adam_mini") == 2 * 4096 * 1024 + R(2 * 4096)
    down = dense(1024 * 2816, 1024, role="down")
    assert device_state(down, optim="adam_mini") == 2 * 1024 * 2816 + R(2 * 1024)


def test_adam_mini_keeps_adam_for_biases_and_a_scalar_for_norms():
    """adam_mini.py:230-237 (bias: m and v like Adam), :325-350 (other tensors: m and a 0-d vmean)."""
    bias = dense(1024, 1024, role="q")
    norm = dense(1024, 1024)
    assert device_state(bias, optim="adam_mini") == 2 * R(2 * 1024)
    assert device_state(norm, optim="adam_mini") == R(2 * 1024) + 512


def test_adam_mini_states_follow_the_parameter_dtype():
    """zeros_like(p): fp32 masters (precision mixed) keep fp32 states."""
    down = dense(1024 * 2816, 1024, role="down")
    assert device_state(down, optim="adam_mini", precision="mixed") == 4 * 1024 * 2816 + R(4 * 1024)


def test_adam_mini_step_holds_the_update_and_its_negation():
    """adam_mini.py:321-323: update = m * stepsize, then p.add_(-update): two copies of the largest tensor."""
    params = [dense(2**20, 1024), dense(2**18, 256)]
    assert optimizer_transient(params, make_setup(method="full", optim="adam_mini"), 1) == 2 * 2 * 2**20


def test_adam_mini_is_about_half_adamw_on_a_real_model():
    """One full-size moment instead of two: Llama 3 8B's bf16 states fall from 4 to 2 bytes a parameter."""
    from vramplan.model_loader import load_model_spec

    spec = load_model_spec("llama-3-8b")
    states = {o: optimizer_state_total(spec, o) for o in ("adamw_torch", "adam_mini")}
    params = 8_030_261_248
    assert states["adamw_torch"] == pytest.approx(2 * 2 * params, rel=0.001)
    assert states["adam_mini"] == pytest.approx(2 * params, rel=0.001)


def optimizer_state_total(spec, optim: str) -> int:
    from vramplan.memory.parameters import parameters

    setup = make_setup(method="full", optim=optim)
    return sum(optimizer_state(p, setup, p.numel).device for p in parameters(spec, setup))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(method="lora"), "--method full only"),
        (dict(method="full", deepspeed="zero2"), "--deepspeed"),
        (dict(method="full", optimizer_in_backward=True), "--optimizer-in-backward"),
    ],
)
def test_adam_mini_refuses_what_it_cannot_partition(fields, words):
    with pytest.raises(VramplanError) as e:
        make_setup(optim="adam_mini", **fields)
    assert e.value.flag == "--optim" and words in str(e.value)


# ---------------------------------------------------------------- APOLLO's rank


def test_apollo_rank_sizes_the_projected_moments_and_projector():
    """apollo-torch 1.0.3 apollo.py:139-142: moments r x max(m, k), projector r x min(m, k)."""
    q = dense(4096 * 1024, 4096, role="q")
    assert device_state(q, optim="apollo_adamw", apollo_rank=16) == 2 * 2 * 16 * 4096 + 2 * 16 * 1024
    assert device_state(q, optim="apollo_adamw") == 2 * 2 * 128 * 4096 + 2 * 128 * 1024  # HF's default


def test_apollo_rank_is_refused_with_another_optimizer():
    with pytest.raises(VramplanError) as e:
        check_method_fields({"method": "full", "optim": "adamw_torch", "apollo_rank": 16})
    assert e.value.flag == "--apollo-rank"
    check_method_fields({"method": "full", "optim": "apollo_adamw", "apollo_rank": 16})  # no error


def test_apollo_rank_flag_on_the_command_line(capsys):
    assert main(["estimate", "llama-3.2-1b", "--gpus", "1x24GB", "--method", "full", "--apollo-rank", "16"]) != 0
    assert "--apollo-rank" in capsys.readouterr().err


# ---------------------------------------------------------------- LLaMA-Factory's switches


def _read_lf(tmp_path: Path, extra: str, finetuning: str = "full") -> dict:
    path = tmp_path / "lf.yaml"
    head = "model_name_or_path: meta-llama/Llama-3.2-1B\nstage: sft\n"
    path.write_text(f"{head}finetuning_type: {finetuning}\n{extra}\n")
    return combine.setup_fields(combine.read_config([str(path)]), world=None)


def test_use_apollo_reads_as_apollo_adamw_with_llamafactorys_rank(tmp_path):
    """hparams/finetuning_args.py: apollo_rank 16, apollo_layerwise false; trainer_utils.py:288-369."""
    fields = _read_lf(tmp_path, "use_apollo: true")
    assert fields["optim"] == Optim.APOLLO_ADAMW and fields["apollo_rank"] == 16
    layerwise = _read_lf(tmp_path, "use_apollo: true\napollo_layerwise: true\napollo_rank: 128\noptim: adamw_torch")
    assert layerwise["optim"] == Optim.APOLLO_ADAMW_LAYERWISE and layerwise["apollo_rank"] == 128


def test_use_muon_and_use_adam_mini_read_as_those_optimizers(tmp_path):
    assert _read_lf(tmp_path, "use_muon: true")["optim"] == Optim.MUON
    assert _read_lf(tmp_path, "use_adam_mini: true")["optim"] == Optim.ADAM_MINI
    # create_custom_optimizer's order (trainer_utils.py:527-549): Adam-mini before Muon
    assert _read_lf(tmp_path, "use_adam_mini: true\nuse_muon: true")["optim"] == Optim.ADAM_MINI


@pytest.mark.parametrize(
    ("extra", "finetuning", "key"),
    [
        ("use_apollo: true\noptim: adamw_torch_fused", "full", "optim"),  # NotImplementedError in LF
        ("use_apollo: true", "lora", "use_apollo"),  # finetuning_args.py: not with LoRA
        ("use_apollo: true\nuse_galore: true", "full", "use_apollo"),
        ("optim: muon", "full", "optim"),  # not a transformers optimizer name
    ],
)
def test_llamafactory_optimizer_switches_refuse_what_it_refuses(tmp_path, extra, finetuning, key):
    with pytest.raises(VramplanError) as e:
        _read_lf(tmp_path, extra, finetuning)
    assert e.value.flag.endswith(f": {key}")


@pytest.mark.parametrize("optim", ["apollo_adamw", "apollo_adamw_layerwise", "muon", "adam_mini"])
def test_emit_llamafactory_writes_the_switch_and_reads_back(optim):
    """emit checks its own output by reading it back (configs/emit._check_round_trip)."""
    setup = make_setup(method="full", optim=optim, **({"apollo_rank": 32} if "apollo" in optim else {}))
    text = emit("llamafactory", setup, "meta-llama/Llama-3.2-1B", {})
    switch = {"apollo_adamw": "use_apollo", "apollo_adamw_layerwise": "use_apollo"}.get(optim, f"use_{optim}")
    assert f"{switch}: true" in text and "optim: adamw_torch\n" in text


def test_emit_trl_refuses_optimizers_transformers_does_not_build():
    with pytest.raises(VramplanError) as e:
        emit("trl", make_setup(method="full", optim="adam_mini"), "meta-llama/Llama-3.2-1B", {})
    assert e.value.flag == "--emit"


def test_lora_with_use_badam_is_refused_and_full_is_read_with_a_note(tmp_path):
    with pytest.raises(VramplanError):
        _read_lf(tmp_path, "use_badam: true", "lora")
    path = tmp_path / "b.yaml"
    path.write_text("model_name_or_path: meta-llama/Llama-3.2-1B\nfinetuning_type: full\nuse_badam: true\n")
    reading = combine.read_config([str(path)])
    assert any(u.key == "use_badam" for u in reading.unmodelled)
    assert Method.FULL == combine.setup_fields(reading, world=None)["method"]


def test_use_badam_keeps_the_checkpoint_dtype(tmp_path):
    """model/adapter.py:338-349: no fp32 cast of trainable parameters under BAdam (nor pure_bf16)."""
    fields = _read_lf(tmp_path, "use_badam: true\nbadam_mode: layer\nbadam_switch_interval: 50")
    assert fields["model_dtype"].value == "bf16"
    assert _read_lf(tmp_path, "bf16: true")["model_dtype"].value == "fp32"


# ---------------------------------------------------------------- transformers' optim_args


def _read(tmp_path: Path, name: str, text: str) -> dict:
    path = tmp_path / name
    path.write_text(text)
    return combine.setup_fields(combine.read_config([str(path)]), world=None)


def test_hf_optim_args_set_galore_and_apollo_ranks(tmp_path):
    """transformers 5.25.0 trainer_optimizer.py:65-73, 370-405: "rank=1024, update_proj_gap=500"."""
    head = "model_name_or_path: meta-llama/Llama-3.2-1B\noutput_dir: out\n"
    galore = _read(tmp_path, "g.yaml", head + 'optim: galore_adamw\noptim_args: "rank=256, update_proj_gap=500"\n')
    assert galore["method"] == Method.GALORE and galore["galore_rank"] == 256
    assert galore["galore_update_proj_gap"] == 500
    apollo = _read(tmp_path, "a.yaml", head + 'optim: apollo_adamw\noptim_args: "rank=1,scale=128"\n')
    assert apollo["optim"] == Optim.APOLLO_ADAMW and apollo["apollo_rank"] == 1
    with pytest.raises(VramplanError) as e:
        _read(tmp_path, "b.yaml", head + 'optim: galore_adamw\noptim_args: "rank"\n')
    assert e.value.flag.endswith(": optim_args")


def test_apollo_is_refused_over_lora_adapters():
    """LLaMA-Factory refuses APOLLO with LoRA (hparams/finetuning_args.py); not modelled over adapters."""
    with pytest.raises(VramplanError) as e:
        make_setup(method="qlora", optim="apollo_adamw")
    assert e.value.flag == "--optim" and "--method full only" in str(e.value)


def test_low_rank_targets_other_than_attention_and_mlp_are_said(tmp_path):
    """transformers 5.25.0 trainer_optimizer.py:113-160: "all-linear" projects lm_head too."""
    head = "model_name_or_path: meta-llama/Llama-3.2-1B\noutput_dir: out\noptim: galore_adamw\n"
    for targets, noted in (('["attn", "mlp"]', False), ("all-linear", True), ('["attn"]', True)):
        path = tmp_path / "t.yaml"
        path.write_text(f"{head}optim_target_modules: {targets}\n")
        keys = [u.key for u in combine.read_config([str(path)]).unmodelled]
        assert ("optim_target_modules" in keys) == noted, targets


def test_adam_mini_over_bf16_says_its_step_is_modelled_from_source():
    from vramplan.memory.context import StaticBytes
    from vramplan.memory.optimizers import optimizer_notes

    bf16 = optimizer_notes(make_setup(method="full", optim="adam_mini"), StaticBytes({}, 0, 0, 0))
    assert any("modelled from source, not measured" in n for n in bf16)
    fp32 = optimizer_notes(make_setup(method="full", optim="adam_mini", precision="mixed"), StaticBytes({}, 0, 0, 0))
    assert not any("modelled from source" in n for n in fp32)  # CPU-traced (full-mixed-adam_mini)
