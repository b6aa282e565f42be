"""Issue 17: the boundaries fuzzed. Random argv fragments for every subcommand end in an
exit code and at most one line on stderr, never a traceback or main's internal-error line;
random valid estimates hold the invariants of a breakdown. Bounded for the fast tier:
at most 50 examples per property (hypothesis, deadline off: the first call of a command
imports its modules)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramplan.cli import EXIT_INTERNAL, main
from vramplan.errors import VramplanError
from vramplan.estimate import estimate_config, make_setup
from vramplan.memory.storage import alloc
from vramplan.model_loader import load_model_spec

TINY = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    hidden_act="silu",
)

# values a hostile user types: numbers past any size, signs, NaN, units, paths, empty text
VALUES = [
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "64",
    "4096",
    "1e3",
    "1.5",
    "nan",
    "inf",
    "-0",
    "abc",
    "",
    " ",
    "9" * 25,
    "9" * 400,
    "2x24GB",
    "24GB",
    "128",
    "128GB",
    "0GB",
    "-5GB",
    "1x",
    "x",
    "rtx-4090",
    "80GB",
    "h100-80gb",
    "/dev/null",
    "/dev/zero",
    "full",
    "lora",
    "qlora",
    "galore",
    "nf4",
    "hqq4",
    "bf16",
    "mixed",
    "fp16",
    "adamw_torch",
    "adamw_bnb_8bit",
    "galore_adamw",
    "attention",
    "1,2",
    "4,8",
    ",,,",
    "auto",
    "json",
    "csv",
    "table",
    "trl",
    "axolotl",
    "zero3",
    "chunked",
]
SETUP_FLAGS = [
    "--method",
    "--precision",
    "--optim",
    "--batch-size",
    "--seq-len",
    "--num-layers",
    "--lora-r",
    "--lora-dropout",
    "--lora-targets",
    "--quant",
    "--galore-rank",
    "--gradient-checkpointing",
    "--no-gradient-checkpointing",
    "--fsdp",
    "--cpu-offload",
    "--stack",
    "--loss",
    "--gradient-accumulation",
    "--nodes",
    "--fsdp-version",
    "--deepspeed",
    "--bogus",
]
FLAGS = {
    "estimate": SETUP_FLAGS + ["--gpus", "--host-ram", "--format"],
    "plan": [
        "--gpus",
        "--nodes",
        "--gpus-per-node",
        "--min-seq",
        "--global-batch",
        "--methods",
        "--min-lora-rank",
        "--min-galore-rank",
        "--host-ram",
        "--max-batch",
        "--num-layers",
        "--top",
        "--format",
        "--bogus",
    ],
    # no --device: a valid CPU run would train for real; on this machine verify stops at "no GPU"
    "verify": SETUP_FLAGS + ["--steps", "--gpus", "--extrapolate", "--depths", "--out", "--format"],
    "plot breakdown": SETUP_FLAGS + ["--gpus", "--host-ram"],
    "plot scaling": SETUP_FLAGS + ["--gpus", "--x", "--values"],
}
# a plausible value per flag, so that half the fragments pass the parser and reach the
# boundaries behind it (the setup's rules, the config check, the plan request, the output)
PLAUSIBLE = {
    "--method": ["full", "lora", "qlora", "galore"],
    "--precision": ["bf16", "mixed", "fp16"],
    "--optim": ["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "galore_adamw", "galore_adamw_8bit_layerwise"],
    "--batch-size": ["1", "4", "64", "100000"],
    "--seq-len": ["128", "2048", "100000"],
    "--num-layers": ["1", "2", "40"],
    "--lora-r": ["8", "16", "4096"],
    "--lora-dropout": ["0", "0.1", "0.99"],
    "--lora-targets": ["all-linear", "attention"],
    "--quant": ["nf4", "hqq4"],
    "--galore-rank": ["16", "128", "8192"],
    "--fsdp": ["1", "2", "8"],
    "--stack": ["plain", "trl", "axolotl", "unsloth", "fsdp-qlora"],
    "--loss": ["hf", "chunked", "torchtune-linear-ce", "liger"],
    "--liger-layers": ["none", "all", "glu"],
    "--gradient-accumulation": ["1", "8"],
    "--nodes": ["1", "2"],
    "--fsdp-version": ["1", "2"],
    "--deepspeed": ["zero1", "zero2", "zero3"],
    "--gpus": ["24GB", "2x24GB", "rtx-4090", "4x80GB", "1x12GB"],
    "--host-ram": ["64GB", "1GB", "1TB"],
    "--format": ["table", "json", "csv"],
    "--steps": ["1", "3"],
    "--extrapolate": ["auto", "never", "always"],
    "--depths": ["1,2", "2,4"],
    "--x": ["seq", "batch"],
    "--values": ["512,1024", "1,2,4"],
    "--min-seq": ["128", "2048", "99999"],
    "--global-batch": ["8", "7"],
    "--methods": ["full", "lora,galore", "qlora", "bogus"],
    "--min-lora-rank": ["8", "64"],
    "--min-galore-rank": ["64"],
    "--max-batch": ["4", "16"],
    "--top": ["1", "5"],
    "--gpus-per-node": ["1", "2", "3"],
    "--out": ["/proc/x", "/dev/null"],
}
MODELS = ["llama-3.2-1b", "qwen3-0.6b", "", "/dev/null", "no-such-model", "TINY"]
# plan's search is seconds per valid call: it gets the small bundled model and fewer examples
EXAMPLES = {"estimate": 50, "plan": 12, "verify": 40, "plot breakdown": 12, "plot scaling": 12}


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def _option(flag: str) -> st.SearchStrategy[tuple[str, str | None]]:
    plausible = st.sampled_from(PLAUSIBLE.get(flag, VALUES))
    return st.tuples(st.just(flag), st.one_of(st.none(), st.sampled_from(VALUES), plausible, plausible, plausible))


def _fragments(command: str) -> st.SearchStrategy[list[str]]:
    option = st.sampled_from(FLAGS[command]).flatmap(_option)
    gpus = st.sampled_from([[], [], ["--gpus", "24GB"], ["--gpus", "2x80GB"]])
    return st.tuples(gpus, st.lists(option, max_size=5)).map(
        lambda g_opts: g_opts[0] + [t for flag, v in g_opts[1] for t in (flag, v) if t is not None]
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(TINY))
    return str(d)


def _check(argv: list[str]) -> None:
    rc, err = _run(argv)
    assert "Traceback" not in err, (argv, err)
    assert rc != EXIT_INTERNAL and rc in (0, 1, 2, 3), (argv, rc, err)
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vramplan: error: "), (argv, err)


@pytest.mark.parametrize("command", list(FLAGS))
def test_random_argv_never_ends_in_a_traceback(command, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")

    @settings(
        max_examples=EXAMPLES[command], deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(
        model=st.sampled_from(MODELS if command != "plan" else ["qwen3-0.6b", "", "/dev/zero", "TINY"]),
        rest=_fragments(command),
    )
    def prop(model, rest):
        argv = [*command.split(), tiny_model if model == "TINY" else model, *rest]
        if command.startswith("plot"):
            argv += ["-o", str(out / "p.png")]
        if command == "verify":
            argv += ["--no-progress", "--out", str(out / "v")]
        _check(argv)

    prop()


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    rest=st.lists(st.sampled_from(VALUES + ["--format", "--bogus"]), max_size=3),
    command=st.sampled_from(["models", "hardware", "gpus", "plot accuracy", "nonsense", "plot"]),
)
def test_random_argv_for_the_other_commands(rest, command):
    _check([*command.split(), *rest])


# ---------------------------------------------------------------- invariants of an estimate

SMALL = ["llama-3.2-1b", "qwen3-0.6b", "qwen2.5-0.5b", "gemma-3-1b", "phi-3-mini", "qwen3-30b-a3b"]


@st.composite
def setups(draw) -> dict:
    method = draw(st.sampled_from(["full", "lora", "qlora", "galore"]))
    fields = dict(
        method=method,
        precision=draw(st.sampled_from(["bf16", "mixed"])),
        batch_size=draw(st.integers(1, 16)),
        seq_len=draw(st.sampled_from([64, 128, 512, 2048, 8192])),
    )
    if method == "galore":
        fields["optim"] = draw(st.sampled_from(["galore_adamw", "galore_adamw_8bit", "galore_adamw_8bit_layerwise"]))
        fields["galore_rank"] = draw(st.sampled_from([16, 64, 128]))
    else:
        fields["optim"] = draw(st.sampled_from(["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit"]))
    if method in ("lora", "qlora"):
        fields["lora_r"] = draw(st.sampled_from([8, 16, 64]))
    if method == "qlora":
        fields["quant"] = draw(st.sampled_from(["nf4", "hqq4"]))
    if method != "galore" and draw(st.booleans()):
        fields.update(fsdp=2, cpu_offload=draw(st.booleans()))
    return fields


@settings(max_examples=50, deadline=None, derandomize=True)
@given(model=st.sampled_from(SMALL), fields=setups())
def test_estimate_invariants(model, fields):
    try:
        make_setup(**fields)
    except VramplanError:
        return  # a combination the setup refuses is test_random_argv's business
    est = estimate_config(model, "2x80GB", host_ram=128 * 2**30, **fields)
    pg = est.per_gpu
    parts = {c.value: b for c, b in pg.breakdown.items()}
    assert all(b >= 0 for b in parts.values())
    allocated = sum(b for k, b in parts.items() if k not in ("allocator_overhead", "cuda_context"))
    assert allocated == pg.peak_allocated_bytes == max(pg.phases.values())
    assert pg.total_bytes >= pg.peak_reserved_bytes >= pg.peak_allocated_bytes > 0
    assert est.headroom_bytes == est.gpu_memory_bytes - pg.total_bytes
    assert est.fits == (est.fits_gpu and est.fits_host)


@pytest.mark.cputrace  # seconds each: many plans or estimates (the fast tier stays under 2 min)
@settings(max_examples=50, deadline=None, derandomize=True)
@given(model=st.sampled_from(SMALL + ["llama-3.3-70b"]), fields=setups())
def test_checkpointing_raises_the_peak_by_at_most_one_hidden_state(model, fields):
    """The real step under checkpointing keeps the input of the last layer to run backward,
    which without it nothing saves (traced: tests/test_inputs.py, class 12); nothing else may
    rise. One hidden state of the residual stream: at most fp32 (4 bytes) per element."""
    try:
        make_setup(**fields)
    except VramplanError:
        return
    plain = estimate_config(model, "2x80GB", **fields).per_gpu.peak_allocated_bytes
    ckpt = estimate_config(model, "2x80GB", gradient_checkpointing=True, **fields).per_gpu.peak_allocated_bytes
    spec = load_model_spec(model)
    assert ckpt - plain <= alloc(fields["batch_size"] * fields["seq_len"] * spec.hidden * 4)
