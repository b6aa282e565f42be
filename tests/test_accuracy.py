"""The estimate against measured H100 steps (tests/data/h100_dev.jsonl, see its README).

Tolerance: every case within 5% of the measured torch.cuda.max_memory_allocated().
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramplan.estimate import estimate_config

DATA = Path(__file__).parent / "data"
CASES = [json.loads(l) for l in (DATA / "h100_dev.jsonl").read_text().splitlines() if l.strip()]
OPTIM = {("adamw", False): "adamw_torch", ("adamw8bit", False): "adamw_bnb_8bit",
         ("galore_adamw", False): "galore_adamw", ("galore_adamw8bit", False): "galore_adamw_8bit",
         ("galore_adamw", True): "galore_adamw_layerwise", ("galore_adamw8bit", True): "galore_adamw_8bit_layerwise"}
TOL = 0.05


def _setup(c: dict) -> dict:
    s = dict(method=c["method"], precision="mixed" if c["param_dtype"] == "fp32" else "bf16",
             optim=OPTIM[(c["optim"], bool(c["layerwise"]))], batch_size=c["batch"], seq_len=c["seq"],
             gradient_checkpointing=c["ckpt"])
    if c["method"] in ("lora", "qlora"):
        s.update(lora_r=c["lora_r"], lora_dropout=0.05,
                 lora_targets="all-linear" if c["lora_targets"] == "all" else "attention")
    if c["quant"]:
        s["quant"] = c["quant"]
    if c["method"] == "galore":
        s["galore_rank"] = c["galore_rank"]
    if c["fsdp_world"]:
        s.update(fsdp=c["fsdp_world"], cpu_offload=c["fsdp_offload"])
    return s


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_peak_allocated_within_tolerance(case):
    world = case["fsdp_world"] or 1
    est = estimate_config(str(DATA / "configs" / f"{case['model']}.json"), gpus=f"{world}x80GB",
                          num_layers=case["layers"], **_setup(case))
    measured = case["peak_alloc_mb"] * 2**20
    err = (est.per_gpu.peak_allocated_bytes - measured) / measured
    assert abs(err) <= TOL, f"{case['name']}: predicted {est.per_gpu.peak_allocated_bytes / 2**30:.2f} GiB, " \
                            f"measured {measured / 2**30:.2f} GiB ({100 * err:+.1f}%)"


def test_parameter_count_matches_measured():
    for case in CASES:
        if case["method"] != "full" or case["layers"]:
            continue
        from vramplan.model_spec import load_model_spec
        spec = load_model_spec(str(DATA / "configs" / f"{case['model']}.json"))
        assert spec.params_total == case["params_total"], case["name"]
