"""vramplan next to a published benchmark table: Answer.AI's fsdp_qlora runs of March 2024.

usage: python scripts/published_check.py [--data FILE] [--write-docs]

Each line of tests/data/published/answerai_fsdp_qlora_2024.jsonl is one row of
AnswerDotAI/fsdp_qlora benchmarks_03_2024.md (its source line is in the row): a
`torch.cuda.max_memory_reserved()` peak on rank 0 of two 24 GB cards, with train.py's
template command (benchmarks_03_2024.md:22: reentrant checkpointing, FSDP over 2 GPUs).
For each row this runs the estimate with `--stack fsdp-qlora` and the row's flags and prints
predicted vs published. `--write-docs` rewrites the generated table in docs/published.md.

The libraries of March 2024: train.py's get_peft_model (train.py:669-684) ran a peft of then
(0.9/0.10), whose LoRA layers take the base weight's dtype (peft==0.10.0
peft/tuners/lora/layer.py:114-123: `self.to(weight.device, dtype=weight.dtype)`, bf16 here:
bf16 weights, or the 4-bit weight's bf16 quant_storage); today's peft upcasts them to fp32
(autocast_adapter_dtype, the stack's adapter_dtype). The compared estimate therefore passes
`--adapter-dtype bf16`; the two rows with a published allocated peak (benchmarks:50) agree
with it. The last column is the stack as it is today (fp32 adapters), the judged command.

What is compared: the reserved memory the step would report *on that card*. A row measured
near the card's capacity was reserved under memory pressure (the caching allocator frees its
cached blocks and retries rather than grow), so where the roomy-GPU replay exceeds the card
the prediction is the capped replay's reserved, the one the verdict rests on
(vramplan/reserved.py: simulate); a step the capped replay cannot fit is shown as OOM.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vramplan.categories import Category as C  # noqa: E402
from vramplan.estimate import estimate_config  # noqa: E402
from vramplan.units import GiB  # noqa: E402

DATA = ROOT / "tests" / "data" / "published" / "answerai_fsdp_qlora_2024.jsonl"
DOC = ROOT / "docs" / "published.md"
BEGIN = "<!-- published_check.py: begin -->"
END = "<!-- published_check.py: end -->"


def load_rows(path: Path = DATA) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# peft of March 2024 (see above): adapters in the base weight's dtype
ADAPTERS_2024 = "bf16"


def setup_fields(row: dict, adapter_dtype: str | None = ADAPTERS_2024) -> dict:
    """The estimate's setup for one row: the fsdp-qlora stack plus the row's own flags
    (train.py --train_type, --batch_size, --context_length, --use_cpu_offload,
    --sharding_strategy ddp = FSDP NO_SHARD, and the template's reentrant checkpointing);
    adapter_dtype None: the stack's (today's peft)."""
    return dict(
        adapter_dtype=adapter_dtype,
        method=row["train_type"],
        lora_r=row["lora_rank"],
        stack="fsdp-qlora",
        fsdp=row["gpus"],
        fsdp_sharding="no-shard" if row["sharding_strategy"] == "ddp" else "full",
        cpu_offload=row["cpu_offload"],
        gradient_checkpointing=True,
        checkpoint_reentrant=True,
        batch_size=row["batch_size"],
        seq_len=row["context_length"],
    )


def command(row: dict, adapter_dtype: str | None = ADAPTERS_2024) -> str:
    """The same estimate as a vramplan command line."""
    f = setup_fields(row, adapter_dtype)
    adapters = f" --adapter-dtype {adapter_dtype}" if adapter_dtype else ""
    sharding = " --fsdp-sharding no-shard" if f["fsdp_sharding"] == "no-shard" else ""
    offload = "--cpu-offload" if f["cpu_offload"] else "--no-cpu-offload"
    return (
        f"vramplan estimate {row['model']} --gpus {row['gpus']}x{row['gpu']} --method {f['method']} "
        f"--lora-r {f['lora_r']} --stack fsdp-qlora --fsdp {f['fsdp']}{sharding} {offload} "
        f"--gradient-checkpointing --checkpoint-reentrant --batch-size {f['batch_size']} --seq-len {f['seq_len']}"
        + adapters
    )


@dataclass(frozen=True)
class Prediction:
    allocated: int  # peak allocated (the step model)
    roomy_reserved: int  # max_memory_reserved() on a card with room to spare
    on_card_reserved: int  # what the row's card would report (the capped replay when it must)
    fits: bool
    pressure: bool  # the card is smaller than the roomy replay: reserved under pressure

    def error(self, published_gib: float) -> float:
        return self.on_card_reserved / GiB / published_gib - 1


def predict(row: dict, adapter_dtype: str | None = ADAPTERS_2024) -> Prediction:
    est = estimate_config(row["model"], gpus=f"{row['gpus']}x{row['gpu']}", **setup_fields(row, adapter_dtype))
    pg = est.per_gpu
    # estimate_spec: headroom = what the allocator may obtain (card - context - paged states)
    # less the reserved the verdict rests on (the capped replay's when the roomy one overflows)
    capacity = est.gpu_memory_bytes - pg.breakdown[C.CUDA_CONTEXT] - pg.breakdown.get(C.PAGED_OPTIMIZER_STATES, 0)
    on_card = capacity - est.headroom_bytes
    return Prediction(
        allocated=pg.peak_allocated_bytes,
        roomy_reserved=pg.peak_reserved_bytes,
        on_card_reserved=on_card,
        fits=est.fits_gpu,
        pressure=pg.peak_reserved_bytes > capacity,
    )


def _reserved_cell(p: Prediction, published: float) -> tuple[str, str]:
    if not p.fits:
        return f"OOM (needs {p.roomy_reserved / GiB:.2f})", "n/a"
    mark = "*" if p.pressure else ""
    return f"{p.on_card_reserved / GiB:.2f}{mark}", f"{p.error(published) * 100:+.1f}%"


def table(rows: list[dict], preds: list[Prediction], today: list[Prediction]) -> list[str]:
    out = [
        "| model (benchmarks line) | GPUs | train type | batch x seq | offload | sharding | published "
        "reserved | vramplan reserved | error | allocated: vramplan (published) | stack today: reserved, error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, p, t in zip(rows, preds, today, strict=True):
        line = row["source"].split(";")[0].rsplit(":", 1)[1]
        res, err = _reserved_cell(p, row["reserved_gib"])
        res_t, err_t = _reserved_cell(t, row["reserved_gib"])
        alloc = f"{p.allocated / GiB:.2f}" + (f" ({row['allocated_gib']:.2f})" if row["allocated_gib"] else "")
        out.append(
            f"| {row['model']} (:{line}) | 2x{row['gpu']} | {row['train_type']} | "
            f"{row['batch_size']} x {row['context_length']} | {'yes' if row['cpu_offload'] else 'no'} | "
            f"{row['sharding_strategy']} | {row['reserved_gib']:.2f} | {res} | {err} | {alloc} | {res_t}, {err_t} |"
        )
    return out


def summary(rows: list[dict], preds: list[Prediction], label: str) -> str:
    errs = [abs(p.error(r["reserved_gib"])) for r, p in zip(rows, preds, strict=True) if p.fits]
    oom = sum(not p.fits for p in preds)
    return (
        f"{label}: {len(rows)} rows, mean |error| {sum(errs) / max(len(errs), 1) * 100:.1f}%, "
        f"max {max(errs, default=0) * 100:.1f}%, {sum(e <= 0.10 for e in errs)} within 10%"
        + (f", {oom} predicted out of memory" if oom else "")
    )


def write_docs(lines: list[str]) -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + tail)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--write-docs", action="store_true", help=f"rewrite the generated table in {DOC.name}")
    args = ap.parse_args(argv)
    rows = load_rows(args.data)
    preds = [predict(r) for r in rows]
    today = [predict(r, adapter_dtype=None) for r in rows]
    lines = [
        *table(rows, preds, today),
        "",
        "GiB throughout; * = reserved under memory pressure (the capped replay's, vramplan/reserved.py).",
        "",
        "- " + summary(rows, preds, "libraries of March 2024 (bf16 adapters)"),
        "- " + summary(rows, today, "the stack today (fp32 adapters)"),
    ]
    print("\n".join(lines))
    if args.write_docs:
        write_docs(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
