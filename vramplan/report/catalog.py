"""What is bundled and what is here: model presets, GPU profiles, the GPUs NVML sees."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from vramplan.hardware import profiles
from vramplan.model_loader import PRESET_DIR, aliases, preset_names
from vramplan.nvml import NvmlDevice
from vramplan.units import GiB


def preset_source(name: str) -> tuple[str, str | None, str | None]:
    """(model card id, revision, note) of a bundled preset: its `_source`, `_revision` and
    `_note` keys (vramplan/presets/README.md; the loader drops every `_` key)."""
    raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
    return raw.get("_source", "unknown"), raw.get("_revision"), raw.get("_note")


def print_models(console: Console | None = None) -> None:
    """Each preset with the model card it was copied from, so a user knows which version it is."""
    console = console or Console()
    t = Table(title="model presets (each copied from the config.json of the model card shown)")
    t.add_column("preset", no_wrap=True)
    t.add_column("source (model card)")
    t.add_column("revision")
    t.add_column("aliases")
    names = aliases()
    notes = []
    for name in preset_names():
        source, revision, note = preset_source(name)
        t.add_row(
            name,
            source,
            revision or "not pinned (main when copied)",
            ", ".join(sorted(a for a, v in names.items() if v == name and "/" not in a)),
        )
        if note:
            notes.append(f"{name}: {note}")
    console.print(t)
    for note in notes:
        console.print(f"note: {note}")
    console.print("another version or fine-tune: give its config.json (a path or a directory) as MODEL")


def print_hardware(console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title="GPU profiles")
    for col in ("name", "GPU", "usable GiB", "TFLOP/s (bf16, else fp16)", "GB/s", "host link"):
        t.add_column(col)
    for p in profiles().values():
        t.add_row(
            p.name,
            p.display_name,
            f"{p.memory_bytes / GiB:.2f}",
            f"{p.training_tflops:g}",
            f"{p.memory_bandwidth_gbps:g}",
            p.host_link,
        )
    console.print(t)


def profile_for(nvml_name: str) -> str | None:
    """The bundled profile whose NVML names include this GPU's, if any."""
    return next((p.name for p in profiles().values() if nvml_name in p.nvml_names), None)


def gpus_json(devices: list[NvmlDevice], driver: str | None, message: str | None) -> dict:
    """``vramplan gpus --format json``: one entry per GPU, and why there are none."""
    return {
        "gpus": [
            {
                "index": d.index,
                "name": d.name,
                "total_bytes": d.total_bytes,
                "free_bytes": d.free_bytes,
                "used_bytes": d.used_bytes,
                "driver": driver,
                "profile": profile_for(d.name),
            }
            for d in devices
        ],
        "message": message,
    }


def print_gpus(devices: list[NvmlDevice], driver: str, console: Console | None = None) -> None:
    console = console or Console()
    t = Table()
    for col in ("#", "name", "total GiB", "free GiB", "driver", "profile"):
        t.add_column(col)
    for d in devices:
        t.add_row(
            str(d.index),
            d.name,
            f"{d.total_bytes / GiB:.2f}",
            f"{d.free_bytes / GiB:.2f}",
            driver,
            profile_for(d.name) or "(none: estimates use a generic profile of this size)",
        )
    console.print(t)
