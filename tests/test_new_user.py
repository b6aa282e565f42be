"""Issue 16, what a new user hits: plan ranking, the shared headroom rule, what would fit,
the assumptions said in the output, the GPU flags, the table width and typed CSV."""

from __future__ import annotations

import csv
import io

import pytest

from vramplan.cli import main
from vramplan.estimate import resolve_gpus
from vramplan.hardware import Vendor
from vramplan.model_loader import load_model_spec
from vramplan.plan import plan_model

GiB = 2**30


@pytest.fixture(scope="module")
def eight_b_on_4090():
    return plan_model("llama-3.1-8b", "rtx-4090", top=10)


# ---------------------------------------------------------------- ranking


def test_plan_rows_are_sorted_by_tokens_per_s_exactly():
    """`plan llama-3.2-1b --gpus 2x24GB --methods full` listed 10,071 above 10,134 (a hidden
    3-significant-digit tie rule, and the recommendation moved to the top)."""
    res = plan_model("llama-3.2-1b", "2x24GB", methods="full", top=12)
    speeds = [r.tokens_per_s for r in res.rows]
    assert speeds == sorted(speeds, reverse=True)
    assert any("fastest first by estimated tokens/s" in rule for rule in res.rules)


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_a_faster_lower_rank_is_recommended_over_a_higher_one(eight_b_on_4090):
    """r16 at micro-batch 3 fits with room to spare and is faster than r32 at micro-batch 3:
    the minimum rank is the smallest rank accepted, not a reason to raise it."""
    res = eight_b_on_4090
    rec = res.recommended
    cap = res.gpu_memory_bytes
    assert rec.headroom_bytes >= 0.05 * cap
    faster_safe = [r for r in res.rows if r.tokens_per_s > rec.tokens_per_s and r.headroom_bytes >= 0.05 * cap]
    assert faster_safe == []
    assert rec.setup.lora_r == 16
    assert any("smallest rank you accept" in rule and "never preferred" in rule for rule in res.rules)


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_comparison_and_plan_recommend_by_one_headroom_rule(capsys):
    """GaLore at 0.43 GiB headroom was recommended by the comparison and refused by plan."""
    from vramplan.headroom import has_safe_headroom, rule_text
    from vramplan.strategies import compare

    spec = load_model_spec("llama-3.1-8b")
    gpus = resolve_gpus("rtx-4090")
    rows = compare(spec, gpus, {}, 128 * GiB)
    rec = next(r for r in rows if r.recommended)
    assert has_safe_headroom(rec.estimate.headroom_bytes, gpus.profile.memory_bytes)
    assert rec.label != "GaLore 8bit-lw r128 + ckpt"  # 0.43 GiB spare: under the rule (its fused-CE row may pass)
    assert main(["estimate", "llama-3.1-8b", "--gpus", "rtx-4090"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(rule_text(gpus.profile.memory_bytes).split()) in out
    plan = plan_model("llama-3.1-8b", "rtx-4090", top=3)
    assert rule_text(gpus.profile.memory_bytes) in plan.rules


# ---------------------------------------------------------------- what would fit


def test_larger_cards_are_every_nvidia_bf16_class():
    from vramplan.plan import larger_cards

    cards = larger_cards(24 * GiB)
    assert all(c.vendor == Vendor.NVIDIA and c.bf16 for c in cards)
    sizes = [round(c.nominal_memory_gb) for c in cards]
    assert sizes == sorted(set(sizes))
    assert 80 in sizes and 141 in sizes


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_long_context_suggests_an_80gb_card():
    """--min-seq 32768 on an 8B said only "shorter context"."""
    res = plan_model("llama-3.1-8b", "rtx-4090", min_seq=32768)
    assert not res.rows
    card = [s for s in res.suggestions if s.startswith("a larger card")]
    assert card and ("79 GiB" in card[0] or "80 GiB" in card[0] or "140 GiB" in card[0])


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_suggestion_providers_are_a_hook(monkeypatch):
    import sys

    plan = sys.modules["vramplan.plan"]  # the package exports a function of the same name
    monkeypatch.setattr(
        plan, "SUGGESTION_PROVIDERS", [*plan.SUGGESTION_PROVIDERS, lambda spec, req, grids: ["a fused loss: (test)"]]
    )
    res = plan_model("qwen2.5-7b", "1x8GB", methods="full", min_seq=1024, host_ram=64 * GiB)
    assert "a fused loss: (test)" in res.suggestions


# ---------------------------------------------------------------- the assumptions said


def test_comparison_says_batch_stack_host_ram_and_ddp(capsys):
    assert main(["estimate", "llama-3.2-1b", "--gpus", "2x24GB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "micro-batch 1 x 2048" in out
    assert "stack plain" in out
    assert "host RAM 128 GB per node assumed (--host-ram)" in out
    assert "DDP" in out


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_plan_says_sequence_stack_host_ram_and_ddp(capsys):
    assert (
        main(
            ["plan", "qwen2.5-0.5b", "--gpus", "2x24GB", "--methods", "lora", "--max-batch", "4", "--host-ram", "64GB"]
        )
        == 0
    )
    out = " ".join(capsys.readouterr().out.split())
    assert "at least 2048 tokens" in out and "stack plain" in out
    assert "host RAM 64 GB per node (--host-ram)" in out and "DDP" in out


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
@pytest.mark.parametrize("width", [80, 120])
def test_plan_table_fits_the_terminal(width, monkeypatch, capsys):
    """The command's own console (no console passed): the terminal's width, not a fixed 150."""
    from vramplan.report.plan import print_plan

    res = plan_model("llama-3.2-1b", "2x24GB", methods="full,lora", top=8)
    monkeypatch.setenv("COLUMNS", str(width))
    print_plan(res)
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= width
    assert any("LoRA" in line for line in lines)


def test_plan_csv_keeps_ranks_integers(capsys):
    assert (
        main(
            [
                "plan",
                "qwen2.5-0.5b",
                "--gpus",
                "1x24GB",
                "--methods",
                "full,lora",
                "--max-batch",
                "4",
                "--top",
                "40",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    ranks = [r["lora_r"] for r in rows if r["lora_r"]]
    assert ranks and all(r.isdigit() for r in ranks)
    assert any(not r["lora_r"] for r in rows)  # the full rows have none


def test_plan_notes_say_which_card_a_size_stands_for():
    res = plan_model("qwen2.5-0.5b", "1x24GB", methods="lora", max_batch=4, top=2)
    assert any("24GB as rtx-3090" in n for n in res.notes)


# ---------------------------------------------------------------- the GPU flags


def test_gpu_flags_reach_estimate(capsys):
    assert (
        main(
            [
                "estimate",
                "llama-3.2-1b",
                "--gpus",
                "2x24GB",
                "--method",
                "lora",
                "--gpu-tflops",
                "165",
                "--gpu-bandwidth",
                "1008",
                "--reserve",
                "1GB",
                "--format",
                "json",
            ]
        )
        == 0
    )
    import json

    out = json.loads(capsys.readouterr().out)
    notes = " ".join(out["notes"])
    assert "--gpu-tflops" in notes and "--gpu-bandwidth" in notes and "--reserve" in notes


def test_reserve_reaches_plan(capsys):
    args = ["plan", "qwen2.5-0.5b", "--gpus", "1x24GB", "--methods", "lora", "--max-batch", "2", "--format", "json"]
    import json

    assert main(args) == 0
    full = json.loads(capsys.readouterr().out)["gpu_memory_bytes"]
    assert main([*args, "--reserve", "2GB", "--gpu-tflops", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu_memory_bytes"] == full - 2 * GiB
    assert any("--gpu-tflops" in n for n in out["notes"])


def test_gpu_flags_reach_plot(tmp_path):
    out = tmp_path / "b.png"
    assert (
        main(
            [
                "plot",
                "breakdown",
                "llama-3.2-1b",
                "--gpus",
                "1x24GB",
                "--method",
                "lora",
                "--reserve",
                "1GB",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert out.exists()
    assert (
        main(
            [
                "plot",
                "scaling",
                "llama-3.2-1b",
                "--gpus",
                "1x24GB",
                "--gpu-tflops",
                "100",
                "--values",
                "512",
                "--method",
                "lora",
                "-o",
                str(tmp_path / "s.png"),
            ]
        )
        == 0
    )


def test_bad_gpu_flag_is_one_line(capsys):
    assert main(["estimate", "llama-3.2-1b", "--gpus", "1x24GB", "--gpu-tflops", "fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu-tflops" in err[0]


# ---------------------------------------------------------------- models


def test_moe_with_fused_experts_says_qlora_leaves_them_bf16(capsys):
    """Qwen3-30B-A3B QLoRA was 63.7 GiB with no word of the experts staying bf16."""
    import vramplan

    est = vramplan.estimate("qwen3-30b-a3b", gpus="1x80GB", method="qlora")
    note = next(n for n in est.notes if "fused 3-D tensors" in n)
    assert "neither quantized" in note and "bf16" in note
    dense = vramplan.estimate("qwen3-8b", gpus="1x80GB", method="qlora")
    assert not any("fused 3-D tensors" in n for n in dense.notes)
    full = vramplan.estimate("qwen3-30b-a3b", gpus="8x80GB", method="full", fsdp=8)
    assert not any("fused 3-D tensors" in n for n in full.notes)
    assert main(["estimate", "qwen3-30b-a3b", "--gpus", "1x80GB"]) == 0
    assert "fused 3-D tensors" in " ".join(capsys.readouterr().out.split())


def test_models_shows_each_presets_source_and_that_mistral_is_v01(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "mistralai/Mistral-7B-v0.1" in out and "meta-llama/Llama-3.1-8B" in out
    assert "revision" in out
    assert "mistral-7b: v0.1" in " ".join(out.split())


def _user_config(tmp_path, **extra) -> str:
    import json

    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 1000,
        "tie_word_embeddings": False,
        "max_position_embeddings": 2048,
        **extra,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_a_defaulted_config_field_is_named(tmp_path):
    import vramplan

    est = vramplan.estimate(_user_config(tmp_path), gpus="1x24GB", method="lora")
    note = next(n for n in est.notes if "does not set" in n)
    assert "intermediate_size" in note and "intermediate_size=11008" in note  # LlamaConfig's default
    assert "vocab_size" not in note.split(":")[0]
    preset = vramplan.estimate("llama-3.2-1b", gpus="1x24GB", method="lora")
    assert not any("does not set" in n for n in preset.notes)


def test_seq_len_beyond_the_context_is_a_warning(tmp_path):
    import vramplan

    path = _user_config(tmp_path, intermediate_size=512)
    est = vramplan.estimate(path, gpus="1x24GB", method="lora", seq_len=4096)
    assert any(n.startswith("WARNING") and "max_position_embeddings 2,048" in n for n in est.notes)
    within = vramplan.estimate(path, gpus="1x24GB", method="lora", seq_len=2048)
    assert not any(n.startswith("WARNING") for n in within.notes)


# ---------------------------------------------------------------- plots


def test_breakdown_title_says_batch_seq_and_stack():
    from vramplan import plot
    from vramplan.hardware import parse_gpus

    spec = load_model_spec("llama-3.2-1b", num_layers=2)
    bars = plot.breakdown_bars(spec, parse_gpus("1x24GB"), {"batch_size": 2, "seq_len": 1024})
    title = plot.breakdown_figure(bars).axes[0].get_title(loc="left")
    assert "micro-batch 2 x 1024" in title and "stack plain" in title


def test_scaling_title_says_what_is_fixed_and_the_stack(tmp_path):
    out = tmp_path / "s.svg"
    assert (
        main(
            [
                "plot",
                "scaling",
                "llama-3.2-1b",
                "--num-layers",
                "2",
                "--gpus",
                "1x24GB",
                "--x",
                "batch",
                "--seq-len",
                "1024",
                "--method",
                "lora",
                "--values",
                "1,2",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    svg = out.read_text()
    assert "1024 tokens per sequence" in svg and "stack plain" in svg


def _getting_started_batch_example() -> list[str]:
    """The batch-scaling command of docs/getting-started.md, as written there."""
    import shlex
    from pathlib import Path

    lines = (Path(__file__).parent.parent / "docs" / "getting-started.md").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("vramplan plot scaling") and "--x batch" in line)
    command = lines[i]
    while command.endswith("\\"):
        i += 1
        command = command[:-1] + " " + lines[i]
    return shlex.split(command)[1:]


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_getting_started_batch_scaling_example_shows_the_fit_boundary(tmp_path, monkeypatch):
    """It drew nothing that fits, on a y axis to 4 TiB."""
    import importlib

    cli_plot = importlib.import_module("vramplan.cli.plot")
    drawn = {}
    real = cli_plot.scaling_figure

    def spy(series, x, capacities, title=None):
        drawn.update(series=series, capacities=capacities)
        return real(series, x, capacities, title)

    monkeypatch.setattr(cli_plot, "scaling_figure", spy)
    assert main([*_getting_started_batch_example(), "-o", str(tmp_path / "b.png")]) == 0
    cap = drawn["capacities"][0][1]
    totals = [t for s in drawn["series"] for t in s.totals]
    assert any(t <= cap for t in totals) and any(t > cap for t in totals)
    assert max(totals) < 20 * cap  # not an axis to terabytes


def test_auto_range_ends_past_the_last_fitting_value():
    from vramplan import plot

    spec = load_model_spec("llama-3.1-8b")
    gpus = resolve_gpus("rtx-4090")
    cap = gpus.profile.memory_bytes
    values = plot.auto_values(spec, gpus, ["qlora"], "batch", {"seq_len": 4096, "gradient_checkpointing": True}, cap)
    series = plot.scaling_series(
        spec, gpus, ["qlora"], "batch", values, {"seq_len": 4096, "gradient_checkpointing": True}
    )[0]
    fits = [t <= cap for t in series.totals]
    assert fits[0] and not fits[-1]


def test_plot_accuracy_per_category_works_on_the_bundled_data(tmp_path):
    from pathlib import Path

    data = Path(__file__).parent / "data"
    out = tmp_path / "acc.png"
    assert (
        main(
            [
                "plot",
                "accuracy",
                str(data / "h100_dev.jsonl"),
                "--configs",
                str(data / "configs"),
                "--per-category",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert out.stat().st_size > 0


def test_split_points_are_the_snapshots():
    """The measured parts add up to the measured peak, the predicted ones to the predicted peak."""
    from pathlib import Path

    from vramplan import plot
    from vramplan.accuracy import estimate_case
    from vramplan.measured import load_cases

    data = Path(__file__).parent / "data"
    case = next(c for c in load_cases(data / "h100_dev.jsonl") if c.name == "l32-1b_full_bf16_b1s1024")
    points = plot.accuracy_points([case], data / "configs", per_category=True)
    assert [p.part for p in points] == list(plot.SPLIT_PARTS)
    assert sum(p.measured for p in points) == case.peak_alloc_bytes
    assert points[0].measured == int(case.mem_after_build_mb * 2**20)
    est = estimate_case(case, data / "configs")
    assert sum(p.predicted for p in points) == est.per_gpu.peak_allocated_bytes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_plot_files_honour_the_umask(tmp_path, umask):
    import os

    old = os.umask(umask)
    try:
        out = tmp_path / f"b{umask:o}.png"
        assert (
            main(
                [
                    "plot",
                    "breakdown",
                    "llama-3.2-1b",
                    "--num-layers",
                    "2",
                    "--gpus",
                    "1x24GB",
                    "--method",
                    "lora",
                    "-o",
                    str(out),
                ]
            )
            == 0
        )
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_per_category_without_breakdown_or_snapshots_is_one_line(tmp_path, capsys):
    import json
    from pathlib import Path

    line = json.loads((Path(__file__).parent / "data" / "h100_dev.jsonl").read_text().splitlines()[0])
    for key in ("mem_after_build_mb", "mem_after_step0_mb"):
        line.pop(key)
    path = tmp_path / "bare.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert (
        main(
            [
                "plot",
                "accuracy",
                str(path),
                "--configs",
                str(Path(__file__).parent / "data" / "configs"),
                "--per-category",
                "-o",
                str(tmp_path / "a.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--per-category" in err[0]


@pytest.mark.parametrize(
    "flags,said",
    [
        (["--method", "lora"], "DDP replicas"),
        (["--method", "full", "--fsdp", "4"], "one FSDP group sharding the model over all of them"),
        (["--method", "full", "--fsdp", "2"], "FSDP groups of 2, the model replicated across 2 of them"),
        (["--method", "full", "--deepspeed", "zero3"], "DeepSpeed ZeRO-3 data parallel"),
    ],
)
def test_one_estimate_says_how_its_gpus_share_the_model(capsys, flags, said):
    assert main(["estimate", "llama-3.2-1b", "--gpus", "4x24GB", *flags]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert said in out and (said == "DDP replicas" or "DDP replicas" not in out)
