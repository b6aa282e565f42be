"""Optimizer states and step temporaries by family (vramplan/memory/optimizers.py).

Every expected value is derived by hand from the library's source rule (cited in each test),
with the allocator's 512-byte rounding R(x) = ceil(x / 512) * 512 written out."""

from __future__ import annotations

import pytest

from vramplan.categories import ALLOCATED, Category
from vramplan.errors import VramplanError
from vramplan.estimate import estimate_config, make_setup
from vramplan.memory import ParamKind, PhaseKind, step_model
from vramplan.memory.optimizers import StateBytes, foreach_bucket, optimizer_state, optimizer_transient
from vramplan.memory.types import Param
from vramplan.model_loader import load_model_spec
from vramplan.setup import OPTIM_TRAITS, Optim, OptimFamily, StateHome


def R(x: int) -> int:
    return -(-x // 512) * 512


def dense(numel: int, dim0: int, layer: int | None = 0, role: str | None = None, shape=None) -> Param:
    return Param(numel, dim0, ParamKind.DENSE, True, layer, role=role, shape=shape)


def state(optim: str, p: Param, **fields) -> StateBytes:
    setup = make_setup(method="full", optim=optim, **fields)
    return optimizer_state(p, setup, p.numel)


# ---------------------------------------------------------------- the enum and its table


def test_every_name_has_traits_and_the_old_properties_still_hold():
    assert set(OPTIM_TRAITS) == set(Optim)
    assert Optim.ADAMW_BNB_8BIT.is_8bit and Optim.GALORE_ADAMW_8BIT_LAYERWISE.is_8bit
    assert not Optim.ADAMW_TORCH.is_8bit and Optim.ADAMW_TORCH_4BIT.traits.bits == 4
    assert Optim.GALORE_ADAMW_LAYERWISE.layerwise and Optim.APOLLO_ADAMW_LAYERWISE.layerwise
    assert not Optim.GALORE_ADAMW.layerwise and not Optim.LOMO.layerwise and Optim.LOMO.traits.in_backward
    assert {o for o in Optim if o.is_galore} == {o for o in Optim if o.value.startswith("galore")}
    assert Optim.ADAMW_8BIT.traits == Optim.ADAMW_BNB_8BIT.traits  # transformers: an alias
    assert Optim.PAGED_LION_8BIT.paged and Optim.PAGED_LION_8BIT.traits.home == StateHome.PAGED
    assert Optim.GROKADAMW.traits.home == StateHome.HOST
    assert Optim.ADEMAMIX.traits.moments == 3 and Optim.LION_32BIT.traits.moments == 1
    assert Optim.ADAFACTOR.traits.factored and Optim.ADAFACTOR.traits.family == OptimFamily.ADAFACTOR


@pytest.mark.parametrize("name", ["adamw_torch_xla", "adamw_torch_npu_fused"])
def test_tpu_and_npu_optimizers_are_refused_with_a_reason(name):
    with pytest.raises(VramplanError) as err:
        make_setup(method="full", optim=name)
    assert err.value.flag == "--optim" and "not a CUDA optimizer" in str(err.value)


@pytest.mark.parametrize(
    "fields,flag",
    [
        (dict(method="full", optimizer_in_backward=True, gradient_accumulation=2), "--optimizer-in-backward"),
        (dict(method="galore", optim="galore_adamw_layerwise", gradient_accumulation=4), "--optim"),
        (dict(method="full", optim="apollo_adamw_layerwise", gradient_accumulation=2), "--optim"),
    ],
)
def test_stepping_in_backward_with_gradient_accumulation_is_one_line_naming_both_flags(fields, flag):
    with pytest.raises(VramplanError) as err:
        make_setup(**fields)
    text = str(err.value)
    assert err.value.flag == flag and "--gradient-accumulation" in text and "\n" not in text


def test_gradient_accumulation_alone_is_fine_and_must_be_positive():
    assert make_setup(method="full", gradient_accumulation=8).gradient_accumulation == 8
    with pytest.raises(VramplanError):
        make_setup(method="full", gradient_accumulation=0)


# ---------------------------------------------------------------- states


def test_bitsandbytes_states_by_number_of_moments():
    """bitsandbytes 0.50.2 optim/optimizer.py:502-529, 674-695; ademamix.py:165-173:
    uint8 state(s) + an fp32 absmax per 256-block when numel >= 4096, else fp32 states."""
    p = dense(8192, 64)  # 32 blocks: absmax 128 B -> one 512 B block
    assert state("adamw_8bit", p).device == 2 * (8192 + 512)
    assert state("lion_8bit", p).device == 8192 + 512
    assert state("rmsprop_bnb_8bit", p).device == 8192 + 512
    assert state("ademamix_8bit", p).device == 2 * 8192 + 8192 + 512 + 512  # (2, n) + (n) + absmax (2, B) + (B)
    small = dense(4095, 4095)  # below min_8bit_size: fp32 whatever the bits
    assert state("adamw_8bit", small).device == 2 * R(4 * 4095)
    assert state("ademamix", dense(1000, 1000)).device == R(8000) + R(4000)


def test_bitsandbytes_32bit_states_are_fp32_even_for_bf16_params():
    p = dense(8192, 64)  # bf16 params (precision bf16): torch AdamW would be 2+2 B
    assert state("paged_adamw_32bit", dense(1000, 1000)).device == 2 * 4096
    assert state("lion_32bit", p).device == 4 * 8192
    assert state("adamw_torch", p).device == 2 * 2 * 8192


def test_paged_states_from_1e5_elements_live_outside_the_allocator():
    """optimizer.py:374-390: get_state_buffer pages a state iff p.numel() >= 1e5; absmax is plain."""
    big = dense(100_352, 392)  # 392 blocks of 256
    s = state("paged_adamw_8bit", big)
    assert s.paged == 2 * 100_352 and s.device == 2 * R(4 * 392)
    below = dense(99_840, 390)
    s = state("paged_adamw_8bit", below)
    assert s.paged == 0 and s.device == 2 * 99_840 + 2 * R(4 * 390)
    assert state("paged_lion_32bit", big).paged == 4 * 100_352


def test_torchao_quantizes_only_whole_blocks_of_large_tensors():
    """torchao 0.18.0 optim/adam.py:71-79, subclass_8bit.py:103-116, subclass_4bit.py:115-130 (block 256 under HF)."""
    p = dense(4096 * 1024, 4096)
    assert state("adamw_torch_8bit", p).device == 2 * (4096 * 1024 + 4 * 4096 * 1024 // 256 + 1024)
    assert state("adamw_torch_4bit", p).device == 2 * (4096 * 1024 // 2 + 4 * 4096 * 1024 // 256 + 512)
    assert state("adamw_torch_8bit", dense(4095, 4095)).device == 2 * R(2 * 4095)  # bf16 fallback
    assert state("adamw_torch_8bit", dense(300 * 257, 300)).device == 2 * R(2 * 300 * 257)


def test_adafactor_factors_rows_and_columns_in_fp32():
    """transformers 5.25.0 optimization.py:1186-1189, 1233-1250."""
    assert state("adafactor", dense(1024 * 4096, 1024)).device == 4 * 1024 + 4 * 4096
    assert state("adafactor", dense(1000, 1000)).device == R(4000)
    experts = dense(8 * 64 * 32, 8, shape=(8, 64, 32))  # rows shape[:-1] = 512, cols (8, 32) = 256
    assert state("adafactor", experts).device == 4 * 512 + 4 * 256


def test_torch_family_states_are_in_the_param_dtype():
    p = dense(1024 * 1024, 1024)  # bf16 params
    assert state("sgd", p).device == 0  # HF passes only lr: momentum 0, no momentum_buffer
    assert state("adagrad", p).device == 2 * 1024 * 1024
    assert state("rmsprop", p).device == 2 * 1024 * 1024
    assert state("schedule_free_adamw", p).device == 2 * 2 * 1024 * 1024  # z + exp_avg_sq
    assert state("schedule_free_sgd", p).device == 2 * 1024 * 1024
    assert state("adamw_torch_fused", p).device == 2 * 2 * 1024 * 1024 + 512  # + the on-device step
    assert state("adamw_anyprecision", p).device == 2 * 4 * 1024 * 1024
    assert state("lomo", p) == StateBytes()
    # + Kahan buffer, eps_sq and the Triton path's 1-element mean_square (optimi stableadamw.py:115-130)
    assert state("stable_adamw", p).device == 3 * 2 * 1024 * 1024 + 2 * 512


def test_muon_keeps_one_momentum_for_layer_matrices_and_adamw_for_the_rest():
    """llamafactory 0.9.5 train/trainer_utils.py:498-524, third_party/muon/muon.py:176-210."""
    assert state("muon", dense(1024 * 256, 1024, layer=3)).device == 2 * 1024 * 256
    assert state("muon", dense(1024 * 256, 1024, layer=None)).device == 2 * 2 * 1024 * 256  # embedding
    assert state("muon", dense(1024, 1024, layer=3)).device == 2 * R(2 * 1024)  # a norm


def test_apollo_keeps_low_rank_moments_and_a_projector_for_attention_and_mlp_weights():
    """apollo-torch 1.0.3 apollo.py:139-142, random_projector.py:108-172, rank 128 under HF."""
    q = dense(4096 * 1024, 4096, role="q")
    assert state("apollo_adamw", q).device == 2 * 2 * 128 * 4096 + 2 * 128 * 1024
    assert state("apollo_adamw", dense(4096 * 1024, 4096, layer=None)).device == 2 * 2 * 4096 * 1024


def test_grokadamw_states_are_host_ram():
    s = state("grokadamw", dense(1024, 1024))
    assert s.device == 0 and s.host == 3 * 2 * 1024


def test_adalomo_keeps_states_for_frozen_parameters_too():
    """lomo-optim 0.1.1 adalomo.py:84-96 loops over every named parameter."""
    frozen = Param(1024 * 4096, 1024, ParamKind.DENSE, False, 0)
    setup = make_setup(method="lora", optim="adalomo")
    assert optimizer_state(frozen, setup, frozen.numel).device == 4 * 1024 + 4 * 4096
    assert optimizer_state(frozen, make_setup(method="lora"), frozen.numel) == StateBytes()


# ---------------------------------------------------------------- step temporaries


def test_foreach_temporary_is_the_larger_trainer_group_under_trainer_stacks():
    """transformers 5.25.0 trainer.py:1287-1300: decay and no-decay (bias, norms) groups;
    the plain loop's single group keeps the calibrated sum."""
    params = [dense(1024 * 1024, 1024), dense(1024 * 1024, 1024), dense(1024, 1024)]
    plain = make_setup(method="full")
    trainer = make_setup(method="full", stack="hf-trainer", optim="adamw_torch", precision="bf16")
    assert foreach_bucket(params, plain, 1) == 2 * 2 * 2**20 + 2048
    assert foreach_bucket(params, trainer, 1) == 2 * 2 * 2**20


@pytest.mark.parametrize(
    "optim,expected",
    [
        ("adamw_torch", 2 * 2**21),  # _foreach_sqrt(exp_avg_sqs): one copy of the group
        ("adamw_torch_fused", 0),
        ("paged_adamw_8bit", 0),
        ("adagrad", 2 * 2 * 2**21),  # std + numerator
        ("rmsprop", 2 * 2**21),
        ("sgd", 0),
        ("schedule_free_adamw", 2 * 2**21),
        ("adafactor", 4 * 4 * 2**20),  # update + its successor + fp32 copies of the bf16 grad and param
        ("grokadamw", 6 * 2 * 2**20),
    ],
)
def test_step_temporaries_by_family(optim, expected):
    params = [dense(2**20, 1024), dense(2**20, 1024)]  # bf16: 2 MiB each
    assert optimizer_transient(params, make_setup(method="full", optim=optim), 1) == expected


def test_muon_step_is_the_larger_of_its_newton_schulz_and_its_adamw_with_the_last_update_bound():
    """llamafactory 0.9.5 third_party/muon/muon.py:157-215: the AdamW loop runs while the last Muon
    update `u` (bf16) is still bound; buf1 / (eps + buf2.sqrt()) holds two copies."""
    layer = dense(1024 * 256, 1024, layer=0)  # Muon: n = 262144, k = 256
    embed = dense(4096 * 256, 4096, layer=None)  # AdamW: 1 Mi elements, bf16
    newton_schulz = 4 * 2 * 262144 + 6 * 2 * 256 * 256
    adamw = 2 * 2 * 4096 * 256 + 2 * 262144
    assert optimizer_transient([layer, embed], make_setup(method="full", optim="muon"), 1) == max(newton_schulz, adamw)


# ---------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def small():
    return load_model_spec("llama-3.2-1b", num_layers=2)


def test_optimizer_in_backward_holds_no_full_set_of_gradients(small):
    stepped = step_model(small, make_setup(method="full", optimizer_in_backward=True))
    plain = step_model(small, make_setup(method="full"))
    assert PhaseKind.OPTIMIZER_STEP not in {p.kind for p in stepped.phases}
    assert all(p.parts.get(Category.GRADIENTS, 0) == 0 for p in stepped.phases)
    assert any(p.parts.get(Category.GRADIENTS, 0) > 0 for p in plain.phases)
    # the plain step's optimizer phase holds every gradient; no moment of the stepped one does
    step = next(p.allocated for p in plain.phases if p.kind == PhaseKind.OPTIMIZER_STEP)
    hooks = [p for p in stepped.phases if p.point is not None and p.point.value == "optimizer hook"]
    assert hooks and max(p.allocated for p in hooks) < step
    assert any("steps inside backward" in n for n in stepped.notes)


def test_paged_states_count_toward_the_total_but_not_the_peak_allocated():
    assert Category.PAGED_OPTIMIZER_STATES not in ALLOCATED
    e = estimate_config("llama-3.2-1b", gpus="1x80GB", method="full", optim="paged_adamw_8bit")
    g = e.per_gpu
    paged = g.breakdown[Category.PAGED_OPTIMIZER_STATES]
    assert paged > 2**30
    assert g.total_bytes == g.peak_reserved_bytes + g.breakdown[Category.CUDA_CONTEXT] + paged
    assert any("paged" in n and "modelled from source, not measured" in n for n in e.notes)
    plain = estimate_config("llama-3.2-1b", gpus="1x80GB", method="full", optim="adamw_8bit").per_gpu
    # the same bytes, moved out of torch's statistics (absmax stays in)
    assert g.peak_allocated_bytes < plain.peak_allocated_bytes


def test_grokadamw_states_go_to_the_host_column():
    grok = estimate_config("llama-3.2-1b", gpus="1x80GB", method="full", optim="grokadamw")
    sgd = estimate_config("llama-3.2-1b", gpus="1x80GB", method="full", optim="sgd")
    spec = load_model_spec("llama-3.2-1b")
    trained = spec.embed_numel + spec.lm_head_numel + sum(l.numel for l in spec.layers) + spec.final_norm_numel
    assert grok.host_ram_bytes - sgd.host_ram_bytes == pytest.approx(3 * 2 * trained, rel=0.01)


def test_verify_builds_the_classes_and_kwargs_transformers_passes():
    """transformers 5.25.0 trainer_optimizer.py:246-293 (bitsandbytes), :195-198 (Adafactor)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch
    from transformers.optimization import Adafactor

    from vramplan.verify.build import _optim_class

    assert _optim_class(make_setup(method="full", optim="paged_lion_8bit")) == (
        bnb.optim.Lion,
        {"optim_bits": 8, "is_paged": True},
    )
    assert _optim_class(make_setup(method="full", optim="rmsprop_bnb")) == (bnb.optim.RMSprop, {"optim_bits": 32})
    assert _optim_class(make_setup(method="full", optim="adamw_torch_fused")) == (torch.optim.AdamW, {"fused": True})
    assert _optim_class(make_setup(method="full", optim="adafactor")) == (
        Adafactor,
        {"scale_parameter": False, "relative_step": False},
    )
    with pytest.raises(VramplanError):
        _optim_class(make_setup(method="full", optim="adalomo"))
