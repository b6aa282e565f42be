"""`vramplan verify MODEL`: parse, call verify(), render, write the report."""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vramplan.cli.common import MODEL_HELP, add_setup_options, bounded, int_in, setup_fields
from vramplan.errors import VramplanError
from vramplan.limits import MAX_DEPTHS, MAX_LAYERS, MAX_STEPS

EXIT_DOES_NOT_FIT = 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("verify", help="run the real training step on this GPU and compare it with the estimate")
    v.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    add_setup_options(v)
    v.add_argument(
        "--steps",
        type=int_in(MAX_STEPS),
        default=3,
        help=bounded("optimizer steps to run; default 3, the first creates the states", MAX_STEPS),
    )
    v.add_argument("--gpus", help="GPUs the estimate is for (default: the detected ones)")
    v.add_argument(
        "--extrapolate",
        choices=["auto", "always", "never"],
        default="auto",
        help="measure truncated depths and extrapolate: auto = when the estimate says the full model "
        "does not fit this GPU",
    )
    v.add_argument(
        "--depths",
        help=f"truncated depths to extrapolate from, e.g. 4,8 (2 to {MAX_DEPTHS} of them; default: chosen to fit)",
    )
    v.add_argument(
        "--out", help="report folder, new or empty, checked before the run (default: vramplan-verify/<case>-<time>)"
    )
    v.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: run the step on this CPU with every allocation traced, a check of the step's "
        "structure without a GPU (CPU kernels are not CUDA's: docs/verify.md, 'CPU trace')",
    )
    v.add_argument(
        "--launch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the engine's N ranks (--fsdp N, --data-parallel N) as N processes with torchrun; "
        "default: when N GPUs are visible, else rank 0 simulated on a fake process group; "
        "--device cpu --launch: N CPU ranks over gloo; --no-launch: always simulated",
    )
    v.add_argument("--format", choices=["table", "json"], default="table")
    v.add_argument("--no-progress", action="store_true", help="no live progress display")
    v.set_defaults(handler=run)


def _depths(text: str | None) -> list[int] | None:
    if not text:
        return None
    items = [x for x in text.split(",") if x.strip()]
    if len(items) > 4 * MAX_DEPTHS:
        raise VramplanError(f"{len(items)} depths; give 2 to {MAX_DEPTHS}", "--depths")
    parse = int_in(MAX_LAYERS)
    try:
        out = sorted({parse(x) for x in items})
    except argparse.ArgumentTypeError as e:
        raise VramplanError(f"each depth {e} (e.g. 4,8)", "--depths") from None
    if not 2 <= len(out) <= MAX_DEPTHS:
        raise VramplanError(f"give 2 to {MAX_DEPTHS} different depths, got {text[:40]!r}", "--depths")
    return out


@contextmanager
def _progress(enabled: bool, steps: int):
    """A live display of the case and phase; yields (on_case, on_phase) callbacks."""
    if not enabled:
        yield None, None, lambda line: print(f"vramplan: {line}", file=sys.stderr)
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    total = 1 + 3 * steps
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as prog:
        state: dict[str, Any] = {"task": None, "case": ""}

        def on_case(label: str) -> None:
            if state["task"] is not None:
                prog.update(state["task"], completed=total)
            state["case"] = label
            state["task"] = prog.add_task(f"{label}: starting", total=total)

        def on_phase(phase: str, step: int | None) -> None:
            if state["task"] is None:
                on_case("case")
            done = 0 if step is None else 1 + 3 * step + ("forward", "backward", "optimizer").index(phase)
            what = "building the model" if step is None else f"step {step + 1}/{steps}: {phase}"
            prog.update(state["task"], completed=done, description=f"{state['case']}: {what}")

        def say(line: str) -> None:  # above the live bar, which stays in place
            prog.console.print(f"vramplan: {line}")

        yield on_case, on_phase, say


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from vramplan.estimate import make_setup
    from vramplan.files import check_output_folder
    from vramplan.setup import check_method_fields
    from vramplan.verify.api import EXIT_NO_GPU, NoGpuError, require_cuda, verify
    from vramplan.verify.compare import render
    from vramplan.verify.quiet import quiet_libraries

    fields = setup_fields(args)
    check_method_fields(fields, explicit=True)  # verify without --method runs a full fine-tune
    setup = make_setup(**fields)
    depths = _depths(args.depths)
    try:
        require_cuda(args.device)  # before the report folder below is made
    except NoGpuError as e:
        print(f"vramplan: {e}", file=sys.stderr)
        return EXIT_NO_GPU
    out = Path(args.out) if args.out else None
    # the report's place is checked now, not after a run of minutes (the default folder is
    # named after the case: its parent is checked)
    if out is not None:
        check_output_folder(out, "--out")
    else:
        check_output_folder(DEFAULT_OUT_PARENT / ".vramplan-check", "--out")
    show = not args.no_progress and args.format == "table"
    try:
        with _progress(show, args.steps) as (on_case, on_phase, say), quiet_libraries():
            report = verify(
                args.model,
                setup,
                device=args.device,
                num_layers=args.num_layers,
                steps=args.steps,
                gpus=args.gpus,
                extrapolate=args.extrapolate,
                depths=depths,
                on_phase=on_phase,
                on_case=on_case,
                on_notice=say,
                launch=args.launch,
            )
    except NoGpuError as e:
        print(f"vramplan: {e}", file=sys.stderr)
        return EXIT_NO_GPU
    # the measurements are shown before the folder is written: a disk that fills during the
    # run loses the files (written whole or not at all), not what the run measured
    if args.format == "json":
        print(report.model_dump_json(indent=1))
    else:
        console = Console()
        _render(report, console, render)
    folder = report.write(out or _default_out(report))
    if args.format != "json":
        ranks = ", rank<r>.json per rank" if len(report.result) > 1 else ""
        console.print(f"report: {folder}/ (report.json, comparison.csv, measurements.jsonl{ranks})")
    return 0 if report.fits else EXIT_DOES_NOT_FIT


def _render(report, console, render) -> None:
    """One rank: its table. Launched ranks: rank 0's table, the max over the ranks, each rank's peak."""
    from vramplan.units import MiB
    from vramplan.verify.compare import max_over_ranks

    ms = report.result
    if len(ms) == 1:
        render(report.comparisons[0], ms[0], console)
    else:
        console.rule(f"rank 0 of {ms[0].world}")
        render(report.comparisons[0], ms[0], console)
        console.rule(f"max over {len(ms)} ranks")
        render(report.over_ranks, max_over_ranks(ms), console)
        for m in ms:
            peak = "n/a" if m.peak_allocated_bytes is None else f"{m.peak_allocated_bytes / MiB:.1f} MiB"
            console.print(f"rank {m.rank}: peak {peak} in {m.peak_phase}; {'fits' if m.fits else 'DOES NOT FIT'}")
    if report.ran:
        console.print(f"ran: {report.ran}")


DEFAULT_OUT_PARENT = Path("vramplan-verify")


def _default_out(report) -> Path:
    name = report.measurements[0].case_name() if report.measurements else "verify"
    return DEFAULT_OUT_PARENT / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
