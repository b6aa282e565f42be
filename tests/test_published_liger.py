"""The estimate against Liger-Kernel's README figure "Peak Reserved Memory (MB)": LLaMA 3-8B,
batch 8, bf16, AdamW, gradient checkpointing, FSDP1 on 8 A100s, Hugging Face's layers and loss
against Liger's (tests/data/published/liger_readme_e2e.jsonl; docs/published.md, "Liger-Kernel's
README figure").

The run stands for the HF Trainer's (`--stack hf-trainer`: accelerate >= 0.30 upcasts FSDP1's
bf16 flat parameters to fp32 under `--bf16`, so `--precision mixed`), Liger as its August 2024
README ran it at 16K tokens: the fused linear cross-entropy (the non-fused CE, its default then,
would hold 8 x 16384 x 128256 logits) with its RMSNorm, SwiGLU and RoPE (`--loss liger
--liger-layers all`). Held, each within 12% (the figure's "MB" may be 10^6 or 2^20 bytes, 4.9%
apart; ±0.4 GB read off the pixels; the libraries of August 2024): the two published Hugging
Face bars and the Liger bars from 8K tokens up, where the step's activations (the rules this
checks) are most of the peak; below 8K the bar is mostly the step's static part (fp32 shards,
grads, AdamW and its foreach step on FSDP1), whose 2024 versions are not known, and the rows
are listed in docs/published.md, not held. The verdicts are held at every length but Hugging
Face's 4K, which published as OOM with transformers 4.43's loss (two more fp32 copies of the
logits: `logits.float()` and the shifted `.contiguous()`), not modelled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramplan.estimate import estimate_spec, make_setup, resolve_gpus
from vramplan.model_loader import load_model_spec

DATA = Path(__file__).parent / "data" / "published" / "liger_readme_e2e.jsonl"
ROWS = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
TOLERANCE = 0.12
HELD_LIGER_FROM = 8192
KERNELS = {"hf": {}, "liger": {"loss": "liger", "liger_layers": "all"}}


@pytest.fixture(scope="module")
def predicted():
    spec = load_model_spec("llama-3-8b")
    gpus = resolve_gpus("8xa100-80gb", reserve=0)
    out = {}
    for r in ROWS:
        setup = make_setup(
            method="full",
            fsdp=8,
            fsdp_version=1,
            batch_size=8,
            seq_len=r["seq_len"],
            gradient_checkpointing=True,
            precision="mixed",
            optim="adamw_torch",
            stack="hf-trainer",
            **KERNELS[r["kernels"]],
        )
        out[(r["kernels"], r["seq_len"])] = estimate_spec(spec, setup, gpus)
    return out


def test_every_bar_is_committed_with_its_source():
    assert sorted((r["kernels"], r["seq_len"]) for r in ROWS) == sorted(
        (k, s) for k in KERNELS for s in (1024, 2048, 4096, 8192, 16384)
    )
    for r in ROWS:
        assert r["source"].startswith("linkedin/Liger-Kernel@e85611c9 docs/images/e2e-memory.png")
    assert [r["seq_len"] for r in ROWS if r["published_reserved_mb"] is None] == [4096, 8192, 16384]


def test_the_verdicts(predicted):
    for r in ROWS:
        key = (r["kernels"], r["seq_len"])
        if key == ("hf", 4096):
            continue  # transformers 4.43's loss, not modelled (module docstring)
        assert predicted[key].fits == (r["published_reserved_mb"] is not None), key


def test_held_bars_within_tolerance(predicted):
    held = [
        r
        for r in ROWS
        if r["published_reserved_mb"] is not None and (r["kernels"] == "hf" or r["seq_len"] >= HELD_LIGER_FROM)
    ]
    assert len(held) == 4
    for r in held:
        ours = predicted[(r["kernels"], r["seq_len"])].per_gpu.peak_reserved_bytes / 1e6
        error = ours / r["published_reserved_mb"] - 1
        assert abs(error) <= TOLERANCE, (r["kernels"], r["seq_len"], f"{error:+.1%}")
