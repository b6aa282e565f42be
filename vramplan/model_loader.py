"""MODEL (preset, alias, config.json path or directory) -> ModelSpec.

The model is built from its config.json on the meta device (no weights allocated) by
vramplan.analyze and its modules are walked: embeddings, every Linear inside the decoder
layers with its shape, norms, lm_head, tied weights, MoE expert tensors, biases. The
analysis is cached on disk (keyed by the config, the layer override and the transformers
version), and presets ship theirs, so repeated estimates neither rebuild nor import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from vramplan import model_names
from vramplan.analyze import analyze_config
from vramplan.config_check import check_config
from vramplan.config_checks import defaulted_fields, max_positions
from vramplan.errors import VramplanError
from vramplan.files import parse_json, read_regular
from vramplan.limits import MAX_CONFIG_BYTES, MAX_LAYERS, check_int
from vramplan.model_spec import ModelSpec

PRESET_DIR = Path(__file__).parent / "presets" / "models"
ALIAS_FILE = Path(__file__).parent / "presets" / "aliases.json"
SHIPPED_DIR = Path(__file__).parent / "presets" / "specs"
DEFAULTS_FILE = Path(__file__).parent / "presets" / "config_defaults.json"
SPEC_VERSION = 9  # bump when the analysis output changes


# ---------------------------------------------------------------- config resolution


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@lru_cache(maxsize=1)
def aliases() -> dict[str, str]:
    return json.loads(ALIAS_FILE.read_text()) if ALIAS_FILE.exists() else {}


def _read_config(path: Path, shown: str) -> dict:
    """A config.json: a regular file of at most MAX_CONFIG_BYTES holding a JSON object."""
    cfg = parse_json(read_regular(path, MAX_CONFIG_BYTES, "MODEL"), shown, "MODEL")
    if not isinstance(cfg, dict):
        raise VramplanError(f"{shown!r} is not a model config (a JSON object with model_type)", "MODEL")
    return cfg


def _preset(model: str) -> tuple[str, str | None, dict]:
    key = model.lower()
    alias = None
    if key not in preset_names() and key in aliases():
        alias, key = model, aliases()[key]
    if key not in preset_names():
        raise VramplanError(
            f"unknown model {model[:80]!r}; presets: {', '.join(preset_names())}; "
            f"aliases: {', '.join(sorted(a for a in aliases() if '/' not in a))}; "
            "or give a config.json path",
            "MODEL",
        )
    return key, alias, json.loads((PRESET_DIR / f"{key}.json").read_text())


def resolve_config(model: str, num_layers: int | None = None) -> tuple[str, str | None, dict]:
    """MODEL (preset, alias, config.json path or directory) -> (name, alias_used, config dict),
    its memory-shaping fields checked (vramplan.config_check) before anything is built."""
    if not isinstance(model, str) or not model.strip():
        raise VramplanError(f"give a preset name, a config.json path or a directory; got {model!r}", "MODEL")
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise VramplanError(f"directory {model!r} holds no config.json", "MODEL")
    if path.suffix == ".json" or path.exists():
        name, alias = str(path), None
        cfg = _read_config(path, model)
    else:
        key = resolve_preset_name(model)
        alias = model if key is not None and key != model.strip().lower() else None
        if key is None:
            cfg, name = _hub_config(model), model.strip()
        else:
            cfg = json.loads((PRESET_DIR / f"{key}.json").read_text())
            name = key
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise VramplanError(f"{model!r} is not a model config (no model_type)", "MODEL")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    check_config(cfg, name)
    if num_layers is not None:
        check_int(num_layers, "--num-layers", MAX_LAYERS)
        # a multimodal config (Gemma 3 4B+) keeps the decoder's depth in its text_config
        for part in [cfg] + ([cfg["text_config"]] if isinstance(cfg.get("text_config"), dict) else []):
            part["num_hidden_layers"] = num_layers
            for key in ("layer_types", "mlp_only_layers"):
                if isinstance(part.get(key), list):
                    part[key] = part[key][:num_layers]
    return name, alias, cfg


def resolve_preset_name(model: str) -> str | None:
    """The preset MODEL names (a preset, an alias, or a Hugging Face id of it or of an
    instruct/chat/pre-quantized variant: vramplan.model_names), else None."""
    return model_names.preset_for(model, preset_names(), aliases())


def _hub_config(model: str) -> dict:
    """A name no preset matches: a Hugging Face id's config.json (cached), else one line."""
    hint = model_names.did_you_mean(model, preset_names(), aliases())
    if not model_names.looks_like_hub_id(model):
        raise VramplanError(
            f"unknown model {model!r}{hint} (presets: {', '.join(preset_names())}; "
            f"aliases: {', '.join(sorted(a for a in aliases() if '/' not in a))}); or give a Hugging Face id "
            "(org/name), a config.json path or a model folder",
            "MODEL",
        )
    path = model_names.hub_config(model, hint)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VramplanError(
            f"the cached config.json of {model!r} ({path}) is not readable JSON ({e})", "MODEL"
        ) from None


@lru_cache(maxsize=1)
def _presets_by_shape() -> dict[str, str]:
    """memory_sha -> preset, for answering a config.json with a preset's shapes from its bundled analysis."""
    out: dict[str, str] = {}
    for name in preset_names():
        cfg = json.loads((PRESET_DIR / f"{name}.json").read_text())
        out.setdefault(model_names.memory_sha(cfg, _config_defaults()), name)
    return out


@lru_cache(maxsize=1)
def _config_defaults() -> dict[str, dict]:
    """model_type -> its config class's scalar defaults (scripts/build_preset_specs.py)."""
    return json.loads(DEFAULTS_FILE.read_text()) if DEFAULTS_FILE.exists() else {}


def _shipped_same_shape(cfg: dict) -> ModelSpec | None:
    """The bundled analysis of the preset whose memory-shaping keys equal this config's."""
    preset = _presets_by_shape().get(model_names.memory_sha(cfg, _config_defaults()))
    if preset is None:
        return None
    own = {k: v for k, v in json.loads((PRESET_DIR / f"{preset}.json").read_text()).items() if not k.startswith("_")}
    return _shipped(preset, own)


# ---------------------------------------------------------------- cache


def _cache_dir() -> Path:
    base = os.environ.get("VRAMPLAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vramplan"
    )
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
    check_int(num_layers, "--num-layers", MAX_LAYERS)
    if num_layers > spec.num_layers:
        # a deeper model is a different model: say so rather than estimate the full depth
        raise VramplanError(
            f"{spec.name} has {spec.num_layers} decoder layers; truncation takes 1 to "
            f"{spec.num_layers}, got {num_layers}",
            "--num-layers",
        )
    if num_layers == spec.num_layers:
        return spec
    dropped = sum(l.numel for l in spec.layers[num_layers:])
    return spec.model_copy(
        update={
            "layers": spec.layers[:num_layers],
            "num_layers": num_layers,
            "params_total": spec.params_total - dropped,
        }
    )


def _full_spec(name: str, cfg: dict, use_cache: bool) -> ModelSpec:
    shipped = (_shipped(name, cfg) or _shipped_same_shape(cfg)) if use_cache else None
    if shipped is not None:
        return shipped
    path = _cache_dir() / f"{_cache_key(cfg)}.json"
    if use_cache and path.exists():
        try:
            return ModelSpec.model_validate_json(path.read_text())
        except ValueError:
            pass  # stale or corrupt cache entry: rebuild
    try:
        spec = analyze_config(cfg, name=name)
    except VramplanError as e:  # say which file transformers could not build
        raise VramplanError(f"{name}: {e.message}", e.flag) from None
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
    # the cached analysis is keyed by the config alone: it may carry another file's name
    spec = _full_spec(name, cfg, use_cache).model_copy(update={"name": name, "resolved_from": alias})
    if num_layers is not None:
        spec = truncate(spec, num_layers)
    # issue 16: what a user's config left to transformers, and its context (vramplan.config_checks)
    defaulted = defaulted_fields(cfg, _config_defaults()) if name not in preset_names() else {}
    return spec.model_copy(
        update={"name": name, "resolved_from": alias, "defaulted": defaulted, "max_positions": max_positions(cfg)}
    )
