"""Write a runnable config for a setup (axolotl, TRL, LLaMA-Factory, torchtune, accelerate).

Every memory-relevant key is written explicitly, and the text is read back with the
same readers before it is returned: a field the format cannot say (hqq4 in axolotl, FSDP
in a LLaMA-Factory file) makes ``emit`` refuse in one line naming the format and the field.
Templates: research configs/emit/ (axolotl==0.19.0, trl==1.16.0, llamafactory==0.9.5,
torchtune==0.6.1, accelerate==1.16.0).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from vramplan.configs import combine
from vramplan.configs.reading import ENGINE_FIELDS, ConfigFormat, fmt_value
from vramplan.configs.torchtune import BUILDERS
from vramplan.errors import VramplanError
from vramplan.setup import (
    ActivationOffload,
    AdapterDtype,
    Attention,
    FsdpSharding,
    Generation,
    LigerLayers,
    LoraTargets,
    Loss,
    Method,
    ModelDtype,
    Objective,
    Optim,
    OptimFamily,
    Packing,
    Precision,
    Quant,
    QuantStorage,
    TrainingSetup,
)

EMIT_FORMATS = ("axolotl", "trl", "llamafactory", "torchtune", "accelerate")
_ATTENTION_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
_HF_ATTN = {Attention.SDPA: "sdpa", Attention.EAGER: "eager", Attention.FLASH: "flash_attention_2"}
_V1_STRATEGY = {
    FsdpSharding.FULL: "FULL_SHARD",
    FsdpSharding.SHARD_GRAD_OP: "SHARD_GRAD_OP",
    FsdpSharding.NO_SHARD: "NO_SHARD",
    FsdpSharding.HYBRID: "HYBRID_SHARD",
}
_HINTS = {
    ("llamafactory", "fsdp"): "; launch it with an accelerate config (--emit accelerate)",
    ("trl", "packing"): "; TRL packs padding-free (padding_free) or not at all",
}


# the formats besides trl that write each non-SFT objective's trainer
_OBJECTIVE_FORMATS = {
    Objective.REWARD: ("axolotl", "llamafactory"),
    Objective.GRPO: ("axolotl",),
    Objective.DPO: ("axolotl", "llamafactory"),
    Objective.KTO: ("axolotl", "llamafactory"),
    Objective.ORPO: ("axolotl",),
}


def emit(fmt: str, setup: TrainingSetup, model_id: str, header: dict[str, Any], world: int | None = None) -> str:
    """The config text for ``fmt``; ``header`` lines (predicted peak, host RAM, command) go on top
    as comments; ``world`` = GPUs for DeepSpeed/DDP launches (FSDP takes ``setup.fsdp``)."""
    if fmt not in _BUILDERS:
        raise VramplanError(f"must be one of {', '.join(EMIT_FORMATS)}, got {fmt!r}", "--emit")
    others = _OBJECTIVE_FORMATS.get(setup.objective, ())
    if setup.objective != Objective.SFT and fmt not in ("trl", "accelerate", *others):
        trainer = {Objective.DPO: "DPOTrainer", Objective.GRPO: "GRPOTrainer", Objective.KTO: "KTOTrainer"}.get(
            setup.objective, "RewardTrainer"
        )
        raise VramplanError(
            f"{fmt} cannot express objective={setup.objective.value}: the step modelled is TRL 1.16's "
            f"{trainer}; write --emit trl" + "".join(f" or {o}" for o in others),
            "--emit",
        )
    run, body = _BUILDERS[fmt](setup, model_id, world)
    lines = [f"# Written by vramplan --emit {fmt}. Run: {run}"]
    lines += [f"# {key}: {' '.join(str(value).split())}" for key, value in header.items()]
    lines.append("# Dataset, output and checkpoint paths are placeholders: edit them; keep the memory keys.")
    text = "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)
    _check_round_trip(fmt, setup, text)
    return text


def write_atomic(path: str | Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename it over ``path``, so a
    reader never sees half a file and a failed run leaves nothing behind."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- the round trip


def effective(setup: TrainingSetup, fmt: str) -> dict[str, Any]:
    """The fields that decide memory, with defaults resolved and fields the setup does not use dropped."""
    out = setup.model_dump()
    out["model_dtype"], out["adapter_dtype"] = setup.weight_dtype, setup.adapter_store_dtype
    out["lora_target_modules"] = _target_modules(setup)
    for name in ("stack", "lora_targets", "fp32_outputs", "nodes", "data_parallel"):  # DDP ranks: from --gpus
        out.pop(name)
    if not setup.lora_like:
        for name in ("lora_r", "lora_dropout", "lora_target_modules", "adapter_dtype", "kbit_prep", "dora"):
            out.pop(name)
        out.pop("modules_to_save"), out.pop("modules_to_save_dtype")
    else:  # the copies' dtype as the step holds them (parameters._dense_param_bytes)
        out["modules_to_save_dtype"] = setup.modules_to_save_dtype if setup.modules_to_save else None
    if setup.method != Method.GALORE:
        out.pop("galore_rank"), out.pop("galore_update_proj_gap")
    if setup.optim.traits.family != OptimFamily.APOLLO_ADAMW:
        out.pop("apollo_rank")
    if setup.fsdp == 1:
        out.pop("fsdp_version"), out.pop("fsdp_sharding"), out.pop("fsdp_embedding_units")
    if fmt == "accelerate":  # the launch file owns the engine and the autocast, nothing else
        out = {k: v for k, v in out.items() if k in ENGINE_FIELDS or k == "precision"}
        out["nodes"] = setup.nodes
    return out


def _target_modules(setup: TrainingSetup) -> tuple[str, ...] | str:
    if setup.lora_target_modules:
        return tuple(setup.lora_target_modules)
    return "all-linear" if setup.lora_targets == LoraTargets.ALL_LINEAR else _ATTENTION_QKVO


def _check_round_trip(fmt: str, setup: TrainingSetup, text: str) -> None:
    try:
        reading = combine.read_text(text, f"<{fmt} emit>", ConfigFormat(fmt))
    except VramplanError as e:  # e.g. an optimizer name its trainer does not take
        raise VramplanError(f"{fmt} cannot express this setup ({e.message})", "--emit") from None
    fields = combine.setup_fields(reading, world=setup.fsdp if setup.fsdp > 1 else None)
    if setup.objective == Objective.GRPO:  # the prompt length is the dataset's, not a GRPOConfig key
        fields["seq_len"] = setup.seq_len
    if fmt == "accelerate":
        fields = {k: v for k, v in fields.items() if k in ENGINE_FIELDS or k == "precision"}
        fields.update({k: getattr(setup, k) for k in ("method", "optim", "quant") if k not in fields})
    from vramplan.estimate import make_setup  # the stack fills what the file leaves out, as `--config` does

    try:
        back = effective(make_setup(**fields), fmt)
    except (VramplanError, ValueError) as e:
        raise VramplanError(f"{fmt} cannot express this setup ({str(e).splitlines()[0]})", "--emit") from None
    want = effective(make_setup(**setup.model_dump()), fmt)  # the same stack fill on both sides
    for name, value in want.items():
        if back.get(name) != value:
            hint = _HINTS.get((fmt, name), "")
            raise VramplanError(
                f"{fmt} cannot express {name}={fmt_value(value)} (its config reads back as "
                f"{fmt_value(back.get(name))}){hint}",
                "--emit",
            )


# ---- shared pieces


def _deepspeed_json(s: TrainingSetup) -> dict:
    """The HF-integration DeepSpeed config: "auto" values come from the trainer's arguments."""
    assert s.deepspeed is not None  # called only when the setup uses DeepSpeed
    zero: dict[str, Any] = {"stage": int(s.deepspeed.value[-1]), "overlap_comm": False, "contiguous_gradients": True}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }


def _processes(s: TrainingSetup, world: int | None) -> int:
    return s.fsdp if s.fsdp > 1 else (world or 1)


# ---- axolotl


def _axolotl_adapter(s: TrainingSetup) -> dict[str, Any]:
    """The adapter and its base: qlora + load_in_4bit, or lora + load_in_8bit for an LLM.int8 base
    (axolotl loaders/model.py:801-838)."""
    four = s.method == Method.QLORA and s.quant != Quant.INT8
    d: dict[str, Any] = {"adapter": "qlora" if four else "lora", "load_in_4bit": four}
    if s.quant == Quant.INT8:
        d["load_in_8bit"] = True
    d.update(lora_r=s.lora_r, lora_alpha=2 * s.lora_r, lora_dropout=s.lora_dropout)
    targets = _target_modules(s)
    d.update({"lora_target_linear": True} if targets == "all-linear" else {"lora_target_modules": list(targets)})
    d.update(peft_use_dora=s.dora, peft_autocast_adapter_dtype=s.adapter_store_dtype == AdapterDtype.FP32)
    if s.modules_to_save:
        d["lora_modules_to_save"] = [m.value for m in s.modules_to_save]
    # written either way: unset, axolotl would turn them on itself (utils/schemas/config.py:1974-2085)
    d.update(dict.fromkeys(("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel"), s.lora_kernels))
    return d


def _axolotl(s: TrainingSetup, model: str, world: int | None) -> tuple[str, dict]:
    d: dict[str, Any] = {
        "base_model": model,
        "datasets": [{"path": "tatsu-lab/alpaca", "type": "alpaca"}],
        "output_dir": "./outputs/vramplan",
    }
    if s.lora_like:
        d.update(_axolotl_adapter(s))
    d.update(
        sequence_len=s.seq_len,
        sample_packing=s.packing != Packing.NONE,
        pad_to_sequence_len=True,
        micro_batch_size=s.batch_size,
        gradient_accumulation_steps=s.gradient_accumulation,
        max_steps=100,
        learning_rate=2e-4,
        lr_scheduler="cosine",
        optimizer=s.optim.value,
    )
    d.update(_axolotl_precision(s))
    if s.attention is not None:
        d["attn_implementation"] = _HF_ATTN[s.attention]
    d["gradient_checkpointing"] = s.gradient_checkpointing
    d["gradient_checkpointing_kwargs"] = {"use_reentrant": s.checkpoint_reentrant}
    d["activation_offloading"] = {
        ActivationOffload.NONE: False,
        ActivationOffload.ALL: True,
        ActivationOffload.CHECKPOINTS: "hidden_states",
        ActivationOffload.UNSLOTH: "legacy",
    }[s.activation_offload]
    loss_keys: dict[Loss, dict[str, Any]] = {
        Loss.CCE: {
            "plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"],
            "cut_cross_entropy": True,
        },
        Loss.LIGER: {
            "plugins": ["axolotl.integrations.liger.LigerPlugin"],
            "liger_fused_linear_cross_entropy": True,
        },
        Loss.CHUNKED: {"chunked_cross_entropy": True},
    }
    d.update(loss_keys.get(s.loss, {}))
    if s.liger_layers != LigerLayers.NONE:  # the LigerPlugin's layer keys (integrations/liger/plugin.py:196-229)
        d["plugins"] = sorted({*d.get("plugins", []), "axolotl.integrations.liger.LigerPlugin"})
        d.update(liger_rms_norm=s.liger_layers.norms, liger_glu_activation=s.liger_layers.glu)
    if s.fsdp > 1:
        d["fsdp_version"] = s.fsdp_version
        d["fsdp_config"] = {
            "offload_params": s.cpu_offload,
            **_fsdp_sharding(s, prefix=""),
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "state_dict_type": "FULL_STATE_DICT",
        }
    if s.deepspeed is not None:
        d["deepspeed"] = _deepspeed_json(s)
    procs = _processes(s, world)
    d.update(_axolotl_objective(s, procs))
    run = "axolotl train this.yaml" + (f" --num-processes {procs}" if procs > 1 else "")
    # GRPO's prompt length is the dataset's (sequence_len bounds no prompt)
    return run + (f" (prompts up to {s.prompt_len} tokens)" if s.objective == Objective.GRPO else ""), d


def _axolotl_objective(s: TrainingSetup, procs: int) -> dict[str, Any]:
    """The keys of a trainer other than SFT's: a reward model (AutoModelForSequenceClassification
    over pairs: configs/axolotl.py _reward), GRPO, or a preference trainer."""
    if s.objective == Objective.REWARD:
        return {
            "reward_model": True,
            "num_labels": 1,
            "sample_packing": False,
            "datasets": [{"path": "argilla/distilabel-intel-orca-dpo-pairs", "type": "bradley_terry.chat_template"}],
        }
    if s.objective == Objective.GRPO:
        return _axolotl_grpo(s, procs)
    return _axolotl_preference(s)


# axolotl==0.19.0's preference trainers (configs/axolotl.py _dpo, _kto, _orpo) and a dataset of the
# format each takes (its examples: examples/llama-3/qlora-1b-kto.yaml, examples/mistral/orpo/)
_AXOLOTL_PREFERENCE_DATA = {
    Objective.DPO: {"path": "fozziethebeat/alpaca_messages_2k_dpo_test", "type": "chat_template.default"},
    Objective.KTO: {"path": "argilla/ultrafeedback-binarized-preferences-cleaned-kto", "type": "llama3.ultra"},
    Objective.ORPO: {"path": "argilla/ultrafeedback-binarized-preferences-cleaned", "type": "chat_template.argilla"},
}


def _axolotl_preference(s: TrainingSetup) -> dict[str, Any]:
    """`rl: dpo|kto|orpo|simpo` for a DPO, KTO or ORPO setup (the SimPO file when the chosen rows'
    NLL is off: cpo_alpha 0); precompute_ref_log_probs is DPO's only; empty otherwise."""
    if s.objective not in _AXOLOTL_PREFERENCE_DATA:
        return {}
    rl = s.objective.value if s.objective != Objective.ORPO or s.chosen_nll else "simpo"
    d: dict[str, Any] = {"rl": rl, "sample_packing": False, "datasets": [_AXOLOTL_PREFERENCE_DATA[s.objective]]}
    if s.objective == Objective.DPO:
        d["precompute_ref_log_probs"] = s.precompute_ref_log_probs
    if rl == "simpo":
        d["cpo_alpha"] = 0.0
    return d


def _axolotl_grpo(s: TrainingSetup, procs: int) -> dict[str, Any]:
    """`rl: grpo` and the `trl:` keys GRPOStrategy passes to trl==1.9.0's GRPOConfig (axolotl==0.19.0
    core/trainers/grpo/__init__.py:60-160; configs/axolotl.py _grpo): a prompt dataset and a reward
    function, both placeholders (a module of the user's: examples/llama-3/qlora-1b-gdpo.yaml)."""
    trl: dict[str, Any] = {
        "max_completion_length": s.completion_len,
        "num_generations": _num_generations(s),
        "beta": s.beta,
        "num_iterations": s.num_iterations,
        "use_vllm": s.generation != Generation.TRANSFORMERS,
        "reward_funcs": ["rewards.accuracy_reward"],
    }
    if s.steps_per_generation is not None:  # axolotl's trl: has no steps_per_generation key
        trl["generation_batch_size"] = s.batch_size * s.steps_per_generation * procs
    d: dict[str, Any] = {"rl": "grpo", "trl": trl, "sample_packing": False}
    if s.generation != Generation.TRANSFORMERS:
        trl["vllm_mode"] = "colocate" if s.generation == Generation.VLLM_COLOCATE else "server"
        if s.generation == Generation.VLLM_COLOCATE:
            d["vllm"] = {"gpu_memory_utilization": s.vllm_gpu_memory_utilization}
    d["datasets"] = [{"path": "openai/gsm8k", "name": "main", "split": "train", "type": "rewards.gsm8k_transform"}]
    return d


def _axolotl_precision(s: TrainingSetup) -> dict:
    if s.precision == Precision.FP16:
        return {"fp16": True, "bf16": False}
    if s.weight_dtype == ModelDtype.FP32 and s.precision == Precision.BF16:
        return {"bf16": False}
    if s.precision == Precision.BF16 and s.lora_like:
        return {"bfloat16": True, "bf16": False}  # pure bf16 adapters, no autocast
    return {"bf16": True}


def _fsdp_sharding(s: TrainingSetup, prefix: str) -> dict:
    if s.fsdp_version == 2:
        if s.fsdp_sharding not in (FsdpSharding.FULL, FsdpSharding.SHARD_GRAD_OP):
            return {f"{prefix}sharding_strategy": _V1_STRATEGY[s.fsdp_sharding]}
        return {f"{prefix}reshard_after_forward": s.fsdp_sharding == FsdpSharding.FULL}
    return {f"{prefix}sharding_strategy": _V1_STRATEGY[s.fsdp_sharding]}


# ---- TRL


def _trl(s: TrainingSetup, model: str, world: int | None) -> tuple[str, dict]:
    d: dict[str, Any] = {
        "model_name_or_path": model,
        "dtype": "bfloat16" if s.weight_dtype == ModelDtype.BF16 else "float32",
    }
    if s.attention is not None:
        d["attn_implementation"] = _HF_ATTN[s.attention]
    d.update(dataset_name="trl-lib/Capybara", output_dir="./outputs/vramplan", use_peft=s.lora_like)
    if s.lora_like:
        if s.quant == Quant.INT8:
            d.update(load_in_8bit=True)
        elif s.method == Method.QLORA:
            d.update(load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
            if s.quant_storage_dtype == QuantStorage.BF16:
                d["bnb_4bit_quant_storage"] = "bfloat16"  # sharded by accelerate's FSDP2
        targets = _target_modules(s)
        d.update(
            lora_r=s.lora_r,
            lora_alpha=2 * s.lora_r,
            lora_dropout=s.lora_dropout,
            lora_target_modules=targets if targets == "all-linear" else list(targets),
            use_dora=s.dora,
        )
        if s.modules_to_save:
            d["lora_modules_to_save"] = [m.value for m in s.modules_to_save]
    d.update(
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.gradient_accumulation,
        max_length=s.seq_len,
        packing=False,
        padding_free=s.packing == Packing.PADDING_FREE,
        max_steps=100,
        learning_rate=2e-4,
        optim=s.optim.value,
        bf16=s.precision == Precision.MIXED,
        fp16=s.precision == Precision.FP16,
        gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={
            "use_reentrant": s.checkpoint_reentrant,
            **({"offload": True} if s.activation_offload == ActivationOffload.CHECKPOINTS else {}),
        },
        activation_offloading=s.activation_offload == ActivationOffload.ALL,
        loss_type="nll",
        report_to="none",
    )
    d.update(_trl_liger(s.liger_layers))
    trainer = _TRL_TRAINERS.get(s.objective)
    run = trainer(s, d) if trainer is not None else "trl sft --config this.yaml"
    if s.fsdp > 1:
        tokens = {
            FsdpSharding.FULL: "full_shard",
            FsdpSharding.SHARD_GRAD_OP: "shard_grad_op",
            FsdpSharding.NO_SHARD: "no_shard",
            FsdpSharding.HYBRID: "hybrid_shard",
        }[s.fsdp_sharding]
        d["fsdp"] = f"{tokens} auto_wrap" + (" offload" if s.cpu_offload else "")
        d["fsdp_config"] = {"version": s.fsdp_version}
        d["num_processes"] = s.fsdp
    if s.deepspeed is not None:
        d["deepspeed"] = _deepspeed_json(s)
        d["num_processes"] = world or 1
    return run, d


def _trl_dpo(s: TrainingSetup, d: dict[str, Any]) -> str:
    """`trl dpo --config`: DPOConfig's keys in place of SFTConfig's packing (a DPOConfig has no
    packing field, trl==1.16.0 trainer/dpo_config.py) and loss_type; a preference dataset."""
    del d["packing"]
    d.update(
        dataset_name="trl-lib/ultrafeedback_binarized",
        loss_type=["sigmoid"],
        beta=0.1,
        precompute_ref_log_probs=s.precompute_ref_log_probs,
        learning_rate=5e-6 if not s.lora_like else 5e-5,
    )
    return "trl dpo --config this.yaml"


def _trl_kto(s: TrainingSetup, d: dict[str, Any]) -> str:
    """`trl kto --config`: KTOConfig's keys (trl==1.16.0 trainer/kto_config.py: no packing or
    padding_free; loss_type kto or apo_zero_unpaired, the desirable and undesirable weights that
    mark the file a KTO one); an unpaired preference dataset."""
    for key in ("packing", "padding_free"):
        del d[key]
    d.update(
        dataset_name="trl-lib/kto-mix-14k",
        loss_type="kto" if s.kto_kl else "apo_zero_unpaired",
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.0,
        precompute_ref_log_probs=s.precompute_ref_log_probs,
        learning_rate=5e-7 if not s.lora_like else 5e-5,
    )
    return "trl kto --config this.yaml"


def _trl_reward(s: TrainingSetup, d: dict[str, Any]) -> str:
    """`trl reward --config`: RewardConfig has no packing, padding_free or loss_type (trl==1.16.0
    trainer/reward_config.py); center_rewards_coefficient (None: off) marks the file a reward
    model's; peft's SEQ_CLS task trains the score head (ModelConfig.lora_task_type, CAUSAL_LM
    unless set: trl/scripts/reward.py passes it to get_peft_config); a preference dataset."""
    for key in ("packing", "padding_free", "loss_type"):
        del d[key]
    d.update(
        dataset_name="trl-lib/ultrafeedback_binarized",
        center_rewards_coefficient=None,
        learning_rate=1e-5 if not s.lora_like else 1e-4,
    )
    if s.lora_like:
        d["lora_task_type"] = "SEQ_CLS"
    return "trl reward --config this.yaml"


def _trl_grpo(s: TrainingSetup, d: dict[str, Any]) -> str:
    """`trl grpo --config`: GRPOConfig's keys (trl==1.16.0 trainer/grpo_config.py) in place of
    SFTConfig's max_length, packing and loss_type; a prompt-only dataset and a reward function.
    The prompt length is not a GRPOConfig key (prompts are not truncated): the header says it."""
    for key in ("packing", "padding_free", "max_length", "loss_type"):
        d.pop(key, None)
    d.update(
        dataset_name="trl-lib/DeepMath-103K",
        reward_funcs=["accuracy_reward"],
        max_completion_length=s.completion_len,
        num_generations=_num_generations(s),
        beta=s.beta,
        num_iterations=s.num_iterations,
        learning_rate=1e-6 if not s.lora_like else 1e-5,
    )
    if s.steps_per_generation is not None:
        d["steps_per_generation"] = s.steps_per_generation
    if s.generation != Generation.TRANSFORMERS:
        d["use_vllm"] = True
        d["vllm_mode"] = "colocate" if s.generation == Generation.VLLM_COLOCATE else "server"
        if s.generation == Generation.VLLM_COLOCATE:
            d["vllm_gpu_memory_utilization"] = s.vllm_gpu_memory_utilization
    return f"trl grpo --config this.yaml (prompts up to {s.prompt_len} tokens)"


# `trl <trainer> --config`: each objective's keys in place of SFTConfig's, and its run line
_TRL_TRAINERS: dict[Objective, Any] = {
    Objective.DPO: _trl_dpo,
    Objective.GRPO: _trl_grpo,
    Objective.REWARD: _trl_reward,
    Objective.KTO: _trl_kto,
}


def _num_generations(s: TrainingSetup) -> int:
    """GRPOConfig's num_generations (default 8): at least 2 (completions are compared within a
    prompt's group) and a divisor of the generation batch (grpo_trainer.py checks both): the largest
    of 8, 4 and 2 that divides it."""
    rows = s.generation_rows * max(s.data_parallel, 1)
    n = next((n for n in (8, 4, 2) if rows % n == 0), None)
    if n is None:
        raise VramplanError(
            f"a GRPO generation batch of {rows} completion(s) cannot hold two completions per prompt: "
            "raise --batch-size or --steps-per-generation to an even count",
            "--emit",
        )
    return n


def _trl_liger(layers: LigerLayers) -> dict[str, Any]:
    """SFTTrainer applies only Liger's layer kernels (trl==1.16.0 sft_trainer.py:1125-1140);
    liger_kernel_config turns one off."""
    if layers == LigerLayers.NONE:
        return {}
    if layers == LigerLayers.ALL:
        return {"use_liger_kernel": True}
    config = {"rms_norm": layers.norms, "swiglu": layers.glu, "geglu": layers.glu}
    return {"use_liger_kernel": True, "liger_kernel_config": config}


# ---- LLaMA-Factory


def _llamafactory(s: TrainingSetup, model: str, world: int | None) -> tuple[str, dict]:
    d: dict[str, Any] = {"model_name_or_path": model}
    if s.method == Method.QLORA:
        bits = 8 if s.quant == Quant.INT8 else 4
        d.update(quantization_bit=bits, quantization_method="hqq" if s.quant == Quant.HQQ4 else "bnb")
        if s.quant == Quant.NF4:
            d.update(quantization_type="nf4", double_quantization=True)
    if s.attention is not None:
        d["flash_attn"] = {Attention.SDPA: "sdpa", Attention.FLASH: "fa2", Attention.EAGER: "disabled"}[s.attention]
    d.update(
        enable_liger_kernel=s.loss == Loss.LIGER or s.liger_layers != LigerLayers.NONE,
        use_unsloth_gc=s.activation_offload == ActivationOffload.UNSLOTH,
        disable_gradient_checkpointing=not s.gradient_checkpointing,
        use_reentrant_gc=s.checkpoint_reentrant,
        stage="sft",
        do_train=True,
        finetuning_type="lora" if s.lora_like else "freeze" if s.train_layers is not None else "full",
    )
    if s.train_layers is not None:  # the last N layers, whole (model/adapter.py:57-131)
        d.update(freeze_trainable_layers=s.train_layers, freeze_trainable_modules="all")
    if s.method == Method.GALORE:
        d.update(
            use_galore=True,
            galore_target="all",
            galore_rank=s.galore_rank,
            galore_update_interval=s.galore_update_proj_gap,
            galore_layerwise=s.optim.layerwise,
        )
    d.update(_lf_custom_optimizer(s.optim, s.apollo_rank))
    if s.lora_like:
        targets = _target_modules(s)
        d.update(
            lora_rank=s.lora_r,
            lora_alpha=2 * s.lora_r,
            lora_dropout=s.lora_dropout,
            lora_target="all" if targets == "all-linear" else ",".join(targets),
            use_dora=s.dora,
        )
        if s.modules_to_save:
            d["additional_target"] = ",".join(m.value for m in s.modules_to_save)
    pure = s.precision == Precision.BF16 and s.weight_dtype == ModelDtype.BF16
    d.update(
        pure_bf16=pure,
        dataset="alpaca_en_demo",
        template="default",
        cutoff_len=s.seq_len,
        packing=s.packing == Packing.POSITION_IDS,
        neat_packing=s.packing == Packing.POSITION_IDS,
        output_dir="saves/vramplan",
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.gradient_accumulation,
        learning_rate=1.0e-4,
        max_steps=100,
        optim=_lf_optim(s.optim),
        bf16=s.precision == Precision.MIXED or pure,
        fp16=s.precision == Precision.FP16,
        report_to="none",
    )
    d.update(_lf_stage(s))
    if s.deepspeed is not None:
        d["deepspeed"] = _deepspeed_json(s)
    procs = _processes(s, world)  # llamafactory/cli.py starts torchrun when FORCE_TORCHRUN is set
    return (f"FORCE_TORCHRUN=1 NPROC_PER_NODE={procs} " if procs > 1 else "") + "llamafactory-cli train this.yaml", d


def _lf_stage(s: TrainingSetup) -> dict[str, Any]:
    """LLaMA-Factory's stage for a trainer other than SFT's (configs/llamafactory.py _stage): rm
    (PairwiseTrainer over a value head), dpo (CustomDPOTrainer; simpo needs no reference: the
    precomputed case), kto (CustomKTOTrainer, its KL rows always); none pack."""
    pairs = {"packing": False, "neat_packing": False}
    if s.objective == Objective.REWARD:
        return {"stage": "rm", "dataset": "dpo_en_demo", **pairs}
    if s.objective == Objective.DPO:
        loss = "simpo" if s.precompute_ref_log_probs else "sigmoid"
        return {"stage": "dpo", "dataset": "dpo_en_demo", **pairs, "pref_beta": 0.1, "pref_loss": loss}
    if s.objective == Objective.KTO:
        return {"stage": "kto", "dataset": "kto_en_demo", **pairs, "pref_beta": 0.1}
    return {}


def _lf_optim(optim: Optim) -> str:
    """LLaMA-Factory picks the GaLore variant from use_galore/galore_layerwise and the 8-bit-ness of
    optim; APOLLO needs optim adamw_torch; Muon and Adam-mini ignore it (train/trainer_utils.py)."""
    if optim.is_galore:
        return Optim.ADAMW_BNB_8BIT.value if optim.is_8bit else Optim.ADAMW_TORCH.value
    if optim.traits.family in (OptimFamily.APOLLO_ADAMW, OptimFamily.MUON, OptimFamily.ADAM_MINI):
        return Optim.ADAMW_TORCH.value
    return optim.value


def _lf_custom_optimizer(optim: Optim, apollo_rank: int) -> dict[str, Any]:
    """The use_* switch LLaMA-Factory builds APOLLO, Muon and Adam-mini from (trainer_utils.py:527-549)."""
    family = optim.traits.family
    if family == OptimFamily.APOLLO_ADAMW:
        return dict(use_apollo=True, apollo_target="all", apollo_rank=apollo_rank, apollo_layerwise=optim.layerwise)
    if family == OptimFamily.MUON:
        return dict(use_muon=True)
    if family == OptimFamily.ADAM_MINI:
        return dict(use_adam_mini=True)
    return {}


# ---- torchtune

_TT_TOKENIZER = {
    "llama3": ("torchtune.models.llama3.llama3_tokenizer", "LLAMA3"),
    "qwen2_5": ("torchtune.models.qwen2_5.qwen2_5_tokenizer", "QWEN2"),
}
_TT_OPTIM: dict[Optim, dict[str, Any]] = {
    Optim.ADAMW_TORCH_FUSED: {"_component_": "torch.optim.AdamW", "fused": True},
    Optim.ADAMW_TORCH: {"_component_": "torch.optim.AdamW", "fused": False},
    Optim.ADAMW_BNB_8BIT: {"_component_": "bitsandbytes.optim.AdamW8bit"},
}

# the loss each --loss is in torchtune (others: the chunked loss, the nearest 0.6.1 has)
_TT_LOSS = {
    Loss.HF: "torch.nn.CrossEntropyLoss",
    Loss.TORCHTUNE_LINEAR_CE: "torchtune.modules.loss.LinearCrossEntropyLoss",
}


def _torchtune_builder(model: str) -> tuple[str, str]:
    wanted = model.lower().removesuffix("-instruct")
    for builder, (family, hf_id) in BUILDERS.items():
        if hf_id.lower().removesuffix("-instruct") == wanted:
            return builder, family
    raise VramplanError(
        f"torchtune has no builder known for {model} (known: {', '.join(sorted({h for _, h in BUILDERS.values()}))})",
        "--emit torchtune",
    )


def _torchtune(s: TrainingSetup, model: str, world: int | None) -> tuple[str, dict]:
    builder, family = _torchtune_builder(model)
    tokenizer = _TT_TOKENIZER.get("llama3" if family.startswith("llama3") else family)
    if tokenizer is None:
        raise VramplanError(f"writes Llama-3 and Qwen2.5 recipes only, not {family}", "--emit torchtune")
    local = f"/tmp/{model.rsplit('/', 1)[-1]}"
    prefix = {Method.QLORA: "qlora_", Method.LORA: "lora_"}.get(s.method, "")
    model_cfg: dict[str, Any] = {"_component_": f"torchtune.models.{family}.{prefix}{builder}"}
    if s.lora_like:
        model_cfg.update(_torchtune_lora(s))
    tok: dict[str, Any] = {"_component_": tokenizer[0], "max_seq_len": s.seq_len}
    tok.update(
        {"path": f"{local}/original/tokenizer.model"}
        if tokenizer[1] == "LLAMA3"
        else {"path": f"{local}/vocab.json", "merges_file": f"{local}/merges.txt"}
    )
    d: dict[str, Any] = {
        "output_dir": "/tmp/torchtune/vramplan",
        "model": model_cfg,
        "tokenizer": tok,
        "checkpointer": {
            "_component_": "torchtune.training.FullModelHFCheckpointer",
            "checkpoint_dir": local,
            "checkpoint_files": {"filename_format": "model-{}-of-{}.safetensors", "max_filename": "00004"},
            "recipe_checkpoint": None,
            "output_dir": "${output_dir}",
            "model_type": tokenizer[1],
        },
        "resume_from_checkpoint": False,
        "dataset": {"_component_": "torchtune.datasets.alpaca_cleaned_dataset", "packed": s.packing != Packing.NONE},
        "seed": None,
        "shuffle": True,
        "batch_size": s.batch_size,
        "optimizer": {**_TT_OPTIM.get(s.optim, {"_component_": s.optim.value}), "lr": 2e-4},
        "loss": {"_component_": _TT_LOSS.get(s.loss, "torchtune.modules.loss.CEWithChunkedOutputLoss")},
        "epochs": 1,
        "max_steps_per_epoch": 100,
        "gradient_accumulation_steps": s.gradient_accumulation,
        "compile": s.compile,
        "device": "cuda",
        "dtype": "bf16" if s.weight_dtype == ModelDtype.BF16 else "fp32",
        "enable_activation_checkpointing": s.gradient_checkpointing,
        "enable_activation_offloading": s.activation_offload == ActivationOffload.ALL,
    }
    if s.method == Method.FULL:  # the LoRA recipes have no optimizer-in-backward
        d["optimizer_in_bwd"] = s.optimizer_in_backward
    if s.fsdp > 1:
        d["fsdp_cpu_offload"] = s.cpu_offload
        d["fsdp_reshard_after_forward"] = s.fsdp_sharding == FsdpSharding.FULL
        d["custom_sharded_layers"] = ["tok_embeddings", "output"] if s.fsdp_embedding_units else []
    kind = "lora" if s.lora_like else "full"
    recipe = f"{kind}_finetune_{'distributed' if s.fsdp > 1 else 'single_device'}"
    nproc = f"--nproc_per_node {s.fsdp} " if s.fsdp > 1 else ""
    return f"tune download {model} --output-dir {local}; tune run {nproc}{recipe} --config this.yaml", d


def _torchtune_lora(s: TrainingSetup) -> dict:
    targets = _target_modules(s)
    names = list(_ATTENTION_QKVO) + ["gate_proj", "up_proj", "down_proj"] if targets == "all-linear" else list(targets)
    to_tt = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
    out: dict[str, Any] = {
        "lora_attn_modules": [to_tt[n] for n in names if n in to_tt],
        "apply_lora_to_mlp": any(n in ("gate_proj", "up_proj", "down_proj") for n in names),
        "apply_lora_to_output": "lm_head" in names,
        "lora_rank": s.lora_r,
        "lora_alpha": 2 * s.lora_r,
        "lora_dropout": s.lora_dropout,
    }
    if s.dora:
        out["use_dora"] = True
    return out


# ---- accelerate


def _accelerate(s: TrainingSetup, model: str, world: int | None) -> tuple[str, dict]:
    procs = _processes(s, world)
    d: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": {Precision.MIXED: "bf16", Precision.FP16: "fp16"}.get(s.precision, "no"),
        "num_machines": s.nodes,
        "num_processes": procs,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
    }
    if s.fsdp > 1:
        d["distributed_type"] = "FSDP"
        d["fsdp_config"] = {
            "fsdp_version": s.fsdp_version,
            **_fsdp_sharding(s, prefix="fsdp_"),
            "fsdp_offload_params": s.cpu_offload,
            "fsdp_activation_checkpointing": False,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT",
        }
    elif s.deepspeed is not None:
        d["distributed_type"] = "DEEPSPEED"
        d["deepspeed_config"] = {
            "zero_stage": int(s.deepspeed.value[-1]),
            "offload_optimizer_device": "cpu" if s.offload_optimizer else "none",
            "offload_param_device": "cpu" if s.offload_params else "none",
            "zero3_init_flag": s.deepspeed.value == "zero3",
            "gradient_accumulation_steps": s.gradient_accumulation,
        }
    else:
        d["distributed_type"] = "MULTI_GPU" if procs > 1 else "NO"
    return "accelerate launch --config_file this.yaml train.py ...", d


_BUILDERS = {
    "axolotl": _axolotl,
    "trl": _trl,
    "llamafactory": _llamafactory,
    "torchtune": _torchtune,
    "accelerate": _accelerate,
}
