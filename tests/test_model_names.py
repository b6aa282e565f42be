"""Model names as people type them, the Hub's config.json, and configs answered from a preset
(issue 14 items 3 and 4). Expected presets were read off the model cards and presets/README.md;
the Hub is a pre-filled huggingface_hub cache folder, never the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_config_cli import LLAMA3_8B, fill_hub_cache
from vramplan.cli import main
from vramplan.model_loader import DEFAULTS_FILE, PRESET_DIR, load_model_spec, resolve_preset_name
from vramplan.model_names import memory_sha

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "typed,preset",
    [
        ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
        ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama-3.1-70b"),
        ("unsloth/Llama-3.2-1B-Instruct-bnb-4bit", "llama-3.2-1b"),
        ("unsloth/Qwen2.5-7B-Instruct-unsloth-bnb-4bit", "qwen2.5-7b"),
        ("google/gemma-2-9b-it", "gemma-2-9b"),
        ("google/gemma-3-1b-pt", "gemma-3-1b"),
        ("Qwen/Qwen3-4B-Base", "qwen3-4b"),
        ("Qwen/Qwen3-4B-Instruct-2507", "qwen3-4b"),
        ("NousResearch/Meta-Llama-3.1-8B", "llama-3.1-8b"),
        # Mistral's instruct word sits before the version
        ("unsloth/mistral-7b-instruct-v0.3-bnb-4bit", "mistral-7b-v0.3"),
        ("mistralai/Mistral-7B-v0.3", "mistral-7b-v0.3"),
        ("NousResearch/Meta-Llama-3-8B", "llama-3-8b"),
        ("meta-llama/Meta-Llama-3-70B-Instruct", "llama-3-70b"),
        ("google/gemma-2b", "gemma-2b"),  # Gemma 1, not Gemma 2 2B
        ("google/gemma-2-2b-it", "gemma-2-2b"),
        ("LLAMA-3.1-8B", "llama-3.1-8b"),
        ("llama-8b", "llama-3.1-8b"),
    ],
)
def test_ids_and_variants_map_to_their_preset(typed, preset):
    assert resolve_preset_name(typed) == preset


@pytest.mark.parametrize(
    "typed", ["meta-llama/CodeLlama-7b-hf", "Qwen/Qwen2.5-Coder-7B", "mistralai/Codestral-22B-v0.1", "qwen2.5-7b-coder"]
)
def test_other_checkpoints_are_not_guessed(typed):
    """A Code Llama, a Coder or Codestral model are other checkpoints: fetched, not guessed."""
    assert resolve_preset_name(typed) is None


HUB_ONLY = "NousResearch/Hermes-2-Pro-Llama-3-8B"  # a Llama 3 8B fine-tune no preset or alias names


def _env(tmp_path: Path, **extra) -> dict:
    cache = tmp_path / "hub"
    if not cache.exists():
        fill_hub_cache(cache, {HUB_ONLY: LLAMA3_8B})
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "VRAMPLAN_CACHE": str(tmp_path / "vp"),
        "PYTHONPATH": str(ROOT),
    }
    return {**env, **extra}


# Loads MODEL and says whether torch or transformers got imported on the way.
_PROBE = (
    "import sys, json; from vramplan.model_loader import load_model_spec; s = load_model_spec(sys.argv[1]); "
    "print(json.dumps([s.name, s.params_total, 'torch' in sys.modules or 'transformers' in sys.modules]))"
)


def _probe(model: str, env: dict) -> list:
    out = subprocess.run([sys.executable, "-c", _PROBE, model], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_hub_id_from_the_cache_answered_from_the_preset(tmp_path):
    """A fine-tune no preset names, with Llama 3 8B's config.json (Llama 3.1 8B's shapes: only
    its context and rope differ): its cached config.json is answered from a preset's bundled
    analysis, without torch."""
    name, params, imported = _probe(HUB_ONLY, _env(tmp_path))
    assert (name, params, imported) == (HUB_ONLY, 8_030_261_248, False)


def test_local_folder_with_a_presets_config(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    name, params, imported = _probe(str(folder), _env(tmp_path))
    assert params == 8_030_261_248 and not imported


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
def test_a_changed_shape_is_not_a_preset(tmp_path):
    """One memory-shaping key off (the MLP width) and the preset's analysis must not answer."""
    cfg = {**LLAMA3_8B, "intermediate_size": 14336 + 256, "num_hidden_layers": 2}
    assert memory_sha(cfg) != memory_sha(LLAMA3_8B)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    _, params, imported = _probe(str(path), _env(tmp_path))
    # 2 layers of Llama 3.1 8B with a 14592-wide MLP: embed + head + 2 x (attention + MLP + 2 norms) + norm
    layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14592 + 2 * 4096
    assert params == 2 * 128256 * 4096 + 2 * layer + 4096 and imported
    cached = list((tmp_path / "vp" / "specs").glob("*.json"))
    assert len(cached) == 1  # the meta build is cached for the next run


def test_offline_and_not_cached_is_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vramplan.cli",
            "estimate",
            "someorg/Some-Model-7B",
            "--gpus",
            "rtx-4090",
            "--method",
            "lora",
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "HF_HUB_OFFLINE=1" in out.stderr and "config.json path or model folder" in out.stderr


def test_unreachable_hub_is_one_line_without_retries(tmp_path):
    """Online but the Hub out of reach (a closed local port as its endpoint): huggingface_hub
    would retry five times with a warning line each; the error is one line, and says why."""
    env = _env(tmp_path)
    del env["HF_HUB_OFFLINE"]
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    out = subprocess.run(
        [sys.executable, "-m", "vramplan.cli", "estimate", "someorg/Some-Model-7B", "--gpus", "rtx-4090"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "cannot be reached" in out.stderr and "Retrying" not in out.stderr


def test_near_miss_gets_did_you_mean(capsys):
    assert main(["estimate", "llama3.1-8b", "--gpus", "rtx-4090", "--method", "lora"]) == 2
    err = capsys.readouterr().err
    assert "did you mean llama-3.1-8b" in err and err.count("\n") == 1


def test_every_preset_has_its_own_shape_hash_but_the_llama_3_twins():
    """Llama 3, 3.1 and 3.3 70B share every shape, as Llama 3 and 3.1 8B do (presets/README.md);
    no other two presets do."""
    defaults = json.loads(DEFAULTS_FILE.read_text())
    shas: dict[str, list[str]] = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        shas.setdefault(memory_sha(json.loads(path.read_text()), defaults), []).append(path.stem)
    twins = sorted(names for names in shas.values() if len(names) > 1)
    assert twins == [["llama-3-70b", "llama-3.1-70b", "llama-3.3-70b"], ["llama-3-8b", "llama-3.1-8b"]]


def test_config_defaults_are_the_installed_transformers():
    """presets/config_defaults.json is what scripts/build_preset_specs.py writes (rerun it when this fails)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_preset_specs
    finally:
        sys.path.pop(0)
    shipped = json.loads(DEFAULTS_FILE.read_text())
    assert build_preset_specs.config_defaults(set(shipped)) == shipped


def test_spec_of_a_hub_variant_equals_the_preset():
    assert load_model_spec("Qwen/Qwen2.5-7B-Instruct").params_total == load_model_spec("qwen2.5-7b").params_total
