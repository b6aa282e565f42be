"""Wall time of a `vramplan` command in a new process with an empty user cache, so the
preset analysis shipped with the package is all it can reuse. Shared by the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cold_cli(args: list[str], repeat: int) -> list[float]:
    """Seconds per run of `python -m vramplan ARGS` from this checkout."""
    times = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, VRAMPLAN_CACHE=cache, PYTHONPATH=str(ROOT))
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "vramplan", *args], env=env, cwd=ROOT, check=True, capture_output=True
            )
            times.append(time.perf_counter() - t0)
    return times
