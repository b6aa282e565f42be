"""The training setup: which technique, precision, optimizer, batch and sharding.

Field names follow the ``vramplan estimate`` flags (see docs/cli.md) and the reference
step (docs/reference-step.md). Validation names the flag at fault.
"""
from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vramplan.errors import VramplanError


class Method(str, Enum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"
    GALORE = "galore"


class Precision(str, Enum):
    BF16 = "bf16"     # no autocast: the step computes in the weights' dtype
    MIXED = "mixed"   # bf16 autocast (FSDP: MixedPrecisionPolicy(bf16, fp32)); fp32 weights unless --model-dtype bf16
    FP16 = "fp16"     # fp16 autocast with a GradScaler (cards without bf16: T4, V100, RTX 20xx)


class Quant(str, Enum):
    NF4 = "nf4"       # bitsandbytes Linear4bit, blocksize 64, double quant
    HQQ4 = "hqq4"     # hqq HQQLinear nbits=4 group_size=64


class Optim(str, Enum):
    """Hugging Face ``TrainingArguments.optim`` names."""
    ADAMW_TORCH = "adamw_torch"
    ADAMW_TORCH_FUSED = "adamw_torch_fused"
    ADAMW_BNB_8BIT = "adamw_bnb_8bit"
    GALORE_ADAMW = "galore_adamw"
    GALORE_ADAMW_8BIT = "galore_adamw_8bit"
    GALORE_ADAMW_LAYERWISE = "galore_adamw_layerwise"
    GALORE_ADAMW_8BIT_LAYERWISE = "galore_adamw_8bit_layerwise"

    @property
    def is_galore(self) -> bool:
        return self.value.startswith("galore")

    @property
    def is_8bit(self) -> bool:
        return "8bit" in self.value

    @property
    def layerwise(self) -> bool:
        return self.value.endswith("_layerwise")


class Stack(str, Enum):
    """A training framework's defaults, bundled (vramplan/presets/stacks/*)."""
    PLAIN = "plain"                # the reference step: transformers + peft, own loop
    HF_TRAINER = "hf-trainer"
    TRL = "trl"
    UNSLOTH = "unsloth"
    AXOLOTL = "axolotl"
    LLAMAFACTORY = "llamafactory"
    TORCHTUNE = "torchtune"
    FSDP_QLORA = "fsdp-qlora"      # Answer.AI's fsdp_qlora train.py


class Loss(str, Enum):
    """How the loss over the vocabulary is computed."""
    HF = "hf"                          # the model's own ForCausalLMLoss on full logits (the reference step)
    CHUNKED = "chunked"                # chunked cross-entropy over full logits (axolotl, torchtune)
    TRL_CHUNKED_NLL = "trl-chunked-nll"  # TRL SFTTrainer loss_type="chunked_nll"
    LIGER = "liger"                    # Liger fused linear cross-entropy
    CCE = "cce"                        # Apple Cut Cross-Entropy
    UNSLOTH = "unsloth"                # Unsloth's fused cross-entropy


class AdapterDtype(str, Enum):
    FP32 = "fp32"   # peft's default: autocast_adapter_dtype=True upcasts bf16 adapters
    BF16 = "bf16"


class ModelDtype(str, Enum):
    BF16 = "bf16"
    FP32 = "fp32"


class ActivationOffload(str, Enum):
    NONE = "none"
    CHECKPOINTS = "checkpoints"   # transformers' checkpoint offload: save_on_cpu around each checkpoint
    ALL = "all"                   # torchtune/TRL/axolotl OffloadActivations: every saved tensor
    UNSLOTH = "unsloth"           # use_gradient_checkpointing="unsloth": the hidden state per layer


class Attention(str, Enum):
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH = "flash"   # FlashAttention-2


class Packing(str, Enum):
    NONE = "none"
    PADDING_FREE = "padding-free"   # varlen, no mask (axolotl sample_packing with flash, TRL padding_free)
    POSITION_IDS = "position-ids"   # packed sequences told apart by position_ids


class FsdpSharding(str, Enum):
    FULL = "full"
    SHARD_GRAD_OP = "shard-grad-op"
    NO_SHARD = "no-shard"
    HYBRID = "hybrid"


class DeepSpeedStage(str, Enum):
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    ZERO3 = "zero3"


class Engine(str, Enum):
    """What holds the model on each GPU (derived from the setup: TrainingSetup.engine)."""
    SINGLE = "single"        # one GPU, no wrapper
    DDP = "ddp"              # torch DistributedDataParallel: every GPU holds the whole model
    FSDP1 = "fsdp1"          # torch FullyShardedDataParallel (flat parameters)
    FSDP2 = "fsdp2"          # torch fully_shard (per-parameter DTensor shards)
    DEEPSPEED = "deepspeed"  # DeepSpeed ZeRO-1/2/3


class LoraTargets(str, Enum):
    ALL_LINEAR = "all-linear"
    ATTENTION = "attention"


_OPTIM_FLAG = "--optim"


class TrainingSetup(BaseModel):
    """One training configuration, per micro-batch on one GPU."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field(Method.FULL, description="what trains: every weight, LoRA adapters, 4-bit base + LoRA, "
                           "or GaLore")
    precision: Precision = Field(Precision.BF16, description="bf16 weights and states, or fp32 masters with bf16 "
                                 "autocast")
    # None (or absent) on input is filled in by _defaults from the method
    optim: Optim = Field(Optim.ADAMW_TORCH,
                         description="optimizer (HF name); default adamw_torch, galore_adamw for galore")
    batch_size: int = Field(1, description="micro-batch size per GPU")
    seq_len: int = Field(2048, description="tokens per sequence")
    lora_r: int = Field(16, description="LoRA rank")
    lora_dropout: float = Field(0.05, description="LoRA dropout probability")
    lora_targets: LoraTargets = Field(LoraTargets.ALL_LINEAR, description="which Linears get adapters")
    quant: Quant | None = Field(None, description="4-bit format of the frozen base (qlora only); default nf4")
    galore_rank: int = Field(128, description="GaLore projection rank")
    galore_update_proj_gap: int = Field(200, description="steps between GaLore SVD refreshes")
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer in backward")
    fsdp: int = Field(1, description="FSDP world size (1 = no sharding; several --gpus without it: DDP)")
    cpu_offload: bool = Field(False, description="FSDP CPU offload (FSDP2 CPUOffloadPolicy, FSDP1 CPUOffload): shards, "
                              "grads and optimizer on the CPU; also on one GPU")
    # ---- the stack knobs (issue 13): each default is the reference step's
    stack: Stack = Field(Stack.PLAIN, description="a framework's defaults for every knob below (explicit flags override)")
    loss: Loss = Field(Loss.HF, description="loss implementation over the vocabulary")
    fp32_outputs: bool = Field(False, description="accelerate's bf16 autocast converts the model's outputs (logits) to fp32")
    adapter_dtype: AdapterDtype | None = Field(None, description="LoRA adapter dtype; default fp32 (peft's autocast_adapter_dtype)")
    kbit_prep: bool = Field(False, description="peft prepare_model_for_kbit_training: non-4-bit parameters upcast to fp32")
    dora: bool = Field(False, description="DoRA (peft use_dora): magnitude vector and a weight norm per adapted Linear")
    lora_target_modules: tuple[str, ...] | None = Field(None, description="explicit module names to adapt (peft target_modules)")
    optimizer_in_backward: bool = Field(False, description="step each parameter's optimizer in its grad hook")
    gradient_accumulation: int = Field(1, description="micro-batches per optimizer step")
    activation_offload: ActivationOffload = Field(ActivationOffload.NONE, description="activations moved to pinned host RAM")
    checkpoint_reentrant: bool = Field(False, description="reentrant (torch.utils.checkpoint use_reentrant=True) recompute")
    attention: Attention | None = Field(None, description="attention kernel; default the model's (sdpa unless its config says eager)")
    packing: Packing = Field(Packing.NONE, description="sequence packing")
    model_dtype: ModelDtype | None = Field(None, description="dtype the weights are loaded in; default fp32 under mixed, else bf16")
    keep_logits: bool = Field(False, description="the training loop keeps the model's output (its logits) referenced through backward "
                                                 "and the optimizer step (Answer.AI fsdp_qlora train.py); the reference step keeps only the loss")
    # ---- the engines (issue 15)
    fsdp_version: int = Field(2, description="FSDP1 (FullyShardedDataParallel) or FSDP2 (fully_shard)")
    fsdp_sharding: FsdpSharding = Field(FsdpSharding.FULL, description="FSDP sharding strategy")
    deepspeed: DeepSpeedStage | None = Field(None, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="DeepSpeed offload_optimizer to the CPU")
    offload_params: bool = Field(False, description="DeepSpeed ZeRO-3 offload_param to the CPU")
    nodes: int = Field(1, description="nodes the GPUs are spread over")
    data_parallel: int = Field(1, description="GPUs in the data-parallel group of DDP or DeepSpeed (estimate sets it "
                               "from --gpus: every GPU a rank)")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        if not isinstance(data, dict):
            return data
        method = str(getattr(data.get("method"), "value", data.get("method") or "full"))
        if data.get("optim") is None:
            data["optim"] = "galore_adamw" if method == "galore" else "adamw_torch"
        if method == "qlora" and data.get("quant") is None:
            data["quant"] = "nf4"
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainingSetup:
        for flag, value in (("--batch-size", self.batch_size), ("--seq-len", self.seq_len),
                            ("--lora-r", self.lora_r), ("--galore-rank", self.galore_rank),
                            ("--fsdp", self.fsdp)):
            if value < 1:
                raise VramplanError(f"must be a positive integer, got {value}", flag)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise VramplanError(f"must be in [0, 1), got {self.lora_dropout}", "--lora-dropout")
        if self.quant is not None and self.method != Method.QLORA:
            raise VramplanError("only applies to --method qlora", "--quant")
        if self.optim.is_galore != (self.method == Method.GALORE):
            allowed = ("galore_adamw[_8bit][_layerwise]" if self.method == Method.GALORE
                       else "adamw_torch, adamw_torch_fused, adamw_bnb_8bit")
            raise VramplanError(f"{self.optim.value} does not go with --method {self.method.value}; use {allowed}",
                                _OPTIM_FLAG)
        if self.optim.layerwise and (self.fsdp > 1 or self.cpu_offload or self.deepspeed is not None):
            raise VramplanError("layer-wise GaLore cannot be combined with --fsdp, --cpu-offload or --deepspeed "
                                "(per-parameter hooks on sharded grads)", _OPTIM_FLAG)
        self._check_engines()
        return self

    def _check_engines(self) -> None:
        """The engine flags that exclude each other (docs/memory-model.md, "Engines")."""
        for flag, value in (("--nodes", self.nodes), ("--data-parallel", self.data_parallel)):
            if value < 1:
                raise VramplanError(f"must be a positive integer, got {value}", flag)
        if self.fsdp_version not in (1, 2):
            raise VramplanError(f"must be 1 or 2, got {self.fsdp_version}", "--fsdp-version")
        if self.deepspeed is not None and (self.fsdp > 1 or self.cpu_offload):
            raise VramplanError("--deepspeed cannot be combined with --fsdp/--cpu-offload (one engine shards the "
                                "model; DeepSpeed's offload is --offload-optimizer/--offload-params)", "--deepspeed")
        if self.deepspeed == DeepSpeedStage.ZERO3 and self.method == Method.QLORA:
            raise VramplanError("--deepspeed zero3 with --method qlora is not modelled (4-bit models are not loaded "
                                "under zero.Init); use zero2 or --fsdp", "--deepspeed")
        if self.deepspeed is not None and self.method == Method.GALORE:
            raise VramplanError("--deepspeed with --method galore is not modelled (GaLore projects whole "
                                "parameters, ZeRO hands the optimizer flat partitions)", "--deepspeed")
        if self.offload_optimizer and self.deepspeed is None:
            raise VramplanError("--offload-optimizer needs --deepspeed (FSDP's offload is --cpu-offload)",
                                "--offload-optimizer")
        if self.offload_params and self.deepspeed != DeepSpeedStage.ZERO3:
            raise VramplanError("--offload-params needs --deepspeed zero3 (ZeRO-1/2 keep every parameter on the GPU)",
                                "--offload-params")
        if self.fsdp_sharding == FsdpSharding.HYBRID:
            if self.nodes < 2:
                raise VramplanError("--fsdp-sharding hybrid needs --nodes 2 or more (it shards inside a node and "
                                    "replicates across nodes)", "--fsdp-sharding")
            if self.fsdp % self.nodes:
                raise VramplanError(f"--fsdp {self.fsdp} is not a multiple of --nodes {self.nodes} "
                                    "(hybrid sharding puts the same number of GPUs on each node)", "--fsdp-sharding")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def lora_like(self) -> bool:
        return self.method in (Method.LORA, Method.QLORA)

    @property
    def weight_dtype(self) -> ModelDtype:
        """The dtype dense weights are stored in: --model-dtype, else fp32 masters under mixed."""
        if self.model_dtype is not None:
            return self.model_dtype
        return ModelDtype.FP32 if self.precision == Precision.MIXED else ModelDtype.BF16

    @property
    def adapter_store_dtype(self) -> AdapterDtype:
        return self.adapter_dtype or AdapterDtype.FP32

    @property
    def engine(self) -> Engine:
        """What holds the model on each GPU: --deepspeed, else FSDP (--fsdp N > 1, or --cpu-offload
        on one GPU: fully_shard with world 1), else DDP when several GPUs each run a rank."""
        if self.deepspeed is not None:
            return Engine.DEEPSPEED
        if self.fsdp > 1 or self.cpu_offload:
            return Engine.FSDP1 if self.fsdp_version == 1 else Engine.FSDP2
        return Engine.DDP if self.data_parallel > 1 else Engine.SINGLE

    @property
    def sharded(self) -> bool:
        """FSDP (either version) wraps the model: units are all-gathered around their use."""
        return self.engine in (Engine.FSDP1, Engine.FSDP2)

    @property
    def shard_world(self) -> int:
        """GPUs one FSDP shard group spans: --fsdp, inside a node under hybrid, 1 under no-shard."""
        if self.fsdp_sharding == FsdpSharding.NO_SHARD:
            return 1
        if self.fsdp_sharding == FsdpSharding.HYBRID:
            return self.fsdp // self.nodes
        return self.fsdp

    @property
    def autocast(self) -> bool:
        """fp32 masters computed in bf16 through torch.autocast (no FSDP, no DeepSpeed: both
        compute in their bf16 parameter dtype)."""
        return self.precision == Precision.MIXED and self.engine in (Engine.SINGLE, Engine.DDP)

    def describe(self) -> str:
        parts = [self.method.value]
        if self.quant is not None:  # qlora only (_check)
            parts.append(self.quant.value)
        if self.lora_like:
            parts.append(f"r={self.lora_r}" + ("" if self.lora_targets == LoraTargets.ALL_LINEAR else " attn"))
        if self.method == Method.GALORE:
            parts.append(f"rank={self.galore_rank}")
        parts.append(self.precision.value)
        parts.append(self.optim.value)
        if self.gradient_checkpointing:
            parts.append("ckpt")
        if self.fsdp > 1:
            parts.append(f"fsdp{self.fsdp}" + ("+offload" if self.cpu_offload else ""))
        parts.append(f"{self.batch_size}x{self.seq_len}")
        return " ".join(parts + self._knob_words())

    def _knob_words(self) -> list[str]:
        """The stack and every issue-13 knob that differs from the reference step, in a word each;
        nothing for the reference step, so its description stays what it always was."""
        words = [] if self.stack == Stack.PLAIN else [f"[{self.stack.value}]"]
        flags = (("fp32_outputs", "fp32-logits"), ("keep_logits", "keep-logits"), ("kbit_prep", "kbit-prep"),
                 ("dora", "dora"), ("optimizer_in_backward", "optim-in-bwd"), ("checkpoint_reentrant", "reentrant"))
        words += [word for name, word in flags if getattr(self, name)]
        valued = (("loss", "loss", Loss.HF), ("activation_offload", "offload", ActivationOffload.NONE),
                  ("packing", "packing", Packing.NONE), ("attention", "attn", None), ("model_dtype", "weights", None))
        words += [f"{word}={getattr(self, name).value}" for name, word, default in valued
                  if getattr(self, name) not in (default, None)]
        if self.lora_like and self.adapter_dtype is not None:
            words.append(f"adapters={self.adapter_dtype.value}")
        if self.lora_like and self.lora_target_modules:
            words.append("targets=" + ",".join(self.lora_target_modules))
        if self.lora_like and self.stack != Stack.PLAIN:
            words.append(f"dropout={self.lora_dropout:g}")
        if self.gradient_accumulation > 1:
            words.append(f"ga={self.gradient_accumulation}")
        if self.sharded and self.fsdp_version != 2:
            words.append(f"fsdp-v{self.fsdp_version}")
        if self.sharded and self.fsdp_sharding != FsdpSharding.FULL:
            words.append(f"sharding={self.fsdp_sharding.value}")
        if self.fsdp == 1 and self.cpu_offload:
            words.append("fsdp-1gpu+offload")
        if self.engine == Engine.DDP:
            words.append(f"ddp{self.data_parallel}")
        if self.deepspeed is not None:
            offload = "+offload-opt" * self.offload_optimizer + "+offload-params" * self.offload_params
            words.append(f"{self.deepspeed.value}x{self.data_parallel}{offload}")
        if self.nodes > 1:
            words.append(f"nodes={self.nodes}")
        return words
