"""What a user's config.json leaves to transformers, and its context length.

A config.json without `intermediate_size` still builds: transformers fills the field from
the config class's default (LlamaConfig: 11008), and the estimate is that of another
model. The estimate cannot know what was meant, so it names every memory-shaping field
that was filled this way, with the value used.
"""

from __future__ import annotations

# The keys that decide parameter and activation shapes (vramplan/presets/README.md, "What a
# preset holds"), and the MoE sizes of the configs that have them.
MEMORY_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "sliding_window",
    "attention_bias",
    "mlp_bias",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


def _text_part(cfg: dict) -> dict:
    """The decoder's keys: an image-text config keeps them in text_config."""
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


def defaulted_fields(cfg: dict, shipped: dict[str, dict] | None = None) -> dict[str, object]:
    """{field: value transformers used} for each MEMORY_FIELDS key the config class has and
    the user's config.json does not set. From the shipped table of config-class defaults
    (presets/config_defaults.json) when it has the model type, so a preset-shaped config
    imports no transformers; else builds the config (no model): AutoConfig.for_model, as the
    analysis does."""
    given = _text_part(cfg)
    table = (shipped or {}).get(str(given.get("model_type")))
    if table is not None and "text_config" not in cfg:
        return {f: table[f] for f in MEMORY_FIELDS if f not in given and f in table}
    from transformers import AutoConfig

    try:
        built = AutoConfig.for_model(**cfg)
    except Exception:  # noqa: BLE001 - the analysis reports a config transformers cannot build
        return {}
    text = built.get_text_config() if hasattr(built, "get_text_config") else built
    out = {}
    for field in MEMORY_FIELDS:
        if field not in given and field in text.to_dict():
            out[field] = getattr(text, field, None)
    return out


def max_positions(cfg: dict) -> int | None:
    """max_position_embeddings of the decoder, None when the config gives none."""
    value = _text_part(cfg).get("max_position_embeddings")
    return int(value) if isinstance(value, int | float) and value > 0 else None
