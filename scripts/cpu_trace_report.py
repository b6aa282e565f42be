"""Trace the reference step on the CPU for a matrix of small configurations and write
traced-vs-model bytes per phase as JSON lines (tests/data/cpu/trace.jsonl by default).

usage: python scripts/cpu_trace_report.py [-o FILE]
Groups: "structure" (the cases tests/test_cpu_trace.py holds to 1.5%), "layer-backward"
(a 64-token vocabulary, so a decoder layer's backward is the peak: the phase the H100
calibration never pins), "build" (hqq QLoRA whose peak is quantizing the largest Linear)
"dequantize" (hqq QLoRA whose peak is a 4-bit Linear dequantized for a matmul) and
"long-context" (16k tokens on two layers, a 64-token vocabulary).
Comparison rules as in tests/test_cpu_trace.py; hqq rows also compare the build's peak.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_cpu_trace import (B2S256, BUILD_CASES, CASES, DEQ_CASES, LAYER_ARCH_CASES, LLAMA, LONG,  # noqa: E402
                            LONG_SHAPE, WIDE, _build_compared, _model_build_peak, _model_phases)

from vramplan.estimate import make_setup  # noqa: E402
from vramplan.model_spec import load_model_spec  # noqa: E402
from vramplan.verify.cputrace import trace_step  # noqa: E402

TINY_VOCAB = {f"v64-h{h}-f{f}": dict(LLAMA, vocab_size=64, hidden_size=h, intermediate_size=f, num_hidden_layers=4)
              for h, f in ((256, 1024), (256, 2048), (512, 1024))}
LAYER_SETUPS = {"full": dict(method="full"), "full-ckpt": dict(method="full", gradient_checkpointing=True),
                "lora": dict(method="lora"), "lora-ckpt": dict(method="lora", gradient_checkpointing=True),
                "fsdp2-ckpt": dict(method="full", fsdp=2, gradient_checkpointing=True),
                "galore-lw-ckpt": dict(method="galore", galore_rank=32, optim="galore_adamw_layerwise",
                                       gradient_checkpointing=True)}

LONG_SETUPS = {"full": dict(method="full"), "full-ckpt": dict(method="full", gradient_checkpointing=True),
               "lora": dict(method="lora"),
               "qlora-hqq4-ckpt": dict(method="qlora", quant="hqq4", gradient_checkpointing=True)}


def run(group: str, name: str, cfg: dict, fields: dict, shape: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        setup = make_setup(**{**shape, **fields})
        spec = load_model_spec(d, use_cache=False)
        traced = trace_step(d, setup)
        model = _model_phases(spec, setup)
        if _build_compared(setup):
            model["build"] = _model_build_peak(spec, setup)
    row = {"group": group, "name": name, "config": cfg, "setup": setup.model_dump(mode="json")}
    for phase, predicted in model.items():
        t = traced.peak(phase, step=1 if phase != "build" else None)
        row[phase] = {"traced_bytes": t, "model_bytes": predicted, "error": round((predicted - t) / t, 4)}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=str(ROOT / "tests" / "data" / "cpu" / "trace.jsonl"))
    args = ap.parse_args()
    jobs = [("structure", n, cfg, f, B2S256) for n, (cfg, f) in CASES.items()]
    jobs += [("layer-backward", f"{m}/{s}", cfg, f, dict(batch_size=2, seq_len=512, lora_dropout=0.0))
             for m, cfg in TINY_VOCAB.items() for s, f in LAYER_SETUPS.items()]
    v64 = dict(batch_size=2, seq_len=512, lora_dropout=0.0)
    jobs += [("layer-backward", n, cfg, f, v64) for n, (cfg, f) in LAYER_ARCH_CASES.items()]
    short = dict(batch_size=1, seq_len=64, lora_dropout=0.0)
    jobs += [("build", n, WIDE, f, short) for n, f in BUILD_CASES.items()]
    jobs += [("dequantize", n, dict(WIDE, vocab_size=1024), f, short) for n, f in DEQ_CASES.items()]
    jobs += [("long-context", f"16k/{n}", LONG, f, LONG_SHAPE) for n, f in LONG_SETUPS.items()]
    with open(args.output, "w") as out:
        for job in jobs:
            row = run(*job)
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(row["group"], row["name"], {p: row[p]["error"] for p in ("forward", "backward", "optimizer") if p in row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
