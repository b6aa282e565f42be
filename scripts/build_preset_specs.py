"""Regenerate vramplan/presets/specs/*.json: the meta-device analysis of every preset, and
vramplan/presets/config_defaults.json: the installed transformers' config defaults of the
presets' model types (a config.json that leaves a key out means that default; model_names.memory_sha
fills them in before hashing, so it can be matched to a preset without importing transformers).

Run after adding or changing a preset. tests/test_presets.py rebuilds them and fails if
a shipped spec differs from what the analyzer produces with the installed transformers.
"""

from __future__ import annotations

import json

from vramplan.analyze import analyze_config
from vramplan.model_loader import DEFAULTS_FILE, SHIPPED_DIR, config_sha, preset_names, resolve_config


def model_types(cfg: dict) -> set[str]:
    """The model_type of a config and of every nested config in it (text_config, vision_config)."""
    out = {cfg["model_type"]} if isinstance(cfg.get("model_type"), str) else set()
    for value in cfg.values():
        if isinstance(value, dict):
            out |= model_types(value)
    return out


def config_defaults(types: set[str]) -> dict[str, dict]:
    """Scalar defaults of each model type's config class (lists and nested configs are left out:
    they are derived from other keys, or normalised on their own; `transformers_version` is the
    installed release's stamp, not a default of the model)."""
    from transformers import AutoConfig

    out = {}
    for t in sorted(types):
        d = AutoConfig.for_model(t).to_dict()
        out[t] = {
            k: v
            for k, v in sorted(d.items())
            if not isinstance(v, (dict, list)) and not k.startswith("_") and k != "transformers_version"
        }
    return out


def main() -> None:
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    types = set().union(*(model_types(resolve_config(name)[2]) for name in preset_names()))
    DEFAULTS_FILE.write_text(json.dumps(config_defaults(types), indent=1) + "\n")
    for name in preset_names():
        _, _, cfg = resolve_config(name)
        spec = analyze_config(cfg, name=name)
        data = {"_config_sha": config_sha(cfg), **json.loads(spec.model_dump_json())}
        (SHIPPED_DIR / f"{name}.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")
        print(f"{name:16s} {spec.params_total / 1e9:8.2f} B params, {spec.num_layers} layers")


if __name__ == "__main__":
    main()
