"""vramplan: will this training run fit these GPUs, and where does the memory go?

Data flows one way: model spec -> training setup -> memory model -> estimate ->
plan -> report/plot. ``verify`` measures the same categories on a real GPU.
"""
from vramplan.categories import Category
from vramplan.errors import VramplanError
from vramplan.setup import Method, Optim, Precision, Quant, TrainingSetup

# Importing a submodule binds it as an attribute of this package, which would replace the
# function ``estimate`` below with the module ``vramplan.estimate`` on first use. Loading it
# here, before the function is defined, makes the function win for good.
import vramplan.estimate as _estimate_module  # noqa: E402,F401

__all__ = ["Category", "Method", "Optim", "Precision", "Quant", "TrainingSetup", "VramplanError",
           "estimate", "load_model", "plot_breakdown"]
__version__ = "0.1.0"


def estimate(model, gpus=None, **setup):
    """Estimate one configuration. ``model``: preset name, config path or ModelSpec.

    ``setup`` takes TrainingSetup's fields (method, precision, optim, batch_size, ...).
    """
    from vramplan.estimate import estimate_config
    return estimate_config(model, gpus=gpus, **setup)


def load_model(model, num_layers=None):
    """Analyse a preset name or config path into a ModelSpec (cached)."""
    from vramplan.model_spec import load_model_spec
    return load_model_spec(model, num_layers=num_layers)


def plot_breakdown(model, gpus=None, path=None, num_layers=None, host_ram=None, **setup):
    """Per-GPU memory by category as a matplotlib Figure; also written to ``path`` (.png/.svg)
    when given. Without ``method`` in ``setup``: the standard strategies side by side."""
    from vramplan.estimate import resolve_gpus
    from vramplan.model_spec import load_model_spec
    from vramplan.plot import breakdown_bars, breakdown_figure, output_path, save_figure
    if path is not None:
        output_path(str(path), "")  # a bad file name fails before any work
    bars = breakdown_bars(load_model_spec(model, num_layers=num_layers), resolve_gpus(gpus), setup, host_ram)
    fig = breakdown_figure(bars)
    if path is not None:
        save_figure(fig, path)
    return fig
