"""axolotl YAML (axolotl==0.19.0; schema in axolotl/utils/schemas/).

The world size is not in the file (axolotl train --num-processes / accelerate launch).
"""

from __future__ import annotations

from vramplan.configs.collect import Collector, set_regex_targets
from vramplan.configs.hf import GRPO_ASSUMED_PROMPT, set_beta, set_generation_batch, set_vllm_share
from vramplan.configs.reading import ConfigFormat, ConfigReading, Distributed, Reference
from vramplan.configs.vocab import (
    FSDP_STRATEGY,
    liger_layers_of,
    note_low_rank_targets,
    set_attention,
    set_fsdp_config_keys,
    set_optim,
    set_optim_args,
)
from vramplan.setup import (
    ActivationOffload,
    AdapterDtype,
    Attention,
    Generation,
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
    Stack,
)

_SRC = "axolotl==0.19.0"
_CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
_LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"
_OFFLOAD = {
    True: ActivationOffload.ALL,
    False: ActivationOffload.NONE,
    "disk": ActivationOffload.ALL,
    "hidden_states": ActivationOffload.CHECKPOINTS,
    "legacy": ActivationOffload.UNSLOTH,
}
_KNOWN = frozenset(
    {
        "base_model_config",
        "plugins",
        "pad_to_sequence_len",
        "fsdp_version",
        "fsdp_config",
        "fsdp",
        "flash_attention",
        "sdp_attention",
        "eager_attention",
        "cut_cross_entropy",
        "liger_fused_linear_cross_entropy",
        "chunked_cross_entropy_num_chunks",
        "bnb_config_kwargs",
        "load_in_8bit",
        "load_in_4bit",
        "bfloat16",
        "float16",
        "fp16",
        "bf16",
    }
)


def references(data: dict) -> list[Reference]:
    ds = data.get("deepspeed")
    return [Reference("deepspeed", ConfigFormat.DEEPSPEED, ds)] if ds else []


def read(data: dict, path: str, engine: dict | None = None) -> ConfigReading:
    c, engine = Collector(path, data), engine or {}
    method = _method(c)
    _lora(c, method)
    c.set_int("micro_batch_size", "batch_size")
    c.set_int("gradient_accumulation_steps", "gradient_accumulation")
    c.set_int("sequence_len", "seq_len")
    _precision(c, method)
    _attention(c)
    _checkpointing(c, method)
    if c.get("optimizer") is not None:
        set_optim(c, "optimizer", c.get("optimizer"), also=frozenset({Optim.MUON}))
        set_optim_args(c)
        note_low_rank_targets(c)
    _loss(c)
    _fsdp(c)
    if c.get("deepspeed") is not None:
        c.seen.add("deepspeed")
        c.distributed = Distributed.DEEPSPEED
    _packing(c)
    _kbit_prep(c, method)
    _fp32_embeddings(c, method)
    _not_sft(c)
    _parallel_and_fp8(c)
    _lora_kernels(c, method)
    if c.get("torch_compile"):
        c.unmodelled("torch_compile", "torch.compile fuses kernels and changes activation memory")
    model = c.model("base_model")
    return c.finish(ConfigFormat.AXOLOTL, Stack.AXOLOTL, model, _KNOWN)


def _method(c: Collector) -> Method:
    adapter = c.get("adapter")
    four = c.flag("load_in_4bit", c.get("load_in_4bit", False))
    eight = c.flag("load_in_8bit", c.get("load_in_8bit", False))
    if adapter is None:
        c.set("adapter", "method", Method.FULL, "no adapter: every weight trains")
        return Method.FULL
    if adapter not in ("lora", "qlora"):
        raise c.fail("adapter", "lora or qlora (or absent for full fine-tuning)", adapter)
    if adapter == "qlora" or four:
        if not four:
            raise c.fail("load_in_4bit", "true with adapter: qlora", c.get("load_in_4bit"))
        c.set("adapter", "method", Method.QLORA)
        c.set("load_in_4bit", "quant", Quant.NF4, f"bnb nf4, double quant ({_SRC} loaders/model.py:801-827)")
        quant_type = c.mapping("bnb_config_kwargs", c.get("bnb_config_kwargs")).get("bnb_4bit_quant_type")
        if quant_type not in (None, "nf4"):
            c.unmodelled("bnb_config_kwargs.bnb_4bit_quant_type", f"{quant_type} has the nf4 layout; modelled as nf4")
        return Method.QLORA
    if eight:  # LoRA on an LLM.int8 base: BitsAndBytesConfig(load_in_8bit=True), threshold 6.0
        c.set("adapter", "method", Method.QLORA, "LoRA on a quantized base")
        c.set("load_in_8bit", "quant", Quant.INT8, f"bnb LLM.int8, threshold 6.0 ({_SRC} loaders/model.py:829-838)")
        return Method.QLORA
    c.set("adapter", "method", Method.LORA)
    return Method.LORA


def _lora(c: Collector, method: Method) -> None:
    if method == Method.FULL:
        # no adapter: axolotl builds no LoraConfig, so the lora_* keys do nothing (not unknown)
        c.seen.update(k for k in c.data if k.startswith(("lora_", "peft_")))
        return
    c.set_int("lora_r", "lora_r")
    if c.get("lora_dropout") is not None:
        c.set("lora_dropout", "lora_dropout", c.prob("lora_dropout", c.get("lora_dropout")))
    modules = c.get("lora_target_modules")
    if c.flag("lora_target_linear", c.get("lora_target_linear", False)):
        c.set(
            "lora_target_linear",
            "lora_targets",
            LoraTargets.ALL_LINEAR,
            "every Linear but lm_head (loaders/adapter.py:171-182)",
        )
    elif isinstance(modules, str) and modules != "all-linear":
        set_regex_targets(c, "lora_target_modules", modules)  # passed to LoraConfig as given (adapter.py:171-190)
    elif modules:
        c.set("lora_target_modules", "lora_target_modules", tuple(c.names("lora_target_modules", modules)))
    # LoraConfig(modules_to_save=cfg.lora_modules_to_save) (axolotl==0.19.0 loaders/adapter.py:196)
    c.set_modules_to_save("lora_modules_to_save", note="trainable copies beside the frozen originals (peft)")
    c.set_flag("peft_use_dora", "dora")
    autocast = c.get("peft_autocast_adapter_dtype")
    if autocast is not None:
        c.set(
            "peft_autocast_adapter_dtype",
            "adapter_dtype",
            AdapterDtype.FP32 if c.flag("peft_autocast_adapter_dtype", autocast) else AdapterDtype.BF16,
        )


def _precision(c: Collector, method: Method) -> None:
    """bf16 true/auto loads bf16 weights and trains with AMP (config/__init__.py:163-203): LoRA's fp32
    adapters under autocast = mixed; a full fine-tune keeps bf16 params (no fp32 masters) under the
    Trainer's autocast = mixed over bf16 weights, as the stack bundle says (docs/stacks.md), except
    under FSDP or DeepSpeed, which compute in their bf16 parameter dtype = bf16.
    bfloat16: true is the same step: its schema says "No AMP", but the trainer is built with
    bf16 = cfg.bf16 or cfg.bfloat16 (axolotl==0.19.0 core/builders/base.py:276) and the weights
    load in bf16 (utils/config/__init__.py:198); float16: true loads fp16 weights and sets no
    AMP (base.py:271 fp16 = cfg.fp16 and not cfg.bf16)."""
    if c.get("fp16") is True:
        c.set("fp16", "precision", Precision.FP16)
        return
    if c.get("float16") is True and c.get("bfloat16") is not True and c.get("bf16") is not True:
        c.set("float16", "precision", Precision.BF16, "pure half precision, no autocast")
        c.set("float16", "model_dtype", ModelDtype.BF16)
        return
    key = "bfloat16" if c.get("bfloat16") is True else "bf16"
    bf16 = True if key == "bfloat16" else c.get("bf16", "auto")
    if bf16 is False:
        c.set("bf16", "precision", Precision.BF16, "no autocast: the step computes in fp32 weights")
        c.set("bf16", "model_dtype", ModelDtype.FP32)
        return
    if bf16 not in (True, "auto", "true"):
        raise c.fail("bf16", "true, false or auto", bf16)
    note = "" if key in c.data else "axolotl's default bf16: auto (bf16 GPUs)"
    c.set(key, "model_dtype", ModelDtype.BF16, note)
    if method != Method.FULL:
        c.set(key, "precision", Precision.MIXED, "fp32 adapters under bf16 autocast")
    elif _sharded_or_deepspeed(c):
        c.set(key, "precision", Precision.BF16, "bf16 weights, no fp32 masters")
    else:  # the Trainer's bf16=True: accelerate wraps the forward in autocast (accelerator.py:1791-1801)
        c.set(key, "precision", Precision.MIXED, "bf16 weights under accelerate's bf16 autocast, no fp32 masters")


def _sharded_or_deepspeed(c: Collector) -> bool:
    """The file turns on FSDP or DeepSpeed (read in full by _fsdp and read)."""
    return any(c.data.get(k) not in (None, [], {}, "") for k in ("fsdp", "fsdp_config", "fsdp_version", "deepspeed"))


def _attention(c: Collector) -> None:
    name = c.get("attn_implementation")
    if name is not None:
        set_attention(c, "attn_implementation", name)
        return
    for key, attention in (
        ("flash_attention", Attention.FLASH),
        ("sdp_attention", Attention.SDPA),
        ("eager_attention", Attention.EAGER),
    ):
        if c.get(key) is True:
            c.set(key, "attention", attention, "deprecated alias of attn_implementation")


def _checkpointing(c: Collector, method: Method) -> None:
    ckpt = c.get("gradient_checkpointing")
    if ckpt is not None:
        if ckpt in ("offload", "offload_disk"):
            c.set("gradient_checkpointing", "gradient_checkpointing", True)
            c.set(
                "gradient_checkpointing",
                "activation_offload",
                ActivationOffload.CHECKPOINTS,
                "legacy value: checkpoint inputs to host RAM",
            )
        else:
            c.set("gradient_checkpointing", "gradient_checkpointing", c.flag("gradient_checkpointing", ckpt))
    kwargs = c.mapping("gradient_checkpointing_kwargs", c.get("gradient_checkpointing_kwargs"))
    if kwargs.get("use_reentrant") is not None:
        c.set(
            "gradient_checkpointing_kwargs.use_reentrant",
            "checkpoint_reentrant",
            c.flag("gradient_checkpointing_kwargs.use_reentrant", kwargs["use_reentrant"]),
        )
    offload = c.get("activation_offloading")
    if offload is None:
        return
    mode = c.choice("activation_offloading", offload, _OFFLOAD)
    c.set(
        "activation_offloading",
        "activation_offload",
        mode,
        "offloaded to disk, modelled as host RAM" if offload == "disk" else "",
    )
    if mode == ActivationOffload.ALL and method != Method.FULL:
        c.set(
            "activation_offloading",
            "gradient_checkpointing",
            False,
            "with LoRA, axolotl turns HF checkpointing off and offloads every saved tensor "
            "(core/builders/base.py:590-610)",
        )


def _loss(c: Collector) -> None:
    plugins = c.names("plugins", c.get("plugins", []))
    if _CCE_PLUGIN in plugins and c.get("cut_cross_entropy", True) is not False:
        c.set("plugins", "loss", Loss.CCE, "CutCrossEntropyPlugin")
    elif _LIGER_PLUGIN in plugins and c.get("liger_fused_linear_cross_entropy") is True:
        c.set("liger_fused_linear_cross_entropy", "loss", Loss.LIGER, "LigerPlugin fused linear cross-entropy")
    elif c.get("chunked_cross_entropy") is True:
        c.set("chunked_cross_entropy", "loss", Loss.CHUNKED)
        if c.get("chunked_cross_entropy_num_chunks") not in (None, 8):
            c.unmodelled("chunked_cross_entropy_num_chunks", "modelled with axolotl's default 8 chunks")
    _liger_layers(c, plugins)


def _liger_layers(c: Collector, plugins: list[str]) -> None:
    """The LigerPlugin's layer kernels: apply_liger_kernel_to_<type>(rms_norm=liger_rms_norm,
    swiglu/geglu=liger_glu_activation, rope=liger_rope, layer_norm=liger_layer_norm)
    (axolotl==0.19.0 integrations/liger/plugin.py:196-229); RoPE's kernel changes no memory."""
    c.get("liger_rope")  # rotates q and k in place: saves what transformers' RoPE saves (memory/liger.py)
    on = {k: c.get(k) is True for k in ("liger_rms_norm", "liger_glu_activation", "liger_layer_norm")}
    if not any(on.values()):
        return
    if _LIGER_PLUGIN not in plugins:
        c.unmodelled("liger_rms_norm", "the liger_* keys act only with the LigerPlugin in plugins")
        return
    layers = liger_layers_of(on["liger_rms_norm"], on["liger_glu_activation"])
    if layers != LigerLayers.NONE:
        key = "liger_rms_norm" if on["liger_rms_norm"] else "liger_glu_activation"
        c.set(key, "liger_layers", layers, "Liger's RMSNorm / SwiGLU-GeGLU kernels (LigerPlugin)")
    if on["liger_layer_norm"]:
        c.unmodelled("liger_layer_norm", "Liger's LayerNorm kernel (LayerNorm models): transformers' kept")


def _fsdp(c: Collector) -> None:
    cfg = c.mapping("fsdp_config", c.get("fsdp_config"))
    tokens = c.names("fsdp", c.get("fsdp", []), sep=" ")
    if not cfg and not tokens and c.get("fsdp_version") is None:
        return
    c.distributed = Distributed.FSDP
    cfg = {k.removeprefix("fsdp_"): v for k, v in cfg.items()}  # prefix optional (schemas/validation.py:1198-1207)
    version = c.get("fsdp_version") or cfg.get("version") or 1  # pinned to 1 when unset (validation.py:924-926)
    c.set(
        "fsdp_version",
        "fsdp_version",
        c.choice("fsdp_version", version, {1: 1, 2: 2}),
        "" if c.get("fsdp_version") or cfg.get("version") else "axolotl pins fsdp_config without a version to FSDP1",
    )
    for token in tokens:
        if token in FSDP_STRATEGY:
            c.set("fsdp", "fsdp_sharding", FSDP_STRATEGY[token])
        elif token == "offload":
            c.set("fsdp", "cpu_offload", True)
    if "sharding_strategy" in cfg:
        c.set(
            "fsdp_config.sharding_strategy",
            "fsdp_sharding",
            c.choice("fsdp_config.sharding_strategy", cfg["sharding_strategy"], FSDP_STRATEGY),
        )
    set_fsdp_config_keys(c, cfg)


def _packing(c: Collector) -> None:
    if c.get("sample_packing") is None:
        return
    if not c.flag("sample_packing", c.get("sample_packing")):
        c.set("sample_packing", "packing", Packing.NONE)
        return
    flash = c.fields.get("attention") == Attention.FLASH
    c.set(
        "sample_packing",
        "packing",
        Packing.PADDING_FREE if flash else Packing.POSITION_IDS,
        "flash varlen, no mask" if flash else "packed rows told apart by position_ids",
    )


# Training modes vramplan estimates as one SFT step, said in one line each (axolotl==0.19.0
# utils/schemas/config.py: rl, reward_model, process_reward_model, qat, ebft; lisa_* and unfrozen_parameters
# freeze part of a full fine-tune, whose frozen weights get no grad and no optimizer state).
_NOT_SFT = {
    "rl": "RL training other than DPO/IPO, KTO, ORPO, SimPO and GRPO/GDPO (EBFT: its sampled sequences and "
    "feature network) is not modelled; estimated as one SFT step",
    "process_reward_model": "a process reward model's token head is not modelled; estimated as SFT",
    "unfrozen_parameters": "only the parameters matching it train (utils/freeze.py); estimated without it",
    "lisa_n_layers": "LISA trains a few sampled layers at a time; estimated with every layer trainable",
    "qat": "quantization-aware training's fake-quantized weights and activations (torchao) are not modelled; "
    "estimated as the step without them",
    "ebft": "energy-based fine-tuning (its sampled sequences and feature network) is not modelled; estimated as SFT",
}


def _not_sft(c: Collector) -> None:
    _reward(c)
    c.get("trl")  # the RL trainers' section (utils/schemas/trl.py): GRPO's read by _grpo, else part of `rl`'s line
    c.get("num_labels")  # a classifier's outputs: 1 for reward_model (the score head), 2 for a PRM's token head
    for key, why in _NOT_SFT.items():
        if key == "rl" and (_dpo(c) or _grpo(c) or _kto(c) or _orpo(c)):
            continue
        if c.get(key):
            c.unmodelled(key, why)


def _reward(c: Collector) -> None:
    """`reward_model: true`: AxolotlRewardTrainer over trl==1.9.0's RewardTrainer, the model loaded
    as AutoModelForSequenceClassification with num_labels 1 (core/builders/causal.py:160-161;
    utils/schemas/validation.py:260-265), its collator DataCollatorForPreference (causal.py:515-519):
    chosen and rejected rows, padded, no LM loss for a plugin to replace (memory/reward.py)."""
    if not c.get("reward_model") or not c.flag("reward_model", c.get("reward_model")):
        return
    if c.get("rl"):
        return  # an RL trainer takes precedence (causal builder is not used): said by _NOT_SFT's rl line
    c.set("reward_model", "objective", Objective.REWARD, "axolotl==0.19.0 AxolotlRewardTrainer (trl==1.9.0)")
    c.get("center_rewards_coefficient")
    if c.fields.get("loss") not in (None, Loss.HF):
        c.set("reward_model", "loss", Loss.HF, "a sequence-classification model has no LM loss to replace")
    if c.fields.get("packing") not in (None, Packing.NONE):
        c.set("reward_model", "packing", Packing.NONE, "the reward collator pads each pair's rows (causal.py:515-519)")


# axolotl==0.19.0 `rl` values run by AxolotlDPOTrainer (builders/rl.py:71-73; ipo is its loss_type)
_DPO_RL = ("dpo", "ipo")
# DPO keys that change memory and are not modelled (utils/schemas/config.py:310-336)
_DPO_UNMODELLED = {
    "dpo_use_liger_kernel": "Liger's fused DPO loss on the hidden states (no [2B,S,V] logits): estimated with "
    "trl 1.9.0's full-logits path, an overestimate",
}


def _dpo(c: Collector) -> bool:
    """`rl: dpo|ipo`: axolotl's DPO trainer, trl==1.9.0's DPOTrainer (memory/preference.py). Its
    log-probs come from the model's logits, which no loss patch is on the path of (the step passes
    no labels); it pads (trl 1.9.0 forces padding_free off, dpo_trainer.py:706-713)."""
    if c.get("rl") not in _DPO_RL:
        return False
    c.set(
        "rl",
        "objective",
        Objective.DPO,
        "axolotl==0.19.0 AxolotlDPOTrainer over trl==1.9.0's DPOTrainer (core/trainers/dpo/trainer.py:26-33)",
    )
    if c.fields.get("loss") not in (None, Loss.HF):
        c.set("rl", "loss", Loss.HF, "DPO's log-probs come from the model's full logits, not the loss patch")
    if c.fields.get("packing") not in (None, Packing.NONE):
        c.set("rl", "packing", Packing.NONE, "trl 1.9.0's DPOTrainer pads (dpo_trainer.py:706-713)")
    precompute = c.get("precompute_ref_log_probs")
    if precompute is not None and c.flag("precompute_ref_log_probs", precompute):
        c.set("precompute_ref_log_probs", "precompute_ref_log_probs", True)
    for key, why in _DPO_UNMODELLED.items():
        if c.get(key):
            c.unmodelled(key, why)
    weighting = c.get("dpo_use_weighting")
    if weighting is not None and c.flag("dpo_use_weighting", weighting):
        c.set("dpo_use_weighting", "dpo_use_weighting", True, "WPO weights: two logsumexps over the fp32 logits")
    if any("sft" in str(t) for t in c.get("dpo_loss_type") or ()):
        c.unmodelled("dpo_loss_type", "the sft loss type's cross-entropy over the chosen rows' logits is not modelled")
    return True


def _kto(c: Collector) -> bool:
    """`rl: kto`: AxolotlKTOTrainer over trl==1.9.0's KTOTrainer (core/trainers/trl.py:28-40;
    memory/kto.py): KTOConfig's default loss_type kto (axolotl passes none: the KL rows), its
    desirable and undesirable weights; log-probs from the model's logits (no loss patch on the
    path), padded rows. precompute_ref_log_probs is passed to DPO only (core/trainers/dpo/__init__.py:43-45)."""
    if c.get("rl") != "kto":
        return False
    c.set("rl", "objective", Objective.KTO, "axolotl==0.19.0 AxolotlKTOTrainer over trl==1.9.0's KTOTrainer")
    for key in ("kto_desirable_weight", "kto_undesirable_weight", "rl_beta", "precompute_ref_log_probs"):
        c.get(key)
    if c.fields.get("loss") not in (None, Loss.HF):
        c.set("rl", "loss", Loss.HF, "KTO's log-probs come from the model's logits, not the loss patch")
    if c.fields.get("packing") not in (None, Packing.NONE):
        c.set("rl", "packing", Packing.NONE, "trl 1.9.0's KTOTrainer pads (axolotl: not supported with kto)")
    return True


def _orpo(c: Collector) -> bool:
    """`rl: orpo` (AxolotlORPOTrainer) and `rl: simpo` (AxolotlCPOTrainer, loss_type simpo) over
    trl==1.9.0's experimental trainers (core/builders/rl.py:75-78, 128-145; memory/orpo.py): no
    reference model; the NLL over the chosen rows, ORPO's always, CPO's unless cpo_alpha is 0
    (CPOConfig's default 1.0 when axolotl passes none)."""
    rl = c.get("rl")
    if rl not in ("orpo", "simpo"):
        return False
    trainer = (
        "AxolotlORPOTrainer over trl==1.9.0's ORPOTrainer"
        if rl == "orpo"
        else ("AxolotlCPOTrainer (loss_type simpo) over trl==1.9.0's CPOTrainer")
    )
    c.set("rl", "objective", Objective.ORPO, f"axolotl==0.19.0 {trainer}")
    for key in ("orpo_alpha", "rl_beta", "simpo_gamma"):
        c.get(key)
    alpha = c.get("cpo_alpha")
    if rl == "simpo" and alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise c.fail("cpo_alpha", "a number >= 0", alpha)
        c.set("cpo_alpha", "chosen_nll", alpha > 0, "CPO's NLL over the chosen rows runs when cpo_alpha > 0")
    if c.fields.get("loss") not in (None, Loss.HF):
        c.set("rl", "loss", Loss.HF, f"{rl}'s log-probs come from the model's logits, not the loss patch")
    if c.fields.get("packing") not in (None, Packing.NONE):
        c.set("rl", "packing", Packing.NONE, f"trl 1.9.0's {rl} trainer pads each pair's rows")
    return True


# axolotl==0.19.0 `rl` values run by GRPOStrategy's trainer (core/builders/rl.py:53-67):
# AxolotlGRPOTrainer, trl==1.9.0's GRPOTrainer with axolotl's mixins (core/trainers/grpo/trainer.py:57-67);
# gdpo aggregates the rewards differently, the same step
_GRPO_RL = ("grpo", "gdpo")
# trl==1.9.0 GRPOConfig defaults axolotl leaves in place when `trl:` omits the key (grpo_config.py:488-490,
# 584-586; axolotl's vllm.gpu_memory_utilization default, utils/schemas/vllm.py:25-28, is what
# GRPOStrategy passes for colocate, core/trainers/grpo/__init__.py:71-76)
TRL19_COMPLETION = 256
AXOLOTL_VLLM_SHARE = 0.9
# `trl:` keys GRPOStrategy passes on that change memory and are not modelled
# (core/trainers/grpo/__init__.py:60-230)
_GRPO_UNMODELLED = {
    "use_liger_loss": "Liger's fused GRPO loss on the hidden states (no [B,C,V] logits): estimated with "
    "trl 1.9.0's full-logits path, an overestimate",
    "vllm_enable_sleep_mode": "vLLM's sleep mode: its share is counted as held throughout",
    "use_data_producer": "async GRPO (a background producer's batches) is not modelled: estimated as the "
    "synchronous step",
    "async_prefetch": "async GRPO (prefetched generations) is not modelled: estimated as the synchronous step",
    "entropy_coef": "the entropy bonus keeps the entropy's graph (a [B,C,V] log-softmax saved): not modelled",
}


def _grpo(c: Collector) -> bool:
    """`rl: grpo|gdpo`: trl==1.9.0's GRPOTrainer (memory/grpo.py, memory/grpo_logits.py): log-probs from
    the model's logits (no labels, so no loss patch on the path), padded prompt + completion rows; its
    settings from the `trl:` section as GRPOStrategy.set_training_args_kwargs passes them."""
    if c.get("rl") not in _GRPO_RL:
        return False
    c.set("rl", "objective", Objective.GRPO, "axolotl==0.19.0 AxolotlGRPOTrainer over trl==1.9.0's GRPOTrainer")
    if c.fields.get("loss") not in (None, Loss.HF):
        c.set("rl", "loss", Loss.HF, "GRPO's log-probs come from the model's logits, not the loss patch")
    if c.fields.get("packing") not in (None, Packing.NONE):
        c.set("rl", "packing", Packing.NONE, "trl 1.9.0's GRPOTrainer pads its prompt + completion rows")
    trl = c.mapping("trl", c.get("trl"))
    completion = c.pos_int("trl.max_completion_length", c.get("max_completion_length", TRL19_COMPLETION, trl))
    note = "" if "max_completion_length" in trl else f"GRPOConfig default {TRL19_COMPLETION} (trl==1.9.0)"
    c.set("trl.max_completion_length", "completion_len", completion, note)
    c.set(
        "trl.max_completion_length",
        "seq_len",
        GRPO_ASSUMED_PROMPT + completion,
        f"a {GRPO_ASSUMED_PROMPT}-token prompt assumed: sequence_len bounds no GRPO prompt (utils/data/rl.py:174-175)",
    )
    _grpo_trl_keys(c, trl)
    for key, why in _GRPO_UNMODELLED.items():
        if c.get(key, None, trl):
            c.unmodelled(f"trl.{key}", why)
    return True


def _grpo_trl_keys(c: Collector, trl: dict) -> None:
    """Generation (use_vllm, vllm_mode, vllm.gpu_memory_utilization), the generation batch, the
    iterations and the KL coefficient (trl.beta, else rl_beta)."""
    if c.flag("trl.use_vllm", c.get("use_vllm", False, trl)):
        table = {"colocate": Generation.VLLM_COLOCATE, "server": Generation.VLLM_SERVER}
        mode = c.choice("trl.vllm_mode", c.get("vllm_mode", "colocate", trl), table)
        c.set("trl.use_vllm", "generation", mode, f"vLLM, vllm_mode {mode.value.removeprefix('vllm-')}")
        if mode == Generation.VLLM_COLOCATE:
            share = c.get("gpu_memory_utilization", AXOLOTL_VLLM_SHARE, c.mapping("vllm", c.get("vllm")))
            set_vllm_share(c, "vllm.gpu_memory_utilization", share)
    iterations = c.get("num_iterations", None, trl)
    if iterations is not None:
        c.set("trl.num_iterations", "num_iterations", c.pos_int("trl.num_iterations", iterations))
    set_generation_batch(c, "trl.generation_batch_size", c.get("generation_batch_size", None, trl), 1)
    rl_beta = c.get("rl_beta")  # the same value (utils/schemas/config.py check_beta_and_trl_beta_match)
    trl_beta = c.get("beta", None, trl)
    set_beta(c, "trl.beta" if trl_beta is not None else "rl_beta", trl_beta if trl_beta is not None else rl_beta)


# Parallelism and precision axolotl==0.19.0 offers that the estimate does not model (schema in
# utils/schemas/config.py:570-585, 1110-1150; expert_parallel_size in
# integrations/expert_parallel/args.py): each is said in one line when it changes the step.
_PARALLEL = {
    "tensor_parallel_size": "tensor parallelism (DeepSpeed AutoTP) is not modelled: estimated with every GPU "
    "holding whole layers (more weights and activations per GPU than with it)",
    "context_parallel_size": "context parallelism (ring attention: each GPU holds a slice of the sequence) is "
    "not modelled: estimated with each GPU holding the whole sequence's activations",
    "sequence_parallel_degree": "context parallelism (ring attention) is not modelled: estimated with each GPU "
    "holding the whole sequence's activations",
    "expert_parallel_size": "expert parallelism is not modelled: estimated with every GPU holding all experts",
    "dp_replicate_size": "hybrid sharding (FSDP over dp_shard_size GPUs, replicated dp_replicate_size times) is "
    "not modelled: estimated with FSDP over every GPU",
}
_FP8 = ("fp8", "fp8_enable_fsdp_float8_all_gather")


def _parallel_and_fp8(c: Collector) -> None:
    for key, why in _PARALLEL.items():
        value = c.get(key)
        if value is not None and c.pos_int(key, value) > 1:
            c.unmodelled(key, f"{value}: {why}")
    c.get("dp_shard_size")  # the FSDP degree; the world size comes from --gpus
    for key in _FP8:
        if c.get(key) is True:
            c.unmodelled(
                key, "torchao float8 training (float8 casts of each Linear's input and weight) is not modelled"
            )


_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")


def _lora_kernels(c: Collector, method: Method) -> None:
    """axolotl's fused LoRA autograd Functions (memory/lora_kernels.py). Unset, axolotl==0.19.0
    turns them on for LoRA/QLoRA (utils/schemas/config.py:1974-2085), which the --stack axolotl
    bundle's rule does (not under multi-GPU FSDP1, 8-bit LoRA or DoRA); here only what the file
    decides: the three keys, or RL / trust_remote_code, which keep them off. Some but not all
    three on: modelled as peft's layers (the rule covers a layer whose groups all fuse), said."""
    if method == Method.FULL:
        return  # _lora marked every lora_* key seen: no adapter, nothing to fuse
    explicit = {k: c.flag(k, c.get(k)) for k in _KERNELS if c.get(k) is not None}
    if explicit:
        on = [k for k, v in explicit.items() if v]
        all_on = len(on) == len(_KERNELS)
        c.set(", ".join(explicit), "lora_kernels", all_on, "axolotl's fused LoRA Functions" if all_on else "")
        if on and not all_on:
            c.unmodelled(
                ", ".join(on),
                "only some of axolotl's LoRA kernels on: modelled as peft's LoRA layers (an overestimate)",
            )
        return
    off = next((k for k in ("rl", "trust_remote_code") if c.get(k)), None)
    if off:
        c.set(off, "lora_kernels", False, f"axolotl does not turn its LoRA kernels on with {off}")


def _fp32_embeddings(c: Collector, method: Method) -> None:
    """A full fine-tune outside FSDP upcasts embed_tokens, lm_head and every norm to fp32 and casts them
    back only for an adapter, FSDP, CCE or an attention that needs it (any but sdpa/eager)
    (axolotl==0.19.0 loaders/model.py:435-490, 1153-1175; utils/schemas/config.py:1517-1522);
    DeepSpeed's bf16 engine casts the module back (deepspeed==0.18.2 runtime/engine.py:1310-1313).
    Said as --fp32-embeddings-norms where the step runs under autocast over bf16 weights."""
    full = c.fields.get("method", method) in (Method.FULL, Method.GALORE)
    autocast = c.fields.get("precision") == Precision.MIXED and c.fields.get("model_dtype") == ModelDtype.BF16
    if not full or not autocast or c.distributed in (Distributed.FSDP, Distributed.DEEPSPEED):
        return
    attention = c.get("attn_implementation")
    if c.get("flash_attention") is True or attention not in (None, "sdpa", "eager"):
        key, why, keep = "attn_implementation" if attention else "flash_attention", "this attention", False
    elif c.fields.get("loss") == Loss.CCE:
        key, why, keep = "plugins", "Cut Cross-Entropy", False
    else:
        legacy = next((k for k in ("sdp_attention", "eager_attention") if c.get(k) is True), "adapter")
        key = "attn_implementation" if attention else legacy
        why = "no adapter, transformers' default sdpa" if key == "adapter" else "sdpa/eager attention"
        keep = True
    c.set(
        key,
        "fp32_embeddings_norms",
        keep,
        f"{why}: embed_tokens, lm_head and the norms "
        + (
            "stay fp32 (loaders/model.py:441-450, 1153-1175)"
            if keep
            else "cast back to bf16 (loaders/model.py:468-490)"
        ),
    )


def _kbit_prep(c: Collector, method: Method) -> None:
    """No fp32 upcast survives to the step: axolotl calls peft's prepare_model_for_kbit_training for a
    quantized base unless FSDP-QLoRA, cpu_ram_efficient_loading or ZeRO-3 (axolotl==0.19.0
    loaders/model.py:1116-1151), but then casts every `norm` module and embed_tokens/lm_head back to
    torch_dtype for any adapter (_configure_embedding_dtypes, :468-490), before get_peft_model."""
    if method == Method.FULL:
        return
    quantized = method == Method.QLORA  # load_in_4bit or load_in_8bit
    c.set(
        ("load_in_8bit" if c.get("load_in_8bit") is True else "load_in_4bit") if quantized else "adapter",
        "kbit_prep",
        False,
        "derived: norms and embeddings are cast back to bf16 after prepare_model_for_kbit_training "
        "(loaders/model.py:468-490)"
        if quantized
        else "derived: not a quantized base",
    )
