"""ORPO and SimPO (--objective orpo, memory/orpo.py): axolotl's rl: orpo / rl: simpo over trl==1.9.0's
experimental ORPOTrainer and CPOTrainer, against sums done by hand from their source; the CPU trace
of the real step is tests/test_cpu_trace.py's "preference" group (ax-orpo-*, ax-simpo-*)."""

from __future__ import annotations

import pytest

from vramplan.configs.combine import read_config
from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory.loss import loss_terms, outside_forward
from vramplan.memory.preference import reference_copy, reference_forward
from vramplan.model_loader import load_model_spec
from vramplan.setup import Objective

SPEC = load_model_spec("llama-3.1-8b", num_layers=4)


def _orpo(**kw):
    return make_setup(stack="axolotl", objective="orpo", **kw)


def test_the_head_by_hand():
    """2 pairs x 1024 (4 rows), V 128256: the fp32 logits with the NLL's contiguous copy of the
    chosen rows' shifted logits and its log-softmax (4 + 4 + 4 bytes per logit); backward 4 per
    logit, 8 per shifted logit and the NLL's saved log-softmax."""
    setup = _orpo(method="lora", batch_size=2, seq_len=1024)
    v, n, shifted, chosen = SPEC.vocab, 4 * 1024, 4 * 1023, 2 * 1023
    assert setup.rows == 4
    terms = loss_terms(SPEC, setup)
    assert terms.forward == 4 * n * v + 8 * chosen * v
    assert terms.backward == 4 * n * v + 8 * shifted * v + 4 * chosen * v
    simpo = loss_terms(SPEC, _orpo(method="lora", batch_size=2, seq_len=1024, chosen_nll=False))
    assert simpo.forward == 6 * n * v  # the conversion: no NLL copy
    assert simpo.backward == terms.backward - 4 * chosen * v


def test_no_reference_and_the_loss_after_autocast():
    setup = _orpo(method="full", batch_size=1)
    assert not reference_forward(setup) and not reference_copy(setup)
    assert outside_forward(setup)


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        (dict(objective="orpo", stack="trl"), "--objective"),
        (dict(objective="orpo", stack="axolotl", fp32_outputs=False), "--objective"),
        (dict(objective="orpo", stack="axolotl", packing="position-ids"), "--packing"),
        (dict(objective="dpo", stack="trl", chosen_nll=False), "--no-chosen-nll"),
    ],
)
def test_what_orpo_refuses_names_the_flag(fields, flag):
    with pytest.raises(VramplanError) as e:
        make_setup(**fields)
    assert e.value.flag == flag


def test_axolotls_orpo_and_simpo_files(tmp_path):
    """axolotl==0.19.0 examples/mistral/orpo/mistral-qlora-orpo.yml's memory keys; rl: simpo with
    cpo_alpha 0 runs without the NLL."""
    path = tmp_path / "orpo.yml"
    body = (
        "base_model: mistralai/Mistral-7B-v0.1\nload_in_4bit: true\nadapter: qlora\nlora_target_linear: true\n"
        "sequence_len: 4096\nmicro_batch_size: 2\nbf16: auto\ngradient_checkpointing: true\nsample_packing: false\n"
    )
    path.write_text(body + "rl: orpo\norpo_alpha: 0.1\n")
    reading = read_config([str(path)])
    setup = make_setup(**{**reading.fields, "stack": "axolotl"})
    assert setup.objective == Objective.ORPO and setup.chosen_nll and setup.rows == 4 and not setup.lora_kernels
    assert not reading.unmodelled and not reading.unknown
    path.write_text(body + "rl: simpo\ncpo_alpha: 0\nsimpo_gamma: 0.5\n")
    setup = make_setup(**{**read_config([str(path)]).fields, "stack": "axolotl"})
    assert setup.objective == Objective.ORPO and not setup.chosen_nll
    path.write_text(body + "rl: simpo\ncpo_alpha: lots\n")
    with pytest.raises(VramplanError) as e:
        read_config([str(path)])
    assert e.value.flag.endswith("cpo_alpha")


@pytest.mark.parametrize(
    ("fmt", "fields", "lines"),
    [
        (
            "axolotl",
            dict(objective="dpo", precompute_ref_log_probs=True),
            ["rl: dpo", "precompute_ref_log_probs: true"],
        ),
        ("axolotl", dict(objective="kto"), ["rl: kto"]),
        ("axolotl", dict(objective="orpo"), ["rl: orpo"]),
        ("axolotl", dict(objective="orpo", chosen_nll=False), ["rl: simpo", "cpo_alpha: 0.0"]),
        ("llamafactory", dict(objective="dpo"), ["stage: dpo", "pref_loss: sigmoid"]),
        ("llamafactory", dict(objective="dpo", precompute_ref_log_probs=True), ["stage: dpo", "pref_loss: simpo"]),
        ("llamafactory", dict(objective="kto"), ["stage: kto"]),
    ],
)
def test_emit_writes_the_frameworks_preference_trainers_and_reads_them_back(fmt, fields, lines):
    """--emit axolotl / llamafactory for their own DPO, KTO, ORPO and SimPO steps: the file's rl or
    stage key, checked by reading the file back into the same step (emit's round trip)."""
    from vramplan.configs.emit import emit

    setup = make_setup(stack=fmt, method="lora", batch_size=2, seq_len=1024, **fields)
    text = emit(fmt, setup, "meta-llama/Llama-3.2-1B", {})
    assert all(line in text.splitlines() for line in lines)
