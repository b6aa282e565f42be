"""The command line: the JSON contract, bad input, and the seeds' claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vramplan.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramplan.cli", *args], capture_output=True, text=True, timeout=120)


def test_json_contract(capsys):
    assert main(["estimate", "llama-3.2-1b", "--gpus", "1x80GB", "--method", "lora", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    pg = out["per_gpu"]
    assert isinstance(pg["peak_allocated_bytes"], int) and isinstance(pg["peak_reserved_bytes"], int)
    assert pg["peak_reserved_bytes"] >= pg["peak_allocated_bytes"] > 0
    assert set(pg["breakdown"]) >= {"weights", "activations", "optimizer_states", "cuda_context"}
    assert isinstance(out["fits"], bool) and isinstance(out["headroom_bytes"], int)
    allocated = sum(v for k, v in pg["breakdown"].items() if k not in ("allocator_overhead", "cuda_context"))
    assert allocated == pg["peak_allocated_bytes"]


def test_estimate_on_a_card_without_bf16_runs_fp16_unless_told(capsys):
    # a T4 (compute capability 7.5) has no bf16: the command line estimates what runs there,
    # fp16 autocast with a GradScaler, as the Python API and the strategy comparison do;
    # --precision given keeps what was asked
    base = ["estimate", "llama-3.2-1b", "--gpus", "1xt4", "--method", "lora", "--format", "json"]
    assert main(base) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["precision"] == "fp16"
    assert any("has no bf16: estimated with --precision fp16" in n for n in out["notes"])
    assert main([*base, "--precision", "bf16"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["precision"] == "bf16"


def test_the_strategy_comparison_on_a_card_without_bf16(capsys):
    """On a T4 every strategy is estimated in fp16; one fp16 cannot run (GaLore's layer-wise
    optimizer steps inside backward, which the GradScaler refuses) is left out, not a crash.
    Asked for directly, it is one line that names the flag and why fp16 was assumed."""
    assert main(["estimate", "llama-3.2-1b", "--gpus", "1xt4", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["strategies"]
    assert rows and all(r["setup"]["precision"] == "fp16" for r in rows)
    args = ["estimate", "llama-3.2-1b", "--gpus", "1xt4", "--method", "galore", "--optim", "galore_adamw_layerwise"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("vramplan: error: --optim:") and "has no bf16, so --precision fp16 was assumed" in line


@pytest.mark.parametrize(
    "args,flag",
    [
        (["estimate", "no-such-model", "--gpus", "1x24GB"], "MODEL"),
        (["estimate", "llama-7b", "--gpus", "2xfoo"], "--gpus"),
        (["estimate", "llama-7b", "--gpus", "0x24GB"], "--gpus"),
        (["estimate", "llama-7b", "--gpus", "1x24GB", "--method", "full", "--batch-size", "0"], "--batch-size"),
        (["estimate", "llama-7b", "--gpus", "1x24GB", "--method", "lora", "--lora-r", "100000"], "--lora-r"),
        (["estimate", "llama-7b", "--gpus", "1x24GB", "--method", "full", "--fsdp", "2"], "--fsdp"),
        (["estimate", "llama-7b", "--gpus", "1x24GB", "--method", "full", "--optim", "nadam"], "--optim"),
        (["estimate", "llama-7b", "--gpus", "1x24GB", "--method", "full", "--optim", "adamw_torch_xla"], "--optim"),
        (
            [
                "estimate",
                "llama-7b",
                "--gpus",
                "1x24GB",
                "--method",
                "full",
                "--optimizer-in-backward",
                "--gradient-accumulation",
                "4",
            ],
            "--gradient-accumulation",
        ),
        (["estimate", "llama-7b", "--gpus", "1x24GB", "--method", "qlora", "--quant", "int3"], "--quant"),
        (["estimate", "llama-7b", "--gpus", "1x24GB", "--method", "full", "--optim", "galore_adamw"], "--optim"),
        # the comparison of standard strategies validates the flags it takes...
        (["estimate", "llama-7b", "--gpus", "1x24GB", "--batch-size", "0"], "--batch-size"),
        (["estimate", "llama-7b", "--gpus", "2x24GB", "--seq-len", "-5"], "--seq-len"),
        # ...and refuses, rather than drops, one that picks a configuration
        (["estimate", "llama-7b", "--gpus", "2x24GB", "--lora-r", "64"], "--lora-r"),
        (["plot", "breakdown", "llama-7b", "--gpus", "2x24GB", "--fsdp", "2"], "--fsdp"),
        (["estimate", "llama-3.2-1b", "--gpus", "1x24GB", "--method", "full", "--num-layers", "17"], "--num-layers"),
    ],
)
def test_bad_input_is_one_line(args, flag):
    proc = run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("vramplan: error: ") and flag in lines[0]
    assert proc.stdout == ""


def test_unknown_model_lists_presets():
    proc = run("estimate", "llama-99b", "--gpus", "1x24GB")
    assert "llama-2-70b" in proc.stderr and "llama-70b" in proc.stderr


def test_config_that_is_not_a_model(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hello": 1}))
    proc = run("estimate", str(bad), "--gpus", "1x24GB", "--method", "full")
    assert proc.returncode == 2 and "model" in proc.stderr.lower()


@pytest.mark.cputrace
def test_config_without_linear_layers_is_refused(tmp_path):
    """GPT-2's projections are transformers Conv1D: no rule covers them, so no number."""
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "n_embd": 64,
                "n_head": 4,
                "n_layer": 2,
                "n_positions": 128,
                "vocab_size": 256,
                "bos_token_id": 0,
                "eos_token_id": 0,
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "vramplan.cli", "estimate", str(cfg), "--gpus", "1x24GB", "--method", "lora"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VRAMPLAN_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "MODEL" in proc.stderr and "nn.Linear" in proc.stderr and "Conv1D" in proc.stderr


def test_config_without_attention_heads_is_refused(tmp_path, capsys):
    """Mamba's config has no num_attention_heads: one line naming MODEL, not an internal error."""
    cfg = tmp_path / "config.json"
    fields = {"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 256}
    cfg.write_text(json.dumps({"architectures": ["MambaForCausalLM"], **fields}))
    env = {"VRAMPLAN_CACHE": str(tmp_path / "cache")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["estimate", str(cfg), "--gpus", "1x24GB", "--method", "full"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "MODEL" in line and "'mamba' has no num_attention_heads" in line


def _est(*args):
    from vramplan.estimate import estimate_config

    return estimate_config(*args[:2], **args[2])


def test_seed_70b_qlora_fsdp_offload_fits_two_24gb_cards():
    e = _est(
        "llama-2-70b",
        "2x24GB",
        dict(
            method="qlora",
            quant="nf4",
            lora_r=64,
            fsdp=2,
            cpu_offload=True,
            gradient_checkpointing=True,
            batch_size=2,
            seq_len=2048,
        ),
    )
    assert e.fits


def test_seed_70b_full_finetune_does_not_fit_two_24gb_cards():
    e = _est("llama-2-70b", "2x24GB", dict(method="full", fsdp=2, gradient_checkpointing=True))
    assert not e.fits


def test_seed_7b_galore_8bit_layerwise_fits_one_24gb_card():
    e = _est(
        "llama-2-7b",
        "1x24GB",
        dict(method="galore", optim="galore_adamw_8bit_layerwise", galore_rank=1024, batch_size=1, seq_len=256),
    )
    assert e.fits


def test_compare_recommends_qlora_fsdp_for_70b_on_two_24gb(capsys):
    assert main(["estimate", "llama-70b", "--gpus", "2x24GB", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "QLoRA" in out["recommended"] and "FSDP" in out["recommended"]
    # the alias resolves to its preset, and every strategy says so
    assert out["model"] == "llama-2-70b"
    assert all(s["notes"][0] == "'llama-70b' resolved to preset 'llama-2-70b'" for s in out["strategies"])


@pytest.mark.cputrace
def test_config_without_a_causal_lm_class_is_one_short_line(tmp_path):
    """T5 is an encoder-decoder: neither a causal-LM nor an image-text class trains it on
    text; transformers' own message lists every config class it knows, the user gets one line."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "t5", "d_model": 64, "num_layers": 2, "vocab_size": 256}))
    proc = subprocess.run(
        [sys.executable, "-m", "vramplan.cli", "estimate", str(cfg), "--gpus", "1x24GB", "--method", "lora"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VRAMPLAN_CACHE": str(tmp_path / "cache")},
    )
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert line.startswith("vramplan: error: MODEL:") and "'t5'" in line and len(line) < 300
