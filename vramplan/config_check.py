"""A config.json's memory-shaping fields, checked before transformers builds anything.

transformers takes ``hidden_size: 256.5``, ``"256"``, 0, -256 or NaN and fails somewhere
inside (or, for 0, builds a model that "FITS 0.49 GiB"); 100,000 layers took 131 s to build.
Each key below is checked for its type (an int, not a bool, float or string), its range
(vramplan/limits.py) and the relations the attention needs (heads divide the width unless
head_dim is given; key-value heads divide the heads), naming the file and the key. Only keys
present are checked: a missing one is transformers' default for the model_type.
"""

from __future__ import annotations

from vramplan.errors import VramplanError
from vramplan.limits import MAX_EXPERTS, MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH

# key -> the largest value; every one a positive count of something the memory model sizes
COUNT_KEYS: dict[str, int] = {
    "hidden_size": MAX_WIDTH,
    "intermediate_size": MAX_WIDTH,
    "moe_intermediate_size": MAX_WIDTH,
    "shared_expert_intermediate_size": MAX_WIDTH,
    "head_dim": MAX_WIDTH,
    "kv_lora_rank": MAX_WIDTH,
    "q_lora_rank": MAX_WIDTH,
    "qk_rope_head_dim": MAX_WIDTH,
    "qk_nope_head_dim": MAX_WIDTH,
    "v_head_dim": MAX_WIDTH,
    "num_hidden_layers": MAX_LAYERS,
    "num_attention_heads": MAX_HEADS,
    "num_key_value_heads": MAX_HEADS,
    "vocab_size": MAX_VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    "sliding_window": MAX_POSITIONS,
    "num_local_experts": MAX_EXPERTS,
    "num_experts": MAX_EXPERTS,
    "n_routed_experts": MAX_EXPERTS,
    "num_experts_per_tok": MAX_EXPERTS,
}
# the keys a decoder cannot do without: null is an error (the others may be null: "not used")
REQUIRED_IF_PRESENT = frozenset(
    {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"}
)
# keys that some configs set to 0 for "none" (a dense Qwen2-MoE layer, no shared expert)
ZERO_MEANS_NONE = frozenset(
    {
        "num_experts",
        "num_local_experts",
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "sliding_window",
        "q_lora_rank",
    }
)


def _bad(name: str, key: str, what: str) -> VramplanError:
    return VramplanError(f"{name}: {key!r} {what}", "MODEL")


def _check_count(name: str, prefix: str, key: str, value: object, hi: int) -> None:
    if value is None and key not in REQUIRED_IF_PRESENT:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        shown = "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        raise _bad(name, prefix + key, f"must be an integer, got {shown}")
    lo = 0 if key in ZERO_MEANS_NONE else 1
    if not lo <= value <= hi:
        shown = str(value) if abs(value) < 10**30 else "a number beyond any model"
        raise _bad(
            name, prefix + key, f"must be {'at least 0' if lo == 0 else 'positive'} and at most {hi:,}, got {shown}"
        )


def _check_part(name: str, prefix: str, part: dict) -> None:
    for key, hi in COUNT_KEYS.items():
        if key in part:
            _check_count(name, prefix, key, part[key], hi)
    hidden, heads = part.get("hidden_size"), part.get("num_attention_heads")
    kv, head_dim = part.get("num_key_value_heads"), part.get("head_dim")
    if hidden and heads and not head_dim and hidden % heads:
        raise _bad(
            name,
            prefix + "hidden_size",
            f"{hidden} is not divisible by num_attention_heads {heads} (and no head_dim is given)",
        )
    if heads and kv and heads % kv:
        raise _bad(name, prefix + "num_key_value_heads", f"{kv} does not divide num_attention_heads {heads}")
    experts = part.get("num_local_experts") or part.get("num_experts") or part.get("n_routed_experts")
    top_k = part.get("num_experts_per_tok")
    if experts and top_k and top_k > experts:
        raise _bad(name, prefix + "num_experts_per_tok", f"{top_k} is more than the {experts} experts")


def check_config(cfg: dict, name: str) -> None:
    """Raise a VramplanError naming ``name`` (the file or preset) and the key at fault."""
    if not isinstance(cfg.get("model_type"), str):
        raise _bad(name, "model_type", f"must be a string, got {cfg.get('model_type')!r}")
    _check_part(name, "", cfg)
    if "text_config" in cfg:
        text = cfg["text_config"]
        if not isinstance(text, dict):
            raise _bad(
                name,
                "text_config",
                f"must be an object (the text decoder's config), got {'null' if text is None else type(text).__name__}",
            )
        _check_part(name, "text_config.", text)
