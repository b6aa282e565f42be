"""--stack bundles: data integrity, precedence of explicit fields, and values checked against
what the frameworks' sources say (the expectations below are written from
/work/research/stack_defaults_and_configs.md part A, read from each release's source, not
from the bundle files)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.setup import Method, Optim, Stack, TrainingSetup
from vramplan.stacks import STACK_KNOBS, apply_stack, load_stack, stack_lines

ROOT = Path(__file__).resolve().parents[1]
# "package==version path:line[-line]" or "owner/repo@commit path:line", several joined by "; "
CITATION = re.compile(r"^[\w.\-/]+(==|@)[\w.]+ [\w./\-]+:\d+(-\d+)?$")


@pytest.mark.parametrize("stack", list(Stack))
def test_bundle_loads_and_every_value_cites_a_source_line(stack):
    bundle = load_stack(stack)
    assert bundle.stack == stack
    for rule in bundle.rules:
        assert rule.knob in STACK_KNOBS
        assert rule.why.strip()
        for part in rule.source.split("; "):
            assert CITATION.match(part), f"{stack.value}.{rule.knob}: {part!r}"


@pytest.mark.parametrize("stack", [s for s in Stack if s != Stack.PLAIN])
def test_every_stack_sets_the_core_knobs(stack):
    knobs = {r.knob for r in load_stack(stack).rules}
    core = {
        "precision",
        "model_dtype",
        "loss",
        "fp32_outputs",
        "keep_logits",
        "optim",
        "adapter_dtype",
        "kbit_prep",
        "dora",
        "lora_dropout",
        "gradient_checkpointing",
        "checkpoint_reentrant",
        "activation_offload",
        "attention",
        "packing",
        "optimizer_in_backward",
    }
    assert core <= knobs, core - knobs
    assert knobs & {"lora_targets", "lora_target_modules"}


def test_values_the_fields_cannot_take_yet_are_only_hf_optimizer_names():
    from transformers.training_args import OptimizerNames

    names = {o.value for o in OptimizerNames}
    for stack in Stack:
        for rule in load_stack(stack).rules:
            if not rule.supported:
                assert rule.knob == "optim" and rule.value in names, (stack, rule.knob, rule.value)


@pytest.mark.parametrize("method", list(Method))
def test_plain_is_the_field_defaults(method):
    assert load_stack(Stack.PLAIN).rules == ()
    assert TrainingSetup(method=method, stack="plain") == TrainingSetup(method=method)
    fields, lines = apply_stack({"method": method.value})
    assert lines == [] and fields["stack"] == "plain"


def test_plain_descriptions_are_unchanged():
    assert TrainingSetup().describe() == "full bf16 adamw_torch 1x2048"
    assert make_setup(method="qlora", lora_dropout=0.0).describe() == "qlora nf4 r=16 bf16 adamw_torch 1x2048"
    assert (
        make_setup(method="lora", gradient_checkpointing=True, fsdp=2, cpu_offload=True).describe()
        == "lora r=16 bf16 adamw_torch ckpt fsdp2+offload 1x2048"
    )


def test_a_stack_is_named_in_the_description_with_its_knobs():
    text = make_setup(method="qlora", stack="unsloth").describe()
    assert text.startswith("qlora nf4 r=16 mixed adamw_torch_fused ckpt 1x2048 [unsloth]")
    for word in ("loss=unsloth", "offload=unsloth", "reentrant", "adapters=fp32", "dropout=0"):
        assert word in text.split()


# hand-written from the research table (part A), one row per claim
EXPECTED = [
    (
        "hf-trainer",
        "lora",
        {},
        {
            "optim": "adamw_torch_fused",
            "lora_dropout": 0.0,
            "fp32_outputs": True,
            "checkpoint_reentrant": False,
            "model_dtype": "bf16",
            "precision": "mixed",
            "lora_target_modules": ("q_proj", "v_proj"),
            "gradient_checkpointing": False,
        },
    ),
    (
        "trl",
        "lora",
        {},
        {
            "loss": "trl-chunked-nll",
            "gradient_checkpointing": True,
            "model_dtype": "fp32",
            "lora_dropout": 0.05,
            "adapter_dtype": "fp32",
            "kbit_prep": False,
        },
    ),
    ("trl", "qlora", {}, {"adapter_dtype": "bf16"}),
    ("trl", "lora", {"deepspeed": "zero3"}, {"adapter_dtype": "bf16", "checkpoint_reentrant": True}),
    (
        "torchtune",
        "qlora",
        {},
        {
            "loss": "chunked",
            "precision": "bf16",
            "adapter_dtype": "bf16",
            "lora_dropout": 0.0,
            "optim": "adamw_torch_fused",
            "optimizer_in_backward": False,
            "gradient_checkpointing": True,
            "fp32_outputs": False,
            "lora_target_modules": ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        },
    ),
    ("torchtune", "full", {}, {"optimizer_in_backward": True}),
    ("torchtune", "full", {"gradient_accumulation": 4}, {"optimizer_in_backward": False}),
    (
        "unsloth",
        "qlora",
        {},
        {
            "loss": "unsloth",
            "activation_offload": "unsloth",
            "adapter_dtype": "fp32",
            "checkpoint_reentrant": True,
            "lora_dropout": 0.0,
            "packing": "padding-free",
            "kbit_prep": False,
            "lora_targets": "all-linear",
        },
    ),
    ("axolotl", "qlora", {}, {"lora_dropout": 0.0, "kbit_prep": False, "optim": "adamw_torch_fused", "loss": "hf"}),
    ("axolotl", "qlora", {"fsdp": 2}, {"kbit_prep": False, "fsdp_version": 1}),
    ("axolotl", "full", {}, {"precision": "mixed", "model_dtype": "bf16"}),
    (
        "llamafactory",
        "lora",
        {},
        {
            "checkpoint_reentrant": True,
            "gradient_checkpointing": True,
            "lora_dropout": 0.0,
            "model_dtype": "bf16",
            "kbit_prep": False,
            "lora_targets": "all-linear",
        },
    ),
    ("llamafactory", "full", {}, {"model_dtype": "fp32", "precision": "mixed"}),
    ("llamafactory", "lora", {"fsdp": 2}, {"fsdp_version": 1, "checkpoint_reentrant": True}),
    ("llamafactory", "lora", {"fsdp": 2, "fsdp_version": 2}, {"checkpoint_reentrant": False}),
    (
        "fsdp-qlora",
        "qlora",
        {"fsdp": 2},
        {
            "keep_logits": True,
            "lora_dropout": 0.1,
            "cpu_offload": True,
            "fsdp_version": 1,
            "checkpoint_reentrant": True,
            "optim": "adamw_torch",
            "lora_target_modules": ("k_proj", "q_proj", "v_proj", "up_proj", "down_proj", "gate_proj"),
        },
    ),
    ("fsdp-qlora", "qlora", {}, {"cpu_offload": False}),
    # README.md:47: pass --reentrant_checkpointing True with bitsandbytes; train.py's default
    # (False) stays for the other train_types
    ("fsdp-qlora", "lora", {"fsdp": 2}, {"checkpoint_reentrant": False}),
    ("fsdp-qlora", "qlora", {"quant": "hqq4"}, {"checkpoint_reentrant": False}),
    ("fsdp-qlora", "qlora", {"fsdp": 2, "checkpoint_reentrant": False}, {"checkpoint_reentrant": False}),
]


@pytest.mark.parametrize("stack,method,extra,expected", EXPECTED)
def test_stack_values_match_the_framework_sources(stack, method, extra, expected):
    setup = make_setup(method=method, stack=stack, **extra).model_dump(mode="json")
    got = {k: tuple(setup[k]) if isinstance(setup[k], list) else setup[k] for k in expected}
    assert got == expected


def test_explicit_fields_win_over_the_stack():
    setup = make_setup(
        method="lora", stack="trl", loss="hf", lora_dropout=0.2, gradient_checkpointing=False, model_dtype="bf16"
    )
    assert (setup.loss.value, setup.lora_dropout, setup.gradient_checkpointing, setup.model_dtype.value) == (
        "hf",
        0.2,
        False,
        "bf16",
    )
    assert setup.stack == Stack.TRL and setup.precision.value == "mixed"  # the rest still comes from the stack


def test_lora_targets_given_keep_the_stacks_module_list_out():
    setup = make_setup(method="lora", stack="hf-trainer", lora_targets="attention")
    assert setup.lora_targets.value == "attention" and setup.lora_target_modules is None


def test_none_counts_as_not_given():
    assert make_setup(method="lora", stack="trl", loss=None).loss.value == "trl-chunked-nll"
    assert make_setup(method="lora", stack="trl", attention=None).gradient_checkpointing is True


def test_galore_keeps_its_optimizer_under_a_stack():
    assert make_setup(method="galore", stack="hf-trainer").optim.value == "galore_adamw"


@pytest.mark.parametrize("stack", list(Stack))
def test_a_resolved_setup_round_trips(stack):
    setup = make_setup(method="qlora", stack=stack.value)
    assert TrainingSetup.model_validate(setup.model_dump(mode="json")) == setup


def test_unknown_stack_is_one_line_naming_the_flag_and_the_valid_ones():
    with pytest.raises(VramplanError) as err:
        make_setup(stack="nemo")
    assert err.value.flag == "--stack"
    text = str(err.value)
    assert "\n" not in text and "'nemo'" in text
    assert all(s.value in text for s in Stack)


def test_lines_say_what_the_stack_set_and_what_the_user_kept():
    fields, lines = apply_stack({"method": "qlora", "stack": "trl", "lora_dropout": 0.1})
    assert fields["loss"] == "trl-chunked-nll" and "lora_dropout" not in {k for k in fields if k != "lora_dropout"}
    assert lines[0].startswith("stack trl (trl==1.16.0): ") and "loss=trl-chunked-nll" in lines[0]
    assert lines[1] == "stack trl: your --lora-dropout kept over the stack's"
    assert stack_lines(make_setup(method="qlora", stack="trl", lora_dropout=0.1)) == lines


def test_torchtune_full_gets_its_paged_8bit_optimizer_stepped_in_backward():
    # recipes/configs/llama3_1/8B_full_single_device.yaml: PagedAdamW8bit, optimizer_in_bwd: True
    setup = make_setup(method="full", stack="torchtune")
    assert setup.optim == Optim.PAGED_ADAMW_8BIT and setup.optimizer_in_backward and setup.steps_in_backward
    assert not any("does not model yet" in line for line in stack_lines(setup))


def test_docs_cite_every_bundle_value():
    doc = (ROOT / "docs" / "stacks.md").read_text()
    for stack in Stack:
        for rule in load_stack(stack).rules:
            for part in rule.source.split("; "):
                assert part in doc, (stack.value, rule.knob, part)


def test_docs_tables_are_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_stacks_doc", ROOT / "scripts" / "gen_stacks_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.generated() in (ROOT / "docs" / "stacks.md").read_text(), (
        "docs/stacks.md is out of date: run python scripts/gen_stacks_doc.py"
    )


@pytest.mark.parametrize("flag,expected", [([], True), (["--no-checkpoint-reentrant"], False)])
def test_fsdp_qlora_reentrant_for_bnb_qlora_and_the_flag_wins(capsys, flag, expected):
    # AnswerDotAI/fsdp_qlora@05ed9f2 README.md:47: "be sure to pass --reentrant_checkpointing True"
    # with bitsandbytes; an explicit --no-checkpoint-reentrant is the caller's and is kept
    import json

    from vramplan.cli import main

    args = ["estimate", "llama-3.2-1b", "--gpus", "2x24GB", "--method", "qlora", "--stack", "fsdp-qlora"]
    assert main([*args, "--fsdp", "2", "--seq-len", "256", *flag, "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["setup"]["checkpoint_reentrant"] is expected
    kept = any("--checkpoint-reentrant kept over the stack's" in n for n in out["notes"])
    assert kept is (not expected)


def test_an_error_about_a_value_the_stack_set_says_so(capsys):
    """TRL leaves target_modules to peft's per-model map (q_proj,v_proj for a Llama), which has
    no entry matching Phi-3's fused qkv_proj; fsdp_qlora asks for sdpa, which Gemma 2 has not:
    the one line names the stack, its reason and source, and what to give instead."""
    from vramplan.cli import main

    assert main(["estimate", "phi-3-mini", "--gpus", "24GB", "--stack", "trl", "--method", "qlora"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--lora-targets: 'q_proj' (set by --stack trl:" in line and "trl==1.16.0" in line
    assert line.endswith("give --lora-targets (all-linear, attention or names)")
    assert main(["estimate", "gemma-2-2b", "--gpus", "24GB", "--stack", "fsdp-qlora", "--method", "qlora"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--attention: sdpa (set by --stack fsdp-qlora:" in line and "has no SDPA path" in line
    # the caller's own value: no stack named
    assert main(["estimate", "phi-3-mini", "--gpus", "24GB", "--method", "qlora", "--lora-targets", "q_proj"]) == 2
    assert "set by --stack" not in capsys.readouterr().err


def test_torchtune_runs_gemma2_on_its_own_eager_attention():
    """transformers has no SDPA path for Gemma 2's soft-capping, and torchtune's own Gemma 2
    attention computes it by hand: the stack's sdpa is estimated as eager, and said."""
    from vramplan.estimate import estimate_config

    tt = estimate_config("gemma-2-2b", gpus="1x24GB", method="lora", stack="torchtune")
    assert any(n.startswith("attention: torchtune's own attention for Gemma2ForCausalLM") for n in tt.notes)
    eager = estimate_config("gemma-2-2b", gpus="1x24GB", method="lora", stack="torchtune", attention="eager")
    assert tt.per_gpu.peak_allocated_bytes == eager.per_gpu.peak_allocated_bytes
