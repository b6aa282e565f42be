"""The estimate against measured H100 steps (tests/data/*.jsonl, see tests/data/README.md).

Tolerance: every case within 5% of the measured torch.cuda.max_memory_allocated()
(the project's bar; the shared checker's is a 5% median and 15% worst case).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vramplan.accuracy import is_full_step, score, score_case, summary
from vramplan.measured import load_cases

DATA = Path(__file__).parent / "data"
# out-of-memory runs and depth extrapolations are results, not peaks to hold the estimate to
CASES = [c for f in sorted(DATA.glob("*.jsonl")) for c in load_cases(f) if is_full_step(c)]
TOL = 0.05


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_peak_allocated_within_tolerance(case):
    s = score_case(case, DATA / "configs")
    assert abs(s.alloc_error) <= TOL, (
        f"{case.name}: predicted {s.predicted_alloc_bytes / 2**30:.2f} GiB, "
        f"measured {s.measured_alloc_bytes / 2**30:.2f} GiB ({100 * s.alloc_error:+.1f}%)"
    )


def test_median_and_worst_error_bounds():
    s = summary(score(CASES, DATA / "configs"))
    assert s["cases"] == len(CASES) >= 20
    assert s["median_abs_error"] <= 0.05 and s["max_abs_error"] <= 0.15, s


def test_parameter_count_matches_measured():
    from vramplan.model_loader import load_model_spec

    checked = 0
    for case in CASES:
        if case.method != "full" or case.layers:
            continue
        spec = load_model_spec(str(DATA / "configs" / f"{case.model}.json"))
        assert spec.params_total == case.params_total, case.name
        checked += 1
    assert checked > 0


def test_oom_runs_and_extrapolations_are_not_scored():
    from vramplan.measured import MeasuredCase

    base = next(iter(load_cases(DATA / "h100_dev.jsonl"))).model_dump()
    assert is_full_step(MeasuredCase.model_validate(base))
    assert not is_full_step(MeasuredCase.model_validate({**base, "fits": False, "oom_phase": "backward"}))
    assert not is_full_step(MeasuredCase.model_validate({**base, "extrapolated_from": [4, 8]}))
    assert not is_full_step(MeasuredCase.model_validate({**base, "peak_alloc_mb": None}))


def test_report_shows_the_machine_extrapolations_and_out_of_memory(tmp_path):
    """docs/accuracy.md's generator on lines as verify writes them (scripts/calibrate.py)."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import accuracy_report

    base = next(iter(load_cases(DATA / "h100_dev.jsonl"))).model_dump()
    lines = [
        {**base, "name": "a", "device_name": "NVIDIA H100 80GB HBM3", "versions": {"torch": "2.11.0"}},
        {**base, "name": "a_xp4-8", "extrapolated_from": [4, 8], "peak_alloc_mb": base["peak_alloc_mb"] * 1.02},
        {**base, "name": "b", "fits": False, "oom_phase": "backward"},
    ]
    path = tmp_path / "h100_verify.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = accuracy_report.render([path])
    assert "1 cases" in text  # neither the extrapolation nor the out-of-memory run is scored
    assert "Measured on NVIDIA H100 80GB HBM3 (torch 2.11.0)" in text
    assert "| a_xp4-8 | [4, 8] |" in text and "+2.0% |" in text
    assert "| b | backward |" in text
