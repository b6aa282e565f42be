"""The CUDA caching allocator's own event history for one measured case.

torch.cuda.memory._record_memory_history records every allocation, free and cudaMalloc of the
process, with its size and stream (torch==2.13.0 cuda/memory.py `_record_memory_history`,
`_snapshot`'s "device_traces"). `vramplan verify`'s calibration batch saves it for the cases
where the allocator replay and the card disagree (scripts/calibrate.py HISTORY_CASES), so that
the real allocation stream can be replayed through vramplan's allocator model
(scripts/history_replay.py). That separates the two ways the replay can be wrong: in the
allocator model (the real stream replayed gives other segments than the card's) or in the
events the memory model derives (the real stream replays right, the modelled one does not).

The file is gzip'd JSON lines, one ``[action, size, stream, addr]`` per event, in order:
``alloc``, ``free_requested``, ``free_completed``, ``segment_alloc``, ``segment_free``,
``segment_map``, ``segment_unmap`` and ``oom`` as torch names them. Frames are not recorded
(``stacks=None``), which keeps a step's history to a few MB.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vramplan.allocator import EventStream, Op

# enough for a 70B step's three steps (~40k events each); older events are dropped beyond it
MAX_ENTRIES = 400_000


@contextmanager
def recording(torch: Any, path: str | Path | None, device: str) -> Iterator[None]:
    """Record the allocator's events inside the block and write them to `path` at its end,
    however it ends (an out-of-memory error included); nothing without a path or off CUDA."""
    dev = torch.device(device)
    if not path or dev.type != "cuda":
        yield
        return
    start(torch)
    try:
        yield
    finally:
        save(torch, path, dev.index or 0)
        stop(torch)


def start(torch: Any) -> None:
    """Record every allocator event from now on, without stack frames."""
    torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=MAX_ENTRIES)


def stop(torch: Any) -> None:
    torch.cuda.memory._record_memory_history(enabled=None)


def rows_from_snapshot(snapshot: dict, device: int) -> list[list]:
    """[action, size, stream, addr] of every recorded event of `device`, in order."""
    traces = snapshot.get("device_traces") or []
    events = traces[device] if device < len(traces) else []
    return [[e["action"], int(e.get("size", 0)), int(e.get("stream", 0)), int(e.get("addr", 0))] for e in events]


def save(torch: Any, path: str | Path, device: int) -> int:
    """Write the recorded events of `device` to `path` (temporary file + rename); returns how many."""
    rows = rows_from_snapshot(torch.cuda.memory._snapshot(), device)
    write_rows(rows, path)
    return len(rows)


def write_rows(rows: list[list], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


def read_rows(path: str | Path) -> list[list]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def events_from_rows(rows: list[list]) -> EventStream:
    """The tensors' allocations and frees as an event stream for allocator.replay: each
    ``alloc`` a new tensor, freed at its address's ``free_completed`` (when the block is back in
    the cache; ``free_requested`` precedes it while another stream still uses the block). The
    segments' events are the allocator's own decisions, which the replay makes again."""
    ops: list[int] = []
    ids: list[int] = []
    sizes: list[int] = []
    streams: list[int] = []
    live: dict[int, int] = {}
    stream_ids: dict[int, int] = {}
    for action, size, stream, addr in rows:
        if action == "alloc":
            tid = len(ops)
            live[addr] = tid
            ops.append(int(Op.ALLOC))
            ids.append(tid)
            sizes.append(size)
            streams.append(stream_ids.setdefault(stream, len(stream_ids)))
        elif action == "free_completed" and addr in live:
            ops.append(int(Op.FREE))
            ids.append(live.pop(addr))
            sizes.append(0)
            streams.append(0)
    return EventStream(
        np.asarray(ops, np.int8), np.asarray(ids, np.int64), np.asarray(sizes, np.int64), np.asarray(streams, np.int64)
    )


def recorded_segments(rows: list[list]) -> list[tuple[int, int]]:
    """(bytes, stream) of every segment cudaMalloc'd and not freed by the end of the history."""
    made: dict[int, tuple[int, int]] = {}
    for action, size, stream, addr in rows:
        if action == "segment_alloc":
            made[addr] = (size, stream)
        elif action == "segment_free":
            made.pop(addr, None)
    return sorted(made.values(), reverse=True)
