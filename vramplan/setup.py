"""The training setup: which technique, precision, optimizer, batch and sharding.

Field names follow the ``vramplan estimate`` flags (see docs/cli.md) and the reference
step (docs/reference-step.md). Validation names the flag at fault.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vramplan.errors import VramplanError
from vramplan.limits import (
    MAX_ACCUMULATION,
    MAX_BATCH_SIZE,
    MAX_LAYERS,
    MAX_PROJ_GAP,
    MAX_RANK,
    MAX_RANKS,
    MAX_SEQ_LEN,
    MAX_TOKENS,
    check_int,
)


class Method(str, Enum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"
    GALORE = "galore"


class Precision(str, Enum):
    BF16 = "bf16"  # no autocast: the step computes in the weights' dtype
    MIXED = "mixed"  # bf16 autocast (FSDP: MixedPrecisionPolicy(bf16, fp32)); fp32 weights unless --model-dtype bf16
    FP16 = "fp16"  # fp16 autocast with a GradScaler (cards without bf16: T4, V100, RTX 20xx)


class Quant(str, Enum):
    NF4 = "nf4"  # bitsandbytes Linear4bit, blocksize 64, double quant
    HQQ4 = "hqq4"  # hqq HQQLinear nbits=4 group_size=64
    INT8 = "int8"  # bitsandbytes Linear8bitLt (LLM.int8(), threshold 6.0): load_in_8bit


class QuantStorage(str, Enum):
    """bitsandbytes' bnb_4bit_quant_storage: the dtype the packed 4-bit bytes are stored as. The
    bytes are the same; it decides whether accelerate's FSDP2 shards them (memory/accelerate.py)."""

    UINT8 = "uint8"  # BitsAndBytesConfig's default
    BF16 = "bf16"  # axolotl, LLaMA-Factory, Answer.AI's train.py: "crucial for fsdp+qlora"


class OptimFamily(str, Enum):
    """What an optimizer keeps and computes, whatever library implements it."""

    ADAMW = "adamw"  # two moments (torch, bitsandbytes, torchao, anyprecision)
    STABLE_ADAMW = "stable_adamw"  # AdamW + a Kahan buffer for low-precision params (torch-optimi)
    ADEMAMIX = "ademamix"  # three moments (two EMAs of the gradient + its square)
    LION = "lion"  # one moment
    RMSPROP = "rmsprop"  # one moment (square average)
    SGD = "sgd"  # no state at momentum 0 (HF passes only lr)
    ADAGRAD = "adagrad"  # one accumulator
    ADAFACTOR = "adafactor"  # factored second moment (rows + columns) for >= 2-D
    SCHEDULE_FREE_ADAMW = "schedule_free_adamw"  # z + exp_avg_sq
    SCHEDULE_FREE_RADAM = "schedule_free_radam"  # z + exp_avg_sq
    SCHEDULE_FREE_SGD = "schedule_free_sgd"  # z
    GALORE_ADAMW = "galore_adamw"  # AdamW on the low-rank projected gradient
    GALORE_ADAFACTOR = "galore_adafactor"  # Adafactor on the low-rank projected gradient
    APOLLO_ADAMW = "apollo_adamw"  # AdamW on a random low-rank projection, channel-wise scaling
    LOMO = "lomo"  # plain SGD fused into backward, no state
    ADALOMO = "adalomo"  # factored second moment fused into backward
    GROKADAMW = "grokadamw"  # AdamW + a gradient EMA, all three states in host memory
    MUON = "muon"  # one momentum (Newton-Schulz) for 2-D weights, AdamW for the rest
    ADAM_MINI = "adam_mini"  # one momentum, the second moment one scalar per head / output row / tensor


class OptimLibrary(str, Enum):
    """Who implements the optimizer (the rules cite that library's source)."""

    TORCH = "torch"
    BITSANDBYTES = "bitsandbytes"
    TORCHAO = "torchao"
    TRANSFORMERS = "transformers"
    SCHEDULEFREE = "schedulefree"
    GALORE = "galore-torch"
    APOLLO = "apollo-torch"
    LOMO = "lomo-optim"
    GROKADAMW = "grokadamw"
    OPTIMI = "torch-optimi"
    TORCHDISTX = "torchdistx"
    MUON = "llamafactory-muon"  # LLaMA-Factory third_party/muon (axolotl's is the same algorithm)
    ADAM_MINI = "adam-mini"  # adam_mini.Adam_mini (LLaMA-Factory use_adam_mini)
    TORCH_XLA = "torch-xla"
    TORCH_NPU = "torch-npu"


class StateHome(str, Enum):
    """Where the optimizer states live."""

    DEVICE = "device"  # ordinary CUDA allocations (torch.cuda.max_memory_allocated counts them)
    PAGED = "paged"  # bitsandbytes paged: CUDA unified memory, resident on the GPU, outside torch's statistics
    HOST = "host"  # host RAM, copied to the GPU per parameter for the update (grokadamw)


class StateDtype(str, Enum):
    PARAM = "param"  # zeros_like(p): the parameter's dtype
    FP32 = "fp32"  # always fp32 (bitsandbytes 32-bit and small-tensor fallback, Adafactor, anyprecision)


@dataclass(frozen=True)
class OptimTraits:
    """One optimizer name's family and mechanics (the memory rules dispatch on these)."""

    family: OptimFamily
    library: OptimLibrary
    label: str  # words for tables (plan), without "layer-wise"
    moments: int  # state tensors per parameter, before quantizing or factoring
    bits: int = 32  # 8 or 4: block-quantized states
    state_dtype: StateDtype = StateDtype.PARAM
    paged: bool = False  # bitsandbytes is_paged: large states in CUDA unified memory
    factored: bool = False  # second moment kept as row and column vectors for >= 2-D
    layerwise: bool = False  # one optimizer per parameter stepped in its grad hook (HF *_layerwise)
    fused: bool = False  # one kernel per tensor list, no temporaries
    in_backward: bool = False  # steps inside backward by construction (layer-wise, LOMO)
    home: StateHome = StateHome.DEVICE
    refused: str = ""  # why vramplan does not model it (empty: modelled)


class Optim(str, Enum):
    """Hugging Face ``TrainingArguments.optim`` names (transformers 5.25.0 training_args.py:113-158
    OptimizerNames), plus ``muon`` (axolotl ``optimizer: muon``, LLaMA-Factory ``use_muon``) and
    ``adam_mini`` (LLaMA-Factory ``use_adam_mini``)."""

    ADAMW_TORCH = "adamw_torch"
    ADAMW_TORCH_FUSED = "adamw_torch_fused"
    ADAMW_TORCH_XLA = "adamw_torch_xla"
    ADAMW_TORCH_NPU_FUSED = "adamw_torch_npu_fused"
    ADAFACTOR = "adafactor"
    ADAMW_ANYPRECISION = "adamw_anyprecision"
    ADAMW_TORCH_4BIT = "adamw_torch_4bit"
    ADAMW_TORCH_8BIT = "adamw_torch_8bit"
    ADEMAMIX = "ademamix"
    SGD = "sgd"
    ADAGRAD = "adagrad"
    ADAMW_BNB_8BIT = "adamw_bnb_8bit"
    ADAMW_8BIT = "adamw_8bit"  # transformers: "just an alias for adamw_bnb_8bit"
    ADEMAMIX_8BIT = "ademamix_8bit"
    LION_8BIT = "lion_8bit"
    LION_32BIT = "lion_32bit"
    PAGED_ADAMW_32BIT = "paged_adamw_32bit"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"
    PAGED_ADEMAMIX_32BIT = "paged_ademamix_32bit"
    PAGED_ADEMAMIX_8BIT = "paged_ademamix_8bit"
    PAGED_LION_32BIT = "paged_lion_32bit"
    PAGED_LION_8BIT = "paged_lion_8bit"
    RMSPROP = "rmsprop"
    RMSPROP_BNB = "rmsprop_bnb"
    RMSPROP_BNB_8BIT = "rmsprop_bnb_8bit"
    RMSPROP_BNB_32BIT = "rmsprop_bnb_32bit"
    GALORE_ADAMW = "galore_adamw"
    GALORE_ADAMW_8BIT = "galore_adamw_8bit"
    GALORE_ADAFACTOR = "galore_adafactor"
    GALORE_ADAMW_LAYERWISE = "galore_adamw_layerwise"
    GALORE_ADAMW_8BIT_LAYERWISE = "galore_adamw_8bit_layerwise"
    GALORE_ADAFACTOR_LAYERWISE = "galore_adafactor_layerwise"
    LOMO = "lomo"
    ADALOMO = "adalomo"
    GROKADAMW = "grokadamw"
    SCHEDULE_FREE_RADAM = "schedule_free_radam"
    SCHEDULE_FREE_ADAMW = "schedule_free_adamw"
    SCHEDULE_FREE_SGD = "schedule_free_sgd"
    APOLLO_ADAMW = "apollo_adamw"
    APOLLO_ADAMW_LAYERWISE = "apollo_adamw_layerwise"
    STABLE_ADAMW = "stable_adamw"
    MUON = "muon"
    ADAM_MINI = "adam_mini"

    @property
    def traits(self) -> OptimTraits:
        return OPTIM_TRAITS[self]

    @property
    def is_galore(self) -> bool:
        return self.traits.family in (OptimFamily.GALORE_ADAMW, OptimFamily.GALORE_ADAFACTOR)

    @property
    def is_8bit(self) -> bool:
        return self.traits.bits == 8

    @property
    def layerwise(self) -> bool:
        return self.traits.layerwise

    @property
    def paged(self) -> bool:
        return self.traits.paged

    @property
    def label(self) -> str:
        return self.traits.label + (" layer-wise" if self.traits.layerwise else "")


def _table() -> dict[Optim, OptimTraits]:
    """Each name's traits, read from the library HF's trainer_optimizer.py (transformers 5.25.0
    :195-622) builds it with; docs/memory-model.md, "Optimizers", gives the rules and sources.
    Two halves, in HF's order: the whole-tensor optimizers, then the projected, in-backward
    and other third-party ones."""
    return {**_whole_tensor_traits(), **_projected_and_other_traits()}


def _bnb_traits(fam: OptimFamily, label: str, moments: int, bits: int, paged: bool = False) -> OptimTraits:
    # bnb 32-bit states (and the 8-bit small-tensor fallback) are fp32 whatever the param dtype
    # (bitsandbytes 0.50.2 optim/optimizer.py:509-510); HF: is_paged = "paged" in name
    return OptimTraits(
        fam,
        OptimLibrary.BITSANDBYTES,
        ("paged " if paged else "") + ("8-bit " if bits == 8 else "") + label,
        moments,
        bits=bits,
        state_dtype=StateDtype.FP32,
        paged=paged,
        fused=True,
        home=StateHome.PAGED if paged else StateHome.DEVICE,
    )


def _whole_tensor_traits() -> dict[Optim, OptimTraits]:
    """torch, transformers, torchdistx, torchao and bitsandbytes optimizers."""
    F, L, T, O = OptimFamily, OptimLibrary, OptimTraits, Optim
    fp32 = StateDtype.FP32
    bnb_ = _bnb_traits
    return {
        O.ADAMW_TORCH: T(F.ADAMW, L.TORCH, "AdamW", 2),
        O.ADAMW_TORCH_FUSED: T(F.ADAMW, L.TORCH, "AdamW fused", 2, fused=True),
        O.ADAMW_TORCH_XLA: T(F.ADAMW, L.TORCH_XLA, "AdamW (XLA)", 2, refused="a TPU (torch_xla) optimizer"),
        O.ADAMW_TORCH_NPU_FUSED: T(
            F.ADAMW, L.TORCH_NPU, "AdamW (NPU)", 2, fused=True, refused="an Ascend NPU (torch_npu) optimizer"
        ),
        O.ADAFACTOR: T(F.ADAFACTOR, L.TRANSFORMERS, "Adafactor", 1, state_dtype=fp32, factored=True),
        O.ADAMW_ANYPRECISION: T(F.ADAMW, L.TORCHDISTX, "AnyPrecision AdamW", 2, state_dtype=fp32),
        O.ADAMW_TORCH_4BIT: T(F.ADAMW, L.TORCHAO, "4-bit AdamW (torchao)", 2, bits=4),
        O.ADAMW_TORCH_8BIT: T(F.ADAMW, L.TORCHAO, "8-bit AdamW (torchao)", 2, bits=8),
        O.ADEMAMIX: bnb_(F.ADEMAMIX, "AdEMAMix", 3, 32),
        O.SGD: T(F.SGD, L.TORCH, "SGD", 0),
        O.ADAGRAD: T(F.ADAGRAD, L.TORCH, "Adagrad", 1),
        O.ADAMW_BNB_8BIT: bnb_(F.ADAMW, "AdamW", 2, 8),
        O.ADAMW_8BIT: bnb_(F.ADAMW, "AdamW", 2, 8),
        O.ADEMAMIX_8BIT: bnb_(F.ADEMAMIX, "AdEMAMix", 3, 8),
        O.LION_8BIT: bnb_(F.LION, "Lion", 1, 8),
        O.LION_32BIT: bnb_(F.LION, "Lion", 1, 32),
        O.PAGED_ADAMW_32BIT: bnb_(F.ADAMW, "AdamW", 2, 32, paged=True),
        O.PAGED_ADAMW_8BIT: bnb_(F.ADAMW, "AdamW", 2, 8, paged=True),
        O.PAGED_ADEMAMIX_32BIT: bnb_(F.ADEMAMIX, "AdEMAMix", 3, 32, paged=True),
        O.PAGED_ADEMAMIX_8BIT: bnb_(F.ADEMAMIX, "AdEMAMix", 3, 8, paged=True),
        O.PAGED_LION_32BIT: bnb_(F.LION, "Lion", 1, 32, paged=True),
        O.PAGED_LION_8BIT: bnb_(F.LION, "Lion", 1, 8, paged=True),
        O.RMSPROP: T(F.RMSPROP, L.TORCH, "RMSprop", 1),
        O.RMSPROP_BNB: bnb_(F.RMSPROP, "RMSprop", 1, 32),
        O.RMSPROP_BNB_8BIT: bnb_(F.RMSPROP, "RMSprop", 1, 8),
        O.RMSPROP_BNB_32BIT: bnb_(F.RMSPROP, "RMSprop", 1, 32),
    }


def _projected_and_other_traits() -> dict[Optim, OptimTraits]:
    """GaLore, LOMO, GrokAdamW, schedule-free, APOLLO, optimi and Muon optimizers."""
    F, L, T, O = OptimFamily, OptimLibrary, OptimTraits, Optim
    fp32 = StateDtype.FP32
    return {
        O.GALORE_ADAMW: T(F.GALORE_ADAMW, L.GALORE, "AdamW", 2),
        O.GALORE_ADAMW_8BIT: T(F.GALORE_ADAMW, L.GALORE, "8-bit AdamW", 2, bits=8),
        O.GALORE_ADAFACTOR: T(F.GALORE_ADAFACTOR, L.GALORE, "Adafactor", 1, state_dtype=fp32, factored=True),
        O.GALORE_ADAMW_LAYERWISE: T(F.GALORE_ADAMW, L.GALORE, "AdamW", 2, layerwise=True, in_backward=True),
        O.GALORE_ADAMW_8BIT_LAYERWISE: T(
            F.GALORE_ADAMW, L.GALORE, "8-bit AdamW", 2, bits=8, layerwise=True, in_backward=True
        ),
        O.GALORE_ADAFACTOR_LAYERWISE: T(
            F.GALORE_ADAFACTOR,
            L.GALORE,
            "Adafactor",
            1,
            state_dtype=fp32,
            factored=True,
            layerwise=True,
            in_backward=True,
        ),
        O.LOMO: T(F.LOMO, L.LOMO, "LOMO", 0, in_backward=True),
        O.ADALOMO: T(F.ADALOMO, L.LOMO, "AdaLomo", 1, state_dtype=fp32, factored=True, in_backward=True),
        O.GROKADAMW: T(F.GROKADAMW, L.GROKADAMW, "GrokAdamW", 3, home=StateHome.HOST),
        O.SCHEDULE_FREE_RADAM: T(F.SCHEDULE_FREE_RADAM, L.SCHEDULEFREE, "schedule-free RAdam", 2),
        O.SCHEDULE_FREE_ADAMW: T(F.SCHEDULE_FREE_ADAMW, L.SCHEDULEFREE, "schedule-free AdamW", 2),
        O.SCHEDULE_FREE_SGD: T(F.SCHEDULE_FREE_SGD, L.SCHEDULEFREE, "schedule-free SGD", 1),
        O.APOLLO_ADAMW: T(F.APOLLO_ADAMW, L.APOLLO, "APOLLO AdamW", 2),
        O.APOLLO_ADAMW_LAYERWISE: T(F.APOLLO_ADAMW, L.APOLLO, "APOLLO AdamW", 2, layerwise=True, in_backward=True),
        O.STABLE_ADAMW: T(F.STABLE_ADAMW, L.OPTIMI, "StableAdamW", 2),
        O.MUON: T(F.MUON, L.MUON, "Muon", 1),
        O.ADAM_MINI: T(F.ADAM_MINI, L.ADAM_MINI, "Adam-mini", 1),
    }


OPTIM_TRAITS: dict[Optim, OptimTraits] = _table()


class Stack(str, Enum):
    """A training framework's defaults, bundled (vramplan/presets/stacks/*)."""

    PLAIN = "plain"  # the reference step: transformers + peft, own loop
    HF_TRAINER = "hf-trainer"
    TRL = "trl"
    UNSLOTH = "unsloth"
    AXOLOTL = "axolotl"
    LLAMAFACTORY = "llamafactory"
    TORCHTUNE = "torchtune"
    FSDP_QLORA = "fsdp-qlora"  # Answer.AI's fsdp_qlora train.py

    @property
    def trainer_param_groups(self) -> bool:
        """The optimizer is built by transformers' Trainer.create_optimizer, which always makes two
        param groups, decay and no-decay (bias and norm weights) (transformers 5.25.0
        trainer.py:1287-1300): a foreach temporary is then the larger group's, not all params'."""
        return self in (Stack.HF_TRAINER, Stack.TRL, Stack.UNSLOTH, Stack.AXOLOTL, Stack.LLAMAFACTORY)


# The trainers whose DPO step is modelled: TRL 1.16's DPOTrainer. axolotl==0.19.0 pins trl==1.9.0,
# whose DPOTrainer makes full logits, and LLaMA-Factory runs its own (configs/axolotl.py, llamafactory.py)
DPO_STACKS = {Stack.TRL: "trl-chunked-nll", Stack.AXOLOTL: "hf", Stack.LLAMAFACTORY: "hf"}  # each one's loss
# The trainers whose reward-model step is modelled (memory/reward.py): TRL's RewardTrainer, which axolotl
# runs, and LLaMA-Factory's stage rm (a value head over the causal LM)
REWARD_STACKS = (Stack.TRL, Stack.AXOLOTL, Stack.LLAMAFACTORY)


class Loss(str, Enum):
    """How the loss over the vocabulary is computed."""

    HF = "hf"  # the model's own ForCausalLMLoss on full logits (the reference step)
    CHUNKED = "chunked"  # torchtune's CEWithChunkedOutputLoss over 8 chunks of logits
    TORCHTUNE_LINEAR_CE = "torchtune-linear-ce"  # torchtune's LinearCrossEntropyLoss: projection inside, 8 row chunks
    TRL_CHUNKED_NLL = "trl-chunked-nll"  # TRL SFTTrainer's fused chunked LM head (chunked_nll: its deprecated alias)
    LIGER = "liger"  # Liger fused linear cross-entropy
    CCE = "cce"  # Apple Cut Cross-Entropy
    UNSLOTH = "unsloth"  # Unsloth's fused cross-entropy


class AdapterDtype(str, Enum):
    FP32 = "fp32"  # peft's default: autocast_adapter_dtype=True upcasts bf16 adapters
    BF16 = "bf16"  # get_peft_model(autocast_adapter_dtype=False) on a bf16 base (TRL QLoRA, torchtune)

    @property
    def bytes(self) -> int:
        return 4 if self == AdapterDtype.FP32 else 2


class SavedModule(str, Enum):
    """A root module peft trains whole next to the adapters (LoraConfig modules_to_save): a
    trainable copy beside the frozen original (peft==0.21.2 utils/other.py:632-667)."""

    EMBED_TOKENS = "embed_tokens"
    LM_HEAD = "lm_head"


class ModelDtype(str, Enum):
    BF16 = "bf16"  # 2 bytes (fp16 under --precision fp16: the same size)
    FP32 = "fp32"

    @property
    def bytes(self) -> int:
        return 4 if self == ModelDtype.FP32 else 2


class ActivationOffload(str, Enum):
    NONE = "none"
    CHECKPOINTS = "checkpoints"  # transformers' checkpoint offload: save_on_cpu around each checkpoint
    ALL = "all"  # torchtune/TRL/axolotl OffloadActivations: every saved tensor
    UNSLOTH = "unsloth"  # use_gradient_checkpointing="unsloth": the hidden state per layer


class LigerLayers(str, Enum):
    """Liger's layer kernels (liger-kernel==0.8.5) patched into the decoder layers and the final
    norm: its RMSNorm, its SwiGLU/GeGLU MLP, or both (memory/liger.py). Liger's fused loss is
    --loss liger, a separate knob."""

    NONE = "none"
    RMS_NORM = "rms_norm"  # LigerRMSNorm on every RMSNorm (axolotl liger_rms_norm)
    GLU = "glu"  # LigerSwiGLUMLP / LigerGEGLUMLP (axolotl liger_glu_activation)
    ALL = "all"  # both: the HF Trainer's use_liger_kernel, LLaMA-Factory's enable_liger_kernel

    @property
    def norms(self) -> bool:
        return self in (LigerLayers.RMS_NORM, LigerLayers.ALL)

    @property
    def glu(self) -> bool:
        return self in (LigerLayers.GLU, LigerLayers.ALL)


class Objective(str, Enum):
    """What one step trains on (memory/preference.py)."""

    SFT = "sft"  # one sequence per example, next-token loss
    # TRL's DPOTrainer (trl==1.16.0 trainer/dpo_trainer.py): each example a chosen and a rejected
    # sequence, both rows in one batch, and a no-grad reference forward over them
    DPO = "dpo"
    # TRL's GRPOTrainer (trl==1.16.0 trainer/grpo_trainer.py): completions generated on the GPU (or by
    # vLLM), scored without grad, then a step over prompt + completion rows whose completion tokens
    # alone go through the fused head (memory/grpo.py); axolotl's `rl: grpo` runs trl==1.9.0's, which
    # takes them from the model's logits (memory/grpo_logits.py)
    GRPO = "grpo"
    # A Bradley-Terry reward model: TRL's RewardTrainer (trl==1.16.0 trainer/reward_trainer.py; axolotl's
    # `reward_model: true` runs trl==1.9.0's, the same model class, collator and loss) over
    # AutoModelForSequenceClassification(num_labels=1): chosen and rejected rows in one batch, a score
    # head of one output in place of lm_head, no logits over the vocabulary (memory/reward.py)
    REWARD = "reward"
    # TRL's KTOTrainer (trl==1.16.0 trainer/kto_trainer.py): unpaired completions, each labelled desirable
    # or not, one row each, with B mismatched (prompt, completion) rows for the KL term run without
    # grad by the policy and the reference; the reference forward as DPO's (memory/kto.py)
    KTO = "kto"
    # axolotl's `rl: orpo` and `rl: simpo`: trl==1.9.0's experimental ORPOTrainer and CPOTrainer, each pair's
    # chosen and rejected rows in one batch, no reference model, an NLL over the chosen rows (memory/orpo.py)
    ORPO = "orpo"


class Generation(str, Enum):
    """Where GRPO's completions are generated (GRPOConfig use_vllm, vllm_mode)."""

    TRANSFORMERS = "transformers"  # model.generate on the training GPU (use_vllm=False, the default)
    VLLM_COLOCATE = "vllm-colocate"  # vLLM in the training process, a share of each GPU
    VLLM_SERVER = "vllm-server"  # a vLLM server on other GPUs: nothing generated here


# The stacks that run GRPO and the head each computes its log-probs with: TRL 1.16's fused chunked
# head; axolotl==0.19.0's AxolotlGRPOTrainer, trl==1.9.0's GRPOTrainer, from the model's logits
# (memory/grpo.py)
GRPO_STACK_HEADS = {(Stack.TRL, Loss.TRL_CHUNKED_NLL), (Stack.AXOLOTL, Loss.HF)}
# The stacks that run KTO and the head each takes its log-probs from: TRL 1.16's fused head;
# axolotl==0.19.0's AxolotlKTOTrainer, trl==1.9.0's KTOTrainer, the model's logits (memory/kto.py)
KTO_STACK_HEADS = {(Stack.TRL, Loss.TRL_CHUNKED_NLL), (Stack.AXOLOTL, Loss.HF), (Stack.LLAMAFACTORY, Loss.HF)}
# the GRPO-only fields and their defaults (TrainingSetup._check_grpo)
GRPO_DEFAULTS = {
    "steps_per_generation": None,
    "num_iterations": 1,
    "beta": 0.0,
    "generation": Generation.TRANSFORMERS,
    "vllm_gpu_memory_utilization": 0.3,
}


class Attention(str, Enum):
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH = "flash"  # FlashAttention-2


class Packing(str, Enum):
    NONE = "none"
    PADDING_FREE = "padding-free"  # varlen, no mask (axolotl sample_packing with flash, TRL padding_free)
    POSITION_IDS = "position-ids"  # packed sequences told apart by position_ids


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

    SINGLE = "single"  # one GPU, no wrapper
    DDP = "ddp"  # torch DistributedDataParallel: every GPU holds the whole model
    FSDP1 = "fsdp1"  # torch FullyShardedDataParallel (flat parameters)
    FSDP2 = "fsdp2"  # torch fully_shard (per-parameter DTensor shards)
    DEEPSPEED = "deepspeed"  # DeepSpeed ZeRO-1/2/3


class LoraTargets(str, Enum):
    ALL_LINEAR = "all-linear"
    ATTENTION = "attention"


_OPTIM_FLAG = "--optim"
# transformers 5.25.0 trainer_optimizer.py:398-405: the rank HF gives APOLLO when optim_args names none
APOLLO_DEFAULT_RANK = 128
_LORA_ONLY = (("dora", "--dora"), ("kbit_prep", "--kbit-prep"))


def split_module_names(value: object) -> tuple[str, ...] | None:
    """peft target_modules as a list of names: "q_proj,v_proj" or a sequence; None stays None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    names = tuple(str(n).strip() for n in items)
    if not names or any(not n for n in names):
        raise VramplanError(
            f"a comma-separated list of module names (q_proj,v_proj) or one of "
            f"{', '.join(t.value for t in LoraTargets)}, got {value!r}",
            "--lora-targets",
        )
    return names


def saved_modules(value: object, flag: str = "--modules-to-save") -> tuple[SavedModule, ...]:
    """peft modules_to_save as SavedModules, in their enum order: "embed_tokens,lm_head" or a
    sequence; a dotted name is matched by its last part, as peft matches module names by
    suffix. Other modules (a norm, a classifier head) are not modelled: an error naming flag."""
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    names = {str(getattr(n, "value", n)).strip().rsplit(".", 1)[-1] for n in items}
    allowed = {m.value: m for m in SavedModule}
    unknown = sorted(names - set(allowed))
    if unknown:
        raise VramplanError(
            f"modules trained whole beside the adapters must be among {', '.join(allowed)} "
            f"(comma-separated), got {', '.join(unknown)}",
            flag,
        )
    return tuple(m for m in SavedModule if m.value in names)


# One rule for options a method does not use (issue 17, class 7): giving one is an error
# naming both flags, never silently ignored. field -> the methods that read it.
_ADAPTERS = frozenset({Method.LORA, Method.QLORA})
METHOD_FIELDS: dict[str, frozenset[Method]] = {
    "lora_r": _ADAPTERS,
    "lora_dropout": _ADAPTERS,
    "lora_targets": _ADAPTERS,
    "adapter_dtype": _ADAPTERS,
    "dora": _ADAPTERS,
    "lora_kernels": _ADAPTERS,
    "lora_target_modules": _ADAPTERS,
    "modules_to_save": _ADAPTERS,
    "modules_to_save_dtype": _ADAPTERS,
    "quant": frozenset({Method.QLORA}),
    "quant_storage": frozenset({Method.QLORA}),
    "galore_rank": frozenset({Method.GALORE}),
    "galore_update_proj_gap": frozenset({Method.GALORE}),
    "train_layers": frozenset({Method.FULL}),
    "train_layers_dtype": frozenset({Method.FULL}),
    "fp32_embeddings_norms": frozenset({Method.FULL, Method.GALORE}),
}

# (field, flag, largest value): every count and token number is bounded (vramplan/limits.py)
_BOUNDED = (
    ("batch_size", "--batch-size", MAX_BATCH_SIZE),
    ("seq_len", "--seq-len", MAX_SEQ_LEN),
    ("lora_r", "--lora-r", MAX_RANK),
    ("galore_rank", "--galore-rank", MAX_RANK),
    ("galore_update_proj_gap", "--galore-update-proj-gap", MAX_PROJ_GAP),
    ("apollo_rank", "--apollo-rank", MAX_RANK),
    ("fsdp", "--fsdp", MAX_RANKS),
    ("gradient_accumulation", "--gradient-accumulation", MAX_ACCUMULATION),
    ("nodes", "--nodes", MAX_RANKS),
    ("train_layers", "--train-layers", MAX_LAYERS),
    ("completion_len", "--completion-len", MAX_SEQ_LEN),
    ("steps_per_generation", "--steps-per-generation", MAX_ACCUMULATION),
    ("num_iterations", "--num-iterations", MAX_ACCUMULATION),
)


def flag_of(field: str) -> str:
    return "--" + field.replace("_", "-")


def _method_of(data: dict) -> Method | None:
    try:
        return Method(getattr(data.get("method"), "value", data.get("method") or "full"))
    except ValueError:
        return None  # an unknown method: the field's own validation names it


def check_method_fields(data: dict, explicit: bool = True) -> None:
    """An option the chosen method does not read is an error naming both flags.

    Called where the user's own values enter (the command line's setup_fields, the public
    Python functions), on what was given and before a --stack bundle fills anything. Not in
    TrainingSetup's validation: a setup's dump carries every field (tests/data/cpu/trace.jsonl
    rows hold lora_dropout 0.0 for full fine-tunes), and vramplan's own builders (the strategy
    comparison, plan, plot) share fields across methods. explicit=False: a value equal to the
    field's default counts as not given."""
    _check_optim_fields(data, explicit)
    method = _method_of(data)
    if method is None:
        return
    for field, methods in METHOD_FIELDS.items():
        value = data.get(field)
        if value is None or value in ((), "", []) or method in methods:
            continue
        default = TrainingSetup.model_fields[field].default
        if explicit or getattr(value, "value", value) != getattr(default, "value", default):
            users = " or ".join(m.value for m in Method if m in methods)
            raise VramplanError(
                f"is used only by --method {users}; --method {method.value} does not read it "
                "(remove the option or change --method)",
                flag_of(field),
            )


def _check_optim_fields(data: dict, explicit: bool) -> None:
    """--apollo-rank is read only by the APOLLO optimizers (the same rule as check_method_fields)."""
    rank, optim = data.get("apollo_rank"), data.get("optim")
    if rank is None or (not explicit and rank == APOLLO_DEFAULT_RANK):
        return
    if optim is not None and _optim_family(optim) is None:
        return  # an unknown optimizer: the field's own validation names it
    if _optim_family(optim) != OptimFamily.APOLLO_ADAMW:
        raise VramplanError(
            "is used only by --optim apollo_adamw or apollo_adamw_layerwise (remove the option or change --optim)",
            "--apollo-rank",
        )


def fields_for_method(fields: dict) -> dict:
    """``fields`` less the ones its method does not read: for setups built inside vramplan
    (the strategy comparison, plan, plot, verify's rebuilds) from shared options, where only
    what the user gave explicitly should meet check_method_fields."""
    method = _method_of(fields)
    if method is None:
        return dict(fields)
    out = {k: v for k, v in fields.items() if method in METHOD_FIELDS.get(k, (method,))}
    if _optim_family(out.get("optim")) != OptimFamily.APOLLO_ADAMW:
        out.pop("apollo_rank", None)
    return out


def _optim_family(optim: object) -> OptimFamily | None:
    """The family of an optimizer given as an enum or its name; None when absent or unknown."""
    try:
        return Optim(getattr(optim, "value", optim)).traits.family if optim is not None else None
    except ValueError:
        return None


def _as_int(value: object) -> object:
    """'4' and 4.0 are 4 (pydantic's lax int); anything else is left for check_int to refuse."""
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit() and len(value) < 40:
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_IN_BACKWARD_FLAG = "--optimizer-in-backward"


class TrainingSetup(BaseModel):
    """One training configuration, per micro-batch on one GPU."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field(
        Method.FULL,
        description="what trains: every weight, LoRA adapters, a quantized (4- or 8-bit) base + LoRA, or GaLore",
    )
    precision: Precision = Field(
        Precision.BF16, description="bf16 weights and states, or fp32 masters with bf16 autocast"
    )
    # None (or absent) on input is filled in by _defaults from the method
    optim: Optim = Field(
        Optim.ADAMW_TORCH,
        description="optimizer (transformers TrainingArguments.optim name, muon or adam_mini); default "
        "adamw_torch, galore_adamw for galore",
    )
    batch_size: int = Field(
        1, description="micro-batch size per GPU (examples; under --objective dpo, preference pairs: two rows each)"
    )
    seq_len: int = Field(2048, description="tokens per sequence")
    lora_r: int = Field(16, description="LoRA rank")
    lora_dropout: float = Field(0.05, description="LoRA dropout probability")
    lora_targets: LoraTargets = Field(LoraTargets.ALL_LINEAR, description="which Linears get adapters")
    quant: Quant | None = Field(
        None, description="quantized format of the frozen base (qlora only): 4-bit nf4 / hqq4, or LLM.int8; default nf4"
    )
    quant_storage: QuantStorage | None = Field(
        None, description="bitsandbytes bnb_4bit_quant_storage (qlora nf4); default uint8"
    )
    galore_rank: int = Field(128, description="GaLore projection rank")
    galore_update_proj_gap: int = Field(200, description="steps between GaLore SVD refreshes")
    apollo_rank: int = Field(
        APOLLO_DEFAULT_RANK,
        description="APOLLO projection rank (--optim apollo_adamw[_layerwise]); default 128, transformers' "
        "(LLaMA-Factory's apollo_rank: 16)",
    )
    gradient_checkpointing: bool = Field(False, description="recompute each decoder layer in backward")
    fsdp: int = Field(1, description="FSDP world size (1 = no sharding; several --gpus without it: DDP)")
    cpu_offload: bool = Field(
        False,
        description="FSDP CPU offload (FSDP2 CPUOffloadPolicy, FSDP1 CPUOffload): shards, "
        "grads and optimizer on the CPU; also on one GPU",
    )
    # ---- the stack knobs (issue 13): each default is the reference step's
    stack: Stack = Field(
        Stack.PLAIN, description="a framework's defaults for every knob below (explicit flags override)"
    )
    loss: Loss = Field(
        Loss.HF,
        description="the loss over the vocabulary: hf (the model's own on full logits), "
        "chunked (torchtune's 8 output chunks), torchtune-linear-ce (torchtune's LinearCrossEntropyLoss, "
        "the output layer inside the loss), trl-chunked-nll (TRL 1.16's fused chunked LM head), "
        "liger / cce / unsloth (fused kernels, CUDA only)",
    )
    fp32_outputs: bool = Field(
        False, description="accelerate's bf16 autocast converts the model's outputs (logits) to fp32"
    )
    adapter_dtype: AdapterDtype | None = Field(
        None, description="LoRA adapter dtype; default fp32 (peft's autocast_adapter_dtype)"
    )
    kbit_prep: bool = Field(
        False, description="peft prepare_model_for_kbit_training: non-quantized parameters upcast to fp32"
    )
    dora: bool = Field(False, description="DoRA (peft use_dora): magnitude vector and a weight norm per adapted Linear")
    lora_kernels: bool = Field(
        False,
        description="axolotl's fused LoRA autograd Functions (lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel) "
        "in place of peft's LoRA Linears; axolotl turns them on for LoRA/QLoRA by default",
    )
    liger_layers: LigerLayers = Field(
        LigerLayers.NONE,
        description="Liger's layer kernels: rms_norm (LigerRMSNorm), glu (its SwiGLU/GeGLU MLP), all (both: "
        "the HF Trainer's use_liger_kernel, LLaMA-Factory's enable_liger_kernel); RoPE's kernel changes no "
        "memory. Its fused loss is --loss liger",
    )
    lora_target_modules: tuple[str, ...] | None = Field(
        None, description="explicit module names to adapt (peft target_modules)"
    )
    modules_to_save: tuple[SavedModule, ...] = Field(
        (),
        description="root modules peft trains whole beside the adapters (LoraConfig modules_to_save): "
        "embed_tokens, lm_head",
    )
    modules_to_save_dtype: AdapterDtype | None = Field(
        None,
        description="dtype of the modules_to_save copies where the framework casts every trainable "
        "parameter (LLaMA-Factory: fp32 unless pure_bf16; TRL on a quantized base: bf16); default the "
        "original module's (peft copies it as it is)",
    )
    train_layers: int | None = Field(
        None,
        description="train only the last N decoder layers, whole (LLaMA-Factory finetuning_type freeze, "
        "freeze_trainable_layers); the embedding, lm_head, final norm and the other layers stay frozen",
    )
    train_layers_dtype: AdapterDtype | None = Field(
        None,
        description="dtype the trained layers are cast to over a model loaded in --model-dtype "
        "(LLaMA-Factory: fp32 unless pure_bf16); default the model's",
    )
    fp32_embeddings_norms: bool = Field(
        False,
        description="embed_tokens, lm_head and every norm held in fp32 over a bf16/fp16 model, the rest in the "
        "model's dtype (axolotl's full fine-tune outside FSDP and DeepSpeed with sdpa/eager attention)",
    )
    optimizer_in_backward: bool = Field(False, description="step each parameter's optimizer in its grad hook")
    gradient_accumulation: int = Field(1, description="micro-batches per optimizer step")
    activation_offload: ActivationOffload = Field(
        ActivationOffload.NONE, description="activations moved to pinned host RAM"
    )
    checkpoint_reentrant: bool = Field(
        False, description="reentrant (torch.utils.checkpoint use_reentrant=True) recompute"
    )
    attention: Attention | None = Field(
        None, description="attention kernel; default the model's (sdpa unless its config says eager)"
    )
    packing: Packing = Field(Packing.NONE, description="sequence packing")
    model_dtype: ModelDtype | None = Field(
        None, description="dtype the weights are loaded in; default fp32 under mixed, else bf16"
    )
    keep_logits: bool = Field(
        False,
        description="the training loop keeps the model's output (its logits) referenced through backward "
        "and the optimizer step (Answer.AI fsdp_qlora train.py); the reference step keeps only the loss",
    )
    loss_only_loop: bool = Field(
        False,
        description="the loop keeps only the loss, its output (the logits) dropped before backward, as "
        "transformers' Trainer and `vramplan verify` run it; the reference step's loop (`out = model(...)`, "
        "`out.loss.backward()`) still holds the output there (memory/loss.held_output_bytes). Not a flag: "
        "how verify's own measurements are estimated",
    )
    compile: bool = Field(
        False,
        description="torch.compile of each decoder layer and of the loss, as torchtune's `compile: True` "
        "(training.compile_model, compile_loss); the compiled chunked cross-entropy saves its bf16 chunks, "
        "not an fp32 log-softmax",
    )
    objective: Objective = Field(
        Objective.SFT,
        description="sft (one sequence per example); dpo: TRL 1.16's DPOTrainer (--stack trl; axolotl's and "
        "LLaMA-Factory's too), each pair's chosen and rejected rows in one batch, then a no-grad reference forward: "
        "peft's adapters disabled, or a frozen copy of the model for a full fine-tune; grpo: TRL 1.16's GRPOTrainer "
        "(--stack trl; axolotl's runs trl 1.9's, log-probs from the logits): completions generated (--generation), "
        "scored without grad, then the step over prompt + completion rows; reward: TRL's RewardTrainer (--stack "
        "trl or axolotl), a sequence-classification model (a one-output score head, no lm_head) over each pair's "
        "chosen and rejected rows; kto: TRL 1.16's KTOTrainer (--stack trl; axolotl's on trl 1.9, LLaMA-Factory's "
        "own), one row per example, the KL term's "
        "mismatched rows scored without grad, the reference as DPO's; orpo: axolotl's rl: orpo / rl: simpo "
        "(--stack axolotl), pairs without a reference, an NLL over the chosen rows",
    )
    precompute_ref_log_probs: bool = Field(
        False,
        description="--objective dpo or kto: the reference log-probs computed once before training "
        "(DPOConfig/KTOConfig precompute_ref_log_probs): no reference forward in the step and no reference copy kept",
    )
    dpo_use_weighting: bool = Field(
        False,
        description="--objective dpo: WPO weights (DPOConfig use_weighting; axolotl's dpo_use_weighting): TRL 1.16's "
        "fused head returns log_sum_sq_probs too; trl 1.9.0 (axolotl) takes two logsumexps over the fp32 logits",
    )
    chosen_nll: bool = Field(
        True,
        description="--objective orpo: the NLL over the chosen rows (ORPO's always; SimPO's CPOTrainer when "
        "cpo_alpha > 0, its default): a copy of the chosen rows' fp32 logits and their log-softmax; "
        "--no-chosen-nll for cpo_alpha 0",
    )
    kto_kl: bool = Field(
        True,
        description="--objective kto: KTOConfig loss_type kto (the default) estimates the KL term from B "
        "mismatched (prompt, completion) rows, a no-grad forward of the policy and of the reference each; "
        "--no-kto-kl for loss_type apo_zero_unpaired, which has none",
    )
    completion_len: int = Field(
        512,
        description="--objective grpo: the completion's length in tokens (GRPOConfig max_completion_length; "
        "every completion counted at full length, an upper end); --seq-len is prompt + completion",
    )
    steps_per_generation: int | None = Field(
        None,
        description="--objective grpo: micro-batches generated at once (GRPOConfig steps_per_generation; "
        "default: --gradient-accumulation)",
    )
    num_iterations: int = Field(1, description="--objective grpo: optimisation passes over each generation")
    beta: float = Field(
        0.0,
        description="--objective grpo: the KL coefficient; above 0 the reference's log-probs are computed "
        "(peft: adapters disabled; full: a frozen copy of the model)",
    )
    generation: Generation = Field(
        Generation.TRANSFORMERS,
        description="--objective grpo: transformers (model.generate on this GPU), vllm-colocate (vLLM in the "
        "training process) or vllm-server (vLLM on other GPUs)",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, description="--generation vllm-colocate: the share of each GPU's memory vLLM takes"
    )
    # ---- the engines (issue 15)
    fsdp_version: int = Field(2, description="FSDP1 (FullyShardedDataParallel) or FSDP2 (fully_shard)")
    fsdp_sharding: FsdpSharding = Field(FsdpSharding.FULL, description="FSDP sharding strategy")
    fsdp_embedding_units: bool = Field(
        False,
        description="FSDP2: the input embedding and lm_head each an FSDP unit of their own, gathered only "
        "around their own forward and backward (torchtune's custom_sharded_layers: ['tok_embeddings', 'output'])",
    )
    deepspeed: DeepSpeedStage | None = Field(None, description="DeepSpeed ZeRO stage")
    offload_optimizer: bool = Field(False, description="DeepSpeed offload_optimizer to the CPU")
    offload_params: bool = Field(False, description="DeepSpeed ZeRO-3 offload_param to the CPU")
    nodes: int = Field(1, description="nodes the GPUs are spread over")
    data_parallel: int = Field(
        1,
        description="GPUs in the data-parallel group of DDP or DeepSpeed (estimate sets it "
        "from --gpus: every GPU a rank)",
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for field, flag, hi in _BOUNDED:
            if data.get(field) is not None:
                data[field] = check_int(_as_int(data[field]), flag, hi)
        method = str(getattr(data.get("method"), "value", data.get("method") or "full"))
        if data.get("optim") is None:
            data["optim"] = "galore_adamw" if method == "galore" else "adamw_torch"
        if method == "qlora" and data.get("quant") is None:
            data["quant"] = "nf4"
        if data.get("lora_target_modules") is not None:
            data["lora_target_modules"] = split_module_names(data["lora_target_modules"])
        data["modules_to_save"] = saved_modules(data.get("modules_to_save"))
        return data

    @model_validator(mode="after")
    def _check(self) -> TrainingSetup:
        if self.tokens > MAX_TOKENS:
            raise VramplanError(
                f"{self.rows:,} x {self.seq_len:,} = {self.tokens:,} tokens per micro-batch is "
                f"above the limit of {MAX_TOKENS:,} (2^24)",
                "--batch-size",
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise VramplanError(f"must be in [0, 1), got {self.lora_dropout}", "--lora-dropout")
        if self.quant is not None and self.method != Method.QLORA:
            raise VramplanError("only applies to --method qlora", "--quant")
        if (
            self.activation_offload in (ActivationOffload.CHECKPOINTS, ActivationOffload.UNSLOTH)
            and not self.gradient_checkpointing
        ):
            # transformers' offload is an option of activation checkpointing (save_on_cpu around each
            # checkpoint); Unsloth's "unsloth" mode is its checkpointing
            raise VramplanError(
                f"{self.activation_offload.value} offloads checkpointed layers' inputs: it needs "
                "--gradient-checkpointing",
                "--activation-offload",
            )
        self._check_optim()
        self._check_loss()
        self._check_adapters_and_dtypes()
        self._check_engines()
        self._check_int8()
        self._check_train_layers()
        self._check_fp32_embeddings_norms()
        self._check_lora_kernels()
        self._check_liger_layers()
        self._check_objective()
        return self

    def _check_objective(self) -> None:
        """--objective dpo is TRL 1.16's DPOTrainer (memory/preference.py), its log-probs from
        TRL's fused chunked head."""
        if self.objective not in (Objective.DPO, Objective.KTO) and self.precompute_ref_log_probs:
            raise VramplanError("only applies to --objective dpo or kto", "--precompute-ref-log-probs")
        self._check_grpo()
        self._check_reward()
        self._check_kto()
        self._check_orpo()
        if self.objective != Objective.DPO:
            if self.dpo_use_weighting:
                raise VramplanError("only applies to --objective dpo", "--dpo-use-weighting")
            return
        if self.dpo_use_weighting and self.stack == Stack.LLAMAFACTORY:
            raise VramplanError("LLaMA-Factory's DPO trainer has no WPO weighting", "--dpo-use-weighting")
        if self.stack not in DPO_STACKS:
            allowed = ", ".join(s.value for s in DPO_STACKS)
            raise VramplanError(
                f"--objective dpo is modelled as TRL's DPOTrainer: use --stack {allowed}, not {self.stack.value}",
                "--objective",
            )
        if self.loss.value != DPO_STACKS[self.stack]:
            raise VramplanError(
                f"the DPO trainer of --stack {self.stack.value} takes its log-probs from "
                + (
                    "TRL's fused chunked LM head (trl==1.16.0 dpo_trainer.py:943-947)"
                    if self.stack == Stack.TRL
                    else "the model's full logits (trl==1.9.0 dpo_trainer.py:1340-1347)"
                )
                + f": --loss {DPO_STACKS[self.stack]}, not {self.loss.value}",
                "--loss",
            )
        if self.stack in (Stack.AXOLOTL, Stack.LLAMAFACTORY) and not self.fp32_outputs:
            raise VramplanError(
                "axolotl's DPO step (trl==1.9.0) is modelled with accelerate's fp32 logits (bf16 mixed "
                "precision; under DeepSpeed or without autocast they stay bf16, another path): --fp32-outputs",
                "--objective",
            )
        if self.packing != Packing.NONE:
            raise VramplanError(
                "TRL's DPOTrainer pads each batch (padding_free falls back to padding, trl==1.16.0 "
                "dpo_trainer.py:133-140): --packing none",
                "--packing",
            )

    def _check_orpo(self) -> None:
        """--objective orpo is axolotl's ORPO/SimPO step (memory/orpo.py): trl 1.9.0's logits, padded rows."""
        if self.objective != Objective.ORPO:
            if not self.chosen_nll:
                raise VramplanError("only applies to --objective orpo", "--no-chosen-nll")
            return
        if self.stack != Stack.AXOLOTL or self.loss != Loss.HF or not self.fp32_outputs:
            raise VramplanError(
                "--objective orpo is modelled as axolotl's rl: orpo / rl: simpo (trl==1.9.0's ORPOTrainer and "
                "CPOTrainer, the model's fp32 logits): --stack axolotl --loss hf --fp32-outputs (LLaMA-Factory's "
                "pref_loss orpo/simpo is --objective dpo --precompute-ref-log-probs)",
                "--objective",
            )
        if self.packing != Packing.NONE:
            raise VramplanError("ORPO and CPO pad each pair's rows: --packing none", "--packing")

    def _check_kto(self) -> None:
        """--objective kto is TRL 1.16's KTOTrainer (memory/kto.py): its fused head, padded rows, and
        with the KL term more than one row a micro-batch (kto_trainer.py:844-847 raises otherwise)."""
        if self.objective != Objective.KTO:
            if not self.kto_kl:
                raise VramplanError("only applies to --objective kto", "--no-kto-kl")
            return
        if (self.stack, self.loss) not in KTO_STACK_HEADS:
            raise VramplanError(
                "--objective kto is modelled as TRL's KTOTrainer: --stack trl --loss trl-chunked-nll (trl==1.16.0, "
                "its fused chunked head), --stack axolotl --loss hf (trl==1.9.0, the model's logits) or --stack "
                "llamafactory --loss hf (its CustomKTOTrainer), not "
                f"--stack {self.stack.value} --loss {self.loss.value}",
                "--objective",
            )
        if self.stack in (Stack.AXOLOTL, Stack.LLAMAFACTORY) and not self.fp32_outputs:
            raise VramplanError(
                f"the KTO step of --stack {self.stack.value} is modelled with accelerate's fp32 logits (bf16 mixed "
                "precision): --fp32-outputs",
                "--objective",
            )
        if self.stack == Stack.LLAMAFACTORY and not self.kto_kl:
            raise VramplanError(
                "LLaMA-Factory's KTO always scores its KL rows (data/processor/feedback.py)", "--no-kto-kl"
            )
        if self.packing != Packing.NONE:
            raise VramplanError("KTOTrainer pads each batch: --packing none", "--packing")
        if self.kto_kl and self.batch_size < 2 and self.stack != Stack.LLAMAFACTORY:  # LF builds its own KL rows
            raise VramplanError(
                "KTO's KL term pairs each prompt with another row's completion: at least 2 rows a micro-batch "
                "(or --no-kto-kl for loss_type apo_zero_unpaired)",
                "--batch-size",
            )

    def _check_reward(self) -> None:
        """--objective reward is TRL's RewardTrainer (memory/reward.py): no LM loss, padded rows."""
        if self.objective != Objective.REWARD:
            return
        if self.stack not in REWARD_STACKS:
            allowed = " or ".join(s.value for s in REWARD_STACKS)
            raise VramplanError(
                f"--objective reward is modelled as TRL's RewardTrainer and LLaMA-Factory's stage rm: use --stack "
                f"{allowed}, not {self.stack.value}",
                "--objective",
            )
        if self.loss != Loss.HF:
            raise VramplanError(
                "a reward model has no LM loss (its score head has one output, no logits over the vocabulary): "
                f"--loss hf, not {self.loss.value}",
                "--loss",
            )
        if self.packing != Packing.NONE:
            raise VramplanError("RewardTrainer's collator pads each pair's rows: --packing none", "--packing")
        if SavedModule.LM_HEAD in self.modules_to_save:
            raise VramplanError("a reward model has no lm_head (its score head trains anyway)", "--modules-to-save")

    def _check_grpo(self) -> None:
        """--objective grpo is TRL 1.16's GRPOTrainer (memory/grpo.py): its fused head, padded rows."""
        if self.objective != Objective.GRPO:
            for field, default in GRPO_DEFAULTS.items():
                if getattr(self, field) != default:
                    raise VramplanError("only applies to --objective grpo", flag_of(field))
            return
        if (self.stack, self.loss) not in GRPO_STACK_HEADS:
            raise VramplanError(
                "--objective grpo is modelled as TRL's GRPOTrainer: --stack trl --loss trl-chunked-nll (trl==1.16.0, "
                "its fused chunked head) or --stack axolotl --loss hf (trl==1.9.0, the model's logits), not "
                f"--stack {self.stack.value} --loss {self.loss.value}",
                "--objective",
            )
        if not 1 <= self.completion_len < self.seq_len:
            raise VramplanError(
                f"must be below --seq-len {self.seq_len:,} (prompt + completion), got {self.completion_len:,}",
                "--completion-len",
            )
        if not 0.0 <= self.beta < 1e6:
            raise VramplanError(f"must be 0 or more, got {self.beta}", "--beta")
        if not 0.0 < self.vllm_gpu_memory_utilization <= 1.0:
            raise VramplanError(
                f"must be in (0, 1], got {self.vllm_gpu_memory_utilization}", "--vllm-gpu-memory-utilization"
            )
        if self.packing != Packing.NONE:
            raise VramplanError("GRPOTrainer pads its prompt + completion rows: --packing none", "--packing")
        if self.engine != Engine.SINGLE and self.engine != Engine.DDP:
            raise VramplanError(
                "--objective grpo is modelled on one GPU or DDP (FSDP and DeepSpeed gather the weights for "
                "generation: not modelled)",
                "--objective",
            )

    def _check_liger_layers(self) -> None:
        """--liger-layers (memory/liger.py): Unsloth patches its own RMSNorm and MLP kernels, so
        the two are not combined."""
        if self.liger_layers != LigerLayers.NONE and self.stack == Stack.UNSLOTH:
            raise VramplanError(
                "--liger-layers with --stack unsloth is not modelled (Unsloth's own kernels)", "--stack"
            )

    def _check_lora_kernels(self) -> None:
        """--lora-kernels (memory/lora_kernels.py): axolotl refuses them on an 8-bit LoRA base
        (axolotl==0.19.0 utils/schemas/validation.py:665-677); DoRA through them, fp16 autocast
        and an fp32 model are not modelled; Unsloth fuses its own layers."""
        if not self.lora_kernels:
            return
        refused = (
            (self.quant == Quant.INT8, "--quant", "an 8-bit base (axolotl refuses them there)"),
            (self.dora, "--dora", "DoRA"),
            (self.stack == Stack.UNSLOTH, "--stack", "Unsloth (its own fused layers)"),
            (self.weight_dtype != ModelDtype.BF16, "--model-dtype", "weights other than bf16"),
            (self.precision == Precision.FP16, "--precision", "fp16"),
        )
        for bad, flag, what in refused:
            if bad:
                raise VramplanError(f"--lora-kernels with {what} is not modelled", flag)

    def _check_train_layers(self) -> None:
        """--train-layers (a frozen prefix of decoder layers, memory/freeze.py): what is modelled
        with it. The engines that shard or partition a half-frozen model, the offload and compile
        paths and the in-backward optimizers are not."""
        if self.train_layers is None:
            if self.train_layers_dtype is not None:
                raise VramplanError("only applies with --train-layers", "--train-layers-dtype")
            return
        if self.train_layers_dtype == AdapterDtype.FP32 and not self.autocast and self.weight_dtype != ModelDtype.FP32:
            raise VramplanError(
                "fp32 trained layers over bf16 weights need autocast (--precision mixed): without it "
                "their matmuls would mix dtypes",
                "--train-layers-dtype",
            )
        if self.train_layers < 1:
            raise VramplanError(f"must be a positive number of layers, got {self.train_layers}", "--train-layers")
        refused = (
            (self.method != Method.FULL, "--method", f"--method {self.method.value} (only full trains layers whole)"),
            (self.sharded or self.cpu_offload, "--fsdp", "FSDP over a partly frozen model"),
            (self.deepspeed is not None, "--deepspeed", "DeepSpeed over a partly frozen model"),
            (self.activation_offload != ActivationOffload.NONE, "--activation-offload", "activation offload"),
            (self.compile, "--compile", "torch.compile"),
            (self.steps_in_backward, "--optim", "an optimizer stepped inside backward"),
            (self.stack == Stack.UNSLOTH, "--stack", "Unsloth"),
            (self.precision == Precision.FP16, "--precision", "fp16 with its GradScaler"),
        )
        for bad, flag, what in refused:
            if bad:
                raise VramplanError(f"--train-layers with {what} is not modelled", flag)

    def _check_fp32_embeddings_norms(self) -> None:
        """--fp32-embeddings-norms (axolotl's upcast, memory/precision.py upcast_roots): modelled
        under autocast on one GPU or DDP. Without autocast the fp32 stream would meet bf16
        matmuls; FSDP and DeepSpeed are where axolotl does not keep it (DeepSpeed's bf16 engine
        casts the whole module back, deepspeed==0.18.2 runtime/engine.py:1310-1313)."""
        if not self.fp32_embeddings_norms:
            return
        refused = (
            (
                self.method not in (Method.FULL, Method.GALORE),
                "--method",
                f"--method {self.method.value} (adapters: cast back)",
            ),
            (self.sharded or self.cpu_offload, "--fsdp", "FSDP (axolotl casts them back under FSDP)"),
            (self.deepspeed is not None, "--deepspeed", "DeepSpeed (its bf16 engine casts the module back)"),
            (not self.autocast, "--precision", "no autocast (fp32 norms would feed bf16 matmuls)"),
            (self.train_layers is not None, "--train-layers", "a frozen prefix"),
            (self.stack == Stack.UNSLOTH, "--stack", "Unsloth"),
        )
        for bad, flag, what in refused:
            if bad:
                raise VramplanError(f"--fp32-embeddings-norms with {what} is not modelled", flag)

    def _check_int8(self) -> None:
        """What vramplan does not model over an LLM.int8 base (memory/quantization.py)."""
        if self.quant != Quant.INT8:
            return
        refused = (
            (self.sharded, "--fsdp", "FSDP sharding (bitsandbytes' FSDP path shards 4-bit weights stored as bf16)"),
            (self.stack == Stack.UNSLOTH, "--stack", "Unsloth's 8-bit loading"),
            (self.activation_offload != ActivationOffload.NONE, "--activation-offload", "activation offload"),
            (self.dora, "--dora", "DoRA"),
            (self.compile, "--compile", "torch.compile"),
            (self.quant_storage is not None, "--quant-storage", "a 4-bit storage dtype"),
        )
        for bad, flag, what in refused:
            if bad:
                raise VramplanError(f"--quant int8 with {what} is not modelled; use --quant nf4", flag)

    def _check_loss(self) -> None:
        """Fused losses the kernel itself refuses (or would silently get wrong)."""
        fused_head = (Loss.TRL_CHUNKED_NLL, Loss.LIGER, Loss.CCE)
        if self.loss in fused_head and "lm_head" in (self.lora_target_modules or ()):
            # trl==1.16.0 sft_trainer.py:1066-1073 raises; Liger and CCE read lm_head.weight (the base
            # weight) and would bypass the adapter
            raise VramplanError(
                f"{self.loss.value} cannot train a LoRA adapter on lm_head (--lora-targets "
                "lm_head): the fused head reads lm_head.weight; train it whole or use --loss hf",
                "--loss",
            )
        fp32 = self.weight_dtype == ModelDtype.FP32 and not (self.precision == Precision.MIXED and self.fsdp > 1)
        if self.loss == Loss.CCE and fp32:
            # cut_cross_entropy/cce_backward.py asserts bf16/fp16 inputs; axolotl's check_dtype_is_half
            raise VramplanError(
                "cce needs bf16 or fp16 weights and hidden states (Cut Cross-Entropy asserts "
                "it), but --model-dtype fp32 / --precision mixed computes the head in fp32",
                "--loss",
            )

    def _check_adapters_and_dtypes(self) -> None:
        """The adapter and precision knobs (docs/memory-model.md, "Adapter dtype" .. "fp16")."""
        for name, flag in _LORA_ONLY:
            if getattr(self, name) and not self.lora_like:
                raise VramplanError(f"only applies to --method lora or qlora, not --method {self.method.value}", flag)
        if self.precision == Precision.FP16:
            # torch/amp/grad_scaler.py (torch 2.13) _unscale_grads_(allow_fp16=False): every
            # trainable parameter must be fp32 under a GradScaler
            if not self.lora_like and self.model_dtype == ModelDtype.BF16:
                raise VramplanError(
                    "--model-dtype bf16 conflicts with --precision fp16: the GradScaler needs fp32 "
                    "trainable weights (load the model in fp32)",
                    "--precision",
                )
            if self.steps_in_backward:
                raise VramplanError(
                    "--precision fp16 cannot step optimizers inside backward: the GradScaler "
                    "unscales every grad before one optimizer step",
                    _OPTIM_FLAG,
                )
            if self.lora_like and self.adapter_dtype == AdapterDtype.BF16:
                raise VramplanError(
                    "--adapter-dtype bf16 conflicts with --precision fp16: the GradScaler needs fp32 "
                    "trainable adapters",
                    "--precision",
                )
        if self.precision == Precision.BF16 and self.weight_dtype == ModelDtype.FP32:
            raise VramplanError(
                "fp32 with --precision bf16 trains entirely in fp32 (no autocast), which vramplan "
                "does not model; use --precision mixed",
                "--model-dtype",
            )
        if self.kbit_prep and not self.mixed_precision:
            raise VramplanError(
                "with --precision bf16 runs the whole step in fp32 (the upcast embedding "
                "makes every activation fp32), which vramplan does not model; use --precision mixed "
                "(the HF Trainer's bf16=True) or fp16",
                "--kbit-prep",
            )

    def _check_optim(self) -> None:
        """--optim against the method, FSDP and gradient accumulation (one line naming both flags)."""
        traits = self.optim.traits
        if traits.refused:
            raise VramplanError(
                f"{self.optim.value} is {traits.refused}, not a CUDA optimizer; vramplan models CUDA GPUs", _OPTIM_FLAG
            )
        if self.optim.is_galore != (self.method == Method.GALORE):
            allowed = (
                "galore_adamw[_8bit][_layerwise], galore_adafactor[_layerwise]"
                if self.method == Method.GALORE
                else "any --optim not named galore_*"
            )
            raise VramplanError(
                f"{self.optim.value} does not go with --method {self.method.value}; use {allowed}", _OPTIM_FLAG
            )
        self._check_apollo_and_adam_mini()
        if self.optim.layerwise and (self.fsdp > 1 or self.cpu_offload or self.deepspeed is not None):
            raise VramplanError(
                f"{self.optim.value} (layer-wise) cannot be combined with --fsdp, --cpu-offload or "
                "--deepspeed (per-parameter hooks on sharded grads)",
                _OPTIM_FLAG,
            )
        if self.gradient_accumulation < 1:
            raise VramplanError(
                f"must be a positive integer, got {self.gradient_accumulation}", "--gradient-accumulation"
            )
        if self.gradient_accumulation > 1 and (self.optim.layerwise or self.optimizer_in_backward):
            # each parameter is stepped and its grad freed in its hook: nothing is left to accumulate
            # (transformers 5.25.0 trainer_optimizer.py:165 raises for *_layerwise likewise;
            # torchtune 0.6.1 recipes/full_finetune_single_device.py:147-157 refuses optimizer_in_bwd with it)
            flag, what = (
                (_IN_BACKWARD_FLAG, "")
                if self.optimizer_in_backward
                else (_OPTIM_FLAG, f"{self.optim.value} (layer-wise) ")
            )
            raise VramplanError(
                f"{what}cannot be combined with --gradient-accumulation {self.gradient_accumulation}: "
                "each gradient is freed by its optimizer hook, nothing is left to accumulate; use "
                "--gradient-accumulation 1",
                flag,
            )

    def _check_apollo_and_adam_mini(self) -> None:
        """APOLLO trains whole weights. Adam-mini partitions by parameter name and shape
        (adam-mini 1.1.1 adam_mini.py:114-128, 251-323): q/k weights viewed as heads, which LoRA
        factors do not divide into; ZeRO's flat partitions and per-parameter hooks have no names."""
        family = self.optim.traits.family
        if family == OptimFamily.APOLLO_ADAMW and self.method != Method.FULL:
            # LLaMA-Factory refuses APOLLO with LoRA (hparams/finetuning_args.py); transformers would
            # project peft's frozen base weights and adapter matrices alike, which is not modelled
            raise VramplanError(
                f"{self.optim.value} goes with --method full only, not {self.method.value} (APOLLO projects "
                "whole weights; over LoRA adapters it is not modelled)",
                _OPTIM_FLAG,
            )
        if family != OptimFamily.ADAM_MINI:
            return
        if self.method != Method.FULL:
            raise VramplanError(
                f"adam_mini goes with --method full only, not {self.method.value} (its q/k blocks are "
                "viewed as attention heads; LoRA factors do not divide into heads)",
                _OPTIM_FLAG,
            )
        if self.deepspeed is not None or self.optimizer_in_backward:
            raise VramplanError(
                "adam_mini with --deepspeed or --optimizer-in-backward is not modelled (it partitions "
                "the model's named parameters; ZeRO and per-parameter hooks hand it unnamed tensors)",
                _OPTIM_FLAG,
            )

    @property
    def steps_in_backward(self) -> bool:
        """Each parameter is stepped inside backward as soon as its grad is accumulated: the
        layer-wise and LOMO optimizers by construction, any optimizer with --optimizer-in-backward."""
        return self.optimizer_in_backward or self.optim.traits.in_backward

    def _check_engines(self) -> None:
        """The engine flags that exclude each other (docs/memory-model.md, "Engines")."""
        for flag, value in (("--nodes", self.nodes), ("--data-parallel", self.data_parallel)):
            if value < 1:
                raise VramplanError(f"must be a positive integer, got {value}", flag)
        if self.fsdp_version not in (1, 2):
            raise VramplanError(f"must be 1 or 2, got {self.fsdp_version}", "--fsdp-version")
        if self.deepspeed is not None and (self.fsdp > 1 or self.cpu_offload):
            raise VramplanError(
                "--deepspeed cannot be combined with --fsdp/--cpu-offload (one engine shards the "
                "model; DeepSpeed's offload is --offload-optimizer/--offload-params)",
                "--deepspeed",
            )
        if self.deepspeed == DeepSpeedStage.ZERO3 and self.method == Method.QLORA:
            raise VramplanError(
                "--deepspeed zero3 with --method qlora is not modelled (4-bit models are not loaded "
                "under zero.Init); use zero2 or --fsdp",
                "--deepspeed",
            )
        if self.deepspeed is not None and self.method == Method.GALORE:
            raise VramplanError(
                "--deepspeed with --method galore is not modelled (GaLore projects whole "
                "parameters, ZeRO hands the optimizer flat partitions)",
                "--deepspeed",
            )
        if self.offload_optimizer and self.deepspeed is None:
            raise VramplanError(
                "--offload-optimizer needs --deepspeed (FSDP's offload is --cpu-offload)", "--offload-optimizer"
            )
        if self.offload_params and self.deepspeed != DeepSpeedStage.ZERO3:
            raise VramplanError(
                "--offload-params needs --deepspeed zero3 (ZeRO-1/2 keep every parameter on the GPU)",
                "--offload-params",
            )
        if self.fsdp_sharding == FsdpSharding.HYBRID:
            if self.nodes < 2:
                raise VramplanError(
                    "--fsdp-sharding hybrid needs --nodes 2 or more (it shards inside a node and "
                    "replicates across nodes)",
                    "--fsdp-sharding",
                )
            if self.fsdp % self.nodes:
                raise VramplanError(
                    f"--fsdp {self.fsdp} is not a multiple of --nodes {self.nodes} "
                    "(hybrid sharding puts the same number of GPUs on each node)",
                    "--fsdp-sharding",
                )

    @property
    def rows(self) -> int:
        """Rows of one micro-batch: under DPO each pair's chosen and rejected sequences
        (trl==1.16.0 trainer/dpo_trainer.py:146-170 DataCollatorForPreference: chosen rows, then
        rejected rows, padded to one length); the reward model's collator does the same
        (reward_trainer.py:203-229)."""
        return self.batch_size * (2 if self.objective in (Objective.DPO, Objective.REWARD, Objective.ORPO) else 1)

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def generation_rows(self) -> int:
        """GRPO: the completions generated at once on this GPU (GRPOConfig generation_batch_size per
        process: per_device_train_batch_size x steps_per_generation, grpo_config.py:1098-1100)."""
        return self.batch_size * (self.steps_per_generation or self.gradient_accumulation)

    @property
    def prompt_len(self) -> int:
        return self.seq_len - self.completion_len

    @property
    def lora_like(self) -> bool:
        return self.method in (Method.LORA, Method.QLORA)

    @property
    def trains_head(self) -> bool:
        """lm_head trains: with every weight (full, GaLore), or as peft's modules_to_save copy. A
        reward model has no lm_head (its score head: memory/reward.py)."""
        if self.train_layers is not None or self.objective == Objective.REWARD:
            return False
        return not self.lora_like or SavedModule.LM_HEAD in self.modules_to_save

    @property
    def trains_embedding(self) -> bool:
        """The input embedding trains: with every weight, or as peft's modules_to_save copy."""
        if self.train_layers is not None:
            return False
        return not self.lora_like or SavedModule.EMBED_TOKENS in self.modules_to_save

    @property
    def mixed_precision(self) -> bool:
        """bf16 or fp16 autocast (FSDP: MixedPrecisionPolicy), as opposed to computing in the weights' dtype."""
        return self.precision in (Precision.MIXED, Precision.FP16)

    @property
    def weight_dtype(self) -> ModelDtype:
        """The dtype dense weights are loaded in: --model-dtype, else fp32 masters under mixed
        (and under fp16, except a LoRA/QLoRA base, which the GradScaler leaves in 2 bytes)."""
        if self.model_dtype is not None:
            return self.model_dtype
        if self.precision == Precision.FP16:
            return ModelDtype.BF16 if self.lora_like else ModelDtype.FP32
        return ModelDtype.FP32 if self.precision == Precision.MIXED else ModelDtype.BF16

    @property
    def quant_storage_dtype(self) -> QuantStorage:
        return self.quant_storage or QuantStorage.UINT8

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
        """The step runs under torch.autocast (bf16, or fp16 with a GradScaler) over its weights: no
        FSDP, no DeepSpeed (both compute in their bf16 parameter dtype)."""
        return self.mixed_precision and self.engine in (Engine.SINGLE, Engine.DDP)

    def describe(self) -> str:
        parts = [self.method.value]
        if self.quant is not None:  # qlora only (_check)
            parts.append(self.quant.value)
        if self.lora_like:
            parts.append(f"r={self.lora_r}" + ("" if self.lora_targets == LoraTargets.ALL_LINEAR else " attn"))
        if self.method == Method.GALORE:
            parts.append(f"rank={self.galore_rank}")
        if self.optim.traits.family == OptimFamily.APOLLO_ADAMW and self.apollo_rank != APOLLO_DEFAULT_RANK:
            parts.append(f"apollo-rank={self.apollo_rank}")
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
        flags = (
            ("fp32_outputs", "fp32-logits"),
            ("keep_logits", "keep-logits"),
            ("loss_only_loop", "loss-only-loop"),
            ("kbit_prep", "kbit-prep"),
            ("dora", "dora"),
            ("optimizer_in_backward", "optim-in-bwd"),
            ("checkpoint_reentrant", "reentrant"),
            ("compile", "compile"),
        )
        words += [word for name, word in flags if getattr(self, name)]
        valued = (
            ("loss", "loss", Loss.HF),
            ("activation_offload", "offload", ActivationOffload.NONE),
            ("packing", "packing", Packing.NONE),
            ("attention", "attn", None),
            ("model_dtype", "weights", None),
            ("liger_layers", "liger", LigerLayers.NONE),
        )
        words += [
            f"{word}={getattr(self, name).value}"
            for name, word, default in valued
            if getattr(self, name) not in (default, None)
        ]
        if self.lora_like and self.adapter_dtype is not None:
            words.append(f"adapters={self.adapter_dtype.value}")
        if self.quant == Quant.NF4 and self.quant_storage is not None:
            words.append(f"storage={self.quant_storage.value}")
        if self.lora_like and self.lora_target_modules:
            words.append("targets=" + ",".join(self.lora_target_modules))
        if self.lora_like and self.lora_kernels:
            words.append("lora-kernels")
        if self.lora_like and self.modules_to_save:
            words.append("train=" + ",".join(m.value for m in self.modules_to_save))
        if self.lora_like and self.stack != Stack.PLAIN:
            words.append(f"dropout={self.lora_dropout:g}")
        if self.train_layers is not None:
            dtype = f" ({self.train_layers_dtype.value})" if self.train_layers_dtype is not None else ""
            words.append(f"last-{self.train_layers}-layers{dtype}")
        if self.fp32_embeddings_norms and self.weight_dtype != ModelDtype.FP32:
            words.append("fp32-embeddings-norms")
        if self.gradient_accumulation > 1:
            words.append(f"ga={self.gradient_accumulation}")
        if self.sharded and self.fsdp_version != 2:
            words.append(f"fsdp-v{self.fsdp_version}")
        if self.sharded and self.fsdp_sharding != FsdpSharding.FULL:
            words.append(f"sharding={self.fsdp_sharding.value}")
        if self.sharded and self.fsdp_version == 2 and self.fsdp_embedding_units:
            words.append("embedding-units")
        if self.fsdp == 1 and self.cpu_offload:
            words.append("fsdp-1gpu+offload")
        if self.engine == Engine.DDP:
            words.append(f"ddp{self.data_parallel}")
        if self.deepspeed is not None:
            offload = "+offload-opt" * self.offload_optimizer + "+offload-params" * self.offload_params
            words.append(f"{self.deepspeed.value}x{self.data_parallel}{offload}")
        if self.nodes > 1:
            words.append(f"nodes={self.nodes}")
        if self.objective != Objective.SFT:
            words.append(self.objective.value + ("(precomputed-ref)" if self.precompute_ref_log_probs else ""))
        off = {Objective.KTO: (self.kto_kl, "no-kl"), Objective.ORPO: (self.chosen_nll, "no-nll")}
        words += [word for objective, (on, word) in off.items() if self.objective == objective and not on]
        return words
