"""Cold `vramplan estimate` for a model given as people give it: a preset, a local folder
holding a copy of a preset's config.json, a Hugging Face id whose config.json is in the
huggingface_hub cache (offline), and an architecture no preset has (meta build, then cached).
Wall and CPU seconds (user + sys of the child): on a shared machine the CPU time is what an
idle one would take. Numbers go to docs/benchmarks.md.

usage: python benchmarks/bench_model_names.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _cold import ROOT

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TAIL = ["--gpus", "rtx-4090", "--method", "lora"]


def run(args: list[str], env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vramplan", *args], env=env, cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cases(tmp: Path) -> dict[str, tuple[str, bool]]:
    """name -> (MODEL, whether the run reuses the previous run's user cache)."""
    from test_config_cli import LLAMA3_8B, fill_hub_cache

    preset = json.loads((ROOT / "vramplan/presets/models/llama-3.1-8b.json").read_text())
    (tmp / "llama-dir").mkdir()
    (tmp / "llama-dir/config.json").write_text(json.dumps(preset))
    (tmp / "unknown").mkdir()
    (tmp / "unknown/config.json").write_text(json.dumps({**preset, "intermediate_size": 14592}))
    fill_hub_cache(tmp / "hub", {"NousResearch/Meta-Llama-3-8B": LLAMA3_8B})
    return {
        "preset llama-3.1-8b": ("llama-3.1-8b", False),
        "local folder, copy of the preset's config.json": (str(tmp / "llama-dir"), False),
        "Hub id NousResearch/Meta-Llama-3-8B (cached config.json, HF_HUB_OFFLINE=1)": (
            "NousResearch/Meta-Llama-3-8B",
            False,
        ),
        "unknown architecture (Llama 3.1 8B, MLP 14592), empty cache: meta build": (str(tmp / "unknown"), False),
        "the same, second run (analysis cached)": (str(tmp / "unknown"), True),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name, (model, warm) in cases(tmp).items():
            walls, cpus = [], []
            for i in range(a.repeat):
                cache = tmp / f"cache-{i}"
                env = dict(
                    os.environ,
                    VRAMPLAN_CACHE=str(cache),
                    PYTHONPATH=str(ROOT),
                    HF_HUB_OFFLINE="1",
                    HF_HUB_CACHE=str(tmp / "hub"),
                )
                if warm:
                    run(["estimate", model, *TAIL], env)  # fills the cache
                else:
                    env["VRAMPLAN_CACHE"] = tempfile.mkdtemp(dir=tmp)
                wall, cpu = run(["estimate", model, *TAIL], env)
                walls.append(wall)
                cpus.append(cpu)
            print(
                f"{name}: wall median {statistics.median(walls):.2f} s (min {min(walls):.2f}), "
                f"CPU median {statistics.median(cpus):.2f} s (min {min(cpus):.2f})"
            )


if __name__ == "__main__":
    main()
