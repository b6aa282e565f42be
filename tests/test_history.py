"""The allocator history reader (vramplan/verify/history.py) and its replay script: a history
in torch's snapshot format becomes the event stream the allocator model replays."""

from __future__ import annotations

import sys
from pathlib import Path

from vramplan.allocator import AllocatorConfig, replay
from vramplan.verify import history

MiB = 2**20
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _snapshot() -> dict:
    """torch.cuda.memory._snapshot()'s device_traces for: a 30 MiB tensor (its own 30 MiB
    segment), a 1 MiB one on another stream, the first freed (requested, then completed)."""
    trace = [
        {"action": "segment_alloc", "addr": 0, "size": 30 * MiB, "stream": 7},
        {"action": "alloc", "addr": 0, "size": 30 * MiB, "stream": 7},
        {"action": "segment_alloc", "addr": 1 << 40, "size": 2 * MiB, "stream": 9},
        {"action": "alloc", "addr": 1 << 40, "size": MiB, "stream": 9},
        {"action": "free_requested", "addr": 0, "size": 30 * MiB, "stream": 7},
        {"action": "free_completed", "addr": 0, "size": 30 * MiB, "stream": 7},
    ]
    return {"segments": [], "device_traces": [trace]}


def test_history_rows_round_trip_and_replay(tmp_path):
    rows = history.rows_from_snapshot(_snapshot(), 0)
    path = tmp_path / "case.jsonl.gz"
    history.write_rows(rows, path)
    assert history.read_rows(path) == rows
    events = history.events_from_rows(rows)
    assert events.ops.tolist() == [0, 0, 1]  # the free counted once, when completed
    assert events.streams.tolist()[:2] == [0, 1]  # streams renumbered in order of first use
    r = replay(events, AllocatorConfig())
    # the allocator model makes the same segments from the same stream: 30 MiB, and a 2 MiB small-pool one
    assert sorted(size for size, _ in r.final_segment_sizes) == [2 * MiB, 30 * MiB]
    assert sorted(size for size, _ in history.recorded_segments(rows)) == [2 * MiB, 30 * MiB]


def test_history_replay_script_reports_both(tmp_path, capsys):
    path = tmp_path / "case.jsonl.gz"
    history.write_rows(history.rows_from_snapshot(_snapshot(), 0), path)
    sys.path.insert(0, str(SCRIPTS))
    import history_replay

    assert history_replay.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "peak reserved: recorded 32 MiB, replayed 32 MiB" in out
    assert "1x30 MiB (stream 0), 1x2 MiB (stream 1)" in out


def test_no_history_is_recorded_off_cuda(tmp_path):
    """verify on the CPU traces allocations itself (cputrace): the CUDA history is not started."""
    import torch

    path = tmp_path / "never.jsonl.gz"
    with history.recording(torch, path, "cpu"):
        torch.zeros(4)
    assert not path.exists()
