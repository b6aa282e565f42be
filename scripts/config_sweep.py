"""Run `vramplan estimate --config FILE` over every YAML under the given folders and summarise:
how many estimate, how many stop with one line (grouped by message), any traceback, and the
keys most often reported unknown or not modelled. Used on the frameworks' own example folders
(docs/configs.md, "The frameworks' examples, swept"):

    python scripts/config_sweep.py AXOLOTL/examples LLAMA_FACTORY/examples TORCHTUNE/recipes/configs

Each file runs in its own folder (the frameworks' relative deepspeed paths resolve from the
repository root, so a few report "not found" here), with HF_HUB_OFFLINE=1: a model id no preset
matches stops with one line instead of downloading its config.json.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
from pathlib import Path


def _run(path: Path, gpus: str) -> tuple[str, int | str, str, str]:
    cmd = [sys.executable, "-m", "vramplan", "estimate", "--config", str(path), "--gpus", gpus, "--format", "json"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=path.parent)
    except subprocess.TimeoutExpired:
        return str(path), "timeout", "", ""
    return str(path), r.returncode, r.stderr, r.stdout


def _config_lines(stdout: str) -> list[str]:
    try:
        return json.loads(stdout).get("config") or []
    except json.JSONDecodeError:
        return []


def summarise(results: list[tuple[str, int | str, str, str]]) -> str:
    outcome: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    keys: dict[str, collections.Counter[str]] = {
        "unknown keys": collections.Counter(),
        "not modelled": collections.Counter(),
    }
    tracebacks = []
    for path, rc, err, out in results:
        if "Traceback" in err:
            tracebacks.append(path)
            outcome["traceback"] += 1
        elif rc == 0:
            outcome["estimated"] += 1
            for line in _config_lines(out):
                head, _, rest = line.partition(":")
                if head == "unknown keys":
                    keys[head].update(k.strip() for k in rest.split(","))
                elif head == "not modelled":
                    keys[head][rest.strip().split(" (")[0]] += 1
        else:
            outcome[f"exit {rc}"] += 1
            last = (err.strip().splitlines() or [""])[-1]
            errors[re.sub(r"'[^']*'|\S+\.ya?ml", "X", last)[:140]] += 1
    lines = [f"{len(results)} files: " + ", ".join(f"{n} {k}" for k, n in outcome.most_common())]
    lines += ["", "stopped with one line:"] + [f"  {n:4d}  {m}" for m, n in errors.most_common(25)]
    for head, counter in keys.items():
        lines += ["", f"{head} (most often):"] + [f"  {n:4d}  {k}" for k, n in counter.most_common(25)]
    lines += ["", f"tracebacks: {len(tracebacks)}"] + [f"  {p}" for p in tracebacks]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--gpus", default="1x80GB")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4)
    args = ap.parse_args()
    files = sorted(p for d in args.folders for p in d.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda p: _run(p, args.gpus), files))
    print(summarise(results))


if __name__ == "__main__":
    main()
