"""Presets, aliases, the shipped analyses, and the --gpus parser."""

from __future__ import annotations

import json

import pytest

from vramplan.errors import VramplanError
from vramplan.hardware import parse_gpus, profiles
from vramplan.model_loader import SHIPPED_DIR, load_model_spec, preset_names, resolve_config, truncate
from vramplan.units import GiB, parse_bytes

REQUIRED = [
    "llama-2-7b",
    "llama-2-13b",
    "llama-2-70b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-3.1-405b",
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.3-70b",
    "mistral-7b",
    "mixtral-8x7b",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-3b",
    "qwen2.5-7b",
    "qwen2.5-14b",
    "qwen2.5-32b",
    "qwen2.5-72b",
    "phi-3-mini",
    "gemma-2-2b",
    "gemma-2-9b",
    "gemma-2-27b",
    "qwen3-0.6b",
    "qwen3-1.7b",
    "qwen3-4b",
    "qwen3-8b",
    "qwen3-14b",
    "qwen3-32b",
    "qwen3-30b-a3b",
    "gemma-3-1b",
    "gemma-3-4b",
    "gemma-3-12b",
    "gemma-3-27b",
    # the models of Answer.AI's fsdp_qlora benchmark (tests/data/published/)
    "yi-34b",
    "mistral-7b-v0.2",
    "mistral-7b-v0.3",
    # models of published fine-tuning memory figures (the QLoRA paper's LLaMA 33B/65B; Unsloth's
    # and axolotl's Phi-4, Mistral-Nemo, Mistral Small 3; Gemma 1)
    "llama-30b",
    "llama-65b",
    "phi-4",
    "mistral-nemo-12b",
    "mistral-small-24b",
    "gemma-7b",
    # Llama 3 (torchtune's llama3 builders, axolotl's examples/llama-3) and Gemma 1 2B
    "llama-3-8b",
    "llama-3-70b",
    "gemma-2b",
]
# published sizes (billions of parameters), rounded as the model cards give them
PUBLISHED = {
    "llama-2-70b": 69.0,
    "llama-3.1-405b": 405.9,
    "mixtral-8x7b": 46.7,
    "llama-2-7b": 6.74,
    "phi-3-mini": 3.82,
    "gemma-2-27b": 27.2,
    "qwen2.5-72b": 72.7,
    "llama-3.1-8b": 8.03,
    # Qwen3 model cards: 0.6B (0.44B non-embedding), 8.2B, 32.8B, 30.5B total / 3.3B active
    "qwen3-0.6b": 0.596,
    "qwen3-8b": 8.19,
    "qwen3-32b": 32.8,
    "qwen3-30b-a3b": 30.5,
    "gemma-3-1b": 1.0,
    # Gemma 3 model cards, vision tower included: 4.3B, 12.2B, 27.4B
    "gemma-3-4b": 4.30,
    "gemma-3-12b": 12.19,
    "gemma-3-27b": 27.43,
    # LLaMA paper (Touvron et al. 2023) Table 2: 32.5B and 65.2B; model cards: Phi-4 14B
    # ("14B parameters", 14.7B on the hub), Mistral-Nemo 12B, Mistral Small 3 24B, Gemma 7B (8.5B)
    "llama-30b": 32.5,
    "llama-65b": 65.2,
    "phi-4": 14.7,
    "mistral-nemo-12b": 12.2,
    "mistral-small-24b": 23.6,
    "gemma-7b": 8.54,
    # Mistral-7B-v0.3's model card: 7.25B
    "mistral-7b-v0.3": 7.25,
    # the Hub's sizes of meta-llama/Meta-Llama-3-8B, -70B and google/gemma-2b: 8.03B, 70.6B, 2.51B
    "llama-3-8b": 8.03,
    "llama-3-70b": 70.6,
    "gemma-2b": 2.51,
}


def test_required_presets_exist():
    assert set(REQUIRED) <= set(preset_names())


@pytest.mark.parametrize("name,billions", PUBLISHED.items())
def test_preset_parameter_counts(name, billions):
    assert load_model_spec(name).params_total / 1e9 == pytest.approx(billions, rel=0.005)


@pytest.mark.parametrize("name", REQUIRED)
def test_shipped_spec_equals_a_fresh_meta_build(name):
    from vramplan.analyze import analyze_config

    _, _, cfg = resolve_config(name)
    shipped = json.loads((SHIPPED_DIR / f"{name}.json").read_text())
    shipped.pop("_config_sha")
    assert json.loads(analyze_config(cfg, name=name).model_dump_json()) == shipped


@pytest.mark.parametrize("name", ["gemma-2-2b", "gemma-3-4b"])  # gemma-3-4b: the depth sits in text_config
def test_truncation_equals_building_fewer_layers(name):
    from vramplan.analyze import analyze_config

    _, _, cfg = resolve_config(name, num_layers=3)
    built = analyze_config(cfg, name=name)
    assert built.num_layers == 3
    assert truncate(load_model_spec(name), 3).model_dump(exclude={"name", "resolved_from"}) == built.model_dump(
        exclude={"name", "resolved_from"}
    )


def test_alias_resolution_is_reported():
    spec = load_model_spec("llama-70b")
    assert spec.name == "llama-2-70b" and spec.resolved_from == "llama-70b"


@pytest.mark.parametrize(
    "text,count,name",
    [("2x24GB", 2, "24GB"), ("rtx-4090", 1, "rtx-4090"), ("2xrtx-3090", 2, "rtx-3090"), ("8x80GB", 8, "80GB")],
)
def test_parse_gpus(text, count, name):
    g = parse_gpus(text)
    assert g.count == count and g.profile.name == name


def test_24gb_means_a_named_24_gib_card():
    # a bare size stands for the slowest known card sold with it (tests/test_hardware.py has the rule)
    g = parse_gpus("1x24GB")
    named = g.profile.display_name.split("(as ")[1].rstrip(")")
    assert profiles()[named].nominal_memory_gb == 24
    assert g.profile.memory_bytes == profiles()[named].memory_bytes <= 24 * GiB


@pytest.mark.parametrize("bad", ["", "x24GB", "2xfoo", "0x24GB", "2x0GB"])
def test_parse_gpus_rejects(bad):
    with pytest.raises(VramplanError) as e:
        parse_gpus(bad)
    assert e.value.flag == "--gpus"


def test_profiles_are_valid_and_complete():
    names = set(profiles())
    assert {
        "rtx-3090",
        "rtx-3090-ti",
        "rtx-4080",
        "rtx-4090",
        "rtx-5090",
        "rtx-a6000",
        "l4",
        "l40s",
        "a100-40gb",
        "a100-80gb",
        "h100-80gb",
        "h200",
    } <= names
    for p in profiles().values():
        assert 0.85 * p.nominal_memory_gb * GiB < p.memory_bytes <= p.nominal_memory_gb * GiB * 1.001


def test_parse_bytes_units():
    assert parse_bytes("24GB") == 24 * GiB == parse_bytes("24GiB")
    assert parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(VramplanError):
        parse_bytes("-3GB")


def test_mistral_v0_2_has_no_sliding_window_where_v0_1_has():
    # mistralai/Mistral-7B-Instruct-v0.2 and mistral-community/Mistral-7B-v0.2 config.json:
    # "sliding_window": null, "rope_theta": 1000000.0; v0.1: 4096
    assert load_model_spec("mistral-7b-v0.2").sdpa_window is None
    assert load_model_spec("mistral-7b").sdpa_window == 4096
    assert load_model_spec("mistralai/Mistral-7B-Instruct-v0.2").name == "mistral-7b-v0.2"
