"""The memory model of an earlier commit next to the committed CPU trace: the "before" of a
before/after figure, without tracing again (the traced bytes are deterministic).

usage: python scripts/cpu_trace_before.py COMMIT -o FILE [--match TEXT ...]

Checks COMMIT out into a temporary git worktree, imports that commit's vramplan and its
tests/test_cpu_trace.py comparison rules, and writes for every row of
tests/data/cpu/trace.jsonl (or only the rows whose name contains one of --match) the traced
bytes next to that model's bytes, as JSON lines shaped like trace.jsonl's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r"""
import json, sys, tempfile
from pathlib import Path
tree, rows_path, out_path = sys.argv[1:4]
sys.path[:0] = [tree, tree + "/tests"]
import vramplan
assert vramplan.__file__.startswith(tree), vramplan.__file__
from test_cpu_trace import _model_phases
from vramplan.estimate import make_setup
from vramplan.model_loader import load_model_spec
out = []
for r in map(json.loads, Path(rows_path).read_text().splitlines()):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(r["config"]))
        model = _model_phases(load_model_spec(d, use_cache=False), make_setup(**r["setup"]))
    row = {k: r[k] for k in ("group", "name", "config", "setup")}
    for phase, b in model.items():
        t = r[phase]["traced_bytes"]
        row[phase] = {"traced_bytes": t, "model_bytes": b, "error": round((b - t) / t, 4)}
    out.append(json.dumps(row))
Path(out_path).write_text("".join(line + "\n" for line in out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("commit")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--match", nargs="+", help="only rows whose name contains one of these")
    args = ap.parse_args()
    rows = (ROOT / "tests" / "data" / "cpu" / "trace.jsonl").read_text().splitlines()
    if args.match:
        rows = [r for r in rows if any(m in json.loads(r)["name"] for m in args.match)]
    with tempfile.TemporaryDirectory() as tmp:
        tree = str(Path(tmp) / "tree")
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", tree, args.commit], check=True)
        try:
            (Path(tmp) / "rows.jsonl").write_text("".join(r + "\n" for r in rows))
            # a fresh interpreter, run from outside the checkout, so only that commit's code is imported
            subprocess.run(
                [sys.executable, "-c", _WORKER, tree, str(Path(tmp) / "rows.jsonl"), str(Path(args.output).resolve())],
                check=True,
                cwd=tmp,
            )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tree], check=True)
    for line in Path(args.output).read_text().splitlines():
        r = json.loads(line)
        print(r["group"], r["name"], {p: r[p]["error"] for p in ("forward", "backward", "optimizer") if p in r})
    return 0


if __name__ == "__main__":
    sys.exit(main())
