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
    for r in result.rows:
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
                recommended=r == result.recommended,
            )
        )
    df = pd.DataFrame.from_records(recs, columns=COLUMNS)
    for col in ("lora_r", "galore_rank"):  # absent for other methods: nullable integers, never 32.0
        df[col] = df[col].astype("Int64")
    df.attrs.update(
        model=result.model,
        gpus=result.gpus,
        reason=result.reason,
        per_method=result.per_method,
        suggestions=result.suggestions,
        evaluated=result.evaluated,
        discrete=result.discrete,
        rules=result.rules,
        assumed=result.assumed,
    )
    return df


# rich fits the table to the terminal: headers and the configuration wrap at spaces, cells of
# numbers have none and stay whole. Below WIDE_TABLE columns two columns go (CSV/JSON keep them).
PLAN_COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("batch\nx seq", "right"),
    ("accum", "right"),
    ("tokens/s", "right"),
    ("per-GPU\nGiB", "right"),
    ("host RAM\nGiB", "right"),
    ("headroom\nGiB", "right"),
    ("max seq\n(b=1)", "right"),
)
NARROW_DROPS = ("host RAM\nGiB", "max seq\n(b=1)")
WIDE_TABLE = 100


def print_plan(result: PlanResult, console: Console | None = None) -> None:
    console = console or Console()  # the terminal's width; rich folds the configuration column to fit
    title = f"{result.model} on {result.gpus} ({result.gpu_memory_bytes / GiB:.1f} GiB each): fastest that fit"
    if any(r.setup.rows != r.setup.batch_size for r in result.rows):
        title += " (DPO: batch in preference pairs, 2 rows each)"
    t = Table(title=title, title_justify="left")
    wide = console.width >= WIDE_TABLE
    t.add_column("configuration", justify="left", min_width=18)
    for col, just in PLAN_COLUMNS if wide else [c for c in PLAN_COLUMNS if c[0] not in NARROW_DROPS]:
        t.add_column(col, justify=just)
    for r in result.rows:
        name = ("[bold green]* " if r == result.recommended else "  ") + r.label
        cells = {
            "batch\nx seq": f"{r.setup.batch_size}x{r.setup.seq_len}",
            "accum": str(r.grad_accum),
            "tokens/s": f"{r.tokens_per_s:,.0f}",
            "per-GPU\nGiB": _gib(r.per_gpu_bytes),
            "host RAM\nGiB": _gib(r.host_ram_bytes),
            "headroom\nGiB": _gib(r.headroom_bytes),
            "max seq\n(b=1)": f"{r.max_seq_len:,}",
        }
        t.add_row(name, *(cells[c.header] for c in t.columns[1:]))  # type: ignore[index]
    rec = result.recommended  # set whenever there are rows (plan_spec)
    if result.rows and rec is not None:
        console.print(t)
        if console.width < WIDE_TABLE:
            dropped = " and ".join(d.replace("\n", " ") for d in NARROW_DROPS)
            console.print(f"[dim](a narrow terminal: {dropped} are in --format csv)[/]")
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
    for line in result.rules:
        console.print(line)
    if result.assumed:
        console.print("assumed: " + "; ".join(result.assumed))
    for n in result.notes:
        console.print(f"note: {n}")


def result_json(result: PlanResult) -> dict:
    """``vramplan plan --format json``: the whole PlanResult as plain values."""
    return result.model_dump(mode="json")
