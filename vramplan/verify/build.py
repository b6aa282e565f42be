"""Build the reference step (docs/reference-step.md) for one TrainingSetup.

The model is created on the meta device and materialized straight on the target device,
so no full-size weights are ever initialized on the CPU: an 8B builds in seconds, and a
70B QLoRA never holds more than one bf16 Linear before it is quantized. The same code
runs on ``device="cpu"`` so CI exercises every method it has the libraries for.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from vramplan.errors import VramplanError
from vramplan.memory.accelerate import upcasts_trainable
from vramplan.memory.freeze import first_trained_layer
from vramplan.memory.preference import reference_copy
from vramplan.memory.reward import sequence_classifier, value_head
from vramplan.model_loader import load_model_spec, resolve_config
from vramplan.model_spec import ModelSpec
from vramplan.setup import (
    ActivationOffload,
    AdapterDtype,
    Attention,
    Engine,
    LigerLayers,
    LoraTargets,
    Loss,
    Method,
    ModelDtype,
    Objective,
    OptimFamily,
    OptimLibrary,
    Packing,
    Precision,
    Quant,
    QuantStorage,
    Stack,
    TrainingSetup,
)
from vramplan.verify.optional import need

LR = 1e-5
INIT_STD = 0.02  # values do not change memory; finite values keep SVD and quantizers happy
# ... except LLM.int8's: per Linear it keeps the fp16 columns of its input that hold a value above its
# threshold 6.0 (bitsandbytes==0.50.2 autograd/_functions.py MatMul8bitLt, ctx.tensors = (CAt, subA, A)).
# At std 0.02, silu(gate)*up passes 6.0 in 14315 of an 8B's 14336 down_proj input columns (computed;
# +1.8 GiB measured on the H200, tests/data/h200_verify.jsonl), where a trained checkpoint has a
# handful (Dettmers et al. 2022, LLM.int8()). The 8-bit Linears are drawn so that a unit-variance input
# gives outputs of this std: no column passes 6.0, the trained handful rounded to none, as the estimate.
INT8_OUTPUT_STD = 0.25
GALORE_SCALE = 0.25
GALORE_PROJ = "std"
# transformers 5.25.0 trainer_optimizer.py:398-405: APOLLO's target-group defaults
APOLLO_GROUP = dict(proj="random", scale_type="channel", update_proj_gap=200, scale=1.0, proj_type="std")


@dataclass
class Built:
    """The live objects of one reference step. Not a data model: it holds the GPU memory."""

    model: object
    setup: TrainingSetup
    device: str
    vocab: int
    num_layers: int
    optimizer: Any = None  # None with layer-wise GaLore
    layerwise: dict = field(default_factory=dict)  # param -> its own optimizer
    hooks: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    simulated: bool = False
    rank: int = 0
    kept: object | None = None  # --keep-logits: the last forward's output
    scaler: Any = None  # torch.amp.GradScaler under --precision fp16
    loss_fn: Any = None  # torchtune's loss module, made (and under --compile compiled) once
    engine: Any = None  # deepspeed.DeepSpeedEngine under --deepspeed: its backward and step
    ref_model: Any = None  # --objective dpo on a full fine-tune: the frozen reference copy
    value_head_model: Any = None  # --objective reward under LLaMA-Factory: value_head_wrapper

    @property
    def optimizers(self) -> list:
        return [self.optimizer] if self.optimizer is not None else list(self.layerwise.values())

    def batch(self):
        import torch

        s = self.setup
        ids = torch.randint(0, self.vocab, (s.rows, s.seq_len), device=self.device)
        return ids.reshape(1, -1) if s.packing == Packing.PADDING_FREE else ids

    def position_ids(self, ids):
        """Packed batches: position_ids restart at every packed sequence and no attention_mask
        is passed (transformers DataCollatorWithFlattening, TRL padding_free). padding-free:
        the micro-batch flattened into one row, each sequence its own; position-ids: each row
        two packed sequences of half its length."""
        import torch

        s = self.setup
        if s.packing == Packing.NONE:
            return None
        length = s.seq_len if s.packing == Packing.PADDING_FREE else max(s.seq_len // 2, 1)
        pos = torch.arange(ids.shape[1], device=ids.device) % length
        return pos.unsqueeze(0).expand(ids.shape[0], -1).contiguous()

    def inputs(self, ids) -> dict:
        """The model's keyword inputs beside input_ids: packed batches' position_ids."""
        return {} if self.setup.packing == Packing.NONE else {"position_ids": self.position_ids(ids)}

    def forward(self, ids):
        """The loss of setup.loss (labels = input_ids; verify/losses.py); under fp16 the scaled
        loss. Under --keep-logits the output replaces the previous one only once this forward
        has returned, as a loop's `output = model(...)` does."""
        import contextlib

        import torch

        from vramplan.verify.losses import loss_step

        autocast = (
            torch.autocast(torch.device(self.device).type, dtype=half_dtype(self.setup))
            if self.setup.autocast and self.setup.objective == Objective.SFT  # else: prepare_like_accelerate
            else contextlib.nullcontext()
        )
        with autocast:
            loss, out = loss_step(self.setup)(self, ids)
        if self.setup.keep_logits:
            self.kept = out
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss) -> None:
        """loss.backward(); under DeepSpeed the engine's (its ZeRO gradient hooks and buckets);
        LOMO's fused backward, its update inside the grad hooks (accelerate==1.16.0
        accelerator.py:4234-4256 lomo_backward, as transformers' Trainer calls it)."""
        if self.engine is not None:
            self.engine.backward(loss)
        elif self.setup.optim.traits.family == OptimFamily.LOMO:
            self.optimizer.fused_backward(loss, LR)
        else:
            loss.backward()

    def accumulate(self) -> None:
        """Between two micro-batches of one optimizer step: the gradients stay (no zero_grad);
        DeepSpeed's engine.step() only counts the micro-step off the accumulation boundary."""
        if self.engine is not None:
            self.engine.step()

    def optimizer_step(self) -> None:
        if self.engine is not None:  # the ZeRO optimizer's step and zero_grad
            self.engine.step()
            return
        if self.setup.optim.traits.family == OptimFamily.LOMO:
            return  # every parameter was updated inside fused_backward (lomo.py:198-231)
        # layer-wise GaLore already stepped and zeroed every parameter from its grad hook
        if self.optimizer is not None and self.scaler is not None:
            self.scaler.step(self.optimizer)  # unscale_ in place, then step unless inf/nan
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        elif self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.layerwise.clear()
        self.optimizer = None
        self.engine = None
        self.kept = None
        self.model = None


# ---------------------------------------------------------------- model


def hf_config(cfg: dict, attn: str):
    from transformers import AutoConfig

    cfg = copy.deepcopy(cfg)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config.use_cache = False
    config._attn_implementation = attn
    return config


# --attention as transformers names the implementation
HF_ATTENTION = {Attention.SDPA: "sdpa", Attention.EAGER: "eager", Attention.FLASH: "flash_attention_2"}


def meta_model(cfg: dict, spec: ModelSpec, dtype, attention: Attention | None = None, reward: bool = False):
    """The causal LM on the meta device: shapes only, nothing allocated. `reward`: the model
    RewardTrainer trains, AutoModelForSequenceClassification with num_labels=1 (trl==1.16.0
    reward_trainer.py:396-400), a pad token set so that it finds each row's last position."""
    import torch
    import transformers

    from vramplan.analyze import auto_class

    attn = HF_ATTENTION[attention] if attention is not None else spec.attn_implementation
    config = hf_config(cfg, attn)
    cls = auto_class(config)
    if reward:
        config.num_labels = 1
        if config.get_text_config().pad_token_id is None:
            config.get_text_config().pad_token_id = 0
        cls = transformers.AutoModelForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = cls.from_config(config, dtype=dtype, attn_implementation=attn)
    model.train()
    return model


def decoder_prefix(model, num_layers: int) -> str:
    from vramplan.analyze import _decoder_layers

    return _decoder_layers(model, num_layers)[0]


def _init_(t, name: str) -> None:
    """Random weights; 1-D weights (norms) ones, biases zeros."""
    import torch

    with torch.no_grad():
        if name == "bias":
            t.zero_()
        elif t.dim() == 1:
            t.fill_(1.0)
        elif t.is_floating_point():
            t.normal_(0.0, INIT_STD)


def materialize(model, device: str) -> None:
    """Replace every meta parameter/buffer by one allocated on `device` (tied weights stay tied)."""
    import torch

    new: dict[int, torch.nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in new:
                t = torch.empty(p.shape, dtype=p.dtype, device=device)
                _init_(t, name)
                new[id(p)] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
            mod._parameters[name] = new[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    fix_rotary(model, device)


def fix_rotary(model, device: str) -> None:
    """RoPE inverse frequencies are non-persistent buffers: recompute them on `device`."""
    import torch

    for mod in model.modules():
        if "Rotary" not in type(mod).__name__ or not hasattr(mod, "inv_freq"):
            continue
        try:
            with torch.device(device):
                fresh = type(mod)(mod.config)
            for name in ("inv_freq", "original_inv_freq"):
                if isinstance(getattr(mod, name, None), torch.Tensor):
                    setattr(mod, name, getattr(fresh, name).to(device))
        except Exception:  # noqa: BLE001 - unknown signature: any finite frequencies have the same memory
            n = mod.inv_freq.numel()
            mod.inv_freq = 1.0 / (10000 ** (torch.arange(n, device=device, dtype=torch.float32) / max(n, 1)))


def _set_module(model, path: str, new) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def decoder_linears(model, spec: ModelSpec) -> list[tuple[str, str]]:
    """(full module path, role) of every Linear inside the decoder layers."""
    prefix = decoder_prefix(model, spec.num_layers)
    return [(f"{prefix}.{i}.{lin.name}", lin.role) for i, layer in enumerate(spec.layers) for lin in layer.linears]


def _random_linear(lin, device: str):
    import torch

    w = torch.empty(lin.out_features, lin.in_features, dtype=torch.bfloat16, device=device)
    _init_(w, "weight")
    bias = torch.zeros(lin.out_features, dtype=torch.bfloat16, device=device) if lin.bias is not None else None
    return w, bias


def _nf4(lin, device: str, storage: QuantStorage | None = None):
    """bitsandbytes Linear4bit; `storage`: bnb_4bit_quant_storage, the dtype the packed bytes are
    viewed as (bf16 lets FSDP2 shard them: torch==2.11's FSDP2 makes every sharded parameter an
    nn.Parameter that requires grad, which an integer tensor cannot, _fsdp_param.py:408)."""
    import torch

    packed = torch.bfloat16 if storage == QuantStorage.BF16 else torch.uint8
    bnb = need("bitsandbytes", "--quant nf4")
    w, bias = _random_linear(lin, device)
    # built on meta so the constructor's fp32 weight is never allocated
    q = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=bias is not None,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=packed,
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        w,
        requires_grad=False,
        blocksize=64,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=packed,
        module=q,
    ).to(device)  # .to() quantizes
    if bias is not None:
        q.bias = torch.nn.Parameter(bias, requires_grad=False)
    return q


def _hqq4(lin, device: str):
    import torch

    hqq = need("hqq.core.quantize", "--quant hqq4")
    w, bias = _random_linear(lin, device)
    src = torch.nn.Linear(lin.in_features, lin.out_features, bias=bias is not None, device="meta")
    src.weight = torch.nn.Parameter(w, requires_grad=False)
    if bias is not None:
        src.bias = torch.nn.Parameter(bias, requires_grad=False)
    cfg = hqq.BaseQuantizeConfig(nbits=4, group_size=64)
    return hqq.HQQLinear(src, cfg, compute_dtype=torch.bfloat16, device=device, initialize=True, del_orig=True)


def _int8(lin, device: str):
    """LLM.int8 as transformers loads it (load_in_8bit): Linear8bitLt, has_fp16_weights=False,
    threshold 6.0 (BitsAndBytesConfig's llm_int8_threshold), the bf16 weight handed to Int8Params
    on the host and quantized by its move to the device (bitsandbytes==0.50.2 nn/modules.py:737-793;
    transformers==5.24.0 quantizers/quantizer_bnb_8bit.py: `Int8Params(value.to("cpu"), ...).to(device)`)."""
    import torch

    bnb = need("bitsandbytes", "--quant int8")
    w, bias = _random_linear(lin, "cpu")
    w.mul_(INT8_OUTPUT_STD / (INIT_STD * lin.in_features**0.5))  # INT8_OUTPUT_STD: no outlier columns
    q = bnb.nn.Linear8bitLt(
        lin.in_features, lin.out_features, bias=bias is not None, has_fp16_weights=False, threshold=6.0, device="meta"
    )
    q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)  # .to() quantizes
    if bias is not None:
        q.bias = torch.nn.Parameter(bias.to(device), requires_grad=False)
    return q


def quantize_decoder(
    model, spec: ModelSpec, quant: Quant, device: str, sharded: bool = False, storage: QuantStorage | None = None
) -> None:
    """Every decoder Linear becomes 4-bit (or LLM.int8), one at a time (peak: one bf16 Linear).

    ``sharded``: FSDP2 will shard the packed weights and ``to_empty`` their shards, so
    each packed weight goes back to meta as soon as it is quantized; the quantization
    state, which FSDP2 leaves whole on every rank, stays on the device. The build then
    never holds more than one whole packed Linear per rank."""
    makers: dict[Quant, Callable[[Any, str], Any]] = {
        Quant.NF4: partial(_nf4, storage=storage),
        Quant.HQQ4: _hqq4,
        Quant.INT8: _int8,
    }
    make = makers[quant]
    if quant == Quant.INT8:  # as transformers' 8-bit quantizer marks the model: peft then wraps
        model.is_loaded_in_8bit = True  # each Linear8bitLt in lora.bnb.Linear8bitLt (peft==0.21.2 lora/model.py:329)
    for path, _role in decoder_linears(model, spec):
        q = make(model.get_submodule(path), device)
        if sharded:
            _packed_to_meta(q)
        _set_module(model, path, q)


def _packed_to_meta(q) -> None:
    import torch

    if hasattr(q, "W_q"):  # hqq's HQQLinear
        q.W_q = torch.nn.Parameter(torch.empty_like(q.W_q, device="meta"), requires_grad=False)
        return
    bnb = need("bitsandbytes", "--quant nf4")
    w = q.weight
    q.weight = bnb.nn.Params4bit(
        torch.empty_like(w.data, device="meta"),
        requires_grad=False,
        quant_state=w.quant_state,
        blocksize=w.blocksize,
        compress_statistics=w.compress_statistics,
        quant_type=w.quant_type,
        quant_storage=w.quant_storage,
        module=q,
        bnb_quantized=True,
    )


# ---------------------------------------------------------------- methods


def lora_targets(model, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """The same Linears the estimate gives adapters (memory.lora.lora_targeted)."""
    attn = ("q", "k", "v", "qkv", "o")
    out = []
    for path, role in decoder_linears(model, spec):
        if role in ("router", "other"):
            continue
        if setup.lora_targets == LoraTargets.ATTENTION and role not in attn:
            continue
        out.append(path)
    return out


def apply_lora(model, spec: ModelSpec, setup: TrainingSetup, device: str):
    """peft's LoRA (or DoRA) on the estimate's targets; an explicit --lora-targets list goes to
    peft as the user's target_modules, so peft's own name matching decides."""
    import torch

    peft = need("peft", "--method lora/qlora")
    targets = list(setup.lora_target_modules or lora_targets(model, spec, setup))
    cfg = peft.LoraConfig(
        r=setup.lora_r,
        lora_alpha=2 * setup.lora_r,
        lora_dropout=setup.lora_dropout,
        target_modules=targets,
        # a reward model's: peft's SEQ_CLS task trains the score head as a modules_to_save copy
        # (memory/reward.py), as axolotl picks it for a sequence-classification model (loaders/adapter.py:133)
        task_type="SEQ_CLS" if sequence_classifier(setup) else "CAUSAL_LM",
        use_dora=setup.dora,
        modules_to_save=[m.value for m in setup.modules_to_save] or None,
    )
    fp32 = setup.adapter_store_dtype == AdapterDtype.FP32
    # adapters are created under the device context: no CPU copies; on meta they stay meta (FSDP)
    with torch.device(device):
        model = peft.get_peft_model(model, cfg, autocast_adapter_dtype=fp32)
    if not fp32:
        # bf16 adapters as TRL keeps them on a 4-bit model (trl==1.16.0 sft_trainer.py:903-911):
        # peft moves adapters to the base weight's dtype, which a packed 4-bit weight does not have
        for name, p in model.named_parameters():
            if p.requires_grad and p.dtype != torch.bfloat16 and "modules_to_save" not in name:
                p.data = p.data.to(torch.bfloat16)
    if setup.modules_to_save_dtype is not None:
        # the framework casts every trainable parameter, the modules_to_save copies with them
        to = torch.float32 if setup.modules_to_save_dtype == AdapterDtype.FP32 else torch.bfloat16
        for name, p in model.named_parameters():
            if p.requires_grad and "modules_to_save" in name:
                p.data = p.data.to(to)
    return model


def kbit_prepare(model, setup: TrainingSetup) -> None:
    """peft.prepare_model_for_kbit_training as after a transformers 4-bit load: the flags
    transformers' quantizer sets decide what it does (hqq: no upcast)."""
    peft = need("peft", "--kbit-prep")
    if setup.method == Method.QLORA:
        if setup.quant == Quant.INT8:
            model.is_loaded_in_8bit = True
        else:
            model.is_loaded_in_4bit = True
        model.quantization_method = "hqq" if setup.quant == Quant.HQQ4 else "bitsandbytes"
    peft.prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=setup.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": setup.checkpoint_reentrant},
    )


def enable_checkpointing(model, setup: TrainingSetup) -> None:
    kwargs = {"use_reentrant": setup.checkpoint_reentrant}
    if setup.activation_offload == ActivationOffload.CHECKPOINTS:
        # transformers >= 5.25: save_on_cpu(pin_memory=True) around each checkpoint (needs an accelerator)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if setup.lora_like:
        model.enable_input_require_grads()


def freeze_prefix(model, spec: ModelSpec, setup: TrainingSetup, prefix: str) -> None:
    """--train-layers: LLaMA-Factory's freeze tuning (llamafactory==0.9.5 model/adapter.py:57-131):
    every parameter but the last N decoder layers' gets requires_grad False, the embedding,
    final norm and lm_head included; the trained ones cast to --train-layers-dtype
    (``param.data = param.data.to(torch.float32)``, :126-129)."""
    import torch

    first = first_trained_layer(spec.num_layers, setup)
    trained = tuple(f"{prefix}.{i}." for i in range(first, spec.num_layers))
    cast = setup.train_layers_dtype
    for name, p in model.named_parameters():
        if not name.startswith(trained):
            p.requires_grad_(False)
        elif cast is not None:
            p.data = p.data.to(torch.float32 if cast == AdapterDtype.FP32 else torch.bfloat16)


def upcast_embeddings_norms(model) -> None:
    """axolotl's _configure_embedding_dtypes for a full fine-tune outside FSDP (axolotl==0.19.0
    loaders/model.py:435-450, 1153-1175): every module with `norm` in its name, and embed_tokens
    and lm_head (loaders/utils.py:306-316, Llama-like names), `.to(torch.float32)`; a tied lm_head
    stays tied (Module.to replaces the parameter's data)."""
    import torch

    for name, module in model.named_modules():
        if "norm" in name or (any(m in name for m in ("embed_tokens", "lm_head")) and hasattr(module, "weight")):
            module.to(torch.float32)


def checkpoint_trained_layers_only(model, setup: TrainingSetup, prefix: str) -> None:
    """LLaMA-Factory's checkpointing (model_utils/checkpointing.py:126-154): it sets the layers'
    checkpoint function itself (``_set_gradient_checkpointing``), so transformers'
    enable_input_require_grads never runs and the frozen embedding's output needs no grad; its
    function (:100-122) runs a layer with no trainable parameter plainly, and for one with them
    makes the hidden-states input require grad (``arg.requires_grad_(True)``) and checkpoints it."""
    from torch.utils.checkpoint import checkpoint

    model._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=partial(checkpoint, use_reentrant=setup.checkpoint_reentrant)
    )
    for layer in model.get_submodule(prefix):
        layer._gradient_checkpointing_func = _trained_only(layer, layer._gradient_checkpointing_func)


def _trained_only(layer, inner):
    import torch

    def run(func, *args, **kwargs):
        if not any(p.requires_grad for p in layer.parameters()):
            return func(*args, **kwargs)
        for arg in args:
            if torch.is_tensor(arg) and torch.is_floating_point(arg):
                arg.requires_grad_(True)
                break
        return inner(func, *args, **kwargs)

    return run


def galore_names(model, spec: ModelSpec) -> set[str]:
    """2-D weights inside attention and MLP blocks (memory.parameters: role != other)."""
    return {f"{path}.weight" for path, role in decoder_linears(model, spec) if role != "other"}


def _optim_class(setup: TrainingSetup):
    """The optimizer class and the keyword arguments transformers' Trainer passes it
    (transformers 5.25.0 trainer_optimizer.py:195-622), for the names verify builds."""
    import torch

    o, t = setup.optim, setup.optim.traits
    if t.library == OptimLibrary.TORCH:
        cls = {
            OptimFamily.ADAMW: torch.optim.AdamW,
            OptimFamily.SGD: torch.optim.SGD,
            OptimFamily.ADAGRAD: torch.optim.Adagrad,
            OptimFamily.RMSPROP: torch.optim.RMSprop,
        }[t.family]
        return cls, ({"fused": True} if t.fused else {})
    if t.library == OptimLibrary.BITSANDBYTES:
        bnb = need("bitsandbytes", f"--optim {o.value}")
        cls = {
            OptimFamily.ADAMW: bnb.optim.AdamW,
            OptimFamily.LION: bnb.optim.Lion,
            OptimFamily.RMSPROP: bnb.optim.RMSprop,
            OptimFamily.ADEMAMIX: bnb.optim.AdEMAMix,
        }[t.family]
        kw = {"optim_bits": t.bits}
        if t.family != OptimFamily.RMSPROP:  # HF passes is_paged to all but RMSprop
            kw["is_paged"] = t.paged
        return cls, kw
    if t.library == OptimLibrary.TORCHAO:
        ao = need("torchao.optim", f"--optim {o.value}")
        return (ao.AdamW8bit if t.bits == 8 else ao.AdamW4bit), {"block_size": 256, "bf16_stochastic_round": False}
    if t.family == OptimFamily.ADAFACTOR:
        from transformers.optimization import Adafactor

        return Adafactor, {"scale_parameter": False, "relative_step": False}
    if t.library == OptimLibrary.SCHEDULEFREE:
        sf = need("schedulefree", f"--optim {o.value}")
        cls = {
            OptimFamily.SCHEDULE_FREE_ADAMW: sf.AdamWScheduleFree,
            OptimFamily.SCHEDULE_FREE_RADAM: sf.RAdamScheduleFree,
            OptimFamily.SCHEDULE_FREE_SGD: sf.SGDScheduleFree,
        }[t.family]
        return cls, ({} if t.family == OptimFamily.SCHEDULE_FREE_RADAM else {"warmup_steps": 0})
    if t.family == OptimFamily.GALORE_ADAMW:
        galore = need("galore_torch", f"--optim {o.value}")
        return (galore.GaLoreAdamW8bit if o.is_8bit else galore.GaLoreAdamW), {}
    if t.family == OptimFamily.APOLLO_ADAMW:
        return need("apollo_torch", f"--optim {o.value}").APOLLOAdamW, {}
    if t.family == OptimFamily.STABLE_ADAMW:
        # transformers 5.25.0 trainer_optimizer.py:523-549 (_get_stable_adamw): optimi's
        # defaults but decouple_lr False, max_lr and kahan_sum None; weight_decay from the args
        optimi = need("optimi", f"--optim {o.value}")
        return optimi.StableAdamW, {"weight_decay": 0.0, "decouple_lr": False, "max_lr": None, "kahan_sum": None}
    if t.family == OptimFamily.GALORE_ADAFACTOR:
        galore = need("galore_torch", f"--optim {o.value}")
        return galore.GaLoreAdafactor, {"scale_parameter": False, "relative_step": False}
    raise VramplanError(
        f'verify does not build {o.value} yet (its memory is modelled from source: docs/memory-model.md, "Optimizers")',
        "--optim",
    )


def param_groups(model, setup: TrainingSetup, galore: set[str]) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not galore:
        return [{"params": [p for _, p in named]}]
    if setup.optim.traits.family == OptimFamily.APOLLO_ADAMW:
        # the same target selection as GaLore's (HF _setup_low_rank_optimizer)
        proj = dict(APOLLO_GROUP, rank=setup.apollo_rank)
    else:
        proj = dict(
            rank=setup.galore_rank,
            update_proj_gap=setup.galore_update_proj_gap,
            scale=GALORE_SCALE,
            proj_type=GALORE_PROJ,
        )
    low = [p for n, p in named if _strip(n) in galore]
    rest = [p for n, p in named if _strip(n) not in galore]
    return [{"params": rest}, {"params": low, **proj}]


def _strip(name: str) -> str:
    # FSDP/peft wrappers do not rename parameters here, but checkpoint wrappers may
    return name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")


def _muon(model, setup: TrainingSetup):
    """LLaMA-Factory 0.9.5 train/trainer_utils.py:498-524: 2-D parameters not named embed or
    lm_head to Muon, the rest to its AdamW; weight_decay 0 (TrainingArguments' default)."""
    muon = need("llamafactory.third_party.muon", f"--optim {setup.optim.value}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    two_d = [p for n, p in named if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    ids = {id(p) for p in two_d}
    return muon.Muon(lr=LR, wd=0.0, muon_params=two_d, adamw_params=[p for _, p in named if id(p) not in ids])


def _adam_mini(model, setup: TrainingSetup):
    """LLaMA-Factory 0.9.5 train/trainer_utils.py:473-495: Adam_mini over the named parameters with
    the config's hidden size and head counts; weight_decay 0 (TrainingArguments' default)."""
    adam_mini = need("adam_mini", f"--optim {setup.optim.value}")
    cfg = model.config
    return adam_mini.Adam_mini(
        named_parameters=model.named_parameters(),
        lr=LR,
        weight_decay=0.0,
        dim=cfg.hidden_size,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None),
        verbose=False,
    )


def make_optimizer(built: Built, galore: set[str]) -> None:
    if built.setup.optim.traits.family == OptimFamily.MUON and not built.setup.steps_in_backward:
        built.optimizer = _muon(built.model, built.setup)
        return
    if built.setup.optim.traits.family == OptimFamily.ADAM_MINI:
        built.optimizer = _adam_mini(built.model, built.setup)
        return
    if built.setup.optim.traits.family == OptimFamily.LOMO:
        # transformers 5.25.0 trainer_optimizer.py:413-428: Lomo(model, lr); its __init__ registers
        # a tensor hook on every trainable parameter (lomo-optim 0.1.1 lomo.py:60-75)
        built.optimizer = need("lomo_optim", "--optim lomo").Lomo(built.model, lr=LR)
        return
    cls, kw = _optim_class(built.setup)
    if built.device == "cpu" and built.setup.optim.traits.family == OptimFamily.ADEMAMIX:
        # bitsandbytes 0.50.2 ademamix.py:260-267: the paged double buffer has no CPU fallback
        # (the other paged states fall back to plain tensors); unpaged, the states are the same
        kw["is_paged"] = False
    groups = param_groups(built.model, built.setup, galore)
    if not built.setup.steps_in_backward:
        built.optimizer = _started(cls([g for g in groups if g["params"]], lr=LR, **kw))
        return
    # one optimizer per parameter, stepped as soon as its grad is accumulated (HF *_layerwise,
    # torchtune optimizer_in_bwd: torchtune 0.6.1 training/memory.py:219-242)
    for g in groups:
        for p in g["params"]:
            built.layerwise[p] = _started(cls([{**g, "params": [p]}], lr=LR, **kw))
            built.hooks.append(p.register_post_accumulate_grad_hook(_layerwise_hook(built.layerwise)))


def _started(opt):
    """schedulefree optimizers must be put in train mode before a step (the HF Trainer does)."""
    if callable(getattr(opt, "train", None)):
        opt.train()
    return opt


def _layerwise_hook(opts: dict):
    def hook(p):
        opts[p].step()
        opts[p].zero_grad(set_to_none=True)

    return hook


# ---------------------------------------------------------------- FSDP2


def _check_packed_shardable(setup: TrainingSetup) -> None:
    """torch==2.11's FSDP2 wraps every shard in an nn.Parameter that requires grad
    (_fsdp_param.py:408 _init_sharded_param), which a uint8 tensor cannot: measured on the H200
    (tests/data/h200_verify.jsonl's lease: `only Tensors of floating point dtype can require
    gradients`). torch==2.13 passes the parameter's own requires_grad (_fsdp_param.py:327)."""
    import torch

    if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 13):
        return
    if setup.quant == Quant.HQQ4:  # hqq packs W_q as uint8, with no other storage
        raise VramplanError(
            f"--quant hqq4: FSDP2 in torch {torch.__version__} cannot shard hqq's uint8 W_q "
            "(it makes each shard a Parameter that requires grad); torch>=2.13 can",
            "--quant",
        )
    if setup.quant == Quant.NF4 and setup.quant_storage in (None, QuantStorage.UINT8):
        raise VramplanError(
            f"--quant-storage: FSDP2 in torch {torch.__version__} cannot shard uint8 4-bit weights "
            "(it makes each shard a Parameter that requires grad); use --quant-storage bf16, as fsdp_qlora does",
            "--quant-storage",
        )


def fsdp_mesh(world: int, device: str):
    """Rank r of a real group when one is initialized with this world size, else rank 0
    of a fake process group: collectives do nothing, but every buffer is allocated."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    simulated = not (dist.is_initialized() and dist.get_world_size() == world)
    if simulated:
        if dist.is_initialized():
            raise VramplanError(f"a process group of size {dist.get_world_size()} is already initialized", "--fsdp")
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group(backend="fake", rank=0, world_size=world, store=FakeStore())
    import torch

    return init_device_mesh(torch.device(device).type, (world,)), simulated


def shard(model, setup: TrainingSetup, device: str, layers_prefix: str) -> tuple[bool, int, list[str]]:
    """fully_shard every decoder layer, then the root; materialize the shards (to_empty)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    notes = []
    _check_packed_shardable(setup)
    mesh, simulated = fsdp_mesh(setup.fsdp, device)
    kw = {"mesh": mesh}
    dtypes = {p.dtype for p in model.parameters()}
    if setup.mixed_precision:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=half_dtype(setup), reduce_dtype=torch.float32)
    elif len(dtypes) > 1:
        # FSDP2 all-gathers one dtype per group: bf16 base + peft's fp32 adapters need a policy
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        notes.append("bf16 base with fp32 adapters under FSDP: MixedPrecisionPolicy(param_dtype=bf16)")
    if setup.cpu_offload:
        # pinning needs an accelerator; on CPU the policy still keeps shards on the host
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device != "cpu")
    for layer in model.get_submodule(layers_prefix):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    # offload keeps shards on the host; buffers (RoPE) live on the compute device
    model.to_empty(device="cpu" if setup.cpu_offload else device)
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        _init_(local, name.rsplit(".", 1)[-1])
    for mod in model.modules():
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.device.type != torch.device(device).type:
                mod._buffers[bname] = b.to(device)
    fix_rotary(model, device)
    return simulated, dist.get_rank(), notes


# ---------------------------------------------------------------- DDP and FSDP1


def fake_group(world: int) -> bool:
    """Rank 0 of a fake process group of `world` ranks unless a real one of that size is up
    (fsdp_mesh's rule, without a mesh). Returns whether it is simulated."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() == world:
        return False
    if dist.is_initialized():
        raise VramplanError(f"a process group of size {dist.get_world_size()} is already initialized", "--gpus")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group(backend="fake", rank=0, world_size=world, store=FakeStore())
    return True


def _bucket_as_result(state, bucket):
    """A comm hook that returns the bucket as reduced: the fake all-reduce gives no future
    value (c10d/comm.cpp), and NCCL's all-reduce is in place, so memory is the same."""
    import torch

    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def wrap_ddp(model, setup: TrainingSetup, device: str):
    """torch DistributedDataParallel as accelerate/HF Trainer build it (bucket_cap_mb left to
    torch, gradient_as_bucket_view=False). On a fake group the no-op hook stands in for NCCL."""
    from torch.nn.parallel import DistributedDataParallel

    simulated = fake_group(setup.data_parallel)
    ids = None if device == "cpu" else [torch_device_index(device)]
    ddp = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=False)
    if simulated:
        ddp.register_comm_hook(None, _bucket_as_result)
    return ddp, simulated


def torch_device_index(device: str) -> int:
    import torch

    d = torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


def shard_fsdp1(model, setup: TrainingSetup, device: str, layers_prefix: str):
    """torch FullyShardedDataParallel with its defaults (BACKWARD_PRE, limit_all_gathers),
    each decoder layer a unit, the root the rest; peft models wrapped with peft's
    fsdp_auto_wrap_policy (each LoRA Linear its own unit) as HF Trainer does."""
    import torch
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    simulated = fake_group(setup.fsdp)
    layer_cls = type(model.get_submodule(layers_prefix)[0])
    if setup.lora_like:
        from peft.utils.other import fsdp_auto_wrap_policy

        policy = fsdp_auto_wrap_policy(model)
    else:
        policy = ModuleWrapPolicy({layer_cls})
    strategy = {
        "full": ShardingStrategy.FULL_SHARD,
        "shard-grad-op": ShardingStrategy.SHARD_GRAD_OP,
        "no-shard": ShardingStrategy.NO_SHARD,
        "hybrid": ShardingStrategy.HYBRID_SHARD,
    }
    wrapped = FSDP(
        model,
        auto_wrap_policy=policy,
        device_id=torch.device(device),
        sharding_strategy=strategy[setup.fsdp_sharding.value],
        cpu_offload=CPUOffload(offload_params=setup.cpu_offload),
        mixed_precision=fsdp1_mixed_precision(setup),
    )
    return wrapped, simulated


def accelerate_fsdp_upcast(model) -> str:
    """A Trainer's accelerate upcasts every trainable low-precision parameter to fp32 before
    wrapping it in FSDP under mixed precision (accelerate==1.16.0 accelerator.py prepare_model,
    "Upcasted low precision parameters ... to float32"; memory/accelerate.py upcasts_trainable)."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
            n += 1
    return f"accelerate's FSDP preparation: {n} trainable low-precision parameters upcast to fp32"


def fsdp1_mixed_precision(setup: TrainingSetup) -> Any:
    """Under mixed precision, MixedPrecision(param_dtype=bf16), as the model gathers FSDP1 units
    (memory/fsdp.py): a Trainer's accelerate sets param, reduce and buffer dtypes to the compute
    dtype (accelerate==1.16.0 utils/dataclasses.py:1981-2012 set_mixed_precision); otherwise the
    reduce runs in fp32. None without mixed precision: each unit gathered in its own dtype."""
    import torch
    from torch.distributed.fsdp import MixedPrecision

    from vramplan.memory.accelerate import accelerate_fsdp, reduces_in_bf16

    if not setup.mixed_precision:
        return None
    half = half_dtype(setup)
    reduce = half if reduces_in_bf16(setup) else torch.float32
    return MixedPrecision(param_dtype=half, reduce_dtype=reduce, buffer_dtype=half if accelerate_fsdp(setup) else None)


# ---------------------------------------------------------------- DeepSpeed ZeRO


def ds_config(setup: TrainingSetup, hidden: int) -> dict:
    """The DeepSpeed config of the estimate (memory/deepspeed.py): ZeRO stage, offload, the
    bucket sizes at HF's "auto" values (auto_config), bf16 (fp16 under --precision fp16), the
    client optimizer kept under offload as HF Trainer does (zero_force_ds_cpu_optimizer false:
    transformers==5.24.0 integrations/deepspeed.py deepspeed_optim_sched)."""
    from vramplan.memory.deepspeed import auto_config
    from vramplan.setup import DeepSpeedStage

    stage = cast(DeepSpeedStage, setup.deepspeed)
    auto = auto_config(hidden, stage)
    zero: dict = {
        "stage": int(stage.value[-1]),
        "reduce_bucket_size": auto.reduce_bucket,
        "overlap_comm": auto.overlap_comm,
    }
    if stage == DeepSpeedStage.ZERO3:
        zero["stage3_prefetch_bucket_size"] = auto.prefetch_bucket
        zero["stage3_param_persistence_threshold"] = auto.persistence_threshold
    if setup.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if setup.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": setup.batch_size,
        "gradient_accumulation_steps": setup.gradient_accumulation,
        "fp16" if setup.precision == Precision.FP16 else "bf16": {"enabled": True},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }


def wrap_deepspeed(built: Built, hidden: int) -> None:
    """deepspeed.initialize around the built model and optimizer, in the process group the
    launcher made (one process per rank: ZeRO is not simulated on a fake group)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        raise VramplanError("ZeRO runs under the `deepspeed` launcher (verify launches it)", "--deepspeed")
    engine, optimizer, _, _ = deepspeed.initialize(
        model=built.model, optimizer=built.optimizer, config=ds_config(built.setup, hidden)
    )
    built.engine, built.optimizer, built.rank = engine, optimizer, dist.get_rank()
    built.notes.append(
        f"DeepSpeed {built.setup.deepspeed.value if built.setup.deepspeed else ''}: deepspeed.initialize"
    )


# ---------------------------------------------------------------- the whole step


def build_step(model_name: str, setup: TrainingSetup, device: str = "cuda", num_layers: int | None = None) -> Built:
    """Model, method, checkpointing, sharding and optimizer of the reference step."""
    import torch

    check_buildable(setup, device)
    from vramplan.verify.losses import DPO_OUTPUTS, GRPO_OUTPUTS, KTO_OUTPUTS, TRL_OUTPUTS, add_trl_head

    spec = load_model_spec(model_name, num_layers=num_layers)
    _name, _alias, cfg = resolve_config(model_name, num_layers=num_layers)
    qlora = setup.method == Method.QLORA
    # the dense weights in the estimate's dtype (TrainingSetup.weight_dtype): under mixed without
    # --model-dtype fp32 for QLoRA too, as TRL loads a model given by name (trl==1.16.0
    # trainer/utils.py:1332-1336: dtype defaults to float32) and transformers==5.24.0 keeps that
    # dtype for the modules bitsandbytes does not quantize (quantizers/base.py:100-110 update_dtype,
    # which quantizer_bnb_4bit.py does not override); the 4-bit Linears compute in bf16
    # (bnb_4bit_compute_dtype=torch.bfloat16, as the QLoRA recipes set it)
    dtype = torch.float32 if setup.weight_dtype == ModelDtype.FP32 else half_dtype(setup)
    model = meta_model(cfg, spec, dtype, setup.attention, reward=sequence_classifier(setup))
    prefix = decoder_prefix(model, spec.num_layers)
    low_rank = setup.method == Method.GALORE or setup.optim.traits.family == OptimFamily.APOLLO_ADAMW
    galore = galore_names(model, spec) if low_rank else set()
    fsdp = setup.engine == Engine.FSDP2
    if qlora:
        quantize_decoder(model, spec, cast(Quant, setup.quant), device, sharded=fsdp, storage=setup.quant_storage)
    if not fsdp:
        materialize(model, device)
    if setup.loss == Loss.TRL_CHUNKED_NLL:
        outputs = {Objective.DPO: DPO_OUTPUTS, Objective.GRPO: GRPO_OUTPUTS, Objective.KTO: KTO_OUTPUTS}.get(
            setup.objective, TRL_OUTPUTS
        )
        # DPOTrainer asks for WPO's log_sum_sq_probs under use_weighting (trl==1.16.0 dpo_trainer.py:956-959)
        add_trl_head(model, outputs + (("log_sum_sq_probs",) if setup.dpo_use_weighting else ()))
    ref_model = reference_copy_of(cfg, spec, dtype, device, setup) if reference_copy(setup) else None
    liger_note = apply_liger_layers(model, setup) if setup.liger_layers != LigerLayers.NONE else None
    if setup.lora_like:
        for p in model.parameters():
            p.requires_grad_(False)
        if setup.kbit_prep:
            kbit_prepare(model, setup)
        model = apply_lora(model, spec, setup, "meta" if fsdp else device)
    if setup.train_layers is not None:
        freeze_prefix(model, spec, setup, prefix)
    if setup.fp32_embeddings_norms:
        upcast_embeddings_norms(model)
    if setup.gradient_checkpointing and setup.train_layers is not None:
        checkpoint_trained_layers_only(model, setup, prefix)
    elif setup.gradient_checkpointing:
        enable_checkpointing(model, setup)
    built = Built(model=model, setup=setup, device=device, vocab=spec.vocab, num_layers=spec.num_layers)
    built.ref_model = ref_model
    # the DPO, GRPO and reward steps call the models themselves, each prepared as accelerate prepares it
    if setup.objective != Objective.SFT and not value_head(setup):
        for m in (model, ref_model):
            if m is not None:
                prepare_like_accelerate(m, setup, device)
    if liger_note:
        built.notes.append(liger_note)
    if setup.lora_like:
        prefix = decoder_prefix(model, spec.num_layers)  # peft adds base_model.model.
    _distribute(built, prefix)
    if value_head(setup):  # LLaMA-Factory's value head wraps the (distributed) causal LM
        built.value_head_model = value_head_wrapper(built)
    make_optimizer(built, galore)
    if setup.compile:
        built.notes.append(_compile_layers(model, spec, setup))
    if setup.engine == Engine.DEEPSPEED:
        wrap_deepspeed(built, spec.hidden)
    elif setup.precision == Precision.FP16 and not fsdp:
        built.scaler = torch.amp.GradScaler(torch.device(device).type)
    return built


def _distribute(built: Built, prefix: str) -> None:
    """accelerate's fp32 upcast under FSDP, then FSDP2's fully_shard, or DDP / FSDP1 around the
    materialized model."""
    setup = built.setup
    if setup.engine in (Engine.FSDP1, Engine.FSDP2) and upcasts_trainable(setup):
        built.notes.append(accelerate_fsdp_upcast(built.model))
    if setup.engine == Engine.FSDP2:
        built.simulated, built.rank, notes = shard(built.model, setup, built.device, prefix)
        built.notes += notes
        if built.simulated:
            built.notes.append(f"FSDP simulated: rank 0 of {setup.fsdp} on a fake process group")
    if setup.engine in (Engine.DDP, Engine.FSDP1):
        _wrap_replicated(built, prefix)


def value_head_wrapper(built) -> Any:
    """LLaMA-Factory's reward model: the causal LM wrapped as trl 0.24's
    AutoModelForCausalLMWithValueHead wraps it (its forward and ValueHead executed from source:
    losses.llamafactory_reward_functions), the ValueHead made after loading (fp32, on the device),
    the wrapper prepared as accelerate prepares it (autocast, fp32 outputs)."""
    import torch

    from vramplan.verify.losses import llamafactory_reward_functions

    fns = llamafactory_reward_functions()
    inner = getattr(built.model, "module", built.model)  # under DDP or FSDP1, the model they wrap
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    wrapper = type("ValueHeadModel", (torch.nn.Module,), {"forward": fns["forward"]})()
    wrapper.pretrained_model = built.model
    # its forward reads pretrained_model.active_peft_config (a prefix-tuning check) when is_peft_model;
    # DDP does not forward attributes to the model it wraps (FSDP1 does), and LoRA is no prefix tuning
    wrapper.is_peft_model = hasattr(built.model, "active_peft_config")
    with torch.device(built.device):
        wrapper.v_head = fns["ValueHead"](base.config)
    prepare_like_accelerate(wrapper, built.setup, built.device)
    return wrapper


def prepare_like_accelerate(model, setup: TrainingSetup, device: str) -> None:
    """accelerate==1.16.0 accelerator.py:1791-1801, prepare_model under mixed precision: the
    instance's forward wrapped in autocast, then in convert_outputs_to_fp32. The Trainer prepares
    the policy, TRL the reference copy alike (evaluation_mode=True). A DPO step calls its models
    itself, twice, each call in its own autocast (the Trainer adds none around compute_loss:
    transformers==5.25.0 trainer.py:2256-2273), so the policy's cached weight casts are gone by
    the reference forward; Built.forward then adds no autocast of its own."""
    import types

    import torch

    if not setup.autocast:
        return
    forward = torch.autocast(torch.device(device).type, dtype=half_dtype(setup))(model.forward.__func__)
    model.forward = types.MethodType(forward, model)
    if setup.fp32_outputs:
        convert = need("accelerate.utils", "--fp32-outputs").convert_outputs_to_fp32
        model.forward = types.MethodType(convert(model.forward.__func__), model)


def reference_copy_of(cfg, spec, dtype, device: str, setup: TrainingSetup):
    """DPO's frozen reference model for a full fine-tune, made after the policy as TRL makes it
    (trl==1.16.0 dpo_trainer.py:905-919: the same checkpoint in the policy's dtype, then
    add_fused_lm_head with its default outputs, :948-949; axolotl==0.19.0 train.py:157-164:
    the model loaded again, without a head of TRL's), in eval mode, nothing trained."""
    import torch

    from vramplan.verify.losses import add_trl_head

    # LLaMA-Factory loads it with torch_dtype=auto (model/loader.py:155): the checkpoint's bf16
    ref_dtype = torch.bfloat16 if setup.stack == Stack.LLAMAFACTORY else dtype
    ref = meta_model(cfg, spec, ref_dtype, setup.attention)
    materialize(ref, device)
    if setup.loss == Loss.TRL_CHUNKED_NLL:
        add_trl_head(ref, ("log_probs",))
    if setup.fp32_embeddings_norms:
        upcast_embeddings_norms(ref)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def check_buildable(setup: TrainingSetup, device: str) -> None:
    """What verify does not build, or builds only on CUDA, refused in one line before any
    weight is made."""
    from vramplan.verify.losses import check_device

    if setup.activation_offload in (ActivationOffload.ALL, ActivationOffload.UNSLOTH):
        raise VramplanError(
            f"{setup.activation_offload.value}: verify does not run this offloader (TRL's "
            "OffloadActivations, Unsloth's checkpointing); it is modelled from source",
            "--activation-offload",
        )
    if setup.lora_kernels:
        raise VramplanError(
            "verify builds peft's LoRA layers, not axolotl's fused LoRA kernels (Triton, CUDA only); they are "
            "modelled from source: give --no-lora-kernels to measure the peft step",
            "--lora-kernels",
        )
    check_device(setup.loss, device)
    if reference_copy(setup) and setup.engine not in (Engine.SINGLE, Engine.DDP):
        raise VramplanError(
            "verify builds DPO's reference copy on one GPU or under DDP, not sharded by FSDP or DeepSpeed; "
            "it is modelled from source",
            "--objective",
        )
    if setup.liger_layers != LigerLayers.NONE and not device.startswith("cuda"):
        raise VramplanError("Liger's layer kernels are Triton: they need --device cuda", "--liger-layers")


def apply_liger_layers(model, setup: TrainingSetup) -> str:
    """Liger's RMSNorm and SwiGLU/GeGLU kernels on the model instance, as the HF Trainer's
    use_liger_kernel does (transformers 5.25.0 integrations/liger.py:28-51 ->
    liger-kernel==0.8.5 _apply_liger_kernel_to_instance, which passes each model type's
    apply function only the keywords it takes); RoPE's kernel too, the loss left to --loss."""
    apply = need("liger_kernel.transformers", "--liger-layers")._apply_liger_kernel_to_instance
    layers = setup.liger_layers
    apply(
        model=model,
        rope=True,
        rms_norm=layers.norms,
        swiglu=layers.glu,
        geglu=layers.glu,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )
    return f"--liger-layers {layers.value}: liger_kernel _apply_liger_kernel_to_instance"


def _compile_layers(model, spec: ModelSpec, setup: TrainingSetup) -> str:
    """torchtune==0.6.1 training/_compile.py:25-50 compile_model: `.compile()` on every decoder
    layer, where the estimate models the layers compiled (memory/compile.py compiled_layer: a
    full fine-tune without checkpointing or offload); elsewhere the layers run eagerly, as the
    estimate models them. The note says which."""
    from vramplan.memory.compile import compiled_layer
    from vramplan.memory.context import activation_context

    if not compiled_layer(spec, activation_context(setup)):
        return (
            "--compile: the loss is compiled as torchtune's compile_loss; the decoder layers run eagerly, "
            "as the estimate models them"
        )
    for layer in model.get_submodule(decoder_prefix(model, spec.num_layers)):
        layer.compile(backend="inductor")
    return "--compile: each decoder layer compiled (torchtune's compile_model) and the loss as torchtune's compile_loss"


def half_dtype(setup: TrainingSetup):
    """The 2-byte dtype of the step: fp16 under --precision fp16 (GradScaler), else bf16."""
    import torch

    return torch.float16 if setup.precision == Precision.FP16 else torch.bfloat16


def _wrap_replicated(built: Built, prefix: str) -> None:
    """DDP or FSDP1 around the materialized model (rank 0 of a fake group on one device)."""
    setup = built.setup
    if setup.engine == Engine.DDP:
        built.model, built.simulated = wrap_ddp(built.model, setup, built.device)
        world = setup.data_parallel
    else:
        built.model, built.simulated = shard_fsdp1(built.model, setup, built.device, prefix)
        world = setup.fsdp
    import torch.distributed as dist

    built.rank = dist.get_rank()  # of the real group under torchrun, 0 of the fake one
    if built.simulated:
        built.notes.append(f"{setup.engine.value.upper()} simulated: rank 0 of {world} on a fake process group")
