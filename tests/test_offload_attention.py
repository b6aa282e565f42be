"""Activation offload, reentrant checkpointing, attention kernels and packing: each rule
against bytes derived by hand from its source (docs/memory-model.md, "Activation offload,
reentrant checkpointing, attention and packing")."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vramplan.categories import Category as C
from vramplan.errors import VramplanError
from vramplan.estimate import make_setup
from vramplan.memory import LayerPoint, PhaseKind, layer_saved_per_token, step_model
from vramplan.memory.attention import step_masks
from vramplan.model_loader import load_model_spec

MiB = 2**20
# llama-3.1-8b: hidden 4096, 32 layers, 32 heads of 128, 8 kv heads; vocab 128256
H, L, Q, KV, NH = 4096, 32, 4096, 1024, 32


@pytest.fixture(scope="module")
def llama8b():
    return load_model_spec("llama-3.1-8b")


def _phase(model, kind, layer=None, point=None):
    return next(p for p in model.phases if p.kind == kind and p.layer == layer and p.point == point)


def _lora(**kw):
    return make_setup(**{"method": "lora", "gradient_checkpointing": True, "batch_size": 1, "seq_len": 3000, **kw})


def test_checkpoint_offload_moves_every_layer_input_to_power_of_two_pinned_blocks(llama8b):
    # save_on_cpu(pin_memory=True): one pinned copy of each layer's bf16 input, N*h*2 =
    # 24,576,000 B, which torch's CachingHostAllocator rounds up to 32 MiB
    plain, off = step_model(llama8b, _lora()), step_model(llama8b, _lora(activation_offload="checkpoints"))
    assert off.host_pinned - plain.host_pinned == L * 32 * MiB
    # at the loss, no layer input is on the GPU any more
    loss = PhaseKind.FORWARD_LOSS
    freed = _phase(plain, loss).parts[C.ACTIVATIONS] - _phase(off, loss).parts[C.ACTIVATIONS]
    assert freed == L * 3000 * H * 2
    assert any("modelled from source, not measured" in n for n in off.notes)


def test_unsloth_offload_keeps_the_last_input_and_two_reload_buffers(llama8b):
    # unsloth_zoo gradient_checkpointing.py: every input but the last offloaded (bf16), host
    # slots grown to it (200 slots of 128Ki bf16 elements to start), GPU_BUFFERS + GPU_BUFFERS_B
    setup = _lora(seq_len=4096, activation_offload="unsloth")
    plain, off = step_model(llama8b, _lora(seq_len=4096)), step_model(llama8b, setup)
    one = 4096 * H * 2  # 32 MiB
    assert off.host_pinned - plain.host_pinned == L * one + (200 - L) * 128 * 1024 * 2
    loss = PhaseKind.FORWARD_LOSS
    freed = _phase(plain, loss).parts[C.ACTIVATIONS] - _phase(off, loss).parts[C.ACTIVATIONS]
    assert freed == (L - 1) * one - 2 * one


def test_unsloth_below_512_tokens_is_plain_checkpointing(llama8b):
    plain = step_model(llama8b, _lora(seq_len=256, checkpoint_reentrant=True))
    unsloth = step_model(llama8b, _lora(seq_len=256, activation_offload="unsloth"))
    assert unsloth.host_pinned == plain.host_pinned
    assert max(p.allocated for p in unsloth.phases) == max(p.allocated for p in plain.phases)


def test_offload_all_keeps_only_the_norms_deduplicated_inputs(llama8b):
    # LoRA: each RMSNorm saves its fp32 input twice (pow, mul): 4h, twice per layer, stays
    setup = make_setup(method="lora", batch_size=1, seq_len=1024, activation_offload="all")
    plain = step_model(llama8b, make_setup(method="lora", batch_size=1, seq_len=1024))
    off = step_model(llama8b, setup)
    n = 1024
    per_layer = [
        layer_saved_per_token(llama8b, layer, setup, input_grad=i > 0) for i, layer in enumerate(llama8b.layers)
    ]
    offloaded = sum(n * a for a in per_layer) - sum(n * (4 * H * (2 if i > 0 else 1)) for i in range(L))
    loss = PhaseKind.FORWARD_LOSS
    assert _phase(plain, loss).parts[C.ACTIVATIONS] - _phase(off, loss).parts[C.ACTIVATIONS] == offloaded
    # the host holds every saved tensor once, and the loss's fp32 log-softmax
    assert off.host_pinned - plain.host_pinned == sum(n * a for a in per_layer) + 4 * n * llama8b.vocab


def test_reentrant_holds_the_recomputed_output_through_the_layer_backward(llama8b):
    plain, re = (
        step_model(llama8b, _lora(), every_layer=True),
        step_model(llama8b, _lora(checkpoint_reentrant=True), every_layer=True),
    )
    end = (PhaseKind.LAYER_BACKWARD, 0, LayerPoint.END)
    assert _phase(re, *end).allocated - _phase(plain, *end).allocated == 3000 * H * 2


def test_reentrant_runs_downs_adapter_path_that_the_early_stop_skips(llama8b):
    # no early stop: at down's adapter peft's fp32 path (12·out) exists, not only the base's
    # bf16 output (2·out); only the layer's output grad is in flight (2h), not the adapter's
    # fp32 + bf16 output grads and the layer's (4·out + 2·out + 2h, out = h for down)
    point = (PhaseKind.LAYER_BACKWARD, 5, LayerPoint.LORA_RECOMPUTE_DOWN)
    setup = dict(lora_dropout=0.05)
    plain = _phase(step_model(llama8b, _lora(**setup), every_layer=True), *point)
    re = _phase(step_model(llama8b, _lora(checkpoint_reentrant=True, **setup), every_layer=True), *point)
    n = 3000
    assert re.parts[C.TRANSIENT] - plain.parts[C.TRANSIENT] == n * (12 * H - 2 * H) - n * (4 * H + 2 * H)


def test_flash_never_masks_nor_repeats_kv():
    mistral = load_model_spec("mistral-7b")  # sliding window 4096: at 8k SDPA gets a mask
    layer = mistral.layers[0]
    sdpa, flash = (make_setup(method="lora", seq_len=8192, attention=a) for a in ("sdpa", "flash"))
    q, kv = mistral.q_dim, mistral.kv_dim
    # SDPA: k and v repeated to every head and a bf16 mask copy of 8192 columns per token
    assert (
        layer_saved_per_token(mistral, layer, sdpa) - layer_saved_per_token(mistral, layer, flash)
        == 2 * 2 * (q - kv) + 2 * 8192
    )
    assert step_masks(mistral, flash) == 0 and step_masks(mistral, sdpa) == 8192 * 8192


def test_packed_position_ids_give_sdpa_a_mask_in_every_layer(llama8b):
    layer = llama8b.layers[0]
    plain = make_setup(method="lora", seq_len=2048)
    packed = make_setup(method="lora", seq_len=2048, packing="position-ids")
    # the bf16 mask copy (2·S per token) and k, v repeated to every head (use_gqa_in_sdpa off)
    assert layer_saved_per_token(llama8b, layer, packed) - layer_saved_per_token(llama8b, layer, plain) == (
        2 * 2048 + 2 * 2 * (Q - KV)
    )
    assert step_masks(llama8b, packed) == 2048 * 2048  # the bool [1, 1, S, S] mask


def test_padding_free_is_one_row_of_all_tokens(llama8b):
    layer = llama8b.layers[0]
    pf = make_setup(method="lora", batch_size=2, seq_len=1024, packing="padding-free")
    packed = make_setup(method="lora", batch_size=2, seq_len=1024, packing="position-ids")
    # SDPA: one 2048 x 2048 mask instead of two 1024 x 1024
    assert layer_saved_per_token(llama8b, layer, pf) - layer_saved_per_token(llama8b, layer, packed) == 2 * 1024
    assert step_masks(llama8b, pf) == 2048 * 2048
    # FlashAttention-2 varlen: no mask at all, the unpacked step's bytes
    flash = make_setup(method="lora", batch_size=2, seq_len=1024, packing="padding-free", attention="flash")
    none = make_setup(method="lora", batch_size=2, seq_len=1024)
    assert layer_saved_per_token(llama8b, layer, flash) == layer_saved_per_token(llama8b, layer, none)
    assert step_masks(llama8b, flash) == 0


def test_eager_on_a_sdpa_model_keeps_the_probabilities(llama8b):
    eager = make_setup(method="lora", seq_len=1024, attention="eager")
    sdpa = make_setup(method="lora", seq_len=1024)
    layer = llama8b.layers[0]
    # q, repeated k and v, fp32 softmax + bf16 probs per score, vs SDPA's q, k, v, out, lse
    assert layer_saved_per_token(llama8b, layer, eager) - layer_saved_per_token(llama8b, layer, sdpa) == (
        (2 * Q + 4 * Q + NH * 1024 * 6) - (2 * Q + 4 * KV + 2 * Q + 4 * NH)
    )


def test_sdpa_on_a_model_without_an_sdpa_path_is_refused():
    gemma2 = load_model_spec("gemma-2-2b")
    with pytest.raises(VramplanError, match="--attention"):
        step_model(gemma2, make_setup(method="lora", attention="sdpa"))


def test_checkpoint_offload_needs_checkpointing():
    with pytest.raises(VramplanError, match="--gradient-checkpointing") as e:
        make_setup(method="lora", activation_offload="checkpoints")
    assert "--activation-offload" in str(e.value)


def test_cli_names_both_flags_in_one_line():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vramplan.cli",
            "estimate",
            "llama-3.2-1b",
            "--gpus",
            "1x24GB",
            "--method",
            "lora",
            "--activation-offload",
            "unsloth",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "--activation-offload" in lines[0] and "--gradient-checkpointing" in lines[0]


def test_planner_fits_padding_free_masks_in_the_token_count(llama8b):
    # padding-free under SDPA: the mask spans the whole row of batch x seq tokens, so the
    # planner's quadratic term is in N, not N x seq
    import numpy as np

    from vramplan.memory import prepare
    from vramplan.plan import _allocs, _coefficients

    setup = make_setup(method="lora", packing="padding-free", gradient_checkpointing=True)
    pre = prepare(llama8b, setup)
    coef, _ = _coefficients(llama8b, setup, pre, 512, 4096)
    at, _ = _allocs(llama8b, setup, pre, 3, 1024)
    n = 3 * 1024
    assert np.allclose(coef[:, 0] + coef[:, 1] * n + coef[:, 2] * n * n, at, rtol=1e-4)


class _OffloadDecisions:
    """TRL 1.16 OffloadActivations.pack_tensor's decisions in streams mode, replayed on the
    CPU (trl/models/activation_offloading.py:200-340; its copies need CUDA streams and pinned
    memory): a tensor saved again while its storage's first save is among the last 5 packs is
    kept on the device, and so is every later save of that storage; tensors under 1024 B and
    parameters are kept; everything else is offloaded. Bytes per decoder layer."""

    def __init__(self, params):
        self.tid, self.layer = 0, None
        self.stash: dict[int, tuple] = {}
        self.key_id: dict[tuple, int] = {}
        self.id_key: dict[int, tuple] = {}
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.kept: dict[int, dict[tuple, int]] = {}
        self.host: dict[int, int] = {}

    def _track(self, key, tid):
        self.key_id[key], self.id_key[tid] = tid, key

    def pack(self, t):
        import torch

        self.tid += 1
        key = (t.untyped_storage().data_ptr() + t.storage_offset(), t.dtype)
        if self.layer is None:
            return t
        if key in self.key_id:  # dedup: kept on the device
            self.kept.setdefault(self.layer, {})[key] = t.untyped_storage().nbytes()
            self._track(key, self.tid)
            return t
        if (
            t.element_size() * t.nelement() < 1024
            or isinstance(t, torch.nn.Parameter)
            or t.untyped_storage().data_ptr() in self.params
        ):
            return t
        for old in [i for i in self.stash if i <= self.tid - 5]:
            del self.stash[old]
            k = self.id_key.pop(old, None)
            if k is not None and self.key_id.get(k) == old:
                del self.key_id[k]
        self.host[self.layer] = self.host.get(self.layer, 0) + t.element_size() * t.nelement()
        self.stash[self.tid] = key
        self._track(key, self.tid)
        return t


@pytest.mark.cputrace
@pytest.mark.parametrize("method", ["lora", "full"])
def test_offload_all_keeps_what_trl_deduplicates_on_the_real_model(method, tmp_path):
    """The real step's saved tensors (transformers, peft on the CPU) through TRL's pack
    decisions: per decoder layer the model's GPU-resident bytes (offload_all_resident) and
    its host bytes (every saved tensor once), to 2%."""
    import json

    import torch
    from test_cpu_trace import TINY_VOCAB

    from vramplan.memory.activations import per_layer_saved
    from vramplan.memory.checkpointing import offload_all_resident
    from vramplan.memory.context import activation_context
    from vramplan.verify.build import build_step, decoder_prefix

    (tmp_path / "config.json").write_text(json.dumps(TINY_VOCAB))
    setup = make_setup(method=method, batch_size=2, seq_len=256, lora_dropout=0.0, activation_offload="all")
    spec = load_model_spec(str(tmp_path), use_cache=False)
    # the step without the offloader (verify does not run it); the hooks replay its decisions
    built = build_step(str(tmp_path), make_setup(**{**setup.model_dump(), "activation_offload": "none"}), device="cpu")
    sim = _OffloadDecisions(list(built.model.parameters()))
    layers = built.model.get_submodule(decoder_prefix(built.model, spec.num_layers))
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: setattr(sim, "layer", i))
        layer.register_forward_hook(lambda m, a, o: setattr(sim, "layer", None))
    with torch.autograd.graph.saved_tensors_hooks(sim.pack, lambda t: t):
        built.forward(built.batch())
    n, ctx = setup.tokens, activation_context(setup)
    saved = per_layer_saved(spec, setup)
    # RoPE's cos/sin, saved by every layer, are counted once for the step (rope_saved)
    shared = {k for i in sim.kept for k in sim.kept[i] if sum(k in other for other in sim.kept.values()) > 1}
    for i, layer in enumerate(spec.layers):
        resident = n * offload_all_resident(spec, layer, ctx, i > 0 or method == "full")
        kept = sum(b for k, b in sim.kept.get(i, {}).items() if k not in shared)
        assert abs(kept - resident) <= 0.02 * resident, (i, sim.kept.get(i))
        assert abs(sim.host[i] - n * saved[i]) <= 0.02 * n * saved[i], (i, sim.host[i], n * saved[i])


def test_flash_on_a_class_without_flash_attention_is_refused():
    # transformers 5.25 Gemma3ForConditionalGeneration: _supports_flash_attn = False (flash
    # drops the bidirectional mask over image tokens); read by the analysis into the spec
    gemma3 = load_model_spec("gemma-3-4b")
    assert not gemma3.supports_flash
    with pytest.raises(VramplanError, match="--attention"):
        step_model(gemma3, make_setup(method="lora", attention="flash"))


@pytest.mark.cputrace
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_offload_packs_only_each_layer_input_on_the_real_model(reentrant, tmp_path):
    """transformers' offload runs each checkpoint inside save_on_cpu (an outer
    saved_tensors_hooks; modeling_utils.py:3162-3170), which needs pinned memory on an
    accelerator. The same outer hooks around the real step's checkpoints on the CPU see
    exactly one packed tensor per layer, the layer's bf16 input: what checkpoint_offload moves."""
    import json

    import torch
    from test_cpu_trace import TINY_VOCAB

    from vramplan.memory.checkpointing import checkpoint_offload, pinned
    from vramplan.verify.build import build_step, decoder_prefix

    (tmp_path / "config.json").write_text(json.dumps(TINY_VOCAB))
    setup = make_setup(
        method="lora",
        batch_size=2,
        seq_len=256,
        lora_dropout=0.0,
        gradient_checkpointing=True,
        checkpoint_reentrant=reentrant,
    )
    spec = load_model_spec(str(tmp_path), use_cache=False)
    built = build_step(str(tmp_path), setup, device="cpu")
    packed: list[list[int]] = []

    def offloading(func):
        def run(*args, **kwargs):
            packed.append([])

            def pack(t):
                packed[-1].append(t.element_size() * t.nelement())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                return func(*args, **kwargs)

        return run

    for layer in built.model.get_submodule(decoder_prefix(built.model, spec.num_layers)):
        layer._gradient_checkpointing_func = offloading(layer._gradient_checkpointing_func)
    built.forward(built.batch())
    one = setup.tokens * spec.hidden * 2
    assert packed == [[one]] * spec.num_layers
    assert checkpoint_offload(spec, setup.model_copy(update={"activation_offload": "checkpoints"})).host == (
        spec.num_layers * pinned(one)
    )
