"""peft modules_to_save (--modules-to-save embed_tokens,lm_head), fast tier.

The step's rules are held to the CPU trace of the real peft (tests/test_cpu_trace.py, the
`*-to-save*` cases). Here: what follows from peft==0.21.2's source by hand (one trainable copy
per named module, in the original's dtype unless the framework casts it), the refusals, and
the plumbing (stacks, config files, --emit)."""

from __future__ import annotations

import pytest

from vramplan.categories import Category
from vramplan.cli import main
from vramplan.estimate import make_setup
from vramplan.memory import step_model
from vramplan.memory.optimizers import optimizer_state
from vramplan.memory.parameters import grad_bytes, parameters, store
from vramplan.model_loader import load_model_spec
from vramplan.setup import AdapterDtype, SavedModule

V_LLAMA3, H_LLAMA3 = 128256, 4096  # Llama 3 8B: untied embed_tokens and lm_head, [V, H] each


def _weights(spec, setup) -> int:
    return sum(store(p, setup).get(Category.WEIGHTS, 0) for p in parameters(spec, setup))


def _grads(spec, setup) -> int:
    return sum(grad_bytes(p, setup) * p.numel for p in parameters(spec, setup))


@pytest.mark.parametrize(("dtype", "width"), [(None, 2), ("fp32", 4), ("bf16", 2)])
def test_each_named_module_adds_one_trainable_copy(dtype, width):
    """ModulesToSaveWrapper.update deep-copies the module (utils/other.py:652-653) and trains the
    copy; the original stays, frozen. bf16 weights: the copy is bf16 unless a framework casts it."""
    spec = load_model_spec("llama-3-8b")
    plain = make_setup(method="lora")
    both = make_setup(method="lora", modules_to_save="embed_tokens,lm_head", modules_to_save_dtype=dtype)
    assert _weights(spec, both) - _weights(spec, plain) == 2 * V_LLAMA3 * H_LLAMA3 * width
    assert _grads(spec, both) - _grads(spec, plain) == 2 * V_LLAMA3 * H_LLAMA3 * width


def test_a_tied_head_is_copied_beside_the_shared_original():
    """Qwen2.5-0.5B ties lm_head to the embedding: the two copies are two tensors, the original one."""
    spec = load_model_spec("qwen2.5-0.5b")
    v, h = 151936, 896
    plain = make_setup(method="lora")
    head = make_setup(method="lora", modules_to_save="lm_head")
    both = make_setup(method="lora", modules_to_save="lm_head,embed_tokens")
    assert _weights(spec, head) - _weights(spec, plain) == v * h * 2
    assert _weights(spec, both) - _weights(spec, plain) == 2 * v * h * 2


def test_the_copies_have_adamw_states():
    spec = load_model_spec("llama-3-8b")
    plain = make_setup(method="lora", precision="mixed", model_dtype="bf16")
    both = make_setup(method="lora", precision="mixed", model_dtype="bf16", modules_to_save="embed_tokens,lm_head")

    def states(setup):
        return sum(optimizer_state(p, setup, p.numel).device for p in parameters(spec, setup))

    assert states(both) - states(plain) == 2 * (2 * V_LLAMA3 * H_LLAMA3 * 2)  # exp_avg, exp_avg_sq: zeros_like(p)


def test_the_estimate_says_what_the_copies_weigh():
    from vramplan.memory.parameters import saved_modules_note

    spec = load_model_spec("llama-3-8b")
    (note,) = saved_modules_note(spec, make_setup(method="lora", modules_to_save="embed_tokens,lm_head"))
    assert f"{2 * V_LLAMA3 * H_LLAMA3 * 2 / 2**30:.2f} GiB of weights" in note
    assert saved_modules_note(spec, make_setup(method="lora")) == []


def test_the_head_and_the_embedding_train_only_when_named():
    setup = make_setup(method="lora", modules_to_save="lm_head")
    assert setup.trains_head and not setup.trains_embedding
    assert make_setup(method="full").trains_head
    assert not make_setup(method="qlora").trains_head
    assert make_setup(method="qlora", modules_to_save="model.embed_tokens").modules_to_save == (
        SavedModule.EMBED_TOKENS,
    )


def test_a_trained_embedding_makes_the_first_layer_save_its_input():
    """The first layer's input needs grad once the embedding trains: its q/k/v (LoRA's lora_A) save
    their input, one [tokens, hidden] bf16 tensor more at the forward's end than the copy alone adds."""
    spec = load_model_spec("llama-3.2-1b")
    tokens, hidden, vocab = 4096, 2048, 128256

    def forward_end(setup):
        return max(p.allocated for p in step_model(spec, setup).phases if p.measured.value == "forward")

    plain = forward_end(make_setup(method="lora", seq_len=tokens))
    embed = forward_end(make_setup(method="lora", seq_len=tokens, modules_to_save="embed_tokens"))
    copy = vocab * hidden * 2  # the copy's weight (its states exist at the forward too: steady state)
    assert embed - plain >= copy + 2 * copy + tokens * hidden * 2


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--method", "lora", "--modules-to-save", "norm"], "--modules-to-save"),
        (["--method", "full", "--modules-to-save", "lm_head"], "--modules-to-save"),
        (
            ["--method", "lora", "--modules-to-save", "lm_head", "--modules-to-save-dtype", "fp16"],
            "--modules-to-save-dtype",
        ),
    ],
)
def test_bad_modules_to_save_is_one_line_naming_the_flag(capsys, argv, flag):
    assert main(["estimate", "llama-3.2-1b", "--gpus", "1x24GB", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert flag in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("stack", "method", "dtype"),
    [
        ("trl", "qlora", AdapterDtype.BF16),
        ("trl", "lora", None),
        ("llamafactory", "lora", AdapterDtype.FP32),
        ("axolotl", "qlora", None),
        ("plain", "lora", None),
    ],
)
def test_stacks_cast_the_copies_as_their_frameworks_do(stack, method, dtype):
    setup = make_setup(method=method, stack=stack, modules_to_save="lm_head")
    assert setup.modules_to_save_dtype == dtype
