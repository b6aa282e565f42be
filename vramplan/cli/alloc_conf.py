"""--alloc-conf, shared by estimate and plan: the caching allocator's settings for the replay."""

from __future__ import annotations

from vramplan.reserved import use_alloc_conf_flag

ALLOC_CONF_HELP = (
    "PYTORCH_CUDA_ALLOC_CONF the run will use (e.g. expandable_segments:True), for the simulated "
    "caching allocator that decides reserved memory and the verdict; default: this environment's "
    "PYTORCH_CUDA_ALLOC_CONF"
)

__all__ = ["ALLOC_CONF_HELP", "use_alloc_conf_flag"]
