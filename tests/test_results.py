"""Estimate converts to dict, JSON and a DataFrame that agree with its fields."""

from __future__ import annotations

import json

import pytest

import vramplan
from vramplan.categories import ALLOCATED, Category


@pytest.fixture(scope="module")
def est():
    return vramplan.estimate("llama-3.2-1b", "1x24GB", method="qlora", gradient_checkpointing=True)


def _plain(v) -> bool:
    if isinstance(v, dict):
        return all(type(k) is str and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return v is None or type(v) in (str, int, float, bool)


def test_to_dict_is_plain_and_matches_the_json_contract(est):
    d = est.to_dict()
    assert _plain(d)  # no enums, no pydantic models, no Category keys
    # docs/reference-step.md, "The estimate contract": the fields callers rely on
    assert d["per_gpu"]["peak_allocated_bytes"] == est.per_gpu.peak_allocated_bytes
    assert d["per_gpu"]["peak_reserved_bytes"] == est.per_gpu.peak_reserved_bytes
    assert d["per_gpu"]["breakdown"] == {c.value: n for c, n in est.per_gpu.breakdown.items()}
    assert d["headroom_bytes"] == est.headroom_bytes and d["model"] == "llama-3.2-1b"
    assert d["setup"]["method"] == "qlora" and d["setup"]["gradient_checkpointing"] is True
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
