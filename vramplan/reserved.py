"""Reserved memory and the verdict from the caching-allocator simulation: the step's
allocation events (memory/events.py) replayed through the model of PyTorch's CUDA caching
allocator (allocator.py), on a roomy GPU for ``max_memory_reserved()``, and against the
GPU's capacity for whether the step runs out of memory (the allocator frees its cached
blocks and retries before it raises, which the replay models)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from vramplan.allocator import AllocatorConfig, ReplayResult, parse_alloc_conf, replay
from vramplan.categories import Category
from vramplan.memory.events import CATEGORIES, StepEvents, step_events
from vramplan.model_spec import ModelSpec
from vramplan.setup import TrainingSetup

ENV = "PYTORCH_CUDA_ALLOC_CONF"


def alloc_config(alloc_conf: str | None = None) -> AllocatorConfig:
    """--alloc-conf when given, else the environment's PYTORCH_CUDA_ALLOC_CONF (what the
    training process would read), else torch's defaults."""
    return parse_alloc_conf(alloc_conf if alloc_conf is not None else os.environ.get(ENV))


def use_alloc_conf_flag(value: str | None) -> None:
    """The CLI's --alloc-conf: checked now (one line naming the key on a bad value) and set
    as this process's PYTORCH_CUDA_ALLOC_CONF, so every estimate the command makes (plan's
    re-checks included) replays with it."""
    if value is None:
        return
    parse_alloc_conf(value)
    os.environ[ENV] = value


EXPANDABLE = "expandable_segments:True"


def with_expandable_segments(alloc_conf: str | None = None) -> str | None:
    """The allocator configuration (alloc_config's) with expandable segments turned on: the
    configured string with the key appended (a later key wins, as parseArgs reads it); None
    when it already expands its segments."""
    if alloc_config(alloc_conf).expandable_segments:
        return None
    text = alloc_conf if alloc_conf is not None else os.environ.get(ENV)
    return f"{text},{EXPANDABLE}" if text else EXPANDABLE


@dataclass(frozen=True)
class Simulated:
    """The replay's answer for one step on one GPU."""

    peak_reserved: int  # on a roomy GPU: torch.cuda.max_memory_reserved()
    peak_allocated: int  # the replay's max_memory_allocated() (rounded blocks)
    fits: bool  # runs within `capacity` (after releasing cached blocks if it must)
    headroom: int  # bytes left under capacity (negative: short by about that much)
    capped: ReplayResult | None  # the replay against capacity, when the roomy peak exceeds it
    events: StepEvents


def simulate(
    spec: ModelSpec, setup: TrainingSetup, capacity: int, config: AllocatorConfig, events: StepEvents | None = None
) -> Simulated:
    """capacity: what the allocator can obtain (usable memory less the CUDA context)."""
    ev = events if events is not None else step_events(spec, setup)
    roomy = replay(ev.events, config)
    if roomy.peak_reserved <= capacity:
        return Simulated(roomy.peak_reserved, roomy.peak_allocated, True, capacity - roomy.peak_reserved, None, ev)
    if roomy.peak_allocated > capacity:
        # live blocks alone exceed what cudaMalloc can obtain: no release makes room (the capped
        # replay would run out at the same peak), so it is not replayed
        return Simulated(roomy.peak_reserved, roomy.peak_allocated, False, capacity - roomy.peak_reserved, None, ev)
    capped = replay(ev.events, config, capacity=capacity)
    if capped.oom is None:
        # it runs only by emptying the cache and retrying: what is left is what it never needed
        return Simulated(roomy.peak_reserved, roomy.peak_allocated, True, capacity - capped.peak_reserved, capped, ev)
    return Simulated(roomy.peak_reserved, roomy.peak_allocated, False, capacity - roomy.peak_reserved, capped, ev)


def expandable_note(
    spec: ModelSpec, setup: TrainingSetup, capacity: int, config: AllocatorConfig, sim: Simulated
) -> list[str]:
    """When the step does not fit with the allocator's segments as configured but does with
    expandable segments (no stranded tails of partly used segments), say so."""
    if sim.fits or config.expandable_segments or sim.peak_allocated > capacity:
        return []  # (expandable segments strand less, but cannot hold more than the live blocks)
    from dataclasses import replace

    alt = simulate(spec, setup, capacity, replace(config, expandable_segments=True), sim.events)
    if not alt.fits:
        return []
    return [
        "with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (or --alloc-conf) the simulated allocator "
        f"fits this step ({alt.headroom / 2**30:.2f} GiB left): it maps memory in pages instead of caching "
        "whole segments, so partly used segments strand less"
    ]


@dataclass(frozen=True)
class Capped:
    """The step replayed under a cap on what the caching allocator may hold."""

    runs: bool  # build and both replayed steps without OutOfMemoryError
    peak_reserved: int  # the most the allocator held under the cap (up to the error)
    peak_allocated: int
    oom_at: str | None  # where the replay ran out: "build", "step 0" or "a later step"


def under_memory_limit(
    spec: ModelSpec, setup: TrainingSetup, limit: int, config: AllocatorConfig | None = None
) -> Capped:
    """The step under torch.cuda.set_per_process_memory_fraction(limit / device memory), as
    calibrate.py's capped cases run it: the allocator may hold at most `limit` bytes, and past
    it frees its cached blocks and retries before it raises (allocator.py's OOM path, with
    the limit as allowed_memory_maximum)."""
    ev = step_events(spec, setup)
    r = replay(ev.events, config if config is not None else alloc_config(), memory_fraction_limit=limit)
    if r.oom is None:
        return Capped(True, r.peak_reserved, r.peak_allocated, None)
    index = r.oom.event_index
    at = "build" if index < _first_activation(ev) else "step 0" if index < ev.step_start else "a later step"
    return Capped(False, r.peak_reserved, r.peak_allocated, at)


def _first_activation(ev: StepEvents) -> int:
    """The first event of step 0's forward: the first activation the step allocates."""
    hits = (ev.categories == CATEGORIES.index(Category.ACTIVATIONS)).nonzero()[0]
    return int(hits[0]) if len(hits) else ev.step_start
