"""Terminal rendering (rich). Formats bytes only here, at the edge."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from vramplan.categories import COLORS, Category
from vramplan.results import Estimate
from vramplan.units import GiB


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


def _verdict(est: Estimate) -> Text:
    if est.fits_gpu and not est.fits_host:
        return Text(f"DOES NOT FIT  GPU memory is fine ({est.per_gpu.total_bytes / GiB:.2f} GiB per GPU) but the host needs "
                    f"{est.host_ram_bytes / GiB:.1f} GiB RAM, has {est.host_ram_available_bytes / GiB:.1f} GiB "
                    "(set --host-ram for the training machine)", style="bold red")
    if est.fits:
        return Text(f"FITS  {est.per_gpu.total_bytes / GiB:.2f} GiB of {est.gpu_memory_bytes / GiB:.2f} GiB per GPU "
                    f"({est.headroom_bytes / GiB:.2f} GiB headroom)", style="bold green")
    return Text(f"DOES NOT FIT  needs {est.per_gpu.total_bytes / GiB:.2f} GiB per GPU, has {est.gpu_memory_bytes / GiB:.2f} GiB "
                f"(short by {-est.headroom_bytes / GiB:.2f} GiB)", style="bold red")


def print_estimate(est: Estimate, console: Console | None = None) -> None:
    console = console or Console()
    console.print(_verdict(est))
    console.print(f"[bold]{est.model}[/] on {est.gpu_count}x {est.gpu_name}: {est.description}")
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


def comparison_json(spec, gpus, rows) -> dict:
    return {"model": spec.name, "gpus": gpus.label, "recommended": next((r.label for r in rows if r.recommended), None),
            "strategies": [{"label": r.label, "reason": r.reason, "recommended": r.recommended,
                            **r.estimate.to_json_dict()} for r in rows]}


def print_comparison(spec, gpus, rows, console: Console | None = None) -> None:
    console = console or Console()
    title = f"{spec.name} on {gpus.count}x {gpus.profile.display_name} ({gpus.profile.memory_bytes / GiB:.1f} GiB each)"
    if spec.resolved_from:
        title += f"  [{spec.resolved_from!r} -> {spec.name}]"
    t = Table(title=title, title_justify="left")
    t.add_column("strategy", no_wrap=True)
    for col, just in (("GiB/GPU", "right"), ("host GiB", "right"), ("fits", "center"),
                      ("headroom", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        e = r.estimate
        mark = "[green]yes[/]" if e.fits else ("[yellow]no: RAM[/]" if e.fits_gpu else "[red]no[/]")
        label = ("[bold]* " if r.recommended else "  ") + r.label
        t.add_row(label, _gib(e.per_gpu.total_bytes), _gib(e.host_ram_bytes), mark, _gib(e.headroom_bytes))
    console.print(t)
    rec = next((r for r in rows if r.recommended), None)
    if rec:
        console.print(f"[bold green]Recommended:[/] {rec.label} — {rec.reason}")
    else:
        console.print("[bold red]Nothing fits.[/] Try more GPUs, a larger card, a shorter --seq-len or a smaller --batch-size "
                      "(`vramplan plan` searches for what would).")
    from vramplan.estimate import coverage_notes
    for note in coverage_notes(spec):  # the architecture's, the same for every strategy
        console.print(f"note: {note}")


def print_models(console: Console | None = None) -> None:
    from vramplan.model_spec import _aliases, preset_names
    console = console or Console()
    t = Table(title="model presets")
    t.add_column("preset")
    t.add_column("aliases")
    aliases = _aliases()
    for name in preset_names():
        t.add_row(name, ", ".join(sorted(a for a, v in aliases.items() if v == name and "/" not in a)))
    console.print(t)


def print_hardware(console: Console | None = None) -> None:
    from vramplan.hardware import profiles
    console = console or Console()
    t = Table(title="GPU profiles")
    for col in ("name", "GPU", "usable GiB", "bf16 TFLOP/s", "GB/s", "host link"):
        t.add_column(col)
    for p in profiles().values():
        t.add_row(p.name, p.display_name, f"{p.memory_bytes / GiB:.2f}", f"{p.training_tflops:g}" + ("" if p.bf16 else " (fp16)"),
                  f"{p.memory_bandwidth_gbps:g}", p.host_link)
    console.print(t)
