"""Wall time of `vramplan estimate` (cold process, preset spec shipped, empty user cache)
and of the in-process engine. Numbers go to docs/benchmarks.md.

usage: python benchmarks/bench_estimate.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _cold import ROOT, cold_cli

sys.path.insert(0, str(ROOT))  # benchmark this checkout's vramplan

CMD = ["estimate", "llama-3.1-405b", "--gpus", "8x80GB", "--method", "qlora", "--fsdp", "8", "--format", "json"]


def in_process(repeat: int) -> list[float]:
    from vramplan.estimate import estimate_config
    from vramplan.model_loader import load_model_spec

    spec = load_model_spec("llama-3.1-405b")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        estimate_config(spec, "8x80GB", method="qlora", fsdp=8)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    cold = cold_cli(CMD, a.repeat)
    warm = in_process(a.repeat)
    print(f"cold CLI `vramplan {' '.join(CMD)}`: median {statistics.median(cold):.3f} s, max {max(cold):.3f} s")
    print(f"in-process estimate (405B, 126 layers, FSDP 8): median {1000 * statistics.median(warm):.1f} ms")


if __name__ == "__main__":
    main()
