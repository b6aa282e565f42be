"""Speed of `vramplan plan`: configurations evaluated per second (in process) and the
wall time of a cold `vramplan plan llama-70b --gpus 2x24GB`. Numbers go to docs/benchmarks.md.

"Configurations evaluated" counts (discrete configuration, sequence length, micro-batch)
points whose per-GPU total the search computed; the rate divides them by the time of the
whole search (the step_model calls included), not by the numpy part alone.

usage: python benchmarks/bench_plan.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _cold import ROOT, cold_cli

sys.path.insert(0, str(ROOT))  # benchmark this checkout's vramplan

CASES = [
    ("llama-70b", "2x24GB", {}),
    ("llama-2-7b", "1x24GB", {"methods": "full,galore"}),
    ("llama-3.1-8b", "8x80GB", {}),
    ("qwen2.5-0.5b", "1x24GB", {}),
    ("gemma-2-9b", "2x24GB", {}),
]
CLI = ["plan", "llama-70b", "--gpus", "2x24GB"]


def in_process(repeat: int) -> list[tuple[str, int, int, float, float]]:
    from vramplan.model_loader import load_model_spec
    from vramplan.plan import make_request, plan_spec, search
    from vramplan.units import GiB

    out = []
    for model, gpus, kw in CASES:
        spec = load_model_spec(model)
        req = make_request(model, gpus, host_ram=128 * GiB, **kw)
        search_t, plan_t, evaluated, discrete = [], [], 0, 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            grids, evaluated = search(spec, req)
            search_t.append(time.perf_counter() - t0)
            discrete = len(grids)
            t0 = time.perf_counter()
            plan_spec(spec, req, top=10)
            plan_t.append(time.perf_counter() - t0)
        out.append(
            (
                f"{model} {gpus} {kw or ''}".strip(),
                discrete,
                evaluated,
                statistics.median(search_t),
                statistics.median(plan_t),
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print("| case | discrete configs | points evaluated | search s | points/s | full plan s (incl. re-check) |")
    print("|---|---|---|---|---|---|")
    for name, discrete, evaluated, st, pt in in_process(a.repeat):
        print(f"| {name} | {discrete} | {evaluated:,} | {st:.2f} | {evaluated / st:,.0f} | {pt:.2f} |")
    cold = cold_cli(CLI, a.repeat)
    print(
        f"\ncold `vramplan {' '.join(CLI)}` (new process, empty user cache): median {statistics.median(cold):.2f} s, "
        f"max {max(cold):.2f} s"
    )


if __name__ == "__main__":
    main()
