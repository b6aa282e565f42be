"""One estimate and the strategy comparison: rich tables and the comparison's JSON."""

from __future__ import annotations

from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from vramplan.categories import COLORS, Category
from vramplan.estimate import context_note, coverage_notes, fused_expert_note
from vramplan.hardware import GpuSpec, gpu_notes
from vramplan.headroom import has_safe_headroom, rule_text
from vramplan.model_spec import ModelSpec
from vramplan.report import gib_cell as _gib
from vramplan.results import Estimate
from vramplan.strategies import StrategyRow
from vramplan.units import GiB


def _verdict(est: Estimate) -> Text:
    if est.fits_gpu and not est.fits_host and est.host_ram_available_bytes is not None:  # unchecked host fits
        return Text(
            f"DOES NOT FIT  GPU memory is fine ({est.per_gpu.total_bytes / GiB:.2f} GiB per GPU) but the host needs "
            f"{est.host_ram_bytes / GiB:.1f} GiB RAM, has {est.host_ram_available_bytes / GiB:.1f} GiB "
            "(set --host-ram for the training machine)",
            style="bold red",
        )
    if est.fits:
        return Text(
            f"FITS  {est.per_gpu.total_bytes / GiB:.2f} GiB of {est.gpu_memory_bytes / GiB:.2f} GiB per GPU "
            f"({est.headroom_bytes / GiB:.2f} GiB headroom)",
            style="bold green",
        )
    return Text(
        f"DOES NOT FIT  needs {est.per_gpu.total_bytes / GiB:.2f} GiB per GPU, "
        f"has {est.gpu_memory_bytes / GiB:.2f} GiB "
        f"(short by {-est.headroom_bytes / GiB:.2f} GiB)",
        style="bold red",
    )


def print_estimate(est: Estimate, console: Console | None = None, assumed: list[str] | None = None) -> None:
    console = console or Console()
    console.print(_verdict(est))
    console.print(f"[bold]{est.model}[/] on {est.gpu_count}x {est.gpu_name}: {est.description}")
    if assumed:
        console.print("  assumed: " + "; ".join(assumed))
    for note in est.notes:
        console.print(f"  note: {note}")
    t = Table(title=f"per-GPU memory at the peak ({est.per_gpu.peak_phase})", title_justify="left")
    t.add_column("category")
    t.add_column("GiB", justify="right")
    t.add_column("share", justify="right")
    total = est.per_gpu.total_bytes or 1
    for cat in Category:
        v = est.per_gpu.breakdown.get(cat, 0)
        if v:
            t.add_row(Text("■ ", style=COLORS[cat]) + cat.label, _gib(v), f"{100 * v / total:.1f}%")
    t.add_section()
    t.add_row("peak allocated (torch)", _gib(est.per_gpu.peak_allocated_bytes), "")
    t.add_row("peak reserved (torch)", _gib(est.per_gpu.peak_reserved_bytes), "")
    t.add_row("[bold]total per GPU (nvidia-smi)", f"[bold]{_gib(est.per_gpu.total_bytes)}", "")
    t.add_row("GPU capacity", _gib(est.gpu_memory_bytes), "")
    t.add_row("host RAM (all ranks on this host)", _gib(est.host_ram_bytes), "")
    console.print(t)


def comparison_json(spec: ModelSpec, gpus: GpuSpec, rows: list[StrategyRow], assumed: list[str] | None = None) -> dict:
    return {
        "model": spec.name,
        "gpus": gpus.label,
        "assumed": list(assumed or []),
        "headroom_rule": rule_text(gpus.profile.memory_bytes),
        "recommended": next((r.label for r in rows if r.recommended), None),
        "strategies": [
            {"label": r.label, "reason": r.reason, "recommended": r.recommended, **r.estimate.to_json_dict()}
            for r in rows
        ],
    }


def print_comparison(
    spec: ModelSpec,
    gpus: GpuSpec,
    rows: list[StrategyRow],
    console: Console | None = None,
    assumed: list[str] | None = None,
) -> None:
    """The table, the recommendation, then what it assumed and the headroom rule it recommends by."""
    console = console or Console()
    title = f"{spec.name} on {gpus.count}x {gpus.profile.display_name} ({gpus.profile.memory_bytes / GiB:.1f} GiB each)"
    if spec.resolved_from:
        title += f"  [{spec.resolved_from!r} -> {spec.name}]"
    t = Table(title=title, title_justify="left")
    t.add_column("strategy", no_wrap=True)
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("GiB/GPU", "right"),
        ("host GiB", "right"),
        ("fits", "center"),
        ("headroom", "right"),
    )
    for col, just in columns:
        t.add_column(col, justify=just)
    for r in rows:
        e = r.estimate
        mark = "[green]yes[/]" if e.fits else ("[yellow]no: RAM[/]" if e.fits_gpu else "[red]no[/]")
        label = ("[bold]* " if r.recommended else "  ") + r.label
        t.add_row(label, _gib(e.per_gpu.total_bytes), _gib(e.host_ram_bytes), mark, _gib(e.headroom_bytes))
    console.print(t)
    rec = next((r for r in rows if r.recommended), None)
    if rec:
        tight = (
            ""
            if has_safe_headroom(rec.estimate.headroom_bytes, rec.estimate.gpu_memory_bytes)
            else " (every fitting strategy is under the headroom rule: a longer sample may not fit)"
        )
        console.print(f"[bold green]Recommended:[/] {rec.label} — {rec.reason}{tight}")
    else:
        console.print(
            "[bold red]Nothing fits.[/] Try more GPUs, a larger card, a shorter --seq-len or a smaller --batch-size "
            "(`vramplan plan` searches for what would)."
        )
    if assumed:
        console.print("assumed: " + "; ".join(assumed))
    console.print(rule_text(gpus.profile.memory_bytes))
    adapted = sorted((r.estimate.setup for r in rows if r.estimate.setup.lora_like), key=lambda s: s.quant is None)
    experts = fused_expert_note(spec, adapted[0]) if adapted else []  # the QLoRA rows' wording when there are any
    context = context_note(spec, rows[0].estimate.setup) if rows else []  # the same --seq-len for every row
    for note in context + gpu_notes(gpus) + coverage_notes(spec) + experts:  # the cards', the architecture's
        console.print(f"note: {note}")
