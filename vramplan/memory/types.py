"""The enums of the memory model: how a parameter is stored, which phase of the step a
modelled moment is, and the roles of a decoder layer's Linears the rules read."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum


class ParamKind(StrEnum):
    """How one parameter tensor is stored on the device."""

    DENSE = "dense"  # bf16, or fp32 masters under mixed precision
    NF4 = "nf4"  # bitsandbytes Linear4bit packed weight
    HQQ4 = "hqq4"  # hqq HQQLinear packed weight
    INT8 = "int8"  # bitsandbytes Linear8bitLt int8 weight (CB) with its fp32 row scales (SCB)
    LORA = "lora"  # a peft adapter matrix (lora_A or lora_B)

    @property
    def quantized(self) -> bool:
        return self in (ParamKind.NF4, ParamKind.HQQ4, ParamKind.INT8)


class LinearRole(StrEnum):
    """model_spec.Linear.role values (vramplan/analyze.py assigns them). A StrEnum, so it
    compares equal to the role strings a ModelSpec holds."""

    Q = "q"
    K = "k"
    V = "v"
    QKV = "qkv"
    O = "o"
    GATE = "gate"
    UP = "up"
    GATE_UP = "gate_up"
    DOWN = "down"
    FC1 = "fc1"
    FC2 = "fc2"
    ROUTER = "router"
    OTHER = "other"
    # not decoder Linears: the roles of peft's trainable modules_to_save copies (parameters.py)
    EMBED = "embed"
    HEAD = "lm_head"


R = LinearRole
ATTENTION_IN_ROLES = (R.Q, R.K, R.V, R.QKV)
ATTENTION_ROLES = (*ATTENTION_IN_ROLES, R.O)
MLP_IN_ROLES = (R.GATE, R.UP, R.GATE_UP, R.FC1)
MLP_OUT_ROLES = (R.DOWN, R.FC2)
MLP_ROLES = (*MLP_IN_ROLES, *MLP_OUT_ROLES)
GATED_ROLES = (R.GATE, R.GATE_UP)
MOE_SHARED_ROLES = (R.GATE, R.UP, R.GATE_UP, R.DOWN)
SAVED_COPY_ROLES = (R.EMBED, R.HEAD)


class MeasuredPhase(StrEnum):
    """The four phases a measurement reports (verify's probes, the CPU trace); each
    modelled phase happens inside one of them."""

    BUILD = "build"
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


MEASURED_PHASES = tuple(MeasuredPhase)


class PhaseKind(Enum):
    """One modelled moment of the step: (display label, the measured phase it falls in).
    LAYER_BACKWARD's label is a template completed by the layer and its LayerPoint."""

    BUILD_QUANTIZE = ("build (quantize)", MeasuredPhase.BUILD)
    # GRPO's moments before the step's forward (memory/grpo.py), counted with the forward
    GENERATION = ("generation (GRPO, no grad)", MeasuredPhase.FORWARD)
    SCORING = ("scoring forward (GRPO, no grad)", MeasuredPhase.FORWARD)
    FORWARD_LOSS = ("forward (loss)", MeasuredPhase.FORWARD)
    FORWARD_FINAL_NORM = ("forward (final norm)", MeasuredPhase.FORWARD)
    FORWARD_CHECKPOINTED_LAYER = ("forward (checkpointed layer)", MeasuredPhase.FORWARD)
    FORWARD_LAST_LAYER = ("forward (last layer)", MeasuredPhase.FORWARD)
    DEQUANTIZE_FORWARD = ("4-bit dequantize (forward)", MeasuredPhase.FORWARD)
    DORA_NORM_FORWARD = ("DoRA weight norm (forward)", MeasuredPhase.FORWARD)
    REFERENCE_FORWARD = ("reference forward (DPO, KTO; no grad)", MeasuredPhase.FORWARD)
    LOSS_BACKWARD = ("loss backward", MeasuredPhase.BACKWARD)
    FINAL_NORM_BACKWARD = ("final norm backward", MeasuredPhase.BACKWARD)
    LAYER_BACKWARD = ("layer {layer} backward ({point})", MeasuredPhase.BACKWARD)
    OPTIMIZER_HOOK_ROOT = ("optimizer hook (lm_head)", MeasuredPhase.BACKWARD)
    EMBEDDING_BACKWARD = ("embedding backward", MeasuredPhase.BACKWARD)
    ROOT_REDUCE_SCATTER = ("root reduce-scatter (FSDP2)", MeasuredPhase.BACKWARD)
    OPTIMIZER_STEP = ("optimizer step", MeasuredPhase.OPTIMIZER)
    GALORE_REFRESH = ("GaLore SVD refresh", MeasuredPhase.OPTIMIZER)
    # layer-wise optimizers refresh their projectors inside the backward hooks
    GALORE_REFRESH_LAYERWISE = ("GaLore SVD refresh (layer-wise, in backward)", MeasuredPhase.BACKWARD)

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def measured(self) -> MeasuredPhase:
        return self.value[1]


class LayerPoint(StrEnum):
    """The widest moments of one decoder layer's backward (the tag in its phase's name)."""

    MLP = "mlp"
    END = "end"
    LORA = "lora"
    DEQUANTIZE = "4-bit dequantize"
    LORA_RECOMPUTE = "lora recompute"
    LORA_RECOMPUTE_DOWN = "lora recompute (down)"
    POST_MLP_NORM = "post-MLP norm"
    MOE_RECOMPUTE = "moe recompute"
    OPTIMIZER_HOOK = "optimizer hook"
    DORA_RECOMPUTE = "DoRA recompute"
    DORA = "DoRA"
    DORA_MLP = "DoRA (MLP)"


@dataclass(frozen=True)
class Param:
    """One parameter tensor as the run holds it."""

    numel: int
    dim0: int
    kind: ParamKind
    trainable: bool
    layer: int | None  # decoder layer index, None for the root (embeddings, final norm, head)
    galore: tuple[int, int] | None = None  # (m, n) for GaLore-projected 2-D weights
    role: str | None = None  # the Linear's role (q, down, ...) for Linear weights, biases and adapters
    shape: tuple[int, ...] | None = None  # when neither (numel,) nor (dim0, numel // dim0): 3-D experts
    upcast: bool = False  # held in fp32 over a bf16 model (--fp32-embeddings-norms: embeddings, lm_head, norms)

    @property
    def storage_key(self) -> tuple:
        """Everything but the layer index that a per-parameter byte rule reads (whether it is in
        a decoder layer or the root included): equal keys, equal bytes. The step's rules loop
        over every parameter of every layer, and an 80-layer model repeats one layer's keys."""
        return (
            self.numel,
            self.dim0,
            self.kind,
            self.trainable,
            self.layer is None,
            self.galore,
            self.role,
            self.shape,
            self.upcast,
        )

    @property
    def dims(self) -> tuple[int, ...]:
        """The tensor's shape: 1-D when numel == dim0 (norms, biases), else 2-D (dim0, rest)."""
        if self.shape is not None:
            return self.shape
        return (self.numel,) if self.numel == self.dim0 else (self.dim0, self.numel // self.dim0)
