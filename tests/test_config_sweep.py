"""What a sweep of the frameworks' own example configs found (2026-12-05: every YAML under
axolotl@067b021 examples/, LLaMA-Factory@ff6d4d1 examples/, torchtune@bd2a0fc recipes/configs/
and TRL@f2cd577 examples/ through `vramplan estimate --config`): a LLaMA-Factory v1 file read as
an axolotl full fine-tune, torchtune's Qwen3 builders unknown, evaluation recipes estimated as
training, and parallelism, QAT, distillation and axolotl's LoRA kernels passed over in silence.

The sample files are the frameworks' own, verbatim (tests/data/configs_frameworks/PROVENANCE.md);
the expected values were written by hand from those files and the sources cited in the code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vramplan.configs import read_config
from vramplan.errors import VramplanError
from vramplan.setup import Method

DATA = Path(__file__).parent / "data" / "configs_frameworks"


def _unmodelled(reading) -> list[str]:
    return [u.key for u in reading.unmodelled]


def test_a_llamafactory_v1_config_is_refused_not_read_as_axolotl():
    """examples/v1/train_lora/train_lora_sft.yaml shares micro_batch_size with axolotl: it was read
    as an axolotl full fine-tune of its LoRA run. LLaMA-Factory's v1 trainer (USE_V1=1) runs its own
    loop, which vramplan does not model: one line names the file and what to give instead."""
    path = DATA / "llamafactory" / "v1__train_lora__train_lora_sft.yaml"
    with pytest.raises(VramplanError) as err:
        read_config([str(path)])
    text = str(err.value)
    assert "LLaMA-Factory v1" in text and "peft_config" in text and "--method" in text
    assert str(path) in text


# torchtune@bd2a0fc torchtune/models/qwen3/_model_builders.py, read by hand: vocab, layers, heads,
# kv heads, head_dim, embed_dim, intermediate_dim, tie_word_embeddings
QWEN3_BUILDERS = {
    "qwen3_0_6b_instruct": ("Qwen/Qwen3-0.6B", (151936, 28, 16, 8, 128, 1024, 3072, 1)),
    "qwen3_1_7b_base": ("Qwen/Qwen3-1.7B-Base", (151936, 28, 16, 8, 128, 2048, 6144, 1)),
    "qwen3_4b_instruct": ("Qwen/Qwen3-4B", (151936, 36, 32, 8, 128, 2560, 9728, 1)),
    "qwen3_8b_base": ("Qwen/Qwen3-8B-Base", (151936, 36, 32, 8, 128, 4096, 12288, 0)),
    "qwen3_14b_instruct": ("Qwen/Qwen3-14B", (151936, 40, 40, 8, 128, 5120, 17408, 0)),
    "qwen3_32b": ("Qwen/Qwen3-32B", (151936, 64, 64, 8, 128, 5120, 25600, 0)),
}


@pytest.mark.parametrize("builder", sorted(QWEN3_BUILDERS))
def test_torchtune_qwen3_builders_read_as_the_qwen3_preset_of_their_shape(builder, tmp_path):
    from vramplan.memory.types import LinearRole
    from vramplan.model_loader import load_model_spec

    hf_id, shape = QWEN3_BUILDERS[builder]
    spec = load_model_spec(hf_id)  # a preset: no download
    mlp = next(lin.out_features for lin in spec.layers[0].linears if lin.role == LinearRole.GATE)
    got = (spec.vocab, spec.num_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.hidden, mlp)
    assert got + (int(spec.tied_embeddings),) == shape
    path = tmp_path / "tt.yaml"
    path.write_text(f"model:\n  _component_: torchtune.models.qwen3.lora_{builder}\n  lora_rank: 8\n")
    reading = read_config([str(path)])
    assert reading.model == hf_id
    assert any(u.field == "model" and "bd2a0fc" in u.note for u in reading.used_keys)


def test_torchtune_qwen3_8b_lora_sample_reads_as_written():
    path = DATA / "torchtune" / "main__qwen3__8B_lora_single_device.yaml"
    reading = read_config([str(path)])
    f = reading.fields
    assert reading.model == "Qwen/Qwen3-8B"
    assert (f["method"], f["lora_r"], f["batch_size"], f["gradient_accumulation"]) == (Method.LORA, 8, 2, 8)
    assert f["lora_target_modules"] == ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert f["gradient_checkpointing"] is True


def test_torchtune_evaluation_config_is_refused():
    """eleuther_evaluation.yaml names a model builder like a training config; its header runs
    `tune run eleuther_eval`, which trains nothing."""
    path = DATA / "torchtune" / "main__eleuther_evaluation.yaml"
    with pytest.raises(VramplanError, match="tune run eleuther_eval"):
        read_config([str(path)])


def test_torchtune_distillation_and_qat_recipes_are_said(tmp_path):
    """The KD config's header first shows the teacher's own LoRA fine-tune, then its launch line;
    a copy under another name keeps the header only, and the last `tune run` is the one it is for."""
    kd = DATA / "torchtune" / "main__qwen3__14B_to_8B_KD_lora_single_device.yaml"
    assert "header: tune run knowledge_distillation_single_device" in _unmodelled(read_config([str(kd)]))
    copy = tmp_path / "my_kd.yaml"
    shutil.copy(kd, copy)
    assert "header: tune run knowledge_distillation_single_device" in _unmodelled(read_config([str(copy)]))
    qat = DATA / "torchtune" / "main__llama3_1__8B_qat_lora.yaml"
    reading = read_config([str(qat)])
    assert "header: tune run qat_lora_finetune_distributed" in _unmodelled(reading)
    assert "quantizer" not in reading.unknown
    bare = tmp_path / "own.yaml"  # no header: the section itself says it
    bare.write_text(
        "model:\n  _component_: torchtune.models.llama3_1.lora_llama3_1_8b\ntokenizer:\n  max_seq_len: 2048\n"
        "quantizer:\n  _component_: torchtune.training.quantization.Int8DynActInt4WeightQATQuantizer\n"
    )
    assert _unmodelled(read_config([str(bare)])) == ["quantizer"]


@pytest.mark.parametrize(("value", "said"), [(1, False), (2, True)])
def test_torchtune_tensor_parallel_dim_above_one_is_said(tmp_path, value, said):
    path = tmp_path / "tt.yaml"
    path.write_text(f"model:\n  _component_: torchtune.models.llama3_1.llama3_1_70b\ntensor_parallel_dim: {value}\n")
    reading = read_config([str(path)])
    assert ("tensor_parallel_dim" in _unmodelled(reading)) is said
    assert "tensor_parallel_dim" not in reading.unknown


def test_torchtune_tensor_parallel_dim_must_be_a_positive_integer(tmp_path):
    path = tmp_path / "tt.yaml"
    path.write_text("model:\n  _component_: torchtune.models.llama3_1.llama3_1_70b\ntensor_parallel_dim: 0\n")
    with pytest.raises(VramplanError, match="tensor_parallel_dim"):
        read_config([str(path)])


def test_an_unmapped_torchtune_builder_is_named_in_the_missing_model_error(tmp_path):
    from argparse import Namespace

    from vramplan.cli.config_file import model_name

    path = tmp_path / "tt.yaml"
    path.write_text("model:\n  _component_: torchtune.models.llama4.llama4_scout_17b_16e\n")
    with pytest.raises(VramplanError, match="llama4_scout_17b_16e"):
        model_name(Namespace(model=None), read_config([str(path)]))


def test_axolotl_tensor_and_context_parallelism_are_said():
    path = DATA / "axolotl" / "distributed-parallel__qwen3-8b-fsdp-tp-cp.yaml"
    reading = read_config([str(path)])
    said = _unmodelled(reading)
    assert "tensor_parallel_size" in said and "context_parallel_size" in said
    assert not {"tensor_parallel_size", "context_parallel_size", "dp_shard_size"} & set(reading.unknown)


@pytest.mark.parametrize(
    ("body", "world", "on"),
    [
        ("adapter: lora\n", 1, True),  # axolotl==0.19.0 turns them on for any LoRA config
        ("adapter: qlora\nload_in_4bit: true\n", 1, True),
        ("adapter: lora\nfsdp_version: 2\nfsdp_config:\n  offload_params: false\n", 2, True),
        ("adapter: lora\nfsdp_config:\n  offload_params: false\n", 2, False),  # multi-GPU FSDP1: not turned on
        ("adapter: lora\nload_in_8bit: true\n", 1, False),  # 8-bit LoRA: not supported
        ("adapter: lora\ntrust_remote_code: true\n", 1, False),
        ("adapter: lora\nrl: dpo\n", 1, False),
        ("adapter: lora\npeft_use_dora: true\n", 1, False),  # DoRA through them: not modelled, said
        ("adapter: lora\nlora_mlp_kernel: false\nlora_qkv_kernel: false\nlora_o_kernel: false\n", 1, False),
        ("adapter: lora\nlora_mlp_kernel: true\nlora_qkv_kernel: true\nlora_o_kernel: true\n", 1, True),
    ],
)
def test_axolotl_lora_kernels_where_axolotl_runs_them(tmp_path, body, world, on):
    """From the file's keys where it sets them, else --stack axolotl's rule (presets/stacks/axolotl.json)."""
    from vramplan.configs import setup_fields
    from vramplan.estimate import make_setup

    path = tmp_path / "a.yml"
    path.write_text("base_model: x/y\n" + body)
    reading = read_config([str(path)])
    assert make_setup(**setup_fields(reading, world=world)).lora_kernels is on
    assert not {"lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"} & set(reading.unknown)


def test_axolotl_some_lora_kernels_on_are_modelled_as_peft_and_said(tmp_path):
    path = tmp_path / "a.yml"
    path.write_text("base_model: x/y\nadapter: lora\nlora_mlp_kernel: true\nlora_qkv_kernel: false\n")
    reading = read_config([str(path)])
    assert reading.fields["lora_kernels"] is False and _unmodelled(reading) == ["lora_mlp_kernel"]


def test_axolotl_lora_kernels_sample_reads_them_on():
    reading = read_config([str(DATA / "axolotl" / "llama-3__lora-1b-kernels.yml")])
    assert reading.fields["lora_kernels"] is True


def test_lora_keys_without_an_adapter_are_not_unknown(tmp_path):
    path = tmp_path / "a.yml"
    path.write_text("base_model: x/y\nlora_r: 16\nlora_dropout: 0.05\nlora_mlp_kernel: true\n")
    reading = read_config([str(path)])
    assert reading.unknown == () and "lora_kernels" not in reading.fields


@pytest.mark.parametrize("section", ["qat:\n  weight_dtype: int4\n", "ebft:\n  mode: structured\n"])
def test_axolotl_qat_and_ebft_sections_are_said(tmp_path, section):
    """axolotl==0.19.0 utils/schemas/config.py:276-282: QAT and energy-based fine-tuning sections."""
    path = tmp_path / "a.yml"
    path.write_text("base_model: x/y\n" + section)
    reading = read_config([str(path)])
    assert _unmodelled(reading) == [section.split(":")[0]]
    assert reading.unknown == ()


@pytest.mark.parametrize(
    ("fields", "on"),
    [
        ({"method": "qlora"}, True),
        ({"method": "lora"}, True),
        ({"method": "lora", "fsdp": 2}, False),  # axolotl's fsdp_config without a version is FSDP1
        ({"method": "lora", "fsdp": 2, "fsdp_version": 2}, True),
        ({"method": "qlora", "quant": "int8"}, False),  # 8-bit LoRA
        ({"method": "lora", "dora": True}, False),
        ({"method": "lora", "lora_kernels": False}, False),
        ({"method": "full"}, False),
    ],
)
def test_the_axolotl_stack_turns_its_lora_kernels_on_where_axolotl_does(fields, on):
    from vramplan.estimate import make_setup

    setup = make_setup(stack="axolotl", **fields)
    assert setup.lora_kernels is on
    if setup.dora:  # said: axolotl runs DoRA through them, the estimate keeps peft's DoRA
        from vramplan.stacks import stack_lines

        assert any("DoRA through its fused LoRA kernels" in line for line in stack_lines(setup))


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("inference__qwen3.yaml", "inference config"),
        ("merge_lora__qwen3_lora_sft.yaml", "export config"),
        ("extras__nlg_eval__llama3_lora_predict.yaml", "do_predict without do_train"),
    ],
)
def test_llamafactory_configs_that_train_nothing_are_refused(name, says):
    """llamafactory-cli chat/export and predict configs name a model like a training config; they
    were estimated as LoRA training steps."""
    path = DATA / "llamafactory" / name
    with pytest.raises(VramplanError, match=says) as err:
        read_config([str(path)])
    assert str(path) in str(err.value)


def test_llamafactory_megatron_training_is_said():
    """USE_MCA=1 (Megatron-Core through mcore_adapter): its keys only that parser takes."""
    reading = read_config([str(DATA / "llamafactory" / "megatron_bridge__llama3_sft.yaml")])
    assert _unmodelled(reading) == ["tensor_model_parallel_size"]
    assert not {"pipeline_model_parallel_size", "use_distributed_optimizer"} & set(reading.unknown)


def test_llamafactory_reads_the_trainers_fsdp_keys_at_its_transformers_default():
    """LLaMA-Factory hands TrainingArguments' fsdp to the Trainer; the transformers it wants
    (<=5.6.0) defaults fsdp_config's version to 1 (training_args.py:2809), 5.25.0 to 2."""
    from vramplan.configs import Distributed
    from vramplan.setup import FsdpSharding

    reading = read_config([str(DATA / "llamafactory" / "extras__fp8__llama3_fp8_fsdp_sft.yaml")])
    assert reading.distributed == Distributed.FSDP
    assert (reading.fields["fsdp_version"], reading.fields["fsdp_sharding"]) == (1, FsdpSharding.FULL)
    assert "fp8" in _unmodelled(reading) and "fsdp" not in reading.unknown
