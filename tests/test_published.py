"""The estimate against a published benchmark table: Answer.AI's fsdp_qlora runs of March 2024
(tests/data/published/answerai_fsdp_qlora_2024.jsonl, each row with its source line in
AnswerDotAI/fsdp_qlora benchmarks_03_2024.md; scripts/published_check.py prints the table).

Published numbers are `torch.cuda.max_memory_reserved()` on two 24 GB cards; vramplan's is the
reserved memory the step would report on that card (the capped replay's where the card is
smaller than a roomy one). Tolerances, stated once: every row within 17% (the largest miss,
7B LoRA + CPU offload at batch 10 with the libraries of 2024, is -13.0%; docs/published.md
says what is not modelled), the mean within 10%, Llama-2-70B (the judged row, run as
`--stack fsdp-qlora` is today) within 10%, and the two published allocated peaks within 3%."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "published" / "answerai_fsdp_qlora_2024.jsonl"
ROW_TOLERANCE = 0.17
MEAN_TOLERANCE = 0.10
JUDGED_TOLERANCE = 0.10
ALLOCATED_TOLERANCE = 0.03


def _script():
    spec = importlib.util.spec_from_file_location("published_check", ROOT / "scripts" / "published_check.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["published_check"] = mod  # its dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


ROWS = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def test_every_row_of_the_benchmark_tables_is_committed_with_its_source():
    # benchmarks_03_2024.md: 13 rows on 2x3090 (:34-35, :44-45, :57-60, :72-73, :89-90, :104)
    # and 11 on 2x4090 (:125-130, :142-143, :153, :163-164)
    assert len(ROWS) == 24
    lines = sorted(int(r["source"].split(";")[0].rsplit(":", 1)[1]) for r in ROWS)
    expected = [34, 35, 44, 45, 57, 58, 59, 60, 72, 73, 89, 90, 104]
    expected += [125, 126, 127, 128, 129, 130, 142, 143, 153, 163, 164]
    assert lines == expected
    for r in ROWS:
        assert r["source"].startswith("AnswerDotAI/fsdp_qlora@05ed9f2 benchmarks_03_2024.md:")
        assert r["gpu"] in ("rtx-3090", "rtx-4090") and r["gpus"] == 2
        assert r["sharding_strategy"] in ("full_shard", "ddp") and r["reserved_gib"] > 0


@pytest.fixture(scope="module")
def predictions():
    pc = _script()
    return pc, [pc.predict(r) for r in ROWS], [pc.predict(r, adapter_dtype=None) for r in ROWS]


@pytest.mark.cputrace
def test_every_row_within_the_stated_tolerance(predictions):
    _, preds, _ = predictions
    errors = {}
    for row, p in zip(ROWS, preds, strict=True):
        assert p.fits, f"{row['id']}: predicted out of memory, the run was measured"
        errors[row["id"]] = p.error(row["reserved_gib"])
    worst = max(errors, key=lambda k: abs(errors[k]))
    assert abs(errors[worst]) <= ROW_TOLERANCE, f"{worst}: {errors[worst]:+.1%}"
    assert sum(abs(e) for e in errors.values()) / len(errors) <= MEAN_TOLERANCE


@pytest.mark.cputrace
def test_the_judged_70b_row_within_10_percent(predictions):
    _, preds, today = predictions
    for row, p, t in zip(ROWS, preds, today, strict=True):
        if row["model"] == "llama-2-70b":
            assert abs(p.error(row["reserved_gib"])) <= ROW_TOLERANCE, row["id"]  # 2024's bf16 adapters
            assert t.fits and abs(t.error(row["reserved_gib"])) <= JUDGED_TOLERANCE, row["id"]


@pytest.mark.cputrace
def test_published_allocated_peaks(predictions):
    # benchmarks_03_2024.md:50: LoRA 7B at 512 and 2048 tokens, 8.28 and 9.16 GiB allocated
    from vramplan.units import GiB

    _, preds, _ = predictions
    checked = 0
    for row, p in zip(ROWS, preds, strict=True):
        if row["allocated_gib"]:
            assert p.allocated / GiB == pytest.approx(row["allocated_gib"], rel=ALLOCATED_TOLERANCE), row["id"]
            checked += 1
    assert checked == 2
