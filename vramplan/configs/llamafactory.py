"""LLaMA-Factory YAML (``llamafactory-cli train x.yaml``; llamafactory==0.9.5, stage sft).

FSDP is set by the accelerate config it is launched with, not in this file.
"""

from __future__ import annotations

from vramplan.configs.collect import Collector
from vramplan.configs.reading import ConfigFormat, ConfigReading, Distributed, Reference
from vramplan.configs.vocab import LLAMAFACTORY_FSDP_DEFAULT, set_optim, set_trainer_fsdp
from vramplan.errors import VramplanError
from vramplan.setup import (
    ActivationOffload,
    AdapterDtype,
    Attention,
    LigerLayers,
    LoraTargets,
    Loss,
    Method,
    ModelDtype,
    Objective,
    Optim,
    Packing,
    Precision,
    Quant,
    SavedModule,
    Stack,
)

_SRC = "llamafactory==0.9.5"
_QUANT_NEEDS_LORA = "lora with quantization_bit (a quantized base trains through adapters)"
_FLASH = {"auto": Attention.SDPA, "sdpa": Attention.SDPA, "fa2": Attention.FLASH, "disabled": Attention.EAGER}
_QUANT_METHOD = {"bnb": Quant.NF4, "bitsandbytes": Quant.NF4, "hqq": Quant.HQQ4}
_KNOWN = frozenset(
    {
        "stage",
        "finetuning_type",
        "quantization_bit",
        "quantization_method",
        "quantization_type",
        "double_quantization",
        "lora_rank",
        "lora_target",
        "additional_target",
        "pure_bf16",
        "bf16",
        "fp16",
        "deepspeed",
        "galore_rank",
        "galore_update_interval",
        "galore_layerwise",
        "galore_target",
        "use_galore",
        "neat_packing",
        "packing",
        "freeze_trainable_layers",
        "freeze_trainable_modules",
        "freeze_extra_modules",
        "use_llama_pro",
        "use_apollo",
        "apollo_rank",
        "apollo_layerwise",
        "apollo_target",
        "apollo_scale",
        "apollo_scale_type",
        "apollo_scale_front",
        "apollo_proj",
        "apollo_proj_type",
        "apollo_update_interval",
        "use_badam",
        "badam_mode",
        "badam_start_block",
        "badam_switch_mode",
        "badam_switch_interval",
        "badam_update_ratio",
        "badam_mask_mode",
        "badam_verbose",
        "use_adam_mini",
        "use_muon",
        "loraplus_lr_ratio",
        "loraplus_lr_embedding",
    }
)


def references(data: dict) -> list[Reference]:
    ds = data.get("deepspeed")
    return [Reference("deepspeed", ConfigFormat.DEEPSPEED, ds)] if ds else []


def read(data: dict, path: str, engine: dict | None = None) -> ConfigReading:
    c, engine = Collector(path, data), engine or {}
    _trains(c)
    _stage(c)
    method = _method(c)
    _lora(c, method)
    c.set_int("per_device_train_batch_size", "batch_size")
    c.set_int("gradient_accumulation_steps", "gradient_accumulation")
    c.set_int("cutoff_len", "seq_len")
    _packing(c)
    _precision(c, method, engine)
    _kernels(c, engine)
    _dpo_after(c)
    if c.get("optim") is not None:
        set_optim(c, "optim", c.get("optim"))
    _custom_optimizer(c, method)
    if c.get("deepspeed") is not None:
        c.distributed = Distributed.DEEPSPEED
    # TrainingArguments' fsdp/fsdp_config reach the Trainer as given (hparams/parser.py parses
    # Seq2SeqTrainingArguments): examples/extras/fp8/llama3_fp8_fsdp_sft.yaml shards with them
    set_trainer_fsdp(c, LLAMAFACTORY_FSDP_DEFAULT)
    c.get("fsdp_transformer_layer_cls_to_wrap")  # the decoder layer class: each layer a unit, as modelled
    model = c.model("model_name_or_path")
    return c.finish(ConfigFormat.LLAMAFACTORY, Stack.LLAMAFACTORY, model, _KNOWN)


# Megatron-Core through mcore_adapter (USE_MCA=1, llamafactory==0.9.5 hparams/parser.py:63, 282-283;
# train/tuner.py:98-111): its training arguments, which only that parser takes
_MEGATRON = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "context_parallel_size",
    "sequence_parallel",
    "use_distributed_optimizer",
    "overlap_grad_reduce",
    "overlap_param_gather",
)


def _trains(c: Collector) -> None:
    """Configs of llamafactory-cli's other commands name a model like a training config: export
    (merge or quantize: `export_dir`), chat/webchat/api (`infer_backend`, no stage) and predict
    (`do_predict` without `do_train`) train nothing, and are refused. Megatron-Core training
    (USE_MCA=1) and fp8 (training_args.py:123, torchao/Transformer Engine) are said in one line."""
    if c.get("export_dir") is not None:
        raise VramplanError(
            "is an export config (llamafactory-cli export: merge or quantize), which trains nothing",
            f"--config {c.path}",
        )
    if c.get("infer_backend") is not None and c.get("stage") is None:
        raise VramplanError(
            "is an inference config (llamafactory-cli chat/webchat/api), which trains nothing", f"--config {c.path}"
        )
    if c.get("do_predict") is True and c.get("do_train") is not True:
        raise VramplanError("predicts (do_predict without do_train) and trains nothing", f"--config {c.path}")
    megatron = [k for k in _MEGATRON if k in c.data]
    if megatron:
        c.seen.update(megatron)
        c.unmodelled(
            megatron[0],
            "Megatron-Core training (USE_MCA=1: its distributed optimizer and tensor/pipeline/context/expert "
            "parallelism) is not modelled; estimated as LLaMA-Factory's Trainer step",
        )
    if c.get("fp8") is True:
        c.unmodelled("fp8", "fp8 training (torchao float8 / Transformer Engine casts) is not modelled")


def _stage(c: Collector) -> None:
    stage = c.get("stage", "sft")
    if stage == "dpo":
        _dpo(c)
    elif stage == "kto":
        # CustomKTOTrainer (memory/kto.py): its KL rows always built (data/processor/feedback.py)
        c.set("stage", "objective", Objective.KTO, f"{_SRC} CustomKTOTrainer (train/kto/trainer.py:41)")
        c.get("pref_beta"), c.get("kto_chosen_weight"), c.get("kto_rejected_weight"), c.get("pref_ftx")
        if c.get("ref_model") is not None:
            c.unmodelled("ref_model", "a separate reference model (and its adapters, quantization) is not modelled")
    elif stage == "rm":
        # PairwiseTrainer over trl 0.24's AutoModelForCausalLMWithValueHead (memory/reward.py)
        c.set("stage", "objective", Objective.REWARD, f"{_SRC} PairwiseTrainer (train/rm/trainer.py:88-110)")
    elif stage not in ("sft", "pt"):
        c.unmodelled(
            "stage",
            f"stage {stage}: reward/reference models, unpaired or generated batches are not modelled; estimated as sft",
        )


def _dpo(c: Collector) -> None:
    """`stage: dpo`: CustomDPOTrainer (train/dpo/trainer.py; memory/preference.py). orpo and simpo
    need no reference model (hparams/finetuning_args.py:574 use_ref_model), read as
    precompute_ref_log_probs: no reference forward and no copy. A separate `ref_model` is not
    modelled."""
    c.set("stage", "objective", Objective.DPO, f"{_SRC} CustomDPOTrainer (train/dpo/trainer.py:44)")
    loss = c.get("pref_loss", "sigmoid")
    if loss in ("orpo", "simpo"):
        c.set("pref_loss", "precompute_ref_log_probs", True, f"{loss}: no reference model (finetuning_args.py:574)")
    if c.get("ref_model") is not None:
        c.unmodelled("ref_model", "a separate reference model (and its adapters, quantization) is not modelled")
    c.get("pref_beta"), c.get("pref_ftx")  # [2B] tensors: no memory


def _dpo_after(c: Collector) -> None:
    """What DPO and stage rm override among the keys read before: their steps need the logits
    whatever Liger's fused loss says (model/model_utils/liger_kernel.py:94-96 require_logits: every
    stage but pt and sft), and the pairwise collator does not pack (data/collator.py:542-564)."""
    if c.fields.get("objective") not in (Objective.DPO, Objective.KTO, Objective.REWARD):
        return
    if c.fields.get("loss") not in (None, Loss.HF):
        c.set("stage", "loss", Loss.HF, "the step needs the logits: Liger's fused loss is off (liger_kernel.py:94-96)")
    if c.fields.get("packing") not in (None, Packing.NONE):
        c.set("stage", "packing", Packing.NONE, "the pairwise collator pads (data/collator.py:542-564)")


def _method(c: Collector) -> Method:
    kind = c.get("finetuning_type", "lora")
    if kind not in ("lora", "full", "freeze"):
        raise c.fail("finetuning_type", "lora, full or freeze (oft is not modelled)", kind)
    bits = c.get("quantization_bit")
    if kind == "freeze":
        if bits is not None:  # model/adapter.py:305-307 raises the same
            raise c.fail("finetuning_type", _QUANT_NEEDS_LORA, kind)
        _freeze(c)
        return Method.FULL
    if bits is None:
        method = Method.FULL if kind == "full" else Method.LORA
        c.set(
            "finetuning_type", "method", method, "" if "finetuning_type" in c.data else "LLaMA-Factory's default lora"
        )
        return method
    eight = bits == 8 and c.get("quantization_method", "bnb") in ("bnb", "bitsandbytes")
    if bits != 4 and not eight:
        raise c.fail("quantization_bit", "4, or 8 with bitsandbytes (3- and 2-bit bases are not modelled)", bits)
    if kind != "lora":
        raise c.fail("finetuning_type", _QUANT_NEEDS_LORA, kind)
    quant = c.choice("quantization_method", c.get("quantization_method", "bnb"), _QUANT_METHOD)
    c.set("quantization_bit", "method", Method.QLORA)
    if eight:  # BitsAndBytesConfig(load_in_8bit=True): model/model_utils/quantization.py:168-170
        c.set(
            "quantization_bit", "quant", Quant.INT8, f"bnb LLM.int8 ({_SRC} model/model_utils/quantization.py:168-170)"
        )
        return Method.QLORA
    c.set("quantization_bit", "quant", quant)
    if quant == Quant.NF4:
        qtype = c.get("quantization_type", "nf4")
        if qtype != "nf4":
            c.unmodelled("quantization_type", f"{qtype} has the nf4 layout; modelled as nf4")
        if c.get("double_quantization") is False:
            c.unmodelled(
                "double_quantization",
                "single quantization keeps fp32 absmax, 0.375 bit/param more than the modelled double-quant nf4",
            )
    return Method.QLORA


def _freeze(c: Collector) -> None:
    """finetuning_type: freeze (model/adapter.py:57-131): freeze_trainable_layers > 0 trains the
    last N decoder layers whole (default 2, finetuning_args.py:23-32), every other parameter
    frozen. Training the first N (a negative count), LLaMA-Pro's spread layers, part of each layer
    (freeze_trainable_modules) or root modules (freeze_extra_modules) leaves frozen layers that
    pass grads, or partial layers, which vramplan does not model."""
    n = c.get("freeze_trainable_layers", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise c.fail(
            "freeze_trainable_layers",
            "a positive integer (the last N layers; training the first N is not modelled)",
            n,
        )
    if c.get("use_llama_pro") is True:
        raise c.fail("use_llama_pro", "false (LLaMA-Pro's spread trainable layers are not modelled)", True)
    modules = c.get("freeze_trainable_modules", "all")
    if modules != "all":
        raise c.fail("freeze_trainable_modules", "all (training part of each layer is not modelled)", modules)
    extra = c.get("freeze_extra_modules")
    if extra:
        raise c.fail("freeze_extra_modules", "empty (trained root modules are not modelled)", extra)
    c.set(
        "freeze_trainable_layers" if "freeze_trainable_layers" in c.data else "finetuning_type",
        "train_layers",
        n,
        "the last N decoder layers train whole" + ("" if "freeze_trainable_layers" in c.data else " (default 2)"),
    )
    c.set("finetuning_type", "method", Method.FULL, "freeze tuning: the other layers, embeddings and head frozen")


def _lora(c: Collector, method: Method) -> None:
    if method == Method.FULL:
        return
    c.set_int("lora_rank", "lora_r")
    if c.get("lora_dropout") is not None:
        c.set("lora_dropout", "lora_dropout", c.prob("lora_dropout", c.get("lora_dropout")))
    target = c.get("lora_target")
    if target is not None:
        names = c.names("lora_target", target, sep=",")
        if names == ["all"]:
            c.set(
                "lora_target",
                "lora_targets",
                LoraTargets.ALL_LINEAR,
                "every Linear but the output layer (model/model_utils/misc.py:31-35)",
            )
        else:
            c.set("lora_target", "lora_target_modules", tuple(names))
    c.set_flag("use_dora", "dora")
    # LoraConfig(modules_to_save=additional_target) (llamafactory==0.9.5 model/adapter.py:241), then
    # cast to fp32 with every trainable parameter unless pure_bf16 (:284-286, :313-325)
    c.set_modules_to_save("additional_target", sep=",", note="trainable copies beside the frozen originals (peft)")
    if c.get("resize_vocab") is True and not c.get("additional_target"):
        # the resized embedding and output layer train whole (model/adapter.py:222-230)
        both = (SavedModule.EMBED_TOKENS, SavedModule.LM_HEAD)
        c.set("resize_vocab", "modules_to_save", both, "resized: trained whole")


def _packing(c: Collector) -> None:
    if c.get("neat_packing") is True:
        c.set("neat_packing", "packing", Packing.POSITION_IDS, "block-diagonal attention over packed rows")
    elif c.get("packing") is not None:
        c.set(
            "packing",
            "packing",
            Packing.NONE,
            "rows concatenated to cutoff_len under a plain causal mask" if c.get("packing") else "",
        )


def _precision(c: Collector, method: Method, engine: dict) -> None:
    """Trainable params are cast to fp32 unless pure_bf16, or ZeRO-3 without quantization
    (model/adapter.py:313-328); frozen weights stay in the checkpoint dtype."""
    if c.get("pure_bf16") is True:
        c.set("pure_bf16", "precision", Precision.BF16, "bf16 weights and states, no fp32 masters")
        c.set("pure_bf16", "model_dtype", ModelDtype.BF16)
        if method != Method.FULL:
            c.set("pure_bf16", "adapter_dtype", AdapterDtype.BF16)
            c.set("pure_bf16", "modules_to_save_dtype", AdapterDtype.BF16, "no fp32 cast of trainable parameters")
        return
    if c.get("fp16") is True:
        c.set("fp16", "precision", Precision.FP16)
    elif c.get("bf16") is True:
        c.set("bf16", "precision", Precision.MIXED, "bf16 autocast")
    else:
        c.set("bf16", "precision", Precision.BF16, "no bf16/fp16: no autocast")
    freeze = c.get("finetuning_type") == "freeze"
    badam = c.get("use_badam") is True  # model/adapter.py:338-349: no fp32 cast under BAdam either
    fp32_master = method == Method.FULL and not freeze and not badam
    c.set(
        "finetuning_type",
        "model_dtype",
        ModelDtype.FP32 if fp32_master else ModelDtype.BF16,
        "derived: every trainable weight cast to fp32 (model/adapter.py:313-328)"
        if fp32_master
        else "derived: weights in the checkpoint dtype (bf16), not cast (model/adapter.py:338-349)",
    )
    if freeze:
        c.set(
            "finetuning_type",
            "train_layers_dtype",
            AdapterDtype.FP32,
            "derived: the trained layers cast to fp32 (model/adapter.py:126-129, :313-328)",
        )
    if method != Method.FULL:
        c.set(
            "finetuning_type",
            "adapter_dtype",
            AdapterDtype.FP32,
            "derived: trainable adapters cast to fp32 (model/adapter.py:313-326)",
        )
        c.set(
            "finetuning_type",
            "kbit_prep",
            False,
            "derived: LLaMA-Factory does not call prepare_model_for_kbit_training",
        )


def _kernels(c: Collector, engine: dict) -> None:
    if c.get("flash_attn") is not None:
        c.set("flash_attn", "attention", c.choice("flash_attn", c.get("flash_attn"), _FLASH))
    c.set_flag("disable_gradient_checkpointing", "gradient_checkpointing", invert=True)
    if engine.get("fsdp_version") == 2:
        c.set(
            "use_reentrant_gc",
            "checkpoint_reentrant",
            False,
            "derived: FSDP2 forces non-reentrant (model/model_utils/checkpointing.py:157-162)",
        )
    else:
        c.set_flag("use_reentrant_gc", "checkpoint_reentrant")
    if c.get("use_unsloth_gc") is True:
        c.set("use_unsloth_gc", "activation_offload", ActivationOffload.UNSLOTH)
    if c.get("use_unsloth") is True:
        c.set("use_unsloth", "loss", Loss.UNSLOTH, "Unsloth's fused cross-entropy")
    elif c.get("enable_liger_kernel") is True:
        # apply_liger_kernel_to_<type>() with its defaults: fused loss, RMSNorm, SwiGLU/GeGLU, RoPE
        # (llamafactory 0.9.5 model/model_utils/liger_kernel.py)
        c.set("enable_liger_kernel", "loss", Loss.LIGER, "Liger fused linear cross-entropy")
        c.set("enable_liger_kernel", "liger_layers", LigerLayers.ALL, "Liger's RMSNorm and SwiGLU/GeGLU kernels")
    elif c.get("enable_liger_kernel") is False:
        c.set("enable_liger_kernel", "loss", Loss.HF)
    for key in ("upcast_layernorm", "upcast_lmhead_output"):
        if c.get(key) is True:
            c.unmodelled(key, "fp32 norms / an fp32 copy of the logits are not modelled")


def _custom_optimizer(c: Collector, method: Method) -> None:
    """LLaMA-Factory 0.9.5 train/trainer_utils.py:527-549 (create_custom_optimizer): the first of
    GaLore, APOLLO, LoRA+, BAdam, Adam-mini, Muon that is on builds the optimizer (LoRA+ is AdamW
    with two learning rates: the same memory); hparams/finetuning_args.py refuses GaLore, APOLLO
    and BAdam with LoRA or with each other."""
    on = [k for k in ("use_galore", "use_apollo", "use_badam") if c.get(k) is True]
    if len(on) > 1:
        raise c.fail(on[1], f"false with {on[0]} (LLaMA-Factory refuses GaLore, APOLLO and BAdam together)", True)
    if on and method != Method.FULL:
        raise c.fail(on[0], "false with LoRA (LLaMA-Factory: finetuning_type full or freeze)", True)
    if c.get("use_galore") is True:
        _galore(c)
    elif c.get("use_apollo") is True:
        _apollo(c)
    elif c.get("use_badam") is True:
        c.unmodelled(
            "use_badam",
            "BAdam's block-wise updates are not modelled: estimated as every layer trained at once with the "
            "configured optimizer, an upper bound (BAdam holds grads, fp32 copies and states of one layer)",
        )
    elif c.get("loraplus_lr_ratio") is not None:
        return  # LoRA+ (trainer_utils.py:372-409): the configured optimizer over four groups
    elif c.get("use_adam_mini") is True:
        c.set("use_adam_mini", "optim", Optim.ADAM_MINI, "Adam_mini over the named parameters (:473-495)")
    elif c.get("use_muon") is True:
        c.set("use_muon", "optim", Optim.MUON, "third_party Muon: 2-D layer weights, AdamW for the rest (:498-524)")


def _apollo(c: Collector) -> None:
    """trainer_utils.py:288-369: APOLLOAdamW, only over optim adamw_torch (NotImplementedError for
    any other); the target Linears ("all": every Linear but lm_head), rank apollo_rank (16)."""
    optim = c.get("optim")
    if optim is not None and optim != "adamw_torch":
        raise c.fail("optim", "adamw_torch with use_apollo (LLaMA-Factory builds APOLLO only over it)", optim)
    layerwise = c.get("apollo_layerwise") is True
    note = "" if optim else "; LLaMA-Factory needs optim: adamw_torch here (transformers' default is adamw_torch_fused)"
    apollo = Optim.APOLLO_ADAMW_LAYERWISE if layerwise else Optim.APOLLO_ADAMW
    c.set("use_apollo", "optim", apollo, "APOLLOAdamW" + note)
    c.set_int("apollo_rank", "apollo_rank")
    if c.get("apollo_rank") is None:
        c.set("use_apollo", "apollo_rank", 16, "LLaMA-Factory's apollo_rank default (hparams/finetuning_args.py)")
    target = c.get("apollo_target", "all")
    if target != "all":
        c.unmodelled("apollo_target", f"APOLLO on {target} only is not modelled; estimated on every Linear (all)")


def _galore(c: Collector) -> None:
    layerwise = c.get("galore_layerwise") is True
    eight = c.fields.get("optim") == Optim.ADAMW_BNB_8BIT
    name = "galore_adamw" + ("_8bit" if eight else "") + ("_layerwise" if layerwise else "")
    c.set("use_galore", "method", Method.GALORE)
    c.set(
        "use_galore",
        "optim",
        Optim(name),
        "LLaMA-Factory picks the GaLore optimizer from optim (train/trainer_utils.py)",
    )
    c.set_int("galore_rank", "galore_rank")
    c.set_int("galore_update_interval", "galore_update_proj_gap")
