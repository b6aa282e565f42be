"""Issue 18: is the reserved memory the replay misses left over from earlier cases?

tests/data/h100_dev.jsonl was measured outside this repository, several cases per process
(shared reference-step.md: `gc.collect()`, `torch.cuda.empty_cache()`,
`reset_peak_memory_stats()` between cases). From its 13th case on the measured
max_memory_reserved sits above the allocator replay: 0.8 and 1.2 GiB on the two GaLore
cases, then a near-constant 2.8-3.2 GiB on Qwen2.5-0.5B full and LoRA and phi3 LoRA and
QLoRA, 4.9 GiB on FSDP2; 11 of the 12 cases before them are within 0.25 GiB, and the last
(phi3 full, 37 GB) within 0.01 (docs/allocator.md, "A constant offset"). A block still
allocated at a case's start pins its whole segment through empty_cache, and
reset_peak_memory_stats() starts the next case's peak there.

This script runs the dev cases in the file's order in ONE process, with that protocol,
through verify's run_case, and records before each case what the earlier ones left:
allocated and reserved after gc + empty_cache, and the segment list. Read next to the same
cases measured each in a fresh process (`scripts/calibrate.py`'s dev re-measurements):
a leftover at the start of the offset cases, and fresh-process reserved near the replay,
point at the harness; no leftover and the same offset fresh point at the CUDA side.

    python3 scripts/sequence_reserved.py --out $OUT/sequence.jsonl            # on the GPU
    python3 scripts/sequence_reserved.py --device cpu --dry-run --out /tmp/s.jsonl  # 1 layer, 1 x 64
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vramplan.accuracy import estimate_case, model_source  # noqa: E402
from vramplan.estimate import make_setup  # noqa: E402
from vramplan.measured import MeasuredCase, load_cases  # noqa: E402
from vramplan.units import MiB  # noqa: E402

DEV = ROOT / "tests" / "data" / "h100_dev.jsonl"
CONFIGS = ROOT / "tests" / "data" / "configs"


def leftover(device: str) -> dict:
    """What earlier cases left on the device after the protocol's gc + empty_cache."""
    gc.collect()
    if not device.startswith("cuda"):
        return {}
    import torch

    from vramplan.verify.probe import make_probe

    torch.cuda.empty_cache()
    return {
        "left_allocated_mb": torch.cuda.memory_allocated() / MiB,
        "left_reserved_mb": torch.cuda.memory_reserved() / MiB,
        "left_segments_mib": make_probe(device).segments(),
    }


def run_in_order(cases: list[MeasuredCase], device: str, dry_run: bool) -> list[dict]:
    from vramplan.verify.measure import run_case

    lines = []
    for case in cases:
        fields = case.setup_fields()
        if dry_run:
            fields.update(batch_size=1, seq_len=64)
        before = leftover(device)
        t = time.monotonic()
        try:
            m = run_case(
                model_source(case, CONFIGS),
                make_setup(**fields),
                device=device,
                num_layers=1 if dry_run else case.layers,
                steps=2 if dry_run else case.steps,
            )
        except Exception as e:  # noqa: BLE001 - one case that cannot run (GaLore 8-bit on a CPU) is a line
            lines.append({"case": case.name, **before, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
            print(json.dumps({k: v for k, v in lines[-1].items() if "segments" not in k}), flush=True)
            continue
        predicted = None if dry_run else estimate_case(case, CONFIGS).per_gpu.peak_reserved_bytes / MiB
        line = {
            "case": case.name,
            **before,
            "peak_alloc_mb": m.peak_allocated_bytes / MiB if m.peak_allocated_bytes is not None else None,
            "peak_reserved_mb": m.peak_reserved_bytes / MiB if m.peak_reserved_bytes is not None else None,
            "dev_file_reserved_mb": case.peak_reserved_mb,
            "replay_reserved_mb": predicted,
            "segments_mib": m.segments_mib,
            "fits": m.fits,
            "seconds": round(time.monotonic() - t, 1),
        }
        lines.append(line)
        print(json.dumps({k: v for k, v in line.items() if "segments" not in k}), flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--from-case", help="start at this case of the dev file (default: the first)")
    ap.add_argument("--dry-run", action="store_true", help="one layer, 1 x 64 tokens, no estimate")
    args = ap.parse_args(argv)
    cases = list(load_cases(DEV))
    names = [c.name for c in cases]
    if args.from_case:
        if args.from_case not in names:
            print(f"--from-case: {args.from_case!r} is not a case of {DEV.name}", file=sys.stderr)
            return 2
        cases = cases[names.index(args.from_case) :]
    lines = run_in_order(cases, args.device, args.dry_run)
    out = Path(args.out)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
