"""The loss over the vocabulary (--loss, --fp32-outputs, --keep-logits): each rule against
the bytes read off its library's source (docs/memory-model.md, "The loss over the
vocabulary"), worked out here by hand, not by the code under test."""

from __future__ import annotations

import pytest

from vramplan.categories import Category as C
from vramplan.errors import VramplanError
from vramplan.estimate import estimate_config, make_setup
from vramplan.memory import PhaseKind, step_model
from vramplan.memory.loss import liger_chunk_rows, loss_terms, unsloth_chunk_rows
from vramplan.model_loader import load_model_spec

GiB = 2**30
QW05 = "qwen2.5-0.5b"  # h 896, V 151936


@pytest.fixture(scope="module")
def spec():
    return load_model_spec(QW05)


def _phase(model, kind):
    return next(p for p in model.phases if p.kind == kind)


def test_liger_chunk_rows_from_its_source():
    # ops/fused_linear_cross_entropy.py:99-106: inc = cdiv(V, h); next_pow2(cdiv(N, inc))
    assert liger_chunk_rows(4096, 128256, 4096) == 128  # inc 32, 128
    assert liger_chunk_rows(8192, 152064, 3584) == 256  # inc 43, 191 -> 256
    assert liger_chunk_rows(100, 152064, 3584) == 4  # inc 43, cdiv(100, 43) = 3 -> 4
    assert liger_chunk_rows(3, 1000, 4096) == 3  # inc 1: next_pow2(3) = 4, capped at N


def test_unsloth_chunk_rows_from_fused_linear_rows():
    # fused_linear.py:140-154 with 4-byte logits and the 2 GiB budget:
    # Qwen2.5-7B, 8191 kept rows: 8191*3584/152064 = 193 -> 128; the floor 512*151936/152064
    # = 511.6 -> 256, raised to 512; the budget allows 2^31/(152064*4) = 3530 rows
    assert unsloth_chunk_rows(8191, 3584, 152064) == 512
    # Llama-3.1-8B at 78,474 kept rows: 78474*4096/128256 = 2506 -> 2048
    assert unsloth_chunk_rows(78474, 4096, 128256) == 2048
    # a 256k vocabulary: 2^31/(256000*4) = 2097 rows at most, though 4096 would be the cap
    assert unsloth_chunk_rows(1 << 20, 4096, 256000) == 2097
    assert unsloth_chunk_rows(100, 4096, 128256) == 100  # never more rows than kept


def test_unsloth_frozen_head_streams_fp32_tiles(spec):
    # Qwen2.5-0.5B LoRA, 2 x 4096 tokens (8190 kept rows >= 4096: `_tiled_forward`):
    # forward = the final norm's output + the saved hidden grad (N*h bf16 each) + the kept
    # mask and index (N + 8*keep), lp and lse (8*keep) + one tile: 4096 x 16384 fp32, the fp32
    # [4096, h] accumulator, m_run, part [8, 10, 4096] fp32, the gathered rows [4096, h] bf16
    n, h, keep = 8192, spec.hidden, 8190  # V 151936: ceil(V/16384) = 10 splits
    tile = 4096 * 16384 * 4 + 4096 * h * 4 + 4 * 4096 + 32 * 10 * 4096 + 4096 * h * 2
    t = loss_terms(spec, make_setup(method="lora", batch_size=2, seq_len=4096, loss="unsloth"))
    assert t.forward == 2 * n * h * 2 + n + 16 * keep + tile
    assert t.backward == 2 * n * h * 2


def test_unsloth_trained_head_takes_the_chunked_buffer(spec):
    # full fine-tune (lm_head trains), 2 x 1024: 2046 kept rows -> fused_linear_rows 512
    # (2046*896/151936 = 12 -> 8, raised to the 256->512 floor); one [512, ceil8(V)] fp32
    # buffer, the gathered rows (bf16), the chunk's hidden grad fp32 and its bf16 cast; the
    # hidden grad and lm_head's V*h bf16 grad saved, twice in backward
    n, h, v, keep = 2048, spec.hidden, spec.vocab, 2046
    held = n * h * 2 + v * h * 2
    chunk = 512 * 151936 * 4 + 512 * h * 2 + 512 * h * 6
    t = loss_terms(spec, make_setup(method="full", batch_size=2, seq_len=1024, loss="unsloth"))
    assert t.forward == n * h * 2 + held + n + 16 * keep + chunk
    assert t.backward == 2 * held


def test_hf_loss_is_the_reference_step(spec):
    n, v = 2048, spec.vocab
    t = loss_terms(spec, make_setup(method="lora"))
    assert (t.forward, t.backward, t.kept) == (10 * n * v, 14 * n * v, 0)


def test_chunked_is_torchtunes_eight_chunks(spec):
    # 2x256 tokens, 8 chunks of 2x32: bf16 logits 2NV + all log-softmaxes 4NV + the last
    # chunk's fp32 copy; backward: log-softmaxes + one chunk's grad in and out (fp32)
    n, v, chunk = 512, spec.vocab, 64
    t = loss_terms(spec, make_setup(method="lora", batch_size=2, seq_len=256, loss="chunked"))
    assert t.forward == 2 * n * v + 4 * n * v + 4 * chunk * v
    assert t.backward == 4 * n * v + 8 * chunk * v


def test_compiled_chunked_keeps_the_bf16_chunks_not_the_log_softmaxes(spec):
    # inductor's partition of F.cross_entropy(x.float(), y) (torchtune compile_loss): each
    # chunk's graph saves its bf16 input and 2 fp32 values per row; backward writes one
    # chunk's bf16 grad while the saved chunks are alive
    n, v, chunk = 512, spec.vocab, 64
    t = loss_terms(spec, make_setup(method="lora", batch_size=2, seq_len=256, loss="chunked", compile=True))
    assert t.forward == 2 * n * v + 8 * n
    assert t.backward == 2 * n * v + 8 * n + 2 * chunk * v
    eager = loss_terms(spec, make_setup(method="lora", loss="hf"))
    assert loss_terms(spec, make_setup(method="lora", loss="hf", compile=True)) == eager  # only chunked compiles


def test_chunked_full_sums_lm_heads_chunk_grads_out_of_place(spec):
    # Qwen2.5-0.5B ties lm_head to the embedding; full: V*h bf16 weight grads, the first, the
    # second and their sum, with 6 of the 8 bf16 chunk grads not yet consumed
    h, v, chunk = spec.hidden, spec.vocab, 64  # 2x256 tokens: 8 chunks of 2x32
    t = loss_terms(spec, make_setup(method="full", batch_size=2, seq_len=256, loss="chunked", compile=True))
    assert t.backward == 3 * v * h * 2 + 6 * chunk * v * 2


def test_liger_lora_holds_no_logits(spec):
    n, h, v = 2048, spec.hidden, spec.vocab
    rows = liger_chunk_rows(n, v, h)
    t = loss_terms(spec, make_setup(method="lora", loss="liger"))
    # input + grad_input bf16, one bf16 chunk of logits, loss_1d fp32 + mask
    assert t.forward == 2 * n * h * 2 + rows * v * 2 + 5 * n
    assert t.backward == n * h * 2


def test_liger_full_holds_the_weight_grad_in_its_dtype(spec):
    n, h, v = 2048, spec.hidden, spec.vocab
    t = loss_terms(spec, make_setup(method="full", loss="liger"))
    assert t.backward == n * h * 2 + v * h * 2


def test_trl_fused_head_weight_grad_is_fp32_then_cast(spec):
    h, v, rows = spec.hidden, spec.vocab, 2047  # the labelled rows: the last position has no next token
    lora = loss_terms(spec, make_setup(method="lora", loss="trl-chunked-nll"))
    full = loss_terms(spec, make_setup(method="full", loss="trl-chunked-nll"))
    assert full.backward - lora.backward == v * h * (4 + 2)
    # saved h_sel + 16 B/row, the fp32 grad and its bf16 cast, the 2047 x 32768 bf16 tile buffer
    # (32768 columns whatever the vocabulary), grad_logprobs fp32
    assert lora.backward == rows * h * 2 + 16 * rows + rows * h * 6 + rows * 32768 * 2 + 4 * rows


def test_cce_holds_no_vocabulary_sized_tensor_per_token(spec):
    n, h, v = 2048, spec.hidden, spec.vocab
    t = loss_terms(spec, make_setup(method="lora", loss="cce"))
    assert t.backward == n * h * 2 + 20 * n + 4 * v + n * h * 2 + 12 * v


def test_fused_loss_removes_the_lm_head_input_from_the_activations(spec):
    # lm_head's Linear saves its input (bf16 N*h) when it trains; a fused loss saves its own
    hf = step_model(spec, make_setup(method="full"))
    liger = step_model(spec, make_setup(method="full", loss="liger"))
    acts = [_phase(m, PhaseKind.OPTIMIZER_STEP).parts.get(C.ACTIVATIONS, 0) for m in (hf, liger)]
    assert acts[0] == acts[1]
    fwd = [_phase(m, PhaseKind.FORWARD_LOSS).parts[C.ACTIVATIONS] for m in (hf, liger)]
    assert fwd[0] - fwd[1] == 2048 * spec.hidden * 2


def test_fp32_outputs_never_raises_the_hf_loss_peak_of_a_loop_that_keeps_only_the_loss(spec):
    base = step_model(spec, make_setup(method="lora", stack="hf-trainer"))
    conv = step_model(spec, make_setup(method="lora", stack="hf-trainer", fp32_outputs=True))
    assert [p.allocated for p in base.phases] == [p.allocated for p in conv.phases]


def test_the_reference_loop_holds_its_output_through_the_loss_backward(spec):
    """H200 against the H100 reference, same libraries: verify's loop, which keeps only the loss as
    the Trainer does, held 2·N·V less at the loss backward (tests/data/h200_verify.jsonl)."""
    n, v = 2048, spec.vocab
    plain = loss_terms(spec, make_setup(method="lora"))
    trainer = loss_terms(spec, make_setup(method="lora", stack="hf-trainer"))
    assert plain.backward - trainer.backward == 2 * n * v
    assert plain.forward == trainer.forward and plain.kept == trainer.kept == 0


def test_fp32_outputs_is_the_chunked_losss_forward_peak(spec):
    # the bf16 logits 2NV + the saved log-softmaxes 4NV + accelerate's fp32 copy 4NV
    n, v = 512, spec.vocab
    t = loss_terms(spec, make_setup(method="lora", batch_size=2, seq_len=256, loss="chunked", fp32_outputs=True))
    assert t.forward == 10 * n * v


@pytest.mark.parametrize("fp32,per_logit", [(False, 2), (True, 4)])
def test_keep_logits_holds_them_through_the_optimizer_step(spec, fp32, per_logit):
    base = step_model(spec, make_setup(method="lora", stack="hf-trainer"))
    kept = step_model(spec, make_setup(method="lora", stack="hf-trainer", keep_logits=True, fp32_outputs=fp32))
    for kind in (PhaseKind.OPTIMIZER_STEP, PhaseKind.LOSS_BACKWARD, PhaseKind.FORWARD_LOSS):
        assert _phase(kept, kind).allocated - _phase(base, kind).allocated == per_logit * 2048 * spec.vocab
    # the reference loop holds its output through the loss backward anyway, kept or not
    ref = step_model(spec, make_setup(method="lora", fp32_outputs=fp32))
    ref_kept = step_model(spec, make_setup(method="lora", keep_logits=True, fp32_outputs=fp32))
    assert _phase(ref_kept, PhaseKind.LOSS_BACKWARD).allocated == _phase(ref, PhaseKind.LOSS_BACKWARD).allocated


def test_keep_logits_keeps_nothing_under_a_fused_loss(spec):
    assert loss_terms(spec, make_setup(method="lora", loss="liger", keep_logits=True)).kept == 0


def test_cce_refuses_fp32_weights():
    with pytest.raises(VramplanError, match="--loss.*--precision mixed"):
        make_setup(method="lora", loss="cce", precision="mixed")
    make_setup(method="lora", loss="cce")  # bf16: fine
    make_setup(method="full", loss="cce", precision="mixed", fsdp=2)  # FSDP2 gathers bf16


@pytest.mark.parametrize("loss", ["trl-chunked-nll", "liger", "cce"])
def test_fused_head_refuses_a_lora_lm_head(loss):
    with pytest.raises(VramplanError, match="--lora-targets"):
        make_setup(method="lora", loss=loss, lora_target_modules=("q_proj", "lm_head"))


@pytest.mark.parametrize("loss,measured", [("liger", True), ("cce", True), ("unsloth", False)])
def test_cuda_only_kernels_say_what_they_rest_on(loss, measured):
    """Liger and CCE were measured on the H200 (tests/data/h200_verify.jsonl); Unsloth's loss not yet."""
    notes = step_model(load_model_spec(QW05), make_setup(method="lora", loss=loss)).notes
    assert any("modelled from source, not measured" in n for n in notes) is not measured
    assert any("h200_verify.jsonl" in n for n in notes) is measured


def test_issue_bar_qwen7b_8k_qlora_fits_a_3090_with_liger():
    common = dict(method="qlora", seq_len=8192, gradient_checkpointing=True)
    hf = estimate_config("qwen2.5-7b", "rtx-3090", **common)
    liger = estimate_config("qwen2.5-7b", "rtx-3090", loss="liger", **common)
    assert not hf.fits and liger.fits
    assert any("use_liger_kernel: true" in n and "CutCrossEntropyPlugin" in n and "[" not in n for n in hf.notes)
    assert not any("use_liger_kernel" in n for n in liger.notes)
    terms = loss_terms(load_model_spec("qwen2.5-7b"), make_setup(loss="liger", **common))
    assert max(terms.forward, terms.backward) < GiB


@pytest.mark.parametrize("loss", ["liger", "cce", "unsloth"])
def test_verify_refuses_a_triton_loss_off_cuda(loss):
    from vramplan.verify.losses import check_device

    with pytest.raises(VramplanError, match="--loss.*cuda"):
        check_device(make_setup(loss=loss).loss, "cpu")
    check_device(make_setup(loss="chunked").loss, "cpu")


def test_a_measured_loss_case_reads_back_its_loss():
    """A calibration line of a --loss case is compared with that loss's estimate, not hf's."""
    from vramplan.measured import MeasuredCase
    from vramplan.verify.results import Measurement

    setup = make_setup(method="lora", batch_size=2, seq_len=64, loss="chunked", fp32_outputs=True, keep_logits=True)
    m = Measurement(
        model="llama-3.2-1b",
        num_layers=16,
        full_layers=16,
        setup=setup,
        device="cuda",
        steps=3,
        fits=True,
        peak_allocated_bytes=3 * 2**30,
        breakdown={C.WEIGHTS: 2**30},
    )
    line = MeasuredCase.model_validate_json(m.to_measured_case().model_dump_json())
    assert make_setup(**line.setup_fields()) == setup


def test_a_fused_loss_leaves_no_autocast_copy_of_lm_head(spec):
    # full fine-tune under bf16 autocast: the hf loss's lm_head keeps its bf16 input (N*h*2) and
    # autocast caches a bf16 copy of its fp32 weight (V*h*2); a fused loss casts views, never cached
    hf = step_model(spec, make_setup(method="full", precision="mixed"))
    liger = step_model(spec, make_setup(method="full", precision="mixed", loss="liger"))
    acts = [_phase(m, PhaseKind.FORWARD_LOSS).parts[C.ACTIVATIONS] for m in (hf, liger)]
    assert acts[0] - acts[1] == 2048 * spec.hidden * 2 + spec.vocab * spec.hidden * 2


def test_the_strategy_comparison_shows_what_a_fused_loss_makes_fit():
    from vramplan.hardware import parse_gpus
    from vramplan.strategies import compare

    rows = compare(load_model_spec("qwen2.5-7b"), parse_gpus("rtx-3090"), dict(seq_len=8192))
    labels = {r.label: r for r in rows}
    assert not labels["QLoRA nf4 + ckpt"].estimate.fits
    fused = labels["QLoRA nf4 + ckpt + fused CE"]
    assert fused.estimate.fits and fused.estimate.setup.loss.value == "liger" and "use_liger_kernel" in fused.reason
    # a loss the user chose is kept: no fused variants then
    assert not any(
        "fused CE" in r.label
        for r in compare(load_model_spec("qwen2.5-7b"), parse_gpus("rtx-3090"), dict(seq_len=8192, loss="hf"))
    )
