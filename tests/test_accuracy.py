"""The estimate against measured H100 steps (tests/data/*.jsonl, see tests/data/README.md).

Tolerance: every case within 5% of the measured torch.cuda.max_memory_allocated()
(the project's bar; the shared checker's is a 5% median and 15% worst case).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from vramplan.accuracy import score, score_case, summary
from vramplan.measured import load_cases

DATA = Path(__file__).parent / "data"
CASES = [c for f in sorted(DATA.glob("*.jsonl")) for c in load_cases(f)]
TOL = 0.05


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_peak_allocated_within_tolerance(case):
    s = score_case(case, DATA / "configs")
    assert abs(s.alloc_error) <= TOL, (f"{case.name}: predicted {s.predicted_alloc_bytes / 2**30:.2f} GiB, "
                                       f"measured {s.measured_alloc_bytes / 2**30:.2f} GiB ({100 * s.alloc_error:+.1f}%)")


def test_median_and_worst_error_bounds():
    s = summary(score(CASES, DATA / "configs"))
    assert s["cases"] == len(CASES) >= 20
    assert s["median_abs_error"] <= 0.05 and s["max_abs_error"] <= 0.15, s


def test_parameter_count_matches_measured():
    from vramplan.model_spec import load_model_spec
    checked = 0
    for case in CASES:
        if case.method != "full" or case.layers:
            continue
        spec = load_model_spec(str(DATA / "configs" / f"{case.model}.json"))
        assert spec.params_total == case.params_total, case.name
        checked += 1
    assert checked > 0
