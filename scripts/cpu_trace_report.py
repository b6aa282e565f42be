"""Trace the reference step on the CPU for a matrix of small configurations and write
traced-vs-model bytes per phase as JSON lines (tests/data/cpu/trace.jsonl by default).

usage: python scripts/cpu_trace_report.py [-o FILE]      (trace, then render docs/cpu-trace.md)
       python scripts/cpu_trace_report.py --render-only (docs/cpu-trace.md from the committed files)
Groups: "structure" (the cases tests/test_cpu_trace.py holds to 1.5%), "layer-backward"
(a 64-token vocabulary, so a decoder layer's backward is the peak: the phase the H100
calibration never pins), "build" (hqq QLoRA whose peak is quantizing the largest Linear)
"dequantize" (hqq QLoRA whose peak is a 4-bit Linear dequantized for a matmul) and
"long-context" (16k tokens on two layers, a 64-token vocabulary), "offload-attention"
(reentrant checkpointing, packed sequences under SDPA, eager attention), "real-width" (presets
at their real width and vocabulary, truncated to a few layers), "loss" (the --loss kinds
that run on the CPU, accelerate's fp32 outputs, the loop keeping the logits), "grpo" (TRL's GRPOTrainer:
model.generate over the generation batch, the no-grad scoring, its _compute_loss), "reward" (TRL's
RewardTrainer.compute_loss over a sequence-classification model: no lm_head, a one-output score
head), "preference" (TRL's DPOTrainer step:
its fused head over chosen and rejected rows, the no-grad reference forward), "compile" (a
full fine-tune with each decoder layer compiled as torchtune's compile_model does), "engines" (DDP and
FSDP1 on rank 0 of a fake process group) and "known-gaps"
(architectures outside vramplan.estimate.TRACED_MODEL_TYPES, whose estimate's note warns of
them, and the traced ones' residuals; not in the range the other groups are held to) and
"optimizers" (every optimizer verify builds with its real library, and optimizer in backward;
held to 2%, the optimizer phase left out where the CPU step is not CUDA's).
Comparison rules as in tests/test_cpu_trace.py; hqq rows also compare the build's peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_cpu_trace import (  # noqa: E402
    ADAPTER_CASES,
    B2S256,
    BUILD_CASES,
    CASES,
    COMPILE_CASES,
    DEQ_CASES,
    EMBED_CASES,
    EMBED_SHAPE,
    ENGINE_CASES,
    GRPO_CASES,
    KNOB_CASES,
    LAYER_ARCH_CASES,
    LLAMA,
    LONG,
    LONG_SHAPE,
    LOSS_CASES,
    OPTIMIZER_CASES,
    PREFERENCE_CASES,
    REWARD_CASES,
    V64_SHAPE,
    WIDE,
    _build_compared,
    _model_build_peak,
    _model_phases,
    engine_model_phases,
    optimizer_model_phases,
)
from test_cpu_trace import TINY_VOCAB as V64  # noqa: E402
from test_cpu_trace import TINY_VOCAB as V64_LLAMA  # noqa: E402

from vramplan.estimate import make_setup  # noqa: E402
from vramplan.model_loader import load_model_spec, resolve_config  # noqa: E402
from vramplan.units import MiB  # noqa: E402
from vramplan.verify.cputrace import trace_step  # noqa: E402

TINY_VOCAB = {
    f"v64-h{h}-f{f}": dict(LLAMA, vocab_size=64, hidden_size=h, intermediate_size=f, num_hidden_layers=4)
    for h, f in ((256, 1024), (256, 2048), (512, 1024))
}
LAYER_SETUPS = {
    "full": dict(method="full"),
    "full-ckpt": dict(method="full", gradient_checkpointing=True),
    "lora": dict(method="lora"),
    "lora-ckpt": dict(method="lora", gradient_checkpointing=True),
    "fsdp2-ckpt": dict(method="full", fsdp=2, gradient_checkpointing=True),
    "galore-lw-ckpt": dict(
        method="galore", galore_rank=32, optim="galore_adamw_layerwise", gradient_checkpointing=True
    ),
}

# (preset, layers, setup, batch x seq): real widths, a real vocabulary, a few layers; small
# enough for a 24 GiB, 2-core machine (each case well under a minute)
REAL_WIDTH = [
    ("llama-3.1-8b", 2, dict(method="lora"), (1, 512)),
    ("llama-3.1-8b", 2, dict(method="qlora", quant="hqq4", gradient_checkpointing=True), (1, 512)),
    ("qwen3-8b", 2, dict(method="lora"), (1, 512)),
    ("qwen3-8b", 2, dict(method="lora", gradient_checkpointing=True), (1, 1024)),
    ("qwen3-0.6b", 4, dict(method="full"), (1, 1024)),
    ("qwen3-30b-a3b", 2, dict(method="lora", gradient_checkpointing=True), (1, 512)),
    ("gemma-3-1b", 6, dict(method="lora"), (1, 1024)),
    ("gemma-3-1b", 6, dict(method="full", gradient_checkpointing=True), (1, 1024)),
    ("gemma-3-4b", 2, dict(method="lora"), (1, 1024)),  # the multimodal checkpoint: vision tower built, not run
]

# Outside the tolerance the other groups are held to, each named in docs/memory-model.md
# ("Architectures"): architectures whose estimate carries a "never checked" note, and the
# traced ones' known residuals.
UNTRACED = {
    "deepseek_v2": dict(
        architectures=["DeepseekV2ForCausalLM"],
        model_type="deepseek_v2",
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
        kv_lora_rank=64,
        q_lora_rank=None,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        first_k_dense_replace=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        topk_method="greedy",
        max_position_embeddings=4096,
    ),
    "phi": dict(
        architectures=["PhiForCausalLM"],
        model_type="phi",
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=3,
        num_attention_heads=8,
        vocab_size=4096,
        max_position_embeddings=4096,
        partial_rotary_factor=0.5,
    ),
    "seed_oss-dropout": dict(
        LLAMA,
        architectures=["SeedOssForCausalLM"],
        model_type="seed_oss",
        head_dim=32,
        attention_dropout=0.1,
        residual_dropout=0.1,
    ),
}
UNTRACED_SETUPS = {
    "full": dict(method="full"),
    "lora": dict(method="lora"),
    "lora-ckpt": dict(method="lora", gradient_checkpointing=True),
}
# OLMo2 at Qwen3-0.6B-like width, its layers dominating: the post-MLP norm's backward point
OLMO2_WIDE = dict(
    architectures=["Olmo2ForCausalLM"],
    model_type="olmo2",
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=3,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=64,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    hidden_act="silu",
)

# The traced adapters' known residuals (docs/memory-model.md, "Adapter dtype" .. "DoRA")
ADAPTER_GAPS = {
    # a 4-bit bitsandbytes base on the fp32 stream, checkpointed, where the recompute's MLP is the
    # forward's peak: peft's `result + lora_out` adds an fp32 result and a bf16 adapter output, and
    # the CPU's TensorIterator promotes the bf16 input by a copy (ATen TensorIterator.cpp
    # compute_types, "Creates temporaries for CPU operations": common_device == kCPU only; CUDA
    # casts inside the kernel): 4 bytes per MLP element the trace holds and CUDA does not
    "v64-qlora-nf4-fp32w-mixed-ckpt": (
        V64,
        dict(method="qlora", quant="nf4", model_dtype="fp32", precision="mixed", gradient_checkpointing=True),
        V64_SHAPE,
    ),
}

LONG_SETUPS = {
    "full": dict(method="full"),
    "full-ckpt": dict(method="full", gradient_checkpointing=True),
    "lora": dict(method="lora"),
    "qlora-hqq4-ckpt": dict(method="qlora", quant="hqq4", gradient_checkpointing=True),
}


def _model_of(group: str, spec, setup) -> dict[str, int]:
    """The model's peak per compared phase, by the group's phase rule."""
    phase_rule = {
        "optimizers": optimizer_model_phases,
        "engines": engine_model_phases,
    }
    model = phase_rule.get(group, _model_phases)(spec, setup)
    if _build_compared(setup):
        model["build"] = _model_build_peak(spec, setup)
    return model


def run(group: str, name: str, cfg: dict, fields: dict, shape: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        setup = make_setup(**{**shape, **fields})
        spec = load_model_spec(d, use_cache=False)
        traced = trace_step(d, setup)
        model = _model_of(group, spec, setup)
    row = {"group": group, "name": name, "config": cfg, "setup": setup.model_dump(mode="json")}
    for phase, predicted in model.items():
        t = traced.peak(phase, step=1 if phase != "build" else None)
        row[phase] = {"traced_bytes": t, "model_bytes": predicted, "error": round((predicted - t) / t, 4)}
    return row


def refresh(row: dict) -> dict:
    """A committed row with this commit's model beside its traced bytes (nothing traced again)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(row["config"]))
        model = _model_of(row["group"], load_model_spec(d, use_cache=False), make_setup(**row["setup"]))
    out = dict(row)
    for phase, predicted in model.items():
        t = row[phase]["traced_bytes"]
        out[phase] = {"traced_bytes": t, "model_bytes": predicted, "error": round((predicted - t) / t, 4)}
    return out


DATA = ROOT / "tests" / "data" / "cpu"
BEFORE = DATA / "trace_model_98031c9.jsonl"
PHASES = ("build", "forward", "backward", "optimizer")


def _setup_text(setup: dict) -> str:
    parts = [setup["method"]] + ([setup["quant"]] if setup.get("quant") and setup["method"] == "qlora" else [])
    if setup["method"] != "full" and setup["method"] != "galore" and setup.get("lora_dropout"):
        parts.append(f"dropout {setup['lora_dropout']}")
    if setup.get("precision") == "mixed":
        parts.append("mixed")
    if setup.get("optim", "adamw_torch") != "adamw_torch":
        parts.append(setup["optim"])
    if setup.get("optimizer_in_backward"):
        parts.append("in backward")
    if setup.get("fsdp", 1) > 1:
        v1 = " v1" if setup.get("fsdp_version") == 1 else ""
        sgo = f" {setup['fsdp_sharding']}" if setup.get("fsdp_sharding", "full") != "full" else ""
        parts.append(f"FSDP{setup['fsdp']}{v1}{sgo}" + (" offload" if setup.get("cpu_offload") else ""))
    if setup.get("data_parallel", 1) > 1 and setup.get("fsdp", 1) == 1:
        parts.append(f"DDP{setup['data_parallel']}")
    if setup.get("gradient_checkpointing"):
        parts.append("ckpt" + (" reentrant" if setup.get("checkpoint_reentrant") else ""))
    parts += [
        f"{k.replace('_', ' ')} {setup[k]}"
        for k in ("activation_offload", "attention", "packing")
        if setup.get(k) not in (None, "none")
    ]
    if setup.get("loss", "hf") != "hf":
        parts.append(f"loss {setup['loss']}")
    parts += [
        word
        for key, word in (
            ("fp32_outputs", "fp32 outputs"),
            ("keep_logits", "keep logits"),
            ("compile", "compiled"),
            ("fp32_embeddings_norms", "fp32 embeddings/norms"),
        )
        if setup.get(key)
    ]
    parts += _adapter_text(setup)
    if setup.get("objective") == "grpo":
        return ", ".join(parts + [_grpo_text(setup)]) + f"; {setup['batch_size']}x{setup['seq_len']}"
    if setup.get("objective", "sft") != "sft":
        ref = " (reference log-probs precomputed)" if setup.get("precompute_ref_log_probs") else ""
        kind = "RewardTrainer" if setup["objective"] == "reward" else "DPOTrainer"
        trainer = f" (axolotl: trl 1.9.0's {kind})" if setup.get("stack") == "axolotl" else " (trl 1.16.0)"
        if setup["objective"] == "kto":
            kl = "" if setup.get("kto_kl", True) else ", no KL term"
            parts.append(f"kto (trl 1.16.0){ref}{kl}")
            return ", ".join(parts) + f"; {setup['batch_size']} examples x{setup['seq_len']}"
        parts.append(f"{setup['objective']}{trainer}{ref}")
        return ", ".join(parts) + f"; {setup['batch_size']} pairs x{setup['seq_len']}"
    return ", ".join(parts) + f"; {setup['batch_size']}x{setup['seq_len']}"


def _grpo_text(setup: dict) -> str:
    """GRPO's knobs: the completion, the generation batch, beta, iterations."""
    rows = setup["batch_size"] * (setup.get("steps_per_generation") or setup.get("gradient_accumulation", 1))
    extra = [f"beta {setup['beta']:g}"] if setup.get("beta") else []
    extra += [f"{setup['num_iterations']} iterations"] if setup.get("num_iterations", 1) > 1 else []
    trl = "1.9.0" if setup.get("stack") == "axolotl" else "1.16.0"  # axolotl 0.19.0's pin
    return f"grpo (trl {trl}): completion {setup['completion_len']}, {rows} rows generated" + "".join(
        f", {e}" for e in extra
    )


def _adapter_text(setup: dict) -> list[str]:
    """The issue-13 adapter knobs a row sets (absent from older rows)."""
    parts = [f"{setup['model_dtype']} weights"] if setup.get("model_dtype") else []
    if setup["method"] in ("lora", "qlora"):
        parts += [f"{setup['adapter_dtype']} adapters"] if setup.get("adapter_dtype") else []
        parts += ["DoRA"] if setup.get("dora") else []
        parts += ["kbit prep"] if setup.get("kbit_prep") else []
        parts += ["targets " + ",".join(setup["lora_target_modules"])] if setup.get("lora_target_modules") else []
        parts += [f"targets {setup['lora_targets']}"] if setup.get("lora_targets", "all-linear") != "all-linear" else []
    return parts


def render(rows: list[dict], before: dict) -> str:
    """docs/cpu-trace.md: every traced case, its traced peak per phase and the model's error,
    with the error of the model at commit 98031c9 on the same trace where it differs."""
    out = [
        "# The memory model against the CPU trace, case by case",
        "",
        "Generated by `python scripts/cpu_trace_report.py --render-only` from",
        "`tests/data/cpu/trace.jsonl` (this model) and `tests/data/cpu/trace_model_98031c9.jsonl`",
        "(the same traced steps next to the model at commit 98031c9). What the trace is and what",
        'it leaves out: `docs/verify.md`, "CPU trace"; the model\'s backward is compared less the',
        "logits the reference step's loop holds at the loss backward, verify's not (loss.held_output_bytes;",
        "and, for the compiled chunked loss",
        "under a frozen lm_head, plus the B·V·h bf16 copy the CPU's bmm makes of the expanded lm_head",
        "weight: verify/cputrace.py cpu_head_bmm_copy). Each cell: the traced peak of the phase",
        "(step 1; build: the whole build) in MiB, then the model's error; `was` gives the earlier",
        "model's error where it differed by more than 0.5 points.",
        "",
    ]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    for group, items in groups.items():
        out += [f"## {group}", "", "| case | setup | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
        for r in items:
            old = before.get((r["group"], r["name"]), {})
            cells = []
            for p in PHASES:
                if p not in r:
                    cells.append("")
                    continue
                e = r[p]["error"]
                cell = f"{r[p]['traced_bytes'] / MiB:.2f} ({e:+.1%})"
                if p in old and abs(old[p]["error"] - e) > 0.005:
                    cell += f" was {old[p]['error']:+.1%}"
                cells.append(cell)
            out.append(f"| {r['name']} | {_setup_text(r['setup'])} | " + " | ".join(cells) + " |")
        out.append("")
    held = [r for r in rows if not r["group"].startswith("known-gaps")]
    errs = [r[p]["error"] for r in held for p in PHASES[1:] if p in r]
    out += [
        f"{len(held)} cases of the architectures vramplan traces; forward, backward and optimizer phases: "
        f"{min(errs):+.1%} to {max(errs):+.1%}."
    ]
    if len(held) < len(rows):
        out += [f'{len(rows) - len(held)} known gaps (docs/memory-model.md, "Architectures").']
    out += [""]
    return "\n".join(out)


def _splice(old: list[dict], rows: list[dict], group: str | None) -> list[dict]:
    """The old rows with one group's replaced where it stood (appended if it is new)."""
    if not group:
        return rows
    at = next((i for i, r in enumerate(old) if r["group"] == group), None)
    rest = [r for r in old if r["group"] != group]
    if at is None:
        return rest + rows
    before = sum(1 for r in old[:at] if r["group"] != group)
    return rest[:before] + rows + rest[before:]


def _splice_cases(old: list[dict], rows: list[dict], order: list[tuple[str, str]]) -> list[dict]:
    """The old rows with the traced cases' rows put where they stood, a new case where the
    case list (`order`: every (group, case)) has it: after the row of the case before it."""
    new = {(r["group"], r["name"]): r for r in rows}
    out = [new.pop((r["group"], r["name"]), r) for r in old]
    for key, row in new.items():
        earlier = order[: order.index(key)]
        at = max((i for i, r in enumerate(out) if (r["group"], r["name"]) in earlier), default=None)
        if at is None:
            at = max((i for i, r in enumerate(out) if r["group"] == key[0]), default=len(out) - 1)
        out.insert(at + 1, row)
    return out


def _slug(fields: dict) -> str:
    parts = [fields["method"]] + ([fields["quant"]] if "quant" in fields else [])
    return "-".join(parts + (["ckpt"] if fields.get("gradient_checkpointing") else []))


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_doc(trace: Path) -> None:
    before = {(r["group"], r["name"]): r for r in load_rows(BEFORE)} if BEFORE.exists() else {}
    (ROOT / "docs" / "cpu-trace.md").write_text(render(load_rows(trace), before))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=str(DATA / "trace.jsonl"))
    ap.add_argument("--render-only", action="store_true", help="only write docs/cpu-trace.md from the committed files")
    ap.add_argument("--group", help="trace only this group; the output file keeps its other rows")
    ap.add_argument(
        "--case",
        action="append",
        help="with --group: trace only this case of it (repeatable); its row is replaced where it stood",
    )
    ap.add_argument(
        "--refresh-model",
        action="store_true",
        help="recompute every committed row's model bytes with this commit (the traced bytes kept), then render",
    )
    args = ap.parse_args()
    if args.refresh_model:
        trace = DATA / "trace.jsonl"
        trace.write_text("".join(json.dumps(refresh(r)) + "\n" for r in load_rows(trace)))
    if args.render_only or args.refresh_model:
        write_doc(DATA / "trace.jsonl")
        return 0
    jobs = [("structure", n, cfg, f, B2S256) for n, (cfg, f) in CASES.items()]
    jobs += [
        ("layer-backward", f"{m}/{s}", cfg, f, dict(batch_size=2, seq_len=512, lora_dropout=0.0))
        for m, cfg in TINY_VOCAB.items()
        for s, f in LAYER_SETUPS.items()
    ]
    v64 = dict(batch_size=2, seq_len=512, lora_dropout=0.0)
    jobs += [("layer-backward", n, cfg, f, v64) for n, (cfg, f) in LAYER_ARCH_CASES.items()]
    short = dict(batch_size=1, seq_len=64, lora_dropout=0.0)
    jobs += [("build", n, WIDE, f, short) for n, f in BUILD_CASES.items()]
    jobs += [("dequantize", n, dict(WIDE, vocab_size=1024), f, short) for n, f in DEQ_CASES.items()]
    jobs += [("embedding", n, cfg, f, EMBED_SHAPE) for n, (cfg, f) in EMBED_CASES.items()]
    jobs += [("long-context", f"16k/{n}", LONG, f, LONG_SHAPE) for n, f in LONG_SETUPS.items()]
    jobs += [
        (
            "real-width",
            f"{name}/L{layers}/{_slug(f)}",
            resolve_config(name, num_layers=layers)[2],
            f,
            dict(batch_size=b, seq_len=sq, lora_dropout=0.0),
        )
        for name, layers, f, (b, sq) in REAL_WIDTH
    ]
    jobs += [
        ("known-gaps", f"{a}/{n}", cfg, f, B2S256) for a, cfg in UNTRACED.items() for n, f in UNTRACED_SETUPS.items()
    ]
    jobs += [("loss", n, cfg, f, B2S256) for n, (cfg, f) in LOSS_CASES.items()]
    jobs += [("preference", n, cfg, f, B2S256) for n, (cfg, f) in PREFERENCE_CASES.items()]
    jobs += [("grpo", n, cfg, f, B2S256) for n, (cfg, f) in GRPO_CASES.items()]
    jobs += [("reward", n, cfg, f, B2S256) for n, (cfg, f) in REWARD_CASES.items()]
    jobs += [("compile", n, cfg, f, shape) for n, (cfg, f, shape) in COMPILE_CASES.items()]
    jobs += [("adapters", n, cfg, f, shape) for n, (cfg, f, shape) in ADAPTER_CASES.items()]
    jobs += [("known-gaps-adapters", n, cfg, f, shape) for n, (cfg, f, shape) in ADAPTER_GAPS.items()]
    jobs += [("optimizers", n, LLAMA, f, B2S256) for n, f in OPTIMIZER_CASES.items()]
    jobs += [("engines", n, LLAMA, f, B2S256) for n, f in ENGINE_CASES.items()]
    jobs += [
        ("known-gaps", "olmo2-h1024-v64/full-ckpt", OLMO2_WIDE, dict(method="full", gradient_checkpointing=True), v64)
    ]
    jobs += [("offload-attention", n, V64_LLAMA, f, V64_SHAPE) for n, f in KNOB_CASES.items()]
    old = []
    if args.case and not args.group:
        ap.error("--case needs --group")
    every = [(g, n) for g, n, *_ in jobs]
    if args.group:
        jobs = [j for j in jobs if j[0] == args.group and (not args.case or j[1] in args.case)]
        old = load_rows(Path(args.output)) if Path(args.output).exists() else []
    rows = []
    for job in jobs:
        row = run(*job)
        rows.append(row)
        print(
            row["group"],
            row["name"],
            {p: row[p]["error"] for p in ("forward", "backward", "optimizer") if p in row},
            flush=True,
        )
    spliced = _splice_cases(old, rows, every) if args.case else _splice(old, rows, args.group)
    Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in spliced))
    if Path(args.output).resolve() == (DATA / "trace.jsonl").resolve():
        write_doc(DATA / "trace.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
