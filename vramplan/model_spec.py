"""Model spec: the shapes that memory depends on, read off the real architecture.

The model is built from its config.json on the meta device (no weights allocated) and its
modules are walked: embeddings, every Linear inside the decoder layers with its shape,
norms, lm_head, tied weights, MoE expert tensors, biases. The analysis is cached on disk
(keyed by the config, the layer override and the transformers version), so repeated
estimates neither rebuild nor import torch.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vramplan.errors import VramplanError

PRESET_DIR = Path(__file__).parent / "presets" / "models"
ALIAS_FILE = Path(__file__).parent / "presets" / "aliases.json"
SPEC_VERSION = 8  # bump when the analysis output changes


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
    attn_norm_dims: list[int] = Field(default_factory=list, description="per-token width of each norm inside "
                                      "the attention (Qwen3/Gemma 3/OLMo2 q_norm and k_norm: q_dim, kv_dim)")
    norm_names: list[str] = Field(default_factory=list, description="the norms on the residual stream, by path "
                                  "(input_layernorm, post_attention_layernorm, ...)")
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
        return (sum(l.numel + (l.out_features if l.bias else 0) for l in self.linears)
                + (self.experts.numel if self.experts else 0) + sum(self.norm_numels) + sum(self.other_numels))

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
    idle_numel: int = Field(0, description="parameters a text step never runs (an image-text checkpoint's vision "
                            "tower and projector): stored, but given no gradient and so no optimizer state")
    attn_implementation: str = Field(description="sdpa, or eager where transformers offers no SDPA path")
    norm_kind: str = Field(description="rms (llama-style: x.float(), weight * x.to(dtype)), rms_gemma (the weight "
                           "multiply in fp32: Gemma, OLMo2), layer")
    norms_per_layer: int = Field(description="norms on the residual stream per layer (attention's q/k norms not counted)")
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    sdpa_window: int | None = Field(None, description="SDPA models masked to one sliding window in every layer "
                                    "(Mistral, Phi-3): longer sequences get an explicit mask")
    params_total: int
    dropouts: dict[str, float] = Field(default_factory=dict, description="the config's dropout probabilities "
                                       "above 0 (attention, residual, embedding): the model trains with them")

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


# ---------------------------------------------------------------- config resolution

def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    return json.loads(ALIAS_FILE.read_text()) if ALIAS_FILE.exists() else {}


def resolve_config(model: str, num_layers: int | None = None) -> tuple[str, str | None, dict]:
    """MODEL (preset, alias, config.json path or directory) -> (name, alias_used, config dict)."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise VramplanError(f"directory {model!r} holds no config.json", "MODEL")
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise VramplanError(f"no such file {model!r}", "MODEL")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise VramplanError(f"{model!r} is not a readable JSON config ({e})", "MODEL") from None
        name, alias = str(path), None
    else:
        key = model.lower()
        alias = None
        if key not in preset_names() and key in _aliases():
            alias, key = model, _aliases()[key]
        if key not in preset_names():
            raise VramplanError(f"unknown model {model!r}; presets: {', '.join(preset_names())}; "
                                f"aliases: {', '.join(sorted(a for a in _aliases() if '/' not in a))}; "
                                "or give a config.json path", "MODEL")
        cfg = json.loads((PRESET_DIR / f"{key}.json").read_text())
        name = key
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise VramplanError(f"{model!r} is not a model config (no model_type)", "MODEL")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if num_layers is not None:
        if num_layers < 1:
            raise VramplanError(f"must be a positive integer, got {num_layers}", "--num-layers")
        # a multimodal config (Gemma 3 4B+) keeps the decoder's depth in its text_config
        for part in [cfg] + ([cfg["text_config"]] if isinstance(cfg.get("text_config"), dict) else []):
            part["num_hidden_layers"] = num_layers
            for key in ("layer_types", "mlp_only_layers"):
                if isinstance(part.get(key), list):
                    part[key] = part[key][:num_layers]
    return name, alias, cfg


# ---------------------------------------------------------------- cache

def _cache_dir() -> Path:
    base = os.environ.get("VRAMPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vramplan")
    return Path(base) / "specs"


def _transformers_version() -> str:
    from importlib.metadata import version
    try:
        return version("transformers")
    except Exception:  # noqa: BLE001 - not installed: analysis will fail later with a clear error
        return "none"


def _cache_key(cfg: dict) -> str:
    blob = json.dumps(cfg, sort_keys=True) + f"|{SPEC_VERSION}|{_transformers_version()}"
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


SHIPPED_DIR = Path(__file__).parent / "presets" / "specs"


def config_sha(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:24]


def _shipped(name: str, cfg: dict) -> ModelSpec | None:
    """Presets ship their analysis (scripts/build_preset_specs.py; a test rebuilds and
    compares), so a cold estimate of a preset needs neither torch nor transformers."""
    path = SHIPPED_DIR / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.pop("_config_sha", None) != config_sha(cfg):
        return None
    return ModelSpec.model_validate(data)


def truncate(spec: ModelSpec, num_layers: int) -> ModelSpec:
    """The first L decoder layers: what building with num_hidden_layers=L gives."""
    if num_layers < 1:
        raise VramplanError(f"must be a positive integer, got {num_layers}", "--num-layers")
    if num_layers > spec.num_layers:
        # a deeper model is a different model: say so rather than estimate the full depth
        raise VramplanError(f"{spec.name} has {spec.num_layers} decoder layers; truncation takes 1 to "
                            f"{spec.num_layers}, got {num_layers}", "--num-layers")
    if num_layers == spec.num_layers:
        return spec
    dropped = sum(l.numel for l in spec.layers[num_layers:])
    return spec.model_copy(update={"layers": spec.layers[:num_layers], "num_layers": num_layers,
                                   "params_total": spec.params_total - dropped})


def _full_spec(name: str, cfg: dict, use_cache: bool) -> ModelSpec:
    shipped = _shipped(name, cfg) if use_cache else None
    if shipped is not None:
        return shipped
    path = _cache_dir() / f"{_cache_key(cfg)}.json"
    if use_cache and path.exists():
        try:
            return ModelSpec.model_validate_json(path.read_text())
        except ValueError:
            pass  # stale or corrupt cache entry: rebuild
    from vramplan.analyze import analyze_config
    spec = analyze_config(cfg, name=name)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(spec.model_dump_json())
            tmp.replace(path)
        except OSError:
            pass  # a read-only home is no reason to fail
    return spec


def load_model_spec(model: str, num_layers: int | None = None, use_cache: bool = True) -> ModelSpec:
    """MODEL -> ModelSpec. --num-layers truncates the full-depth analysis (decoder layers
    are built independently of how many follow), so it never triggers a rebuild."""
    name, alias, cfg = resolve_config(model)
    spec = _full_spec(name, cfg, use_cache)
    if num_layers is not None:
        spec = truncate(spec, num_layers)
    return spec.model_copy(update={"name": name, "resolved_from": alias})
