"""Plots: where the memory goes, how it scales, how close the estimate is to measurements.

Each plot is a pure function returning a matplotlib ``Figure`` (tests inspect its
artists); ``save_figure`` writes it; vramplan.cli.plot wires ``vramplan plot``. Bytes stay
integers until they are drawn: GiB (vramplan.units) appears only in the coordinates below.

matplotlib is imported inside the functions: every ``vramplan`` command imports this module
through vramplan.cli.plot and must not pay for it. Figures are built without pyplot on an Agg
canvas, so they render on machines without a display and leave pyplot's state alone.
"""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vramplan.accuracy import estimate_case, is_full_step
from vramplan.categories import COLORS, Category
from vramplan.errors import VramplanError
from vramplan.estimate import context_bytes, estimate_spec, fp16_on_card, make_setup
from vramplan.files import check_output_file, write_file
from vramplan.setup import Optim, TrainingSetup, fields_for_method
from vramplan.strategies import GALORE_STANDARD, compare
from vramplan.units import GiB

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vramplan.hardware import GpuSpec
    from vramplan.measured import MeasuredCase
    from vramplan.model_spec import ModelSpec
    from vramplan.results import Estimate

FORMATS = ("png", "svg")
TOLERANCE = 0.05
METHODS = ("full", "lora", "qlora", "galore")
X_FIELD = {"seq": "seq_len", "batch": "batch_size"}
X_LABEL = {"seq": "sequence length (tokens)", "batch": "micro-batch size per GPU"}
FIT, NO_FIT, HOST_ONLY = "#2E7D32", "#C62828", "#E65100"
# Method colours are not category colours: a line is a whole configuration.
METHOD_COLORS = {"full": "#1F77B4", "lora": "#9467BD", "qlora": "#17BECF", "galore": "#FF7F0E"}
_OTHER_COLORS = ("#8C564B", "#E377C2", "#7F7F7F", "#BCBD22")


def _gib(n: int | float) -> float:
    return n / GiB


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------- breakdown


@dataclass(frozen=True)
class Bar:
    """One configuration in the breakdown plot."""

    label: str
    estimate: Estimate
    recommended: bool = False


def _verdict(est: Estimate) -> tuple[str, str]:
    total = f"{_gib(est.per_gpu.total_bytes):.1f} GiB"
    if est.fits:
        return f"fits  {total}", FIT
    if est.fits_gpu:
        return f"{total}; host RAM short ({_gib(est.host_ram_bytes):.0f} GiB)", HOST_ONLY
    return f"does not fit  {total}", NO_FIT


def _axis_limit(totals: Sequence[int], capacity: int) -> tuple[float, float]:
    """(bar clip, axis end) in bytes. A 70B full fine-tune needs 30x a 24 GB card: drawn to
    scale it would squash every bar that fits, so long bars are cut past 2.5x capacity (or
    just past the shortest bar, when none comes near the card)."""
    clip = max(2.5 * capacity, 1.15 * min(totals))
    if max(totals) <= 1.2 * clip:
        clip = max(totals)
    return clip, max(clip * 1.42, capacity * 1.08)


def breakdown_figure(bars: Sequence[Bar], title: str | None = None) -> Figure:
    """Stacked horizontal bars of the per-GPU memory by category, one bar per configuration,
    with the GPU capacity as a line and the verdict at the end of each bar. When some bar is
    far past the card, the axis is broken: a second panel on the right continues every bar
    on its own scale, so a 675 GiB full fine-tune shows its gradients and optimizer states
    too, not only its weights."""
    if not bars:
        raise VramplanError("nothing to plot: no configuration could be estimated")
    capacity = bars[0].estimate.gpu_memory_bytes
    totals = [b.estimate.per_gpu.total_bytes for b in bars]
    clip, xmax = _axis_limit(totals, capacity)
    fig = _new_figure(11, max(3.0, 1.6 + 0.42 * len(bars)))
    if max(totals) > xmax:
        ax, far = fig.subplots(1, 2, sharey=True, width_ratios=(3, 1.3))
    else:
        ax, far = fig.add_subplot(), None
    present = [c for c in Category if any(b.estimate.per_gpu.breakdown.get(c, 0) for b in bars)]
    ys = list(range(len(bars)))[::-1]  # first configuration on top, as in the table
    for panel in (ax, far) if far is not None else (ax,):
        for cat in present:
            lefts, widths = _segments(bars, cat)
            panel.barh(
                ys,
                [_gib(w) for w in widths],
                left=[_gib(l) for l in lefts],
                height=BAR_HEIGHT,
                color=COLORS[cat],
                label=cat.label if panel is ax else "_far",
                edgecolor="white",
                linewidth=0.4,
            )
    for y, bar in zip(ys, bars, strict=True):
        _annotate_bar(ax, y, bar, xmax)
        if len(bars) <= SEGMENT_LABELS_UP_TO:
            _label_segments(ax, y, bar, present, xmax)
    gpu = bars[0].estimate
    ax.axvline(
        _gib(capacity),
        color="black",
        linestyle="--",
        linewidth=1.2,
        label=f"capacity of one {gpu.gpu_name} ({_gib(capacity):.1f} GiB)",
    )
    ax.set_yticks(ys, [("* " if b.recommended else "") + b.label for b in bars])
    for tick, bar in zip(ax.get_yticklabels(), bars, strict=True):
        if bar.recommended:
            tick.set_fontweight("bold")
    ax.set_xlim(0, _gib(xmax))
    ax.set_ylim(-0.6, len(bars) - 0.4)
    ax.set_xlabel("memory per GPU (GiB)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    if far is not None:
        _far_panel(ax, far, xmax, max(totals))
    ax.set_title(title or _breakdown_title(bars), loc="left")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4, frameon=False, fontsize=9)
    return fig


def _far_panel(ax, far, start: float, top: int) -> None:
    """The right side of a broken axis: from where the left panel ends to past the longest
    bar, with the break drawn as a pair of slanted marks on both panels' joining edges."""
    far.set_xlim(_gib(start), _gib(top) * 1.04)
    far.set_xlabel("GiB (axis broken)")
    far.grid(axis="x", alpha=0.3)
    far.set_axisbelow(True)
    far.tick_params(axis="y", left=False)
    ax.spines["right"].set_visible(False)
    far.spines["left"].set_visible(False)
    marks = dict(
        marker=[(-1, -1.5), (1, 1.5)], markersize=10, linestyle="none", color="black", mec="black", mew=1, clip_on=False
    )
    ax.plot([1, 1], [0, 1], transform=ax.transAxes, **marks)
    far.plot([0, 0], [0, 1], transform=far.transAxes, **marks)


BAR_HEIGHT = 0.62
SEGMENT_LABELS_UP_TO = 3  # with more bars the numbers crowd out the colours


def _label_segments(ax, y: float, bar: Bar, present: Sequence[Category], xmax: float) -> None:
    """GiB inside each segment wide enough to hold the number."""
    left = 0
    for cat in present:
        size = bar.estimate.per_gpu.breakdown.get(cat, 0)
        if size > 0.06 * xmax:
            dark = cat in (
                Category.WEIGHTS,
                Category.OPTIMIZER_STATES,
                Category.CUDA_CONTEXT,
                Category.ADAPTERS,
                Category.FSDP_BUFFERS,
            )
            ax.text(
                _gib(left + size / 2),
                y,
                f"{_gib(size):.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
                clip_on=True,
            )
        left += size


def _breakdown_title(bars: Sequence[Bar]) -> str:
    est = bars[0].estimate
    title = f"{est.model} on {est.gpu_count}x {est.gpu_name}: per-GPU memory at the peak"
    if len(bars) == 1:
        return title + f" ({est.per_gpu.peak_phase})\n{est.description}, {setup_caption(est.setup)}"
    return title + f"\n{setup_caption(est.setup)}"


def setup_caption(setup) -> str:
    """What every bar or line of a plot shares: the micro-batch x sequence and the stack."""
    return f"micro-batch {setup.batch_size} x {setup.seq_len} tokens, stack {setup.stack.value}"


def _segments(bars: Sequence[Bar], cat: Category) -> tuple[list[int], list[int]]:
    """Left edge and width of ``cat`` in every bar (each panel's limits clip what it shows)."""
    order = list(Category)
    lefts, widths = [], []
    for bar in bars:
        bd = bar.estimate.per_gpu.breakdown
        lefts.append(sum(bd.get(c, 0) for c in order[: order.index(cat)]))
        widths.append(bd.get(cat, 0))
    return lefts, widths


def _annotate_bar(ax, y: float, bar: Bar, xmax: float) -> None:
    """The verdict after the bar; over the bar's end, when it runs on past the broken axis."""
    total = bar.estimate.per_gpu.total_bytes
    text, color = _verdict(bar.estimate)
    style = dict(
        va="center",
        fontsize=8.5,
        color=color,
        fontweight="bold",
        zorder=4,
        bbox=dict(facecolor="white", edgecolor="none", pad=0.5),
    )
    if total > xmax:
        ax.text(_gib(xmax) * 0.99, y, text + " →", ha="right", **style)
    else:
        ax.text(_gib(total) + _gib(xmax) * 0.007, y, text, ha="left", **style)


# ---------------------------------------------------------------- scaling


@dataclass(frozen=True)
class Series:
    """Per-GPU totals of one method at each x value."""

    label: str
    xs: tuple[int, ...]
    totals: tuple[int, ...]


def scaling_series(
    spec: ModelSpec,
    gpus: GpuSpec,
    methods: Sequence[str],
    x: str,
    values: Sequence[int],
    base: dict,
    host_ram: int | None = None,
) -> list[Series]:
    """Estimate every method at every value of ``x`` ('seq' or 'batch'), other fields from ``base``."""
    out = []
    for method in methods:
        fields = _method_fields(method, base)
        totals = []
        for v in values:
            est = estimate_spec(spec, _card_setup({**fields, X_FIELD[x]: v}, gpus), gpus, host_ram)
            totals.append(est.per_gpu.total_bytes)
        out.append(Series(_method_label(fields), tuple(values), tuple(totals)))
    return out


# Candidate x values of the automatic range: powers of two and 1.5 times them.
_STEPS = tuple(sorted({2**k for k in range(18)} | {3 * 2**k for k in range(17)}))
AUTO_CANDIDATES = {"seq": tuple(v for v in _STEPS if 128 <= v <= 131072), "batch": tuple(v for v in _STEPS if v <= 256)}
AUTO_POINTS = 7


def auto_values(
    spec: ModelSpec, gpus: GpuSpec, methods: Sequence[str], x: str, base: dict, capacity: int
) -> tuple[int, ...]:
    """The x values to draw when none are given: AUTO_POINTS values of AUTO_CANDIDATES around
    the largest value at which some method still fits ``capacity`` (the largest card drawn),
    ending two steps past it, so the plot shows where each method stops fitting instead of a
    range where nothing fits (a y axis to 4 TiB). Sequences stop at the model's context. With
    nothing fitting anywhere, the smallest values."""
    cands = AUTO_CANDIDATES[x]
    if x == "seq" and spec.max_positions:
        cands = tuple(v for v in cands if v <= spec.max_positions) or cands[:1]
    fitting = [i for i, v in enumerate(cands) if any(_fits_at(spec, gpus, m, x, v, base, capacity) for m in methods)]
    end = min(fitting[-1] + 2, len(cands) - 1) if fitting else min(AUTO_POINTS, len(cands)) - 1
    return cands[max(0, end - AUTO_POINTS + 1) : end + 1]


def _card_setup(fields: dict, gpus: GpuSpec) -> TrainingSetup:
    """The setup as `estimate` takes it on these GPUs: fp16 on a card without bf16 unless
    --precision was given (estimate.fp16_on_card)."""
    return fp16_on_card(make_setup(**fields), gpus, fields.get("precision") is not None)[0]


def _fits_at(spec: ModelSpec, gpus: GpuSpec, method: str, x: str, value: int, base: dict, capacity: int) -> bool:
    setup = _card_setup({**_method_fields(method, base), X_FIELD[x]: value}, gpus)
    return estimate_spec(spec, setup, gpus).fits_gpu


def _method_fields(method: str, base: dict) -> dict:
    """``base`` for one method: --optim goes to the methods it is an optimizer for, so
    ``--optim adamw_bnb_8bit`` does not break the GaLore line (and vice versa)."""
    fields = {k: v for k, v in base.items() if k != "method"}
    optim = fields.pop("optim", None)
    if optim is not None and str(optim).startswith("galore") == (method == "galore"):
        fields["optim"] = optim
    fields = fields_for_method({**fields, "method": method})
    if method == "galore":  # the configuration the strategy comparison's table shows, unless told otherwise
        return {**GALORE_STANDARD, **fields}
    return fields


def _method_label(fields: dict) -> str:
    setup = make_setup(**fields)
    label = setup.method.value
    if setup.quant is not None:  # qlora
        label += f" {setup.quant.value}"
    if setup.optim.is_8bit and setup.optim in (
        Optim.ADAMW_BNB_8BIT,
        Optim.GALORE_ADAMW_8BIT,
        Optim.GALORE_ADAMW_8BIT_LAYERWISE,
    ):
        label += " 8-bit" + (" layer-wise" if setup.optim.layerwise else "")
    elif setup.optim not in (Optim.ADAMW_TORCH, Optim.GALORE_ADAMW):
        label += f" {setup.optim.label}"
    if setup.gradient_checkpointing:
        label += " + ckpt"
    if setup.fsdp > 1:
        label += f" + FSDP{setup.fsdp}" + (" offload" if setup.cpu_offload else "")
    return label


def scaling_title(model: str, x: str, setup) -> str:
    """What varies, and what is fixed: the other of micro-batch and sequence, and the stack."""
    fixed = f"micro-batch {setup.batch_size}" if x == "seq" else f"{setup.seq_len} tokens per sequence"
    return f"{model}: per-GPU memory against {X_LABEL[x].split(' (')[0]}\n{fixed}, stack {setup.stack.value}"


def fit_limit(series: Series, capacity: int) -> str:
    """Up to which x value the series fits ``capacity``: a number, 'none' or 'all'."""
    fitting = [v for v, t in zip(series.xs, series.totals, strict=True) if t <= capacity]
    if not fitting:
        return "none"
    return "all" if len(fitting) == len(series.xs) else f"≤ {max(fitting)}"


def _scaling_y_axis(ax, series: Sequence[Series], capacities: Sequence[tuple[str, int]]) -> None:
    """Log-2 y axis when a series climbs far beyond the largest card, linear from zero otherwise."""
    top = max(max(s.totals) for s in series)
    biggest = max(c for _, c in capacities)
    if top > 2.5 * biggest:
        # linear, a method far beyond the largest card would flatten (or hide) the others
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    else:
        ax.set_ylim(0, _gib(max(top, biggest) * 1.1))


def scaling_figure(
    series: Sequence[Series], x: str, capacities: Sequence[tuple[str, int]], title: str | None = None
) -> Figure:
    """Per-GPU total against ``x`` for each series, with one capacity line per GPU.
    ``capacities``: (short GPU name, bytes). Filled markers fit the first GPU, hollow ones
    do not; each legend entry says up to which x value the method fits each GPU."""
    if not series:
        raise VramplanError("nothing to plot: no method given", "--method")
    fig = _new_figure(10, 6.5)
    ax = fig.add_subplot()
    first_cap = capacities[0][1]
    for i, s in enumerate(series):
        color = METHOD_COLORS.get(s.label.split()[0], _OTHER_COLORS[i % len(_OTHER_COLORS)])
        ys = [_gib(t) for t in s.totals]
        fits = ", ".join(f"{name} {fit_limit(s, cap)}" for name, cap in capacities)
        ax.plot(s.xs, ys, color=color, linewidth=2, marker="o", markersize=0, label=f"{s.label}  [fits: {fits}]")
        ax.scatter(
            s.xs,
            ys,
            s=36,
            zorder=3,
            edgecolors=color,
            linewidths=1.5,
            facecolors=[color if t <= first_cap else "white" for t in s.totals],
        )
    for j, (name, cap) in enumerate(capacities):
        ax.axhline(
            _gib(cap),
            color="black",
            linestyle=("--", ":", "-.")[j % 3],
            linewidth=1.2,
            label=f"capacity {name} ({_gib(cap):.1f} GiB)",
        )
    _scaling_y_axis(ax, series, capacities)
    ax.set_xscale("log", base=2)
    xs = sorted({v for s in series for v in s.xs})
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.minorticks_off()
    ax.set_xlabel(X_LABEL[x])
    ax.set_ylabel("memory per GPU (GiB)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "per-GPU memory", loc="left")
    fig.legend(
        *ax.get_legend_handles_labels(),
        loc="outside lower center",
        ncol=2,
        fontsize=8.5,
        frameon=False,
        title=f"filled marker: fits {capacities[0][0]}",
        title_fontsize=8.5,
    )
    return fig


# ---------------------------------------------------------------- accuracy


@dataclass(frozen=True)
class Point:
    """Predicted against measured bytes: one case, or one category of a case."""

    name: str
    method: str
    predicted: int
    measured: int
    category: Category | None = None
    part: str | None = None  # a group of categories (the measured split of a bundled line)

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured


def accuracy_points(
    cases: Iterable[MeasuredCase], configs: str | Path | None = None, per_category: bool = False
) -> list[Point]:
    """Estimate each measured case. Whole cases compare peak allocated; ``per_category``
    compares each category of a line's optional ``measured_breakdown`` {category: bytes}."""
    points = []
    for case in cases:
        if not is_full_step(case):
            continue
        try:
            est = estimate_case(case, configs)
        except VramplanError as e:  # the case's field, not a flag plot accuracy does not have
            if e.flag == "FILE":
                raise
            field = (e.flag or "").lstrip("-").replace("-", "_").lower()
            raise VramplanError(f"case {case.name!r}: {field + ': ' if field else ''}{e.message}", "FILE") from None
        if not per_category:
            if case.peak_alloc_bytes is not None:  # always, after is_full_step
                points.append(Point(case.name, case.method, est.per_gpu.peak_allocated_bytes, case.peak_alloc_bytes))
            continue
        if not case.measured_breakdown:
            points += _split_points(case, est)
            continue
        for cat, measured in _measured_breakdown(case).items():
            predicted = est.per_gpu.breakdown.get(cat, 0)
            if measured > 0 and predicted > 0:  # a log-log plot has no place for zero
                points.append(Point(case.name, case.method, predicted, measured, cat))
    return points


# The split a line without measured_breakdown still has (the bundled tests/data/h100_dev.jsonl):
# allocated after the model is built, after the first step, and at the peak. The reference
# step (docs/reference-step.md) frees gradients with zero_grad(set_to_none=True), so what the
# first step leaves over the built model is the optimizer states, and the peak over that is
# the step's working memory. Each part is drawn in the colour of its main category.
SPLIT_PARTS = {
    "model as built (weights, quant state, adapters)": Category.WEIGHTS,
    "optimizer states (after step 1 - after build)": Category.OPTIMIZER_STATES,
    "working memory at the peak (grads, activations, transient)": Category.ACTIVATIONS,
}
_BUILT = (Category.WEIGHTS, Category.QUANT_STATE, Category.ADAPTERS)


def _split_points(case: MeasuredCase, est: Estimate) -> list[Point]:
    """Predicted against measured for each part of SPLIT_PARTS (none without the two snapshots)."""
    extra = case.model_extra or {}
    if (
        case.mem_after_build_mb is None
        or case.mem_after_step0_mb is None
        or case.peak_alloc_bytes is None
        or extra.get("fsdp_world")
    ):  # FSDP's build and step snapshots are of shards and unsharded buffers
        return []
    built = int(case.mem_after_build_mb * 2**20)
    stepped = int(case.mem_after_step0_mb * 2**20)
    bd = est.per_gpu.breakdown
    model = sum(bd.get(c, 0) for c in _BUILT)
    states = bd.get(Category.OPTIMIZER_STATES, 0)
    measured = (built, stepped - built, case.peak_alloc_bytes - stepped)
    predicted = (model, states, est.per_gpu.peak_allocated_bytes - model - states)
    return [
        Point(case.name, case.method, p, m, cat, part)
        for (part, cat), p, m in zip(SPLIT_PARTS.items(), predicted, measured, strict=True)
        if p > 0 and m > 0
    ]


def _measured_breakdown(case: MeasuredCase) -> dict[Category, int]:
    raw = case.measured_breakdown or {}
    if not isinstance(raw, dict):
        raise VramplanError(f"case {case.name!r}: measured_breakdown must be an object of category -> bytes", "FILE")
    out = {}
    for key, value in raw.items():
        try:
            out[Category(key)] = int(value)
        except (ValueError, TypeError):
            allowed = ", ".join(c.value for c in Category)
            raise VramplanError(
                f"case {case.name!r}: measured_breakdown has {key!r}: {value!r}; "
                f"keys must be categories ({allowed}) with byte counts",
                "FILE",
            ) from None
    return out


def accuracy_figure(points: Sequence[Point], tolerance: float = TOLERANCE, title: str | None = None) -> Figure:
    """Predicted against measured (log-log, with y = x and the ±tolerance band) above the
    relative error against measured, where the band is wide enough to see. Points outside
    the band carry their case name."""
    if not points:
        raise VramplanError("nothing to plot: no line has both a measurement and an estimate", "FILE")
    fig = _new_figure(8, 9)
    ax, err_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    lo = _gib(min(min(p.predicted, p.measured) for p in points) / 1.3)
    hi = _gib(max(max(p.predicted, p.measured) for p in points) * 1.3)
    band = dict(color="#2E7D32", alpha=0.15, label=f"±{100 * tolerance:g}%")
    ax.fill_between(
        [lo, hi], [lo * (1 - tolerance), hi * (1 - tolerance)], [lo * (1 + tolerance), hi * (1 + tolerance)], **band
    )
    ax.plot([lo, hi], [lo, hi], color="#2E7D32", linewidth=1, label="predicted = measured")
    err_ax.axhspan(-100 * tolerance, 100 * tolerance, **{**band, "label": None})
    err_ax.axhline(0, color="#2E7D32", linewidth=1)
    for key, group in _groups(points).items():
        if isinstance(key, str) and key in SPLIT_PARTS:
            color, label = COLORS[SPLIT_PARTS[key]], key
        elif isinstance(key, Category):
            color, label = COLORS[key], key.label
        else:
            color, label = METHOD_COLORS.get(key, "#555555"), key
        style = dict(s=40, color=color, edgecolors="black", linewidths=0.5, zorder=3)
        measured = [_gib(p.measured) for p in group]
        ax.scatter(measured, [_gib(p.predicted) for p in group], label=f"{label} ({len(group)})", **style)
        err_ax.scatter(measured, [100 * p.error for p in group], **style)
    middle = (lo * hi) ** 0.5
    for p in points:
        if abs(p.error) > tolerance:
            name = p.name + (f" {p.part.split(' (')[0]}" if p.part else f" {p.category.label}" if p.category else "")
            right_half = _gib(p.measured) > middle  # write towards the middle, not off the edge
            err_ax.annotate(
                f"{name} {100 * p.error:+.0f}%",
                (_gib(p.measured), 100 * p.error),
                fontsize=7.5,
                xytext=(-5 if right_half else 5, -3),
                textcoords="offset points",
                color=NO_FIT,
                ha="right" if right_half else "left",
            )
    _log_axes(ax, lo, hi)
    worst = max(abs(p.error) for p in points)
    err_ax.set_ylim(-100 * max(2 * tolerance, worst * 1.2), 100 * max(2 * tolerance, worst * 1.2))
    err_ax.set_ylabel("error (%)")
    err_ax.set_xlabel("measured (GiB)")
    err_ax.grid(alpha=0.3, which="both")
    ax.set_ylabel("predicted (GiB)")
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(title or _accuracy_title(points, tolerance), loc="left", fontsize=10)
    return fig


def _log_axes(ax, lo: float, hi: float) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")  # 10 GiB rather than 10^1
    # label 2, 3 and 5 times a power of ten: every minor tick crowds the axis
    some = FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:.0e}"[0] in "235" else "")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(some)
    ax.grid(alpha=0.3, which="both")


def _groups(points: Sequence[Point]) -> dict:
    """Points by part (SPLIT_PARTS order), category (Category order) or method (METHODS order)."""
    order = {k: i for i, k in enumerate([*SPLIT_PARTS, *Category, *METHODS])}
    groups: dict = {}
    for p in sorted(points, key=lambda p: order.get(p.part or p.category or p.method, len(order))):
        groups.setdefault(p.part or p.category or p.method, []).append(p)
    return groups


def _accuracy_title(points: Sequence[Point], tolerance: float) -> str:
    errors = [abs(p.error) for p in points]
    inside = sum(e <= tolerance for e in errors)
    what = (
        "memory by part: built model, optimizer states, working memory"
        if points[0].part
        else "per-category memory"
        if points[0].category
        else "peak allocated (torch.cuda.max_memory_allocated)"
    )
    return (
        f"predicted vs measured {what}\n{len(points)} points, {inside} within ±{100 * tolerance:g}%; "
        f"median |error| {100 * statistics.median(errors):.1f}%, worst {100 * max(errors):.1f}%"
    )


# ---------------------------------------------------------------- files


def output_path(arg: str | None, default_name: str) -> Path:
    """Where to write, checked before any work: a .png or .svg file that can be created
    there (vramplan.files.check_output_file: not a directory, a writable folder)."""
    path = Path(arg) if arg else Path(default_name)
    if path.suffix.lower().lstrip(".") not in FORMATS:
        raise VramplanError(f"cannot write {str(path)!r}: the file name must end in .png or .svg", "-o")
    return check_output_file(path, "-o")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write PNG or SVG by suffix, through a temporary file renamed over the target
    (vramplan.files.write_file), so a failure leaves no half-written file."""
    path = output_path(str(path), "")
    return write_file(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lower().lstrip("."), dpi=120), "-o")


def current_umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_slug(text: str) -> str:
    """A file-name-safe piece: a config path becomes its directory or file stem."""
    if text.endswith(".json") or os.sep in text:
        p = Path(text)
        text = p.parent.name if p.name == "config.json" else p.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def breakdown_bars(spec: ModelSpec, gpus: GpuSpec, fields: dict, host_ram: int | None = None) -> list[Bar]:
    """The bars ``plot breakdown`` draws: the standard strategies, or the one --method configuration."""
    if fields.get("method") is None:
        return [Bar(r.label, r.estimate, r.recommended) for r in compare(spec, gpus, fields, host_ram)]
    est = estimate_spec(spec, _card_setup(fields, gpus), gpus, host_ram)
    return [Bar("per GPU", est)]


# ---------------------------------------------------------------- timeline


@dataclass(frozen=True)
class Timeline:
    """One steady step over time (event index): live bytes by category, what the simulated
    caching allocator reserves, the phases' moments and the GPU's capacity for the allocator."""

    live: dict[Category, np.ndarray]  # requested bytes alive after each event of the step
    reserved: np.ndarray
    moments: list[tuple[int, str]]  # (event index within the step, phase name)
    capacity: int  # usable memory less the CUDA context
    title: str


def timeline_data(spec: ModelSpec, setup, gpus: GpuSpec, alloc_conf: str | None = None) -> Timeline:
    from vramplan.allocator import Op, replay
    from vramplan.memory.events import CATEGORIES, step_events
    from vramplan.reserved import alloc_config

    ev = step_events(spec, setup)
    run = replay(ev.events, alloc_config(alloc_conf), record_trace=True)
    size_of: dict[int, int] = {}
    signed = np.zeros(len(ev.events), np.int64)
    for k, (op, tid, size) in enumerate(
        zip(ev.events.ops.tolist(), ev.events.ids.tolist(), ev.events.sizes.tolist(), strict=True)
    ):
        size_of.setdefault(tid, size)
        signed[k] = size_of[tid] if op == Op.ALLOC else -size_of[tid]
    s = ev.step_start
    live = {c: np.cumsum(np.where(ev.categories == i, signed, 0))[s:] for i, c in enumerate(CATEGORIES)}
    live = {c: v for c, v in live.items() if v.any()}
    assert run.reserved_trace is not None
    context = context_bytes(gpus)
    return Timeline(
        live=live,
        reserved=run.reserved_trace[s:],
        capacity=gpus.profile.memory_bytes - context,
        moments=[(m.index - s, m.phase.name) for m in ev.moments if m.index >= s],
        title=f"{spec.name}: one step, {setup_caption(setup)}",
    )


def timeline_figure(t: Timeline) -> Figure:
    """Allocated (stacked by category) and reserved over one step, phases marked, capacity as a line."""
    fig = _new_figure(11, 5.5)
    ax = fig.add_subplot()
    x, live, reserved = _peak_bins(t)
    ax.stackplot(
        x,
        *[v / GiB for v in live],
        colors=[COLORS[c] for c in t.live],
        labels=[c.label for c in t.live],
        step="post",
    )
    ax.step(x, reserved / GiB, where="post", color="black", lw=1.2, label="reserved (simulated allocator)")
    ax.axhline(_gib(t.capacity), color="#C44E52", ls="--", lw=1, label="GPU capacity (less CUDA context)")
    top = _gib(max(t.capacity, int(t.reserved.max()))) * 1.02
    for i, name in _phase_marks(t.moments):
        ax.axvline(i, color="#888888", lw=0.5, ls=":")
        ax.text(i, top, name, rotation=90, fontsize=7, va="bottom", ha="center")
    ax.set_xlabel("allocation events of one steady step")
    ax.set_ylabel("GiB per GPU")
    ax.set_title(t.title, fontsize=10)
    # outside the axes: inside, it hid the step's peak (the loss backward, at the left)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.subplots_adjust(right=0.8)
    return fig


TIMELINE_BINS = 1500  # about one per horizontal pixel of the figure


def _peak_bins(t: Timeline) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """The step drawn at most TIMELINE_BINS points wide: in each run of events the one with the
    most bytes alive (its categories, so the stack still sums to it) and the most reserved. A
    peak one event wide (the loss backward's) would otherwise be thinner than a pixel and vanish."""
    n = len(t.reserved)
    width = -(-n // TIMELINE_BINS)
    if width <= 1:
        return np.arange(n), list(t.live.values()), t.reserved
    total = np.sum(list(t.live.values()), axis=0)
    starts = np.arange(0, n, width)
    picks = np.array([s + int(np.argmax(total[s : s + width])) for s in starts])
    reserved = np.maximum.reduceat(t.reserved, starts)
    return starts, [v[picks] for v in t.live.values()], reserved


def _phase_marks(moments: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The moments to label: every non-layer phase, and the first and last layer's backward
    (an 80-layer step has hundreds of layer moments)."""
    layers = [(i, n) for i, n in moments if n.startswith("layer")]
    marks = [(i, n) for i, n in moments if not n.startswith("layer")]
    if layers:
        marks += [(layers[0][0], layers[0][1].split(" (")[0]), (layers[-1][0], layers[-1][1].split(" (")[0])]
    return sorted(set(marks))
