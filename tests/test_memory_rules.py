"""Memory rules checked against facts read from the libraries (docs/memory-notes.md),
independently of the calibration cases: bytes per parameter of each storage format,
what FSDP2 shards, and what CPU offload moves off the GPU."""

from __future__ import annotations

import pytest

from vramplan.categories import Category as C
from vramplan.estimate import make_setup
from vramplan.memory import parameters, static_bytes, step_model, store
from vramplan.memory.optimizers import bnb8_state
from vramplan.model_loader import load_model_spec

MiB = 2**20


def _param(spec, setup, role="down"):
    params = parameters(spec, setup)
    lin = next(l for l in spec.layers[0].linears if l.role == role)
    return next(p for p in params if p.layer == 0 and p.numel == lin.numel)


@pytest.mark.parametrize("quant,bytes_per_param", [("nf4", 0.515869), ("hqq4", 0.5625)])
def test_4bit_bytes_per_parameter(quant, bytes_per_param):
    # bnb blocksize 64 + double quant: 0.5 + 1/64 + 4/(64*256); hqq g64: 0.5 + 2*2/64
    spec = load_model_spec("llama-3.1-8b")  # down_proj 4096 x 14336
    setup = make_setup(method="qlora", quant=quant)
    p = _param(spec, setup)
    got = sum(store(p, setup).values()) / p.numel
    assert got == pytest.approx(bytes_per_param, rel=1e-3)


def test_bnb_8bit_adam_state_bytes():
    # uint8 state1 + state2 + fp32 absmax per 256 for numel >= 4096; fp32 states below
    assert bnb8_state(2**24) / 2**24 == pytest.approx(2.03125, rel=1e-4)
    assert bnb8_state(1024) == 2 * 4 * 1024


def test_lora_adapters_are_fp32_r_times_in_plus_out():
    spec = load_model_spec("llama-2-7b")
    setup = make_setup(method="lora", lora_r=8)
    static = static_bytes(parameters(spec, setup), setup).parts
    per_layer = sum(8 * (l.in_features + l.out_features) for l in spec.layers[0].linears)
    assert static[C.ADAPTERS] == pytest.approx(4 * per_layer * spec.num_layers, rel=1e-3)


@pytest.mark.parametrize("quant", ["nf4", "hqq4"])
def test_fsdp_shards_packed_weights_but_not_quant_state(quant):
    spec = load_model_spec("llama-2-13b")
    one = make_setup(method="qlora", quant=quant)
    four = make_setup(method="qlora", quant=quant, fsdp=4)
    s1 = static_bytes(parameters(spec, one), one).parts
    s4 = static_bytes(parameters(spec, four), four).parts
    assert s4[C.QUANT_STATE] == s1[C.QUANT_STATE]
    assert s4[C.WEIGHTS] == pytest.approx(s1[C.WEIGHTS] / 4, rel=0.01)


def test_fsdp_divides_model_states_by_world_size():
    spec = load_model_spec("llama-3.1-8b")
    one = make_setup(method="full", precision="mixed")
    eight = make_setup(method="full", precision="mixed", fsdp=8)
    b1, b8 = static_bytes(parameters(spec, one), one), static_bytes(parameters(spec, eight), eight)
    s1, g1, o1 = b1.parts, b1.grads, b1.optimizer_states
    s8, g8, o8 = b8.parts, b8.grads, b8.optimizer_states
    # fp32 masters, fp32 grads, two fp32 Adam moments: 16 B/param in all, / 8 per rank (+ dim-0 padding)
    assert (s1[C.WEIGHTS] + g1 + o1) / spec.params_total == pytest.approx(16, rel=1e-3)
    assert (s8[C.WEIGHTS] + g8 + o8) == pytest.approx((s1[C.WEIGHTS] + g1 + o1) / 8, rel=0.01)


def test_cpu_offload_keeps_model_states_off_the_gpu_and_counts_them_in_host_ram():
    spec = load_model_spec("llama-3.1-8b")
    setup = make_setup(method="full", precision="mixed", fsdp=2, cpu_offload=True, gradient_checkpointing=True)
    model = step_model(spec, setup)
    # FSDP2 keeps only the root's unsharded bf16 grads on the GPU, until its post-backward
    # (fsdp.root_reduce_scatter): lm_head's and the final norm's, then the embedding's too
    root = [p for p in parameters(spec, setup) if p.layer is None]
    unsharded = sum(2 * p.numel for p in root)
    for phase in model.phases:
        for cat in (C.WEIGHTS, C.OPTIMIZER_STATES):
            assert phase.parts.get(cat, 0) == 0, (phase.name, cat)
        assert phase.parts.get(C.GRADIENTS, 0) <= unsharded + 2**20, phase.name
    at_root = [p for p in model.phases if p.name == "root reduce-scatter (FSDP2)"]
    assert at_root and at_root[0].parts[C.GRADIENTS] == pytest.approx(unsharded, rel=1e-3)
    # the rank's shard of fp32 masters + grads + Adam moments lives in pinned host memory
    assert model.host_pinned == pytest.approx(16 * spec.params_total / 2, rel=0.01)


def test_checkpointing_lowers_the_peak_of_a_long_lora_step():
    spec = load_model_spec("llama-3.2-1b")
    plain = step_model(spec, make_setup(method="lora", batch_size=4, seq_len=2048)).peak.allocated
    ckpt = step_model(
        spec, make_setup(method="lora", batch_size=4, seq_len=2048, gradient_checkpointing=True)
    ).peak.allocated
    assert ckpt < plain


def test_phase_names_and_measured_phases_follow_the_kind():
    # the display names are what reports, JSON and docs show: written out here, not derived
    from vramplan.memory import LayerPoint, MeasuredPhase, PhaseKind

    spec = load_model_spec("llama-3.2-1b")
    setup = make_setup(method="galore", optim="galore_adamw_8bit_layerwise", seq_len=512)
    phases = {p.name: p for p in step_model(spec, setup, every_layer=True).phases}
    hook = phases["layer 15 backward (optimizer hook)"]
    assert (hook.kind, hook.layer, hook.point) == (PhaseKind.LAYER_BACKWARD, 15, LayerPoint.OPTIMIZER_HOOK)
    assert hook.measured == MeasuredPhase.BACKWARD
    # layer-wise GaLore refreshes inside backward, not in an optimizer step
    assert phases["GaLore SVD refresh (layer-wise, in backward)"].measured == MeasuredPhase.BACKWARD
    assert "optimizer step" not in phases
    assert phases["forward (loss)"].measured == MeasuredPhase.FORWARD
    qlora = step_model(spec, make_setup(method="qlora", quant="hqq4", gradient_checkpointing=True, seq_len=512))
    kinds = {p.name: p.measured for p in qlora.phases}
    assert kinds["build (quantize)"] == MeasuredPhase.BUILD
    assert kinds["4-bit dequantize (forward)"] == MeasuredPhase.FORWARD
    assert kinds["optimizer step"] == MeasuredPhase.OPTIMIZER
