"""The estimate against measured H100 and H200 steps (tests/data/*.jsonl, see tests/data/README.md).

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


# Measured on the H200 (tests/data/h200_verify.jsonl) and outside 5%; strict, so a fix that brings one
# within 5% must remove it here. docs/verify.md ("The first GPU lease") says what is known of each.
KNOWN_MISSES = {
    "l8b_qlora_int8_r16_ckpt_b1s2048": "LLM.int8 8B: -10.4%, the outlier columns verify's random weights make "
    "(fp16 subA kept per Linear: 1.75 GiB computed on the CPU for this width, 1.81 GiB missing)",
    "phi3_lora16_ckpt_eager_b1s2048": "eager attention recompute, 2048 tokens: -7.2% (sdpa within 1%); cause not found",
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(reason=KNOWN_MISSES[c.name], strict=True))
        if c.name in KNOWN_MISSES
        else c
        for c in CASES
    ],
    ids=[c.name for c in CASES],
)
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


# (file, worst |error| it is held to). The medians meet issue 18's 5%. On the H200 file the worst
# meets its 20% (Llama-3.2-1B full bf16 with checkpointing at 4 x 2048, +17.9%: docs/allocator.md);
# on the H100 file it does not and is held where it is so that it cannot get worse unseen: phi3 QLoRA
# with checkpointing (-34.3%), which verify measured within 1% on the H200 (the H100 harness's
# reserved carries what earlier cases left, docs/allocator.md).
RESERVED_BOUNDS = [("h100_dev.jsonl", 0.36), ("h200_verify.jsonl", 0.20)]


@pytest.mark.parametrize("name,worst", RESERVED_BOUNDS)
def test_reserved_median_and_worst_bounds(name, worst):
    """The allocator replay against the measured max_memory_reserved (issue 18)."""
    cases = [c for c in load_cases(DATA / name) if is_full_step(c)]
    scored = [s for s in score(cases, DATA / "configs") if s.reserved_error is not None]
    errors = sorted(abs(s.reserved_error) for s in scored)
    assert len(errors) >= 20
    assert errors[len(errors) // 2] <= 0.05 and errors[-1] <= worst, errors


# What a capped rung may read above or below the replay under the same cap: the allocator's
# reserved near the edge, where the cache is emptied and refilled (2% worst on the H200's rungs)
CAPPED_RESERVED_TOLERANCE = 0.05


def test_capped_rungs_run_where_the_replay_runs():
    """Issue 18's out-of-memory edge: every capped rung the H200 measured (calibrate.py --capped,
    24 GiB through set_per_process_memory_fraction) ran or ran out as the replay under that cap
    says, and where it ran, held what the replay holds to within CAPPED_RESERVED_TOLERANCE."""
    from vramplan.accuracy import capped_rows

    rows = capped_rows(load_cases(DATA / "h200_verify.jsonl"), DATA / "configs")
    assert len(rows) >= 15
    wrong = [r["name"] for r in rows if r["ran"] != r["predicted_ran"]]
    assert not wrong, wrong
    off = {
        r["name"]: (r["reserved"] / 2**30, r["predicted_reserved"] / 2**30)
        for r in rows
        if r["ran"] and abs(r["predicted_reserved"] - r["reserved"]) > CAPPED_RESERVED_TOLERANCE * r["reserved"]
    }
    assert not off, off


def test_the_tight_note_states_the_measured_shortfall():
    """estimate._tight_note cites how often and by how much the replay read under the
    measured reserved on the H100 dev cases: those numbers, recomputed."""
    from vramplan.estimate import _tight_note
    from vramplan.reserved import Simulated

    dev = [c for c in load_cases(DATA / "h100_dev.jsonl") if is_full_step(c)]
    short = [
        (s.measured_reserved_bytes - s.predicted_reserved_bytes) / 2**30
        for s in score(dev, DATA / "configs")
        if s.measured_reserved_bytes and s.measured_reserved_bytes - s.predicted_reserved_bytes >= 2**29
    ]
    sim = Simulated(peak_reserved=0, peak_allocated=0, fits=True, headroom=2**28, capped=None, events=None)  # type: ignore[arg-type]
    (note,) = _tight_note(sim, 24 * 2**30)
    assert f"on {len(short)} of the {len(dev)} measured H100 steps" in note
    assert f"{min(short):.1f}-{max(short):.1f} GiB above this replay" in note


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


def test_capped_cases_are_reported_against_the_replay_under_their_cap(tmp_path):
    """calibrate.py's capped rungs: the allocated peak is scored as any case's, the reserved is
    not (a capped allocator's, not the roomy GPU's max_memory_reserved), and the report puts
    each rung's outcome next to the replay under the same cap."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import accuracy_report

    from vramplan.accuracy import score_case

    base = next(iter(load_cases(DATA / "h100_dev.jsonl"))).model_dump()  # Llama-3.2-1B, 11.58 GiB allocated
    lines = [
        {**base, "name": "roomy_cap", "memory_limit_mb": 40 * 1024},
        {**base, "name": "tight_cap", "memory_limit_mb": 8 * 1024, "fits": False, "oom_phase": "backward"},
    ]
    path = tmp_path / "h100_verify.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cases = load_cases(path)
    assert score_case(cases[0], DATA / "configs").measured_reserved_bytes is None
    text = accuracy_report.render([path])
    assert "agrees on 2 of 2 rungs" in text  # under 40 GiB it runs, under 8 GiB (below its allocated peak) it cannot
    assert "| roomy_cap | 40 | ran |" in text and "| tight_cap | 8 | OOM | " in text
    assert "| tight_cap | backward |" not in text  # not listed again with the uncapped OOM runs


def test_under_memory_limit_runs_above_the_roomy_peak_and_not_below_the_allocated():
    from vramplan.allocator import AllocatorConfig, replay
    from vramplan.estimate import make_setup
    from vramplan.memory.events import step_events
    from vramplan.model_loader import load_model_spec
    from vramplan.reserved import under_memory_limit

    spec, setup = load_model_spec("llama-3.2-1b"), make_setup(method="lora", batch_size=1, seq_len=1024)
    roomy = replay(step_events(spec, setup).events, AllocatorConfig())
    above = under_memory_limit(spec, setup, roomy.peak_reserved, AllocatorConfig())
    assert above.runs and above.peak_reserved == roomy.peak_reserved and above.oom_at is None
    below = under_memory_limit(spec, setup, roomy.peak_allocated - 2**20, AllocatorConfig())
    assert not below.runs and below.oom_at in ("build", "step 0", "a later step")
    assert below.peak_reserved <= roomy.peak_allocated - 2**20
