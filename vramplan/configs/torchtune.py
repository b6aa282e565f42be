"""torchtune recipe YAML (torchtune==0.6.1, recipes/configs/*).

torchtune has no global defaults: the recipe file holds every knob. The world size comes
from ``tune run --nproc_per_node N``; a distributed recipe shards with FSDP2 (fully_shard).
"""

from __future__ import annotations

import os
import re

from vramplan.configs.collect import Collector
from vramplan.configs.reading import ConfigFormat, ConfigReading, Distributed
from vramplan.errors import VramplanError
from vramplan.setup import (
    ActivationOffload,
    AdapterDtype,
    FsdpSharding,
    LoraTargets,
    Loss,
    Method,
    ModelDtype,
    Optim,
    Packing,
    Precision,
    Quant,
    Stack,
)

_SRC = "torchtune==0.6.1"
# builder (torchtune/models/<family>/_model_builders.py, lora_/qlora_ prefix removed) -> HF id.
# Base and instruct checkpoints have the same shapes, so either id gives the same memory.
BUILDERS: dict[str, tuple[str, str]] = {  # builder -> (torchtune.models module, HF id)
    "llama3_1_8b": ("llama3_1", "meta-llama/Llama-3.1-8B"),
    "llama3_1_70b": ("llama3_1", "meta-llama/Llama-3.1-70B"),
    "llama3_1_405b": ("llama3_1", "meta-llama/Llama-3.1-405B"),
    "llama3_8b": ("llama3", "meta-llama/Meta-Llama-3-8B"),
    "llama3_70b": ("llama3", "meta-llama/Meta-Llama-3-70B"),
    "llama3_2_1b": ("llama3_2", "meta-llama/Llama-3.2-1B"),
    "llama3_2_3b": ("llama3_2", "meta-llama/Llama-3.2-3B"),
    "llama3_3_70b": ("llama3_3", "meta-llama/Llama-3.3-70B-Instruct"),
    "llama2_7b": ("llama2", "meta-llama/Llama-2-7b-hf"),
    "llama2_13b": ("llama2", "meta-llama/Llama-2-13b-hf"),
    "llama2_70b": ("llama2", "meta-llama/Llama-2-70b-hf"),
    "qwen2_5_0_5b": ("qwen2_5", "Qwen/Qwen2.5-0.5B-Instruct"),
    "qwen2_5_1_5b_instruct": ("qwen2_5", "Qwen/Qwen2.5-1.5B-Instruct"),
    "qwen2_5_1_5b_base": ("qwen2_5", "Qwen/Qwen2.5-1.5B"),
    "qwen2_5_3b": ("qwen2_5", "Qwen/Qwen2.5-3B-Instruct"),
    "qwen2_5_7b_instruct": ("qwen2_5", "Qwen/Qwen2.5-7B-Instruct"),
    "qwen2_5_7b_base": ("qwen2_5", "Qwen/Qwen2.5-7B"),
    "qwen2_5_14b_instruct": ("qwen2_5", "Qwen/Qwen2.5-14B-Instruct"),
    "qwen2_5_14b_base": ("qwen2_5", "Qwen/Qwen2.5-14B"),
    "qwen2_5_32b_instruct": ("qwen2_5", "Qwen/Qwen2.5-32B-Instruct"),
    "qwen2_5_32b_base": ("qwen2_5", "Qwen/Qwen2.5-32B"),
    "qwen2_5_72b_instruct": ("qwen2_5", "Qwen/Qwen2.5-72B-Instruct"),
    "qwen2_5_72b_base": ("qwen2_5", "Qwen/Qwen2.5-72B"),
    "mistral_7b": ("mistral", "mistralai/Mistral-7B-v0.1"),
    "gemma2_2b": ("gemma2", "google/gemma-2-2b"),
    "gemma2_9b": ("gemma2", "google/gemma-2-9b"),
    "gemma2_27b": ("gemma2", "google/gemma-2-27b"),
    "phi3_mini": ("phi3", "microsoft/Phi-3-mini-4k-instruct"),
    "phi4_14b": ("phi4", "microsoft/phi-4"),
    "gemma_2b": ("gemma", "google/gemma-2b"),
    "gemma_7b": ("gemma", "google/gemma-7b"),
}
# Builders of checkpoints no preset has (Qwen2), whose decoder has the shape of one that is
# (vocab, layers, heads, kv heads, head dim, width, MLP width, tied output), transcribed from
# torchtune==0.6.1 torchtune/models/<module>/_model_builders.py and held to the presets'
# analyses by tests/test_configs.py: the memory is that preset's.
SAME_SHAPE: dict[str, tuple[str, str, tuple[int, ...]]] = {  # builder -> (module, HF id, shape)
    "qwen2_0_5b": ("qwen2", "Qwen/Qwen2.5-0.5B", (151936, 24, 14, 2, 64, 896, 4864, 1)),
    "qwen2_1_5b": ("qwen2", "Qwen/Qwen2.5-1.5B", (151936, 28, 12, 2, 128, 1536, 8960, 1)),
    "qwen2_7b": ("qwen2", "Qwen/Qwen2.5-7B", (152064, 28, 28, 4, 128, 3584, 18944, 0)),
}
# Builders torchtune added after 0.6.1 (pytorch/torchtune@bd2a0fc, unreleased:
# torchtune/models/qwen3/_model_builders.py; its recipes/configs/qwen3/*.yaml use them). Their
# numbers (vocab 151936, layers, heads, 8 kv heads, head_dim 128, width, MLP width, tied output
# up to 4B) are the Qwen3 checkpoints'; tests/test_config_sweep.py holds them to the presets.
UNRELEASED_BUILDERS: dict[str, tuple[str, str, tuple[int, ...]]] = {  # builder -> (module, HF id, shape)
    "qwen3_0_6b_base": ("qwen3", "Qwen/Qwen3-0.6B-Base", (151936, 28, 16, 8, 128, 1024, 3072, 1)),
    "qwen3_0_6b_instruct": ("qwen3", "Qwen/Qwen3-0.6B", (151936, 28, 16, 8, 128, 1024, 3072, 1)),
    "qwen3_1_7b_base": ("qwen3", "Qwen/Qwen3-1.7B-Base", (151936, 28, 16, 8, 128, 2048, 6144, 1)),
    "qwen3_1_7b_instruct": ("qwen3", "Qwen/Qwen3-1.7B", (151936, 28, 16, 8, 128, 2048, 6144, 1)),
    "qwen3_4b_base": ("qwen3", "Qwen/Qwen3-4B-Base", (151936, 36, 32, 8, 128, 2560, 9728, 1)),
    "qwen3_4b_instruct": ("qwen3", "Qwen/Qwen3-4B", (151936, 36, 32, 8, 128, 2560, 9728, 1)),
    "qwen3_8b_base": ("qwen3", "Qwen/Qwen3-8B-Base", (151936, 36, 32, 8, 128, 4096, 12288, 0)),
    "qwen3_8b_instruct": ("qwen3", "Qwen/Qwen3-8B", (151936, 36, 32, 8, 128, 4096, 12288, 0)),
    "qwen3_14b_base": ("qwen3", "Qwen/Qwen3-14B-Base", (151936, 40, 40, 8, 128, 5120, 17408, 0)),
    "qwen3_14b_instruct": ("qwen3", "Qwen/Qwen3-14B", (151936, 40, 40, 8, 128, 5120, 17408, 0)),
    "qwen3_32b": ("qwen3", "Qwen/Qwen3-32B", (151936, 64, 64, 8, 128, 5120, 25600, 0)),
}
# The recipe a config's header runs (`tune run [--nproc_per_node N] RECIPE --config ...`, in the
# comment every shipped config starts with; recipes/*.py at pytorch/torchtune@bd2a0fc).
_NOT_TRAINING = frozenset({"eleuther_eval", "generate", "dev/generate_v2", "dev/generate_v2_distributed", "quantize"})
_NOT_SFT = {  # recipe prefix -> what the SFT step the estimate models leaves out
    "lora_dpo": "DPO: chosen and rejected sequences in one batch (2x the tokens) and a reference pass "
    "with the adapters disabled are not modelled; estimated as one SFT step",
    "full_dpo": "DPO: chosen and rejected sequences and a frozen reference model are not modelled; "
    "estimated as one SFT step",
    "ppo_": "PPO: policy, value, reference and reward models and generation are not modelled; "
    "estimated as one SFT step of the policy",
    "dev/grpo": "GRPO: generation and a reference model are not modelled; estimated as one SFT step",
    "dev/async_grpo": "GRPO: generation and a reference model are not modelled; estimated as one SFT step",
    "knowledge_distillation": "the teacher model (its weights and logits) is not modelled; estimated as "
    "the student's SFT step",
    "qat_": "quantization-aware training's fake-quantized weights and activations (torchao "
    "FakeQuantizedLinear: a quantized copy of each Linear's weight and input per forward) are not "
    "modelled; estimated as the step without them",
}
# torchtune module names -> peft/HF names
_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj"}
_MLP = ("gate_proj", "up_proj", "down_proj")  # w1, w3, w2
_ALL_LINEAR = frozenset(_ATTN.values()) | frozenset(_MLP)
_OPTIMIZERS = {
    "torch.optim.AdamW": None,  # fused or foreach, decided by `fused`
    "bitsandbytes.optim.AdamW8bit": (Optim.ADAMW_BNB_8BIT, ""),
    "bitsandbytes.optim.PagedAdamW8bit": (Optim.PAGED_ADAMW_8BIT, ""),
    "bitsandbytes.optim.PagedAdamW": (Optim.PAGED_ADAMW_32BIT, "bitsandbytes PagedAdamW (32-bit states)"),
    "bitsandbytes.optim.PagedAdamW32bit": (Optim.PAGED_ADAMW_32BIT, ""),
    "torchao.optim.AdamW8bit": (Optim.ADAMW_TORCH_8BIT, ""),
    "torchao.optim.AdamW4bit": (Optim.ADAMW_TORCH_4BIT, ""),
}
_LOSSES = {
    "torchtune.modules.loss.CEWithChunkedOutputLoss": (Loss.CHUNKED, "8 chunks (ce_chunked_output_loss.py:30)"),
    "torchtune.modules.loss.LinearCrossEntropyLoss": (
        Loss.TORCHTUNE_LINEAR_CE,
        "the output layer inside the loss, 8 row chunks (pytorch/torchtune@bd2a0fc, unreleased; CPU-traced)",
    ),
    "torch.nn.CrossEntropyLoss": (Loss.HF, "full logits"),
}
_DTYPES = {"bf16": ModelDtype.BF16, "fp32": ModelDtype.FP32}
_KNOWN = frozenset(
    {
        "model",
        "tokenizer",
        "dataset",
        "optimizer",
        "loss",
        "dtype",
        "lr_scheduler",
        "output_dir",
        "resume_from_checkpoint",
        "tensor_parallel_plan",
        "data_parallel_shard_dim",
        "data_parallel_replicate_dim",
        "quantizer",
        "teacher_model",
    }
)


def read(data: dict, path: str, engine: dict | None = None) -> ConfigReading:
    c = Collector(path, data)
    model_cfg = c.get("model") or {}
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("_component_"), str):
        raise c.fail(
            "model._component_", "a torchtune model builder, e.g. torchtune.models.llama3_1.lora_llama3_1_8b", model_cfg
        )
    _recipe(c)
    model, method = _model(c, model_cfg)
    c.set_int("batch_size", "batch_size")
    c.set_int("gradient_accumulation_steps", "gradient_accumulation")
    _seq_len(c)
    _precision(c, method)
    _optimizer(c)
    _loss(c)
    c.set_flag("optimizer_in_bwd", "optimizer_in_backward")
    c.set_flag(
        "enable_activation_checkpointing", "gradient_checkpointing", "non-reentrant (training/activations.py:24)"
    )
    if c.get("enable_activation_offloading") is not None:
        on = c.flag("enable_activation_offloading", c.get("enable_activation_offloading"))
        c.set(
            "enable_activation_offloading",
            "activation_offload",
            ActivationOffload.ALL if on else ActivationOffload.NONE,
        )
    _distributed(c)
    c.set_flag("compile", "compile", "training.compile_model per layer + compile_loss (training/_compile.py)")
    if method != Method.FULL:
        c.set("model._component_", "kbit_prep", False, "derived: torchtune's LoRA is not a peft model")
    return c.finish(ConfigFormat.TORCHTUNE, Stack.TORCHTUNE, model, _KNOWN)


def _model(c: Collector, cfg: dict) -> tuple[str | None, Method]:
    component = cfg["_component_"]
    builder = component.rsplit(".", 1)[-1]
    base = builder.removeprefix("qlora_").removeprefix("lora_")
    if builder.startswith("qlora_") or (builder.startswith("lora_") and cfg.get("quantize_base") is True):
        method = Method.QLORA
        c.set("model._component_", "method", method, "4-bit NF4 base (torchao) + LoRA")
        c.set("model._component_", "quant", Quant.NF4, "torchao NF4, modelled as bitsandbytes nf4")
    else:
        method = Method.LORA if builder.startswith("lora_") else Method.FULL
        c.set("model._component_", "method", method)
    model, note = _builder_model(base)
    if note:
        c.record("model._component_", "model", model, note)
    if model is None:
        c.unmodelled(
            "model._component_", f"no Hugging Face id known for builder {base}; give MODEL on the command line"
        )
    if method != Method.FULL:
        _lora(c, cfg, fused=base.startswith(("phi3", "phi4")))
    return model, method


def _builder_model(base: str) -> tuple[str | None, str]:
    """The Hugging Face id a builder (its lora_/qlora_ prefix removed) stands for, and how that is
    known: "" for a 0.6.1 builder of that very checkpoint (BUILDERS), else the line to record."""
    if base in BUILDERS:
        return BUILDERS[base][1], ""
    if base in UNRELEASED_BUILDERS:
        return UNRELEASED_BUILDERS[base][1], (
            f"torchtune's {base} builder (pytorch/torchtune@bd2a0fc torchtune/models/qwen3/_model_builders.py, "
            "after 0.6.1) has that checkpoint's shape"
        )
    if base in SAME_SHAPE:
        module, hf_id, _shape = SAME_SHAPE[base]
        return hf_id, (
            f"torchtune's {base} builder has the decoder shape of {hf_id} "
            f"({_SRC} torchtune/models/{module}/_model_builders.py)"
        )
    return None, ""


# torchtune's Phi-3 and Phi-4 split what the HF checkpoints fuse (torchtune==0.6.1
# torchtune/models/phi3/_component_builders.py:80-82, 313-385: q_proj, k_proj, v_proj; w1, w3;
# phi4/_model_builders.py:6 builds with phi3's components):
# its adapters are modelled on HF's fused Linears. LoRA on q and v has the parameters of one on
# qkv_proj (r·(3072+3072) twice = r·(3072+9216)); on w1 and w3, 16% more than on gate_up_proj.
_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _lora(c: Collector, cfg: dict, fused: bool = False) -> None:
    if cfg.get("lora_rank") is not None:
        c.set("model.lora_rank", "lora_r", c.pos_int("model.lora_rank", cfg["lora_rank"]))
    if cfg.get("lora_dropout") is not None:
        c.set("model.lora_dropout", "lora_dropout", c.prob("model.lora_dropout", cfg["lora_dropout"]))
    if cfg.get("use_dora") is not None:
        c.set("model.use_dora", "dora", c.flag("model.use_dora", cfg["use_dora"]))
    attn = c.names("model.lora_attn_modules", cfg.get("lora_attn_modules") or [])
    names = [c.choice("model.lora_attn_modules", m, _ATTN) for m in attn]
    if cfg.get("apply_lora_to_mlp") is True:
        names += _MLP
    if cfg.get("apply_lora_to_output") is True:
        c.unmodelled(
            "model.apply_lora_to_output",
            "a LoRA adapter on the output projection is not modelled: estimated without it (r·(hidden + "
            "vocab) parameters, and a logits-sized output added in its forward)",
        )
    if set(names) == _ALL_LINEAR and len(names) == len(_ALL_LINEAR):
        c.set("model.lora_attn_modules", "lora_targets", LoraTargets.ALL_LINEAR, "q,k,v,output_proj + MLP")
    elif names:
        mapped = "torchtune names mapped to HF (output_proj->o_proj, w1/w3/w2->gate/up/down_proj)"
        if fused:
            names = list(dict.fromkeys(_FUSED.get(n, n) for n in names))
            mapped += "; Phi-3/Phi-4's split q/k/v and w1/w3 as HF's fused qkv_proj and gate_up_proj"
        c.set("model.lora_attn_modules", "lora_target_modules", tuple(names), mapped)


def _seq_len(c: Collector) -> None:
    tokenizer = c.get("tokenizer") or {}
    seq = tokenizer.get("max_seq_len") if isinstance(tokenizer, dict) else None
    if seq is None:
        c.unmodelled("tokenizer.max_seq_len", "null: samples are not truncated; give --seq-len")
    else:
        c.set("tokenizer.max_seq_len", "seq_len", c.pos_int("tokenizer.max_seq_len", seq))
    dataset = c.get("dataset") or {}
    packed = dataset.get("packed") if isinstance(dataset, dict) else None
    if packed is not None:
        on = c.flag("dataset.packed", packed)
        c.set(
            "dataset.packed",
            "packing",
            Packing.POSITION_IDS if on else Packing.NONE,
            "rows packed to max_seq_len, block-causal mask" if on else "",
        )


def _precision(c: Collector, method: Method) -> None:
    """``dtype`` is the dtype of every parameter, adapters included, with no autocast
    (recipes/lora_finetune_single_device.py:127)."""
    dtype = c.get("dtype")
    if dtype is None:
        return
    model_dtype = c.choice("dtype", dtype, _DTYPES)
    c.set("dtype", "precision", Precision.BF16, "no autocast: every parameter in this dtype")
    c.set("dtype", "model_dtype", model_dtype)
    if method != Method.FULL:
        c.set("dtype", "adapter_dtype", AdapterDtype.BF16 if model_dtype == ModelDtype.BF16 else AdapterDtype.FP32)


def _optimizer(c: Collector) -> None:
    cfg = c.get("optimizer")
    if not isinstance(cfg, dict) or "_component_" not in cfg:
        return
    component = cfg["_component_"]
    if not isinstance(component, str) or component not in _OPTIMIZERS:
        c.unmodelled("optimizer._component_", f"{component} is not modelled; give --optim for the closest")
        return
    if component == "torch.optim.AdamW":
        fused = cfg.get("fused") is True
        c.set(
            "optimizer._component_",
            "optim",
            Optim.ADAMW_TORCH_FUSED if fused else Optim.ADAMW_TORCH,
            "fused: True" if fused else "foreach",
        )
        return
    entry = _OPTIMIZERS[component]
    assert entry is not None  # only torch.optim.AdamW maps to None, handled above
    optim, note = entry
    c.set("optimizer._component_", "optim", optim, note)


def _loss(c: Collector) -> None:
    cfg = c.get("loss")
    if isinstance(cfg, dict) and "_component_" in cfg:
        component = cfg["_component_"]
        if not isinstance(component, str) or component not in _LOSSES:
            c.unmodelled("loss._component_", f"{component} is not modelled")
            return
        loss, note = _LOSSES[component]
        c.set("loss._component_", "loss", loss, note)


def _distributed(c: Collector) -> None:
    """Distributed recipes (``*_distributed``) carry fsdp_cpu_offload / fsdp_reshard_after_forward,
    or (the LoRA ones: llama2/7B_lora.yaml, mistral/7B_lora.yaml, ...) only their header comment,
    which every shipped config starts with: "# Config for multi-device LoRA in
    lora_finetune_distributed.py"."""
    offload, reshard = c.get("fsdp_cpu_offload"), c.get("fsdp_reshard_after_forward")
    recipe = None if offload is not None or reshard is not None else _header_recipe(c.path)
    if offload is None and reshard is None and recipe is None:
        return
    c.distributed = Distributed.FSDP
    key = "fsdp_cpu_offload" if offload is not None else "fsdp_reshard_after_forward"
    c.set(
        recipe or key,
        "fsdp_version",
        2,
        "torchtune shards with fully_shard (FSDP2)"
        + (" over the GPUs of --gpus; give --fsdp 1 for one device" if recipe else ""),
    )
    if offload is not None:
        c.set("fsdp_cpu_offload", "cpu_offload", c.flag("fsdp_cpu_offload", offload))
    if reshard is not None:
        on = c.flag("fsdp_reshard_after_forward", reshard)
        c.set("fsdp_reshard_after_forward", "fsdp_sharding", FsdpSharding.FULL if on else FsdpSharding.SHARD_GRAD_OP)
    _custom_sharded_layers(c)


def _recipe(c: Collector) -> None:
    """What the header's `tune run RECIPE` says about the step: a recipe that trains nothing is
    refused; a preference, RL, distillation or QAT recipe is estimated as its SFT step, said in
    one line. Tensor parallelism (tensor_parallel_dim > 1, full_finetune_distributed at
    pytorch/torchtune@bd2a0fc) is said too: the estimate shards every parameter with FSDP over
    all the GPUs instead, the same weights per GPU but the activations of unsplit heads."""
    recipe = _run_recipe(c.path)
    if recipe in _NOT_TRAINING:
        raise VramplanError(
            f"runs `tune run {recipe}`, which trains nothing; give a training recipe's config "
            "(full_finetune_*, lora_finetune_*, qat_*, ...)",
            f"--config {c.path}",
        )
    prefix = next((p for p in _NOT_SFT if recipe and recipe.startswith(p)), None)
    if prefix:
        c.unmodelled(f"header: tune run {recipe}", _NOT_SFT[prefix])
    # the same sections in a config without that header (a user's own file)
    for key, own in (("quantizer", "qat_"), ("teacher_model", "knowledge_distillation")):
        if c.get(key) is not None and prefix != own:
            c.unmodelled(key, _NOT_SFT[own])
    tp = c.get("tensor_parallel_dim")
    if tp is not None and c.pos_int("tensor_parallel_dim", tp) > 1:
        c.unmodelled(
            "tensor_parallel_dim",
            f"tensor parallelism over {tp} GPUs is not modelled: estimated as FSDP over every GPU (the same "
            "parameters per GPU, each GPU's activations for all heads and the whole MLP width: an overestimate)",
        )


def _run_recipe(path: str) -> str | None:
    """The RECIPE of the header's `tune run [--opt N ...] RECIPE --config NAME` whose NAME is this
    file, else of the last one (a KD config first shows the teacher's own fine-tuning command, then
    its launch line; a copied config keeps the header but not the name)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = "".join(line for line in (f.readline() for _ in range(60)) if line.startswith("#"))
    except OSError:
        return None
    runs = re.findall(r"tune run\s+(?:--[\w-]+(?:[ =]\d+)?\s+)*([\w/]+)(?:\s+--config\s+([\w./-]+))?", header)
    stem = os.path.splitext(os.path.basename(path))[0]
    own = [recipe for recipe, name in runs if os.path.splitext(os.path.basename(name))[0] == stem]
    return (own or [recipe for recipe, _ in runs] or [None])[-1]


def _header_recipe(path: str) -> str | None:
    """The ``*_distributed`` recipe a config's leading comment names, as "header: <recipe>"."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = [line for line in (f.readline() for _ in range(40)) if line.startswith("#")]
    except OSError:
        return None
    found = re.search(r"\b(\w+_distributed)(?:\.py)?\b", "".join(header))
    return f"header: {found.group(1)}" if found else None


def _custom_sharded_layers(c: Collector) -> None:
    """``custom_sharded_layers: ['tok_embeddings', 'output']`` (the 70B/8B full distributed configs,
    torchtune==0.6.1 recipes/configs/llama3_1/70B_full.yaml:77): those modules get fully_shard of
    their own before the decoder layers (training/_distributed.py:519-568 shard_model). An empty
    list or null is the configs' default: embedding and output stay in the root unit."""
    layers = c.get("custom_sharded_layers")
    if layers is None:
        return
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise c.fail("custom_sharded_layers", "a list of module names, e.g. ['tok_embeddings', 'output']", layers)
    named = sorted({"tok_embeddings", "output"} & set(layers))
    note = "" if len(named) == 2 else f"only {named} listed: modelled as both separate units"
    c.set("custom_sharded_layers", "fsdp_embedding_units", bool(named), note)
