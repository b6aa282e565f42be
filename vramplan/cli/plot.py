"""`vramplan plot {breakdown,scaling,accuracy}`: parse, compute, draw, write the file.

matplotlib is imported by the drawing functions only: building the parser (every
``vramplan`` command does) must not pay for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from vramplan.cli.alloc_conf import ALLOC_CONF_HELP, use_alloc_conf_flag
from vramplan.cli.common import (
    GPUS_HELP,
    HOST_RAM_HELP,
    MODEL_HELP,
    _Parser,
    add_setup_options,
    host_ram,
    int_in,
    setup_fields,
)
from vramplan.cli.gpu_options import add_gpu_options, resolve_from_args
from vramplan.errors import VramplanError
from vramplan.estimate import fp16_on_card, make_setup
from vramplan.limits import MAX_BATCH_SIZE, MAX_PLOT_VALUES, MAX_SEQ_LEN
from vramplan.measured import MeasuredCase, load_cases
from vramplan.model_loader import load_model_spec
from vramplan.plot import (
    METHODS,
    X_FIELD,
    accuracy_figure,
    accuracy_points,
    auto_values,
    breakdown_bars,
    breakdown_figure,
    file_slug,
    output_path,
    save_figure,
    scaling_figure,
    scaling_series,
    scaling_title,
    timeline_data,
    timeline_figure,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_CAPACITY_LINES = 16  # plot scaling --gpus: dashed capacity lines one chart can tell apart


def add_parser(sub: argparse._SubParsersAction) -> None:
    """``vramplan plot {breakdown,scaling,accuracy}``. Imports no matplotlib."""
    plot = sub.add_parser("plot", help="draw the memory breakdown, scaling or accuracy as PNG/SVG")
    kinds = plot.add_subparsers(dest="plot_kind", required=True, parser_class=_Parser, metavar="KIND")

    _add_breakdown_parser(kinds)
    _add_scaling_parser(kinds)
    _add_timeline_parser(kinds)
    _add_accuracy_parser(kinds)


def _add_breakdown_parser(kinds: argparse._SubParsersAction) -> None:
    """``vramplan plot breakdown``: stacked per-GPU memory by category."""
    b = kinds.add_parser(
        "breakdown", help="stacked per-GPU memory by category, the standard strategies or one --method"
    )
    _model_and_gpus(b)
    add_setup_options(b)
    b.add_argument("--host-ram", help=HOST_RAM_HELP + "; default as for estimate")
    _output_option(b, "breakdown-MODEL-GPUS.png")
    b.set_defaults(handler=_cmd_breakdown)


def _add_scaling_parser(kinds: argparse._SubParsersAction) -> None:
    """``vramplan plot scaling``: memory against sequence length or batch size, one line per method."""
    s = kinds.add_parser(
        "scaling",
        conflict_handler="resolve",
        help="per-GPU memory against sequence length or batch size, one line per method",
    )
    _model_and_gpus(s, several=True)
    add_setup_options(s)
    # replaces the single --method of the setup options
    s.add_argument(
        "--method",
        action="append",
        choices=METHODS,
        dest="methods",
        metavar="METHOD",
        help="a method to draw; repeat for several (default: all four; galore as the strategy comparison runs it, "
        "8-bit layer-wise with recomputation). --optim applies to the methods it is an optimizer for",
    )
    s.add_argument("--x", choices=tuple(X_FIELD), default="seq", help="what varies on the x axis")
    s.add_argument(
        "--values",
        help=f"comma-separated x values (at most "
        f"{MAX_PLOT_VALUES}; default: 7 of the powers of 2 and 1.5 times them, ending two steps past the "
        "largest value at which a method still fits the largest card given, so the plot shows where each stops)",
    )
    _output_option(s, "scaling-MODEL-X.png")
    s.set_defaults(handler=_cmd_scaling)


def _add_timeline_parser(kinds: argparse._SubParsersAction) -> None:
    """``vramplan plot timeline``: allocated and reserved over one step."""
    t = kinds.add_parser(
        "timeline", help="allocated (by category) and reserved over one step, phases marked, GPU capacity as a line"
    )
    _model_and_gpus(t)
    add_setup_options(t)
    t.add_argument("--alloc-conf", metavar="CONF", help=ALLOC_CONF_HELP)
    _output_option(t, "timeline-MODEL-GPUS.png")
    t.set_defaults(handler=_cmd_timeline)


def _add_accuracy_parser(kinds: argparse._SubParsersAction) -> None:
    """``vramplan plot accuracy``: predicted vs measured from measured-case JSON lines."""
    a = kinds.add_parser("accuracy", help="predicted vs measured from measured-case JSON lines, with the ±5%% band")
    a.add_argument("files", nargs="+", metavar="FILE", help="JSON-lines files of measured cases (MeasuredCase schema)")
    a.add_argument(
        "--configs",
        metavar="DIR",
        help="directory of MODEL.json configs for the cases' model names; names not found there are presets",
    )
    a.add_argument(
        "--per-category",
        action="store_true",
        help="one point per category, from each line's measured_breakdown {category: bytes}; a line without "
        "one (the bundled data) is split into the built model, optimizer states and the peak's working memory",
    )
    _output_option(a, "accuracy.png")
    a.set_defaults(handler=_cmd_accuracy)


def _model_and_gpus(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    if several:
        p.add_argument(
            "--gpus",
            action="append",
            help="GPUs as for estimate; repeat or comma-separate to draw "
            "several capacity lines (the first is used for the estimate); default: detected",
        )
    else:
        p.add_argument("--gpus", help=GPUS_HELP)
    add_gpu_options(p)


def _output_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("-o", "--output", metavar="FILE", help=f"PNG or SVG file to write (by suffix); default {default}")


def _write(fig: Figure, path: Path) -> int:
    save_figure(fig, path)
    print(f"wrote {path}")
    return 0


def _use_agg() -> None:
    import matplotlib

    matplotlib.use("Agg")  # the command line never opens a window


def _cmd_breakdown(args: argparse.Namespace) -> int:
    gpus = resolve_from_args(args, args.gpus)
    spec = load_model_spec(args.model, num_layers=args.num_layers)
    path = output_path(args.output, f"breakdown-{file_slug(spec.name)}-{file_slug(gpus.label)}.png")
    bars = breakdown_bars(spec, gpus, setup_fields(args), host_ram(args))
    _use_agg()
    return _write(breakdown_figure(bars), path)


def _cmd_timeline(args: argparse.Namespace) -> int:
    use_alloc_conf_flag(args.alloc_conf)
    gpus = resolve_from_args(args, args.gpus)
    spec = load_model_spec(args.model, num_layers=args.num_layers)
    path = output_path(args.output, f"timeline-{file_slug(spec.name)}-{file_slug(gpus.label)}.png")
    fields = setup_fields(args)
    setup, _ = fp16_on_card(make_setup(**fields), gpus, fields.get("precision") is not None)
    data = timeline_data(spec, setup, gpus)
    _use_agg()
    return _write(timeline_figure(data), path)


# the largest x value: the bound of the flag the x axis stands for
_X_LIMIT = {"seq": MAX_SEQ_LEN, "batch": MAX_BATCH_SIZE}


def _parse_values(text: str | None, x: str) -> tuple[int, ...] | None:
    """--values: at most MAX_PLOT_VALUES distinct integers, each in the x field's range
    (every value is one estimate per method: 5,000 of them took 97 s)."""
    if text is None:
        return None  # plot.auto_values chooses
    items = [v for v in text.split(",") if v.strip()]
    if len(items) > 4 * MAX_PLOT_VALUES:  # refused before parsing a long list
        raise VramplanError(f"{len(items)} values; give at most {MAX_PLOT_VALUES}", "--values")
    parse = int_in(_X_LIMIT[x])
    try:
        values = tuple(sorted({parse(v) for v in items}))
    except argparse.ArgumentTypeError as e:
        raise VramplanError(f"each value {e} (comma-separated, e.g. 512,1024,2048)", "--values") from None
    if not values:
        raise VramplanError(
            f"cannot read {text[:40]!r}; give comma-separated positive integers, e.g. 512,1024,2048", "--values"
        )
    if len(values) > MAX_PLOT_VALUES:
        raise VramplanError(f"{len(values)} values; give at most {MAX_PLOT_VALUES}", "--values")
    return values


def _cmd_scaling(args: argparse.Namespace) -> int:
    names = [g.strip() for arg in (args.gpus or []) for g in arg.split(",") if g.strip()]
    if len(names) > MAX_CAPACITY_LINES:
        raise VramplanError(f"{len(names)} GPU types; give at most {MAX_CAPACITY_LINES} capacity lines", "--gpus")
    all_gpus = [resolve_from_args(args, n) for n in names] or [resolve_from_args(args, None)]
    given = _parse_values(args.values, args.x)
    spec = load_model_spec(args.model, num_layers=args.num_layers)
    path = output_path(args.output, f"scaling-{file_slug(spec.name)}-{args.x}.png")
    methods = list(dict.fromkeys(args.methods or METHODS))
    fields = {k: v for k, v in setup_fields(args).items() if k != X_FIELD[args.x]}
    biggest = max(g.profile.memory_bytes for g in all_gpus)
    values = given or auto_values(spec, all_gpus[0], methods, args.x, fields, biggest)
    series = scaling_series(spec, all_gpus[0], methods, args.x, values, fields)
    capacities = [(g.profile.name, g.profile.memory_bytes) for g in all_gpus]
    shared = make_setup(**{k: v for k, v in fields.items() if k in ("batch_size", "seq_len", "stack")})
    title = scaling_title(spec.name, args.x, shared)
    _use_agg()
    return _write(scaling_figure(series, args.x, capacities, title), path)


def _cmd_accuracy(args: argparse.Namespace) -> int:
    if args.configs is not None and not Path(args.configs).is_dir():
        raise VramplanError(f"{args.configs!r} is not a directory", "--configs")
    path = output_path(args.output, "accuracy.png")
    cases = [c for f in args.files for c in _load_file(f)]
    points = accuracy_points(cases, args.configs, args.per_category)
    if args.per_category and not points:
        raise VramplanError(
            "no line carries a measured_breakdown {category: bytes} or the after-build and after-step snapshots "
            "(mem_after_build_mb, mem_after_step0_mb); plot whole cases without --per-category",
            "--per-category",
        )
    _use_agg()
    return _write(accuracy_figure(points), path)


def _load_file(path: str) -> list[MeasuredCase]:
    """load_cases reads only a regular file, with a size cap, and names the line at fault."""
    return load_cases(path)
