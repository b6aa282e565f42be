"""`plan --emit FMT -o FILE | --emit-dir DIR`: runnable configs for the plan's rows.

Every text is built (and read back by vramplan.configs.emit) before any file is written, and
each file is written atomically; a failed write removes the files this run wrote, so a
refusal or an error leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from vramplan.errors import VramplanError
from vramplan.units import GiB


def check_targets(args: argparse.Namespace) -> None:
    """-o / --emit-dir make sense with --emit only, and must be writable places (checked before planning)."""
    if args.emit is None:
        if args.output or args.emit_dir:
            raise VramplanError(
                "needs --emit FORMAT (axolotl, trl, llamafactory, torchtune, accelerate)",
                "-o" if args.output else "--emit-dir",
            )
        return
    if not args.output and not args.emit_dir:
        raise VramplanError("give -o FILE (the recommended row) or --emit-dir DIR (every shown row)", "--emit")
    if args.output:
        out = Path(args.output)
        if out.is_dir():
            raise VramplanError(f"{out} is a folder; give a file name", "-o")
        if not out.parent.resolve().is_dir():
            raise VramplanError(f"folder {out.parent} does not exist", "-o")
    if args.emit_dir and Path(args.emit_dir).exists() and not Path(args.emit_dir).is_dir():
        raise VramplanError(f"{args.emit_dir} exists and is not a folder", "--emit-dir")


def model_id(model: str) -> str:
    """What the framework loads: the Hugging Face id a preset was copied from, else MODEL as given
    (a Hugging Face id, or a local folder made absolute)."""
    from vramplan.model_loader import PRESET_DIR, resolve_preset_name

    preset = resolve_preset_name(model)
    if preset is not None:
        source = json.loads((PRESET_DIR / f"{preset}.json").read_text()).get("_source")
        if source:
            return str(source)
    path = Path(model).expanduser()
    if path.exists():
        return str((path if path.is_dir() else path.parent).resolve())
    return model


def _header(result, row, argv: list[str]) -> dict[str, str]:
    return {
        "predicted per-GPU peak": f"{row.per_gpu_bytes / GiB:.2f} GiB of {result.gpu_memory_bytes / GiB:.2f} GiB "
        f"on {result.gpus} ({row.label}, micro-batch {row.setup.batch_size} x "
        f"{row.setup.seq_len}, as nvidia-smi shows it)",
        "host RAM": f"{row.host_ram_bytes / GiB:.2f} GiB per node",
        "vramplan command": "vramplan " + shlex.join(argv),
    }


def _text(args: argparse.Namespace, result, row, model: str, world: int) -> str:
    from vramplan.configs import emit

    return emit(args.emit, row.setup, model, _header(result, row, getattr(args, "argv", [])), world=world)


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def build(args: argparse.Namespace, result, model: str, reading, world: int) -> dict[Path, str]:
    """path -> text for the recommended row (-o) and every shown row (--emit-dir). A row the
    format cannot express is skipped with a line on stderr; when the recommended one cannot be
    written, -o takes the fastest row that can."""
    if not result.rows:
        raise VramplanError("nothing fits these GPUs, so there is no row to write", "--emit")
    hf_id = reading.model if reading is not None and reading.model and not args.model else model_id(model)
    texts: dict[int, str] = {}
    refusals: dict[int, str] = {}
    for i, row in enumerate(result.rows):
        try:
            texts[i] = _text(args, result, row, hf_id, world)
        except VramplanError as e:
            refusals[i] = str(e).removeprefix(f"{e.flag}: ") if e.flag else str(e)
    out: dict[Path, str] = {}
    if args.output:
        rec = _recommended_index(result)
        first = rec if rec in texts else min(texts, default=None)
        if first is None:
            raise VramplanError(f"no shown row can be written as {args.emit}: {refusals[rec]}", "--emit")
        if first != rec:
            print(
                f"--emit: the recommended row ({result.rows[rec].label}) cannot be written as {args.emit} "
                f"({refusals[rec]}); writing {result.rows[first].label}",
                file=sys.stderr,
            )
        out[Path(args.output)] = texts[first]
    if args.emit_dir:
        for i, message in refusals.items():
            print(f"--emit-dir: skipped row {i + 1} ({result.rows[i].label}): {message}", file=sys.stderr)
        if not texts:
            raise VramplanError(f"no shown row can be written as {args.emit}", "--emit-dir")
        folder = Path(args.emit_dir)
        for i, text in texts.items():
            out[folder / f"{i + 1:02d}-{_slug(result.rows[i].label)}.yaml"] = text
    return out


def _recommended_index(result) -> int:
    """The recommended row's place among the shown rows (plan_spec: the fastest with the
    headroom rule's room, else the fastest), 0 when none is marked."""
    return next((i for i, row in enumerate(result.rows) if row == result.recommended), 0)


def write(texts: dict[Path, str]) -> None:
    """All files or none: each written atomically, the ones already written removed on a failure."""
    from vramplan.configs import write_atomic

    done: list[Path] = []
    try:
        for path, text in texts.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text)
            done.append(path)
    except OSError as e:
        for path in done:
            path.unlink(missing_ok=True)
        raise VramplanError(
            f"cannot write {e.filename or 'the file'} ({e.strerror}); nothing written", "--emit"
        ) from None
    for path in done:
        print(f"wrote {path}", file=sys.stderr)
