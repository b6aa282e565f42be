"""Reward models (--objective reward, memory/reward.py) against sums done by hand from
trl==1.16.0's and transformers==5.25.0's source; the CPU trace of the real step is
tests/test_cpu_trace.py's "reward" group."""

from __future__ import annotations

import pytest

from vramplan.categories import Category as C
from vramplan.configs.combine import read_config
from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory import PhaseKind, step_model
from vramplan.memory.parameters import parameters
from vramplan.model_loader import load_model_spec
from vramplan.setup import Loss, Objective, Packing

# Llama 3.1 8B: untied, a 128,256-entry vocabulary over 4,096 hidden
SPEC = load_model_spec("llama-3.1-8b", num_layers=4)
TIED = load_model_spec("llama-3.2-1b", num_layers=2)
VOCAB, HIDDEN = 128256, 4096


def _reward(**kw):
    return make_setup(stack="trl", objective="reward", **kw)


def _at(setup, spec=SPEC) -> dict[PhaseKind, dict[C, int]]:
    return {p.kind: dict(p.parts) for p in step_model(spec, setup).phases if p.kind is not PhaseKind.LAYER_BACKWARD}


def test_a_pair_is_two_rows():
    assert _reward(method="lora", batch_size=3, seq_len=1024).tokens == 2 * 3 * 1024


def test_the_sequence_classifier_has_a_score_head_not_lm_head():
    """AutoModelForSequenceClassification(num_labels=1): no [V, H] lm_head, a [1, H] score in its
    place; the embedding (a lookup) stays."""
    numels = [p.numel for p in parameters(SPEC, _reward(method="full")) if p.layer is None]
    assert VOCAB * HIDDEN in numels  # the embedding
    assert numels.count(VOCAB * HIDDEN) == 1  # and no lm_head
    assert HIDDEN in numels  # the score head
    sft = [p.numel for p in parameters(SPEC, make_setup(stack="trl", method="full")) if p.layer is None]
    assert sft.count(VOCAB * HIDDEN) == 2


def test_peft_trains_the_score_as_a_modules_to_save_copy():
    """peft's SEQ_CLS task: a frozen original and a trained copy, hidden x 1 each."""
    heads = [p for p in parameters(SPEC, _reward(method="lora")) if p.layer is None and p.dim0 == 1]
    assert sorted(p.trainable for p in heads) == [False, True]


def test_a_full_fine_tune_drops_lm_heads_weights_gradients_and_adam_states():
    """TRL loads fp32 weights (reward_trainer.py:255-263): an untied 8B's lm_head is 128,256 x 4,096
    fp32 of weights, as much of gradients and twice that of AdamW states; the score adds 4,096 of each."""
    setup = dict(method="full", batch_size=1, seq_len=512)
    sft, reward = _at(make_setup(stack="trl", **setup)), _at(_reward(**setup))
    step = PhaseKind.OPTIMIZER_STEP
    head, score = 4 * VOCAB * HIDDEN, 4 * HIDDEN
    for cat, copies in ((C.WEIGHTS, 1), (C.GRADIENTS, 1), (C.OPTIMIZER_STATES, 2)):
        assert abs((sft[step][cat] - reward[step][cat]) - copies * (head - score)) <= 2 * 2**20, cat


def test_the_head_holds_no_logits():
    """The score's output over every position ([N, 1], bf16) and two int32 [rows, seq] tensors of
    the last-position search: 10 bytes a token at the head's forward, not N x V."""
    setup = _reward(method="lora", batch_size=2, seq_len=2048)
    n = setup.tokens
    loss = _at(setup)[PhaseKind.FORWARD_LOSS][C.TRANSIENT]
    assert loss <= 10 * n + 3 * 512
    backward = _at(setup)[PhaseKind.LOSS_BACKWARD][C.TRANSIENT]
    assert backward <= 2 * n + 2 * n * HIDDEN + 2 * 512  # the scattered grad, the score's input grad


def test_a_tied_models_embedding_is_its_own_weight():
    """Llama 3.2 1B ties lm_head to the embedding; the sequence classifier has no lm_head, so the
    embedding is a lookup whose gradient comes last, not at the loss backward."""
    setup = _reward(method="full", batch_size=1, seq_len=512)
    assert PhaseKind.EMBEDDING_BACKWARD in _at(setup, TIED)


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        (dict(objective="reward", stack="plain"), "--objective"),
        (dict(objective="reward", stack="trl", loss="trl-chunked-nll"), "--loss"),
        (dict(objective="reward", stack="trl", packing="padding-free", attention="flash"), "--packing"),
        (dict(objective="reward", stack="trl", method="lora", modules_to_save="lm_head"), "--modules-to-save"),
    ],
)
def test_what_a_reward_model_refuses_names_the_flag(fields, flag):
    with pytest.raises(VramplanError) as e:
        make_setup(**fields)
    assert e.value.flag == flag


def test_the_trl_stack_uses_no_fused_head_for_a_reward_model():
    assert _reward(method="lora").loss == Loss.HF


def test_a_trl_reward_config_is_read_as_a_reward_model(tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text(
        "model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct\nper_device_train_batch_size: 8\nmax_length: 2048\n"
        "use_peft: true\nlora_task_type: SEQ_CLS\ncenter_rewards_coefficient: 0.01\n"
    )
    reading = read_config([str(path)])
    assert reading.fields["objective"] == Objective.REWARD
    assert not reading.unmodelled
    make_setup(**{**reading.fields, "stack": "trl"})
    causal = tmp_path / "causal.yaml"
    causal.write_text("use_peft: true\ncenter_rewards_coefficient: null\n")
    assert any(u.key == "lora_task_type" for u in read_config([str(causal)]).unmodelled)


def test_an_axolotl_reward_model_config_is_read_as_one(tmp_path):
    path = tmp_path / "rm.yml"
    path.write_text(
        "base_model: meta-llama/Llama-3.1-8B\nreward_model: true\nnum_labels: 1\nadapter: lora\n"
        "lora_r: 16\nlora_target_linear: true\nsequence_len: 2048\nmicro_batch_size: 2\nsample_packing: true\n"
        "plugins: [axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin]\ncut_cross_entropy: true\n"
        "bf16: true\n"
    )
    f = read_config([str(path)]).fields
    assert f["objective"] == Objective.REWARD and f["loss"] == Loss.HF and f["packing"] == Packing.NONE
    setup = make_setup(**{**f, "stack": "axolotl"})
    assert setup.lora_kernels  # axolotl turns its LoRA kernels on for a reward model (no `rl`)


def test_llamafactorys_value_head_keeps_lm_head_without_a_gradient():
    """stage rm: the causal LM whole (lm_head loaded) under a value head Linear(hidden, 1) with a
    bias; the LM loss is dropped, so a full fine-tune's lm_head gets no gradient and no AdamW state."""
    setup = make_setup(stack="llamafactory", objective="reward", method="full", batch_size=1, seq_len=512)
    roots = [p for p in parameters(SPEC, setup) if p.layer is None]
    head = [p for p in roots if p.numel == VOCAB * HIDDEN]
    assert sorted(p.trainable for p in head) == [False, True]  # lm_head frozen in effect, the embedding trained
    assert any(p.numel == HIDDEN + 1 and p.trainable for p in roots)


def test_llamafactorys_head_holds_the_lm_loss_and_an_fp32_copy_of_the_logits():
    """Its forward's head: the bf16 logits, the LM loss's saved fp32 log-softmax and the wrapper's
    `lm_logits.float()`, 10 bytes per logit, beside the held hidden states of a bf16 stream
    without checkpointing (4 layers x 2 bytes x tokens x hidden)."""
    setup = make_setup(stack="llamafactory", objective="reward", method="lora", batch_size=1, seq_len=512)
    nv = setup.tokens * VOCAB
    ckpt = _at(setup.model_copy(update={"gradient_checkpointing": True}))[PhaseKind.FORWARD_LOSS][C.TRANSIENT]
    assert abs(ckpt - 10 * nv) <= 4 * 2**20
    saving = _at(setup.model_copy(update={"gradient_checkpointing": False}))[PhaseKind.FORWARD_LOSS][C.TRANSIENT]
    assert abs(saving - ckpt - 4 * 2 * setup.tokens * HIDDEN) <= 4 * 2**20


def test_a_llamafactory_rm_config_is_read_as_a_reward_model(tmp_path):
    path = tmp_path / "rm.yaml"
    path.write_text(
        "model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct\nstage: rm\nfinetuning_type: lora\n"
        "lora_target: all\ncutoff_len: 2048\nper_device_train_batch_size: 1\nbf16: true\nenable_liger_kernel: true\n"
    )
    reading = read_config([str(path)])
    assert reading.fields["objective"] == Objective.REWARD and reading.fields["loss"] == Loss.HF
    assert not any(u.key == "stage" for u in reading.unmodelled)


@pytest.mark.parametrize("fmt", ["trl", "axolotl", "llamafactory"])
def test_emit_writes_a_reward_config_that_reads_back(fmt):
    from vramplan.configs.emit import emit

    setup = make_setup(stack=fmt, objective="reward", method="lora", gradient_checkpointing=True, seq_len=2048)
    text = emit(fmt, setup, "meta-llama/Llama-3.1-8B", {})
    assert {"trl": "lora_task_type: SEQ_CLS", "axolotl": "reward_model: true", "llamafactory": "stage: rm"}[fmt] in text
    with pytest.raises(VramplanError) as e:
        emit("torchtune", setup, "meta-llama/Llama-3.1-8B", {})
    assert e.value.flag == "--emit"


def test_the_step_time_counts_a_score_head_not_lm_head():
    """throughput.objective_shapes: the sequence classifier's head is hidden x 1; LLaMA-Factory's
    value head model still runs lm_head."""
    from vramplan.throughput import objective_shapes, shapes

    sh = shapes(SPEC)
    assert objective_shapes(sh, _reward(method="lora")).head_params == HIDDEN
    lf = make_setup(stack="llamafactory", objective="reward", method="lora")
    assert objective_shapes(sh, lf).head_params == VOCAB * HIDDEN


def test_activation_offload_moves_no_log_softmax_of_a_reward_model():
    """OffloadActivations' share of the LM loss (activations.loss_offloaded) needs an LM loss saved
    for backward: a reward model's has none."""
    from vramplan.memory.activations import loss_offloaded

    setup = make_setup(
        stack="axolotl", objective="reward", method="qlora", activation_offload="all", gradient_checkpointing=True
    )
    assert loss_offloaded(SPEC, setup) == 0
    sft = setup.model_copy(update={"objective": Objective.SFT})
    assert loss_offloaded(SPEC, sft) > 0
