"""verify's harness on CPU: the reference step built and run for every method the
installed libraries support, OOM as a result, extrapolation, the output schema, the CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from vramplan.categories import Category as C
from vramplan.cli import main
from vramplan.errors import VramplanError
from vramplan.estimate import estimate_config, make_setup
from vramplan.measured import MeasuredCase, load_cases
from vramplan.model_loader import load_model_spec
from vramplan.verify import extrapolate as xp
from vramplan.verify.api import verify
from vramplan.verify.measure import PhaseSizes, peak_breakdown, run_case
from vramplan.verify.results import Measurement

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def needs(mod: str):
    return pytest.mark.skipif(not _has(mod), reason=f"needs the '{mod}' package (pip install 'vramplan[verify]')")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg4") / "config.json"
    path.write_text(json.dumps({**TINY, "num_hidden_layers": 4}))
    return str(path)


def measure(model: str, steps: int = 1, **fields) -> Measurement:
    key = (model, steps, tuple(sorted(fields.items())))
    if key not in _CACHE:  # baselines (plain full / lora) are reused across tests
        _CACHE[key] = run_case(model, make_setup(batch_size=1, seq_len=32, **fields), device="cpu", steps=steps)
    return _CACHE[key]


_CACHE: dict = {}


def _est(model: str, **fields):
    return estimate_config(model, "1x80GB", batch_size=1, seq_len=32, **fields).per_gpu.breakdown


# ---------------------------------------------------------------- every method on CPU


@pytest.mark.cputrace
@pytest.mark.parametrize(
    "fields",
    [
        dict(method="full"),
        dict(method="full", precision="mixed"),
        dict(method="full", gradient_checkpointing=True),
        pytest.param(dict(method="lora"), marks=needs("peft")),
        pytest.param(dict(method="lora", gradient_checkpointing=True, lora_targets="attention"), marks=needs("peft")),
        pytest.param(dict(method="qlora", quant="nf4"), marks=[needs("peft"), needs("bitsandbytes")]),
        pytest.param(
            dict(method="qlora", quant="hqq4", gradient_checkpointing=True), marks=[needs("peft"), needs("hqq")]
        ),
        pytest.param(dict(method="qlora", quant="int8"), marks=[needs("peft"), needs("bitsandbytes")]),
    ],
    ids=lambda f: "-".join(str(v) for v in f.values()),
)
def test_weights_and_adapters_match_the_estimate(tiny, fields):
    m = measure(tiny, **fields)
    assert m.fits and m.oom is None and len(m.step_s) == 1
    est = _est(tiny, **fields)
    # weights: the estimate rounds every tensor to 512 B; the tiny model has ~30 tensors
    assert abs(m.breakdown[C.WEIGHTS] - est[C.WEIGHTS]) <= 0.02 * est[C.WEIGHTS]
    assert m.breakdown[C.ADAPTERS] == est[C.ADAPTERS]
    if fields.get("method") == "qlora":
        assert m.breakdown[C.QUANT_STATE] > 0 and est[C.QUANT_STATE] > 0
        # what a 4-bit model computes with is ~0.5 B per quantized weight, far below bf16
        assert m.breakdown[C.WEIGHTS] < measure(tiny, method="lora").breakdown[C.WEIGHTS]
    trainable_bytes = m.breakdown[C.ADAPTERS] or m.breakdown[C.WEIGHTS]
    assert m.breakdown[C.GRADIENTS] == pytest.approx(trainable_bytes, rel=0.01)
    # AdamW: two moments like the trainable parameters, plus one step scalar per tensor
    assert m.breakdown[C.OPTIMIZER_STATES] == pytest.approx(2 * trainable_bytes, rel=0.01)
    assert m.params_total == load_model_spec(tiny).params_total + (
        m.params_trainable if fields["method"] != "full" and "lora" in fields["method"] else 0
    )


@pytest.mark.cputrace
@needs("bitsandbytes")
def test_adamw_8bit_states_are_about_a_quarter(tiny):
    full = measure(tiny, method="full").breakdown[C.OPTIMIZER_STATES]
    q8 = measure(tiny, method="full", optim="adamw_bnb_8bit").breakdown[C.OPTIMIZER_STATES]
    # uint8 states for tensors >= 4096 elements, fp32 for the small (norm) ones
    assert 0.2 * full < q8 < 0.7 * full


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    """Wide enough (hidden 256, MLP 768) that most tensors take the 8-bit and low-rank paths."""
    path = tmp_path_factory.mktemp("small") / "config.json"
    path.write_text(
        json.dumps(
            {
                **TINY,
                "hidden_size": 256,
                "intermediate_size": 768,
                "num_hidden_layers": 3,
                "num_attention_heads": 8,
                "vocab_size": 4096,
            }
        )
    )
    return str(path)


@pytest.mark.cputrace
@needs("bitsandbytes")
@needs("galore_torch")
@pytest.mark.parametrize(
    "fields",
    [
        dict(method="full", optim="adamw_bnb_8bit"),
        dict(method="galore", optim="galore_adamw", galore_rank=32),
        dict(method="galore", optim="galore_adamw_8bit", galore_rank=32),
        dict(method="galore", optim="galore_adamw_8bit_layerwise", galore_rank=32),
    ],
    ids=lambda f: f["optim"],
)
def test_optimizer_states_match_the_estimate(small, fields, monkeypatch):
    """The states the real optimizers create after one step (bitsandbytes' uint8 moments and
    blockwise absmax, galore-torch's projectors and low-rank moments) against the estimate.
    1%: the estimate rounds each tensor to the allocator's 512 bytes, verify counts nbytes."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # galore's AdamW8bit calls it
    measured = measure(small, **fields).breakdown[C.OPTIMIZER_STATES]
    assert _est(small, **fields)[C.OPTIMIZER_STATES] == pytest.approx(measured, rel=0.01)


@pytest.mark.cputrace
@needs("galore_torch")
@pytest.mark.parametrize("optim", ["galore_adamw", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise"])
def test_galore(tiny, optim, monkeypatch):
    if "8bit" in optim:
        # galore_torch's AdamW8bit calls torch.cuda.synchronize() unconditionally; on a
        # CPU-only torch that raises, so neutralise it for this CPU run only
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    m = measure(tiny, method="galore", galore_rank=8, optim=optim)
    adam = measure(tiny, method="full").breakdown[C.OPTIMIZER_STATES]
    assert m.fits and 0 < m.breakdown[C.OPTIMIZER_STATES] < adam
    if optim.endswith("layerwise"):
        # every parameter stepped and zeroed in its grad hook: no gradient survives backward
        assert m.breakdown[C.GRADIENTS] == 0
    else:
        assert m.breakdown[C.GRADIENTS] > 0


@pytest.mark.cputrace
@pytest.mark.parametrize(
    "fields",
    [
        dict(method="full", fsdp=4),
        dict(method="full", precision="mixed", fsdp=2, cpu_offload=True, gradient_checkpointing=True),
        pytest.param(dict(method="lora", fsdp=2), marks=needs("peft")),
        pytest.param(dict(method="qlora", quant="nf4", fsdp=2), marks=[needs("peft"), needs("bitsandbytes")]),
    ],
    ids=["fsdp4", "fsdp2-mixed-offload", "fsdp2-lora", "fsdp2-qlora-nf4"],
)
def test_fsdp_simulated_rank0(tiny, fields):
    import torch.distributed as dist

    m = measure(tiny, **fields)
    assert m.fits and m.simulated and m.world == fields["fsdp"] and m.rank == 0
    assert any("simulated" in n for n in m.notes) or any("FSDP" in n for n in m.notes)
    assert not dist.is_initialized()  # the fake process group is torn down after the case
    if not fields.get("cpu_offload"):
        unsharded = measure(tiny, **{k: v for k, v in fields.items() if k != "fsdp"}).breakdown[C.WEIGHTS]
        # dim-0 shards: about 1/N of the weights (padding and unsharded buffers aside)
        assert m.breakdown[C.WEIGHTS] == pytest.approx(unsharded / fields["fsdp"], rel=0.05)


# ---------------------------------------------------------------- OOM as a result


@pytest.mark.cputrace
@pytest.mark.parametrize("phase,step", [("build", None), ("backward", 1), ("optimizer", 0)])
def test_oom_is_a_result(tiny, phase, step):
    def on_phase(name, s):
        if (name, s) == (phase, step):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    m = run_case(
        tiny, make_setup(method="full", batch_size=1, seq_len=32, fsdp=2), device="cpu", steps=2, on_phase=on_phase
    )
    assert not m.fits and m.oom.phase == phase and m.oom.step == step
    assert "out of memory" in m.oom.message
    assert len(m.step_s) == (step if step is not None else 0)
    import torch.distributed as dist

    assert not dist.is_initialized()
    # everything was released: the next case builds and runs
    assert run_case(tiny, make_setup(method="full", batch_size=1, seq_len=16), device="cpu", steps=1).fits
    line = m.to_measured_case()
    assert line.model_extra["fits"] is False and line.model_extra["oom_phase"] == phase


# ---------------------------------------------------------------- attribution at the peak


def test_peak_breakdown_attributes_by_phase():
    sizes = PhaseSizes(
        model={C.WEIGHTS: 100, C.QUANT_STATE: 0, C.ADAPTERS: 10}, activations=50, gradients=10, optimizer=20
    )
    opt = peak_breakdown("optimizer (step 0)", sizes, 200, True)
    assert (opt[C.GRADIENTS], opt[C.OPTIMIZER_STATES], opt[C.ACTIVATIONS]) == (10, 20, 0)
    assert opt[C.TRANSIENT] == 200 - 140
    fwd0 = peak_breakdown("forward (step 0)", sizes, 170, False)
    assert fwd0[C.OPTIMIZER_STATES] == 0 and fwd0[C.ACTIVATIONS] == 50 and fwd0[C.TRANSIENT] == 10
    fwd1 = peak_breakdown("forward (step 1)", sizes, 170, True)
    assert fwd1[C.OPTIMIZER_STATES] == 20 and fwd1[C.TRANSIENT] == 0  # never negative
    cpu = peak_breakdown(None, sizes, None, True)
    assert cpu[C.TRANSIENT] is None and cpu[C.ACTIVATIONS] is None and cpu[C.OPTIMIZER_STATES] == 20
    # layer-wise optimizers make their states in step 0's backward (grad hooks)
    assert peak_breakdown("backward (step 0)", sizes, 200, False)[C.OPTIMIZER_STATES] == 0
    assert peak_breakdown("backward (step 0)", sizes, 200, False, layerwise=True)[C.OPTIMIZER_STATES] == 20
    assert peak_breakdown("forward (step 0)", sizes, 200, False, layerwise=True)[C.OPTIMIZER_STATES] == 0


# ---------------------------------------------------------------- extrapolation


def test_fit_recovers_a_known_line():
    f = xp.fit([2, 4, 8], [1000 + 300 * d for d in (2, 4, 8)], 80, "peak")
    assert f.predicted_bytes == 1000 + 300 * 80
    assert f.per_layer_bytes == pytest.approx(300) and f.fixed_bytes == pytest.approx(1000)
    assert f.max_residual_bytes == pytest.approx(0, abs=1e-6)
    noisy = xp.fit([2, 4], [1000, 1700], 10)
    assert noisy.predicted_bytes == 1000 + 350 * 8


def test_fit_needs_two_depths():
    from vramplan.errors import VramplanError

    with pytest.raises(VramplanError, match="two different depths"):
        xp.fit([4, 4], [1, 2], 80)


def test_choose_depths():
    assert xp.choose_depths(80, lambda d: d <= 5) == [2, 5]
    assert xp.choose_depths(80, lambda d: d <= 30) == [4, 8]  # capped: deeper only costs time
    assert xp.choose_depths(80, lambda d: d <= 7, even=True) == [2, 6]
    from vramplan.errors import VramplanError

    with pytest.raises(VramplanError, match="do not fit"):
        xp.choose_depths(80, lambda d: d <= 1)


def _synthetic(d: int, full: int = 32) -> Measurement:
    setup = make_setup(method="full")
    per = {C.WEIGHTS: 10_000, C.GRADIENTS: 10_000, C.OPTIMIZER_STATES: 20_000, C.ACTIVATIONS: 5_000}
    fixed = {C.WEIGHTS: 50_000, C.ACTIVATIONS: 70_000, C.TRANSIENT: 9_000}
    bd = {c: fixed.get(c, 0) + per.get(c, 0) * d for c in C}
    bd[C.CUDA_CONTEXT] = 500_000
    peak = sum(v for c, v in bd.items() if c != C.CUDA_CONTEXT)
    return Measurement(
        model="m",
        num_layers=d,
        full_layers=full,
        setup=setup,
        device="cuda",
        steps=3,
        fits=True,
        peak_allocated_bytes=peak,
        peak_reserved_bytes=peak + 1000 * d,
        breakdown=bd,
        params_total=100 + 7 * d,
        params_trainable=100 + 7 * d,
    )


def test_extrapolate_synthetic_measurements():
    out, fits = xp.extrapolate([_synthetic(2), _synthetic(4), _synthetic(6)], capacity_bytes=10**9)
    ref = _synthetic(32)
    assert out.num_layers == 32 and out.extrapolated_from == [2, 4, 6]
    assert out.peak_allocated_bytes == ref.peak_allocated_bytes
    assert out.breakdown[C.OPTIMIZER_STATES] == ref.breakdown[C.OPTIMIZER_STATES]
    assert out.breakdown[C.CUDA_CONTEXT] == 500_000  # measured, not fitted
    assert out.params_total == ref.params_total and out.fits
    assert "EXTRAPOLATED" in out.notes[0]
    small, _ = xp.extrapolate([_synthetic(2), _synthetic(4)], capacity_bytes=1000)
    assert not small.fits


@pytest.mark.cputrace
def test_verify_extrapolates_a_real_run(tiny4):
    rep = verify(tiny4, make_setup(method="full", batch_size=1, seq_len=32), device="cpu", depths=[1, 2], steps=1)
    res = rep.result[0]
    assert [m.num_layers for m in rep.measurements] == [1, 2] and res.extrapolated_from == [1, 2]
    assert rep.comparisons[0].extrapolated
    # parameters are exactly affine in depth: the fit must land on the full model
    assert res.params_total == load_model_spec(tiny4).params_total
    direct = measure(tiny4, method="full", steps=1)
    assert res.breakdown[C.WEIGHTS] == pytest.approx(direct.breakdown[C.WEIGHTS], rel=1e-3)


# ---------------------------------------------------------------- output schema and CLI


@pytest.mark.parametrize(
    "fields",
    [
        dict(method="full", precision="mixed", gradient_checkpointing=True),
        dict(method="lora", lora_r=8, lora_targets="attention"),
        dict(method="qlora", quant="hqq4", lora_r=32),
        dict(method="galore", optim="galore_adamw_8bit_layerwise", galore_rank=64),
        dict(method="full", fsdp=4, cpu_offload=True),
        dict(method="full", optim="adamw_bnb_8bit"),
    ],
)
def test_measured_case_round_trip(fields):
    setup = make_setup(batch_size=2, seq_len=64, **fields)
    m = Measurement(
        model="llama-3.2-1b",
        num_layers=16,
        full_layers=16,
        setup=setup,
        device="cuda",
        steps=3,
        fits=True,
        peak_allocated_bytes=3 * 2**30,
        breakdown={C.WEIGHTS: 2**30},
    )
    line = MeasuredCase.model_validate_json(m.to_measured_case().model_dump_json())
    assert make_setup(**line.setup_fields()) == setup
    assert line.peak_alloc_bytes == 3 * 2**30 and line.layers is None


@pytest.mark.cputrace
def test_cli_writes_the_report_folder(tiny, tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(
        [
            "verify",
            tiny,
            "--method",
            "full",
            "--seq-len",
            "32",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "weights" in text and "estimate" in text
    cases = load_cases(out / "measurements.jsonl")
    assert len(cases) == 1 and cases[0].method == "full" and cases[0].seq == 32
    report = json.loads((out / "report.json").read_text())
    assert report["estimate"]["per_gpu"]["peak_allocated_bytes"] > 0
    import pandas as pd

    frame = pd.read_csv(out / "comparison.csv")
    assert set(c.value for c in C) <= set(frame["category"]) and "peak allocated" in set(frame["category"])


def test_no_gpu_message_and_exit_code(tiny, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["verify", tiny, "--method", "lora"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1 and "needs a CUDA GPU" in err[0]


def test_gpus_without_nvml(monkeypatch, capsys):
    import pynvml

    def boom():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", boom)
    assert main(["gpus"]) == 1
    out = capsys.readouterr()
    assert "no NVIDIA GPU detected" in out.err and out.out == ""  # an error goes to stderr (issue 17)


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--depths", "4"], "--depths"),
        (["--depths", "a,b"], "--depths"),
        (["--num-layers", "1", "--depths", "1,2"], "--depths"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_verify_input_is_one_line(tiny, args, flag, capsys):
    assert main(["verify", tiny, "--device", "cpu", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]


@pytest.mark.cputrace
def test_torchrun_reports_every_rank(tiny):
    """The N-real-GPU path (torchrun, one process per rank, real collectives) on CPU/gloo."""
    from vramplan.verify.launch import CaseRequest, run_isolated

    req = CaseRequest(
        model=tiny, setup=make_setup(method="full", batch_size=1, seq_len=16, fsdp=2), steps=1, device="cpu"
    )
    ms = run_isolated(req, nproc=2, timeout=240)
    assert [m.rank for m in ms] == [0, 1] and all(m.fits and not m.simulated and m.world == 2 for m in ms)
    assert ms[0].breakdown[C.WEIGHTS] == ms[1].breakdown[C.WEIGHTS] > 0


def _assert_covers_every_technique(cases):
    setups = [make_setup(**c["setup"]) for c in cases]
    methods = {(s.method.value, s.quant.value if s.quant else None) for s in setups}
    assert {("full", None), ("lora", None), ("qlora", "nf4"), ("qlora", "hqq4"), ("galore", None)} <= methods
    assert {s.optim.value for s in setups} >= {"adamw_bnb_8bit", "galore_adamw_8bit_layerwise"}
    assert {s.fsdp for s in setups} >= {2, 4, 8} and any(s.cpu_offload for s in setups)
    assert any(s.seq_len >= 16384 for s in setups) and any(c["model"] == "mixtral-8x7b" for c in cases)
    assert any(c["model"] == "llama-3.1-70b" and c["setup"]["method"] == "qlora" for c in cases)
    xps = [c for c in cases if c["depths"]]
    assert xps and all(
        any(o["setup"] == c["setup"] and o["model"] == c["model"] and not o["depths"] for o in cases) for c in xps
    )  # every extrapolation has its full-depth check


def test_calibration_list_dry_run(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import calibrate

    cases = calibrate.CASES
    assert len(cases) >= 25 and len({c["name"] for c in cases}) == len(cases)
    _assert_covers_every_technique(cases)
    assert calibrate.main(["--dry-run", "--only", "l1b_full_bf16_b1s1024", "l8b_fsdp4_full_bf16_ckpt_b1s2048"]) == 0
    assert "2 cases" in capsys.readouterr().out
    assert [c["name"] for c in calibrate.select(cases, "2/3", None)] == [c["name"] for c in cases[1::3]]


def test_core_calibration_cases_cover_every_technique_in_order():
    """--core: what a 15-minute device lease runs first must still span the issue's list."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import calibrate

    core = calibrate.select(calibrate.CASES, None, None, core=True)
    assert [c["name"] for c in core] == calibrate.CORE  # every name exists, order kept
    _assert_covers_every_technique(core)


@pytest.mark.cputrace
def test_calibration_runner_appends_and_resumes(tiny4, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import calibrate

    from vramplan.verify import launch

    ran = []

    def in_process(req, nproc=1, timeout=None, failure_log=None):  # the subprocess path: test_isolated_worker_process
        ran.append(req.num_layers)
        return [run_case(req.model, req.setup, device=req.device, num_layers=req.num_layers, steps=req.steps)]

    monkeypatch.setattr(launch, "run_isolated", in_process)
    spec = tmp_path / "cases.json"
    spec.write_text(
        json.dumps(
            [
                {"name": "tiny_full", "model": tiny4, "steps": 1, "setup": {"method": "full", "seq_len": 16}},
                {
                    "name": "tiny_full_xp",
                    "model": tiny4,
                    "steps": 1,
                    "depths": [1, 2],
                    "setup": {"method": "full", "seq_len": 16},
                },
            ]
        )
    )
    out = tmp_path / "cal.jsonl"
    assert calibrate.main(["--cases", str(spec), "--out", str(out), "--device", "cpu"]) == 0
    lines = load_cases(out)
    assert [l.name for l in lines] == ["tiny_full", "tiny_full_xp_L1", "tiny_full_xp_L2", "tiny_full_xp"]
    assert lines[-1].model_extra["extrapolated_from"] == [1, 2]
    assert ran == [None, 1, 2]
    assert calibrate.main(["--cases", str(spec), "--out", str(out), "--device", "cpu"]) == 0
    assert len(load_cases(out)) == 4 and ran == [None, 1, 2]  # resumed: nothing ran twice


def test_comparison_has_one_row_per_measured_phase():
    """The estimate's modelled phases grouped into the four a probe measures (for QLoRA: the
    build's quantization, forward's dequantize, the layer points, the optimizer step),
    against the widest step of each measured phase."""
    from vramplan.verify.compare import compare
    from vramplan.verify.results import PhaseSnapshot

    est = estimate_config("llama-3.2-1b", "1x80GB", method="qlora", gradient_checkpointing=True)
    setup = make_setup(method="qlora", gradient_checkpointing=True)
    snaps = [PhaseSnapshot(phase="build", peak_allocated_bytes=1 * 2**30)]
    for step, scale in ((0, 2), (1, 3)):
        snaps += [
            PhaseSnapshot(phase=p, step=step, peak_allocated_bytes=scale * k * 2**30)
            for k, p in enumerate(("forward", "backward", "optimizer"), start=1)
        ]
    m = Measurement(
        model="m",
        num_layers=16,
        full_layers=16,
        setup=setup,
        device="cuda",
        steps=2,
        fits=True,
        phases=snaps,
        peak_allocated_bytes=9 * 2**30,
        peak_phase="optimizer (step 1)",
    )
    rows = {r.category: r for r in compare(est, m).phases}
    assert list(rows) == ["build peak", "forward peak", "backward peak", "optimizer peak"]
    assert [rows[f"{p} peak"].measured_bytes // 2**30 for p in ("build", "forward", "backward", "optimizer")] == [
        1,
        3,
        6,
        9,
    ]
    modelled = est.per_gpu.phases
    # the build's peak: its quantization moment or its end, whichever is wider (compare._phase_rows)
    built = sum(est.per_gpu.breakdown.get(c) or 0 for c in (C.WEIGHTS, C.QUANT_STATE, C.ADAPTERS))
    assert rows["build peak"].estimate_bytes == max(modelled["build (quantize)"], built)
    assert rows["backward peak"].estimate_bytes == max(
        v for k, v in modelled.items() if k.startswith(("loss", "layer", "final norm"))
    )
    assert any("different phase" in n for n in compare(est, m).notes)  # estimated peak is in backward


# ---------------------------------------------------------------- verify --device cpu: the CPU trace


@pytest.mark.cputrace
@needs("peft")
@pytest.mark.parametrize(
    "fields",
    [dict(method="full"), dict(method="lora", gradient_checkpointing=True)],
    ids=lambda f: "-".join(str(v) for v in f.values()),
)
def test_cpu_verify_traces_every_phase_and_holds_the_estimate(small, fields):
    """On the CPU, verify traces every allocation per phase (cputrace) and compares each
    phase with the estimate, less the loss backward's CUDA-only 2·N·V, as the CPU-trace
    tests do: within their 1.5%."""
    rep = verify(small, make_setup(batch_size=2, seq_len=256, lora_dropout=0.0, **fields), device="cpu", steps=2)
    m, cmp = rep.result[0], rep.comparisons[0]
    assert all(s.peak_allocated_bytes is not None and s.allocated_bytes is not None for s in m.phases)
    assert m.peak_allocated_bytes == max(s.peak_allocated_bytes for s in m.phases)
    assert m.after_build_bytes == m.phases[0].allocated_bytes > 0
    rows = {r.category: r for r in [*cmp.totals, *cmp.phases]}
    for name in ("peak allocated", "activations + transient", "forward peak", "backward peak", "optimizer peak"):
        assert abs(rows[name].error_pct) <= 1.5, (name, rows[name])
    assert rows["peak reserved"].measured_bytes is None  # no caching allocator on the CPU
    assert any("loss backward is compared less" in n for n in cmp.notes)
    assert any(n.startswith("CPU trace:") for n in m.notes)


def test_cpu_verify_names_what_the_cpu_cannot_compare():
    from vramplan.verify.cputrace import incomparable_on_cpu

    assert incomparable_on_cpu(make_setup(method="lora")) == []
    said = " ".join(
        incomparable_on_cpu(
            make_setup(method="qlora", quant="nf4", precision="mixed", optim="adamw_bnb_8bit", fsdp=2, cpu_offload=True)
        )
    )
    assert "4-bit" in said and "8-bit" in said and "offload" in said
    assert "autocast" in " ".join(incomparable_on_cpu(make_setup(method="full", precision="mixed")))


def test_capped_calibration_cases_straddle_the_predicted_edge(capsys):
    """calibrate.py --capped: every ladder has a rung the replay says runs under 24 GiB and
    one it says does not, so the measured boundary can be told apart from the predicted one."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import calibrate

    capped = calibrate.select(calibrate.CASES, None, None, capped=True)
    assert capped == calibrate.CAPPED_CASES and all(c["memory_limit_mb"] == 24 * 1024 for c in capped)
    assert calibrate.main(["--dry-run", "--capped"]) == 0
    out = capsys.readouterr().out
    for prefix in {c["name"].rsplit("_", 2)[0] for c in capped}:
        said = [line for line in out.splitlines() if line.startswith(prefix)]
        assert any("the replay runs" in line for line in said) and any("the replay OOM" in line for line in said)


def test_memory_limit_travels_to_the_record():
    from vramplan.verify.launch import CaseRequest, limit_allocator
    from vramplan.verify.results import OomInfo

    setup = make_setup(method="full", seq_len=16)
    req = CaseRequest(model="llama-3.2-1b", setup=setup, memory_limit_bytes=24 * 2**30)
    assert CaseRequest.model_validate_json(req.model_dump_json()).memory_limit_bytes == 24 * 2**30
    m = Measurement(
        model="llama-3.2-1b", num_layers=16, full_layers=16, setup=setup, device="cuda", steps=1, fits=False
    )
    oom = OomInfo(phase="backward", step=0, reserved_bytes=23 * 2**30)
    record = m.model_copy(update={"memory_limit_bytes": 24 * 2**30, "oom": oom}).to_measured_case("x")
    assert record.model_extra["memory_limit_mb"] == 24 * 1024
    assert (record.model_extra["oom_phase"], record.model_extra["oom_step"]) == ("backward", 0)
    assert record.model_extra["oom_reserved_mb"] == 23 * 1024
    assert "memory_limit_mb" not in (m.to_measured_case("x").model_extra or {})
    with pytest.raises(VramplanError, match="CUDA"):
        limit_allocator("cpu", 2**30)


def test_segment_list_groups_the_snapshot_by_size_and_stream():
    """CudaProbe.segments on a stand-in for torch.cuda.memory_snapshot(): large segments per
    (size, stream), largest first, the small pool in one row; the record carries the list."""
    import types

    from vramplan.verify.probe import CudaProbe

    mib = 2**20
    snapshot = [
        {"device": 0, "total_size": 96 * mib, "allocated_size": 24 * mib, "stream": 0, "segment_type": "large"},
        {"device": 0, "total_size": 96 * mib, "allocated_size": 0, "stream": 0, "segment_type": "large"},
        {"device": 0, "total_size": 20 * mib, "allocated_size": 3 * mib, "stream": 7, "segment_type": "large"},
        {"device": 0, "total_size": 2 * mib, "allocated_size": mib, "stream": 0, "segment_type": "small"},
        {"device": 0, "total_size": 2 * mib, "allocated_size": mib // 2, "stream": 0, "segment_type": "small"},
        {"device": 1, "total_size": 512 * mib, "allocated_size": 0, "stream": 0, "segment_type": "large"},
    ]
    probe = CudaProbe(0)
    probe.torch = types.SimpleNamespace(cuda=types.SimpleNamespace(memory_snapshot=lambda: snapshot))
    rows = probe.segments()
    assert rows == [[192.0, 24.0, 0.0, 2.0], [20.0, 3.0, 7.0, 1.0], [4.0, 1.5, 0.0, 2.0]]
    m = Measurement(
        model="llama-3.2-1b",
        num_layers=16,
        full_layers=16,
        setup=make_setup(method="full", seq_len=16),
        device="cuda",
        steps=1,
        fits=True,
        segments_mib=rows,
    )
    assert m.to_measured_case("x").model_extra["segments_mib"] == rows
