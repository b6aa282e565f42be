"""Regenerate vramplan/presets/specs/*.json: the meta-device analysis of every preset.

Run after adding or changing a preset. tests/test_presets.py rebuilds them and fails if
a shipped spec differs from what the analyzer produces with the installed transformers.
"""
from __future__ import annotations

import json

from vramplan.analyze import analyze_config
from vramplan.model_loader import SHIPPED_DIR, config_sha, preset_names, resolve_config


def main() -> None:
    SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    for name in preset_names():
        _, _, cfg = resolve_config(name)
        spec = analyze_config(cfg, name=name)
        data = {"_config_sha": config_sha(cfg), **json.loads(spec.model_dump_json())}
        (SHIPPED_DIR / f"{name}.json").write_text(json.dumps(data, separators=(",", ":")) + "\n")
        print(f"{name:16s} {spec.params_total / 1e9:8.2f} B params, {spec.num_layers} layers")


if __name__ == "__main__":
    main()
