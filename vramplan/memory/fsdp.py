"""FSDP2 (fully_shard) and FSDP1 (FullyShardedDataParallel): how a parameter shards, each
unit's all-gathered bytes, the unsharded grads and reduce-scatter input of a unit in
backward, and which units are gathered at each moment. Units are the decoder layers and
the root (layer None).

FSDP1 (torch==2.13.0 distributed/fsdp/_flat_param.py) differs where memory is concerned:
  - one FlatParameter per unit, padded once to a multiple of W (:759-776, _get_shard
    :1122-1159), not per tensor: a parameter's share of the shard is ceil(numel / W);
  - in a unit's backward autograd makes every view's grad and then their concatenation into
    the flat grad (2x the unit's trainable grads; CPU-checked, /work/research/engines.md
    F1-4); the reduce-scatter output is the shard, cast to the parameter dtype (:1030);
  - backward prefetch: BACKWARD_PRE is torch's default (fully_sharded_data_parallel.py
    :401-412) and Answer.AI's fsdp_qlora keeps it; accelerate and HF Trainer pass
    NO_PREFETCH (accelerate==1.16.0 utils/dataclasses.py:1480, :1767-1770).
Both versions: SHARD_GRAD_OP (FSDP2 reshard_after_forward=False) keeps every unit
unsharded from its forward to its post-backward (_runtime_utils.py:486-500); NO_SHARD
gathers nothing; HYBRID_SHARD shards inside a node (W = GPUs per node).
peft's fsdp_auto_wrap_policy (used by HF Trainer for peft models) and fsdp_qlora's
lambda policy give each LoRA Linear its own unit, so no unit mixes frozen and trainable
parameters (a mixed FSDP1 unit would get grads for its frozen elements too)."""

from __future__ import annotations

from vramplan.memory.accelerate import ACCELERATE_STACKS, ignores_4bit, reduces_in_bf16
from vramplan.memory.context import Gathering
from vramplan.memory.lora import adapter_bytes
from vramplan.memory.parameters import store
from vramplan.memory.quantization import packed_compute_bytes
from vramplan.memory.reward import is_reward, value_head
from vramplan.memory.storage import alloc
from vramplan.memory.types import Param, ParamKind
from vramplan.setup import Engine, FsdpSharding, Precision, Stack, TrainingSetup

RESHARDED = Gathering()  # FULL_SHARD with backward prefetch: FSDP2 as the reference step wraps it


def gathering(setup: TrainingSetup) -> Gathering:
    prefetch = setup.fsdp_version == 2 or setup.stack in (Stack.PLAIN, Stack.FSDP_QLORA)
    return Gathering(
        reshard_after_forward=setup.fsdp_sharding != FsdpSharding.SHARD_GRAD_OP, backward_prefetch=prefetch
    )


def shard_for(p: Param, setup: TrainingSetup) -> int:
    """Elements of one parameter held by one GPU under the setup's engine (FSDP only)."""
    if not setup.sharded or (p.kind.quantized and ignores_4bit(setup)):
        return p.numel
    world = setup.shard_world
    if setup.fsdp_version == 1:
        return -(-p.numel // world)
    return shard(p, world)


def shard(p: Param, world: int) -> int:
    """FSDP2 shards dim 0, padded to ceil(dim0 / W) rows on every rank."""
    if world == 1:
        return p.numel
    rows = -(-p.dim0 // world)
    return rows * (p.numel // p.dim0)


def compute_bytes(p: Param) -> int:
    """Bytes of a parameter as FSDP all-gathers it: param_dtype bf16 (FSDP2 needs one
    compute dtype per unit, so peft's fp32 adapters are gathered in bf16 too); 4-bit stays packed."""
    if p.kind.quantized:
        return packed_compute_bytes(p.numel)
    return 2 * p.numel


def reduce_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of the reduce-scatter: MixedPrecisionPolicy reduce_dtype fp32 under
    mixed precision (accelerate's policy: bf16), else bf16."""
    return 4 if setup.mixed_precision and not reduces_in_bf16(setup) else 2


def unit_bytes(params: list[Param], world: int) -> dict[int | None, int]:
    """All-gathered (unsharded, padded) bytes of each FSDP unit: decoder layers and the root."""
    units: dict[int | None, int] = {}
    for p in params:
        units[p.layer] = units.get(p.layer, 0) + gathered_param_bytes(p, world)
    return units


def fsdp1_compute_bytes(p: Param, setup: TrainingSetup) -> int:
    """FSDP1 gathers each unit in its own dtype unless MixedPrecision(param_dtype=bf16) is set
    (mixed precision): peft's fp32 adapters, each its own unit, stay fp32."""
    if p.kind == ParamKind.LORA and setup.precision != Precision.MIXED:
        return adapter_bytes(setup) * p.numel
    return compute_bytes(p)


def embedding_and_head(params: list[Param]) -> tuple[Param | None, Param | None]:
    """The input embedding (the first of the root's parameters, memory.parameters) and an
    untied lm_head (the root parameter of its shape); None where absent or tied."""
    root = [p for p in params if p.layer is None]
    if not root:
        return None, None
    embed = root[0]
    return embed, next((p for p in root[1:] if p.dim0 == embed.dim0 and p.numel == embed.numel), None)


def accelerate_embedding_unit(params: list[Param], setup: TrainingSetup) -> Param | None:
    """accelerate==1.16.0 utils/fsdp_utils.py:876-902: the untied input embedding is its own
    unit, resharded after its forward, and [final norm, lm_head] a tail unit kept unsharded
    (reshard_after_forward=False) -- where vramplan's root keeps embedding, norm and lm_head
    unsharded. Returns the embedding (the first of the root's parameters in parameters())
    when it leaves the kept unit; None when tied (the tail then holds it) or not accelerate.
    Its re-gather for its own backward (full fine-tune, at the very end) is not modelled."""
    if setup.fsdp_version != 2 or setup.stack not in ACCELERATE_STACKS:
        return None
    embed, head = embedding_and_head(params)
    return embed if head is not None else None


def separate_head_units(params: list[Param], setup: TrainingSetup) -> list[Param]:
    """--fsdp-embedding-units (torchtune's custom_sharded_layers: ['tok_embeddings', 'output'],
    torchtune==0.6.1 training/_distributed.py:519-568 shard_model: fully_shard on each matching
    module, children first, then on the whole model): the input embedding and the output
    projection leave the root unit, which vramplan keeps unsharded from forward to backward
    (torch 2.13 distributed/fsdp/_fully_shard/_fsdp_state.py `_lazy_init`: the root's
    post_forward_mesh_info is None). Each is gathered around its own forward and backward
    instead. Returns the embedding and, when untied, lm_head (embedding_and_head); []
    otherwise."""
    if not (setup.fsdp_embedding_units and setup.sharded and setup.fsdp_version == 2):
        return []
    embed, head = embedding_and_head(params)
    return [p for p in (embed, head) if p is not None]


def head_unit_bytes(params: list[Param], setup: TrainingSetup) -> int:
    """All-gathered bytes of the output projection's own unit (the tied embedding when there is
    no lm_head): held at the loss and in lm_head's backward only."""
    units = separate_head_units(params, setup)
    if not units or setup.fsdp_sharding == FsdpSharding.NO_SHARD:
        return 0
    return unit_bytes([units[-1]], setup.shard_world)[None]


def fsdp2_unit_params(params: list[Param], setup: TrainingSetup) -> list[Param]:
    """The parameters FSDP2 all-gathers with the root and decoder units: not those of a unit of
    their own (accelerate's embedding, --fsdp-embedding-units), nor 4-bit weights accelerate
    leaves resident whole (memory/accelerate.py)."""
    apart = {id(a) for a in (accelerate_embedding_unit(params, setup), *separate_head_units(params, setup))}
    ignored = ignores_4bit(setup)
    return [p for p in params if id(p) not in apart and not (ignored and p.kind.quantized)]


def gathered_param_bytes(p: Param, world: int) -> int:
    """Bytes of one parameter all-gathered (padded to world x its shard)."""
    return alloc(compute_bytes(p) * shard(p, world) * world // max(p.numel, 1))


def engine_units(params: list[Param], setup: TrainingSetup) -> dict[int | None, int]:
    """All-gathered bytes per unit under the setup's FSDP (none under NO_SHARD)."""
    world = setup.shard_world
    if not setup.sharded or setup.fsdp_sharding == FsdpSharding.NO_SHARD:
        return {}
    if setup.fsdp_version == 2:
        return unit_bytes(fsdp2_unit_params(params, setup), world)
    flat: dict[int | None, int] = {}
    for p in params:
        flat[p.layer] = flat.get(p.layer, 0) + fsdp1_compute_bytes(p, setup)
    return {k: alloc(-(-v // (2 * world)) * 2 * world) for k, v in flat.items()}


def unit_grad_bytes(params: list[Param], layer: int | None, reduce: int) -> tuple[int, int]:
    """(unsharded grads in param_dtype, reduce-scatter input in reduce_dtype) of one unit."""
    n = sum(p.numel for p in params if p.layer == layer and p.trainable)
    return 2 * n, reduce * n


def root_and_layer_unit(units: dict[int | None, int]) -> tuple[int, int]:
    """(the root unit, the largest decoder-layer unit), all-gathered."""
    layer_unit = max((v for k, v in units.items() if k is not None), default=0)
    return units.get(None, 0), layer_unit


def forward_end_gathered(units: dict[int | None, int], g: Gathering = RESHARDED) -> int:
    """At the loss and the final norm: the root unit is not resharded after forward, and
    the last unit's all-gather output is held by FSDP's AllGatherState until the next
    unshard. [cal: fsdp2 l32-1b] Under SHARD_GRAD_OP every unit is still unsharded."""
    root, layer = root_and_layer_unit(units)
    if not g.reshard_after_forward:
        return sum(units.values())
    return root + layer


def layer_forward_gathered(units: dict[int | None, int], g: Gathering = RESHARDED) -> int:
    """Inside a layer's forward: this unit and the one prefetched, and the root (the last
    layer's forward under SHARD_GRAD_OP: every unit)."""
    root, layer = root_and_layer_unit(units)
    if not g.reshard_after_forward:
        return sum(units.values())
    return root + 2 * layer


def layer_backward_gathered(units: dict[int | None, int], i: int, g: Gathering = RESHARDED) -> int:
    """In layer i's backward: this unit + the one it prefetches (the previous in forward
    order; layer 0 has none: FSDPParamGroup._backward_prefetch) + the root (kept
    unsharded). [notes 5] Under SHARD_GRAD_OP layers 0..i are still unsharded."""
    if not g.reshard_after_forward:
        return units.get(None, 0) + sum(v for k, v in units.items() if k is not None and k <= i)
    this = 2 * units.get(i, 0) if i > 0 and g.backward_prefetch else units.get(i, 0)
    return this + units.get(None, 0)


def root_grads_before_layers(params: list[Param], setup: TrainingSetup) -> list[Param]:
    """FSDP sharding: the root's trainable parameters whose unsharded grads autograd makes before
    the decoder layers' backward and the root holds until its post-backward: every one but an
    input embedding of its own (an untied head's, or a reward model's: memory/reward.py), whose
    grad is made last, and LLaMA-Factory's lm_head, which gets none. FSDP2 holds each in
    param_dtype (root_reduce_scatter); FSDP1's flat parameter is split into views, and the split's
    backward gathers the flat grad only once every view's grad came (the embedding's, last): until
    then each grad made waits alone, in the unit's compute dtype (fsdp1_compute_bytes).
    [CPU trace: engines/fsdp1-*, engines/fsdp1-2-*-reward-full] Empty off sharding."""
    if not (fsdp2_streams(setup) or fsdp1_views_grads(setup)):
        return []
    embed, head = embedding_and_head(params)
    root = fsdp2_unit_params(params, setup) if setup.engine == Engine.FSDP2 else params
    root = [p for p in root if p.layer is None and p.trainable]
    own_embedding = head is not None or is_reward(setup)
    no_grad = head if value_head(setup) else None
    return [p for p in root if not (own_embedding and p is embed) and p is not no_grad]


def fsdp1_views_grads(setup: TrainingSetup) -> bool:
    """FSDP1 sharding, one micro-batch a step, no CPU offload: the root's early grads wait as views'
    grads (root_grads_before_layers); accumulation and offload keep the rule they had."""
    return (
        setup.engine == Engine.FSDP1
        and setup.shard_world > 1
        and setup.gradient_accumulation == 1
        and not setup.cpu_offload
    )


def root_early_grad_sizes(params: list[Param], setup: TrainingSetup) -> list[int]:
    """root_grads_before_layers' blocks: FSDP2's param_dtype grads, FSDP1's in the compute dtype."""
    grads = root_grads_before_layers(params, setup)
    if setup.engine == Engine.FSDP2:
        return [unsharded_grad_bytes(p) for p in grads]
    return [alloc(fsdp1_compute_bytes(p, setup)) for p in grads]


def unsharded_grad_bytes(p: Param) -> int:
    """An unsharded parameter's grad under FSDP2: param_dtype (bf16), the whole parameter."""
    return alloc(2 * p.numel)


def root_reduce_scatter(params: list[Param], setup: TrainingSetup) -> tuple[int, int, int]:
    """FSDP2's root post-backward, the last of backward (after the embedding's): (the root's
    unsharded grads in param_dtype, its reduce-scatter input, world x shard in reduce_dtype, its
    sharded grad in reduce_dtype), all 0 when no root parameter trains or off FSDP2 sharding.
    torch==2.13.0 _fsdp_param_group.py:603-637: post_backward takes the unsharded grads and
    reshards (frees the unsharded parameters) first; :646-657 frees the previous unit's
    reduce-scatter input; then _fsdp_collectives.py:595-606 makes this one on the compute
    stream while the unsharded grads are alive (they go once copied in), and :611-616 the
    sharded grad after them. Until this moment the root's grads are the unsharded ones (autograd
    made lm_head's in the loss backward)."""
    if not fsdp2_streams(setup):
        return 0, 0, 0
    root = [p for p in fsdp2_unit_params(params, setup) if p.layer is None and p.trainable]
    world = setup.shard_world
    shards = sum(shard(p, world) for p in root)
    return (
        sum(unsharded_grad_bytes(p) for p in root),
        alloc(reduce_bytes(setup) * world * shards),
        alloc(reduce_bytes(setup) * shards),
    )


def offload_grads_held(setup: TrainingSetup) -> bool:
    """Whether the GPU copy of each unit's gradient stays until the end of backward under CPU
    offload. FSDP1 (torch==2.13.0 distributed/fsdp/_runtime_utils.py:926): the reduce-scattered
    shard is kept in ``flat_param._saved_grad_shard`` (NO_SHARD: ``flat_param.grad``, :932-949)
    after its copy to ``_cpu_grad`` (:985-987); only the post-backward final callback's
    ``_finalize_params`` -> ``prepare_gradient_for_optim`` (:1199; _flat_param.py:1679-1720)
    points ``.grad`` at the CPU copy and drops the GPU one. So every unit's sharded grads are
    on the GPU from its post-backward to the end of backward. FSDP2's CPUOffloadPolicy moves
    each reduced grad to the host in its own post-backward (no GPU copy kept)."""
    return setup.cpu_offload and setup.engine == Engine.FSDP1


# torch==2.13.0 distributed/fsdp/_runtime_utils.py:304-306: FSDP1 runs `handle.unshard()`
# under its unshard stream, so the padded unsharded flat parameter (_flat_param.py:1408,
# _alloc_storage) is a block of that stream; the caching allocator gives a freed block back
# only to allocations of the stream that made it (c10/cuda/CUDACachingAllocator.cpp,
# BlockComparatorSize orders free blocks by stream first), so the all-gathered units reuse
# each other's blocks and never the compute stream's.
UNSHARD_STREAM = 1


def gathered_stream(setup: TrainingSetup) -> int:
    """The CUDA stream whose blocks hold the all-gathered units (0: the compute stream)."""
    return UNSHARD_STREAM if setup.engine == Engine.FSDP1 else 0


# torch==2.13.0 distributed/fsdp/_runtime_utils.py:755 and :901: FSDP1 reduce-scatters each
# unit's gradient under its post-backward stream into a new shard (torch.empty_like), which
# becomes the sharded grad (_saved_grad_shard, then .grad): a block of that stream.
POST_BACKWARD_STREAM = 2
# :293 and _flat_param.py:1335-1337: under CPU offload `pre_unshard` copies the unit's shard
# from the host (flat_param_to(device)) under the pre-unshard stream; the all-gather reads
# it, and it is dropped once the flat parameter points at the unsharded one.
PRE_UNSHARD_STREAM = 3


# FSDP2 copies on two streams of its own (torch==2.13.0 distributed/fsdp/_fully_shard/
# _fsdp_param_group.py:75-126: used for the forward's and the backward prefetch's all-gathers;
# the all-gather stream itself only runs the collective and allocates nothing,
# _fsdp_collectives.py:363-370). The caching allocator gives a freed block back only to the
# stream that made it, so each stream keeps its own cached segments.
# _fsdp_collectives.py:336, :351-353, :419-423 (foreach_all_gather): the all-gather's staging
# copy (the unit's shard in param_dtype) and its flat output (world x shard) are blocks of the
# all-gather copy-in stream; the per-parameter unsharded tensors are copied out of it on the
# compute stream (:457-463). In forward the flat output is held (AllGatherState) until the next
# unit's wait_for_unshard (_fsdp_param_group.py:430-432, :476-485).
ALL_GATHER_COPY_IN_STREAM = 4
# _fsdp_collectives.py:611-616 and :704-709 (foreach_reduce): each unit's reduce-scatter output
# (its shard in reduce_dtype, one tensor per unit) is a block of the reduce-scatter stream and
# the sharded grads are views of it until zero_grad; under CPU offload it is copied to the host
# and dropped at once (:729-739). The reduce-scatter input is the compute stream's (:595-601).
REDUCE_SCATTER_STREAM = 5


def fsdp2_streams(setup: TrainingSetup) -> bool:
    """FSDP2 sharding over more than one GPU: its all-gathers and reduce-scatters run on their
    own streams (on one GPU, world 1, it copies out without a collective:
    _fsdp_param_group.py:440-459)."""
    return setup.engine == Engine.FSDP2 and setup.shard_world > 1


def grad_stream(setup: TrainingSetup) -> int:
    """The stream whose blocks hold the sharded grads (FSDP1's post-backward stream, FSDP2's
    reduce-scatter stream when they shard; NO_SHARD all-reduces autograd's grad in place, a
    compute-stream block)."""
    if setup.engine == Engine.FSDP1 and setup.shard_world > 1:
        return POST_BACKWARD_STREAM
    return REDUCE_SCATTER_STREAM if fsdp2_streams(setup) else 0


def gathered_blocks(
    params: list[Param], setup: TrainingSetup, units: dict[int | None, int], head: int
) -> tuple[list[int], tuple[int, ...]]:
    """The all-gathered units as the blocks the allocator sees, oldest first, with each one's
    stream (events: the FSDP buffers of a moment are the first of these that fit). FSDP1: the
    root, lm_head's own unit and two decoder units, flat parameters of its unshard stream.
    FSDP2 (sharded): the root's per-parameter unsharded tensors and lm_head's unit on the
    compute stream (_fsdp_param.py:616-628, one tensor per parameter); then a decoder unit's
    flat all-gather output on the copy-in stream (the one AllGatherState holds at the loss, or
    the one prefetched in a layer's backward) and the largest decoder unit's per-parameter
    tensors on the compute stream."""
    root, layer = root_and_layer_unit(units)
    if not fsdp2_streams(setup):
        on = UNSHARD_STREAM if setup.engine == Engine.FSDP1 else 0
        return [root, head, layer, layer], (on,) * 4
    kept = fsdp2_unit_params(params, setup)
    world = setup.shard_world
    largest = max((k for k in units if k is not None), key=lambda k: units[k], default=None)
    roots = [gathered_param_bytes(p, world) for p in kept if p.layer is None]
    layers = [gathered_param_bytes(p, world) for p in kept if p.layer == largest and largest is not None]
    sizes = [*roots, head, layer, *layers]
    return sizes, (0,) * (len(roots) + 1) + (ALL_GATHER_COPY_IN_STREAM,) + (0,) * len(layers)


def root_all_gather_steps(params: list[Param], setup: TrainingSetup) -> list[tuple[int, int]]:
    """FSDP2's first all-gather of a step (the root unit's), on the copy-in stream: per tensor
    it all-gathers, (bytes copied in and dropped once cast, bytes kept until the all-gather
    returns), in order; the flat output (world x shard) not among them. Under CPU offload each
    parameter's shard is copied in (its stored dtype) and cast to param_dtype
    (_fsdp_param.py:896-901; the foreach copy is disabled, _fsdp_collectives.py:391); otherwise
    one staging copy of the unit's shard in param_dtype (:419-423), nothing copied in. Empty off
    FSDP2 sharding. The decoder units' copies are smaller than the root's and reuse its cached
    blocks: not emitted."""
    if not fsdp2_streams(setup):
        return []
    world = setup.shard_world
    root = [p for p in fsdp2_unit_params(params, setup) if p.layer is None]
    cast = [alloc(compute_bytes(p) * shard(p, world) // max(p.numel, 1)) for p in root]
    if setup.cpu_offload:
        return [(sum(store(p, setup, shard(p, world)).values()), c) for p, c in zip(root, cast, strict=True)]
    return [(0, sum(cast))]


def offload_shard_copy(params: list[Param], setup: TrainingSetup) -> int:
    """Bytes of the largest unit's shard as FSDP1 copies it to the GPU before each all-gather
    under CPU offload (0 otherwise): the pre-unshard stream's blocks never serve anything
    else, so their cache is the largest copy made (the root's, in forward's first unshard)."""
    if not (setup.cpu_offload and setup.engine == Engine.FSDP1):
        return 0
    world = setup.shard_world
    flat: dict[int | None, int] = {}
    for p in params:
        flat[p.layer] = flat.get(p.layer, 0) + fsdp1_compute_bytes(p, setup)
    return max((-(-v // world) for v in flat.values()), default=0)
