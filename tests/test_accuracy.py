"""The estimate against measured H100 steps (tests/data/h100_dev.jsonl, see its README).

Tolerance: every case within 5% of the measured torch.cuda.max_memory_allocated().
"""
from __future__ import annotations

from pathlib import Path

import pytest

from vramplan.estimate import estimate_config
from vramplan.measured import load_cases

DATA = Path(__file__).parent / "data"
CASES = load_cases(DATA / "h100_dev.jsonl")
TOL = 0.05


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_peak_allocated_within_tolerance(case):
    est = estimate_config(str(DATA / "configs" / f"{case.model}.json"), gpus=f"{case.world}x80GB",
                          num_layers=case.layers, **case.setup_fields())
    measured = case.peak_alloc_bytes
    err = (est.per_gpu.peak_allocated_bytes - measured) / measured
    assert abs(err) <= TOL, f"{case.name}: predicted {est.per_gpu.peak_allocated_bytes / 2**30:.2f} GiB, " \
                            f"measured {measured / 2**30:.2f} GiB ({100 * err:+.1f}%)"


def test_parameter_count_matches_measured():
    for case in CASES:
        if case.method != "full" or case.layers:
            continue
        from vramplan.model_spec import load_model_spec
        spec = load_model_spec(str(DATA / "configs" / f"{case.model}.json"))
        assert spec.params_total == case.params_total, case.name
