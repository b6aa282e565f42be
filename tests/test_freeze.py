"""Freeze tuning (--train-layers N; LLaMA-Factory's finetuning_type: freeze), fast tier.

The step's rules are held to the CPU trace of the real step (tests/test_cpu_trace.py, the
`freeze-*` cases). Here: what follows from llamafactory==0.9.5 model/adapter.py:57-131 by hand
(only the last N layers have grads and optimizer states, in fp32 when LLaMA-Factory casts them,
and the frozen prefix saves nothing), the refusals, and the plumbing (config files, --emit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramplan.categories import Category
from vramplan.cli import main
from vramplan.configs import combine
from vramplan.configs.emit import emit
from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory import step_model
from vramplan.memory.activations import per_layer_saved
from vramplan.memory.optimizers import optimizer_state
from vramplan.memory.parameters import grad_bytes, parameters, store
from vramplan.memory.types import PhaseKind
from vramplan.model_loader import load_model_spec
from vramplan.setup import AdapterDtype, Method, ModelDtype

# Llama 3 8B: 32 identical layers of h 4096, f 14336, 8 KV heads of 128 (config.json)
H, F, KV = 4096, 14336, 1024
LAYER = H * H + 2 * H * KV + H * H + 3 * H * F + 2 * H  # q, k, v, o, gate/up/down, two norms


def _sum(spec, setup, rule) -> int:
    return sum(rule(p) for p in parameters(spec, setup))


@pytest.mark.parametrize("n", [1, 2, 8])
def test_only_the_last_layers_have_grads_and_adamw_states(n):
    spec = load_model_spec("llama-3-8b")
    setup = make_setup(method="full", train_layers=n, precision="bf16", model_dtype="bf16")
    assert _sum(spec, setup, lambda p: grad_bytes(p, setup) * p.numel) == 2 * n * LAYER
    # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype
    assert _sum(spec, setup, lambda p: optimizer_state(p, setup, p.numel).device) == 2 * 2 * n * LAYER


def test_llamafactory_casts_the_trained_layers_to_fp32_over_bf16_weights():
    spec = load_model_spec("llama-3-8b")
    uniform = make_setup(method="full", train_layers=2, precision="mixed", model_dtype="bf16")
    cast = make_setup(method="full", train_layers=2, precision="mixed", model_dtype="bf16", train_layers_dtype="fp32")

    def weights(setup):
        return _sum(spec, setup, lambda p: store(p, setup).get(Category.WEIGHTS, 0))

    assert weights(cast) - weights(uniform) == 2 * 2 * LAYER  # two layers from 2 to 4 bytes
    assert _sum(spec, cast, lambda p: grad_bytes(p, cast) * p.numel) == 4 * 2 * LAYER


def test_the_frozen_prefix_saves_nothing_and_has_no_backward():
    spec = load_model_spec("llama-3-8b", num_layers=6)
    for ckpt in (False, True):
        setup = make_setup(method="full", train_layers=2, gradient_checkpointing=ckpt, seq_len=512)
        saved = per_layer_saved(spec, setup)
        assert saved[:4] == [0, 0, 0, 0] and all(saved[4:])
        phases = step_model(spec, setup, every_layer=True).phases
        layers = {p.layer for p in phases if p.kind == PhaseKind.LAYER_BACKWARD}
        assert layers == {4, 5}


def test_freezing_holds_less_than_training_every_layer():
    spec = load_model_spec("llama-3.2-1b")
    full = make_setup(method="full", precision="mixed", model_dtype="bf16", seq_len=1024)
    frozen = make_setup(method="full", precision="mixed", model_dtype="bf16", seq_len=1024, train_layers=2)

    def peak(setup):
        return max(p.allocated for p in step_model(spec, setup).phases)

    assert peak(frozen) < peak(full)


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        (dict(method="lora", train_layers=2), "--train-layers"),
        (dict(method="full", train_layers=2, fsdp=2), "--fsdp"),
        (dict(method="full", train_layers=2, deepspeed="zero2"), "--deepspeed"),
        (dict(method="full", train_layers=2, compile=True), "--compile"),
        (dict(method="full", train_layers_dtype="fp32"), "--train-layers-dtype"),
        (dict(method="full", train_layers=2, train_layers_dtype="fp32", model_dtype="bf16"), "--train-layers-dtype"),
        (dict(method="full", train_layers=0), "--train-layers"),
    ],
)
def test_what_is_not_modelled_is_refused_naming_the_flag(fields, flag):
    with pytest.raises(VramplanError) as e:
        make_setup(**fields)
    assert e.value.flag == flag or flag in str(e.value), (fields, e.value)


def test_bad_train_layers_on_the_command_line_is_one_line(capsys):
    assert main(["estimate", "llama-3.2-1b", "--gpus", "1x24GB", "--method", "qlora", "--train-layers", "2"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--train-layers" in err and len(err.splitlines()) == 1 and "Traceback" not in err


LF_FREEZE = """\
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
stage: sft
do_train: true
finetuning_type: freeze
{extra}
cutoff_len: 2048
per_device_train_batch_size: 1
bf16: true
"""


def _read_lf(tmp_path: Path, extra: str = "") -> dict:
    path = tmp_path / "freeze.yaml"
    path.write_text(LF_FREEZE.format(extra=extra))
    return combine.setup_fields(combine.read_config([str(path)]), world=None)


def test_llamafactory_freeze_reads_as_the_last_two_layers_in_fp32(tmp_path):
    """freeze_trainable_layers defaults to 2 (hparams/finetuning_args.py:23-32); without
    pure_bf16 the trained parameters are cast to fp32 over the bf16 model."""
    fields = _read_lf(tmp_path)
    assert fields["method"] == Method.FULL and fields["train_layers"] == 2
    assert fields["model_dtype"] == ModelDtype.BF16 and fields["train_layers_dtype"] == AdapterDtype.FP32
    pure = _read_lf(tmp_path, "freeze_trainable_layers: 4\npure_bf16: true")
    assert pure["train_layers"] == 4 and pure.get("train_layers_dtype") is None


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("freeze_trainable_layers: -2", "freeze_trainable_layers"),
        ("use_llama_pro: true", "use_llama_pro"),
        ("freeze_trainable_modules: mlp", "freeze_trainable_modules"),
        ("freeze_extra_modules: embed_tokens", "freeze_extra_modules"),
        ("quantization_bit: 4", "finetuning_type"),
    ],
)
def test_llamafactory_freeze_it_cannot_model_names_the_key(tmp_path, extra, key):
    with pytest.raises(VramplanError) as e:
        _read_lf(tmp_path, extra)
    assert key in (e.value.flag or ""), e.value


def test_emit_writes_freeze_for_llamafactory_and_refuses_it_elsewhere():
    setup = make_setup(
        method="full",
        stack="llamafactory",
        train_layers=3,
        precision="mixed",
        model_dtype="bf16",
        train_layers_dtype="fp32",
        gradient_checkpointing=True,
    )
    text = emit("llamafactory", setup, "meta-llama/Llama-3.2-1B", {})
    assert "finetuning_type: freeze" in text and "freeze_trainable_layers: 3" in text
    with pytest.raises(VramplanError, match="train_layers"):
        plain = make_setup(method="full", stack="axolotl", train_layers=3, precision="mixed", model_dtype="bf16")
        emit("axolotl", plain, "meta-llama/Llama-3.2-1B", {})


def test_throughput_counts_the_backward_of_the_trained_layers_only():
    """throughput._backward_fraction: the frozen prefix has no backward or recomputation, lm_head
    no weight grad. All layers trained differ from a full fine-tune by lm_head's weight-grad
    matmul (2 N V h FLOPs); each trained layer adds the same backward."""
    from vramplan.hardware import profiles
    from vramplan.throughput import micro_flops, shapes, tokens_per_s

    spec = load_model_spec("llama-3-8b")
    sh, n = shapes(spec), len(spec.layers)

    def flops(layers):
        extra = {"train_layers": layers} if layers else {}
        return micro_flops(sh, make_setup(method="full", gradient_checkpointing=True, **extra))

    full, tokens = flops(None), make_setup(method="full").tokens
    assert full - flops(n) == pytest.approx(2 * tokens * spec.vocab * spec.hidden, rel=1e-9)
    step = flops(2) - flops(1)
    assert step > 0 and flops(3) - flops(2) == pytest.approx(step, rel=1e-9)
    h100 = profiles()["h100-80gb"]
    assert tokens_per_s(spec, make_setup(method="full", train_layers=2), h100) > tokens_per_s(
        spec, make_setup(method="full"), h100
    )
