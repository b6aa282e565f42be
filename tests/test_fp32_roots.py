"""axolotl's fp32 embeddings and norms (--fp32-embeddings-norms), and the two backward rules the
CPU trace of it exposed (an untied embedding's grad made last; the recompute's kept input), fast tier.

The step's rules are held to the CPU trace (tests/test_cpu_trace.py: the axolotl-*-fp32-roots cases,
layer-backward full-mixed-ckpt, embedding untied-full). Here: what follows by hand from
axolotl==0.19.0 loaders/model.py:435-490 and 1153-1175 (which modules become fp32), the refusals,
and the stack's when-clauses."""

from __future__ import annotations

import pytest

from vramplan.categories import Category
from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory import step_model
from vramplan.memory.optimizers import optimizer_state
from vramplan.memory.parameters import grad_bytes, parameters, store
from vramplan.memory.types import PhaseKind
from vramplan.model_loader import load_model_spec

# Llama 3 8B: untied embed_tokens and lm_head [V, H]; 32 layers of two RMSNorms [H]; a final norm
V, H, LAYERS = 128256, 4096, 32
UPCAST = 2 * V * H + (2 * LAYERS + 1) * H  # the elements axolotl casts to fp32


def _sum(spec, setup, per_param) -> int:
    return sum(per_param(p) for p in parameters(spec, setup))


def test_embeddings_lm_head_and_norms_gain_two_bytes_each():
    spec = load_model_spec("llama-3-8b")
    bf16 = make_setup(method="full", precision="mixed", model_dtype="bf16")
    up = make_setup(method="full", precision="mixed", model_dtype="bf16", fp32_embeddings_norms=True)
    weights = lambda s: _sum(spec, s, lambda p: store(p, s).get(Category.WEIGHTS, 0))  # noqa: E731
    grads = lambda s: _sum(spec, s, lambda p: grad_bytes(p, s) * p.numel)  # noqa: E731
    # each tensor is rounded to the allocator's 512-byte blocks: 67 tensors change
    assert abs(weights(up) - weights(bf16) - 2 * UPCAST) <= 67 * 512
    assert grads(up) - grads(bf16) == 2 * UPCAST
    # AdamW keeps its two moments in the parameter's dtype: 2 x 2 more bytes per upcast element
    states = lambda s: _sum(spec, s, lambda p: optimizer_state(p, s, p.numel).device)  # noqa: E731
    assert abs(states(up) - states(bf16) - 4 * UPCAST) <= 2 * 67 * 512


def test_the_embedding_makes_the_residual_stream_fp32():
    """Its fp32 output meets residual adds, which autocast does not cast: under checkpointing each
    layer keeps an fp32 input, as over fp32 masters, not a bf16 one (at the loss backward every
    layer's kept input and the root's saves are alive; lm_head is fp32 and trainable in both)."""
    spec = load_model_spec("llama-3.2-1b")
    fields = dict(method="full", precision="mixed", gradient_checkpointing=True, seq_len=1024)

    def acts(**dtype) -> int:
        phases = step_model(spec, make_setup(**fields, **dtype)).phases
        return next(p for p in phases if p.kind == PhaseKind.LOSS_BACKWARD).parts[Category.ACTIVATIONS]

    up, masters = acts(model_dtype="bf16", fp32_embeddings_norms=True), acts(model_dtype="fp32")
    assert up == masters
    # 16 layers' kept inputs, 1024 x 2048 each, 2 more bytes per element than bf16's
    assert up - acts(model_dtype="bf16") >= 16 * 1024 * 2048 * 2


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        (dict(method="full", precision="mixed", model_dtype="bf16", fsdp=2), "--fsdp"),
        (dict(method="full", precision="mixed", model_dtype="bf16", deepspeed="zero2", data_parallel=2), "--deepspeed"),
        (dict(method="full", precision="bf16", model_dtype="bf16"), "--precision"),
        (dict(method="lora", precision="mixed", model_dtype="bf16"), "--method"),
        (dict(method="full", precision="mixed", model_dtype="bf16", train_layers=2), "--train-layers"),
    ],
)
def test_refused_where_axolotl_does_not_keep_them(fields, flag):
    with pytest.raises(VramplanError) as e:
        make_setup(fp32_embeddings_norms=True, **fields)
    assert flag in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("fields", "upcast"),
    [
        (dict(method="full"), True),
        (dict(method="full", attention="sdpa"), True),
        (dict(method="full", attention="eager"), True),
        (dict(method="full", attention="flash"), False),  # cast back for flash attention
        (dict(method="full", fsdp=2), False),  # FSDP: never upcast
        (dict(method="full", deepspeed="zero3", data_parallel=2), False),  # the engine casts back
        (dict(method="lora"), False),  # an adapter: cast back
    ],
)
def test_the_axolotl_stack_sets_it_where_its_loader_does(fields, upcast):
    assert make_setup(stack="axolotl", **fields).fp32_embeddings_norms is upcast


def test_an_untied_embedding_grad_is_made_after_every_layer_backward():
    """EmbeddingBackward runs last: the layers' backward moments hold lm_head's grad, not the
    embedding's; the embedding's backward moment holds both (Llama 3 8B: V x H bf16 each)."""
    spec = load_model_spec("llama-3-8b")
    setup = make_setup(method="full", seq_len=256)
    phases = step_model(spec, setup, every_layer=True).phases
    layer0_end = [p for p in phases if p.kind == PhaseKind.LAYER_BACKWARD and p.name.startswith("layer 0 ")][-1]
    embedding = next(p for p in phases if p.kind == PhaseKind.EMBEDDING_BACKWARD)
    assert embedding.parts[Category.GRADIENTS] - layer0_end.parts[Category.GRADIENTS] == 2 * V * H
