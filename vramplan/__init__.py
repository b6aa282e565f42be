"""vramplan: will this training run fit these GPUs, and where does the memory go?

Data flows one way: model spec -> training setup -> memory model -> estimate ->
plan -> report/plot. ``verify`` measures the same categories on a real GPU.

Importing the package is cheap (nothing but the standard library): the names below load
their modules on first use, so the command line (vramplan.cli.main) holds the process
before numpy or pydantic load. The public functions validate every argument through the
same models as the command line and raise VramplanError (a ValueError) naming the argument.
"""

from __future__ import annotations

import functools as _functools
import sys as _sys
import types as _types
from importlib import import_module as _import_module

__all__ = [
    "Category",
    "Method",
    "Optim",
    "Precision",
    "Quant",
    "TrainingSetup",
    "VramplanError",
    "estimate",
    "load_model",
    "plan",
    "plot_breakdown",
]
__version__ = "0.1.0"

_LAZY = {
    "Category": "vramplan.categories",
    "VramplanError": "vramplan.errors",
    "Method": "vramplan.setup",
    "Optim": "vramplan.setup",
    "Precision": "vramplan.setup",
    "Quant": "vramplan.setup",
    "TrainingSetup": "vramplan.setup",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vramplan' has no attribute {name!r}")


def _argument(flag: str | None) -> str | None:
    """The Python argument for a command-line flag: --batch-size -> batch_size, MODEL -> model."""
    if flag is None:
        return None
    return {"-o": "path", "FILE": "file"}.get(flag, flag.lstrip("-").replace("-", "_").lower())


def _api(fn):
    """Errors name the Python argument at fault, not the command-line flag."""

    @_functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from vramplan.errors import VramplanError

        try:
            return fn(*args, **kwargs)
        except VramplanError as e:
            raise type(e)(e.message, _argument(e.flag)) from None

    return wrapper


def _model_arg(model):
    from vramplan.errors import VramplanError
    from vramplan.model_spec import ModelSpec

    if not isinstance(model, (str, ModelSpec)):
        raise VramplanError(
            f"must be a preset name, a config.json path or a ModelSpec; got {type(model).__name__}", "MODEL"
        )
    return model


@_api
def estimate(model, gpus=None, num_layers=None, host_ram=None, **setup):
    """Estimate one configuration. ``model``: preset name, config path or ModelSpec.

    ``setup`` takes TrainingSetup's fields (method, precision, optim, batch_size, ...);
    ``host_ram``: bytes or a size with a unit ("128GB").
    """
    from vramplan.estimate import estimate_config
    from vramplan.setup import check_method_fields

    # lora_r=64 with method="full" is an error, as on the command line; a default value (a setup's
    # dump passed back) counts as not given
    check_method_fields(setup, explicit=False)
    return estimate_config(_model_arg(model), gpus=gpus, num_layers=num_layers, host_ram=host_ram, **setup)


@_api
def plan(model, gpus=None, top=10, **constraints):
    """Search the configurations of ``model`` that fit ``gpus``, fastest first.

    Returns a pandas DataFrame (recommended row first, byte columns as integers);
    ``df.attrs`` holds the reason, the per-method limits, suggestions when nothing fits
    and the number of points evaluated. ``constraints``: nodes, gpus_per_node, min_seq,
    global_batch, methods ("full,galore" or a list), min_lora_rank, min_galore_rank,
    host_ram (bytes or "128GB"), max_batch, num_layers.
    """
    from vramplan.plan import plan_model
    from vramplan.report.plan import to_frame

    return to_frame(plan_model(_model_arg(model), gpus, top=top, **constraints))


@_api
def load_model(model, num_layers=None):
    """Analyse a preset name or config path into a ModelSpec (cached)."""
    from vramplan.errors import VramplanError
    from vramplan.model_loader import load_model_spec

    if not isinstance(model, str):
        raise VramplanError(f"must be a preset name or a config.json path; got {type(model).__name__}", "MODEL")
    return load_model_spec(model, num_layers=num_layers)


@_api
def plot_breakdown(model, gpus=None, path=None, num_layers=None, host_ram=None, **setup):
    """Per-GPU memory by category as a matplotlib Figure; also written to ``path`` (.png/.svg)
    when given. Without ``method`` in ``setup``: the standard strategies side by side."""
    from vramplan.estimate import make_setup, resolve_gpus
    from vramplan.model_loader import load_model_spec
    from vramplan.plot import breakdown_bars, breakdown_figure, output_path, save_figure
    from vramplan.units import host_ram_bytes

    if path is not None:
        output_path(str(path), "")  # a bad file name fails before any work
    if setup.get("method") is not None:
        from vramplan.setup import check_method_fields

        check_method_fields(setup, explicit=False)
        make_setup(**setup)  # bad fields before the model is loaded
    gspec = resolve_gpus(gpus)
    ram = host_ram_bytes(host_ram, "--host-ram")
    spec = _model_arg(model)
    if isinstance(spec, str):
        spec = load_model_spec(spec, num_layers=num_layers)
    fig = breakdown_figure(breakdown_bars(spec, gspec, setup, ram))
    if path is not None:
        save_figure(fig, path)
    return fig


class _Package(_types.ModuleType):
    """Importing the submodule vramplan.estimate (or .plan) sets the package attribute of the
    same name (importlib's _handle_fromlist / _find_and_load): keep the public functions."""

    def __setattr__(self, name: str, value) -> None:
        if name in ("estimate", "plan") and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
