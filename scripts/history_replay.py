"""Replay a recorded allocator history (vramplan/verify/history.py) through vramplan's model of
the caching allocator, next to what the card did.

    python scripts/history_replay.py HISTORY.jsonl.gz [--cap-mib N] [--alloc-conf S]

The history is the real step's allocation stream on the GPU (calibrate.py --alloc-history
writes one per HISTORY_CASES case). Replayed through vramplan/allocator.py it shows whether the
allocator model reproduces the card's segments from the card's own stream: if it does, a
reserved or capped-verdict miss of the estimate lies in the events the memory model derives
(memory/events.py), not in the allocator model. Prints the recorded and replayed peak reserved
and the segments left at the end, by size and stream.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from vramplan.allocator import parse_alloc_conf, replay
from vramplan.verify.history import events_from_rows, read_rows, recorded_segments

MiB = 2**20


def recorded_peak_reserved(rows: list[list]) -> int:
    """The most the recorded segments held at once."""
    held = peak = 0
    for action, size, _stream, _addr in rows:
        if action in ("segment_alloc", "segment_map"):
            held += size
            peak = max(peak, held)
        elif action in ("segment_free", "segment_unmap"):
            held -= size
    return peak


def _by_size(segments) -> str:
    counts = Counter((round(size / MiB), stream) for size, stream in segments)
    return ", ".join(f"{n}x{mib} MiB (stream {s})" for (mib, s), n in sorted(counts.items(), reverse=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("history")
    ap.add_argument("--cap-mib", type=float, help="set_per_process_memory_fraction's cap the case ran under")
    ap.add_argument("--alloc-conf", default="", help="PYTORCH_CUDA_ALLOC_CONF the case ran with")
    args = ap.parse_args(argv)
    rows = read_rows(args.history)
    events = events_from_rows(rows)
    cap = int(args.cap_mib * MiB) if args.cap_mib else None
    r = replay(events, parse_alloc_conf(args.alloc_conf), memory_fraction_limit=cap)
    streams = {s: i for i, s in enumerate(dict.fromkeys(row[2] for row in rows if row[0] == "alloc"))}
    recorded = [(size, streams.get(stream, -1)) for size, stream in recorded_segments(rows)]
    print(f"{len(events)} events ({len(rows)} recorded)")
    peak = recorded_peak_reserved(rows)
    print(f"peak reserved: recorded {peak / MiB:.0f} MiB, replayed {r.peak_reserved / MiB:.0f} MiB")
    print(f"out of memory: recorded {any(row[0] == 'oom' for row in rows)}, replayed {r.oom is not None}")
    print(f"segments at the end, recorded: {_by_size(recorded)}")
    print(f"segments at the end, replayed: {_by_size(r.final_segment_sizes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
