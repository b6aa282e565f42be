"""Issue 16, verify on the CPU: the extra checked first, the cost said before a CPU run, the
libraries quiet, activations + transient compared as their sum, a truncated run related back
to the full model. Fast: nothing here runs a step."""

from __future__ import annotations

import os

import pytest

from vramplan.errors import VramplanError
from vramplan.setup import TrainingSetup
from vramplan.units import GiB, MiB
from vramplan.verify import api
from vramplan.verify.results import CategoryRow, Comparison


class Ran(Exception):
    """run_case was reached: the work started."""


@pytest.fixture
def no_run(monkeypatch):
    import vramplan.verify.measure as measure

    def refuse(*a, **k):
        raise Ran

    monkeypatch.setattr(measure, "run_case", refuse)


def test_a_missing_library_is_said_before_any_work(monkeypatch, no_run):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    import sys

    estimate = sys.modules["vramplan.estimate"]  # the package exports a function of the same name

    def no_estimate(*a, **k):
        raise AssertionError("estimated before checking the libraries")

    monkeypatch.setattr(estimate, "estimate_config", no_estimate)
    with pytest.raises(VramplanError, match=r"peft \(for --method lora\).*vramplan\[verify\]"):
        api.verify("llama-3.2-1b", TrainingSetup(method="lora"), device="cpu", num_layers=1)


def test_needed_libraries_follow_the_setup():
    from vramplan.verify.preflight import needed_libraries

    assert needed_libraries(TrainingSetup(method="full")) == {}
    assert set(needed_libraries(TrainingSetup(method="qlora", quant="hqq4"))) == {"peft", "hqq"}
    assert set(needed_libraries(TrainingSetup(method="galore", optim="galore_adamw_8bit_layerwise"))) == {
        "galore_torch",
        "bitsandbytes",
    }


def test_a_full_depth_cpu_run_says_its_time_and_ram_first(monkeypatch, no_run):
    from vramplan.verify import preflight

    monkeypatch.setattr(preflight, "cpu_matmul_flops", lambda: 100e9)
    said: list[str] = []
    with pytest.raises(Ran):
        api.verify("llama-3.1-8b", TrainingSetup(method="lora"), device="cpu", on_notice=said.append)
    first = said[0]
    assert "full depth (32 layers)" in first and "GiB of RAM" in first and " h " in first + " "
    assert "--num-layers 2" in first


def test_cpu_cost_scales_with_steps_and_depth():
    from vramplan.model_loader import load_model_spec
    from vramplan.verify.preflight import cpu_cost

    setup = TrainingSetup(method="lora")
    full, two = load_model_spec("llama-3.1-8b"), load_model_spec("llama-3.1-8b", num_layers=2)
    one_step = cpu_cost(full, setup, 1, 1e11, GiB)
    assert cpu_cost(full, setup, 3, 1e11, GiB).seconds == pytest.approx(3 * one_step.seconds)
    assert cpu_cost(two, setup, 1, 1e11, GiB).seconds < one_step.seconds / 5
    # 2 x 8B params x 2048 tokens forward alone: 6.6e13 FLOPs, over 10 min at 100 GFLOP/s
    assert one_step.seconds > 2 * 8e9 * 2048 / 1e11
    assert one_step.ram_bytes > GiB


def test_profiler_lines_are_dropped_and_the_rest_kept(capfd):
    from vramplan.verify.quiet import quiet_libraries

    with quiet_libraries():
        os.write(2, b"USDT:2026-12-02 18:02:26 22238:22238 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"STAGE:2026-12-02 18:03:44 23268:23268 SyncActivityProfilerHandler.cpp:51] Completed\n")
        os.write(2, b"a real native error\n")
        import warnings

        warnings.warn("is_gradient_checkpointing is deprecated", FutureWarning, stacklevel=1)
        import logging

        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    err = capfd.readouterr().err
    assert "a real native error" in err
    assert "USDT" not in err and "STAGE" not in err and "deprecated" not in err and "gemm_4bit" not in err


def _row(cat: str, est: int, meas: int) -> CategoryRow:
    return CategoryRow(
        category=cat,
        estimate_bytes=est,
        measured_bytes=meas,
        error_bytes=est - meas,
        error_pct=100 * (est - meas) / meas,
    )


def _comparison() -> Comparison:
    rows = [
        _row("weights", 600 * MiB, 600 * MiB),
        _row("activations", 20 * MiB, 80 * MiB),
        _row("transient", 180 * MiB, 120 * MiB),
    ]
    totals = [_row("peak allocated", 800 * MiB, 800 * MiB), _row("activations + transient", 200 * MiB, 200 * MiB)]
    return Comparison(description="d", rows=rows, totals=totals, fits_measured=True, fits_estimated=True)


def test_activations_and_transient_are_shown_as_their_sum():
    """They read -75% and +50% on their own while their sum agreed."""
    from vramplan.verify.compare import display_rows

    rows, totals = display_rows(_comparison())
    assert [r.category for r in rows] == ["weights", "activations + transient"]
    assert rows[1].error_pct == 0
    assert [r.category for r in totals] == ["peak allocated"]


def test_render_says_why_the_two_are_summed():
    import io

    from rich.console import Console

    from vramplan.verify.compare import render

    class M:  # the few Measurement fields render reads
        model, num_layers, full_layers, tokens_per_s, notes = "m", 1, 16, None, []

    console = Console(file=io.StringIO(), width=200)
    render(_comparison(), M(), console)
    out = console.file.getvalue()
    assert "-75.0" not in out and "compared as their sum" in out


def test_a_truncated_run_is_related_to_the_full_model():
    import vramplan
    from vramplan.verify.compare import depth_note

    full = vramplan.estimate("llama-3.2-1b", gpus="rtx-4090", method="lora")
    cmp = _comparison().model_copy(update={"totals": [_row("peak allocated", 810 * MiB, 800 * MiB)]})
    note = depth_note(1, 16, full, cmp)
    assert "1 of 16 decoder layers" in note and f"{full.per_gpu.total_bytes / GiB:.2f} GiB" in note
    assert "+10.0 MiB" in note and "160 MiB" in note  # 10 MiB x 16 layers / 1
