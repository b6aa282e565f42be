"""The plan: its rich table, its JSON, its rows as a pandas DataFrame (``--format csv``)."""

from __future__ import annotations

import pandas as pd
from rich.console import Console, JustifyMethod
from rich.table import Table

from vramplan.plan import PlanResult
from vramplan.report import gib_cell as _gib
from vramplan.setup import Method
from vramplan.units import GiB

COLUMNS = [
    "label",
    "method",
    "quant",
    "precision",
    "optim",
    "lora_r",
    "galore_rank",
    "gradient_checkpointing",
    "fsdp",
    "cpu_offload",
    "seq_len",
    "micro_batch",
    "grad_accum",
    "global_batch",
    "tokens_per_s",
    "step_s",
    "comm_s",
    "host_s",
    "per_gpu_bytes",
    "host_ram_bytes",
    "headroom_bytes",
    "max_seq_len",
    "max_micro_batch",
    "recommended",
]


def to_frame(result: PlanResult) -> pd.DataFrame:
    """The rows as a pandas DataFrame (recommended first); the rest of the answer in .attrs."""
    recs = []
    for i, r in enumerate(result.rows):
        s = r.setup
        recs.append(
            dict(
                label=r.label,
                method=r.method,
                quant=s.quant.value if s.quant else None,
                precision=s.precision.value,
                optim=s.optim.value,
                lora_r=s.lora_r if s.lora_like else None,
                galore_rank=s.galore_rank if s.method == Method.GALORE else None,
                gradient_checkpointing=s.gradient_checkpointing,
                fsdp=s.fsdp,
                cpu_offload=s.cpu_offload,
                seq_len=s.seq_len,
                micro_batch=s.batch_size,
                grad_accum=r.grad_accum,
                global_batch=r.global_batch,
                tokens_per_s=r.tokens_per_s,
                step_s=r.step_s,
                comm_s=r.comm_s,
                host_s=r.host_s,
                per_gpu_bytes=r.per_gpu_bytes,
                host_ram_bytes=r.host_ram_bytes,
                headroom_bytes=r.headroom_bytes,
                max_seq_len=r.max_seq_len,
                max_micro_batch=r.max_micro_batch,
                recommended=i == 0 and result.recommended is not None,
            )
        )
    df = pd.DataFrame.from_records(recs, columns=COLUMNS)
    df.attrs.update(
        model=result.model,
        gpus=result.gpus,
        reason=result.reason,
        per_method=result.per_method,
        suggestions=result.suggestions,
        evaluated=result.evaluated,
        discrete=result.discrete,
    )
    return df


def print_plan(result: PlanResult, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=150)  # piped: do not wrap rows at 80 columns
    title = f"{result.model} on {result.gpus} ({result.gpu_memory_bytes / GiB:.1f} GiB each): fastest that fit"
    t = Table(title=title, title_justify="left")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("configuration", "left"),
        ("micro-batch", "right"),
        ("accum", "right"),
        ("tokens/s", "right"),
        ("per-GPU GiB", "right"),
        ("host RAM GiB", "right"),
        ("headroom GiB", "right"),
        ("max seq (b=1)", "right"),
    )
    for col, just in columns:
        t.add_column(col, justify=just, no_wrap=col == "configuration")
    for i, r in enumerate(result.rows):
        name = ("[bold green]* " if i == 0 and result.recommended else "  ") + r.label
        t.add_row(
            name,
            f"{r.setup.batch_size} x {r.setup.seq_len}",
            str(r.grad_accum),
            f"{r.tokens_per_s:,.0f}",
            _gib(r.per_gpu_bytes),
            _gib(r.host_ram_bytes),
            _gib(r.headroom_bytes),
            f"{r.max_seq_len:,}",
        )
    rec = result.recommended  # set whenever there are rows (plan_spec)
    if result.rows and rec is not None:
        console.print(t)
        console.print(f"[bold green]Recommended:[/] {rec.label} — {result.reason}")
    else:
        console.print(f"[bold red]Nothing fits[/] {result.model} on {result.gpus} under these constraints. What would:")
        for s in result.suggestions:
            console.print(f"  - {s}")
    m = Table(
        title="per method: longest sequence (micro-batch 1) and largest micro-batch (at the minimum sequence)",
        title_justify="left",
    )
    for col in ("method", "longest seq", "with", "largest micro-batch", "with"):
        m.add_column(col)
    for key, e in result.per_method.items():
        m.add_row(
            key,
            f"{e['max_seq_len']:,}" if e["max_seq_len"] else "-",
            e["max_seq_config"] or "does not fit",
            str(e["max_micro_batch"] or "-"),
            e["max_batch_config"] or "does not fit",
        )
    console.print(m)
    console.print(
        f"[dim]{result.evaluated:,} (configuration, sequence, micro-batch) points evaluated over "
        f"{result.discrete} discrete configurations; every row re-checked with `vramplan estimate`.[/]"
    )
    for n in result.notes:
        console.print(f"note: {n}")


def result_json(result: PlanResult) -> dict:
    """``vramplan plan --format json``: the whole PlanResult as plain values."""
    return result.model_dump(mode="json")
