"""The adapter and precision knobs (issue 13): --adapter-dtype, --lora-targets NAME,..., --kbit-prep,
--dora, --model-dtype, --precision fp16. Expected bytes are worked out by hand from the libraries'
rules on the small Llama of tests/test_cpu_trace.py (hidden 256, MLP 768, 8 heads of 32, 2 kv heads,
3 layers, vocabulary 4096, untied head), not taken from the code under test."""

from __future__ import annotations

import json

import pytest

from vramplan.categories import Category as C
from vramplan.cli import build_parser, setup_fields
from vramplan.errors import VramplanError
from vramplan.estimate import estimate_config, fp16_on_card, make_setup
from vramplan.memory import PhaseKind, parameters, static_bytes, step_model
from vramplan.memory.context import activation_context
from vramplan.memory.dora import dora_layer_transient
from vramplan.model_loader import load_model_spec
from vramplan.setup import Precision

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
R = 16
# per layer, lora_A (r x in) + lora_B (out x r) elements: q 256->256, k/v 256->64, o 256->256,
# gate/up 256->768, down 768->256
PER_LAYER = {
    "q": R * (256 + 256),
    "k": R * (256 + 64),
    "v": R * (256 + 64),
    "o": R * (256 + 256),
    "gate": R * (256 + 768),
    "up": R * (256 + 768),
    "down": R * (768 + 256),
}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    (d / "config.json").write_text(json.dumps(LLAMA))
    return load_model_spec(str(d), use_cache=False)


def _static(spec, **fields):
    setup = make_setup(**fields)
    return static_bytes(parameters(spec, setup), setup)


@pytest.mark.parametrize("dtype,width", [("fp32", 4), ("bf16", 2)])
def test_adapters_grads_and_adamw_states_take_the_adapter_dtype(spec, dtype, width):
    # every adapter tensor is a multiple of 512 bytes here, so no allocator rounding
    elements = 3 * sum(PER_LAYER.values())
    static = _static(spec, method="lora", adapter_dtype=dtype)
    assert static.parts[C.ADAPTERS] == width * elements
    assert static.grads == width * elements  # AccumulateGrad keeps the param's dtype
    assert static.optimizer_states == 2 * width * elements  # torch AdamW: zeros_like(p) twice


def test_an_explicit_target_list_adapts_only_those_linears(spec):
    static = _static(spec, method="lora", lora_target_modules="q_proj,v_proj")
    assert static.parts[C.ADAPTERS] == 4 * 3 * (PER_LAYER["q"] + PER_LAYER["v"])


def test_a_target_that_matches_no_linear_names_the_flag_and_the_linears(spec):
    from vramplan.estimate import check_compatible
    from vramplan.hardware import parse_gpus

    setup = make_setup(method="lora", lora_target_modules="q_proj,query")
    with pytest.raises(VramplanError) as e:
        check_compatible(spec, setup, parse_gpus("1x24GB"))
    text = str(e.value)
    assert "--lora-targets" in text and "'query'" in text and "q_proj" in text and "down_proj" in text


def test_the_cli_takes_a_module_list_or_an_enum_value():
    parser = build_parser()
    args = parser.parse_args(["estimate", "m", "--method", "lora", "--lora-targets", "q_proj, v_proj"])
    assert setup_fields(args)["lora_target_modules"] == ("q_proj", "v_proj")
    args = parser.parse_args(["estimate", "m", "--method", "lora", "--lora-targets", "attention"])
    fields = setup_fields(args)
    assert fields["lora_targets"] == "attention" and "lora_target_modules" not in fields


def test_kbit_prep_upcasts_every_non_4bit_parameter_but_not_under_hqq(spec):
    # embedding and lm_head 4096 x 256 each, 7 norms of 256 (alloc: 512 B in bf16, 1024 in fp32)
    extra = 2 * 2 * 4096 * 256 + 7 * (1024 - 512)
    base = dict(method="qlora", precision="mixed", model_dtype="bf16")
    plain = _static(spec, **base).parts[C.WEIGHTS]
    assert _static(spec, **base, kbit_prep=True).parts[C.WEIGHTS] - plain == extra
    hqq = dict(base, quant="hqq4")
    assert _static(spec, **hqq, kbit_prep=True).parts[C.WEIGHTS] == _static(spec, **hqq).parts[C.WEIGHTS]


def test_kbit_prep_makes_the_autocast_stream_fp32(spec):
    fields = dict(method="qlora", precision="mixed", model_dtype="bf16")
    assert activation_context(make_setup(**fields)).stream == 2
    assert activation_context(make_setup(**fields, kbit_prep=True)).stream == 4


def test_dora_adds_a_magnitude_per_output_feature(spec):
    # out features per layer: q 256, k 64, v 64, o 256, gate 768, up 768, down 256; fp32, a
    # 64-element vector rounds up to one 512 B block
    per_layer = sum(max(4 * o, 512) for o in (256, 64, 64, 256, 768, 768, 256))
    extra = _static(spec, method="lora", dora=True).parts[C.ADAPTERS] - _static(spec, method="lora").parts[C.ADAPTERS]
    assert extra == 3 * per_layer


def test_dora_weight_norm_holds_eye_lora_weight_and_the_weight_copy(spec):
    # down 768 -> 256, fp32 adapters on a bf16 base: eye(768), lora_A(eye) 768 x 16,
    # lora_weight + scaling * lora_weight + their sum (3 x 768 x 256), the fp32 weight copy
    setup = make_setup(method="lora", dora=True)
    expected = 4 * 768 * 768 + 4 * 768 * 16 + 3 * 4 * 768 * 256 + 4 * 768 * 256
    assert dora_layer_transient(spec, setup, activation_context(setup)) == expected
    phases = [p.kind for p in step_model(spec, setup).phases]
    assert PhaseKind.DORA_NORM_FORWARD in phases


def test_bf16_weights_under_autocast_cast_nothing(spec):
    # every cast of a bf16 tensor to bf16 is a no-op: the bf16 step, phase for phase
    mixed = step_model(spec, make_setup(method="full", precision="mixed", model_dtype="bf16"))
    plain = step_model(spec, make_setup(method="full"))
    assert [(p.name, p.allocated) for p in mixed.phases] == [(p.name, p.allocated) for p in plain.phases]
    fp32 = step_model(spec, make_setup(method="full", precision="mixed"))
    assert fp32.peak.allocated > mixed.peak.allocated


def test_fp16_adds_the_grad_scaler_to_the_mixed_step(spec):
    # GradScaler: _scale and _growth_tracker persistent, found_inf + inv_scale (and its
    # float64 temporary) at the step; one 512 B block each
    def step(precision):
        return {p.kind: p.allocated for p in step_model(spec, make_setup(method="full", precision=precision)).phases}

    fp16, mixed = step("fp16"), step("mixed")
    assert fp16[PhaseKind.OPTIMIZER_STEP] - mixed[PhaseKind.OPTIMIZER_STEP] == 2 * 512 + 3 * 512
    assert fp16[PhaseKind.FORWARD_LOSS] - mixed[PhaseKind.FORWARD_LOSS] == 2 * 512


@pytest.mark.parametrize(
    "fields,flags",
    [
        (dict(method="full", precision="fp16", model_dtype="bf16"), ("--model-dtype", "--precision")),
        (dict(method="lora", precision="fp16", adapter_dtype="bf16"), ("--adapter-dtype", "--precision")),
        (dict(method="full", model_dtype="fp32"), ("--model-dtype", "--precision")),
        (dict(method="qlora", kbit_prep=True), ("--kbit-prep", "--precision")),
        (dict(method="full", dora=True), ("--dora", "--method")),
        (dict(method="galore", kbit_prep=True, precision="mixed"), ("--kbit-prep", "--method")),
    ],
)
def test_incompatible_knobs_name_both_flags(fields, flags):
    with pytest.raises(VramplanError) as e:
        make_setup(**fields)
    assert all(f in str(e.value) for f in flags), str(e.value)


def test_a_card_without_bf16_gets_fp16_unless_precision_is_given(spec):
    from vramplan.hardware import parse_gpus

    t4 = parse_gpus("1xt4")
    setup, notes = fp16_on_card(make_setup(method="full", stack="axolotl"), t4, precision_given=False)
    assert setup.precision == Precision.FP16 and setup.model_dtype is None and "no bf16" in notes[0]
    kept, none = fp16_on_card(make_setup(method="full", precision="mixed"), t4, precision_given=True)
    assert kept.precision == Precision.MIXED and not none
    est = estimate_config(spec, "1xt4", method="lora")
    assert est.setup.precision == Precision.FP16 and any("no bf16" in n for n in est.notes)


def test_dora_recompute_holds_only_the_last_linears_eye(spec):
    # the checkpoint frame drops what the recompute packs for the lora_weight graphs (their
    # holders died with the original forward's): only down's own eye(768) + lora_A(eye), its
    # lora_weight, scaled copy, sum and fp32 weight copy, at its norm
    from vramplan.memory.dora import dora_recompute

    setup = make_setup(method="lora", dora=True, gradient_checkpointing=True)
    ctx = activation_context(setup)
    expected = 4 * 768 * 768 + 4 * 768 * R + 4 * 4 * 768 * 256
    assert dora_recompute(spec.layers[0], setup, ctx) == expected
    plain = make_setup(method="lora", dora=True)
    assert dora_recompute(spec.layers[0], plain, activation_context(plain)) == 0
    points = {p.point for p in step_model(spec, setup, every_layer=True).phases if p.point}
    assert {"DoRA recompute", "DoRA", "DoRA (MLP)"} <= points


def test_dora_forward_holds_three_products_per_output_feature(spec):
    # up 256 -> 768: (m - 1) * base, m * lora_result, its scaled copy; fp32 adapters fp32
    # products, bf16 adapters bf16; a forward that saves nothing holds lora_B's output too
    from vramplan.memory.dora import dora_output_parts, dora_recompute_stop

    up = next(l for l in spec.layers[0].linears if l.role == "up")
    fp32 = activation_context(make_setup(method="lora", dora=True, lora_dropout=0.0))
    bf16 = activation_context(make_setup(method="lora", dora=True, adapter_dtype="bf16", lora_dropout=0.0))
    assert dora_output_parts(up, fp32, saving=True) == [4 * 768] * 3
    assert dora_output_parts(up, fp32, saving=False) == [4 * 768] * 4
    assert dora_output_parts(up, bf16, saving=True) == [2 * 768] * 3
    drop = activation_context(make_setup(method="lora", dora=True, lora_dropout=0.05))
    # dropout(x) (fp32, 256 wide) and the recomputed fp32 base output beside lora_B's output
    assert dora_output_parts(up, drop, saving=False) == [4 * 768, 4 * 256, 4 * 768] + [4 * 768] * 3
    # the recompute stops once m * lora_result packed lora_B's output: two products exist
    assert dora_recompute_stop(up, fp32) == [4 * 768] * 2


def test_dora_backward_holds_the_magnitudes_grad_before_its_reduction(spec):
    # down 768 -> 256 at MulBackward0(m * lora_result): fp32 adapters: the output grad up-cast
    # (4), the base branch's bf16 copy (2), the node's input grad, lora_B output's grad and the
    # magnitude's unreduced grad (3 x 4); bf16 adapters: the output grad itself and three bf16
    from vramplan.memory.dora import dora_backward_parts, dora_recompute_grads

    down = next(l for l in spec.layers[0].linears if l.role == "down")
    fp32 = activation_context(make_setup(method="lora", dora=True, lora_dropout=0.0))
    bf16 = activation_context(make_setup(method="lora", dora=True, adapter_dtype="bf16", lora_dropout=0.0))
    assert dora_backward_parts(down, fp32, grad_held=True) == [4 * 256, 2 * 256] + [4 * 256] * 3
    assert dora_backward_parts(down, bf16, grad_held=False) == [2 * 256] * 4
    assert dora_backward_parts(down, bf16, grad_held=True) == [2 * 256] * 3
    # the recompute starts when that node unpacks lora_B's output: its input grad is in flight
    assert dora_recompute_grads(down, fp32) == [4 * 256, 2 * 256, 4 * 256]


def test_a_lora_rank_above_some_layers_dimension_is_a_note_not_an_error():
    """peft refuses only r <= 0 (tuners/lora/layer.py:239): Qwen2.5-0.5B's k_proj and v_proj
    are 128 wide, and r=256 is a full-rank adapter there, counted at r·(in + out) each."""
    from vramplan.estimate import estimate_config

    est = estimate_config("qwen2.5-0.5b", gpus="1x80GB", method="lora", lora_r=256)
    (note,) = [n for n in est.notes if n.startswith("LoRA rank 256")]
    assert "k_proj, v_proj" in note and "q_proj" not in note
    r128 = estimate_config("qwen2.5-0.5b", gpus="1x80GB", method="lora", lora_r=128)
    assert not any(n.startswith("LoRA rank") for n in r128.notes)
    # adapters: r·(in + out) on every targeted Linear whatever the rank (fp32: 4 bytes)
    spec = load_model_spec("qwen2.5-0.5b")
    per_layer = sum(lin.in_features + lin.out_features for lin in spec.layers[0].linears)
    added = est.per_gpu.breakdown[C.ADAPTERS] - r128.per_gpu.breakdown[C.ADAPTERS]
    assert added == 128 * per_layer * spec.num_layers * 4


def test_a_rank_no_layer_can_use_is_refused_naming_the_flag():
    from vramplan.errors import VramplanError
    from vramplan.estimate import estimate_config

    with pytest.raises(VramplanError, match="every adapted layer's dimensions") as e:
        estimate_config("qwen2.5-0.5b", gpus="1x80GB", method="lora", lora_r=8192)
    assert e.value.flag == "--lora-r"
    with pytest.raises(VramplanError, match="GaLore would project nothing") as e:
        estimate_config("qwen2.5-0.5b", gpus="1x80GB", method="galore", galore_rank=8192)
    assert e.value.flag == "--galore-rank"
    est = estimate_config("qwen2.5-0.5b", gpus="1x80GB", method="galore", galore_rank=256)
    assert any(n.startswith("GaLore rank 256 is above the smaller dimension of k_proj, v_proj") for n in est.notes)
