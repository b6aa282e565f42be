# requires: gpu
"""Verify one small configuration through the Python API: run the reference step on this
GPU and print the estimate next to the measurement, per category."""

import sys

import torch

from vramplan.estimate import make_setup
from vramplan.verify import verify
from vramplan.verify.compare import render


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this example runs the real training step and needs one; skipping")
        return 0
    setup = make_setup(method="lora", lora_r=16, gradient_checkpointing=True, batch_size=2, seq_len=2048)
    report = verify("llama-3.2-1b", setup)
    for m, c in zip(report.result, report.comparisons, strict=False):
        render(c, m)
    folder = report.write("vramplan-verify/example")
    print(f"report written to {folder}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
