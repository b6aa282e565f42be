"""The engines (issue 15): DDP, DeepSpeed ZeRO, FSDP1 and its sharding strategies, nodes.
Expectations are derived by hand from the sources' rules (docs/memory-model.md, "Engines"),
from the model's shapes, not from the code under test."""

from __future__ import annotations

import pytest

from vramplan.categories import Category as C
from vramplan.errors import VramplanError
from vramplan.estimate import PROCESS_HOST_BYTES, estimate_spec, make_setup, resolve_gpus
from vramplan.memory import step_model
from vramplan.memory.ddp import BUCKET_CAP_BYTES, FIRST_BUCKET_BYTES, bucket_sizes
from vramplan.memory.parameters import parameters
from vramplan.model_loader import load_model_spec
from vramplan.setup import Engine

LAYERS = 2


@pytest.fixture(scope="module")
def spec():
    return load_model_spec("llama-3.2-1b", num_layers=LAYERS)


def _counts(spec):
    """(all elements, the LoRA r=16 adapters' elements on every Linear) from the shapes."""
    linears = [l for layer in spec.layers for l in layer.linears]
    lora = sum(16 * (l.in_features + l.out_features) for l in linears)
    norms = sum(sum(layer.norm_numels) for layer in spec.layers)
    total = sum(l.numel for l in linears) + norms + spec.embed_numel + spec.lm_head_numel + spec.final_norm_numel
    return total, lora


def _est(spec, gpus, **fields):
    return estimate_spec(spec, make_setup(**fields), resolve_gpus(gpus, reserve=0))


# ---- DDP -----------------------------------------------------------------------------


def test_ddp_buckets_are_a_second_copy_of_the_trainable_grads(spec):
    # reducer.cpp: one flat bucket per bucket, trainable params only, persistent from wrap;
    # peft's adapters are fp32: 4 B per element. Every phase grows by the buckets.
    _, lora = _counts(spec)
    one = _est(spec, "1x80GB", method="lora")
    two = _est(spec, "2x80GB", method="lora")
    assert two.setup.engine == Engine.DDP
    diff = two.per_gpu.peak_allocated_bytes - one.per_gpu.peak_allocated_bytes
    buckets = len(bucket_sizes(parameters(spec, two.setup), two.setup))
    assert 4 * lora <= diff <= 4 * lora + 512 * buckets
    assert any("DDP" in n for n in two.notes)


def test_ddp_first_bucket_is_one_mib_then_25(spec):
    setup = make_setup(method="full", data_parallel=2)
    sizes = bucket_sizes(parameters(spec, setup), setup)
    assert sizes[0] >= FIRST_BUCKET_BYTES and all(s >= BUCKET_CAP_BYTES for s in sizes[1:-1])
    total, _ = _counts(spec)
    assert sum(sizes) == 2 * total  # bf16 grads of every trainable element, no padding


def test_ddp_host_ram_counts_a_process_per_gpu(spec):
    est = _est(spec, "4x80GB", method="lora")
    assert est.host_ram_bytes == 4 * PROCESS_HOST_BYTES


def test_one_gpu_is_not_ddp(spec):
    est = _est(spec, "1x80GB", method="lora")
    assert est.setup.engine == Engine.SINGLE and not any("DDP" in n for n in est.notes)


# ---- DeepSpeed -----------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_zero12_keep_bf16_weights_whole_and_partition_master_and_states(spec, stage):
    # stage_1_and_2.py: every param bf16 whole (P*2); fp32 master + Adam states (4 + 8 B) per
    # element of this rank's slice of the 2W-padded flat group
    total, _ = _counts(spec)
    est = _est(spec, "2x80GB", method="full", deepspeed=stage)
    b = est.per_gpu.breakdown
    assert b[C.WEIGHTS] == pytest.approx(2 * total, abs=512 * 40)
    assert b[C.OPTIMIZER_STATES] == pytest.approx(12 * total / 2, rel=1e-4)


def test_zero3_partitions_weights(spec):
    total, _ = _counts(spec)
    est = _est(spec, "4x80GB", method="full", deepspeed="zero3")
    m = step_model(spec, est.setup)
    w = m.phases[0].parts[C.WEIGHTS]
    # ceil(n/4) per tensor, the norms (<= 10*h elements) whole
    norms = sum(sum(layer.norm_numels) for layer in spec.layers) + spec.final_norm_numel
    assert w == pytest.approx(2 * (total - norms) / 4 + 2 * norms, rel=1e-3)


def test_zero_offload_on_one_gpu_fits_and_needs_host_ram():
    # the bar: ZeRO-Offload on one 24 GB card; host per rank: fp32 master 4 + bf16
    # staging 2 + fp32 grads 4 + CPU Adam states 8 = 18 B per trainable element
    spec = load_model_spec("llama-3.2-3b")
    total, _ = _counts(spec)
    est = _est(spec, "1x24GB", method="full", deepspeed="zero2", offload_optimizer=True, gradient_checkpointing=True)
    assert est.fits_gpu
    assert est.host_ram_bytes >= 18 * (total - spec.lm_head_numel) + PROCESS_HOST_BYTES
    assert est.per_gpu.breakdown.get(C.OPTIMIZER_STATES, 0) == 0


def test_deepspeed_note_says_modelled_from_source(spec):
    est = _est(spec, "2x80GB", method="lora", deepspeed="zero2")
    assert any("modelled from source, not measured" in n for n in est.notes)


# ---- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,flags",
    [
        (dict(deepspeed="zero2", fsdp=2), ("--deepspeed", "--fsdp")),
        (dict(deepspeed="zero2", offload_params=True), ("--offload-params", "zero3")),
        (dict(offload_optimizer=True), ("--offload-optimizer", "--deepspeed")),
        (dict(fsdp=2, fsdp_sharding="hybrid"), ("--fsdp-sharding", "--nodes")),
    ],
)
def test_bad_engine_combinations_name_both_flags(fields, flags):
    with pytest.raises(VramplanError) as e:
        make_setup(method="full", **fields)
    assert all(f in str(e.value) for f in flags)


def test_nodes_must_divide_the_gpus(spec):
    with pytest.raises(VramplanError, match="--nodes"):
        _est(spec, "3x80GB", method="lora", nodes=2)


def test_one_gpu_fsdp_offload_is_allowed(spec):
    est = _est(spec, "1x80GB", method="lora", cpu_offload=True)
    assert est.setup.engine == Engine.FSDP2 and est.host_ram_bytes > PROCESS_HOST_BYTES


# ---- FSDP1 and the sharding strategies ---------------------------------------------------


def _fsdp_at(spec, kind_label, **fields):
    m = step_model(spec, make_setup(**fields), every_layer=True)
    ph = next(p for p in m.phases if p.name == kind_label)
    return ph.parts.get(C.FSDP_BUFFERS, 0)


def _layer_numel(spec, i):
    layer = spec.layers[i]
    return sum(l.numel for l in layer.linears) + sum(layer.norm_numels)


def test_fsdp1_backward_holds_view_grads_and_their_concatenation(spec):
    # _flat_param.py: the unit's flat grad is the concatenation of its views' grads (both
    # alive: 2 x 2 B per trainable element); the reduce-scatter output is the bf16 shard;
    # layer 0 prefetches nothing; the root (embed, norm, lm_head) stays unsharded
    w = 2
    n = _layer_numel(spec, 0)
    root = spec.embed_numel + spec.lm_head_numel + spec.final_norm_numel
    pad = lambda b: -(-b // (2 * w)) * 2 * w  # noqa: E731 -- one flat param, padded to 2W bytes
    expected = pad(2 * n) + pad(2 * root) + 4 * n + 2 * -(-n // w)
    got = _fsdp_at(spec, "layer 0 backward (end)", method="full", fsdp=w, fsdp_version=1)
    assert got == pytest.approx(expected, abs=512 * 40)


def test_shard_grad_op_keeps_every_unit_unsharded_to_backward(spec):
    # SHARD_GRAD_OP: no reshard after forward: at the loss every unit is unsharded (the
    # whole model in bf16)
    total, _ = _counts(spec)
    got = _fsdp_at(spec, "forward (loss)", method="full", fsdp=2, fsdp_version=1, fsdp_sharding="shard-grad-op")
    assert got == pytest.approx(2 * total, abs=512 * 10)
    full = _fsdp_at(spec, "forward (loss)", method="full", fsdp=2, fsdp_version=1)
    assert full < got - 2 * _layer_numel(spec, 0) // 2


def test_accelerate_fsdp1_has_no_backward_prefetch(spec):
    # accelerate/HF pass backward_prefetch=None (NO_PREFETCH); torch's default (plain) is
    # BACKWARD_PRE: layer 1's backward also holds layer 0's unit
    args = dict(method="full", fsdp=2, fsdp_version=1)
    pre = _fsdp_at(spec, "layer 1 backward (mlp)", **args)
    none = _fsdp_at(spec, "layer 1 backward (mlp)", stack="hf-trainer", **args)
    assert pre - none == pytest.approx(2 * _layer_numel(spec, 0), abs=512 * 4)


def test_hybrid_shards_inside_a_node(spec):
    # HYBRID_SHARD: W = GPUs per node for every size rule: 4 GPUs on 2 nodes = FSDP over 2
    hybrid = step_model(spec, make_setup(method="full", fsdp=4, nodes=2, fsdp_sharding="hybrid"))
    two = step_model(spec, make_setup(method="full", fsdp=2))
    assert hybrid.peak.allocated == two.peak.allocated


def test_host_ram_is_per_node(spec):
    one = _est(spec, "4x80GB", method="full", deepspeed="zero2", offload_optimizer=True)
    two = _est(spec, "4x80GB", method="full", deepspeed="zero2", offload_optimizer=True, nodes=2)
    assert one.host_ram_bytes == 2 * two.host_ram_bytes


# ---- plan ------------------------------------------------------------------------------


def test_plan_searches_ddp_fsdp_and_zero(spec):
    from vramplan.plan import candidate_groups, make_request

    req = make_request(spec, "2x24GB", methods="full,lora")
    setups = [make_setup(**c) for g in candidate_groups(spec, req) for c in g]
    engines = {s.engine for s in setups}
    assert {Engine.DDP, Engine.FSDP2, Engine.DEEPSPEED} <= engines
    assert all(s.data_parallel == 2 for s in setups if s.engine in (Engine.DDP, Engine.DEEPSPEED))
    one = make_request(spec, "1x24GB", methods="full")
    zero = [c for g in candidate_groups(spec, one) for c in g if c.get("deepspeed")]
    assert zero and all(c["offload_optimizer"] for c in zero)  # one GPU: ZeRO-Offload only


def test_zero3_with_4bit_weights_is_refused():
    with pytest.raises(VramplanError, match="--deepspeed"):
        make_setup(method="qlora", deepspeed="zero3")


def test_accelerate_fsdp2_reshards_the_untied_embedding():
    # accelerate 1.16 fsdp2_prepare_model: the untied embedding is its own unit, resharded
    # after forward; [norm, lm_head] the tail kept unsharded: one V*h bf16 less at the loss
    spec = load_model_spec("llama-3.1-8b", num_layers=LAYERS)
    assert spec.lm_head_numel  # untied
    args = dict(method="lora", fsdp=2, gradient_checkpointing=True, lora_targets="all-linear")  # same adapters
    plain = _fsdp_at(spec, "forward (loss)", **args)
    hf = _fsdp_at(spec, "forward (loss)", stack="hf-trainer", **args)
    assert plain - hf == pytest.approx(2 * spec.embed_numel, abs=1024)


# ---- accelerate's FSDP preparation (memory/accelerate.py) ----------------------------


def _part(spec, cat, **fields):
    return _est(spec, "2x80GB", **fields).per_gpu.breakdown[cat]


def test_accelerate_fsdp2_holds_a_full_fine_tunes_weights_in_fp32(spec):
    # accelerate 1.16 fsdp_utils.py:798-806: bf16 mixed precision, no Params4bit: every
    # trainable parameter upcast to fp32 before fully_shard: the weight shards double, and
    # the plain stack (our FSDP2 wrap) keeps the loaded bf16
    args = dict(method="full", fsdp=2, precision="mixed", model_dtype="bf16", gradient_checkpointing=True)
    plain = _part(spec, C.WEIGHTS, **args)
    hf = _part(spec, C.WEIGHTS, stack="hf-trainer", **args)
    total, _ = _counts(spec)
    assert plain == pytest.approx(2 * total / 2, rel=0.02)
    assert hf == pytest.approx(4 * total / 2, rel=0.02)
    assert _part(spec, C.OPTIMIZER_STATES, stack="hf-trainer", **args) == pytest.approx(2 * 4 * total / 2, rel=0.02)


def test_accelerate_fsdp2_leaves_uint8_4bit_weights_whole_on_every_gpu(spec):
    # fsdp_utils.py:771-783, 832-845: a non-floating Params4bit is an ignored param (not
    # sharded); bnb_4bit_quant_storage=bf16 (axolotl, LLaMA-Factory) shards it
    args = dict(method="qlora", fsdp=2, stack="hf-trainer", gradient_checkpointing=True)
    whole = _part(spec, C.WEIGHTS, quant_storage="uint8", **args)
    sharded = _part(spec, C.WEIGHTS, quant_storage="bf16", **args)
    packed = sum(l.numel for layer in spec.layers for l in layer.linears) // 2  # 4 bits per weight
    assert whole - sharded == pytest.approx(packed / 2, rel=0.01)


def test_accelerate_fsdp1_upcasts_trainable_units_even_with_4bit(spec):
    # accelerator.py:1960-2010: FSDP1 upcasts each unit whose flat param requires grad
    # (the adapters' own units) whatever the base: bf16 adapters become fp32 there, and the
    # plain FSDP1 wrap keeps them bf16
    args = dict(method="qlora", fsdp=2, fsdp_version=1, adapter_dtype="bf16", precision="mixed")
    args["lora_targets"] = "all-linear"
    _, lora = _counts(spec)
    assert _part(spec, C.ADAPTERS, stack="hf-trainer", **args) == pytest.approx(4 * lora / 2, rel=0.05)
    assert _part(spec, C.ADAPTERS, stack="plain", **args) == pytest.approx(2 * lora / 2, rel=0.05)


# ---- FSDP1's streams, offload grads and wrap (fsdp-qlora) ------------------------------


def _lora_trainable(spec, r=64, targets=("k_proj", "q_proj", "v_proj", "up_proj", "down_proj", "gate_proj")):
    """The stack's adapters' elements per layer, from the shapes."""
    return [
        sum(r * (l.in_features + l.out_features) for l in layer.linears if l.name.split(".")[-1] in targets)
        for layer in spec.layers
    ]


def test_fsdp1_offload_holds_each_units_grad_shard_until_backward_ends(spec):
    # torch==2.13 _runtime_utils.py:926 (_saved_grad_shard) and :1199 (_finalize_params):
    # at layer 0's end every layer's bf16 adapter grad shard is on the GPU; FSDP2 keeps none
    fields = dict(method="lora", lora_r=64, fsdp=2, cpu_offload=True, adapter_dtype="bf16")
    v1 = step_model(spec, make_setup(stack="fsdp-qlora", **fields), every_layer=True)
    v2 = step_model(spec, make_setup(fsdp_version=2, **fields), every_layer=True)
    end0 = [p for p in v1.phases if p.layer == 0 and p.point and p.point.value == "end"][0]
    per_layer = _lora_trainable(spec)
    assert end0.parts[C.GRADIENTS] == pytest.approx(sum(per_layer), rel=0.01)  # 2 bytes x half on this rank
    assert all(p.parts.get(C.GRADIENTS, 0) == 0 for p in v2.phases)


def test_fsdp1_events_put_gathered_units_and_grad_shards_on_their_streams(spec):
    from vramplan.memory.events import CATEGORIES, step_events
    from vramplan.memory.fsdp import POST_BACKWARD_STREAM, UNSHARD_STREAM

    fields = dict(method="lora", lora_r=16, fsdp=2, cpu_offload=False)
    ev = step_events(spec, make_setup(stack="fsdp-qlora", **fields))
    alloc = ev.events.ops == 0
    streams = {
        c: set(ev.events.streams[alloc & (ev.categories == CATEGORIES.index(c))].tolist())
        for c in (C.FSDP_BUFFERS, C.GRADIENTS, C.ACTIVATIONS)
    }
    assert UNSHARD_STREAM in streams[C.FSDP_BUFFERS]
    assert streams[C.GRADIENTS] == {POST_BACKWARD_STREAM}
    assert streams[C.ACTIVATIONS] == {0}
    ev2 = step_events(spec, make_setup(fsdp_version=2, fsdp=1, cpu_offload=True, method="lora", lora_r=16))
    assert set(ev2.events.streams.tolist()) == {0}  # FSDP2 on one GPU: no collective, one stream


def test_fsdp2_events_use_its_copy_in_and_reduce_scatter_streams(spec):
    """torch 2.13 FSDP2 (fsdp.py): the flat all-gather outputs are blocks of the copy-in
    stream, the per-parameter tensors of the compute stream, and each unit's sharded grads
    one reduce-scatter output of the reduce-scatter stream."""
    from vramplan.memory.events import CATEGORIES, step_events
    from vramplan.memory.fsdp import ALL_GATHER_COPY_IN_STREAM, REDUCE_SCATTER_STREAM

    setup = make_setup(method="full", precision="mixed", fsdp=4, gradient_checkpointing=True)
    ev = step_events(spec, setup)
    alloc = ev.events.ops == 0
    gathered = alloc & (ev.categories == CATEGORIES.index(C.FSDP_BUFFERS))
    assert set(ev.events.streams[gathered].tolist()) == {0, ALL_GATHER_COPY_IN_STREAM}
    on_rs = alloc & (ev.events.streams == REDUCE_SCATTER_STREAM) & (ev.categories == CATEGORIES.index(C.GRADIENTS))
    # per step (build, step 0, the steady step: two steps make grads): one block per decoder unit and the root
    assert on_rs.sum() == 2 * (len(spec.layers) + 1)


def test_accelerate_preparation_is_said_as_modelled_from_source(spec):
    hf = _est(spec, "2x80GB", method="full", fsdp=2, stack="hf-trainer")
    line = next(n for n in hf.notes if n.startswith("accelerate's FSDP preparation"))
    assert "fp32" in line and "modelled from source, not measured" in line and "accelerate==1.16.0" in line
    plain = _est(spec, "2x80GB", method="full", fsdp=2, precision="mixed", model_dtype="bf16")
    assert not any(n.startswith("accelerate's FSDP preparation") for n in plain.notes)


def test_embedding_units_say_they_rest_on_the_source():
    from vramplan.estimate import estimate_config

    def notes(**f):
        est = estimate_config("llama-3.2-1b", "2x80GB", method="full", fsdp=2, **f)
        return [n for n in est.notes if n.startswith("--fsdp-embedding-units")]

    assert (
        notes(fsdp_embedding_units=True) and "modelled from source, not measured" in notes(fsdp_embedding_units=True)[0]
    )
    assert not notes()  # the plain stack keeps them in the root unit


def test_fsdp2_over_uint8_4bit_weights_says_it_needs_torch_2_13():
    """torch 2.11's fully_shard raised on a uint8 packed weight on the H200 (tests/data/h200_lease/
    call1_failures.log); bf16 storage shards, and accelerate's stacks set uint8 weights aside."""
    from vramplan.estimate import estimate_config

    def said(**kw) -> bool:
        est = estimate_config("llama-3.1-8b", "4x24GB", method="qlora", fsdp=4, gradient_checkpointing=True, **kw)
        return any("needs torch>=2.13" in n for n in est.notes)

    assert said() and said(quant="hqq4")
    assert not said(quant_storage="bf16") and not said(stack="trl")
