"""The step's allocation events (vramplan/memory/events.py) and the verdict from their
replay (vramplan/reserved.py): the live bytes at every phase's moment are that phase's,
on every preset x a setup grid; hand-checked small cases."""

from __future__ import annotations

import numpy as np
import pytest

from vramplan.allocator import AllocatorConfig, Op, parse_alloc_conf, replay
from vramplan.categories import ALLOCATED
from vramplan.categories import Category as C
from vramplan.estimate import estimate_spec, make_setup
from vramplan.hardware import parse_gpus
from vramplan.memory import step_model
from vramplan.memory.events import CATEGORIES, Ledger, step_events
from vramplan.memory.phases import worst_layer_only
from vramplan.memory.types import LayerPoint, PhaseKind
from vramplan.model_loader import load_model_spec, preset_names
from vramplan.reserved import simulate

MiB = 2**20
# the setups of scripts/phase_hash.py (each technique the phases model), at 1 x 512 tokens
SETUPS = [
    {"method": "full"},
    {"method": "full", "precision": "mixed"},
    {"method": "lora"},
    {"method": "lora", "gradient_checkpointing": True},
    {"method": "qlora", "quant": "nf4", "gradient_checkpointing": True},
    {"method": "qlora", "quant": "hqq4"},
    {"method": "galore"},
    {"method": "galore", "optim": "galore_adamw_8bit_layerwise"},
    {"method": "lora", "fsdp": 2},
    {"method": "qlora", "fsdp": 2, "cpu_offload": True, "gradient_checkpointing": True},
    {"method": "full", "optim": "adamw_bnb_8bit"},
    {"method": "lora", "lora_targets": "attention"},
    {"method": "full", "precision": "mixed", "fsdp": 2, "gradient_checkpointing": True},
    # frozen fp32 weights under autocast: each layer's saved bf16 copies (memory/autocast.py)
    {"method": "lora", "precision": "mixed"},
    {"method": "lora", "precision": "mixed", "lora_targets": "attention", "gradient_checkpointing": True},
]


def live_by_category(ev) -> np.ndarray:
    """[category, event count + 1]: live requested bytes after events[:k], from the raw
    arrays (a FREE's size is its tensor's ALLOC size)."""
    size_of: dict[int, int] = {}
    signed = np.zeros(len(ev.events), np.int64)
    for k, (op, tid, size) in enumerate(
        zip(ev.events.ops.tolist(), ev.events.ids.tolist(), ev.events.sizes.tolist(), strict=True)
    ):
        if op == Op.ALLOC:
            size_of[tid] = size
            signed[k] = size
        else:
            signed[k] = -size_of.pop(tid)
    out = np.zeros((len(CATEGORIES), len(signed) + 1), np.int64)
    for i in range(len(CATEGORIES)):
        out[i, 1:] = np.cumsum(np.where(ev.categories == i, signed, 0))
    return out


def assert_live_equals_phases(spec, setup, label) -> None:
    ev = step_events(spec, setup)
    live = live_by_category(ev)
    phases = step_model(spec, setup, every_layer=True).phases
    assert sorted(m.phase.name for m in ev.moments) == sorted(p.name for p in phases), label
    for m in ev.moments:
        for i, cat in enumerate(CATEGORIES):
            want = m.phase.parts.get(cat, 0) if cat in ALLOCATED else 0
            assert live[i, m.index] == want, (label, m.phase.name, cat)
    assert (live >= 0).all()
    assert live[:, -1].sum() >= 0 and ev.events.sizes[ev.events.ops == Op.ALLOC].min() > 0


# LLM.int8 (memory/quantization.py): the inputs its Linears hold past a non-reentrant checkpoint
# (made in two blocks in the last layer), down's held input saved apart from what down frees
INT8_SETUPS = [
    {"method": "qlora", "quant": "int8"},
    {"method": "qlora", "quant": "int8", "gradient_checkpointing": True},
    {"method": "qlora", "quant": "int8", "gradient_checkpointing": True, "checkpoint_reentrant": True},
    {"method": "qlora", "quant": "int8", "precision": "mixed", "kbit_prep": True, "gradient_checkpointing": True},
    {"method": "qlora", "quant": "int8", "lora_targets": "attention", "adapter_dtype": "bf16"},
]


@pytest.mark.parametrize("preset", preset_names())
def test_live_bytes_at_every_phase_equal_the_phase(preset):
    spec = load_model_spec(preset)
    for fields in SETUPS:
        assert_live_equals_phases(spec, make_setup(batch_size=1, seq_len=512, **fields), (preset, fields))


@pytest.mark.parametrize("preset", preset_names())
def test_the_worst_layer_model_is_the_every_layer_model_collapsed(preset):
    """estimate_spec builds one every-layer model and collapses it (phases.worst_layer_only)
    instead of building step_model's worst-layer model again: both give the same phases."""
    spec = load_model_spec(preset)
    for fields in SETUPS:
        setup = make_setup(batch_size=1, seq_len=512, **fields)
        direct = step_model(spec, setup)
        collapsed = worst_layer_only(step_model(spec, setup, every_layer=True))
        assert [(p.name, p.kind, p.parts) for p in collapsed.phases] == [
            (p.name, p.kind, p.parts) for p in direct.phases
        ], (preset, fields)
        assert (collapsed.host_pinned, collapsed.notes) == (direct.host_pinned, direct.notes)


# one preset per architecture in the fast tier, the others in the marked tier
FAST_INT8 = {"gemma-2-2b", "gemma-3-1b", "llama-3.2-1b", "mixtral-8x7b", "phi-3-mini", "qwen3-0.6b", "qwen2.5-0.5b"}


@pytest.mark.parametrize(
    "preset", [p if p in FAST_INT8 else pytest.param(p, marks=pytest.mark.cputrace) for p in preset_names()]
)
def test_int8_live_bytes_at_every_phase_equal_the_phase(preset):
    spec = load_model_spec(preset)
    for fields in INT8_SETUPS:
        assert_live_equals_phases(spec, make_setup(batch_size=1, seq_len=512, **fields), (preset, fields))


# --compile: the compiled decoder layers' saves (memory/compile.py) on a full fine-tune without
# checkpointing, with the HF and the chunked loss; LoRA and checkpointed layers stay eager
COMPILE_SETUPS = [
    {"method": "full", "compile": True},
    {"method": "full", "loss": "chunked", "compile": True},
    {"method": "full", "loss": "chunked", "compile": True, "fsdp": 2},
    {"method": "full", "loss": "chunked", "compile": True, "gradient_checkpointing": True},
    {"method": "lora", "loss": "chunked", "compile": True},
]


@pytest.mark.parametrize("preset", preset_names())
def test_compiled_layers_live_bytes_equal_the_phases(preset):
    spec = load_model_spec(preset)
    for fields in COMPILE_SETUPS:
        assert_live_equals_phases(spec, make_setup(batch_size=1, seq_len=512, **fields), (preset, fields))


# each --activation-offload mode (with and without checkpointing, reentrant, QLoRA, FSDP), at
# 4 x 512 tokens: enough for Unsloth to offload on every preset (an input over 2 MiB)
OFFLOAD_SETUPS = [
    {"method": "lora", "gradient_checkpointing": True, "activation_offload": "checkpoints"},
    {
        "method": "full",
        "precision": "mixed",
        "gradient_checkpointing": True,
        "checkpoint_reentrant": True,
        "activation_offload": "checkpoints",
    },
    {"method": "lora", "fsdp": 2, "gradient_checkpointing": True, "activation_offload": "checkpoints"},
    {"method": "qlora", "quant": "nf4", "gradient_checkpointing": True, "activation_offload": "all"},
    {"method": "lora", "activation_offload": "all"},
    {"method": "full", "activation_offload": "all"},
    {"method": "qlora", "quant": "hqq4", "activation_offload": "all"},
    {"method": "qlora", "quant": "nf4", "gradient_checkpointing": True, "activation_offload": "unsloth"},
    {"method": "full", "precision": "mixed", "gradient_checkpointing": True, "activation_offload": "unsloth"},
    # Unsloth's fused layers, their input norm saving the reloaded input itself (memory/unsloth.py)
    {"method": "qlora", "stack": "unsloth", "activation_offload": "unsloth"},
]


def without_offload(fields: dict) -> dict:
    """The same step with its activations on the GPU (Unsloth's checkpoint is reentrant)."""
    out = {k: v for k, v in fields.items() if k != "activation_offload"}
    if fields["activation_offload"] == "unsloth":
        out["checkpoint_reentrant"] = True
    return out


# one preset per architecture in the fast tier, the others (seconds each) in the marked tier
FAST_OFFLOAD = {"gemma-2-2b", "gemma-3-1b", "llama-3.2-1b", "mixtral-8x7b", "phi-3-mini", "qwen3-0.6b", "qwen3-30b-a3b"}


@pytest.mark.parametrize(
    "preset", [p if p in FAST_OFFLOAD else pytest.param(p, marks=pytest.mark.cputrace) for p in preset_names()]
)
def test_offload_events_live_bytes_equal_the_phases(preset):
    """Activation offload's events (memory/events.py: the inputs and saves the forward drops
    once they are copied to the host, the reload in backward, Unsloth's buffers) meet every
    phase exactly, and none of their tensor-level blocks has to be freed early to meet one:
    they trim no more than the same step without offload (its recompute's)."""
    spec = load_model_spec(preset)
    for fields in OFFLOAD_SETUPS:
        setup = make_setup(batch_size=4, seq_len=512, **fields)
        assert_live_equals_phases(spec, setup, (preset, fields))
        plain = make_setup(batch_size=4, seq_len=512, **without_offload(fields))
        assert step_events(spec, setup).trimmed <= step_events(spec, plain).trimmed, (preset, fields)


def test_ledger_balances_and_trims_by_hand():
    led = Ledger()
    a = led.alloc(C.ACTIVATIONS, 1000)
    led.alloc(C.ACTIVATIONS, 600)
    # activations 1600 live, 1100 wanted: the latest block (600) goes, 100 comes back as balance;
    # transient 700 wanted, split 512 first: 512 + 188
    balance = led.settle({C.ACTIVATIONS: 1100, C.TRANSIENT: 700}, {C.TRANSIENT: [512]})
    assert led.trimmed == 600
    assert [led.live[t] for t in balance] == [(C.ACTIVATIONS, 100), (C.TRANSIENT, 512), (C.TRANSIENT, 188)]
    assert led.live[a] == (C.ACTIVATIONS, 1000)
    assert led.alloc(C.WEIGHTS, 0) is None


def test_gradients_come_in_reversed_layer_order_and_adamw_temporaries_per_parameter():
    spec = load_model_spec("llama-3.2-1b", num_layers=2)
    setup = make_setup(method="full", batch_size=1, seq_len=256)
    ev = step_events(spec, setup)
    grads = np.flatnonzero((ev.categories == CATEGORIES.index(C.GRADIENTS)) & (ev.events.ops == Op.ALLOC))
    steady = grads[grads >= ev.step_start]
    h, f = spec.hidden, spec.layers[0].linears_with("down")[0].in_features
    # layer 1's down_proj weight grad (bf16, h x f) is the first decoder-layer grad of the step
    sizes = ev.events.sizes[steady].tolist()
    assert 2 * h * f in sizes
    idx = {m.phase.name: m.index for m in ev.moments}
    assert idx["layer 1 backward (end)"] < idx["layer 0 backward (mlp)"]
    opt = idx["optimizer step"]
    before = ev.events.ops[:opt] == Op.ALLOC
    transient = (ev.categories[:opt] == CATEGORIES.index(C.TRANSIENT)) & before
    tail = np.flatnonzero(transient)
    from vramplan.memory import parameters

    trainable = [p for p in parameters(spec, setup) if p.trainable]
    # foreach AdamW: one temporary per trainable parameter, each the size of its bf16 grad
    assert sorted(ev.events.sizes[tail[-len(trainable) :]].tolist()) == sorted(
        -(-2 * p.numel // 512) * 512 for p in trainable
    )


def test_layer_backward_moments_in_time_order():
    spec = load_model_spec("llama-3.2-1b", num_layers=2)
    ev = step_events(spec, make_setup(method="lora", batch_size=1, seq_len=256))
    points = [m.phase.point for m in ev.moments if m.phase.kind is PhaseKind.LAYER_BACKWARD and m.phase.layer == 1]
    assert points.index(LayerPoint.MLP) < points.index(LayerPoint.END)
    kinds = [m.phase.kind for m in ev.moments]
    assert (
        kinds.index(PhaseKind.FORWARD_LOSS)
        < kinds.index(PhaseKind.LOSS_BACKWARD)
        < kinds.index(PhaseKind.OPTIMIZER_STEP)
    )


def test_verdict_under_pressure_frees_the_cache_and_runs():
    spec = load_model_spec("llama-3.2-1b", num_layers=4)
    setup = make_setup(method="full", batch_size=1, seq_len=1024)
    roomy = simulate(spec, setup, 1 << 40, AllocatorConfig())
    assert roomy.fits and roomy.peak_reserved >= roomy.peak_allocated
    # a little under what a roomy GPU would reserve: the cache is emptied and the step runs
    tight = simulate(spec, setup, roomy.peak_reserved - 40 * MiB, AllocatorConfig())
    assert tight.fits and tight.capped is not None and tight.capped.num_alloc_retries > 0
    assert 0 <= tight.headroom < 40 * MiB + roomy.peak_reserved - roomy.peak_allocated
    # just above what is allocated, the stranded blocks of partly used segments do not fit
    assert not simulate(spec, setup, roomy.peak_allocated + 40 * MiB, AllocatorConfig()).fits
    short = simulate(spec, setup, roomy.peak_allocated // 2, AllocatorConfig())
    assert not short.fits and short.headroom < 0


def test_estimate_reserved_comes_from_the_replay_and_honours_alloc_conf():
    spec = load_model_spec("llama-3.2-1b", num_layers=4)
    setup = make_setup(method="full", batch_size=2, seq_len=1024)
    gpus = parse_gpus("1x80GB")
    est = estimate_spec(spec, setup, gpus)
    ev = step_events(spec, setup)
    assert est.per_gpu.peak_reserved_bytes == max(replay(ev.events).peak_reserved, est.per_gpu.peak_allocated_bytes)
    exp = estimate_spec(spec, setup, gpus, alloc_conf="expandable_segments:True")
    want = replay(ev.events, parse_alloc_conf("expandable_segments:True")).peak_reserved
    assert exp.per_gpu.peak_reserved_bytes == max(want, exp.per_gpu.peak_allocated_bytes)
    assert exp.per_gpu.peak_reserved_bytes <= est.per_gpu.peak_reserved_bytes


def test_plot_timeline_draws(tmp_path):
    from vramplan.cli import main
    from vramplan.plot import timeline_data, timeline_figure

    spec = load_model_spec("llama-3.2-1b", num_layers=2)
    setup = make_setup(method="lora", batch_size=1, seq_len=256)
    t = timeline_data(spec, setup, parse_gpus("1x24GB"))
    ev = step_events(spec, setup)
    # allocated at each moment is the phase's, reserved never below it
    for m in ev.moments[1:]:
        i = m.index - ev.step_start - 1
        assert sum(int(v[i]) for v in t.live.values()) == m.phase.allocated
        assert t.reserved[i] >= m.phase.allocated
    fig = timeline_figure(t)
    assert len(fig.axes[0].collections) == len(t.live)  # one stacked band per category
    out = tmp_path / "t.png"
    assert (
        main(
            [
                "plot",
                "timeline",
                "llama-3.2-1b",
                "--num-layers",
                "2",
                "--gpus",
                "1x24GB",
                "--method",
                "lora",
                "--seq-len",
                "256",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_blocks_by_hand():
    from vramplan.memory.events import layer_blocks

    # 1000 tokens; per token: norm 4, attention 10, the MLP's gate 3 and up 3, down 2 -> 4000, 10000,
    # 3000, 3000 bytes rounded to 512 B: 4096, 10240, 3072, 3072; the last before down's takes what
    # is left of 20480 - 2048 (down) - 4096 - 10240 - 3072 = 1024 (the rounding given back); down last
    assert layer_blocks(1000, 20480, 2048, [4, 10, 3, 3, 2]) == [4096, 10240, 3072, 1024, 2048]
    # rounding leaves nothing for the MLP: two blocks (the rest, down)
    assert layer_blocks(1, 1024, 512, [1, 1, 1]) == [512, 512]


def test_expandable_segments_suggested_only_when_they_change_the_verdict():
    from vramplan.reserved import expandable_note

    spec = load_model_spec("llama-3.2-1b", num_layers=4)
    setup = make_setup(method="full", batch_size=1, seq_len=1024)
    roomy = simulate(spec, setup, 1 << 40, AllocatorConfig())
    assert expandable_note(spec, setup, 1 << 40, AllocatorConfig(), roomy) == []  # it fits: nothing to say
    # a full fine-tune 2 x 2304 on a 24 GB card: 22.1 GiB allocated of 23.2 GiB the allocator can get;
    # the default segments strand too much, expandable ones fit
    spec, gpus = load_model_spec("llama-3.2-1b"), parse_gpus("1x24GB")
    setup = make_setup(method="full", batch_size=2, seq_len=2304)
    est = estimate_spec(spec, setup, gpus, alloc_conf="")
    if not est.fits:
        assert any("expandable_segments:True" in n for n in est.notes)
        assert estimate_spec(spec, setup, gpus, alloc_conf="expandable_segments:True").fits
    else:
        assert not any("expandable_segments:True" in n for n in est.notes)


def live_blocks(ev, index: int, cat: C) -> list[int]:
    """Sizes of the blocks of `cat` alive after events[:index]."""
    return list(live_by_id(ev, index, cat).values())


def live_by_id(ev, index: int, cat: C) -> dict[int, int]:
    """The blocks of `cat` alive after events[:index]: id -> size."""
    live: dict[int, int] = {}
    for op, tid, size, c in zip(
        ev.events.ops[:index].tolist(),
        ev.events.ids[:index].tolist(),
        ev.events.sizes[:index].tolist(),
        ev.categories[:index].tolist(),
        strict=True,
    ):
        if op == Op.ALLOC and c == CATEGORIES.index(cat):
            live[tid] = size
        elif op == Op.FREE:
            live.pop(tid, None)
    return live


@pytest.mark.parametrize("mode, inputs, buffers", [("checkpoints", 2, 0), ("all", 6, 0), ("unsloth", 2, 2)])
def test_offloaded_inputs_by_hand(mode, inputs, buffers):
    """8 layers, 2 x 1024 tokens, hidden 2048: a layer's bf16 input is 8 MiB. At the last
    layer's checkpointed forward the GPU holds of the inputs the embedding output and the
    current layer's (save_on_cpu: locals of the model's forward), under TRL's OffloadActivations
    also the 4 before it (its stash of the last 5 packs); Unsloth the embedding output, the last
    layer's (never offloaded) and two reload buffers of that size; the rest is on the host. In
    backward a non-reentrant recompute has its input back (8 MiB, transient) until it is done."""
    spec = load_model_spec("llama-3.2-1b", num_layers=8)
    setup = make_setup(method="lora", batch_size=2, seq_len=1024, gradient_checkpointing=True, activation_offload=mode)
    ev = step_events(spec, setup)
    one = 2 * 2048 * 2048
    at = {m.phase.name: m.index for m in ev.moments}
    acts = live_blocks(ev, at["forward (checkpointed layer)"], C.ACTIVATIONS)
    assert acts.count(one) == inputs + buffers
    assert live_blocks(ev, at["optimizer step"], C.ACTIVATIONS).count(one) == buffers
    if mode != "unsloth":  # Unsloth is reentrant and reloads a bf16 input into its buffers
        # the reload is a tensor of its own: alive through both recompute moments (a balance block
        # lives for one moment only) and gone by the layer's end (grads in flight there may have
        # its size, but are other tensors)
        rc = live_by_id(ev, at["layer 3 backward (lora recompute)"], C.TRANSIENT)
        rc_down = live_by_id(ev, at["layer 3 backward (lora recompute (down))"], C.TRANSIENT)
        end = live_by_id(ev, at["layer 3 backward (end)"], C.TRANSIENT)
        assert [tid for tid, size in rc.items() if size == one and tid in rc_down]
        assert not [tid for tid, size in end.items() if size == one and tid in rc]


@pytest.mark.parametrize("fields", OFFLOAD_SETUPS[:2] + OFFLOAD_SETUPS[3:6] + OFFLOAD_SETUPS[7:])
def test_offload_replay_gives_reserved_and_verdict(fields):
    """The estimate's reserved memory under activation offload is the replay's (no flat
    margin), and the replay never holds much more than the largest phase: before the offload
    events, a step offloading every saved tensor replayed its whole forward's saves (Llama 3.1
    8B LoRA at 4k tokens: 55.9 GiB allocated for a 26.3 GiB peak)."""
    spec = load_model_spec("llama-3.2-1b", num_layers=8)
    setup = make_setup(batch_size=2, seq_len=2048, **fields)
    ev = step_events(spec, setup)
    r = replay(ev.events)
    peak = step_model(spec, setup).peak.allocated
    assert peak <= r.peak_allocated <= 1.02 * peak, fields
    est = estimate_spec(spec, setup, parse_gpus("1x80GB"))
    assert est.per_gpu.peak_reserved_bytes == max(r.peak_reserved, est.per_gpu.peak_allocated_bytes)
    assert not any("flat margin" in n for n in est.notes)


def test_nf4_build_quantizes_each_linear_tensor_by_tensor():
    """bitsandbytes 0.50.2's order for one Linear on one device (memory/quantization.py,
    nf4_quantize_temporaries): the bf16 source, the fp32 absmax (n/64 x 4 bytes), the packed
    weight (n/2), the absmax's offset copy, the nested state; the three temporaries freed
    before the next Linear starts. Checked on Llama-3.2-1B's first Linear (q_proj, 2048 x 2048)."""
    spec = load_model_spec("llama-3.2-1b", num_layers=1)
    ev = step_events(spec, make_setup(method="qlora", quant="nf4"))
    ops, sizes, cats = ev.events.ops, ev.events.sizes, ev.categories
    n = 2048 * 2048
    first = [(int(ops[i]), int(sizes[i]), CATEGORIES[cats[i]]) for i in range(8)]
    assert first[:5] == [
        (Op.ALLOC, 2 * n, C.TRANSIENT),
        (Op.ALLOC, 4 * n // 64, C.TRANSIENT),
        (Op.ALLOC, n // 2, C.WEIGHTS),
        (Op.ALLOC, 4 * n // 64, C.TRANSIENT),
        (Op.ALLOC, first[4][1], C.QUANT_STATE),
    ]
    assert [(op, cat) for op, _, cat in first[5:]] == [(Op.FREE, C.TRANSIENT)] * 3
    assert ev.events.ids[5:8].tolist() == ev.events.ids[[3, 1, 0]].tolist()  # the copy, the absmax, the source


# every stack knob at least once (each with the techniques it changes), so that a new layer
# point or phase kind cannot reach the replay unordered: DoRA under checkpointing did
KNOB_SETUPS = [
    {"method": "lora", "dora": True, "gradient_checkpointing": True},
    {"method": "lora", "dora": True},
    {"method": "qlora", "dora": True, "gradient_checkpointing": True},
    {"method": "lora", "kbit_prep": True, "precision": "mixed"},
    {"method": "qlora", "kbit_prep": True, "precision": "mixed", "gradient_checkpointing": True},
    {"method": "lora", "precision": "fp16"},
    {"method": "lora", "loss": "chunked", "compile": True},
    {"method": "full", "loss": "chunked", "gradient_checkpointing": True},
    {"method": "full", "loss": "torchtune-linear-ce"},
    {"method": "lora", "loss": "torchtune-linear-ce", "compile": True, "gradient_checkpointing": True},
    {"method": "lora", "loss": "trl-chunked-nll"},
    {"method": "lora", "loss": "liger", "gradient_checkpointing": True},
    {"method": "lora", "loss": "cce"},
    {"method": "full", "loss": "liger", "precision": "mixed", "model_dtype": "bf16"},  # a negative cache once
    {"method": "lora", "keep_logits": True, "fp32_outputs": True, "precision": "mixed", "model_dtype": "bf16"},
    {"method": "lora", "adapter_dtype": "bf16", "attention": "eager", "packing": "position-ids"},
    {"method": "full", "optimizer_in_backward": True, "optim": "adamw_torch"},
    {"method": "full", "optim": "adafactor", "gradient_accumulation": 4},
    {"method": "full", "optim": "paged_adamw_8bit"},
    {"method": "lora", "checkpoint_reentrant": True, "gradient_checkpointing": True},
    {"method": "full", "data_parallel": 2},
    {"method": "lora", "fsdp": 2, "fsdp_version": 1, "gradient_checkpointing": True},
    {"method": "qlora", "fsdp": 2, "stack": "hf-trainer", "gradient_checkpointing": True},
    {"method": "full", "deepspeed": "zero2", "offload_optimizer": True},
    {"method": "full", "deepspeed": "zero3", "data_parallel": 2},
    # torchtune's custom_sharded_layers: embedding and lm_head units of their own (memory/fsdp.py)
    {"method": "full", "fsdp": 2, "fsdp_embedding_units": True, "gradient_checkpointing": True},
    {"method": "full", "fsdp": 4, "fsdp_embedding_units": True, "cpu_offload": True},
    # Unsloth's fused LoRA layers (memory/unsloth.py), checkpointed and not
    {"method": "qlora", "stack": "unsloth"},
    {"method": "lora", "stack": "unsloth", "gradient_checkpointing": False, "activation_offload": "none"},
    # axolotl's fused LoRA kernels (memory/lora_kernels.py), with dropout and without, QLoRA checkpointed
    {"method": "lora", "stack": "axolotl", "lora_dropout": 0.05},
    {"method": "qlora", "stack": "axolotl", "gradient_checkpointing": True},
    {"method": "lora", "lora_kernels": True, "lora_dropout": 0.1, "attention": "eager"},
    # Liger's RMSNorm and SwiGLU/GeGLU kernels (memory/liger.py): full and LoRA, saving and checkpointed,
    # with its fused loss, one kernel at a time, offloaded, under axolotl's kernels, over an fp32 stream
    {"method": "full", "liger_layers": "all"},
    {"method": "lora", "liger_layers": "all", "loss": "liger"},
    {"method": "qlora", "liger_layers": "all", "gradient_checkpointing": True},
    {"method": "full", "liger_layers": "rms_norm", "gradient_checkpointing": True, "precision": "mixed"},
    {"method": "lora", "liger_layers": "glu", "lora_dropout": 0.1},
    {"method": "lora", "liger_layers": "all", "activation_offload": "all"},
    {"method": "qlora", "liger_layers": "all", "stack": "axolotl"},
    {"method": "lora", "liger_layers": "all", "dora": True},
    # --train-layers: a frozen prefix (memory/freeze.py), plain and with fp32 trained layers over bf16
    {"method": "full", "train_layers": 2},
    {"method": "full", "train_layers": 1, "gradient_checkpointing": True, "gradient_accumulation": 2},
    {"method": "full", "train_layers": 2, "precision": "mixed", "model_dtype": "bf16", "train_layers_dtype": "fp32"},
    {"method": "full", "train_layers": 5, "precision": "mixed", "gradient_checkpointing": True},
    # Adam-mini (one momentum and per-row values) and APOLLO at LLaMA-Factory's rank
    {"method": "full", "optim": "adam_mini", "precision": "mixed"},
    {"method": "full", "optim": "apollo_adamw", "apollo_rank": 16, "gradient_checkpointing": True},
    # DPO (memory/preference.py): the reference forward's moment and the reference copy, on TRL's
    # defaults, with the copy sharded by FSDP, whole under ZeRO-2, and precomputed
    {"method": "lora", "stack": "trl", "objective": "dpo"},
    {"method": "full", "stack": "trl", "objective": "dpo", "gradient_checkpointing": False},
    {"method": "qlora", "stack": "trl", "objective": "dpo", "gradient_checkpointing": True},
    {"method": "full", "stack": "trl", "objective": "dpo", "fsdp": 2},
    {"method": "full", "stack": "trl", "objective": "dpo", "deepspeed": "zero2", "data_parallel": 2},
    {"method": "full", "stack": "trl", "objective": "dpo", "precompute_ref_log_probs": True},
    # GRPO (memory/grpo.py): generation and scoring before the forward; a reference copy (beta > 0),
    # old log-probs (misaligned generation: gradients held), vLLM elsewhere
    {"method": "lora", "stack": "trl", "objective": "grpo", "completion_len": 128},
    {"method": "full", "stack": "trl", "objective": "grpo", "completion_len": 64, "beta": 0.04},
    {"method": "qlora", "stack": "trl", "objective": "grpo", "completion_len": 200, "gradient_checkpointing": True},
    {
        "method": "lora",
        "stack": "trl",
        "objective": "grpo",
        "completion_len": 128,
        "gradient_accumulation": 4,
        "steps_per_generation": 2,
        "beta": 0.1,
    },
    {"method": "lora", "stack": "trl", "objective": "grpo", "completion_len": 128, "generation": "vllm-server"},
    # reward models (memory/reward.py): the score head's tensors, no lm_head; FSDP shards them too
    {"method": "lora", "stack": "trl", "objective": "reward"},
    {"method": "full", "stack": "trl", "objective": "reward", "gradient_checkpointing": False},
    {"method": "qlora", "stack": "axolotl", "objective": "reward", "gradient_checkpointing": True},
    {"method": "full", "stack": "axolotl", "objective": "reward", "fsdp": 2},
    # axolotl's GRPO (trl 1.9.0: the logits, memory/grpo_logits.py), KTO on three stacks (memory/kto.py),
    # axolotl's ORPO and SimPO (memory/orpo.py)
    {"method": "lora", "stack": "axolotl", "objective": "grpo", "completion_len": 128, "beta": 0.04},
    {"method": "full", "stack": "axolotl", "objective": "grpo", "completion_len": 64, "gradient_checkpointing": True},
    {"method": "lora", "stack": "trl", "objective": "kto"},
    {"method": "full", "stack": "trl", "objective": "kto", "kto_kl": False},
    {"method": "lora", "stack": "axolotl", "objective": "kto", "gradient_checkpointing": True},
    {"method": "full", "stack": "axolotl", "objective": "kto"},
    {"method": "lora", "stack": "llamafactory", "objective": "kto"},
    {"method": "qlora", "stack": "axolotl", "objective": "orpo", "gradient_checkpointing": True},
    {"method": "full", "stack": "axolotl", "objective": "orpo", "chosen_nll": False},
]


LIGER_MOE_SETUPS = [
    {"method": "full", "liger_layers": "all"},
    {"method": "lora", "liger_layers": "all", "loss": "liger"},
    {"method": "qlora", "liger_layers": "glu", "gradient_checkpointing": True},
    {"method": "lora", "liger_layers": "all", "fsdp": 2, "fsdp_version": 2, "gradient_checkpointing": True},
    {"method": "full", "liger_layers": "all", "activation_offload": "all"},
]


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_liger_experts_replay_with_live_bytes_equal_to_the_phases(preset):
    """LigerExperts' weight-sized grads at the MLP moment (memory/liger.py) are events too."""
    spec = load_model_spec(preset, num_layers=3)
    for fields in LIGER_MOE_SETUPS:
        assert_live_equals_phases(spec, make_setup(batch_size=2, seq_len=256, **fields), (preset, fields))


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "qwen2.5-0.5b", "gemma-2-2b", "phi-3-mini"])
def test_every_knob_replays_with_live_bytes_equal_to_the_phases(preset):
    spec = load_model_spec(preset, num_layers=3)
    for fields in KNOB_SETUPS:
        assert_live_equals_phases(spec, make_setup(batch_size=2, seq_len=256, **fields), (preset, fields))
