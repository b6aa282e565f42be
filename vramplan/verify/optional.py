"""Optional (GPU-side) libraries verify imports when it runs a step."""

from __future__ import annotations

from vramplan.errors import VramplanError


def need(module: str, what: str):
    """Import an optional (GPU-side) library or say which one is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip = {"galore_torch": "galore-torch"}.get(module.split(".")[0], module.split(".")[0])
        raise VramplanError(f"{what} needs the '{pip}' package ({e}); pip install 'vramplan[verify]'") from None
