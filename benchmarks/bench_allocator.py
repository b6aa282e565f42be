"""Speed of the allocator model (vramplan/allocator.py): events replayed per second on a
synthetic training step shaped like a 70B model's (80 repeated layers, a few hundred
events each: saved activations kept until the backward, temporaries freed at once, the
backward's gradients allocated and freed in reverse).

usage: python benchmarks/bench_allocator.py [--layers 80] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time

from _cold import ROOT

sys.path.insert(0, str(ROOT))  # benchmark this checkout's vramplan

MiB = 1 << 20
# Llama-70B-like shapes at micro-batch 1 x 1024 tokens in bf16: hidden 8192, MLP 28672, 64 heads.
TOKENS = 1024
HIDDEN = TOKENS * 8192 * 2
MLP = TOKENS * 28672 * 2
SCORES = 64 * TOKENS * 4  # a per-head softmax statistic in fp32, small-pool sized
LAYER_SIZES = [HIDDEN, HIDDEN, MLP, MLP, MLP, HIDDEN, SCORES, 3 * 512, 1 * MiB]


def layer_events(rounds: int = 20):
    """One layer's forward (saved + temporary tensors) and backward; ids local to the layer."""
    from vramplan.allocator import Op

    fwd, saved, tid = [], [], 0
    for r in range(rounds):
        for size in LAYER_SIZES:
            fwd.append((Op.ALLOC, tid, size + r * 512, 0))
            if tid % 12:
                fwd.append((Op.FREE, tid, 0, 0))
            else:
                saved.append(tid)
            tid += 1
    return fwd, saved, tid


def step_events(layers: int):
    from vramplan.allocator import EventStream, Op

    fwd, saved, width = layer_events()
    forward = EventStream.from_tuples(fwd).repeat(layers, id_stride=width)
    bwd = []
    for layer in reversed(range(layers)):
        grad = layers * width + layer
        bwd.append((Op.ALLOC, grad, HIDDEN, 0))
        bwd += [(Op.FREE, layer * width + t, 0, 0) for t in reversed(saved)]
        bwd.append((Op.FREE, grad, 0, 0))
    return EventStream.concat([forward, EventStream.from_tuples(bwd)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from vramplan.allocator import parse_alloc_conf, replay

    events = step_events(args.layers)
    for conf in ("", "expandable_segments:True", "max_split_size_mb:128,roundup_power2_divisions:4"):
        best = cpu = float("inf")
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            r = replay(events, parse_alloc_conf(conf), record_trace=True)
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)  # less sensitive to a shared, loaded machine
        print(
            f"{conf or 'default':50s} {len(events):7d} events {best * 1e3:6.1f} ms wall, {cpu * 1e3:6.1f} ms cpu "
            f"({len(events) / best / 1e6:.2f} M events/s) peak reserved {r.peak_reserved / 2**30:.2f} GiB, "
            f"allocated {r.peak_allocated / 2**30:.2f} GiB, segments {r.peak_segments}"
        )


if __name__ == "__main__":
    main()
