"""Build a config on the meta device and read off the shapes the memory model needs."""

from __future__ import annotations

import contextlib
import copy
import warnings

from vramplan.errors import VramplanError
from vramplan.model_spec import Experts, LayerSpec, Linear, ModelSpec

# Linear name (last path component) -> role. Roles drive the activation rules in vramplan/memory/
# (memory.types.LinearRole).
_ROLES = {
    "q_proj": "q",
    "query": "q",
    "k_proj": "k",
    "key": "k",
    "v_proj": "v",
    "value": "v",
    "qkv_proj": "qkv",
    "query_key_value": "qkv",
    "c_attn": "qkv",
    "Wqkv": "qkv",
    "W_pack": "qkv",
    "o_proj": "o",
    "out_proj": "o",
    "dense": "o",
    "wo": "o",
    "gate_proj": "gate",
    "w1": "gate",
    "up_proj": "up",
    "w3": "up",
    "gate_up_proj": "gate_up",
    "down_proj": "down",
    "w2": "down",
    "fc1": "fc1",
    "c_fc": "fc1",
    "dense_h_to_4h": "fc1",
    "fc2": "fc2",
    "dense_4h_to_h": "fc2",
}
_ATTN_HINTS = ("attn", "attention")


def _role(path: str, out_features: int, num_experts: int | None) -> str:
    leaf = path.split(".")[-1]
    if leaf in ("gate", "router") and num_experts and out_features == num_experts:
        return "router"
    role = _ROLES.get(leaf, "other")
    if role == "o" and leaf == "dense" and not any(h in path for h in _ATTN_HINTS):
        return "other"
    if leaf == "c_proj":
        return "o" if any(h in path for h in _ATTN_HINTS) else "fc2"
    return role


def _import_without_hqq() -> None:
    """Import transformers' cache module without hqq: it imports hqq's quantizer at module level
    when hqq is installed (transformers==5.24.0 cache_utils.py:17-18), only for a quantized KV
    cache in generation, and that import alone costs about 3 s of CPU (hqq==0.2.x quantize.py
    compiles at class definition): most of a cold meta build. Quantizing with hqq (`verify`)
    goes through transformers.quantizers, which imports it when used."""
    import sys

    if "transformers.cache_utils" in sys.modules:
        return
    try:
        import transformers.utils as tu
    except ImportError:
        return
    real = tu.is_hqq_available
    tu.is_hqq_available = lambda *a, **k: False
    try:
        import transformers.cache_utils as cu

        cu.is_hqq_available = real  # HQQQuantizedCache checks again, and says to install hqq
    finally:
        tu.is_hqq_available = real


def _build_meta(cfg: dict):
    try:
        import torch

        _import_without_hqq()
        from transformers import AutoConfig
    except ImportError as e:  # pragma: no cover - torch/transformers are dependencies
        raise VramplanError(f"analysing a config needs torch and transformers ({e})") from None
    cfg = copy.deepcopy(cfg)  # transformers fills nested dicts (rope_scaling) in place
    model_type = cfg.pop("model_type")
    with _transformers_quiet():
        return _build(model_type, cfg, AutoConfig, torch)


@contextlib.contextmanager
def _transformers_quiet():
    """transformers logs its doubts about a config on stderr (``pad_token_id must be ...``):
    the command line's answer is one line, so they are silenced while it builds; what it
    cannot build is the error below."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _build(model_type: str, cfg: dict, AutoConfig, torch):  # noqa: N803 - the transformers class, passed in
    # transformers runs on the user's file here: whatever it raises is about that file
    # (config_check has refused the memory-shaping fields it could trip on; this is the rest)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except Exception as e:  # noqa: BLE001 - third-party code on user input
        raise VramplanError(f"transformers cannot read this config ({_one_line(e)})", "MODEL") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = auto_class(config)
        if auto is None:
            raise VramplanError(
                f"transformers has no causal-LM class for model_type {model_type!r} "
                "(AutoModelForCausalLM, or AutoModelForImageTextToText for image-text checkpoints)",
                "MODEL",
            )
        try:
            with torch.device("meta"):
                model = auto.from_config(config)
        except Exception as e:  # noqa: BLE001 - third-party code on user input
            raise VramplanError(
                f"transformers cannot build a causal LM from this config ({_one_line(e)})", "MODEL"
            ) from None
    return model, config


def _one_line(e: BaseException) -> str:
    text = (str(e).splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def auto_class(config):
    """The transformers Auto class that trains this config on text: AutoModelForCausalLM, or
    for an image-text checkpoint with no causal-LM class (Qwen2.5-VL, Mistral 3) the image-text
    model, which takes input_ids and labels alone and leaves its vision tower idle."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    return None


def _decoder_layers(model, n_layers: int):
    import torch.nn as nn

    best = None
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.ModuleList) and len(mod) == n_layers):
            continue
        numel = sum(p.numel() for p in mod.parameters())
        if best is None or numel > best[2]:
            best = (name, mod, numel)
    if best is None:
        raise VramplanError("could not find the decoder layers in this model", "MODEL")
    return best[0], best[1]


def _attn_norm_dim(path: str, q_dim: int, kv_dim: int) -> int | None:
    """Per-token width a norm inside the attention normalizes: q_norm reads q, k_norm k
    (per head or whole, the same elements); None for a norm on the residual stream."""
    if not any(h in path for h in _ATTN_HINTS):
        return None
    leaf = path.split(".")[-1]
    return q_dim if leaf.startswith("q") else kv_dim if leaf.startswith("k") else None


def _layer_spec(
    layer, num_experts: int | None, top_k: int | None, hidden: int, sliding: int | None, q_dim: int, kv_dim: int
) -> LayerSpec:
    import torch.nn as nn

    linears, norms, others, expert_tensors, attn_norms, norm_names = [], [], [], [], [], []
    seen: set[int] = set()
    for path, mod in layer.named_modules():
        if isinstance(mod, nn.Linear):
            linears.append(
                Linear(
                    name=path,
                    role=_role(path, mod.out_features, num_experts),
                    in_features=mod.in_features,
                    out_features=mod.out_features,
                    bias=mod.bias is not None,
                )
            )
            seen.update(id(p) for p in mod.parameters(recurse=False))
        elif "norm" in type(mod).__name__.lower():
            n = sum(p.numel() for p in mod.parameters(recurse=False))
            if n:
                norms.append(n)
                width = _attn_norm_dim(path, q_dim, kv_dim)
                if width:
                    attn_norms.append(width)
                else:
                    norm_names.append(path)
            seen.update(id(p) for p in mod.parameters(recurse=False))
    for path, p in layer.named_parameters():
        if id(p) in seen:
            continue
        if p.dim() == 3:
            expert_tensors.append((path, list(p.shape)))
        else:
            others.append(p.numel())
    if not linears:
        _refuse_without_linears(layer)
    return LayerSpec(
        linears=linears,
        experts=_experts(expert_tensors, hidden, top_k),
        norm_numels=norms,
        attn_norm_dims=attn_norms,
        norm_names=norm_names,
        other_numels=others,
        sliding_window=sliding,
    )


def _attention_heads(tcfg) -> int:
    """The config's attention heads; a model without them (Mamba, RWKV: state-space and
    recurrent layers) has no rule here for what its layers save."""
    n_heads = getattr(tcfg, "num_attention_heads", None)
    if not isinstance(n_heads, int) or n_heads <= 0:
        raise VramplanError(
            f"model_type {tcfg.model_type!r} has no num_attention_heads (a state-space or recurrent model?); "
            "vramplan models attention decoders (Llama, Mistral, Qwen, Gemma, Phi-3, Mixtral, ...)",
            "MODEL",
        )
    return n_heads


def _refuse_without_linears(layer) -> None:
    # e.g. GPT-2's transformers Conv1D: neither peft's nor the quantizers' Linear path,
    # and no rule here says what it saves
    kinds = sorted(
        {type(m).__name__ for m in layer.modules() if any(q.dim() == 2 for q in m.parameters(recurse=False))}
    )
    raise VramplanError(
        f"this model's decoder layers hold no nn.Linear (found {', '.join(kinds)}); vramplan "
        "models decoders built from nn.Linear (Llama, Mistral, Qwen, Gemma, Phi-3, Mixtral, ...)",
        "MODEL",
    )


def _experts(expert_tensors: list, hidden: int, top_k: int | None) -> Experts | None:
    """The fused expert tensors (3-D parameters, (path, shape)) of one layer, or None."""
    if not expert_tensors:
        return None
    e = expert_tensors[0][1][0]
    # down_proj is (E, hidden, intermediate); gate_up is (E, 2 * intermediate, hidden)
    down = [s for _, s in expert_tensors if s[1] == hidden and s[2] != hidden]
    inter = down[0][2] if down else min(min(s[1], s[2]) for _, s in expert_tensors)
    return Experts(num_experts=e, top_k=top_k or 1, hidden=hidden, intermediate=inter, tensors=expert_tensors)


def _outside_numels(model, layers, emb, head, hidden: int) -> tuple[int, int, int]:
    """(final norm, other, all parameters) element counts: the parameters outside the decoder
    layers other than the embedding and head, the first hidden-wide vector being the final
    norm; shared (tied) parameters counted once."""
    layer_ids = {id(p) for p in layers.parameters()}
    all_params = {id(p): p for p in model.parameters()}
    outside = [p for i, p in all_params.items() if i not in layer_ids]
    final_norm_n, other_n = 0, 0
    for p in outside:
        if p is emb.weight or (head is not None and p is head.weight):
            continue
        if p.dim() == 1 and p.numel() == hidden and final_norm_n == 0:
            final_norm_n = p.numel()
        else:
            other_n += p.numel()
    return final_norm_n, other_n, sum(p.numel() for p in all_params.values())


def analyze_config(cfg: dict, name: str) -> ModelSpec:
    model, config = _build_meta(cfg)
    tcfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = tcfg.num_hidden_layers
    hidden = tcfg.hidden_size
    n_heads = _attention_heads(tcfg)
    n_kv = getattr(tcfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(tcfg, "head_dim", None) or hidden // n_heads
    num_experts = getattr(tcfg, "num_local_experts", None) or getattr(tcfg, "num_experts", None)
    top_k = getattr(tcfg, "num_experts_per_tok", None)
    layers_path, layers = _decoder_layers(model, n_layers)
    layer_types = getattr(tcfg, "layer_types", None) or []
    window = getattr(tcfg, "sliding_window", None)
    specs = []
    for i, layer in enumerate(layers):
        sliding = window if (i < len(layer_types) and "sliding" in str(layer_types[i])) else None
        specs.append(_layer_spec(layer, num_experts, top_k, hidden, sliding, n_heads * head_dim, n_kv * head_dim))
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    embed_n = emb.weight.numel()
    head_n = 0 if tied or head is None else head.weight.numel()
    final_norm_n, other_n, params_total = _outside_numels(model, layers, emb, head, hidden)
    norm = next((m for m in layers[0].modules() if "norm" in type(m).__name__.lower()), None)
    norm_kind = _norm_kind(norm, hidden)
    sdpa = getattr(type(model), "_supports_sdpa", False)
    return ModelSpec(
        name=name,
        architecture=type(model).__name__,
        model_type=tcfg.model_type,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        vocab=emb.weight.shape[0],
        tied_embeddings=tied,
        num_layers=n_layers,
        layers=specs,
        embed_numel=embed_n,
        lm_head_numel=head_n,
        final_norm_numel=final_norm_n,
        # an image-text checkpoint: what lies outside its text decoder is the vision side
        other_numel=0 if tcfg is not config else other_n,
        idle_numel=other_n if tcfg is not config else 0,
        layers_path=layers_path,
        attn_implementation="sdpa" if sdpa else "eager",
        norm_kind=norm_kind,
        supports_flash=bool(getattr(type(model), "_supports_flash_attn", False)),
        norms_per_layer=len(specs[0].norm_numels) - len(specs[0].attn_norm_dims) if specs else 0,
        final_logit_softcapping=getattr(tcfg, "final_logit_softcapping", None),
        attn_logit_softcapping=getattr(tcfg, "attn_logit_softcapping", None),
        # transformers masks such models with create_sliding_window_causal_mask in every layer
        sdpa_window=window if (sdpa and window and not layer_types) else None,
        params_total=params_total,
        dropouts=_dropouts(tcfg),
    )


def _norm_kind(norm, hidden: int) -> str:
    """layer (LayerNorm); rms_gemma: an RMSNorm that multiplies its weight in fp32 and so
    saves a second fp32 tensor when the weight trains (Gemma's, OLMo2's); rms: one that casts
    back first (Llama's). Read by running the module once on the CPU and looking at what
    autograd saves; the class name decides where that cannot run."""
    name = type(norm).__name__ if norm is not None else "RMSNorm"
    if "LayerNorm" in name:
        return "layer"
    try:
        return "rms_gemma" if _fp32_saved(norm, hidden) >= 2 else "rms"
    except Exception:  # noqa: BLE001 - a module that needs more than (x) to run
        return "rms_gemma" if "Gemma" in name else "rms"


def _fp32_saved(norm, hidden: int) -> int:
    """Distinct full-size fp32 tensors autograd saves in one bf16 forward, weight trained."""
    import torch

    probe = copy.deepcopy(norm).to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in probe.parameters():
            p.fill_(1.0)
            p.requires_grad_(True)
    x = torch.randn(4, hidden, dtype=torch.bfloat16, requires_grad=True)
    storages = set()

    def pack(t):
        if t.dtype == torch.float32 and t.numel() >= x.numel():
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        probe(x)
    return len(storages)


def _dropouts(config) -> dict[str, float]:
    """Dropout the architecture itself applies in training (not LoRA's), by config key."""
    return {
        k: float(v)
        for k, v in sorted(config.to_dict().items())
        if ("dropout" in k or "pdrop" in k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
    }
