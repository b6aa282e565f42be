"""LLM.int8 (--quant int8: bitsandbytes Linear8bitLt as load_in_8bit builds it), fast tier.

The rules themselves are held to the CPU trace of the real library (tests/test_cpu_trace.py,
the int8 cases). Here: what follows from bitsandbytes==0.50.2's source by hand, the setups it
refuses, and the plumbing (plan, --emit, notes)."""

from __future__ import annotations

import json

import pytest

from vramplan.cli import main
from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory.checkpointing import int8_kept
from vramplan.memory.parameters import parameters, store
from vramplan.memory.storage import alloc
from vramplan.memory.types import ParamKind
from vramplan.model_loader import load_model_spec

GiB = 2**30


def test_int8_weights_are_one_byte_with_an_fp32_scale_per_row():
    """Int8Params._quantize (nn/modules.py:742-747): data = CB, int8 [out, in]; SCB fp32 [out].
    Llama 3 8B's decoder: 32 x (q 4096x4096, k and v 1024x4096, o 4096x4096, gate and up
    14336x4096, down 4096x14336)."""
    spec = load_model_spec("llama-3-8b")
    setup = make_setup(method="qlora", quant="int8")
    quantized = [p for p in parameters(spec, setup) if p.kind == ParamKind.INT8]
    per_layer = 4096 * 4096 * 2 + 1024 * 4096 * 2 + 14336 * 4096 * 3
    assert sum(p.numel for p in quantized) == 32 * per_layer
    weights = sum(store(p, setup)["weights"] for p in quantized)
    rows = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)
    state = sum(store(p, setup)["quant_state"] for p in quantized)
    assert weights == sum(alloc(p.numel) for p in quantized) and weights <= 32 * per_layer + len(quantized) * 512
    assert rows * 4 <= state <= rows * 4 + len(quantized) * 512


def test_non_reentrant_checkpointing_keeps_every_int8_input():
    """MatMul8bitLt keeps A as ctx.tensors (autograd/_functions.py:186-188), out of reach of the
    checkpoint's saved-tensor hooks: per layer and token the norm's output q/k/v read (4096 x 2),
    the attention output o reads (4096 x 2), the norm's output gate/up read (4096 x 2) and
    act*up down reads (14336 x 2), in a bf16 step. A reentrant checkpoint runs the forward
    without grad: nothing kept. Other bases: nothing."""
    spec = load_model_spec("llama-3-8b")
    tokens = 2048
    setup = make_setup(method="qlora", quant="int8", gradient_checkpointing=True, seq_len=tokens)
    per_token = 2 * (4096 + 4096 + 4096 + 14336)
    assert int8_kept(spec, setup) == tuple([alloc(tokens * per_token)] * 32)
    reentrant = make_setup(
        method="qlora", quant="int8", gradient_checkpointing=True, checkpoint_reentrant=True, seq_len=tokens
    )
    assert int8_kept(spec, reentrant) == ()
    assert int8_kept(spec, make_setup(method="qlora", gradient_checkpointing=True, seq_len=tokens)) == ()
    # prepare_model_for_kbit_training under autocast: an fp32 stream, so the norms' outputs and
    # act*up (gate/up return their input's dtype, int8_scaled_mm dtype=A.dtype) are fp32; the
    # attention's output stays bf16 (SDPA under autocast)
    kbit = make_setup(
        method="qlora", quant="int8", gradient_checkpointing=True, precision="mixed", kbit_prep=True, seq_len=tokens
    )
    per_token = 4 * 4096 + 2 * 4096 + 4 * 4096 + 4 * 14336
    assert int8_kept(spec, kbit) == tuple([alloc(tokens * per_token)] * 32)


@pytest.mark.parametrize(
    "fields,flag",
    [
        (dict(fsdp=2), "--fsdp"),
        (dict(dora=True), "--dora"),
        (dict(compile=True, gradient_checkpointing=True), "--compile"),
        (dict(activation_offload="all"), "--activation-offload"),
        (dict(quant_storage="bf16"), "--quant-storage"),
        (dict(stack="unsloth"), "--stack"),
    ],
)
def test_what_int8_does_not_model_is_refused_naming_the_flag(fields, flag):
    with pytest.raises(VramplanError) as e:
        make_setup(method="qlora", quant="int8", **fields)
    assert e.value.flag == flag and "--quant int8" in str(e.value)


def _estimate(capsys, *argv: str) -> dict:
    assert main(["estimate", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_estimate_says_what_int8_rests_on_and_what_the_checkpoint_keeps(capsys):
    base = ["llama-3-8b", "--gpus", "1x80GB", "--method", "qlora", "--quant", "int8", "--gradient-checkpointing"]
    held = _estimate(capsys, *base)
    notes = " ".join(held["notes"])
    assert "LLM.int8 (--quant int8)" in notes and "modelled from source, not measured" in notes
    tokens = held["setup"]["batch_size"] * held["setup"]["seq_len"]
    kept = 32 * tokens * 2 * (4096 + 4096 + 4096 + 14336) / GiB
    assert f"{kept:.2f} GiB of this step's activations" in notes and "--checkpoint-reentrant" in notes
    freed = _estimate(capsys, *base, "--checkpoint-reentrant")
    assert "of this step's activations" not in " ".join(freed["notes"])
    gap = held["per_gpu"]["peak_allocated_bytes"] - freed["per_gpu"]["peak_allocated_bytes"]
    assert gap >= 0.9 * kept * GiB


def test_plan_offers_int8_only_when_asked_and_never_sharded(capsys):
    assert main(["plan", "qwen2.5-0.5b", "--gpus", "2xrtx-4090", "--format", "json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert not any(r["method"] == "qlora-int8" for r in default["rows"])
    assert main(["plan", "qwen2.5-0.5b", "--gpus", "2xrtx-4090", "--methods", "int8", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows and all(r["method"] == "qlora-int8" and r["setup"]["fsdp"] == 1 for r in rows)


@pytest.mark.parametrize(
    "fmt,key",
    [("axolotl", "load_in_8bit: true"), ("trl", "load_in_8bit: true"), ("llamafactory", "quantization_bit: 8")],
)
def test_emit_writes_an_int8_base_and_reads_it_back(tmp_path, capsys, fmt, key):
    target = tmp_path / f"{fmt}.yaml"
    argv = ["plan", "qwen2.5-0.5b", "--gpus", "rtx-4090", "--methods", "int8", "--emit", fmt, "-o", str(target)]
    assert main([*argv, "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert key in target.read_text()
    est = _estimate(capsys, "--config", str(target), "--gpus", "rtx-4090")
    assert est["setup"]["quant"] == "int8"
    emitted = plan["recommended"]
    assert abs(est["per_gpu"]["total_bytes"] - emitted["per_gpu_bytes"]) <= 0.01 * emitted["per_gpu_bytes"]


def test_torchtune_cannot_write_an_int8_base(tmp_path, capsys):
    target = tmp_path / "tt.yaml"
    argv = [
        "plan",
        "llama-3.1-8b",
        "--gpus",
        "h100-80gb",
        "--methods",
        "int8",
        "--emit",
        "torchtune",
        "-o",
        str(target),
    ]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "torchtune" in err and "int8" in err and err.count("\n") == 1 and not target.exists()


def test_plan_checkpoints_int8_rows_reentrantly_unless_told(tmp_path, capsys):
    """A non-reentrant checkpoint keeps every 8-bit Linear's input; the plan's checkpointed int8
    rows use the reentrant one (and say so) unless the file or flags chose."""
    argv = ["plan", "qwen2.5-0.5b", "--gpus", "rtx-4090", "--methods", "int8", "--format", "json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    ckpt = [r for r in rows if r["setup"]["gradient_checkpointing"]]
    assert ckpt and all(r["setup"]["checkpoint_reentrant"] and "reentrant ckpt" in r["label"] for r in ckpt)
    cfg = tmp_path / "axo.yml"
    cfg.write_text(
        "base_model: Qwen/Qwen2.5-0.5B\nadapter: lora\nload_in_8bit: true\n"
        "gradient_checkpointing_kwargs:\n  use_reentrant: false\n"
    )
    assert main(["plan", "--config", str(cfg), "--gpus", "rtx-4090", "--methods", "int8", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows and not any(r["setup"]["checkpoint_reentrant"] for r in rows)


def test_verify_draws_int8_weights_whose_mlp_input_has_no_outlier_column():
    """LLM.int8 keeps the fp16 input columns above its 6.0 threshold per Linear; verify's weights at
    std 0.02 made nearly every down_proj input column of an 8B one (+1.8 GiB on the H200). The
    8-bit Linears verify builds (build._int8, INT8_OUTPUT_STD) leave none at the 8B's width."""
    import torch

    pytest.importorskip("bitsandbytes")
    from vramplan.verify.build import _int8

    torch.manual_seed(0)
    gate, up = (_int8(torch.nn.Linear(4096, 14336, bias=False, device="meta"), "cpu") for _ in range(2))
    x = torch.randn(128, 4096, dtype=torch.bfloat16)
    with torch.no_grad():
        act = torch.nn.functional.silu(gate(x)) * up(x)
    assert act.abs().amax().item() < 6.0
