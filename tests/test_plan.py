"""`vramplan plan`: what it reports fits by `estimate`, constraints hold, the seeds' setups,
bad input, and the cheaper memory-model entry point it relies on."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest

import vramplan
from vramplan.categories import Category
from vramplan.cli import main
from vramplan.estimate import estimate_spec
from vramplan.hardware import parse_gpus
from vramplan.memory import prepare, step_model
from vramplan.model_loader import load_model_spec
from vramplan.plan import PlanRequest, evaluate, make_request, plan_model, seq_grid
from vramplan.setup import Method, TrainingSetup

GiB = 2**30


@pytest.fixture(scope="module")
def seventy():
    return plan_model("llama-70b", "2x24GB", host_ram=128 * GiB, top=10)


@pytest.fixture(scope="module")
def seven_full_param():
    return plan_model("llama-2-7b", "1x24GB", methods="full,galore", host_ram=128 * GiB, top=10)


@pytest.fixture(scope="module")
def small():
    return plan_model("qwen2.5-0.5b", "2x16GB", host_ram=64 * GiB, top=40, max_batch=32)


# ---------------------------------------------------------------- plan ⊆ estimate


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
@pytest.mark.parametrize("which", ["seventy", "seven_full_param", "small"])
def test_every_reported_row_fits_by_estimate(which, request):
    result = request.getfixturevalue(which)
    assert result.rows
    gpus = {"seventy": "2x24GB", "seven_full_param": "1x24GB", "small": "2x16GB"}[which]
    host = {"seventy": 128, "seven_full_param": 128, "small": 64}[which] * GiB
    for row in result.rows:
        est = vramplan.estimate(result.model, gpus=gpus, host_ram=host, **row.setup.model_dump())
        assert est.fits, row.label
        assert est.per_gpu.total_bytes == row.per_gpu_bytes


def flat_total(est) -> int:
    """estimate_spec's total with the flat allocator margin the grid ranks with (the estimate's
    own reserved comes from the allocator replay, which the grid does not run)."""
    from vramplan.estimate import allocator_overhead

    peak = est.per_gpu.peak_allocated_bytes
    return peak + allocator_overhead(peak) + est.per_gpu.breakdown[Category.CUDA_CONTEXT]


def test_grid_matches_estimate_pointwise():
    """The affine evaluation is the estimate: sampled (seq, batch) points of the grid give
    estimate_spec's total (within the 512 B rounding of each allocation) and its verdict."""
    spec = load_model_spec("llama-3.2-1b")
    gpus = parse_gpus("1x24GB")
    req = PlanRequest(gpus=gpus, context=131072, max_batch=64)
    seqs = seq_grid(8192)
    rng = np.random.default_rng(0)
    for fields in (
        dict(method="full", optim="adamw_bnb_8bit", gradient_checkpointing=True),
        dict(method="qlora", quant="hqq4", lora_r=32),
        dict(method="galore", optim="galore_adamw_8bit_layerwise"),
    ):
        setup = TrainingSetup(**fields)
        grid = evaluate(spec, setup, req, seqs, np.arange(1, 65))
        for _ in range(6):
            si, bi = rng.integers(len(seqs)), rng.integers(64)
            point = setup.model_copy(update={"seq_len": int(seqs[si]), "batch_size": int(bi + 1)})
            est = estimate_spec(spec, point, gpus)
            assert abs(grid.total[si, bi] - flat_total(est)) <= 512 * 4 * len(spec.layers) + 64


def test_eager_attention_grid_matches_estimate():
    """Gemma 2 (eager attention: seq^2 scores and masks) has a tokens x seq term."""
    spec = load_model_spec("gemma-2-2b")
    gpus = parse_gpus("1x24GB")
    req = PlanRequest(gpus=gpus, context=8192, max_batch=8)
    seqs = seq_grid(8192)
    setup = TrainingSetup(method="lora", gradient_checkpointing=True)
    grid = evaluate(spec, setup, req, seqs, np.arange(1, 9))
    for si in (0, len(seqs) // 2, len(seqs) - 1):
        est = estimate_spec(spec, setup.model_copy(update={"seq_len": int(seqs[si]), "batch_size": 3}), gpus)
        assert abs(grid.total[si, 2] - flat_total(est)) <= 512 * 8 * len(spec.layers)


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
@pytest.mark.parametrize("ckpt", [False, True])
def test_sliding_window_grid_matches_estimate_on_both_sides_of_the_window(ckpt):
    """Mistral-7B (window 4096): from the window on SDPA gets an explicit mask (a tokens x seq
    term that starts there), so the grid splits its sequences at the window."""
    spec = load_model_spec("mistral-7b")
    gpus = parse_gpus("1x80GB")
    req = PlanRequest(gpus=gpus, context=16384, max_batch=4)
    seqs = seq_grid(16384)
    assert seqs.min() < 4096 <= seqs.max()
    setup = TrainingSetup(method="lora", gradient_checkpointing=ckpt)
    grid = evaluate(spec, setup, req, seqs, np.arange(1, 5))
    for si in range(len(seqs)):
        est = estimate_spec(spec, setup.model_copy(update={"seq_len": int(seqs[si]), "batch_size": 2}), gpus)
        assert abs(grid.total[si, 1] - flat_total(est)) <= 512 * 8 * len(spec.layers), int(seqs[si])


def test_grid_splits_at_the_window_of_models_with_some_sliding_layers():
    """Gemma 3 1B: five of six layers slide (window 512) under SDPA, so only those get the
    explicit mask from 512 tokens on; the grid must split there as for Mistral."""
    spec = load_model_spec("gemma-3-1b")
    assert spec.sdpa_window is None and spec.mask_window == 512
    gpus = parse_gpus("1x80GB")
    req = PlanRequest(gpus=gpus, context=2048, max_batch=4)
    seqs = seq_grid(2048)
    assert seqs.min() < 512 <= seqs.max()
    setup = TrainingSetup(method="lora")
    grid = evaluate(spec, setup, req, seqs, np.arange(1, 5))
    for si in range(len(seqs)):
        est = estimate_spec(spec, setup.model_copy(update={"seq_len": int(seqs[si]), "batch_size": 2}), gpus)
        assert abs(grid.total[si, 1] - flat_total(est)) <= 512 * 8 * len(spec.layers), int(seqs[si])


def test_prepared_step_model_is_the_same():
    spec = load_model_spec("qwen2.5-0.5b")
    setup = TrainingSetup(method="qlora", fsdp=2, cpu_offload=True, gradient_checkpointing=True)
    pre = prepare(spec, setup)
    other = setup.model_copy(update={"batch_size": 3, "seq_len": 777})
    a = step_model(spec, other, every_layer=True, prepared=pre)
    b = step_model(spec, other, every_layer=True)
    assert [(p.name, p.parts) for p in a.phases] == [(p.name, p.parts) for p in b.phases]
    assert a.host_pinned == b.host_pinned
    # a prepared part made for another configuration is not used
    c = step_model(spec, TrainingSetup(method="full"), prepared=pre)
    assert c.peak.allocated == step_model(spec, TrainingSetup(method="full")).peak.allocated


# ---------------------------------------------------------------- the seeds


def test_70b_on_two_24gb_cards_is_qlora_with_fsdp(seventy):
    rec = seventy.recommended
    assert rec.setup.method == Method.QLORA and rec.setup.fsdp == 2
    assert rec.setup.gradient_checkpointing
    # no adapter-free or bf16-base method fits: checked with the estimate directly
    for fields in (
        dict(method="lora", fsdp=2, cpu_offload=True, gradient_checkpointing=True),
        dict(method="full", fsdp=2, cpu_offload=True, gradient_checkpointing=True, optim="adamw_bnb_8bit"),
    ):
        assert not vramplan.estimate("llama-70b", gpus="2x24GB", host_ram=128 * GiB, seq_len=2048, **fields).fits


def test_7b_full_parameter_on_one_24gb_card_is_galore_8bit_layerwise(seven_full_param):
    rec = seven_full_param.recommended
    assert rec.setup.method == Method.GALORE and rec.setup.optim.layerwise and rec.setup.optim.is_8bit
    assert all(r.method in ("full", "galore") for r in seven_full_param.rows)
    best_full = dict(method="full", optim="adamw_bnb_8bit", gradient_checkpointing=True, batch_size=1, seq_len=2048)
    assert not vramplan.estimate("llama-2-7b", gpus="1x24GB", **best_full).fits


# ---------------------------------------------------------------- constraints and answers


def test_rows_are_ranked_and_respect_constraints(small):
    rows = small.rows
    speeds = [r.tokens_per_s for r in rows]  # fastest first, exactly
    assert speeds == sorted(speeds, reverse=True)
    rec = small.recommended  # the fastest under the headroom rule
    assert rec == next(r for r in rows if r.headroom_bytes >= 0.05 * small.gpu_memory_bytes)
    for r in rows:
        assert r.setup.seq_len >= 2048 and r.setup.fsdp <= 2 and r.headroom_bytes >= 0
        if r.setup.lora_like:
            assert r.setup.lora_r >= 16
        if r.setup.method == Method.GALORE:
            assert r.setup.galore_rank >= 128 and not r.setup.optim.layerwise  # layer-wise needs a single GPU


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_global_batch_min_seq_and_ranks():
    res = plan_model(
        "qwen2.5-0.5b",
        "2x24GB",
        methods="lora,galore",
        global_batch=24,
        min_seq=3000,
        min_lora_rank=64,
        min_galore_rank=64,
        top=20,
    )
    assert res.rows
    for r in res.rows:
        assert r.setup.batch_size * r.grad_accum * 2 == 24
        assert r.setup.seq_len >= 3000
        assert r.method in ("lora", "galore")
        assert (r.setup.lora_r if r.setup.lora_like else r.setup.galore_rank) >= 64


def test_per_method_limits_are_the_edge_of_fitting(small):
    """The longest sequence reported for a method fits by estimate and the next one on
    the grid does not; likewise the largest micro-batch."""
    spec, gpus = load_model_spec("qwen2.5-0.5b"), parse_gpus("2x16GB")
    seqs = seq_grid(32768)
    checked = 0
    for e in small.per_method.values():
        if e["max_seq_setup"]:
            at = TrainingSetup(**e["max_seq_setup"])
            assert estimate_spec(spec, at, gpus, 64 * GiB).fits
            nxt = seqs[seqs > at.seq_len]
            if len(nxt):
                assert not estimate_spec(spec, at.model_copy(update={"seq_len": int(nxt[0])}), gpus).fits_gpu
            checked += 1
        if e["max_batch_setup"]:
            at = TrainingSetup(**e["max_batch_setup"])
            assert at.seq_len == 2048 and estimate_spec(spec, at, gpus, 64 * GiB).fits
            if at.batch_size < 32:
                assert not estimate_spec(spec, at.model_copy(update={"batch_size": at.batch_size + 1}), gpus).fits_gpu
    assert checked >= 3


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_nothing_fits_says_what_would():
    res = plan_model("qwen2.5-7b", "1x8GB", methods="full", min_seq=1024, host_ram=64 * GiB)
    assert not res.rows and res.recommended is None
    assert res.suggestions
    assert any(s.startswith(("more GPUs", "a larger card")) for s in res.suggestions)


def test_python_api_returns_a_dataframe():
    df = vramplan.plan("qwen2.5-0.5b", "1x24GB", methods=["lora"], top=3, max_batch=8)
    assert list(df.columns[:3]) == ["label", "method", "quant"] and len(df) == 3
    assert df["recommended"].tolist() == [True, False, False]
    assert df["per_gpu_bytes"].dtype.kind == "i" and (df["per_gpu_bytes"] <= 24 * GiB).all()
    assert df.attrs["evaluated"] >= df.attrs["discrete"] * 8


# ---------------------------------------------------------------- the command line


def test_cli_json_and_csv(capsys):
    assert (
        main(
            [
                "plan",
                "qwen2.5-0.5b",
                "--gpus",
                "1x24GB",
                "--methods",
                "lora",
                "--max-batch",
                "4",
                "--top",
                "2",
                "--format",
                "json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 2 and out["recommended"]["label"] == out["rows"][0]["label"]
    assert (
        main(
            [
                "plan",
                "qwen2.5-0.5b",
                "--gpus",
                "1x24GB",
                "--methods",
                "lora",
                "--max-batch",
                "4",
                "--top",
                "2",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 2 and rows[0]["recommended"] == "True" and int(rows[0]["per_gpu_bytes"]) > 0


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--methods", "full,dora"], "--methods"),
        (["--nodes", "0"], "--nodes"),
        (["--nodes", "3"], "--nodes"),
        (["--gpus-per-node", "3"], "--gpus-per-node"),
        (["--min-seq", "100000"], "--min-seq"),
        (["--global-batch", "7"], "--global-batch"),
        (["--min-lora-rank", "100000"], "--min-lora-rank"),
        (["--top", "0"], "--top"),
        (["--host-ram", "lots"], "--host-ram"),
        (["--vary", "loss"], "--vary"),
        (["--vary", "colour=red"], "--vary"),
        (["--vary", "loss=hf,fastest"], "--vary"),
        (["--vary", "loss=hf", "--vary", "loss=liger"], "--vary"),
        (["--vary", "loss=,"], "--vary"),
    ],
)
def test_bad_input_is_one_line(args, flag):
    p = subprocess.run(
        [sys.executable, "-m", "vramplan", "plan", "llama-2-7b", "--gpus", "2x24GB", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in p.stderr


def test_request_spreads_gpus_over_nodes():
    req = make_request("llama-2-7b", "8x80GB", gpus_per_node=4)
    assert req.nodes == 2 and req.gpus_per_node == 4
    with pytest.raises(vramplan.VramplanError, match="--gpus-per-node"):
        make_request("llama-2-7b", "8x80GB", gpus_per_node=4, nodes=4)


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_vary_searches_stack_knobs_and_names_them():
    """--vary loss=hf,liger: a fused cross-entropy competes with the model's own loss in the
    same search. Qwen2.5-7B QLoRA at 8k tokens does not fit a 3090 with the model's own loss
    (the stacks issue's example); with --vary the plan finds the liger rows itself, and every
    row names the loss it used."""
    kw = dict(methods="qlora-nf4", min_seq=8192, host_ram=128 * GiB, max_batch=16, top=40)
    plain = plan_model("qwen2.5-7b", "rtx-3090", **kw)
    varied = plan_model("qwen2.5-7b", "rtx-3090", vary=["loss=hf,liger"], **kw)
    assert all(f"loss {r.setup.loss.value}" in r.label for r in varied.rows)
    assert not plain.rows and any("liger" in line for line in plain.suggestions)
    assert varied.rows and {r.setup.loss.value for r in varied.rows} == {"liger"}
    assert not any("liger" in line for line in varied.suggestions)  # searched, not suggested


def test_vary_leaves_out_combinations_the_setup_refuses():
    """activation-offload checkpoints needs checkpointing: the search keeps only the
    checkpointed candidates for it instead of failing."""
    res = plan_model(
        "llama-3.2-1b", "rtx-4090", methods="lora", vary={"activation_offload": ("none", "checkpoints")}, top=40
    )
    offloaded = [r for r in res.rows if r.setup.activation_offload.value == "checkpoints"]
    assert offloaded and all(r.setup.gradient_checkpointing for r in offloaded)


def test_axolotl_full_fine_tunes_run_under_autocast_and_flash_casts_the_roots_back():
    """axolotl's Trainer autocasts every full fine-tune outside FSDP/DeepSpeed, so the plan offers
    no `bf16` (no autocast) row there; with --vary attention, sdpa keeps embed_tokens, lm_head and
    the norms fp32 and flash casts them back (axolotl==0.19.0 loaders/model.py:435-490), while
    DeepSpeed's bf16 engine casts them back whatever the attention."""
    res = plan_model(
        "llama-3.2-1b", "1x80GB", methods="full", fixed={"stack": "axolotl"}, vary=["attention=sdpa,flash"], top=60
    )
    plain = [r.setup for r in res.rows if r.setup.fsdp == 1 and r.setup.deepspeed is None]
    zero = [r.setup for r in res.rows if r.setup.deepspeed is not None]
    assert plain and zero and {s.attention.value for s in plain} == {"sdpa", "flash"}
    assert all(s.precision.value == "mixed" and s.fp32_embeddings_norms == (s.attention.value == "sdpa") for s in plain)
    assert not any(s.fp32_embeddings_norms for s in zero)


# ---------------------------------------------------------------- expandable segments


def test_with_expandable_segments_keeps_the_configured_keys(monkeypatch):
    from vramplan.allocator import parse_alloc_conf
    from vramplan.reserved import with_expandable_segments

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert with_expandable_segments() == "expandable_segments:True"
    assert with_expandable_segments("expandable_segments:True") is None
    conf = with_expandable_segments("max_split_size_mb:128,expandable_segments:False")
    parsed = parse_alloc_conf(conf)
    assert parsed.expandable_segments and parsed.max_split_size == 128 * 2**20
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "garbage_collection_threshold:0.6")
    assert with_expandable_segments() == "garbage_collection_threshold:0.6,expandable_segments:True"


@pytest.mark.cputrace  # seconds: a plan's search and a few allocator replays
def test_plan_suggests_expandable_segments_only_when_it_changes_the_verdict(monkeypatch):
    """Qwen2.5-0.5B full fine-tuning at 8k tokens on a 22 GB card: the vectorised search's
    fastest candidate (fused AdamW + ckpt) is refused by the allocator replay (cached segments
    strand memory) and fits with expandable segments; the provider says so, and says nothing
    once the allocator already expands its segments. (The case is one where the two replays
    disagree; which sizes do moves with how finely the events split the step's tensors.)"""
    import sys

    plan = sys.modules["vramplan.plan"]
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    spec = load_model_spec("qwen2.5-0.5b")
    req = make_request("qwen2.5-0.5b", "1x22GB", methods="full", min_seq=8192)
    grids, _ = plan.search(spec, req)
    first = plan._candidates(spec, grids, req)[0]
    assert first.setup.deepspeed is None and first.setup.gradient_checkpointing
    assert not estimate_spec(spec, first.setup, req.gpus).fits
    assert estimate_spec(spec, first.setup, req.gpus, alloc_conf="expandable_segments:True").fits
    lines = plan._expandable_segments(spec, req, grids)
    assert len(lines) == 1
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in lines[0]
    assert f"fits {first.label} (" in lines[0]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert plan._expandable_segments(spec, req, grids) == []
    assert plan._expandable_segments in plan.SUGGESTION_PROVIDERS


def test_plan_on_a_card_without_bf16_trains_lora_in_fp16(capsys):
    """A T4 has no bf16: plan's LoRA and QLoRA rows are fp16 with fp32 adapters, as estimate's
    (estimate.fp16_on_card), not the bf16 they are elsewhere."""
    assert main(["plan", "llama-3.2-1b", "--gpus", "1xt4", "--methods", "lora,qlora", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows and all(r["setup"]["precision"] == "fp16" for r in rows)
    assert all(r["setup"]["adapter_dtype"] in (None, "fp32") for r in rows)
    assert main(["plan", "llama-3.2-1b", "--gpus", "1x24GB", "--methods", "lora", "--format", "json"]) == 0
    assert all(r["setup"]["precision"] == "bf16" for r in json.loads(capsys.readouterr().out)["rows"])


def test_the_assumed_line_names_the_stack_the_rows_use(capsys):
    """plan --stack axolotl searched axolotl rows but said it assumed the plain loop."""
    from vramplan.cli import main

    argv = ["plan", "qwen2.5-0.5b", "--gpus", "rtx-4090", "--methods", "lora", "--format", "json"]
    assert main([*argv, "--stack", "axolotl"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"][0]["setup"]["stack"] == "axolotl"
    assert any(a.startswith("stack axolotl (") for a in out["assumed"])
    assert main(argv) == 0
    assert any(a.startswith("stack plain (") for a in json.loads(capsys.readouterr().out)["assumed"])
