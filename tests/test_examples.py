"""Every examples/*.py runs: offline, in a fresh process, on this checkout, with no display.

A script whose first lines contain ``# requires: gpu`` is skipped when no CUDA GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
HEAD_LINES = 5


def _needs_gpu(path: Path) -> bool:
    head = path.read_text().splitlines()[:HEAD_LINES]
    return any(line.strip().lower().replace(" ", "") == "#requires:gpu" for line in head)


def _have_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"estimate_custom_config.py", "compare_2x3090.py", "plot_breakdown.py"} <= names


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    if _needs_gpu(path) and not _have_cuda():
        pytest.skip(f"{path.name} says '# requires: gpu' and no CUDA GPU is available")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{path.name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{path.name} printed nothing"


def test_gpu_marker_is_read_from_the_first_lines(tmp_path):
    marked = tmp_path / "m.py"
    marked.write_text("# requires: gpu\nprint(1)\n")
    plain = tmp_path / "p.py"
    plain.write_text("print(1)\n" * 10 + "# requires: gpu\n")
    assert _needs_gpu(marked) and not _needs_gpu(plain)
