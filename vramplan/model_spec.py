"""Model spec: the types of the shapes that memory depends on, read off the real architecture.

vramplan.analyze builds a ModelSpec from a config on the meta device; vramplan.model_loader
resolves MODEL to a config and caches the analysis. This module holds only the types, so
both import it and it imports neither.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Linear(BaseModel):
    """A 2-D weight used as y = x W^T (nn.Linear, or a fused Conv1D-style weight)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="path inside the decoder layer, e.g. self_attn.q_proj")
    role: str = Field(description="q k v qkv o gate up gate_up down fc1 fc2 router other")
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features

    @property
    def narrow_dim(self) -> int:
        """The smaller dimension: the largest rank a factorisation of this weight can have."""
        return min(self.in_features, self.out_features)


def narrower_than(linears: list[Linear], rank: int) -> list[str]:
    """Leaf names of the Linears whose smaller dimension is below `rank` (a LoRA adapter or a
    GaLore projection of that rank is full rank there)."""
    return sorted({lin.name.rsplit(".", 1)[-1] for lin in linears if rank > lin.narrow_dim})


class Experts(BaseModel):
    """MoE experts stored as 3-D tensors (not Linears: LoRA does not target them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    tensors: list[tuple[str, list[int]]] = Field(description="(name, shape) of each 3-D expert tensor")

    @property
    def numel(self) -> int:
        total = 0
        for _, shape in self.tensors:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


class LayerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    linears: list[Linear]
    experts: Experts | None = None
    norm_numels: list[int] = Field(description="numel of each norm weight in the layer")
    attn_norm_dims: list[int] = Field(
        default_factory=list,
        description="per-token width of each norm inside "
        "the attention (Qwen3/Gemma 3/OLMo2 q_norm and k_norm: q_dim, kv_dim)",
    )
    norm_names: list[str] = Field(
        default_factory=list,
        description="the norms on the residual stream, by path (input_layernorm, post_attention_layernorm, ...)",
    )
    other_numels: list[int] = Field(default_factory=list, description="any other parameter (e.g. router weight)")
    sliding_window: int | None = None

    @model_validator(mode="after")
    def _has_linears(self):
        # analyze refuses such layers with a clear error; a cached spec from before that
        # check fails here and is rebuilt, so it meets the same error
        if not self.linears:
            raise ValueError("a decoder layer without nn.Linear is not modelled")
        return self

    @property
    def pre_norm(self) -> bool:
        """A norm's output feeds the attention and the MLP (Llama, Gemma), rather than every
        norm acting on a block's output (OLMo2: post_attention_ / post_feedforward_layernorm)."""
        return any(not n.split(".")[-1].startswith("post_") for n in self.norm_names)

    @property
    def post_mlp_norm(self) -> bool:
        """A norm on the MLP's output before the residual add (Gemma 2/3, OLMo2)."""
        return any("post_feedforward" in n or "post_mlp" in n for n in self.norm_names)

    @property
    def numel(self) -> int:
        return (
            sum(l.numel + (l.out_features if l.bias else 0) for l in self.linears)
            + (self.experts.numel if self.experts else 0)
            + sum(self.norm_numels)
            + sum(self.other_numels)
        )

    def linears_with(self, *roles: str) -> list[Linear]:
        return [l for l in self.linears if l.role in roles]


class ModelSpec(BaseModel):
    """Everything the memory model needs to know about the architecture."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(description="preset name or config path it was read from")
    resolved_from: str | None = Field(None, description="the alias the user typed, if any")
    architecture: str
    model_type: str
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    num_layers: int
    layers: list[LayerSpec] = Field(description="one entry per decoder layer")
    embed_numel: int
    lm_head_numel: int = Field(description="0 when tied to the embedding")
    final_norm_numel: int
    other_numel: int = Field(0, description="parameters outside layers not counted above")
    idle_numel: int = Field(
        0,
        description="parameters a text step never runs (an image-text checkpoint's vision "
        "tower and projector): stored, but given no gradient and so no optimizer state",
    )
    layers_path: str = Field(
        "model.layers",
        description="module path of the decoder layers in the transformers model (model.language_model.layers "
        "in an image-text class): peft matches a one-string target_modules against full names under it",
    )
    attn_implementation: str = Field(description="sdpa, or eager where transformers offers no SDPA path")
    supports_flash: bool = Field(
        True, description='the model class takes attn_implementation="flash_attention_2" (_supports_flash_attn)'
    )
    norm_kind: str = Field(
        description="rms (llama-style: x.float(), weight * x.to(dtype)), rms_gemma (the weight "
        "multiply in fp32: Gemma, OLMo2), layer"
    )
    norms_per_layer: int = Field(
        description="norms on the residual stream per layer (attention's q/k norms not counted)"
    )
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    sdpa_window: int | None = Field(
        None,
        description="SDPA models masked to one sliding window in every layer "
        "(Mistral, Phi-3): longer sequences get an explicit mask",
    )
    params_total: int
    dropouts: dict[str, float] = Field(
        default_factory=dict,
        description="the config's dropout probabilities "
        "above 0 (attention, residual, embedding): the model trains with them",
    )
    # set by model_loader.load_model_spec from the config (vramplan.config_checks), not by the
    # analysis: excluded from dumps, so shipped and cached specs stay what the analysis gives
    defaulted: dict[str, Any] = Field(
        default_factory=dict,
        exclude=True,
        description="memory-shaping fields a user's config.json left to transformers' defaults, with the value used",
    )
    max_positions: int | None = Field(None, exclude=True, description="the config's max_position_embeddings")

    @property
    def mask_window(self) -> int | None:
        """The sequence length from which SDPA gets an explicit sliding-window mask in some
        layer (every layer: sdpa_window; Gemma 3's sliding layers: their window)."""
        if self.attn_implementation != "sdpa":
            return None
        return self.sdpa_window or min((l.sliding_window for l in self.layers if l.sliding_window), default=None)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim
