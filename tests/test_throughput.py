"""The throughput model against the measured H100 steps, and its terms' directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vramplan import throughput as T
from vramplan.estimate import make_setup
from vramplan.hardware import profiles
from vramplan.measured import load_cases
from vramplan.model_loader import load_model_spec
from vramplan.setup import TrainingSetup

CASES = load_cases(Path(__file__).parent / "data" / "h100_dev.jsonl")
H100 = profiles()["h100-80gb"]
# |estimated tokens/s / measured tokens/s - 1| on every case (docs/throughput.md).
TOLERANCE = 0.30


def _measured_step_s(case) -> float:
    # tokens_per_s in the file is batch * seq / the fastest step after the first (the
    # first holds CUDA/cuBLAS warm-up, optimizer-state creation and GaLore's first SVD)
    steady = min(case.step_s[1:])
    assert case.tokens_per_s == pytest.approx(case.batch * case.seq / steady)
    return steady


def _estimated_step_s(case) -> float:
    spec = load_model_spec(case.model, num_layers=case.layers)
    # the FSDP case ran on one GPU with a fake process group: its collectives move nothing
    t = T.step_time(
        spec, make_setup(**case.setup_fields()), H100, gpus=case.world, collectives=False, amortize_svd=False
    )
    return t.step_s


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tokens_per_s_within_tolerance_of_measured(case):
    tokens = case.batch * case.seq
    measured, estimated = tokens / _measured_step_s(case), tokens / _estimated_step_s(case)
    assert abs(estimated / measured - 1) <= TOLERANCE, f"{case.name}: {estimated:,.0f} vs {measured:,.0f} tokens/s"


def test_mean_error_is_well_inside_the_tolerance():
    errs = [abs(_measured_step_s(c) / _estimated_step_s(c) - 1) for c in CASES]
    assert sum(errs) / len(errs) <= 0.15


def test_shipped_constants_are_the_global_fit():
    """MFU, BW_EFF and LAUNCH_S are one least-squares fit over all cases (none per case)."""
    rows = []
    for c in CASES:
        spec = load_model_spec(c.model, num_layers=c.layers)
        rows.append((*T.raw_terms(spec, make_setup(**c.setup_fields()), H100), _measured_step_s(c)))
    mfu, bw, launch = T.fit_constants(rows)
    assert T.MFU == pytest.approx(mfu, rel=0.03)
    assert T.BW_EFF == pytest.approx(bw, rel=0.03)
    assert T.LAUNCH_S == pytest.approx(launch, rel=0.03)
    assert 0 < T.MFU < 1 and 0 < T.BW_EFF <= 1


def test_fit_recovers_known_constants():
    rng = np.random.default_rng(1)
    truth = (0.5, 0.8, 2e-5)
    rows = []
    for _ in range(12):
        f, b, k = rng.uniform(0.01, 0.2), rng.uniform(0.01, 0.2), rng.uniform(1e3, 1e4)
        rows.append((f, b, k, f / truth[0] + b / truth[1] + k * truth[2]))
    assert T.fit_constants(rows) == pytest.approx(truth, rel=1e-6)


@pytest.fixture(scope="module")
def llama8b():
    return load_model_spec("llama-3.1-8b")


def _tps(spec, prof="rtx-4090", **fields):
    return T.tokens_per_s(spec, TrainingSetup(**fields), profiles()[prof])


def test_directions(llama8b):
    base = dict(method="lora", seq_len=2048, batch_size=2)
    assert _tps(llama8b, **base, gradient_checkpointing=True) < _tps(llama8b, **base)  # recomputation
    assert _tps(llama8b, **{**base, "method": "qlora"}) < _tps(llama8b, **base)  # dequantization
    assert _tps(llama8b, **{**base, "method": "qlora", "quant": "hqq4"}) < _tps(llama8b, **{**base, "method": "qlora"})
    assert _tps(llama8b, **{**base, "batch_size": 8}) > _tps(llama8b, **base)  # fixed costs amortized
    assert _tps(llama8b, "h100-80gb", **base) > _tps(llama8b, **base)  # faster card
    assert _tps(llama8b, **{**base, "seq_len": 8192, "batch_size": 1}) < _tps(
        llama8b, **{**base, "seq_len": 2048, "batch_size": 4}
    )


def test_offload_and_fsdp_cost_time(llama8b):
    prof = profiles()["rtx-4090"]
    s = TrainingSetup(method="qlora", fsdp=2, gradient_checkpointing=True)
    on = T.step_time(llama8b, s.model_copy(update={"cpu_offload": True}), prof, gpus=2)
    off = T.step_time(llama8b, s, prof, gpus=2)
    assert on.host_s > 0 and off.host_s == 0 and on.step_s > off.step_s
    assert off.comm_s > 0
    # across nodes the collectives leave NVLink for the slower inter-node link
    h100 = profiles()["h100-80gb"]
    assert T.step_time(llama8b, s, h100, gpus=2, gpus_per_node=1).comm_s > T.step_time(llama8b, s, h100, gpus=2).comm_s


def test_galore_svd_amortized_over_the_gap(llama8b):
    prof = profiles()["rtx-4090"]
    s = TrainingSetup(method="galore", optim="galore_adamw_8bit_layerwise", galore_update_proj_gap=100)
    amort = T.step_time(llama8b, s, prof)
    steady = T.step_time(llama8b, s, prof, amortize_svd=False)
    assert amort.step_s - steady.step_s == pytest.approx(T.svd_seconds(T.shapes(llama8b), prof) / 100)


def test_loss_kernels_and_activation_offload_cost_what_their_source_says(llama8b):
    """Fused losses skip the fp32 logits' traffic; Cut Cross-Entropy pays a recomputed
    logits matmul instead; offloaded checkpoints cross the host link twice, serially for
    transformers' save_on_cpu and behind compute for OffloadActivations."""
    prof = profiles()["rtx-4090"]
    base = TrainingSetup(method="qlora", seq_len=4096, batch_size=2, gradient_checkpointing=True)

    def step(**kw):
        return T.step_time(llama8b, base.model_copy(update=kw), prof)

    hf, liger, cce = step(), step(loss="liger"), step(loss="cce")
    assert liger.memory_s < hf.memory_s and cce.memory_s < liger.memory_s
    assert cce.compute_s > hf.compute_s == liger.compute_s
    ckpt_off = step(activation_offload="checkpoints")
    moved = 2 * base.tokens * 2 * llama8b.hidden * len(llama8b.layers) / (prof.host_link_gbps * 1e9)
    assert ckpt_off.host_s - hf.host_s == pytest.approx(moved)
    assert step(activation_offload="all").step_s == pytest.approx(hf.step_s)  # hidden behind compute
