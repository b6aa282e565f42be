"""Turn the allocations a torch profiler recorded (cputrace.AllocationTrace, or any
``torch.profiler.profile(profile_memory=True)``) into vramplan.allocator events, so the real
step's allocation stream can be replayed through the CUDA caching allocator model.

The profiler reports each allocation and free as an Allocation event with the pointer and a
signed size (c10's ProfiledCPUMemoryReporter / reportMemoryUsageToProfiler: negative on free).
A pointer is reused after its free, so each (pointer, lifetime) becomes a new tensor id. What
the trace records is the CPU allocator's requests: the same tensors the CUDA step allocates
where the kernels agree (cputrace's cuda_like_* helpers), but one stream only (stream 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vramplan.allocator import EventStream, Op

_MARK = "vramplan.phase:"  # cputrace._MARK: the record_function label of a phase


@dataclass(frozen=True, eq=False)
class RecordedStream:
    events: EventStream
    # (phase label as cputrace writes it, e.g. "forward#1", first event index, end index exclusive)
    phases: tuple[tuple[str, int, int], ...]
    skipped_frees: int  # frees of memory allocated before the trace began


def _walk(prof, device_type: str):
    """(time ns, ptr, signed size) of every allocation event, and (label, start, end) of phases."""
    from torch._C._profiler import _EventType

    allocs, marks = [], []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.typed[0] == _EventType.Allocation and e.typed[1].device.type == device_type:
            allocs.append((e.start_time_ns, e.typed[1].ptr, e.typed[1].alloc_size))
        elif e.name.startswith(_MARK):
            marks.append((e.name[len(_MARK) :], e.start_time_ns, e.end_time_ns))
        stack.extend(e.children)
    # At equal timestamps put frees first: a pointer can only be handed out again once freed.
    allocs.sort(key=lambda a: (a[0], a[2] > 0))
    return allocs, sorted(marks, key=lambda m: m[1])


def events_from_profiler(prof, device_type: str = "cpu") -> RecordedStream:
    """Read a finished ``torch.profiler.profile(profile_memory=True)``; one event per
    allocation or free on ``device_type``, in time order."""
    allocs, marks = _walk(prof, device_type)
    rows: list[tuple[int, int, int, int]] = []  # (op, tensor id, size, time)
    live: dict[int, int] = {}  # ptr -> tensor id
    skipped = next_id = 0
    for t, ptr, size in allocs:
        if size > 0:
            if ptr in live:  # the free was not reported: close the old lifetime first
                rows.append((Op.FREE, live.pop(ptr), 0, t))
            live[ptr] = next_id
            rows.append((Op.ALLOC, next_id, size, t))
            next_id += 1
        elif ptr in live:
            rows.append((Op.FREE, live.pop(ptr), 0, t))
        else:
            skipped += 1
    ops, ids, sizes, times = zip(*rows, strict=True) if rows else ((), (), (), ())
    n = len(ops)
    events = EventStream(
        np.asarray(ops, np.int8), np.asarray(ids, np.int64), np.asarray(sizes, np.int64), np.zeros(n, np.int64)
    )
    t_arr = np.asarray(times, np.int64)
    phases = tuple(
        (label, int(np.searchsorted(t_arr, start, "left")), int(np.searchsorted(t_arr, end, "right")))
        for label, start, end in marks
    )
    return RecordedStream(events=events, phases=phases, skipped_frees=skipped)


def events_from_trace(trace) -> RecordedStream:
    """The events of a closed cputrace.AllocationTrace (its profiler, read without changing it)."""
    return events_from_profiler(trace._prof)
