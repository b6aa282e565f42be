"""`--config` and `plan --emit` on the command line (issue 14 items 1, 2 and 5).

The flags below were written by hand from reading each sample in tests/data/configs_frameworks
(and the framework sources cited in docs/configs.md), not produced by the code under test.
Models the samples name that no preset matches come from a pre-filled huggingface_hub cache
(hub_cache fixture); the network is never used (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from vramplan.cli import main

DATA = Path(__file__).parent / "data" / "configs_frameworks"

# meta-llama/Meta-Llama-3-8B config.json as published (the same file NousResearch mirrors),
# keys as on the Hub: Llama 3.1's shapes with Llama 3's context and no rope scaling.
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
HUB = {
    "NousResearch/Meta-Llama-3-8B": LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": {**LLAMA3_8B, "eos_token_id": 128009},
}


def fill_hub_cache(root: Path, repos: dict[str, dict]) -> None:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<rev>/config.json}."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    for repo, cfg in repos.items():
        folder = root / ("models--" + repo.replace("/", "--"))
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(rev)
        (folder / "snapshots" / rev).mkdir(parents=True)
        (folder / "snapshots" / rev / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline huggingface_hub with a pre-filled cache, and a private vramplan spec cache."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    fill_hub_cache(cache, HUB)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "vramplan"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    return cache


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


AXO_QLORA = (
    "--stack axolotl --method qlora --quant nf4 --lora-r 32 --lora-dropout 0.05 --lora-targets all-linear "
    "--batch-size 2 --gradient-accumulation 4 --seq-len 4096 --model-dtype bf16 --precision mixed "
    "--attention flash --gradient-checkpointing --optim paged_adamw_32bit --packing padding-free --no-kbit-prep"
)
LF_LORA = (
    "--stack llamafactory --method lora --lora-r 8 --lora-targets all-linear --batch-size 1 "
    "--gradient-accumulation 8 --seq-len 2048 --precision mixed --model-dtype bf16 --adapter-dtype fp32 "
    "--no-kbit-prep"
)

# (files, GPUs, the model the file names, the same setup as flags)
SAMPLES = [
    (["axolotl/qlora.yml"], "rtx-4090", "NousResearch/Meta-Llama-3-8B", AXO_QLORA),
    (
        ["axolotl/lora-8b.yml"],
        "rtx-4090",
        "NousResearch/Meta-Llama-3-8B",
        AXO_QLORA.replace("--quant nf4", "--quant int8").replace("paged_adamw_32bit", "adamw_bnb_8bit")
        + " --modules-to-save embed_tokens,lm_head",
    ),
    (
        ["axolotl/fft-8b-liger-fsdp.yaml"],
        "2xh100-80gb",
        "NousResearch/Meta-Llama-3.1-8B",
        "--stack axolotl --method full --batch-size 2 --gradient-accumulation 4 --seq-len 4096 --model-dtype bf16 "
        "--precision bf16 --attention flash --gradient-checkpointing --no-checkpoint-reentrant "
        "--optim adamw_torch_fused --loss liger --liger-layers all --fsdp 2 --fsdp-version 1 --fsdp-sharding full "
        "--cpu-offload "
        "--packing padding-free",
    ),
    (
        ["axolotl/mistral-qlora-fsdp.yml"],
        "2xh100-80gb",
        "mistralai/Mixtral-8x7B-v0.1",
        "--stack axolotl --method qlora --quant nf4 --lora-r 32 --lora-dropout 0.05 --lora-targets all-linear "
        "--batch-size 2 --gradient-accumulation 4 --seq-len 1024 --model-dtype bf16 --precision mixed "
        "--attention flash --gradient-checkpointing --optim paged_adamw_8bit --fsdp 2 --fsdp-version 1 "
        "--fsdp-sharding full --no-cpu-offload --packing none --no-kbit-prep",
    ),
    (
        ["axolotl/qlora.yml", "deepspeed/axolotl_zero2.json"],
        "2xrtx-4090",
        "NousResearch/Meta-Llama-3-8B",
        AXO_QLORA + " --deepspeed zero2 --offload-optimizer",
    ),
    (
        ["trl/trl_example_config.yaml"],
        "rtx-4090",
        "Qwen/Qwen2.5-0.5B",
        "--stack trl --method full --loss trl-chunked-nll",
    ),
    (
        ["trl/trl_example_config.yaml", "accelerate/trl_fsdp2.yaml"],
        "8xh100-80gb",
        "Qwen/Qwen2.5-0.5B",
        "--stack trl --method full --loss trl-chunked-nll --nodes 1 --precision mixed --fsdp 8 --fsdp-version 2 "
        "--fsdp-sharding full --no-cpu-offload",
    ),
    (["llamafactory/train_lora__qwen3_lora_sft.yaml"], "rtx-4090", "Qwen/Qwen3-4B-Instruct-2507", LF_LORA),
    (
        ["llamafactory/train_qlora__qwen3_lora_sft_otfq.yaml"],
        "rtx-4090",
        "Qwen/Qwen3-4B-Instruct-2507",
        LF_LORA.replace("--method lora", "--method qlora --quant nf4"),
    ),
    (
        ["llamafactory/train_full__qwen3_full_sft.yaml", "deepspeed/llamafactory_ds_z3_config.json"],
        "2xh100-80gb",
        "Qwen/Qwen3-4B-Instruct-2507",
        "--stack llamafactory --method full --batch-size 1 --gradient-accumulation 2 --seq-len 2048 --precision mixed "
        "--model-dtype fp32 --deepspeed zero3",
    ),
    (
        ["llamafactory/extras__fsdp_qlora__llama3_lora_sft.yaml", "accelerate/llamafactory_fsdp_config.yaml"],
        "2xrtx-4090",
        "meta-llama/Meta-Llama-3-8B-Instruct",
        LF_LORA.replace("--method lora", "--method qlora --quant nf4") + " --fsdp 2 --fsdp-version 1 "
        "--fsdp-sharding full --no-cpu-offload --nodes 1",
    ),
    (
        ["llamafactory/extras__apollo__llama3_full_sft.yaml"],
        "rtx-3090",
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "--stack llamafactory --method full --batch-size 1 --gradient-accumulation 1 --seq-len 2048 --precision bf16 "
        "--model-dtype bf16 --optim apollo_adamw_layerwise --apollo-rank 128",
    ),
    (
        ["torchtune/8B_full_single_device.yaml"],
        "h100-80gb",
        "meta-llama/Llama-3.1-8B",
        "--stack torchtune --method full --batch-size 2 --gradient-accumulation 1 --packing none --precision bf16 "
        "--model-dtype bf16 --optim paged_adamw_8bit --loss chunked --optimizer-in-backward --gradient-checkpointing "
        "--activation-offload none",
    ),
]


@pytest.mark.parametrize("files,gpus,model,flags", SAMPLES, ids=["+".join(s[0]) for s in SAMPLES])
def test_config_equals_the_same_flags(hub_cache, capsys, files, gpus, model, flags):
    config = [a for f in files for a in ("--config", str(DATA / f))]
    from_file = run_json(capsys, ["estimate", "--gpus", gpus, "--format", "json", *config])
    by_hand = run_json(capsys, ["estimate", model, "--gpus", gpus, "--format", "json", *shlex.split(flags)])
    a, b = from_file["per_gpu"]["peak_allocated_bytes"], by_hand["per_gpu"]["peak_allocated_bytes"]
    assert abs(a - b) <= 0.01 * b
    assert from_file["setup"] == by_hand["setup"]
    assert any(line.startswith("used: ") for line in from_file["config"])
    assert "config" not in by_hand


def test_the_files_world_is_the_gpu_count(hub_cache, capsys):
    """TRL's fsdp2.yaml says num_processes: 8, so --gpus h100-80gb means 8 of them."""
    out = run_json(
        capsys,
        [
            "estimate",
            "--gpus",
            "h100-80gb",
            "--format",
            "json",
            "--config",
            str(DATA / "trl/trl_example_config.yaml"),
            "--config",
            str(DATA / "accelerate/trl_fsdp2.yaml"),
        ],
    )
    assert out["gpu_count"] == 8 and out["setup"]["fsdp"] == 8


def test_flags_override_the_file(hub_cache, capsys):
    out = run_json(
        capsys,
        [
            "estimate",
            "--config",
            str(DATA / "axolotl/qlora.yml"),
            "--gpus",
            "rtx-4090",
            "--format",
            "json",
            "--lora-r",
            "8",
            "--seq-len",
            "1024",
            "qwen2.5-0.5b",
        ],
    )
    assert out["setup"]["lora_r"] == 8 and out["setup"]["seq_len"] == 1024 and out["model"] == "qwen2.5-0.5b"
    assert out["setup"]["batch_size"] == 2  # the file's, not the flag default


def test_table_prints_the_reading_on_stderr(hub_cache, capsys):
    assert main(["estimate", "--config", str(DATA / "axolotl/qlora.yml"), "--gpus", "rtx-4090"]) == 0
    out, err = capsys.readouterr()
    assert "used: micro_batch_size -> batch_size=2" in err and "used:" not in out


def test_no_model_anywhere_is_one_line(capsys):
    assert main(["estimate", "--config", str(DATA / "deepspeed/axolotl_zero2.json"), "--gpus", "rtx-4090"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vramplan: error: MODEL: give MODEL") and err.count("\n") == 1


@pytest.mark.parametrize(
    "text,needle",
    [
        ("foo: 1\nbar: [1, 2]\n", "--config"),
        ("base_model: x\nmicro_batch_size: 0\n", "micro_batch_size"),
        ("base_model: x\nadapter: lora\nlora_r: -1\n", "lora_r"),
        ("- a\n- b\n", "mapping"),
    ],
)
def test_bad_files_are_one_line(tmp_path, capsys, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for command in (["estimate", "qwen2.5-0.5b", "--gpus", "rtx-4090"], ["plan", "qwen2.5-0.5b", "--gpus", "rtx-4090"]):
        assert main([*command, "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_bad_value_from_the_file_names_its_key(tmp_path, capsys):
    """transformers==5.25.0 (TRL's) refuses FlashAttention-2 on Gemma 3's image-text class; the
    value came from the file's attn_implementation, so the one line names that key and the file
    first, then the flag that overrides it; given on the command line, the flag alone."""
    path = tmp_path / "g3.yml"
    path.write_text(
        "model_name_or_path: google/gemma-3-4b-it\nuse_peft: true\nload_in_4bit: true\n"
        "attn_implementation: flash_attention_2\n"
    )
    for command in ("estimate", "plan"):
        assert main([command, "--config", str(path), "--gpus", "rtx-4090"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vramplan: error: attn_implementation in g3.yml (--attention): flash:"), err
        assert err.count("\n") == 1
    assert main(["estimate", "--config", str(path), "--gpus", "rtx-4090", "--attention", "flash"]) == 2
    assert capsys.readouterr().err.startswith("vramplan: error: --attention: flash:")


def test_gemma3_flash_runs_under_a_stack_whose_transformers_accepts_it(tmp_path, capsys):
    """axolotl==0.19.0 pins transformers==5.16.1, whose Gemma3ForConditionalGeneration takes
    flash_attention_2 (modeling_gemma3.py:439; 5.25.0 refuses it): axolotl's own Gemma 3 examples
    (examples/gemma3/gemma-3-4b-qlora.yml) run with it, so the estimate does, and says why."""
    path = tmp_path / "g3.yml"
    path.write_text(
        "base_model: google/gemma-3-4b-it\nadapter: qlora\nload_in_4bit: true\nattn_implementation: flash_attention_2\n"
    )
    assert main(["estimate", "--config", str(path), "--gpus", "rtx-4090", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["attention"] == "flash"
    assert any("flash on Gemma3ForConditionalGeneration" in n for n in out["notes"])
    # without a stack that pins such a transformers, one line says which stacks do
    assert main(["estimate", "gemma-3-4b", "--gpus", "rtx-4090", "--attention", "flash"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--stack axolotl/llamafactory/unsloth" in err


def test_bad_deepspeed_stage_and_missing_file(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    assert main(["estimate", "qwen2.5-0.5b", "--gpus", "rtx-4090", "--config", str(ds)]) == 2
    assert "stage" in capsys.readouterr().err
    assert main(["estimate", "qwen2.5-0.5b", "--gpus", "rtx-4090", "--config", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert "none.yaml" in err and err.count("\n") == 1


# ---- plan --emit


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
@pytest.mark.parametrize("fmt", ["axolotl", "trl", "llamafactory"])
@pytest.mark.parametrize("gpus", ["rtx-4090", "2xrtx-4090"])
def test_plan_emit_round_trips(tmp_path, capsys, fmt, gpus):
    """The emitted file, read back with `estimate --config`, gives the plan's per-GPU figure."""
    target = tmp_path / f"{fmt}.yaml"
    top = "40" if fmt == "llamafactory" else "3"  # its files carry no FSDP: a DDP row further down is written
    plan = run_json(
        capsys,
        [
            "plan",
            "qwen2.5-0.5b",
            "--gpus",
            gpus,
            "--top",
            top,
            "--methods",
            "full,lora,qlora-nf4",
            "--emit",
            fmt,
            "-o",
            str(target),
            "--format",
            "json",
        ],
    )
    text = target.read_text()
    assert "# predicted per-GPU peak:" in text and "# vramplan command: vramplan plan qwen2.5-0.5b" in text
    est = run_json(capsys, ["estimate", "--config", str(target), "--gpus", gpus, "--format", "json"])
    emitted = next(r for r in plan["rows"] if f"({r['label']}, micro-batch" in text)
    assert emitted == plan["recommended"] or fmt == "llamafactory"  # the recommended row
    assert abs(est["per_gpu"]["total_bytes"] - emitted["per_gpu_bytes"]) <= 0.01 * emitted["per_gpu_bytes"]


def test_emit_dir_writes_one_file_per_row(tmp_path, capsys):
    folder = tmp_path / "out"
    assert (
        main(
            [
                "plan",
                "qwen2.5-0.5b",
                "--gpus",
                "rtx-4090",
                "--top",
                "3",
                "--methods",
                "full,lora",
                "--emit",
                "axolotl",
                "--emit-dir",
                str(folder),
                "--format",
                "json",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    plan = json.loads(out.out)
    assert sorted(Path(p).name for p in plan["emitted"]) == sorted(p.name for p in folder.iterdir())
    # a row the format cannot express (axolotl has no fp32 masters: precision mixed with fp32
    # weights) is skipped with a line on stderr; every other shown row is one file
    skipped = out.err.count("--emit-dir: skipped row")
    assert plan["emitted"] and len(plan["emitted"]) + skipped == len(plan["rows"])


def test_emit_refusal_writes_nothing(tmp_path, capsys):
    """LLaMA-Factory files cannot carry FSDP: a plan whose rows all shard refuses, and no file appears."""
    target = tmp_path / "lf.yaml"
    code = main(
        [
            "plan",
            "qwen2.5-7b",
            "--gpus",
            "2xrtx-4090",
            "--methods",
            "full",
            "--top",
            "2",
            "--emit",
            "llamafactory",
            "-o",
            str(target),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "llamafactory cannot express fsdp" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_emit_needs_a_target(capsys):
    assert main(["plan", "qwen2.5-0.5b", "--gpus", "rtx-4090", "--emit", "trl"]) == 2
    assert "-o FILE" in capsys.readouterr().err
    assert main(["plan", "qwen2.5-0.5b", "--gpus", "rtx-4090", "-o", "x.yaml"]) == 2
    assert "needs --emit" in capsys.readouterr().err


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_plan_keeps_the_files_fixed_fields(hub_cache, capsys):
    """axolotl/qlora.yml: flash attention, padding-free packing and 4096 tokens stay; the search varies the rest."""
    out = run_json(
        capsys,
        [
            "plan",
            "--config",
            str(DATA / "axolotl/qlora.yml"),
            "--gpus",
            "rtx-4090",
            "--top",
            "3",
            "--methods",
            "qlora-nf4,lora",
            "--format",
            "json",
        ],
    )
    assert out["config"][0].startswith("config: ") and out["rows"]
    for row in out["rows"]:
        setup = row["setup"]
        assert (setup["attention"], setup["packing"], setup["stack"]) == ("flash", "padding-free", "axolotl")
        assert setup["seq_len"] >= 4096


# torchtune's LoRA recipes adapt q, v and output_proj plus the MLP (no k_proj): a target list
# no command-line flag spells (--lora-targets takes all-linear/attention), so the same setup is
# given through the Python API, by hand from the sample files.
TT_LORA = dict(
    stack="torchtune",
    method="lora",
    lora_r=8,
    lora_dropout=0.0,
    lora_target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    batch_size=2,
    gradient_accumulation=8,
    packing="none",
    precision="bf16",
    model_dtype="bf16",
    adapter_dtype="bf16",
    optim="adamw_torch_fused",
    loss="chunked",
    gradient_checkpointing=True,
    activation_offload="none",
    kbit_prep=False,
)


@pytest.mark.parametrize(
    "sample,model,fields",
    [
        ("torchtune/qwen2_5_7B_lora_single_device.yaml", "qwen2.5-7b", TT_LORA),
        ("torchtune/8B_qlora_single_device.yaml", "llama-3.1-8b", {**TT_LORA, "method": "qlora", "quant": "nf4"}),
    ],
)
def test_torchtune_lora_equals_the_api(hub_cache, capsys, sample, model, fields):
    import vramplan

    out = run_json(capsys, ["estimate", "--config", str(DATA / sample), "--gpus", "h100-80gb", "--format", "json"])
    est = vramplan.estimate(model, gpus="h100-80gb", **fields)
    assert (
        abs(out["per_gpu"]["peak_allocated_bytes"] - est.per_gpu.peak_allocated_bytes)
        <= 0.01 * est.per_gpu.peak_allocated_bytes
    )


# ---- target_modules as one string: peft's regular expression


def _axolotl(tmp_path, targets: str, extra: str = "") -> str:
    path = tmp_path / "axo.yml"
    path.write_text(
        "base_model: x/y\nadapter: lora\nlora_r: 16\nmicro_batch_size: 1\nsequence_len: 512\n"
        f"lora_target_modules: '{targets}'\n{extra}"
    )
    return str(path)


def _peak(capsys, argv: list[str]) -> tuple[int, dict]:
    data = run_json(capsys, [*argv, "--gpus", "1x80GB", "--format", "json"])
    return data["per_gpu"]["peak_allocated_bytes"], data


def test_a_regex_target_adapts_what_peft_would(tmp_path, capsys):
    """axolotl passes a string lora_target_modules to LoraConfig as given; peft fullmatches it
    against full module names. Gemma 3's image-text class keeps its decoder layers under
    model.language_model.layers (ModelSpec.layers_path): axolotl's own example regex adapts
    the seven projections of every layer there, as the explicit list does, and matches
    nothing in a Llama, whose layers are model.layers."""
    regex = r"model.language_model.layers.[\d]+.(mlp|cross_attn|self_attn).(up|down|gate|q|k|v|o)_proj"
    names = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    peak, data = _peak(capsys, ["estimate", "gemma-3-4b", "--config", _axolotl(tmp_path, regex)])
    flags = ["--stack", "axolotl", *AXO_REGEX_FLAGS, "--lora-targets", names]
    listed, _ = _peak(capsys, ["estimate", "gemma-3-4b", *flags])
    assert peak == listed and len(data["setup"]["lora_target_modules"]) == 7
    assert main(["estimate", "llama-3.2-1b", "--config", _axolotl(tmp_path, regex), "--gpus", "1x80GB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vramplan: error: lora_target_modules in axo.yml (--lora-targets):") and err.count("\n") == 1
    assert "model.layers.0.self_attn.q_proj" in err


AXO_REGEX_FLAGS = "--method lora --lora-r 16 --batch-size 1 --seq-len 512 --model-dtype bf16 --precision mixed".split()


def test_a_layer_selective_regex_is_an_upper_bound_with_a_note(tmp_path, capsys):
    every = _axolotl(tmp_path, r"model\.layers\.\d+\.self_attn\.(q|v)_proj")
    some = str(tmp_path / "some.yml")
    Path(some).write_text(Path(every).read_text().replace(r"\d+", "(0|3)"))
    all_layers, _ = _peak(capsys, ["estimate", "llama-3.2-1b", "--config", every])
    two, data = _peak(capsys, ["estimate", "llama-3.2-1b", "--config", some])
    assert two == all_layers
    assert any("self_attn.q_proj in 2 of 16 layers" in n and "upper bound" in n for n in data["notes"])


def test_regex_targets_refusals_and_overrides(tmp_path, capsys):
    assert main(["estimate", "llama-3.2-1b", "--config", _axolotl(tmp_path, "q_proj("), "--gpus", "1x80GB"]) == 2
    err = capsys.readouterr().err
    assert "lora_target_modules" in err and "regular expression" in err and err.count("\n") == 1
    # --lora-targets on the command line replaces the file's regex (which would match nothing here)
    path = _axolotl(tmp_path, "nothing")
    flagged, _ = _peak(capsys, ["estimate", "llama-3.2-1b", "--config", path, "--lora-targets", "q_proj"])
    flags = ["--stack", "axolotl", *AXO_REGEX_FLAGS, "--lora-targets", "q_proj"]
    listed, _ = _peak(capsys, ["estimate", "llama-3.2-1b", *flags])
    assert flagged == listed
    # TRL unwraps a one-name list to a string (trl/trainer/model_config.py:177-178): peft's regex
    trl = tmp_path / "trl.yaml"
    trl.write_text("model_name_or_path: x/y\nuse_peft: true\nlora_target_modules: [q_proj]\n")
    assert main(["plan", "llama-3.2-1b", "--config", str(trl), "--gpus", "1x80GB"]) == 2
    assert "lora_target_modules in trl.yaml (--lora-targets): 'q_proj' matches no Linear" in capsys.readouterr().err


def test_emit_writes_the_recommended_row_not_the_fastest(tmp_path):
    """The recommended row is the fastest with the headroom rule's room, not always the first
    (axolotl's Gemma 3 vision example on a 4090: the fastest leaves 0.3 GiB): -o writes it."""
    import argparse

    from vramplan.cli import emit_rows
    from vramplan.plan import plan_model
    from vramplan.setup import Stack

    result = plan_model("qwen2.5-0.5b", "rtx-4090", top=3, methods="lora", fixed={"stack": Stack.AXOLOTL})
    assert len(result.rows) >= 2
    result = result.model_copy(update={"recommended": result.rows[1]})
    args = argparse.Namespace(emit="axolotl", output=str(tmp_path / "o.yaml"), emit_dir=None, model="qwen2.5-0.5b")
    texts = emit_rows.build(args, result, "qwen2.5-0.5b", None, 1)
    (text,) = texts.values()
    assert f"({result.rows[1].label}, micro-batch" in text and f"({result.rows[0].label}, micro" not in text
