"""Estimate converts to dict, JSON and a DataFrame that agree with its fields."""
from __future__ import annotations

import json

import pytest

import vramplan
from vramplan.categories import ALLOCATED, Category


@pytest.fixture(scope="module")
def est():
    return vramplan.estimate("llama-3.2-1b", "1x24GB", method="qlora", gradient_checkpointing=True)


def test_to_dict_is_plain_and_matches_the_json_contract(est):
    d = est.to_dict()
    assert d == est.to_json_dict()
    assert json.loads(json.dumps(d)) == d  # only JSON types
    assert d["per_gpu"]["breakdown"]["quant_state"] == est.per_gpu.breakdown[Category.QUANT_STATE] > 0
    assert d["fits"] is est.fits


def test_to_json_round_trips(est):
    assert json.loads(est.to_json()) == est.to_dict()
    assert "\n" not in est.to_json(indent=None)


def test_to_frame_one_row_per_category(est):
    df = est.to_frame()
    assert list(df["category"]) == [c.value for c in Category]
    assert df["bytes"].dtype == "int64"
    assert int(df["bytes"].sum()) == est.per_gpu.total_bytes
    assert int(df.loc[df["allocated"], "bytes"].sum()) == est.per_gpu.peak_allocated_bytes
    assert df["share"].sum() == pytest.approx(1.0)
    assert set(df.loc[df["allocated"], "category"]) == {c.value for c in ALLOCATED}
    row = df.set_index("category").loc["weights"]
    assert row["gib"] == pytest.approx(row["bytes"] / 2**30)


def test_api_estimate_survives_its_own_submodule_import():
    # the function shares its name with vramplan/estimate.py; a second call once failed
    import vramplan.estimate  # noqa: F401
    for _ in range(2):
        assert vramplan.estimate("llama-3.2-1b", "1x24GB", method="lora").fits
