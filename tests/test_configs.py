"""Framework config files -> TrainingSetup fields (issue 14).

Expected fields below were written by hand from reading each sample file and the framework
source cited in docs/configs.md, not produced by the code under test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vramplan.configs import (
    ConfigFormat,
    Distributed,
    describe_reading,
    detect_format,
    emit,
    read_config,
    setup_fields,
    write_atomic,
)
from vramplan.configs.reading import load_file
from vramplan.errors import VramplanError
from vramplan.setup import (
    ActivationOffload,
    AdapterDtype,
    Attention,
    DeepSpeedStage,
    FsdpSharding,
    LigerLayers,
    LoraTargets,
    Loss,
    Method,
    ModelDtype,
    Optim,
    Packing,
    Precision,
    Quant,
    SavedModule,
    Stack,
    TrainingSetup,
)

DATA = Path(__file__).parent / "data" / "configs_frameworks"
ALL_LINEAR_BUT_K = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

AXOLOTL_QLORA = {
    "method": Method.QLORA,
    "quant": Quant.NF4,
    "lora_r": 32,
    "lora_dropout": 0.05,
    "lora_targets": LoraTargets.ALL_LINEAR,
    "batch_size": 2,
    "gradient_accumulation": 4,
    "seq_len": 4096,
    "model_dtype": ModelDtype.BF16,
    "precision": Precision.MIXED,
    "attention": Attention.FLASH,
    "gradient_checkpointing": True,
    "optim": Optim.PAGED_ADAMW_32BIT,
    "packing": Packing.PADDING_FREE,
    # prepare_model_for_kbit_training runs, then norms and embeddings go back to bf16 (loaders/model.py:468-490)
    "kbit_prep": False,
}
LF_LORA = {
    "method": Method.LORA,
    "lora_r": 8,
    "lora_targets": LoraTargets.ALL_LINEAR,
    "batch_size": 1,
    "gradient_accumulation": 8,
    "seq_len": 2048,
    "precision": Precision.MIXED,
    "model_dtype": ModelDtype.BF16,
    "adapter_dtype": AdapterDtype.FP32,
    "kbit_prep": False,
}
TT_LORA = {
    "method": Method.LORA,
    "lora_r": 8,
    "lora_dropout": 0.0,
    "lora_target_modules": ALL_LINEAR_BUT_K,
    "batch_size": 2,
    "gradient_accumulation": 8,
    "packing": Packing.NONE,
    "precision": Precision.BF16,
    "model_dtype": ModelDtype.BF16,
    "adapter_dtype": AdapterDtype.BF16,
    "optim": Optim.ADAMW_TORCH_FUSED,
    "loss": Loss.CHUNKED,
    "gradient_checkpointing": True,
    "activation_offload": ActivationOffload.NONE,
    "compile": False,
    "kbit_prep": False,
}

LF_EXTRAS_FULL = {
    "method": Method.FULL,
    "batch_size": 1,
    "gradient_accumulation": 8,
    "seq_len": 2048,
    "precision": Precision.MIXED,
    "model_dtype": ModelDtype.FP32,
}

SAMPLES = [
    # (files, format, stack, model, distributed, world, fields)
    (
        ["axolotl/qlora.yml"],
        ConfigFormat.AXOLOTL,
        Stack.AXOLOTL,
        "NousResearch/Meta-Llama-3-8B",
        Distributed.NONE,
        None,
        AXOLOTL_QLORA,
    ),
    (
        ["axolotl/lora-8b.yml"],
        ConfigFormat.AXOLOTL,
        Stack.AXOLOTL,
        "NousResearch/Meta-Llama-3-8B",
        Distributed.NONE,
        None,
        {
            "method": Method.QLORA,  # LoRA on a quantized base: load_in_8bit is bitsandbytes LLM.int8
            "quant": Quant.INT8,
            "lora_r": 32,
            "lora_dropout": 0.05,
            "lora_targets": LoraTargets.ALL_LINEAR,
            "batch_size": 2,
            "gradient_accumulation": 4,
            "seq_len": 4096,
            "model_dtype": ModelDtype.BF16,
            "precision": Precision.MIXED,
            "attention": Attention.FLASH,
            "gradient_checkpointing": True,
            "optim": Optim.ADAMW_BNB_8BIT,
            "packing": Packing.PADDING_FREE,
            # prepared (loaders/model.py:1141-1151), then norms and embeddings cast back to bf16 (:468-490)
            "kbit_prep": False,
            "modules_to_save": (SavedModule.EMBED_TOKENS, SavedModule.LM_HEAD),
        },
    ),
    (
        ["axolotl/fft-8b-liger-fsdp.yaml"],
        ConfigFormat.AXOLOTL,
        Stack.AXOLOTL,
        "NousResearch/Meta-Llama-3.1-8B",
        Distributed.FSDP,
        None,
        {
            "method": Method.FULL,
            "batch_size": 2,
            "gradient_accumulation": 4,
            "seq_len": 4096,
            "model_dtype": ModelDtype.BF16,
            "precision": Precision.BF16,
            "attention": Attention.FLASH,
            "gradient_checkpointing": True,
            "checkpoint_reentrant": False,
            "optim": Optim.ADAMW_TORCH_FUSED,
            "loss": Loss.LIGER,
            "liger_layers": LigerLayers.ALL,  # liger_rms_norm and liger_glu_activation, both true
            "fsdp_version": 1,
            "fsdp_sharding": FsdpSharding.FULL,
            "cpu_offload": True,
            "packing": Packing.PADDING_FREE,
        },
    ),
    (
        ["axolotl/mistral-qlora-fsdp.yml"],
        ConfigFormat.AXOLOTL,
        Stack.AXOLOTL,
        "mistralai/Mixtral-8x7B-v0.1",
        Distributed.FSDP,
        None,
        {
            "method": Method.QLORA,
            "quant": Quant.NF4,
            "lora_r": 32,
            "lora_dropout": 0.05,
            "lora_targets": LoraTargets.ALL_LINEAR,
            "batch_size": 2,
            "gradient_accumulation": 4,
            "seq_len": 1024,
            "model_dtype": ModelDtype.BF16,
            "precision": Precision.MIXED,
            "attention": Attention.FLASH,
            "gradient_checkpointing": True,
            "optim": Optim.PAGED_ADAMW_8BIT,
            "fsdp_version": 1,
            "fsdp_sharding": FsdpSharding.FULL,
            "cpu_offload": False,
            "packing": Packing.NONE,
            "kbit_prep": False,
            "lora_kernels": False,  # trust_remote_code: true keeps axolotl's LoRA kernels off
        },
    ),
    (
        ["axolotl/qlora.yml", "deepspeed/axolotl_zero2.json"],
        ConfigFormat.AXOLOTL,
        Stack.AXOLOTL,
        "NousResearch/Meta-Llama-3-8B",
        Distributed.DEEPSPEED,
        None,
        {**AXOLOTL_QLORA, "deepspeed": DeepSpeedStage.ZERO2, "offload_optimizer": True},
    ),
    (
        ["trl/trl_example_config.yaml"],
        ConfigFormat.TRL,
        Stack.TRL,
        "Qwen/Qwen2.5-0.5B",
        Distributed.NONE,
        None,
        {"method": Method.FULL, "loss": Loss.TRL_CHUNKED_NLL},
    ),
    (
        ["trl/trl_example_config.yaml", "accelerate/trl_fsdp2.yaml"],
        ConfigFormat.TRL,
        Stack.TRL,
        "Qwen/Qwen2.5-0.5B",
        Distributed.FSDP,
        8,
        {
            "method": Method.FULL,
            "loss": Loss.TRL_CHUNKED_NLL,
            "nodes": 1,
            "precision": Precision.MIXED,
            "fsdp": 8,
            "fsdp_version": 2,
            "fsdp_sharding": FsdpSharding.FULL,
            "cpu_offload": False,
        },
    ),
    (
        ["llamafactory/train_lora__qwen3_lora_sft.yaml"],
        ConfigFormat.LLAMAFACTORY,
        Stack.LLAMAFACTORY,
        "Qwen/Qwen3-4B-Instruct-2507",
        Distributed.NONE,
        None,
        LF_LORA,
    ),
    (
        ["llamafactory/train_qlora__qwen3_lora_sft_otfq.yaml"],
        ConfigFormat.LLAMAFACTORY,
        Stack.LLAMAFACTORY,
        "Qwen/Qwen3-4B-Instruct-2507",
        Distributed.NONE,
        None,
        {**LF_LORA, "method": Method.QLORA, "quant": Quant.NF4},
    ),
    (
        ["llamafactory/train_full__qwen3_full_sft.yaml", "deepspeed/llamafactory_ds_z3_config.json"],
        ConfigFormat.LLAMAFACTORY,
        Stack.LLAMAFACTORY,
        "Qwen/Qwen3-4B-Instruct-2507",
        Distributed.DEEPSPEED,
        None,
        {
            "method": Method.FULL,
            "batch_size": 1,
            "gradient_accumulation": 2,
            "seq_len": 2048,
            "precision": Precision.MIXED,
            "model_dtype": ModelDtype.FP32,
            "deepspeed": DeepSpeedStage.ZERO3,
        },
    ),
    (
        ["llamafactory/extras__fsdp_qlora__llama3_lora_sft.yaml", "accelerate/llamafactory_fsdp_config.yaml"],
        ConfigFormat.LLAMAFACTORY,
        Stack.LLAMAFACTORY,
        "meta-llama/Meta-Llama-3-8B-Instruct",
        Distributed.FSDP,
        2,
        {
            **LF_LORA,
            "method": Method.QLORA,
            "quant": Quant.NF4,
            "fsdp": 2,
            "fsdp_version": 1,
            "fsdp_sharding": FsdpSharding.FULL,
            "cpu_offload": False,
            "nodes": 1,
        },
    ),
    # LLaMA-Factory's optimizer examples (examples/extras/*): by hand from each file and
    # llamafactory==0.9.5 (bf16 without pure_bf16: autocast over fp32-cast weights,
    # model/adapter.py:313-328; no fp32 cast under pure_bf16 or BAdam, :338-349)
    (
        ["llamafactory/extras__apollo__llama3_full_sft.yaml"],
        ConfigFormat.LLAMAFACTORY,
        Stack.LLAMAFACTORY,
        "meta-llama/Meta-Llama-3-8B-Instruct",
        Distributed.NONE,
        None,
        {
            **LF_EXTRAS_FULL,
            "gradient_accumulation": 1,
            "precision": Precision.BF16,
            "model_dtype": ModelDtype.BF16,
            "optim": Optim.APOLLO_ADAMW_LAYERWISE,
            "apollo_rank": 128,
        },
    ),
    (
        ["llamafactory/extras__muon__qwen2_full_sft.yaml"],
        ConfigFormat.LLAMAFACTORY,
        Stack.LLAMAFACTORY,
        "Qwen/Qwen2-1.5B-Instruct",
        Distributed.NONE,
        None,
        {**LF_EXTRAS_FULL, "optim": Optim.MUON},
    ),
    (
        ["llamafactory/extras__adam_mini__qwen2_full_sft.yaml"],
        ConfigFormat.LLAMAFACTORY,
        Stack.LLAMAFACTORY,
        "Qwen/Qwen2-1.5B-Instruct",
        Distributed.NONE,
        None,
        {**LF_EXTRAS_FULL, "optim": Optim.ADAM_MINI},
    ),
    (
        ["llamafactory/extras__badam__llama3_full_sft.yaml"],
        ConfigFormat.LLAMAFACTORY,
        Stack.LLAMAFACTORY,
        "meta-llama/Meta-Llama-3-8B-Instruct",
        Distributed.NONE,
        None,
        {**LF_EXTRAS_FULL, "precision": Precision.BF16, "model_dtype": ModelDtype.BF16},  # use_badam: a note
    ),
    (
        ["torchtune/8B_qlora_single_device.yaml"],
        ConfigFormat.TORCHTUNE,
        Stack.TORCHTUNE,
        "meta-llama/Llama-3.1-8B",
        Distributed.NONE,
        None,
        {**TT_LORA, "method": Method.QLORA, "quant": Quant.NF4},
    ),
    (
        ["torchtune/qwen2_5_7B_lora_single_device.yaml"],
        ConfigFormat.TORCHTUNE,
        Stack.TORCHTUNE,
        "Qwen/Qwen2.5-7B-Instruct",
        Distributed.NONE,
        None,
        TT_LORA,
    ),
    (
        ["torchtune/8B_full_single_device.yaml"],
        ConfigFormat.TORCHTUNE,
        Stack.TORCHTUNE,
        "meta-llama/Llama-3.1-8B",
        Distributed.NONE,
        None,
        {
            "method": Method.FULL,
            "batch_size": 2,
            "gradient_accumulation": 1,
            "packing": Packing.NONE,
            "precision": Precision.BF16,
            "model_dtype": ModelDtype.BF16,
            "optim": Optim.PAGED_ADAMW_8BIT,
            "loss": Loss.CHUNKED,
            "optimizer_in_backward": True,
            "gradient_checkpointing": True,
            "activation_offload": ActivationOffload.NONE,
            "compile": False,
        },
    ),
    (
        ["accelerate/trl_zero3.yaml"],
        ConfigFormat.ACCELERATE,
        None,
        None,
        Distributed.DEEPSPEED,
        8,
        {
            "nodes": 1,
            "precision": Precision.MIXED,
            "deepspeed": DeepSpeedStage.ZERO3,
            "offload_optimizer": False,
            "offload_params": False,
        },
    ),
    (
        ["deepspeed/axolotl_zero3_bf16_cpuoffload_all.json"],
        ConfigFormat.DEEPSPEED,
        None,
        None,
        Distributed.DEEPSPEED,
        None,
        {
            "deepspeed": DeepSpeedStage.ZERO3,
            "offload_optimizer": True,
            "offload_params": True,
            "precision": Precision.MIXED,
        },
    ),
]


@pytest.mark.parametrize(
    "files,fmt,stack,model,distributed,world,fields", SAMPLES, ids=["+".join(s[0]) for s in SAMPLES]
)
def test_sample_maps_to_expected_fields(files, fmt, stack, model, distributed, world, fields):
    reading = read_config([str(DATA / f) for f in files])
    assert (reading.format, reading.stack, reading.model) == (fmt, stack, model)
    assert (reading.distributed, reading.world) == (distributed, world)
    assert reading.fields == fields
    TrainingSetup(**setup_fields(reading, world=4))  # the fields make a valid setup


@pytest.mark.parametrize(
    "path,fmt",
    [
        ("axolotl/qlora.yml", ConfigFormat.AXOLOTL),
        ("trl/trl_example_config.yaml", ConfigFormat.TRL),
        ("llamafactory/train_lora__qwen3_lora_sft.yaml", ConfigFormat.LLAMAFACTORY),
        ("torchtune/8B_full_single_device.yaml", ConfigFormat.TORCHTUNE),
        ("accelerate/trl_fsdp2.yaml", ConfigFormat.ACCELERATE),
        ("deepspeed/llamafactory_ds_z3_config.json", ConfigFormat.DEEPSPEED),
    ],
)
def test_detects_format(path, fmt):
    assert detect_format(load_file(DATA / path), path) == fmt


def test_hf_training_arguments_json(tmp_path):
    f = tmp_path / "args.json"
    f.write_text(
        '{"output_dir": "o", "per_device_train_batch_size": 4, "bf16": true, "optim": "adamw_8bit", '
        '"gradient_checkpointing": true, "use_liger_kernel": true}'
    )
    reading = read_config([str(f)])
    assert (reading.format, reading.stack, reading.model) == (ConfigFormat.HF, Stack.HF_TRAINER, None)
    assert reading.fields == {
        "batch_size": 4,
        "precision": Precision.MIXED,
        "optim": Optim.ADAMW_8BIT,
        "gradient_checkpointing": True,
        "loss": Loss.LIGER,
        "liger_layers": LigerLayers.ALL,  # the Trainer applies Liger's layer kernels too
    }


def test_trl_qlora_derivations(tmp_path):
    """TRL casts adapters of a 4-bit model to bf16 and skips kbit prep (trl==1.16.0 sft_trainer.py:897-911)."""
    f = tmp_path / "sft.yaml"
    f.write_text(
        "model_name_or_path: Qwen/Qwen2.5-7B\nuse_peft: true\nload_in_4bit: true\nuse_bnb_nested_quant: true\n"
        "lora_r: 64\nlora_target_modules: all-linear\nmax_length: 4096\nper_device_train_batch_size: 2\n"
        "padding_free: true\nattn_implementation: flash_attention_2\nactivation_offloading: true\n"
    )
    assert read_config([str(f)]).fields == {
        "method": Method.QLORA,
        "quant": Quant.NF4,
        "lora_r": 64,
        "lora_targets": LoraTargets.ALL_LINEAR,
        "batch_size": 2,
        "seq_len": 4096,
        "packing": Packing.PADDING_FREE,
        "activation_offload": ActivationOffload.ALL,
        "loss": Loss.TRL_CHUNKED_NLL,
        "attention": Attention.FLASH,
        "adapter_dtype": AdapterDtype.BF16,
        "kbit_prep": False,
    }


def test_unmodelled_and_unknown_keys_reported(tmp_path):
    lora = read_config([str(DATA / "axolotl/lora-8b.yml")])
    assert lora.unmodelled == ()
    assert lora.unknown == ()
    assert read_config([str(DATA / "axolotl/mistral-qlora-fsdp.yml")]).unknown == ("model_config",)
    liger = read_config([str(DATA / "axolotl/fft-8b-liger-fsdp.yaml")])
    assert liger.unmodelled == ()  # Liger's layer kernels are modelled (memory/liger.py), its RoPE changes nothing
    f = tmp_path / "a.yaml"
    f.write_text("base_model: x/y\nmicro_batch_size: 1\nmystery_knob: 3\noptimizer: came_pytorch\n")
    reading = read_config([str(f)])
    assert reading.unknown == ("mystery_knob",)
    assert [u.key for u in reading.unmodelled] == ["optimizer"]


# axolotl==0.19.0 loaders/model.py:435-490 (_configure_embedding_dtypes): outside FSDP a full fine-tune
# upcasts embed_tokens, lm_head and the norms to fp32, cast back for flash attention or CCE; DeepSpeed's
# bf16 engine casts the module back (engine.py:1310-1313); an adapter casts back too
@pytest.mark.parametrize(
    "extra, precision, upcast",
    [
        ("", Precision.MIXED, True),
        ("sdp_attention: true\n", Precision.MIXED, True),
        ("attn_implementation: eager\n", Precision.MIXED, True),
        ("flash_attention: true\n", Precision.MIXED, False),
        ("attn_implementation: flex_attention\n", Precision.MIXED, False),
        ("plugins: [axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin]\n", Precision.MIXED, False),
        ("fsdp_version: 2\nfsdp_config: {reshard_after_forward: true}\n", Precision.BF16, None),
        ("deepspeed: ds.json\n", Precision.BF16, None),
        ("adapter: lora\nlora_target_linear: true\n", Precision.MIXED, None),
        ("bf16: false\n", Precision.BF16, None),
    ],
)
def test_axolotl_full_fine_tune_keeps_embeddings_and_norms_fp32(tmp_path, extra, precision, upcast):
    f = tmp_path / "a.yaml"
    f.write_text("base_model: x/y\nmicro_batch_size: 1\n" + extra)
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}')
    fields = read_config([str(f)]).fields
    assert fields["precision"] == precision
    assert fields.get("fp32_embeddings_norms") == upcast


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "acc.yaml",
            "distributed_type: FSDP\nfsdp_config: {fsdp_version: 2}\nmixed_precision: bf16\nnum_processes: 2\n",
        ),
        ("ds.json", '{"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}'),
    ],
)
def test_a_launch_file_with_fsdp_or_deepspeed_undoes_axolotls_fp32_embeddings(tmp_path, name, text):
    """An axolotl file naming no engine, given with an accelerate FSDP file or a DeepSpeed JSON:
    FSDP and DeepSpeed's bf16 engine cast the embeddings and norms back, so nothing says fp32."""
    f, launch = tmp_path / "a.yaml", tmp_path / name
    f.write_text("base_model: x/y\nmicro_batch_size: 1\n")
    launch.write_text(text)
    reading = read_config([str(f), str(launch)])
    assert "fp32_embeddings_norms" not in reading.fields
    assert not any(u.field == "fp32_embeddings_norms" for u in reading.used_keys)


def test_describe_reading_lines():
    lines = describe_reading(read_config([str(DATA / "axolotl/qlora.yml")]))
    assert "used: micro_batch_size -> batch_size=2" in lines
    assert "model: NousResearch/Meta-Llama-3-8B" in lines
    lines = describe_reading(read_config([str(DATA / "axolotl/lora-8b.yml")]))
    assert any(line.startswith("used: load_in_8bit -> quant=int8 (") for line in lines)
    assert (
        "used: lora_modules_to_save -> modules_to_save=embed_tokens,lm_head "
        "(trainable copies beside the frozen originals (peft))" in lines
    )


def test_modules_to_save_outside_embeddings_are_named_not_modelled(tmp_path):
    f = tmp_path / "a.yml"
    f.write_text(
        "base_model: x/y\nadapter: lora\nlora_modules_to_save: [model.embed_tokens, score]\nlora_mlp_kernel: false\n"
    )
    reading = read_config([str(f)])
    assert reading.fields["modules_to_save"] == (SavedModule.EMBED_TOKENS,)
    assert [u.key for u in reading.unmodelled] == ["lora_modules_to_save"]
    assert "score" in reading.unmodelled[0].why
    lf = tmp_path / "lf.yaml"
    lf.write_text(
        "model_name_or_path: x/y\nfinetuning_type: lora\nadditional_target: lm_head,embed_tokens\npure_bf16: true\n"
    )
    fields = read_config([str(lf)]).fields
    assert fields["modules_to_save"] == (SavedModule.EMBED_TOKENS, SavedModule.LM_HEAD)
    assert fields["modules_to_save_dtype"] == AdapterDtype.BF16
    # LLaMA-Factory trains a resized vocabulary's embedding and output layer whole (model/adapter.py:222-230)
    lf.write_text("model_name_or_path: x/y\nfinetuning_type: lora\nresize_vocab: true\n")
    assert read_config([str(lf)]).fields["modules_to_save"] == (SavedModule.EMBED_TOKENS, SavedModule.LM_HEAD)


def test_flags_override_file_and_world_from_gpus():
    reading = read_config([str(DATA / "axolotl/fft-8b-liger-fsdp.yaml")])
    fields = setup_fields(reading, {"batch_size": 1, "seq_len": None}, world=4)
    assert (fields["batch_size"], fields["seq_len"], fields["fsdp"], fields["stack"]) == (1, 4096, 4, Stack.AXOLOTL)


def test_reference_resolved_next_to_the_file(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "z2.json").write_text((DATA / "deepspeed/axolotl_zero2.json").read_text())
    f = tmp_path / "lf.yaml"
    f.write_text("model_name_or_path: m\nstage: sft\nfinetuning_type: full\ndeepspeed: ds/z2.json\nbf16: true\n")
    reading = read_config([str(f)])
    assert (reading.fields["deepspeed"], reading.fields["offload_optimizer"]) == (DeepSpeedStage.ZERO2, True)
    assert len(reading.source_files) == 2


def _one_line_error(paths, *needles):
    with pytest.raises(VramplanError) as e:
        read_config([str(p) for p in paths])
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


@pytest.mark.parametrize(
    "name,text,needles",
    [
        ("a.yaml", "base_model: x\nmicro_batch_size: 0\n", ["micro_batch_size", "positive integer", "0"]),
        ("a.yaml", "base_model: x\nadapter: lora\nlora_r: -1\n", ["lora_r", "positive integer", "-1"]),
        ("a.yaml", "base_model: x\nadapter: lora\nlora_dropout: 1.5\n", ["lora_dropout", "[0, 1)"]),
        ("d.json", '{"zero_optimization": {"stage": 4}}', ["zero_optimization.stage", "0, 1, 2 or 3", "4"]),
        ("d.json", '{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}', ["offload_param"]),
        ("acc.yaml", "distributed_type: TPU\n", ["distributed_type", "FSDP"]),
        ("lf.yaml", "model_name_or_path: m\nfinetuning_type: oft\n", ["finetuning_type", "lora, full or freeze"]),
        ("lf.yaml", "model_name_or_path: m\nquantization_bit: 3\n", ["quantization_bit"]),
        ("x.yaml", "colour: blue\nsize: 3\n", ["not a config of axolotl", "x.yaml"]),
        ("x.yaml", "- a\n- b\n", ["mapping"]),
        ("x.yaml", "a: [1, 2\n", ["not valid YAML"]),
        ("x.json", "{not json", ["not valid JSON"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, name, text, needles):
    f = tmp_path / name
    f.write_text(text)
    assert str(f) in _one_line_error([f], *needles)


def test_bad_files(tmp_path):
    _one_line_error([tmp_path], "regular file")
    _one_line_error([tmp_path / "missing.yaml"], "cannot read")
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * (1 << 20) + "\n")
    _one_line_error([big], "bytes")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 40 + "]" * 40 + "\n")
    _one_line_error([deep], "nested")
    lf = tmp_path / "lf.yaml"
    lf.write_text("model_name_or_path: m\nstage: sft\ndeepspeed: nowhere/ds.json\n")
    _one_line_error([lf], "deepspeed", "second --config")
    _one_line_error([DATA / "axolotl/qlora.yml", DATA / "trl/trl_example_config.yaml"], "both training configs")


# ---- emit -> read round trip

MODEL = "meta-llama/Llama-3.1-8B"
LORA = {
    "method": "lora",
    "lora_r": 32,
    "lora_dropout": 0.0,
    "batch_size": 2,
    "seq_len": 4096,
    "gradient_checkpointing": True,
    "gradient_accumulation": 4,
}
ROUND_TRIPS = {
    "axolotl": [
        dict(LORA, stack="axolotl", precision="mixed", model_dtype="bf16", attention="sdpa"),
        dict(LORA, stack="axolotl", precision="mixed", model_dtype="bf16", liger_layers="rms_norm"),
        dict(
            LORA,
            stack="axolotl",
            method="qlora",
            precision="mixed",
            model_dtype="bf16",
            kbit_prep=False,
            loss="cce",
            lora_targets="attention",
            modules_to_save="embed_tokens,lm_head",
            optim="adamw_bnb_8bit",
        ),
        {
            "stack": "axolotl",
            "method": "full",
            "precision": "bf16",
            "fsdp": 4,
            "fsdp_version": 2,
            "cpu_offload": True,
            "gradient_checkpointing": True,
            "loss": "liger",
            "packing": "padding-free",
            "attention": "flash",
        },
        {
            "stack": "axolotl",
            "method": "full",
            "precision": "bf16",
            "deepspeed": "zero2",
            "offload_optimizer": True,
            "loss": "chunked",
            "activation_offload": "checkpoints",
            "gradient_checkpointing": True,
        },
    ],
    "trl": [
        dict(LORA, stack="trl", precision="mixed", model_dtype="bf16", loss="trl-chunked-nll"),
        dict(LORA, stack="trl", precision="mixed", model_dtype="bf16", loss="trl-chunked-nll", liger_layers="all"),
        dict(LORA, stack="trl", precision="mixed", model_dtype="bf16", loss="trl-chunked-nll", liger_layers="glu"),
        dict(
            LORA,
            stack="trl",
            method="qlora",
            precision="mixed",
            model_dtype="bf16",
            adapter_dtype="bf16",
            loss="trl-chunked-nll",
            lora_target_modules=("q_proj", "v_proj"),
            modules_to_save="lm_head",
            packing="padding-free",
            attention="flash",
        ),
        {
            "stack": "trl",
            "method": "full",
            "precision": "mixed",
            "fsdp": 2,
            "fsdp_version": 2,
            "fsdp_sharding": "shard-grad-op",
            "loss": "trl-chunked-nll",
            "gradient_checkpointing": True,
            "activation_offload": "all",
        },
        {
            "stack": "trl",
            "method": "full",
            "precision": "mixed",
            "deepspeed": "zero2",
            "offload_optimizer": True,
            "loss": "trl-chunked-nll",
            "optim": "adamw_torch_fused",
        },
    ],
    "llamafactory": [
        dict(
            LORA,
            stack="llamafactory",
            precision="mixed",
            model_dtype="bf16",
            checkpoint_reentrant=True,
            modules_to_save="embed_tokens",
        ),
        dict(
            LORA,
            stack="llamafactory",
            method="qlora",
            precision="mixed",
            model_dtype="bf16",
            loss="liger",
            liger_layers="all",  # enable_liger_kernel applies the fused loss and the layer kernels together
            packing="position-ids",
        ),
        {
            "stack": "llamafactory",
            "method": "full",
            "precision": "mixed",
            "deepspeed": "zero2",
            "offload_optimizer": True,
            "gradient_checkpointing": True,
        },
        {
            "stack": "llamafactory",
            "method": "galore",
            "precision": "bf16",
            "optim": "galore_adamw_8bit_layerwise",
            "galore_rank": 64,
            "gradient_checkpointing": True,
        },
    ],
    "torchtune": [
        dict(
            LORA, stack="torchtune", precision="bf16", adapter_dtype="bf16", loss="chunked", optim="adamw_torch_fused"
        ),
        dict(
            LORA,
            stack="torchtune",
            method="qlora",
            precision="bf16",
            adapter_dtype="bf16",
            loss="chunked",
            lora_target_modules=ALL_LINEAR_BUT_K,
            packing="position-ids",
        ),
        {
            "stack": "torchtune",
            "method": "full",
            "precision": "bf16",
            "fsdp": 4,
            "cpu_offload": True,
            "loss": "hf",
            "gradient_checkpointing": True,
            "activation_offload": "all",
        },
        {
            "stack": "torchtune",
            "method": "full",
            "precision": "bf16",
            "optimizer_in_backward": True,
            "optim": "adamw_bnb_8bit",
            "loss": "chunked",
        },
    ],
    "accelerate": [
        {"method": "full", "precision": "mixed", "fsdp": 4, "fsdp_version": 2},
        dict(LORA, precision="mixed", fsdp=2, fsdp_version=1, fsdp_sharding="shard-grad-op", cpu_offload=True),
        {"method": "full", "precision": "mixed", "deepspeed": "zero2", "offload_optimizer": True},
        {
            "method": "full",
            "precision": "bf16",
            "deepspeed": "zero3",
            "offload_optimizer": True,
            "offload_params": True,
            "nodes": 2,
        },
    ],
}
CASES = [(fmt, i, setup) for fmt, setups in ROUND_TRIPS.items() for i, setup in enumerate(setups)]


@pytest.mark.parametrize("fmt,i,fields", CASES, ids=[f"{f}-{i}" for f, i, _ in CASES])
def test_emit_reads_back_the_same_setup(tmp_path, fmt, i, fields):
    setup = TrainingSetup(**fields)
    header = {"predicted peak per GPU": "12.3 GiB", "host RAM": "4.0 GiB", "command": "vramplan plan llama-3.1-8b"}
    text = emit(fmt, setup, MODEL, header, world=2)
    assert "# predicted peak per GPU: 12.3 GiB" in text and "# command: vramplan plan llama-3.1-8b" in text
    path = tmp_path / f"{fmt}.yaml"
    write_atomic(path, text)
    reading = read_config([str(path)])
    world = setup.fsdp if setup.fsdp > 1 else None
    back = dict(setup_fields(reading, world=world))
    if fmt == "accelerate":  # the launch file carries the engine and autocast; the rest is the trainer's
        back.update({k: v for k, v in fields.items() if k not in back})
    back.pop("stack", None)
    want = setup.model_copy(update={"stack": Stack.PLAIN}).model_dump()
    got = TrainingSetup(**back).model_dump()
    for name in ("model_dtype", "adapter_dtype", "lora_targets", "lora_target_modules", "stack"):
        want.pop(name), got.pop(name)  # compared resolved below
    assert got == want
    got_setup = TrainingSetup(**back)
    assert got_setup.weight_dtype == setup.weight_dtype
    if setup.lora_like:
        assert got_setup.adapter_store_dtype == setup.adapter_store_dtype


@pytest.mark.parametrize(
    "fmt,fields,needle",
    [
        (
            "axolotl",
            {"method": "qlora", "quant": "hqq4", "precision": "mixed", "model_dtype": "bf16", "kbit_prep": True},
            "axolotl cannot express quant=hqq4",
        ),
        ("llamafactory", {"method": "full", "precision": "mixed", "fsdp": 2}, "llamafactory cannot express fsdp=2"),
        ("trl", {"method": "full", "precision": "mixed", "loss": "hf"}, "trl cannot express loss=hf"),
        ("torchtune", {"method": "full", "precision": "mixed"}, "torchtune cannot express"),
        (
            "torchtune",
            {
                "stack": "torchtune",
                "method": "full",
                "precision": "bf16",
                "deepspeed": "zero2",
                "offload_optimizer": True,
            },
            "torchtune cannot express deepspeed=zero2",
        ),
        (
            "axolotl",
            {"method": "full", "precision": "mixed", "model_dtype": "bf16", "fp32_embeddings_norms": True}
            | {"fp32_outputs": False, "optimizer_in_backward": True},
            "optimizer_in_backward",
        ),
        # outside FSDP and DeepSpeed axolotl's full fine-tune runs under the Trainer's autocast
        ("axolotl", {"method": "full", "precision": "bf16", "model_dtype": "bf16"}, "precision=bf16"),
    ],
)
def test_emit_refuses_what_the_format_cannot_say(fmt, fields, needle):
    with pytest.raises(VramplanError) as e:
        emit(fmt, TrainingSetup(**fields), MODEL, {})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.yaml"
    write_atomic(target, "a: 1\n")
    assert target.read_text() == "a: 1\n"
    with pytest.raises(TypeError):
        write_atomic(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "a: 1\n"
    assert sorted(os.listdir(tmp_path)) == ["out.yaml"]


def test_training_arguments_fields_are_known_not_unknown(tmp_path):
    f = tmp_path / "args.json"
    f.write_text(
        '{"output_dir": "o", "per_device_train_batch_size": 1, "eval_accumulation_steps": 2, '
        '"hub_strategy": "end", "mystery_knob": 1}'
    )
    assert read_config([str(f)]).unknown == ("mystery_knob",)


def test_trl_bundled_accelerate_config_and_processes(tmp_path):
    """`accelerate_config: zero3` names trl/accelerate_configs/zero3.yaml (trl==1.16.0 cli/accelerate_config.py);
    PEFT under ZeRO-3 gets bf16 adapters and reentrant checkpointing (sft_trainer.py:845-857, 880-895)."""
    f = tmp_path / "sft.yaml"
    f.write_text("model_name_or_path: m/n\nuse_peft: true\naccelerate_config: zero3\nnum_processes: 4\n")
    reading = read_config([str(f)])
    assert (reading.distributed, reading.world) == (Distributed.DEEPSPEED, 4)
    assert reading.fields == {
        "method": Method.LORA,
        "loss": Loss.TRL_CHUNKED_NLL,
        "deepspeed": DeepSpeedStage.ZERO3,
        "adapter_dtype": AdapterDtype.BF16,
        "kbit_prep": False,
        "checkpoint_reentrant": True,
    }


@pytest.mark.parametrize("path", sorted(str(p.relative_to(DATA)) for p in DATA.glob("*/*") if p.suffix != ".md"))
def test_wrong_typed_values_give_one_line_errors(path):
    """Every key of every sample, set to a value of the wrong shape: a reading or a one-line
    VramplanError, never another exception."""
    from vramplan.configs.combine import read_one

    data = load_file(DATA / path)
    for key in data:
        for value in (-1, "x", [1], {"a": 1}):
            try:
                read_one({**data, key: value}, path)
            except VramplanError as e:
                assert "\n" not in str(e)


def test_torchtune_compile_true_is_read_as_compile(tmp_path):
    """torchtune's `compile: True` (training/_compile.py compile_model + compile_loss) is
    modelled now (--compile), not reported as unmodelled; the shipped `compile: False` reads False."""
    text = (DATA / "torchtune/8B_qlora_single_device.yaml").read_text()
    assert "compile: False" in text
    f = tmp_path / "tt.yaml"
    f.write_text(text.replace("compile: False", "compile: True"))
    reading = read_config([str(f)])
    assert reading.fields["compile"] is True
    assert "compile" not in {u.key for u in reading.unmodelled}
    assert read_config([str(DATA / "torchtune/8B_qlora_single_device.yaml")]).fields["compile"] is False


def test_torchtune_linear_cross_entropy_is_its_own_loss(tmp_path):
    """The repository HEAD's LinearCrossEntropyLoss (pytorch/torchtune@bd2a0fc; the HEAD recipe
    configs name it) projects inside the loss: read as --loss torchtune-linear-ce, not as the
    chunked loss whose model returns 8 chunks of logits."""
    text = (DATA / "torchtune/8B_full_single_device.yaml").read_text()
    assert "torchtune.modules.loss.CEWithChunkedOutputLoss" in text
    f = tmp_path / "tt.yaml"
    f.write_text(text.replace("CEWithChunkedOutputLoss", "LinearCrossEntropyLoss"))
    reading = read_config([str(f)])
    assert reading.fields["loss"] == Loss.TORCHTUNE_LINEAR_CE
    assert "loss._component_" not in {u.key for u in reading.unmodelled}


def test_torchtune_custom_sharded_layers_reads_as_embedding_units(tmp_path):
    # torchtune==0.6.1 recipes/configs/llama3_1/70B_full.yaml:77; an empty list keeps them in the root
    base = (
        "model:\n  _component_: torchtune.models.llama3_1.llama3_1_70b\n"
        "batch_size: 2\nfsdp_cpu_offload: True\ndtype: bf16\n"
    )
    for listed, want in (("['tok_embeddings', 'output']", True), ("[]", False)):
        path = tmp_path / "tt.yaml"
        path.write_text(base + f"custom_sharded_layers: {listed}\n")
        fields = dict(setup_fields(read_config([str(path)]), world=8))
        assert fields["fsdp_embedding_units"] is want
    path.write_text(base + "custom_sharded_layers: tok_embeddings\n")
    with pytest.raises(VramplanError, match="custom_sharded_layers"):
        read_config([str(path)])


@pytest.mark.parametrize("builder", sorted(__import__("vramplan.configs.torchtune", fromlist=["x"]).SAME_SHAPE))
def test_torchtune_builders_read_as_a_preset_of_the_same_shape(builder, tmp_path):
    """A builder without a checkpoint among the presets (Llama 3 8B, Qwen2, Phi-4, Gemma 7B)
    reads as the preset its torchtune==0.6.1 _model_builders.py numbers (transcribed in
    SAME_SHAPE) describe: the preset's own analysis must have those numbers."""
    from vramplan.configs.torchtune import SAME_SHAPE
    from vramplan.memory.types import LinearRole
    from vramplan.model_loader import load_model_spec

    module, hf_id, shape = SAME_SHAPE[builder]
    spec = load_model_spec(hf_id)
    layer = spec.layers[0]
    mlp = sum(lin.out_features for lin in layer.linears if lin.role in (LinearRole.GATE, LinearRole.GATE_UP))
    mlp //= 2 if any(lin.role == LinearRole.GATE_UP for lin in layer.linears) else 1
    got = (spec.vocab, spec.num_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.hidden, mlp)
    assert got + (int(spec.tied_embeddings),) == shape
    path = tmp_path / "tt.yaml"
    path.write_text(f"model:\n  _component_: torchtune.models.{module}.lora_{builder}\n  lora_rank: 8\n")
    reading = read_config([str(path)])
    assert reading.model == hf_id and any(u.field == "model" and builder in u.note for u in reading.used_keys)


def test_torchtune_distributed_lora_from_its_header_and_phi3_names(tmp_path):
    """torchtune's distributed LoRA configs (llama2/13B_lora.yaml) carry no fsdp key: their
    header comment names lora_finetune_distributed.py, which shards with FSDP2. Phi-3's split
    q/k/v and w1/w3 adapt HF's fused Linears; apply_lora_to_output is reported, not targeted."""
    body = (
        "model:\n  _component_: torchtune.models.phi3.lora_phi3_mini\n  lora_attn_modules: ['q_proj', 'v_proj', "
        "'output_proj']\n  apply_lora_to_mlp: True\n  apply_lora_to_output: True\n  lora_rank: 8\n"
    )
    header = "# Config for multi-device LoRA in lora_finetune_distributed.py\n# using a Phi3 Mini 4K Instruct\n"
    dist, single = tmp_path / "mini_lora.yaml", tmp_path / "mini_lora_single_device.yaml"
    dist.write_text(header + body)
    single.write_text(header.replace("multi-device", "single-device").replace("_distributed", "_single_device") + body)
    reading = read_config([str(dist)])
    assert reading.distributed == Distributed.FSDP and reading.fields["fsdp_version"] == 2
    assert read_config([str(single)]).distributed == Distributed.NONE
    assert reading.fields["lora_target_modules"] == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert "model.apply_lora_to_output" in [u.key for u in reading.unmodelled]


def test_torchtune_phi4_builds_with_phi3s_split_projections(tmp_path):
    """torchtune==0.6.1 phi4/_model_builders.py:6 builds Phi-4 from phi3's components."""
    path = tmp_path / "14B_lora_single_device.yaml"
    path.write_text(
        "model:\n  _component_: torchtune.models.phi4.lora_phi4_14b\n  lora_attn_modules: ['q_proj', 'k_proj']\n"
        "  apply_lora_to_mlp: False\n"
    )
    reading = read_config([str(path)])
    assert reading.model == "microsoft/phi-4" and reading.fields["lora_target_modules"] == ("qkv_proj",)


def test_eight_bit_bases_read_as_llm_int8(tmp_path):
    """quantization_bit: 8 (llamafactory==0.9.5 model/model_utils/quantization.py:168-170), TRL's
    load_in_8bit (trl==1.16.0 trainer/utils.py:270-273) and axolotl's load_in_8bit with adapter:
    lora (loaders/model.py:829-838) all load bitsandbytes LLM.int8: LoRA on an int8 base."""
    lf = tmp_path / "lf.yaml"
    lf.write_text("model_name_or_path: m\nstage: sft\nfinetuning_type: lora\nquantization_bit: 8\n")
    trl = tmp_path / "trl.yaml"
    trl.write_text("model_name_or_path: m\nuse_peft: true\nload_in_8bit: true\n")
    axo = tmp_path / "axo.yml"
    axo.write_text("base_model: m\nadapter: lora\nload_in_8bit: true\n")
    for path in (lf, trl, axo):
        reading = read_config([str(path)])
        assert (reading.fields["method"], reading.fields["quant"]) == (Method.QLORA, Quant.INT8), path.name
        assert reading.unmodelled == (), path.name
    bare = tmp_path / "full.yaml"
    bare.write_text("model_name_or_path: m\nload_in_8bit: true\n")  # TRL: an 8-bit base trains only through adapters
    with pytest.raises(VramplanError, match="use_peft"):
        read_config([str(bare)])


@pytest.mark.parametrize("key", ["rl: ebft", "process_reward_model: true", "unfrozen_parameters: ['^lm_head.weight$']"])
def test_axolotl_training_modes_not_modelled_are_said(tmp_path, key):
    """EBFT, process reward models and partial freezing are estimated as one SFT step: one line says
    so (rl: dpo, kto, orpo, simpo and grpo are modelled: tests/test_preference.py, test_kto.py,
    test_orpo.py, test_grpo.py; reward_model: tests/test_reward.py)."""
    f = tmp_path / "a.yml"
    kernels_off = "lora_mlp_kernel: false\nlora_qkv_kernel: false\nlora_o_kernel: false\n"  # else auto-enabled
    f.write_text(f"base_model: x/y\nadapter: lora\nattn_implementation: flash_attention_2\n{kernels_off}{key}\n")
    reading = read_config([str(f)])
    assert [u.key for u in reading.unmodelled] == [key.split(":")[0]]
    assert reading.unknown == ()


def test_flash_attention_3_from_the_hub_reads_as_flash(tmp_path):
    """axolotl's examples name FA3 through the Hub's kernels; it saves what FA2 saves."""
    f = tmp_path / "a.yaml"
    f.write_text(
        "base_model: meta-llama/Llama-3.1-8B\nmicro_batch_size: 1\n"
        "attn_implementation: kernels-community/vllm-flash-attn3\n"
    )
    assert read_config([str(f)]).fields["attention"] == Attention.FLASH


def test_a_trl_preference_config_is_said_not_unknown(tmp_path):
    """Keys SFTConfig lacks that trl==1.16.0's DPOConfig lacks too (max_prompt_length: DPO's before
    TRL 1.0, CPO's and ORPO's): the file is another trainer's, said, estimated as SFT (a DPOConfig
    file is DPO's: tests/test_preference.py; a GRPOConfig file GRPO's: tests/test_grpo.py)."""
    f = tmp_path / "dpo.yaml"
    f.write_text("model_name_or_path: Qwen/Qwen2.5-7B\nbeta: 0.1\nmax_prompt_length: 1024\nmax_length: 2048\n")
    reading = read_config([str(f)])
    assert reading.unknown == ()
    assert [u.key for u in reading.unmodelled] == ["max_prompt_length"] and "SFT" in reading.unmodelled[0].why
    assert "objective" not in reading.fields
    g = tmp_path / "grpo.yaml"
    g.write_text("model_name_or_path: Qwen/Qwen2.5-7B\nnum_generations: 8\nuse_vllm: true\n")
    assert read_config([str(g)]).fields["objective"].value == "grpo"
