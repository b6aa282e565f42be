"""Wall time of `vramplan estimate` (cold process, preset spec shipped, empty user cache)
and of the in-process engine. Numbers go to docs/benchmarks.md.

usage: python benchmarks/bench_estimate.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CMD = ["estimate", "llama-3.1-405b", "--gpus", "8x80GB", "--method", "qlora", "--fsdp", "8", "--format", "json"]


def cold_cli(repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, VRAMPLAN_CACHE=cache)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vramplan.cli", *CMD], env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    return times


def in_process(repeat: int) -> list[float]:
    from vramplan.estimate import estimate_config
    from vramplan.model_spec import load_model_spec
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
    cold = cold_cli(a.repeat)
    warm = in_process(a.repeat)
    print(f"cold CLI `vramplan {' '.join(CMD)}`: median {statistics.median(cold):.3f} s, max {max(cold):.3f} s")
    print(f"in-process estimate (405B, 126 layers, FSDP 8): median {1000 * statistics.median(warm):.1f} ms")


if __name__ == "__main__":
    main()
