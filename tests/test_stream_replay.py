"""The real step's allocation streams (tests/data/cpu/streams, recorded by
scripts/stream_replay.py --record from the CPU trace) and their replay through the allocator
model against the replay of the model's own events (issue 18, item 4; docs/allocator.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from vramplan.allocator import EventStream, Op, replay

ROOT = Path(__file__).resolve().parents[1]
KiB, MiB = 2**10, 2**20
# the model's peak reserved against the replay of the real stream, per case: a stated bar, not
# fitted (the replay against the measured H100 reserved reads worst 35.6%, docs/accuracy.md)
# The model's events make a moment's tensors just before it and free them just after, where
# the real step's come and go one by one; on these tiny steps (hidden 256) that strands more
# cache than the real stream does: up to +29% (full, GaLore; docs/allocator.md).
RESERVED_TOLERANCE = 0.30


def _script():
    spec = importlib.util.spec_from_file_location("stream_replay", ROOT / "scripts" / "stream_replay.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["stream_replay"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


sr = _script()
PATHS = sorted(sr.STREAMS.glob("*.npz"))


def test_every_listed_case_has_a_stream():
    assert PATHS and set(PATHS) == {sr.stream_path(g, n) for g, n in sr.CASES}


def live_bytes(ev: EventStream) -> np.ndarray:
    """Requested bytes alive after events[:k], k = 0..len."""
    signed = np.where(ev.ops == Op.ALLOC, ev.sizes, 0)
    size_of: dict[int, int] = {}
    for k, (op, tid, size) in enumerate(zip(ev.ops.tolist(), ev.ids.tolist(), ev.sizes.tolist(), strict=True)):
        if op == Op.ALLOC:
            size_of[tid] = size
        else:
            signed[k] = -size_of.pop(tid)
    return np.concatenate([[0], np.cumsum(signed)])


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_a_stream_is_the_traced_step(path):
    """Complete: its live bytes reproduce the trace's own per-phase peaks to the byte (no
    allocation missed, no free of memory from before the trace), and its step-1 peaks are
    tests/data/cpu/trace.jsonl's within 8 KiB (the trace is deterministic; one lazily made
    buffer differs between processes)."""
    ev, meta = sr.load_stream(path)
    assert meta["skipped_frees"] == 0
    live = live_bytes(ev)
    peaks = {label: int(live[start : end + 1].max()) for label, start, end in meta["phases"]}
    assert peaks == {k.replace("#None", ""): v for k, v in meta["traced_peaks"].items()}
    row = sr.trace_rows()[(meta["group"], meta["name"])]
    for phase in ("forward", "backward", "optimizer"):
        if phase in row:
            assert abs(peaks[f"{phase}#1"] - row[phase]["traced_bytes"]) <= 8 * KiB, phase
    assert live[-1] >= 0 and (ev.sizes[ev.ops == Op.ALLOC] > 0).all()


def test_compact_build_by_hand():
    """The build's survivors first, in the order they were made, then the steps unchanged: a
    30 MiB build temporary no longer leaves its segment in the cache."""
    A, F = Op.ALLOC, Op.FREE
    ev = EventStream.from_tuples(
        [(A, 0, MiB), (A, 1, 30 * MiB), (A, 2, 2 * MiB), (F, 1, 0), (A, 3, 12 * MiB), (F, 0, 0), (F, 3, 0)]
    )
    out = sr.compact_build(ev, 4)
    assert list(zip(out.ops.tolist(), out.ids.tolist(), out.sizes.tolist(), strict=True)) == [
        (A, 0, MiB),
        (A, 2, 2 * MiB),
        (A, 3, 12 * MiB),
        (F, 0, 0),
        (F, 3, 0),
    ]
    # 1 MiB: a 2 MiB small-pool segment; 2 MiB takes a 20 MiB segment whose rest holds the 12 MiB:
    # 22 MiB, where the build's 30 MiB block stays cached beside them (52 MiB)
    assert (replay(out).peak_reserved, replay(ev).peak_reserved) == (22 * MiB, 52 * MiB)


@pytest.mark.cputrace  # seconds: every stream and the model's events replayed
def test_model_against_the_real_stream_and_the_doc():
    """The model's events replay to within RESERVED_TOLERANCE of the real stream's peak
    reserved on every recorded case, and docs/allocator.md shows this comparison."""
    rows = sr.comparisons()
    for c in rows:
        err = (c.model.peak_reserved - c.real.peak_reserved) / c.real.peak_reserved
        assert abs(err) <= RESERVED_TOLERANCE, (c.group, c.name, err)
    doc = sr.DOC.read_text()
    assert sr.with_section(doc, sr.render(rows)) == doc, "run python scripts/stream_replay.py"
