"""Names several formats share: optimizers, attention kernels, FSDP strategies, dtypes."""

from __future__ import annotations

from vramplan.configs.collect import Collector
from vramplan.configs.reading import Distributed
from vramplan.setup import Attention, FsdpSharding, LigerLayers, Method, ModelDtype, Optim, OptimFamily

# Framework names for optimizers that are not transformers OptimizerNames (every OptimizerNames
# name is an Optim member): (the Optim, why).
_OPTIM_ALIASES: dict[str, tuple[Optim, str]] = {
    "paged_adamw": (Optim.PAGED_ADAMW_32BIT, "bitsandbytes PagedAdamW (32-bit states)"),
    "ao_adamw_8bit": (Optim.ADAMW_TORCH_8BIT, "torchao AdamW8bit (axolotl's name)"),
}

OPTIM_ALLOWED = ", ".join([o.value for o in Optim] + list(_OPTIM_ALIASES))


def map_optim(name: str) -> tuple[Optim, str] | None:
    """An HF optimizer name (or a framework's alias of one) as an ``Optim``, with a note."""
    key = name.lower()
    for optim in Optim:
        if optim.value == key:
            return optim, ""
    return _OPTIM_ALIASES.get(key)


# vramplan's names for optimizers that transformers' TrainingArguments.optim does not take: the
# frameworks that build them themselves, and the key that does it there
NOT_HF_NAMES: dict[Optim, str] = {
    Optim.MUON: "axolotl's optimizer: muon, LLaMA-Factory's use_muon",
    Optim.ADAM_MINI: "LLaMA-Factory's use_adam_mini",
}


def set_optim(c: Collector, key: str, name: str, also: frozenset[Optim] = frozenset()) -> None:
    """Set ``optim`` (and ``method=galore`` for GaLore names) or report the name unmodelled.
    ``also``: the non-HF names (NOT_HF_NAMES) this key takes (axolotl's optimizer: muon)."""
    if not isinstance(name, str):
        raise c.fail(key, "an optimizer name", name)
    mapped = map_optim(name)
    if mapped is not None and mapped[0] in NOT_HF_NAMES and mapped[0] not in also:
        raise c.fail(key, f"a transformers optimizer name ({name} is built by {NOT_HF_NAMES[mapped[0]]})", name)
    if mapped is None:
        c.unmodelled(key, f"optimizer {name} is not modelled (modelled: {OPTIM_ALLOWED}); give --optim for the closest")
        return
    optim, note = mapped
    c.set(key, "optim", optim, note)
    if optim.is_galore:
        c.set(key, "method", Method.GALORE, "GaLore optimizers train every weight through projected states")


def set_optim_args(c: Collector, key: str = "optim_args") -> None:
    """GaLore's and APOLLO's rank (and GaLore's update_proj_gap) from ``optim_args``: transformers
    5.25.0 trainer_optimizer.py:65-73 parses "rank=1024, update_proj_gap=500" (spaces dropped,
    comma-separated key=value) and :370-405 pops them (defaults rank 128, gap 200). Other
    optimizers' arguments (betas, eps, scale) do not change memory."""
    raw = c.get(key)
    optim = c.fields.get("optim")
    if raw is None or optim is None:
        return
    # int(...) of the string, as transformers does
    args = {k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in _optim_args(c, key, raw).items()}
    if optim.is_galore:
        for name, field in (("rank", "galore_rank"), ("update_proj_gap", "galore_update_proj_gap")):
            if name in args:
                c.set(key, field, c.pos_int(f"{key}.{name}", args[name]))
    elif optim.traits.family == OptimFamily.APOLLO_ADAMW and "rank" in args:
        c.set(key, "apollo_rank", c.pos_int(f"{key}.rank", args["rank"]))
    c.seen.add(key)


def note_low_rank_targets(c: Collector, key: str = "optim_target_modules") -> None:
    """transformers 5.25.0 trainer_optimizer.py:113-160 projects the nn.Linear modules that
    optim_target_modules names ("all-linear": every Linear, lm_head included); vramplan projects
    the decoder layers' attention and MLP Linears (the usual ["attn", "mlp"]). Anything else
    is said, not modelled."""
    optim, raw = c.fields.get("optim"), c.get(key)
    if optim is None or raw is None or not (optim.is_galore or optim.traits.family == OptimFamily.APOLLO_ADAMW):
        return
    names = [raw] if isinstance(raw, str) else [str(x) for x in raw] if isinstance(raw, list) else []
    text = " ".join(names).lower()
    if text.replace("_", "-") == "all-linear":
        c.unmodelled(key, "all-linear also projects lm_head: estimated with lm_head's full optimizer states (high)")
    elif not ("attn" in text and "mlp" in text):
        c.unmodelled(key, f"{raw!r}: estimated as projecting every attention and MLP Linear")


def _optim_args(c: Collector, key: str, raw: object) -> dict:
    if isinstance(raw, dict):  # axolotl also takes a mapping
        return raw
    if not isinstance(raw, str) or any("=" not in kv for kv in raw.replace(" ", "").split(",") if kv):
        raise c.fail(key, 'comma-separated key=value pairs ("rank=256, update_proj_gap=200")', raw)
    return dict(kv.split("=", 1) for kv in raw.replace(" ", "").split(",") if kv)


# attention implementation names (transformers attn_implementation) -> Attention
HF_ATTENTION = {
    "sdpa": Attention.SDPA,
    "eager": Attention.EAGER,
    "flash_attention_2": Attention.FLASH,
    "flash_attention_3": Attention.FLASH,
    "kernels-community/flash-attn": Attention.FLASH,
    # FlashAttention 3 from the Hub's kernels (axolotl's examples name it): like FA2 it saves q, k, v,
    # its output and one fp32 logsumexp per row and head, which is what Attention.FLASH models
    "kernels-community/flash-attn3": Attention.FLASH,
    "kernels-community/vllm-flash-attn3": Attention.FLASH,
}


def set_attention(c: Collector, key: str, name: str) -> None:
    if not isinstance(name, str):
        raise c.fail(key, "an attention implementation name", name)
    if name.lower() in HF_ATTENTION:
        c.set(key, "attention", HF_ATTENTION[name.lower()])
    else:
        c.unmodelled(key, f"attention {name} is not modelled (modelled: sdpa, eager, flash_attention_2)")


# accelerate/transformers FSDP1 strategy names and accelerate's integer codes
# (accelerate==1.16.0 accelerate/utils/constants.py FSDP_SHARDING_STRATEGY)
FSDP_STRATEGY = {
    "full_shard": FsdpSharding.FULL,
    "shard_grad_op": FsdpSharding.SHARD_GRAD_OP,
    "no_shard": FsdpSharding.NO_SHARD,
    "hybrid_shard": FsdpSharding.HYBRID,
    "hybrid_shard_zero2": FsdpSharding.HYBRID,
    1: FsdpSharding.FULL,
    2: FsdpSharding.SHARD_GRAD_OP,
    3: FsdpSharding.NO_SHARD,
    4: FsdpSharding.HYBRID,
    5: FsdpSharding.HYBRID,
}


def fsdp_reshard(c: Collector, key: str, value) -> FsdpSharding:
    """``reshard_after_forward``: a bool (FSDP2) or a strategy name (FSDP1, accelerate 1.16.0
    accelerate/utils/dataclasses.py:1732-1750)."""
    if isinstance(value, bool):
        return FsdpSharding.FULL if value else FsdpSharding.SHARD_GRAD_OP
    return c.choice(key, value, FSDP_STRATEGY)


# torch dtype names in HF configs (`dtype`, `torch_dtype`) -> ModelDtype
HF_DTYPE = {
    "bfloat16": ModelDtype.BF16,
    "bf16": ModelDtype.BF16,
    "float32": ModelDtype.FP32,
    "fp32": ModelDtype.FP32,
    "auto": ModelDtype.BF16,
}


# fsdp_config's "version" when unset: 2 at transformers==5.25.0 (training_args.py:2826, TRL/HF),
# 1 at 5.6.0 (training_args.py:2809; llamafactory==0.9.5 wants transformers<=5.6.0)
TRAINER_FSDP_DEFAULT = (2, "TrainingArguments' default 2 (training_args.py:2826)")
LLAMAFACTORY_FSDP_DEFAULT = (1, "transformers==5.6.0 TrainingArguments' default 1 (training_args.py:2809)")


def set_trainer_fsdp(c: Collector, default: tuple[int, str] = TRAINER_FSDP_DEFAULT) -> None:
    """transformers TrainingArguments' `fsdp` (space-separated tokens or a list) and `fsdp_config`,
    as the Trainer reads them: TRL/HF files, and LLaMA-Factory's, which hands them to the Trainer
    of the transformers it runs on (`default`: the version when fsdp_config does not say)."""
    tokens = c.names("fsdp", c.get("fsdp") or [], sep=" ")
    cfg = c.get("fsdp_config") or {}
    if not tokens:
        return
    if isinstance(cfg, str):
        c.unmodelled("fsdp_config", "an fsdp_config file path is not read; give its settings as flags")
        cfg = {}
    cfg = c.mapping("fsdp_config", cfg)
    c.distributed = Distributed.FSDP
    cfg = {k.removeprefix("fsdp_"): v for k, v in cfg.items()}  # transformers strips the prefix
    c.set(
        "fsdp_config.version",
        "fsdp_version",
        c.choice("fsdp_config.version", cfg.get("version", default[0]), {1: 1, 2: 2}),
        "" if "version" in cfg else default[1],
    )
    for token in tokens:
        if token in FSDP_STRATEGY:
            c.set("fsdp", "fsdp_sharding", FSDP_STRATEGY[token])
        elif token == "offload":
            c.set("fsdp", "cpu_offload", True)
        elif token != "auto_wrap":
            raise c.fail("fsdp", "full_shard, shard_grad_op, no_shard, hybrid_shard, offload or auto_wrap", token)
    set_fsdp_config_keys(c, cfg)


def set_fsdp_config_keys(c: Collector, cfg: dict) -> None:
    """The fsdp_config keys the Trainer and axolotl read alike (their `fsdp_` prefix removed):
    reshard_after_forward, offload_params, activation_checkpointing."""
    if "reshard_after_forward" in cfg:
        key = "fsdp_config.reshard_after_forward"
        c.set(key, "fsdp_sharding", fsdp_reshard(c, key, cfg["reshard_after_forward"]))
    if "offload_params" in cfg:
        c.set("fsdp_config.offload_params", "cpu_offload", c.flag("fsdp_config.offload_params", cfg["offload_params"]))
    if cfg.get("activation_checkpointing") is True:
        c.set(
            "fsdp_config.activation_checkpointing",
            "gradient_checkpointing",
            True,
            "FSDP applies non-reentrant checkpointing per layer",
        )


def liger_layers_of(norms: bool, glu: bool) -> LigerLayers:
    """The --liger-layers value for Liger's RMSNorm and gated-MLP kernels, each on or off."""
    return {
        (True, True): LigerLayers.ALL,
        (True, False): LigerLayers.RMS_NORM,
        (False, True): LigerLayers.GLU,
        (False, False): LigerLayers.NONE,
    }[(norms, glu)]


def set_liger_kernel_config(c: Collector, key: str = "liger_kernel_config") -> tuple[LigerLayers, bool]:
    """The Trainer's use_liger_kernel: liger_kernel_config's keyword arguments go to
    _apply_liger_kernel_to_instance, each defaulting to apply_liger_kernel_to_<type>'s True
    (transformers 5.25.0 integrations/liger.py:28-51; liger-kernel==0.8.5 monkey_patch.py).
    Returns (the layer kernels on, whether the fused linear cross-entropy is on)."""
    cfg = c.mapping(key, c.get(key))
    on = {k: c.flag(f"{key}.{k}", v) for k, v in cfg.items() if k in _LIGER_KWARGS}
    glu = on.get("swiglu", True) and on.get("geglu", True)
    if on.get("cross_entropy") is True:
        c.unmodelled(f"{key}.cross_entropy", "Liger's non-fused cross-entropy kernel: modelled as the model's own")
    layers = liger_layers_of(on.get("rms_norm", True), glu)
    c.set(key if cfg else "use_liger_kernel", "liger_layers", layers, "Liger's RMSNorm and SwiGLU/GeGLU kernels")
    return layers, on.get("fused_linear_cross_entropy", True)


_LIGER_KWARGS = ("rope", "rms_norm", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy", "layer_norm")
