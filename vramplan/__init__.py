"""vramplan: will this training run fit these GPUs, and where does the memory go?

Data flows one way: model spec -> training setup -> memory model -> estimate ->
plan -> report/plot. ``verify`` measures the same categories on a real GPU.
"""
# Importing a submodule sets the package attribute of the same name: load the modules
# vramplan.estimate and vramplan.plan now, so the functions defined below keep the names
# `vramplan.estimate` and `vramplan.plan` whatever is imported later.
import vramplan.estimate as _estimate_module  # noqa: E402,F401
import vramplan.plan as _plan_module  # noqa: E402,F401
from vramplan.categories import Category
from vramplan.errors import VramplanError
from vramplan.setup import Method, Optim, Precision, Quant, TrainingSetup

__all__ = ["Category", "Method", "Optim", "Precision", "Quant", "TrainingSetup", "VramplanError",
           "estimate", "load_model", "plan", "plot_breakdown"]
__version__ = "0.1.0"


def estimate(model, gpus=None, **setup):
    """Estimate one configuration. ``model``: preset name, config path or ModelSpec.

    ``setup`` takes TrainingSetup's fields (method, precision, optim, batch_size, ...).
    """
    from vramplan.estimate import estimate_config
    return estimate_config(model, gpus=gpus, **setup)


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
    return to_frame(plan_model(model, gpus, top=top, **constraints))


def load_model(model, num_layers=None):
    """Analyse a preset name or config path into a ModelSpec (cached)."""
    from vramplan.model_loader import load_model_spec
    return load_model_spec(model, num_layers=num_layers)


def plot_breakdown(model, gpus=None, path=None, num_layers=None, host_ram=None, **setup):
    """Per-GPU memory by category as a matplotlib Figure; also written to ``path`` (.png/.svg)
    when given. Without ``method`` in ``setup``: the standard strategies side by side."""
    from vramplan.estimate import resolve_gpus
    from vramplan.model_loader import load_model_spec
    from vramplan.plot import breakdown_bars, breakdown_figure, output_path, save_figure
    if path is not None:
        output_path(str(path), "")  # a bad file name fails before any work
    bars = breakdown_bars(load_model_spec(model, num_layers=num_layers), resolve_gpus(gpus), setup, host_ram)
    fig = breakdown_figure(bars)
    if path is not None:
        save_figure(fig, path)
    return fig
