"""TRL ``trl sft --config`` YAML (SFTConfig + ModelConfig + ScriptArguments, flat; trl==1.16.0)
and transformers ``TrainingArguments`` YAML/JSON (transformers==5.25.0).

TRL 1.16.0's SFTTrainer always trains through its own fused, chunked LM head
(trl/kernels/chunked_logprob.py; sft_trainer.py:1142-1147, unconditional), whatever
``loss_type`` says, so a TRL file maps to ``loss=trl-chunked-nll``.
"""

from __future__ import annotations

from typing import Any

from vramplan.configs.collect import NOT_MEMORY, Collector, set_regex_targets
from vramplan.configs.reading import ConfigFormat, ConfigReading, Distributed, Reference
from vramplan.configs.vocab import (
    HF_DTYPE,
    note_low_rank_targets,
    set_attention,
    set_liger_kernel_config,
    set_optim,
    set_optim_args,
    set_trainer_fsdp,
)
from vramplan.setup import (
    ActivationOffload,
    AdapterDtype,
    DeepSpeedStage,
    FsdpSharding,
    Generation,
    LoraTargets,
    Loss,
    Method,
    Objective,
    Packing,
    Precision,
    Quant,
    QuantStorage,
    Stack,
)

_TRL = "trl==1.16.0"
# trl/cli/accelerate_config.py:19-47: names of the bundled accelerate configs (trl/accelerate_configs/)
_TRL_ACCELERATE: dict[str, dict[str, Any]] = {
    "fsdp1": {"distributed": Distributed.FSDP, "fsdp_version": 1, "fsdp_sharding": FsdpSharding.FULL},
    "fsdp2": {"distributed": Distributed.FSDP, "fsdp_version": 2, "fsdp_sharding": FsdpSharding.FULL},
    "zero1": {"distributed": Distributed.DEEPSPEED, "deepspeed": DeepSpeedStage.ZERO1},
    "zero2": {"distributed": Distributed.DEEPSPEED, "deepspeed": DeepSpeedStage.ZERO2},
    "zero3": {"distributed": Distributed.DEEPSPEED, "deepspeed": DeepSpeedStage.ZERO3},
    "multi_gpu": {"distributed": Distributed.DDP},
    "single_gpu": {"distributed": Distributed.NONE},
}
_PACKING_STRATEGY = {
    "bfd": Packing.PADDING_FREE,
    "bfd_split": Packing.PADDING_FREE,
    "bfd-requeue": Packing.PADDING_FREE,
    "wrapped": Packing.NONE,
}
_KNOWN = frozenset(
    {
        "dtype",
        "torch_dtype",
        "model_init_kwargs",
        "use_peft",
        "load_in_4bit",
        "load_in_8bit",
        "bnb_4bit_quant_type",
        "bnb_4bit_quant_storage",
        "use_bnb_nested_quant",
        "lora_target_modules",
        "lora_modules_to_save",
        "packing",
        "packing_strategy",
        "padding_free",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "gradient_checkpointing_kwargs",
        "fsdp",
        "fsdp_config",
        "deepspeed",
        "accelerate_config",
        "num_processes",
        "loss_type",
        "use_liger_kernel",
        "liger_kernel_config",
        "bf16",
        "fp16",
        "max_length",
        "max_seq_length",
        "optim_target_modules",
        "model_revision",
    }
)


def _quant_storage(c: Collector) -> None:
    """TRL's ModelConfig.bnb_4bit_quant_storage: a floating dtype is sharded by accelerate's
    FSDP2, the default (None: uint8) is not (memory/accelerate.py)."""
    storage = c.get("bnb_4bit_quant_storage")
    if storage is None:
        return
    floating = str(storage).removeprefix("torch.") in ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
    c.set("bnb_4bit_quant_storage", "quant_storage", QuantStorage.BF16 if floating else QuantStorage.UINT8)


def references(data: dict) -> list[Reference]:
    refs = []
    if data.get("deepspeed"):
        refs.append(Reference("deepspeed", ConfigFormat.DEEPSPEED, data["deepspeed"]))
    acc = data.get("accelerate_config")
    if isinstance(acc, str) and acc not in _TRL_ACCELERATE:
        refs.append(Reference("accelerate_config", ConfigFormat.ACCELERATE, acc))
    return refs


def read(data: dict, path: str, engine: dict | None = None, fmt: ConfigFormat = ConfigFormat.TRL) -> ConfigReading:
    c, engine, trl = Collector(path, data), engine or {}, fmt == ConfigFormat.TRL
    method = _method(c) if trl else None
    _batch(c, trl)
    _precision(c, trl)
    _checkpointing(c)
    if c.get("optim") is not None:
        set_optim(c, "optim", c.get("optim"))
        set_optim_args(c)
        note_low_rank_targets(c)
    _loss(c, trl)
    attn = c.get("attn_implementation") or c.mapping("model_init_kwargs", c.get("model_init_kwargs")).get(
        "attn_implementation"
    )
    if attn is not None:
        set_attention(c, "attn_implementation", attn)
    set_trainer_fsdp(c)
    _launch(c)
    if trl and method in (Method.LORA, Method.QLORA):
        _trl_derived(c, method, engine)
    if c.get("torch_compile") is True:
        c.unmodelled("torch_compile", "torch.compile fuses kernels and changes activation memory")
    if trl:
        _other_trainer(c)
    model = c.model("model_name_or_path")
    return c.finish(fmt, Stack.TRL if trl else Stack.HF_TRAINER, model, _KNOWN | _training_arguments_fields(c))


def _training_arguments_fields(c: Collector) -> frozenset:
    """Keys that are TrainingArguments fields are known (the ones that matter for memory are read
    above); imported only when a file has keys left over, since transformers is slow to import."""
    leftover = {k for k in c.data if k not in c.seen and k not in _KNOWN and k not in NOT_MEMORY}
    if not leftover:
        return frozenset()
    try:
        import dataclasses

        from transformers import TrainingArguments
    except ImportError:
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(TrainingArguments))


def _method(c: Collector) -> Method:
    peft = c.flag("use_peft", c.get("use_peft", False))
    four = c.flag("load_in_4bit", c.get("load_in_4bit", False))
    eight = c.flag("load_in_8bit", c.get("load_in_8bit", False))
    if not peft:
        if four or eight:
            key = "load_in_4bit" if four else "load_in_8bit"
            raise c.fail("use_peft", f"true with {key} (a quantized base trains only through adapters)", False)
        c.set("use_peft", "method", Method.FULL, "" if "use_peft" in c.data else "TRL's default use_peft: false")
        return Method.FULL
    method = Method.QLORA if four or eight else Method.LORA
    c.set("load_in_4bit" if four else "load_in_8bit" if eight else "use_peft", "method", method)
    if eight and not four:
        # trl==1.16.0 trainer/utils.py:270-273: BitsAndBytesConfig(load_in_8bit=True), LLM.int8 threshold 6.0
        c.set("load_in_8bit", "quant", Quant.INT8, "bnb LLM.int8 (trl trainer/utils.py:270-273)")
    if four:
        quant_type = c.get("bnb_4bit_quant_type", "nf4")
        c.set("load_in_4bit", "quant", Quant.NF4, "" if quant_type == "nf4" else f"{quant_type} has the nf4 layout")
        _quant_storage(c)
        if c.get("use_bnb_nested_quant") is not True:
            c.unmodelled(
                "use_bnb_nested_quant",
                "off (TRL's default): single quantization keeps fp32 absmax, "
                "0.375 bit/param more than the modelled double-quant nf4",
            )
    c.set_int("lora_r", "lora_r")
    if c.get("lora_dropout") is not None:
        c.set("lora_dropout", "lora_dropout", c.prob("lora_dropout", c.get("lora_dropout")))
    _targets(c)
    # ModelConfig.lora_modules_to_save -> LoraConfig(modules_to_save=...) (trl==1.16.0 trainer/utils.py:304)
    c.set_modules_to_save("lora_modules_to_save", note="trainable copies beside the frozen originals (peft)")
    c.set_flag("use_dora", "dora")
    return method


def _targets(c: Collector) -> None:
    modules = c.get("lora_target_modules")
    if modules is None:
        return
    modules = c.names("lora_target_modules", modules)
    if modules == ["all-linear"]:  # a 1-element list is unwrapped (trl/trainer/model_config.py:177-178)
        c.set("lora_target_modules", "lora_targets", LoraTargets.ALL_LINEAR)
    elif len(modules) == 1:  # unwrapped to one string, which peft reads as a regular expression
        set_regex_targets(c, "lora_target_modules", modules[0])
    else:
        c.set("lora_target_modules", "lora_target_modules", tuple(str(m) for m in modules))


def _batch(c: Collector, trl: bool) -> None:
    c.set_int("per_device_train_batch_size", "batch_size")
    c.set_int("gradient_accumulation_steps", "gradient_accumulation")
    for key in ("max_length", "max_seq_length"):  # max_seq_length: TRL's name before 0.20
        c.set_int(key, "seq_len")
    packing, padding_free = c.get("packing"), c.get("padding_free")
    if packing is not None and c.flag("packing", packing):
        strategy = c.get("packing_strategy", "bfd")
        c.set(
            "packing",
            "packing",
            c.choice("packing_strategy", strategy, _PACKING_STRATEGY),
            f"packing_strategy {strategy}"
            + (
                ": rows concatenated to max_length, plain causal"
                if strategy == "wrapped"
                else ": padding-free (sft_trainer.py:916)"
            ),
        )
    elif padding_free is not None and c.flag("padding_free", padding_free):
        c.set("padding_free", "packing", Packing.PADDING_FREE)
    elif packing is False or padding_free is False:
        c.set("packing" if packing is False else "padding_free", "packing", Packing.NONE)


def _precision(c: Collector, trl: bool) -> None:
    init = c.mapping("model_init_kwargs", c.get("model_init_kwargs"))
    for key, value in (
        ("dtype", c.get("dtype")),
        ("torch_dtype", c.get("torch_dtype")),
        ("model_init_kwargs.dtype", init.get("dtype")),
        ("model_init_kwargs.torch_dtype", init.get("torch_dtype")),
    ):
        if value is not None:
            c.set(
                key,
                "model_dtype",
                c.choice(key, value, HF_DTYPE),
                "the checkpoint's dtype (bf16 for current LLM checkpoints)" if value == "auto" else "",
            )
            break
    if c.get("fp16") is True:
        c.set("fp16", "precision", Precision.FP16)
    elif c.get("bf16") is not None:
        on = c.flag("bf16", c.get("bf16"))
        c.set(
            "bf16",
            "precision",
            Precision.MIXED if on else Precision.BF16,
            "bf16 autocast" if on else "no autocast: the step computes in the weights' dtype",
        )


def _checkpointing(c: Collector) -> None:
    for key in ("gradient_checkpointing", "activation_checkpointing"):  # activation_*: transformers v5 name
        c.set_flag(key, "gradient_checkpointing")
    for key in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
        kwargs = c.mapping(key, c.get(key))
        if kwargs.get("use_reentrant") is not None:
            c.set(
                f"{key}.use_reentrant", "checkpoint_reentrant", c.flag(f"{key}.use_reentrant", kwargs["use_reentrant"])
            )
        if kwargs.get("offload") is True:
            c.set(
                f"{key}.offload",
                "activation_offload",
                ActivationOffload.CHECKPOINTS,
                "save_on_cpu around each checkpoint (modeling_utils.py:3162)",
            )
    if c.get("activation_offloading") is not None and c.flag("activation_offloading", c.get("activation_offloading")):
        c.set("activation_offloading", "activation_offload", ActivationOffload.ALL, "every saved tensor to host RAM")


def _loss(c: Collector, trl: bool) -> None:
    liger = c.get("use_liger_kernel") is not None and c.flag("use_liger_kernel", c.get("use_liger_kernel"))
    fused_ce = set_liger_kernel_config(c)[1] if liger else False
    if trl and liger and c.get("liger_kernel_config", {}).get("fused_linear_cross_entropy") is True:
        # SFTTrainer applies only Liger's layer kernels (trl==1.16.0 sft_trainer.py:1125-1140)
        raise c.fail("liger_kernel_config.fused_linear_cross_entropy", "false or unset (TRL raises on it)", True)
    if trl:
        c.set(
            "loss_type" if "loss_type" in c.data else "model_name_or_path",
            "loss",
            Loss.TRL_CHUNKED_NLL,
            f"{_TRL} SFTTrainer (and DPOTrainer) always compute the loss through the fused chunked LM head "
            "(trl/kernels/chunked_logprob.py; sft_trainer.py:1142-1147), whatever loss_type says",
        )
    elif fused_ce:
        c.set("use_liger_kernel", "loss", Loss.LIGER, "Liger fused linear cross-entropy")
    smoothing = c.get("label_smoothing_factor", 0)
    if smoothing:
        c.unmodelled("label_smoothing_factor", "label smoothing goes through the Trainer's full-logits loss")


# Keys only TRL's DPOConfig takes, not SFTConfig (trl==1.16.0 trainer/dpo_config.py): a file with
# one is run by `trl dpo` (memory/preference.py). beta, sync_ref_model and the precompute keys are
# KTO's too; a file with a KTO key is KTO's.
_DPO_KEYS = (
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "loss_weights",
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "use_weighting",
    "discopop_tau",
    "label_smoothing",
    "beta",
    "disable_dropout",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
)
# Keys only TRL's other trainers take (trl==1.16.0 trainer/{kto,grpo,rloo,reward,distillation}
# _config.py; max_prompt_length and max_completion_length: DPO's before 1.0, CPO's and ORPO's):
# a step with generated sequences, a teacher, or unpaired examples, which vramplan does not model.
_OTHER_TRAINERS = {
    "RLOO": ("normalize_advantages", "reward_clip_range"),
    "distillation": ("teacher_model_name_or_path", "teacher_model_init_kwargs"),
    "preference": ("max_prompt_length", "max_completion_length", "ref_model_init_kwargs", "rpo_alpha"),
}


def _other_trainer(c: Collector) -> None:
    """A TRL file for another trainer than SFT: DPO's keys make the step DPO's (--objective
    dpo); another trainer's are said in one line, not listed as unknown, and the step is
    estimated as SFT's."""
    found = [(name, k) for name, keys in _OTHER_TRAINERS.items() for k in keys if k in c.data]
    # max_prompt_length / max_completion_length ("preference") are older GRPOConfig's keys too
    if all(name == "preference" for name, _ in found) and any(k in c.data for k in _GRPO_KEYS):
        _grpo(c)
        return
    if not found:
        if not _reward(c) and not _kto(c):
            _dpo(c)
        return
    name, first = found[0]
    keys = ", ".join(k for _, k in found)
    c.unmodelled(
        first,
        f"{keys}: a TRL {name} trainer's config; its reference or teacher model and paired or generated "
        "sequences are not modelled; estimated as an SFT step",
    )
    for _, k in found + [("DPO", k) for k in _DPO_KEYS if k in c.data]:
        c.get(k)


# Keys GRPOConfig takes and SFTConfig does not that mark a `trl grpo` file (trl==1.16.0
# grpo_config.py; RLOOConfig shares the generation keys: its own two above make a file RLOO's)
_GRPO_KEYS = (
    "num_generations",
    "generation_batch_size",
    "steps_per_generation",
    "use_vllm",
    "vllm_mode",
    "reward_weights",
    "num_iterations",
    "epsilon",
    "epsilon_high",
    "scale_rewards",
    "importance_sampling_level",
    "vllm_gpu_memory_utilization",
)
# a prompt length when the file gives none (GRPOConfig 1.x has no max_prompt_length: prompts are
# not truncated), so that --seq-len is prompt + completion; the output says it
GRPO_ASSUMED_PROMPT = 512


def _grpo(c: Collector) -> None:
    """`trl grpo`'s keys: the step is GRPOTrainer's (memory/grpo.py): the completion length, the
    prompt's when the file has one (older GRPOConfig's max_prompt_length), generation on this GPU
    or by vLLM, the generation batch, the KL coefficient."""
    first = next(k for k in _GRPO_KEYS if k in c.data)
    c.set(first, "objective", Objective.GRPO, f"{_TRL} GRPOConfig key: GRPOTrainer's step")
    completion = c.pos_int("max_completion_length", c.get("max_completion_length", 512))
    c.set(
        "max_completion_length",
        "completion_len",
        completion,
        "GRPOConfig default 512" if "max_completion_length" not in c.data else "",
    )
    prompt = c.get("max_prompt_length")
    if prompt is not None:
        c.set(
            "max_prompt_length", "seq_len", c.pos_int("max_prompt_length", prompt) + completion, "prompt + completion"
        )
    else:
        c.set(
            "max_completion_length",
            "seq_len",
            GRPO_ASSUMED_PROMPT + completion,
            f"a {GRPO_ASSUMED_PROMPT}-token prompt assumed (not in the file; --seq-len gives prompt + completion)",
        )
    _grpo_generation(c)
    for key, field in (("steps_per_generation", "steps_per_generation"), ("num_iterations", "num_iterations")):
        c.set_int(key, field)
    set_generation_batch(c, "generation_batch_size", c.get("generation_batch_size"), per_device_default=8)
    set_beta(c, "beta", c.get("beta"))
    if c.get("vllm_enable_sleep_mode") is True:
        c.unmodelled("vllm_enable_sleep_mode", "vLLM's sleep mode: its share is counted as held throughout")
    if c.get("use_transformers_paged") is True or c.get("use_transformers_continuous_batching") is True:
        c.unmodelled(
            "use_transformers_continuous_batching",
            "transformers' paged continuous batching: generation estimated as model.generate",
        )
    for k in _GRPO_KEYS:
        c.get(k)


def _grpo_generation(c: Collector) -> None:
    """use_vllm / vllm_mode / vllm_gpu_memory_utilization (grpo_config.py:587-660)."""
    if c.get("use_vllm") is not None and c.flag("use_vllm", c.get("use_vllm")):
        mode = c.choice(
            "vllm_mode",
            c.get("vllm_mode", "colocate"),
            {"colocate": Generation.VLLM_COLOCATE, "server": Generation.VLLM_SERVER},
        )
        c.set("use_vllm", "generation", mode, f"vLLM, vllm_mode {mode.value.removeprefix('vllm-')}")
        share = c.get("vllm_gpu_memory_utilization")
        if share is not None and mode == Generation.VLLM_COLOCATE:
            set_vllm_share(c, "vllm_gpu_memory_utilization", share)
    else:
        c.get("vllm_mode")
        c.get("vllm_gpu_memory_utilization")


# ---- GRPO keys TRL's files and axolotl's `trl:` section share (configs/axolotl.py _grpo)


def set_generation_batch(c: Collector, key: str, size, per_device_default: int) -> None:
    """GRPOConfig generation_batch_size (rows over all processes) as steps_per_generation: divided
    by the per-device micro-batch and the processes (grpo_config.py:1098-1100)."""
    if size is None:
        return
    per_step = c.fields.get("batch_size", per_device_default) * (c.world or 1)
    c.set(
        key,
        "steps_per_generation",
        max(c.pos_int(key, size) // per_step, 1),
        "generation_batch_size / (per-device micro-batch x processes)",
    )


def set_beta(c: Collector, key: str, beta) -> None:
    """GRPO's KL coefficient: a number >= 0."""
    if beta is None:
        return
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
        raise c.fail(key, "a number >= 0", beta)
    c.set(key, "beta", float(beta))


def set_vllm_share(c: Collector, key: str, share) -> None:
    """A colocated vLLM's share of each GPU: a number in (0, 1]."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise c.fail(key, "a number in (0, 1]", share)
    c.set(key, "vllm_gpu_memory_utilization", float(share))


# Keys only TRL's RewardConfig takes (trl==1.16.0 trainer/reward_config.py:160): a `trl reward` file
_REWARD_KEYS = ("center_rewards_coefficient",)


def _reward(c: Collector) -> bool:
    """`trl reward`'s keys: RewardTrainer's step over a sequence-classification model (memory/
    reward.py); its collator pads. Its other keys (disable_dropout, max_length) are SFT's or DPO's
    too. trl/scripts/reward.py passes ModelConfig's lora_task_type (CAUSAL_LM unless set): without
    SEQ_CLS or `score` in lora_modules_to_save the score head stays frozen, which is said."""
    keys = [k for k in _REWARD_KEYS if k in c.data]
    if not keys:
        return False
    c.set(keys[0], "objective", Objective.REWARD, f"{_TRL} RewardConfig key: RewardTrainer's step")
    c.get("center_rewards_coefficient")
    for k in ("disable_dropout", "pad_to_multiple_of", "eos_token", "pad_token"):
        c.get(k)
    _pads(c, "RewardTrainer's collator pads each pair's rows (reward_trainer.py:203-229)")
    if c.fields.get("loss") not in (None, Loss.HF):
        c.set(keys[0], "loss", Loss.HF, "a sequence-classification model has no LM loss to replace")
    task = c.get("lora_task_type")
    saved = c.data.get("lora_modules_to_save") or ()
    if c.fields.get("method") in (Method.LORA, Method.QLORA) and task != "SEQ_CLS" and "score" not in saved:
        c.unmodelled(
            "lora_task_type",
            f"{task or 'CAUSAL_LM'}: peft leaves the score head frozen (SEQ_CLS trains it); estimated with it "
            "trained, its saved input (tokens x hidden x 2 bytes) an upper end",
        )
    return True


def _pads(c: Collector, why: str) -> None:
    """A pairwise trainer pads: packing or padding_free read earlier is overridden, said."""
    if c.fields.get("packing") not in (None, Packing.NONE):
        c.set("padding_free" if "padding_free" in c.data else "packing", "packing", Packing.NONE, why)


def _dpo(c: Collector) -> None:
    """`trl dpo`'s keys: the step is DPOTrainer's (trl==1.16.0 dpo_trainer.py); it pads, not
    packs (padding_free falls back to padding, :133-140), and asks the fused head for one output
    more when use_weighting (log_sum_sq_probs, :958-959), which is not modelled."""
    keys = [k for k in _DPO_KEYS if k in c.data]
    if not keys:
        return
    c.set(keys[0], "objective", Objective.DPO, f"{_TRL} DPOConfig key: DPOTrainer's step")
    for k in keys:
        c.get(k)
    precompute = c.get("precompute_ref_log_probs")
    if precompute is not None and c.flag("precompute_ref_log_probs", precompute):
        c.set("precompute_ref_log_probs", "precompute_ref_log_probs", True)
    _pads(c, "DPOTrainer pads: padding_free falls back to padding (dpo_trainer.py:133-140)")
    weighting = c.get("use_weighting")
    if weighting is not None and c.flag("use_weighting", weighting):
        c.set("use_weighting", "dpo_use_weighting", True, "WPO weights: the fused head returns log_sum_sq_probs too")


# Keys only TRL's KTOConfig takes (trl==1.16.0 trainer/kto_config.py): a `trl kto` file
_KTO_KEYS = ("desirable_weight", "undesirable_weight")
# KTOConfig loss_type values (kto_config.py): kto estimates the KL term from mismatched rows
_KTO_LOSSES = {"kto": True, "apo_zero_unpaired": False}


def _kto(c: Collector) -> bool:
    """`trl kto`'s keys: KTOTrainer's step (memory/kto.py): one row per example, the KL rows for
    loss_type kto; it pads. beta and the precompute keys are DPO's too."""
    keys = [k for k in _KTO_KEYS if k in c.data]
    if not keys:
        return False
    c.set(keys[0], "objective", Objective.KTO, f"{_TRL} KTOConfig key: KTOTrainer's step")
    for k in (*keys, *(k for k in _DPO_KEYS if k in c.data)):
        c.get(k)
    loss = c.get("loss_type")
    if loss is not None:
        c.set("loss_type", "kto_kl", c.choice("loss_type", loss, _KTO_LOSSES), "KTOConfig loss_type: the KL term")
    precompute = c.get("precompute_ref_log_probs")
    if precompute is not None and c.flag("precompute_ref_log_probs", precompute):
        c.set("precompute_ref_log_probs", "precompute_ref_log_probs", True)
    _pads(c, "KTOTrainer pads each batch")
    return True


def _launch(c: Collector) -> None:
    """``num_processes``/``accelerate_config`` in a TRL CLI YAML go to accelerate launch
    (trl/cli/commands/training.py:59-64)."""
    if c.get("deepspeed") is not None:
        c.distributed = Distributed.DEEPSPEED
    processes = c.get("num_processes")
    if processes is not None:
        c.world = c.pos_int("num_processes", processes)
    name = c.get("accelerate_config")
    if isinstance(name, str) and name in _TRL_ACCELERATE:
        preset = dict(_TRL_ACCELERATE[name])
        c.distributed = preset.pop("distributed")
        for field, value in preset.items():
            c.set("accelerate_config", field, value, f"trl's bundled accelerate config {name}")
    if c.distributed == Distributed.FSDP and c.world is not None:
        c.set("num_processes", "fsdp", c.world, "FSDP world size")


def _trl_derived(c: Collector, method: Method, engine: dict) -> None:
    zero3 = engine.get("deepspeed", c.fields.get("deepspeed")) == DeepSpeedStage.ZERO3
    bf16_adapters = method == Method.QLORA or zero3
    c.set(
        "use_peft",
        "adapter_dtype",
        AdapterDtype.BF16 if bf16_adapters else AdapterDtype.FP32,
        "derived: TRL casts trainable adapters of a quantized model to bf16 (sft_trainer.py:903-911) and "
        "passes autocast_adapter_dtype=False under ZeRO-3 (845-857)"
        if bf16_adapters
        else "derived: peft's autocast_adapter_dtype keeps adapters in fp32",
    )
    c.set(
        "use_peft",
        "kbit_prep",
        False,
        "derived: SFTTrainer does not call prepare_model_for_kbit_training (sft_trainer.py:897-900)",
    )
    if zero3:
        c.set(
            "use_peft",
            "checkpoint_reentrant",
            True,
            "derived: TRL forces reentrant checkpointing for PEFT under ZeRO-3 (sft_trainer.py:880-895)",
        )
