"""GPU profiles, the --gpus size rule, user profiles, overrides and parser bounds."""

from __future__ import annotations

import importlib
import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vramplan import hardware as H
from vramplan.cli import main
from vramplan.errors import VramplanError
from vramplan.hardware import parse_gpus, profiles, supports_bf16
from vramplan.units import GiB, parse_bytes

E = importlib.import_module("vramplan.estimate")  # the package exports a function of that name
BUNDLED = sorted(p.stem for p in (Path(__file__).parent.parent / "hardware_profiles").glob("*.json"))
REQUESTED = {
    "rtx-3060",
    "rtx-3080",
    "rtx-3080-12gb",
    "rtx-3080-ti",
    "rtx-4060-ti-16gb",
    "rtx-4070",
    "rtx-4070-ti",
    "rtx-4070-ti-super",
    "rtx-4080-super",
    "rtx-5070",
    "rtx-5070-ti",
    "rtx-5080",
    "rtx-2080-ti",
    "titan-rtx",
    "t4",
    "v100-16gb",
    "v100-32gb",
    "a10g",
    "a10",
    "rtx-a4000",
    "rtx-a5000",
    "rtx-6000-ada",
    "l40",
    "mi300x",
    "rx-7900-xtx",
}
PRE_AMPERE = {"t4", "rtx-2080-ti", "titan-rtx", "v100-16gb", "v100-32gb"}


@pytest.fixture(autouse=True)
def _empty_user_config(tmp_path, monkeypatch):
    """No test reads the developer's own ~/.config/vramplan/hardware."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_the_requested_cards_have_profiles():
    assert REQUESTED <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_profile_loads_cites_its_figures_and_usable_is_below_total(name):
    p = H.load_profile(Path(__file__).parent.parent / "hardware_profiles" / f"{name}.json")
    assert p.datasheet.strip() and p.memory_bytes_source.strip()
    assert 0.85 * p.nominal_memory_gb * GiB < p.memory_bytes <= p.nominal_memory_gb * GiB
    assert p.fp16_dense_tflops is not None and p.training_tflops > 0
    if p.memory_bytes_source.startswith("estimated"):
        # an estimate says what it was derived from (a measured card, in MiB)
        assert "MiB" in p.memory_bytes_source


def test_pre_ampere_cards_have_no_bf16_and_are_priced_at_fp16():
    for name in PRE_AMPERE:
        p = profiles()[name]
        assert not supports_bf16(p) and p.bf16_dense_tflops is None
        assert p.training_tflops == p.fp16_dense_tflops
    assert all(supports_bf16(p) for n, p in profiles().items() if n not in PRE_AMPERE)


def test_an_estimate_on_a_t4_says_it_has_no_bf16():
    est = E.estimate_config("llama-3.2-1b", "1xt4", method="lora")
    assert any("no bf16" in n and "fp16" in n for n in est.notes)
    assert not any("no bf16" in n for n in E.estimate_config("llama-3.2-1b", "1xl4", method="lora").notes)


def test_an_estimate_on_an_amd_card_says_what_is_not_measured_there():
    est = E.estimate_config("llama-3.2-1b", "1xmi300x", method="lora")
    assert any("ROCm" in n and "flash-attn" in n for n in est.notes)


def test_step_time_on_a_card_without_bf16_uses_its_fp16_rate():
    from vramplan.model_loader import load_model_spec
    from vramplan.setup import TrainingSetup
    from vramplan.throughput import raw_terms

    spec, setup = load_model_spec("llama-3.2-1b"), TrainingSetup(method="lora")
    t4 = profiles()["t4"]
    flops_s, _, _ = raw_terms(spec, setup, t4)
    as_bf16 = t4.model_copy(update={"bf16": True, "bf16_dense_tflops": t4.fp16_dense_tflops})
    assert flops_s == pytest.approx(raw_terms(spec, setup, as_bf16)[0])


# ------------------------------------------------------------------ the size rule


def _speed(p):
    return p.training_tflops, p.memory_bandwidth_gbps


def test_24gb_stands_for_the_rtx_3090_memory_and_no_faster_than_any_24gb_card():
    g = parse_gpus("2x24GB")
    assert g.profile.memory_bytes == profiles()["rtx-3090"].memory_bytes
    assert g.profile.training_tflops <= profiles()["a10g"].training_tflops
    assert g.notes[0].startswith("24GB as rtx-3090 ")


def test_12gb_is_not_priced_faster_than_an_rtx_3090():
    g, ref = parse_gpus("1x12GB").profile, profiles()["rtx-3090"]
    assert g.training_tflops <= ref.training_tflops and g.memory_bandwidth_gbps <= ref.memory_bandwidth_gbps


def test_a_known_size_names_its_card_and_is_priced_as_the_slowest_of_that_size():
    nvidia = [p for p in profiles().values() if p.vendor == H.Vendor.NVIDIA]
    for size in sorted({p.nominal_memory_gb for p in nvidia}):
        g = parse_gpus(f"1x{size:g}GB")
        same = [p for p in nvidia if p.nominal_memory_gb == size]
        named = [p for p in same if g.notes[0].startswith(f"{size:g}GB as {p.name} ")]
        assert len(named) == 1, (size, g.notes)
        assert g.profile.memory_bytes == named[0].memory_bytes
        assert g.profile.training_tflops <= min(
            p.training_tflops for p in same if p.bf16 or not any(q.bf16 for q in same)
        )


@pytest.mark.parametrize("size", ["12.5", "13", "20", "100", "200", "8", "1"])
def test_an_unknown_size_is_never_priced_above_the_known_cards_of_the_next_smaller_size(size):
    g = parse_gpus(f"1x{size}GB")
    nvidia = [p for p in profiles().values() if p.vendor == H.Vendor.NVIDIA]
    smaller = [p.nominal_memory_gb for p in nvidia if p.nominal_memory_gb <= float(size)]
    below = [p for p in nvidia if p.nominal_memory_gb == max(smaller)] if smaller else nvidia
    assert g.profile.training_tflops <= min(p.training_tflops for p in below if p.bf16)
    assert g.notes and "priced as" in g.notes[0]


def _usable(size: Decimal) -> int:
    return parse_gpus(f"1x{size}GB").profile.memory_bytes


SIZES = st.decimals(min_value=Decimal("0.5"), max_value=Decimal(300), places=2)


@settings(max_examples=60, deadline=None)
@given(SIZES, SIZES)
@example(Decimal(141), Decimal("141.5"))
@example(Decimal("23.99"), Decimal(24))
@example(Decimal(24), Decimal("24.01"))
def test_usable_memory_is_monotone_in_the_size_and_never_above_it(a, b):
    lo, hi = sorted((a, b))
    assert _usable(lo) <= _usable(hi)
    assert _usable(lo) <= lo * GiB and _usable(hi) <= hi * GiB


def test_15_67gb_is_not_more_than_15_67_gib():
    assert _usable(Decimal("15.67")) <= Decimal("15.67") * GiB


# ------------------------------------------------------------------ bounds


@pytest.mark.parametrize(
    "text", ["9" * 400 + "GB", "1x" + "9" * 400 + "GB", "9" * 5000 + "x24GB", "4097x24GB", "2049GB", "0.0000001GB"]
)
def test_absurd_sizes_and_counts_are_one_line_errors(text):
    with pytest.raises(VramplanError) as e:
        parse_gpus(text)
    assert e.value.flag == "--gpus" and "\n" not in str(e.value) and len(str(e.value)) < 300


def test_the_limits_are_named_in_the_error():
    with pytest.raises(VramplanError, match="4096"):
        parse_gpus("5000x24GB")
    with pytest.raises(VramplanError, match="2048 GB"):
        parse_gpus("1x3000GB")
    assert parse_gpus("4096x80GB").count == 4096 and parse_gpus("2048GB").profile.memory_bytes <= 2048 * GiB


def test_an_overflowing_size_flag_is_a_one_line_error():
    with pytest.raises(VramplanError) as e:
        parse_bytes("9" * 400 + "GB", "--host-ram")
    assert e.value.flag == "--host-ram" and "\n" not in str(e.value)


def test_the_cli_answers_an_overflowing_gpu_size_with_exit_2(capsys):
    assert main(["estimate", "llama-3.2-1b", "--gpus", "9" * 400 + "GB", "--method", "lora"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--gpus" in err


# ------------------------------------------------------------------ user profiles


def _user_dir(tmp_path) -> Path:
    d = tmp_path / "config" / "vramplan" / "hardware"
    d.mkdir(parents=True)
    return d


def test_user_profiles_load_from_xdg_config_home(tmp_path):
    d = _user_dir(tmp_path)
    (d / "my-card.json").write_text(
        json.dumps(
            {
                "name": "my-card",
                "display_name": "My Card",
                "nominal_memory_gb": 20,
                "memory_bytes": 20 * GiB - 500 * 2**20,
                "bf16_dense_tflops": 50.0,
                "memory_bandwidth_gbps": 500.0,
            }
        )
    )
    (d / "old-card.toml").write_text(
        'name = "old-card"\ndisplay_name = "Old Card"\nnominal_memory_gb = 8\n'
        f"memory_bytes = {7 * GiB}\nbf16 = false\nfp16_dense_tflops = 20.0\n"
        "memory_bandwidth_gbps = 300.0\n"
    )
    g = parse_gpus("2xmy-card")
    assert g.count == 2 and g.profile.training_tflops == 50.0 and g.profile.memory_bytes == 20 * GiB - 500 * 2**20
    assert not supports_bf16(parse_gpus("old-card").profile)
    # a user card counts as a known card of its size
    assert "as my-card" in parse_gpus("1x20GB").notes[0]


_GOOD = {
    "name": "bad",
    "display_name": "B",
    "nominal_memory_gb": 8,
    "memory_bytes": GiB,
    "bf16_dense_tflops": 1,
    "memory_bandwidth_gbps": 1,
}


@pytest.mark.parametrize(
    "text,key",
    [
        (
            json.dumps({k: v for k, v in _GOOD.items() if k != "bf16_dense_tflops"}),
            "key (profile)",
        ),  # bf16 without its rate
        (json.dumps({**_GOOD, "colour": "red"}), "key colour"),
        (json.dumps({**_GOOD, "memory_bytes": 9 * GiB}), "key (profile)"),  # usable above the sold size
        (json.dumps({**_GOOD, "nominal_memory_gb": "lots"}), "key nominal_memory_gb"),
        (json.dumps({**_GOOD, "name": "other"}), "key name"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_user_profile_is_one_line_naming_the_file_and_key(tmp_path, text, key):
    (_user_dir(tmp_path) / "bad.json").write_text(text)
    with pytest.raises(VramplanError) as e:
        profiles()
    msg = str(e.value)
    assert "bad.json" in msg and key in msg and "\n" not in msg


# ------------------------------------------------------------------ overrides


def test_gpu_tflops_bandwidth_and_reserve_override_the_resolved_card():
    g = E.resolve_gpus("rtx-4090", gpu_tflops="100", gpu_bandwidth=500, reserve="1GiB")
    base = profiles()["rtx-4090"]
    assert g.profile.training_tflops == 100 and g.profile.memory_bandwidth_gbps == 500
    assert g.profile.memory_bytes == base.memory_bytes - GiB
    assert len(g.notes) == 3
    t4 = E.resolve_gpus("t4", gpu_tflops=30)
    assert t4.profile.fp16_dense_tflops == 30 and t4.profile.training_tflops == 30


@pytest.mark.parametrize(
    "kw,flag",
    [
        ({"gpu_tflops": "fast"}, "--gpu-tflops"),
        ({"gpu_tflops": 0}, "--gpu-tflops"),
        ({"gpu_tflops": "inf"}, "--gpu-tflops"),
        ({"gpu_bandwidth": -1}, "--gpu-bandwidth"),
        ({"gpu_bandwidth": "1e400"}, "--gpu-bandwidth"),
        ({"reserve": "30GB"}, "--reserve"),
        ({"reserve": "lots"}, "--reserve"),
        ({"reserve": "9" * 400 + "GB"}, "--reserve"),
    ],
)
def test_bad_overrides_name_their_flag(kw, flag):
    with pytest.raises(VramplanError) as e:
        E.resolve_gpus("rtx-4090", **kw)
    assert e.value.flag == flag and "\n" not in str(e.value)


def test_an_estimate_carries_the_override_notes():
    est = E.estimate_config("llama-3.2-1b", E.resolve_gpus("1x24GB", reserve="2GB"), method="lora")
    assert any("as a" in n or "as rtx" in n for n in est.notes) and any("--reserve" in n for n in est.notes)
    assert est.gpu_memory_bytes == parse_gpus("1x24GB").profile.memory_bytes - 2 * GiB


# ------------------------------------------------------------------ detection


def _fake_nvml(monkeypatch, cards):
    """NVML as vramplan.nvml reports it: (name, total, used) per GPU, or None (no driver)."""
    from vramplan import nvml

    def devices():
        if cards is None:
            raise nvml.NvmlUnavailable("no driver")
        return [nvml.NvmlDevice(i, n, t, t - u, u) for i, (n, t, u) in enumerate(cards)], "test"

    monkeypatch.setattr(nvml, "devices", devices)
    monkeypatch.setattr(nvml, "first_device", lambda: (len(cards), devices()[0][0]) if cards else None)


def test_detected_gpus_reserve_what_nvml_reports_in_use(monkeypatch):
    _fake_nvml(
        monkeypatch, [("NVIDIA GeForce RTX 4090", 25757220864, GiB), ("NVIDIA GeForce RTX 4090", 25757220864, 2 * GiB)]
    )
    assert H.detected_used_bytes() == 2 * GiB
    g = E.resolve_gpus(None)
    assert g.count == 2 and g.profile.memory_bytes == profiles()["rtx-4090"].memory_bytes - 2 * GiB
    assert any("NVML" in n for n in g.notes)
    assert E.resolve_gpus(None, reserve=1).profile.memory_bytes == profiles()["rtx-4090"].memory_bytes - 1


def test_an_unknown_detected_card_uses_the_size_rule(monkeypatch):
    _fake_nvml(monkeypatch, [("NVIDIA Mystery 24GB", 24 * GiB, 0)])
    g = H.detect_gpus()
    assert g.profile.display_name == "NVIDIA Mystery 24GB"
    assert g.profile.memory_bytes <= parse_gpus("1x24GB").profile.memory_bytes
    assert "no profile" in g.notes[0]


def test_no_nvidia_gpu_says_what_the_tool_can_do_here(monkeypatch):
    _fake_nvml(monkeypatch, None)
    with pytest.raises(VramplanError) as e:
        E.resolve_gpus(None)
    msg = str(e.value)
    assert "no NVIDIA GPU" in msg and "--gpus" in msg and "--device cpu" in msg and "\n" not in msg
    assert H.no_gpu_message() in msg


@pytest.mark.parametrize(
    "text,name",
    [
        ("8xh100", "h100-80gb"),  # the profile file's alias
        ("1xRTX4090", "rtx-4090"),
        ("geforce_rtx_3090", "rtx-3090"),
        ("2x4090", "rtx-4090"),
        ("NVIDIA RTX 4090", "rtx-4090"),
        ("h200", "h200"),
    ],
)
def test_usual_spellings_of_a_card_name_resolve_and_say_so(text, name):
    from vramplan.hardware import parse_gpus

    g = parse_gpus(text)
    assert g.profile.name == name
    assert (name in text) or any(f"read as {name}" in n for n in g.notes)


@pytest.mark.parametrize("text,cards", [("a100", "a100-40gb, a100-80gb"), ("1xv100", "v100-16gb, v100-32gb")])
def test_a_family_with_several_sizes_is_one_line_listing_them(text, cards):
    from vramplan.errors import VramplanError
    from vramplan.hardware import parse_gpus

    with pytest.raises(VramplanError, match=f"is more than one card: {cards}") as e:
        parse_gpus(text)
    assert e.value.flag == "--gpus"


def test_a_name_that_only_prefixes_another_card_is_not_guessed():
    """An RTX 4060 has 8 GB; the rtx-4060-ti-16gb profile it prefixes has 16: refused, naming both."""
    with pytest.raises(VramplanError, match="unknown GPU 'rtx-4060' \\(not rtx-4060-ti-16gb") as e:
        parse_gpus("1xrtx-4060")
    assert e.value.flag == "--gpus"
