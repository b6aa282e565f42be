"""Model names as people type them: Hugging Face ids, variants, near misses, the Hub.

``Qwen/Qwen2.5-7B-Instruct``, ``unsloth/Llama-3.2-1B-Instruct-bnb-4bit`` and
``meta-llama/Meta-Llama-3.1-8B`` name checkpoints whose decoder has a preset's shapes:
an instruct, chat or pre-quantized upload of a base model changes token ids, context or
the stored weight format, never the architecture (presets/README.md). An id no preset
matches is fetched from the Hub, config.json only, through huggingface_hub's cache.

``memory_sha`` hashes the config keys that can change the analysis (everything but the
keys listed in ``_NOT_SHAPE``), so a config.json copied from a preset's checkpoint (or an
instruct sibling of it) is answered from the preset's bundled analysis without torch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vramplan.errors import VramplanError

# Upload suffixes that leave the architecture as it is: instruct/chat/base variants
# (-it, -pt: Gemma), Meta's -hf conversions, Unsloth's pre-quantized uploads, Qwen's
# YYMM refreshes (Qwen3-4B-Instruct-2507). Stripped one at a time from the end.
_VARIANT = re.compile(
    r"-(instruct|chat|it|base|hf|pt|thinking|bnb-4bit|unsloth-bnb-4bit|unsloth|4bit|"
    r"(?:2[3-9])(?:0[1-9]|1[0-2]))$"
)
# The same words before a version (Mistral's mistral-7b-instruct-v0.3 is mistral-7b-v0.3's)
_VARIANT_BEFORE_VERSION = re.compile(r"-(instruct|chat|it|base)(?=-v\d)")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")

# Config keys that change no shape the analysis reads (vramplan/analyze.py builds the model on
# the meta device and records Linear/norm/expert shapes, tying, window, soft-capping and the
# dropout probabilities): token ids, position-encoding constants, the context length (plan
# reads it from the config itself), numerics and bookkeeping.
_NOT_SHAPE = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "_name_or_path",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "max_position_embeddings",
        "rms_norm_eps",
        "layer_norm_eps",
        "initializer_range",
        "use_cache",
        "pretraining_tp",
        "quantization_config",
        "unsloth_fixed",
        "unsloth_version",
        "auto_map",
        "output_router_logits",
    }
)


def candidates(model: str) -> list[str]:
    """Lower-cased spellings to look up, most literal first: the id, the name without its
    organisation (and without Meta's "meta-" prefix), then with each variant suffix stripped."""
    key = model.strip().lower()
    out = [key]
    name = key.rsplit("/", 1)[-1]
    names = (name, name[len("meta-") :] if name.startswith("meta-") else None)
    for base in (*names, *(_VARIANT_BEFORE_VERSION.sub("", n) for n in names if n)):
        while base:
            if base not in out:
                out.append(base)
            stripped = _VARIANT.sub("", base)
            base = stripped if stripped != base else None
    return out


def preset_for(model: str, presets: list[str], aliases: dict[str, str]) -> str | None:
    """The preset whose architecture MODEL names, or None."""
    for key in candidates(model):
        if key in presets:
            return key
        if key in aliases:
            return aliases[key]
    return None


def did_you_mean(model: str, presets: list[str], aliases: dict[str, str]) -> str:
    """'; did you mean X, Y?' for a near miss (difflib), else ''."""
    names = presets + [a for a in aliases if "/" not in a]
    close: list[str] = []
    for key in candidates(model):
        close += [c for c in difflib.get_close_matches(key, names, n=3, cutoff=0.6) if c not in close]
    return f"; did you mean {', '.join(close[:3])}?" if close else ""


def looks_like_hub_id(model: str) -> bool:
    return bool(_HF_ID.match(model.strip())) and ".." not in model


def hub_config(repo_id: str, hint: str) -> Path:
    """config.json of a Hub model, from huggingface_hub's cache or downloaded into it (only that
    file). HF_HUB_OFFLINE=1 is honoured by huggingface_hub itself. Failures: one line."""
    local = "; pass its config.json path or model folder instead"
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:
        raise VramplanError(
            f"{repo_id!r} is no preset, and huggingface_hub is not installed to fetch its config.json{local}{hint}",
            "MODEL",
        ) from None
    try:
        return _cached_or_fetched(repo_id.strip(), hf_hub_download)
    except LocalEntryNotFoundError:
        why = (
            "its config.json is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids the download"
            if _offline()
            else "its config.json is not cached and the Hugging Face Hub cannot be reached"
        )
    except GatedRepoError:
        why = "it is gated on the Hugging Face Hub: accept its terms on the model page and log in (`hf auth login`)"
    except RepositoryNotFoundError:
        why = "it is not on the Hugging Face Hub (or is private)"
    except EntryNotFoundError:
        why = "it has no config.json on the Hugging Face Hub"
    except (HfHubHTTPError, OSError) as e:
        why = f"its config.json could not be fetched from the Hugging Face Hub ({type(e).__name__})"
    raise VramplanError(f"{repo_id!r} matches no preset, and {why}{local}{hint}", "MODEL")


def _cached_or_fetched(repo_id: str, hf_hub_download) -> Path:
    """The cached config.json, else one HEAD request (no retries, warnings silenced), then the
    download. huggingface_hub==2.4.0 file_download.py:1160-1190 retries an unreachable Hub five
    times with backoff (23 s, a warning line each); a bad MODEL must be one line, at once."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=True))
    except LocalEntryNotFoundError:
        if _offline():
            raise
    with _hub_warnings_silenced():
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=10)
        except HfHubHTTPError:
            raise  # not found, gated, no config.json: said by the caller
        except Exception as e:  # noqa: BLE001 - httpx's connect/timeout errors: the Hub is out of reach
            raise LocalEntryNotFoundError(f"the Hub cannot be reached ({type(e).__name__})") from None
        return Path(hf_hub_download(repo_id, "config.json"))


@contextmanager
def _hub_warnings_silenced() -> Iterator[None]:
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _shape_only(value, defaults: dict[str, dict]):
    """The keys that can change the analysis, a config's missing keys filled with its model
    type's defaults (a key left out of config.json means that default to transformers)."""
    if isinstance(value, dict):
        mt = value.get("model_type")
        full = {**defaults.get(mt, {}), **value} if isinstance(mt, str) else value
        if full.get("use_sliding_window") is False:
            # Qwen2/Qwen3: no window at all then, whatever sliding_window and max_window_layers
            # say (transformers==5.24.0 models/qwen3/configuration_qwen3.py:86-93)
            full = {k: v for k, v in full.items() if k not in ("sliding_window", "max_window_layers")}
        return {
            k: _shape_only(v, defaults)
            for k, v in full.items()
            if k not in _NOT_SHAPE and not k.startswith("_") and not _no_dropout(k, v)
        }
    if isinstance(value, list):
        return [_shape_only(v, defaults) for v in value]
    return value


def _no_dropout(key: str, value) -> bool:
    """A dropout probability of 0 applies no dropout: the same model as a config without the key
    (analyze._dropouts records only probabilities above 0)."""
    return ("dropout" in key or "pdrop" in key) and value in (0, 0.0) and not isinstance(value, bool)


def memory_sha(cfg: dict, defaults: dict[str, dict] | None = None) -> str:
    """A hash of the keys of a config that can change its analysis, defaults filled in."""
    blob = json.dumps(_shape_only(cfg, defaults or {}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]
