"""Build the reference step (docs/reference-step.md) for one TrainingSetup.

The model is created on the meta device and materialized straight on the target device,
so no full-size weights are ever initialized on the CPU: an 8B builds in seconds, and a
70B QLoRA never holds more than one bf16 Linear before it is quantized. The same code
runs on ``device="cpu"`` so CI exercises every method it has the libraries for.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

from vramplan.errors import VramplanError
from vramplan.model_loader import load_model_spec, resolve_config
from vramplan.model_spec import ModelSpec
from vramplan.setup import Engine, LoraTargets, Method, Optim, Precision, Quant, TrainingSetup

LR = 1e-5
INIT_STD = 0.02          # values do not change memory; finite values keep SVD and quantizers happy
GALORE_SCALE = 0.25
GALORE_PROJ = "std"


def need(module: str, what: str):
    """Import an optional (GPU-side) library or say which one is missing."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip = {"galore_torch": "galore-torch"}.get(module.split(".")[0], module.split(".")[0])
        raise VramplanError(f"{what} needs the '{pip}' package ({e}); pip install 'vramplan[verify]'") from None


@dataclass
class Built:
    """The live objects of one reference step. Not a data model: it holds the GPU memory."""
    model: object
    setup: TrainingSetup
    device: str
    vocab: int
    num_layers: int
    optimizer: object | None = None                      # None with layer-wise GaLore
    layerwise: dict = field(default_factory=dict)        # param -> its own optimizer
    hooks: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    simulated: bool = False
    rank: int = 0

    @property
    def optimizers(self) -> list:
        return [self.optimizer] if self.optimizer is not None else list(self.layerwise.values())

    def batch(self):
        import torch
        s = self.setup
        return torch.randint(0, self.vocab, (s.batch_size, s.seq_len), device=self.device)

    def forward(self, ids):
        """The loss computed inside the model (labels = input_ids)."""
        import torch
        if self.setup.autocast:
            with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
                return self.model(input_ids=ids, labels=ids).loss
        return self.model(input_ids=ids, labels=ids).loss

    def optimizer_step(self) -> None:
        # layer-wise GaLore already stepped and zeroed every parameter from its grad hook
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        self.layerwise.clear()
        self.optimizer = None
        self.model = None


# ---------------------------------------------------------------- model

def hf_config(cfg: dict, attn: str):
    from transformers import AutoConfig
    cfg = copy.deepcopy(cfg)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config.use_cache = False
    config._attn_implementation = attn
    return config


def meta_model(cfg: dict, spec: ModelSpec, dtype):
    """The causal LM on the meta device: shapes only, nothing allocated."""
    import torch

    from vramplan.analyze import auto_class
    config = hf_config(cfg, spec.attn_implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            model = auto_class(config).from_config(config, dtype=dtype, attn_implementation=spec.attn_implementation)
    model.train()
    return model


def decoder_prefix(model, num_layers: int) -> str:
    from vramplan.analyze import _decoder_layers
    return _decoder_layers(model, num_layers)[0]


def _init_(t, name: str) -> None:
    """Random weights; 1-D weights (norms) ones, biases zeros."""
    import torch
    with torch.no_grad():
        if name == "bias":
            t.zero_()
        elif t.dim() == 1:
            t.fill_(1.0)
        elif t.is_floating_point():
            t.normal_(0.0, INIT_STD)


def materialize(model, device: str) -> None:
    """Replace every meta parameter/buffer by one allocated on `device` (tied weights stay tied)."""
    import torch
    new: dict[int, torch.nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in new:
                t = torch.empty(p.shape, dtype=p.dtype, device=device)
                _init_(t, name)
                new[id(p)] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
            mod._parameters[name] = new[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    fix_rotary(model, device)


def fix_rotary(model, device: str) -> None:
    """RoPE inverse frequencies are non-persistent buffers: recompute them on `device`."""
    import torch
    for mod in model.modules():
        if "Rotary" not in type(mod).__name__ or not hasattr(mod, "inv_freq"):
            continue
        try:
            with torch.device(device):
                fresh = type(mod)(mod.config)
            for name in ("inv_freq", "original_inv_freq"):
                if isinstance(getattr(mod, name, None), torch.Tensor):
                    setattr(mod, name, getattr(fresh, name).to(device))
        except Exception:  # noqa: BLE001 - unknown signature: any finite frequencies have the same memory
            n = mod.inv_freq.numel()
            mod.inv_freq = 1.0 / (10000 ** (torch.arange(n, device=device, dtype=torch.float32) / max(n, 1)))


def _set_module(model, path: str, new) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def decoder_linears(model, spec: ModelSpec) -> list[tuple[str, str]]:
    """(full module path, role) of every Linear inside the decoder layers."""
    prefix = decoder_prefix(model, spec.num_layers)
    return [(f"{prefix}.{i}.{lin.name}", lin.role) for i, layer in enumerate(spec.layers) for lin in layer.linears]


def _random_linear(lin, device: str):
    import torch
    w = torch.empty(lin.out_features, lin.in_features, dtype=torch.bfloat16, device=device)
    _init_(w, "weight")
    bias = torch.zeros(lin.out_features, dtype=torch.bfloat16, device=device) if lin.bias is not None else None
    return w, bias


def _nf4(lin, device: str):
    import torch
    bnb = need("bitsandbytes", "--quant nf4")
    w, bias = _random_linear(lin, device)
    # built on meta so the constructor's fp32 weight is never allocated
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias is not None, compute_dtype=torch.bfloat16,
                          compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=64, compress_statistics=True, quant_type="nf4",
                                 quant_storage=torch.uint8, module=q).to(device)  # .to() quantizes
    if bias is not None:
        q.bias = torch.nn.Parameter(bias, requires_grad=False)
    return q


def _hqq4(lin, device: str):
    import torch
    hqq = need("hqq.core.quantize", "--quant hqq4")
    w, bias = _random_linear(lin, device)
    src = torch.nn.Linear(lin.in_features, lin.out_features, bias=bias is not None, device="meta")
    src.weight = torch.nn.Parameter(w, requires_grad=False)
    if bias is not None:
        src.bias = torch.nn.Parameter(bias, requires_grad=False)
    cfg = hqq.BaseQuantizeConfig(nbits=4, group_size=64)
    return hqq.HQQLinear(src, cfg, compute_dtype=torch.bfloat16, device=device, initialize=True, del_orig=True)


def quantize_decoder(model, spec: ModelSpec, quant: Quant, device: str, sharded: bool = False) -> None:
    """Every decoder Linear becomes 4-bit, one at a time (peak: one bf16 Linear).

    ``sharded``: FSDP2 will shard the packed weights and ``to_empty`` their shards, so
    each packed weight goes back to meta as soon as it is quantized; the quantization
    state, which FSDP2 leaves whole on every rank, stays on the device. The build then
    never holds more than one whole packed Linear per rank."""
    make = _nf4 if quant == Quant.NF4 else _hqq4
    for path, _role in decoder_linears(model, spec):
        q = make(model.get_submodule(path), device)
        if sharded:
            _packed_to_meta(q)
        _set_module(model, path, q)


def _packed_to_meta(q) -> None:
    import torch
    if hasattr(q, "W_q"):  # hqq's HQQLinear
        q.W_q = torch.nn.Parameter(torch.empty_like(q.W_q, device="meta"), requires_grad=False)
        return
    bnb = need("bitsandbytes", "--quant nf4")
    w = q.weight
    q.weight = bnb.nn.Params4bit(torch.empty_like(w.data, device="meta"), requires_grad=False,
                                 quant_state=w.quant_state, blocksize=w.blocksize,
                                 compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                 quant_storage=w.quant_storage, module=q, bnb_quantized=True)


# ---------------------------------------------------------------- methods

def lora_targets(model, spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """The same Linears the estimate gives adapters (memory.lora.lora_targeted)."""
    attn = ("q", "k", "v", "qkv", "o")
    out = []
    for path, role in decoder_linears(model, spec):
        if role in ("router", "other"):
            continue
        if setup.lora_targets == LoraTargets.ATTENTION and role not in attn:
            continue
        out.append(path)
    return out


def apply_lora(model, spec: ModelSpec, setup: TrainingSetup, device: str):
    import torch
    peft = need("peft", "--method lora/qlora")
    targets = lora_targets(model, spec, setup)
    cfg = peft.LoraConfig(r=setup.lora_r, lora_alpha=2 * setup.lora_r, lora_dropout=setup.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
    # adapters are created under the device context: no CPU copies; on meta they stay meta (FSDP)
    with torch.device(device):
        return peft.get_peft_model(model, cfg)


def enable_checkpointing(model, setup: TrainingSetup) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.lora_like:
        model.enable_input_require_grads()


def galore_names(model, spec: ModelSpec) -> set[str]:
    """2-D weights inside attention and MLP blocks (memory.parameters: role != other)."""
    return {f"{path}.weight" for path, role in decoder_linears(model, spec) if role != "other"}


def _optim_class(setup: TrainingSetup):
    import torch
    o = setup.optim
    if o in (Optim.ADAMW_TORCH, Optim.ADAMW_TORCH_FUSED):
        return torch.optim.AdamW
    if o == Optim.ADAMW_BNB_8BIT:
        return need("bitsandbytes", "--optim adamw_bnb_8bit").optim.AdamW8bit
    galore = need("galore_torch", f"--optim {o.value}")
    return galore.GaLoreAdamW8bit if o.is_8bit else galore.GaLoreAdamW


def param_groups(model, setup: TrainingSetup, galore: set[str]) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if setup.method != Method.GALORE:
        return [{"params": [p for _, p in named]}]
    proj = dict(rank=setup.galore_rank, update_proj_gap=setup.galore_update_proj_gap, scale=GALORE_SCALE,
                proj_type=GALORE_PROJ)
    low = [p for n, p in named if _strip(n) in galore]
    rest = [p for n, p in named if _strip(n) not in galore]
    return [{"params": rest}, {"params": low, **proj}]


def _strip(name: str) -> str:
    # FSDP/peft wrappers do not rename parameters here, but checkpoint wrappers may
    return name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")


def make_optimizer(built: Built, galore: set[str]) -> None:
    cls = _optim_class(built.setup)
    kw = {"fused": True} if built.setup.optim == Optim.ADAMW_TORCH_FUSED else {}
    groups = param_groups(built.model, built.setup, galore)
    if not built.setup.optim.layerwise:
        built.optimizer = cls([g for g in groups if g["params"]], lr=LR, **kw)
        return
    # one optimizer per parameter, stepped as soon as its grad is accumulated
    for g in groups:
        for p in g["params"]:
            built.layerwise[p] = cls([{**g, "params": [p]}], lr=LR)
            built.hooks.append(p.register_post_accumulate_grad_hook(_layerwise_hook(built.layerwise)))


def _layerwise_hook(opts: dict):
    def hook(p):
        opts[p].step()
        opts[p].zero_grad(set_to_none=True)
    return hook


# ---------------------------------------------------------------- FSDP2

def fsdp_mesh(world: int, device: str):
    """Rank r of a real group when one is initialized with this world size, else rank 0
    of a fake process group: collectives do nothing, but every buffer is allocated."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    simulated = not (dist.is_initialized() and dist.get_world_size() == world)
    if simulated:
        if dist.is_initialized():
            raise VramplanError(f"a process group of size {dist.get_world_size()} is already initialized", "--fsdp")
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group(backend="fake", rank=0, world_size=world, store=FakeStore())
    import torch
    return init_device_mesh(torch.device(device).type, (world,)), simulated


def shard(model, setup: TrainingSetup, device: str, layers_prefix: str) -> tuple[bool, int, list[str]]:
    """fully_shard every decoder layer, then the root; materialize the shards (to_empty)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    notes = []
    mesh, simulated = fsdp_mesh(setup.fsdp, device)
    kw = {"mesh": mesh}
    dtypes = {p.dtype for p in model.parameters()}
    if setup.precision == Precision.MIXED:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif len(dtypes) > 1:
        # FSDP2 all-gathers one dtype per group: bf16 base + peft's fp32 adapters need a policy
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        notes.append("bf16 base with fp32 adapters under FSDP: MixedPrecisionPolicy(param_dtype=bf16)")
    if setup.cpu_offload:
        # pinning needs an accelerator; on CPU the policy still keeps shards on the host
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device != "cpu")
    for layer in model.get_submodule(layers_prefix):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    # offload keeps shards on the host; buffers (RoPE) live on the compute device
    model.to_empty(device="cpu" if setup.cpu_offload else device)
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        _init_(local, name.rsplit(".", 1)[-1])
    for mod in model.modules():
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.device.type != torch.device(device).type:
                mod._buffers[bname] = b.to(device)
    fix_rotary(model, device)
    return simulated, dist.get_rank(), notes


# ---------------------------------------------------------------- DDP and FSDP1

def fake_group(world: int) -> bool:
    """Rank 0 of a fake process group of `world` ranks unless a real one of that size is up
    (fsdp_mesh's rule, without a mesh). Returns whether it is simulated."""
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() == world:
        return False
    if dist.is_initialized():
        raise VramplanError(f"a process group of size {dist.get_world_size()} is already initialized", "--gpus")
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group(backend="fake", rank=0, world_size=world, store=FakeStore())
    return True


def _bucket_as_result(state, bucket):
    """A comm hook that returns the bucket as reduced: the fake all-reduce gives no future
    value (c10d/comm.cpp), and NCCL's all-reduce is in place, so memory is the same."""
    import torch
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def wrap_ddp(model, setup: TrainingSetup, device: str):
    """torch DistributedDataParallel as accelerate/HF Trainer build it (bucket_cap_mb left to
    torch, gradient_as_bucket_view=False). On a fake group the no-op hook stands in for NCCL."""
    from torch.nn.parallel import DistributedDataParallel
    simulated = fake_group(setup.data_parallel)
    ids = None if device == "cpu" else [torch_device_index(device)]
    ddp = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=False)
    if simulated:
        ddp.register_comm_hook(None, _bucket_as_result)
    return ddp, simulated


def torch_device_index(device: str) -> int:
    import torch
    d = torch.device(device)
    return d.index if d.index is not None else torch.cuda.current_device()


def shard_fsdp1(model, setup: TrainingSetup, device: str, layers_prefix: str):
    """torch FullyShardedDataParallel with its defaults (BACKWARD_PRE, limit_all_gathers),
    each decoder layer a unit, the root the rest; peft models wrapped with peft's
    fsdp_auto_wrap_policy (each LoRA Linear its own unit) as HF Trainer does."""
    import torch
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    simulated = fake_group(setup.fsdp)
    layer_cls = type(model.get_submodule(layers_prefix)[0])
    if setup.lora_like:
        from peft.utils.other import fsdp_auto_wrap_policy
        policy = fsdp_auto_wrap_policy(model)
    else:
        policy = ModuleWrapPolicy({layer_cls})
    strategy = {"full": ShardingStrategy.FULL_SHARD, "shard-grad-op": ShardingStrategy.SHARD_GRAD_OP,
                "no-shard": ShardingStrategy.NO_SHARD, "hybrid": ShardingStrategy.HYBRID_SHARD}
    wrapped = FSDP(model, auto_wrap_policy=policy, device_id=torch.device(device),
                   sharding_strategy=strategy[setup.fsdp_sharding.value],
                   cpu_offload=CPUOffload(offload_params=setup.cpu_offload))
    return wrapped, simulated


# ---------------------------------------------------------------- the whole step

def build_step(model_name: str, setup: TrainingSetup, device: str = "cuda", num_layers: int | None = None) -> Built:
    """Model, method, checkpointing, sharding and optimizer of the reference step."""
    import torch
    spec = load_model_spec(model_name, num_layers=num_layers)
    _name, _alias, cfg = resolve_config(model_name, num_layers=num_layers)
    qlora = setup.method == Method.QLORA
    dtype = torch.float32 if (setup.precision == Precision.MIXED and not qlora) else torch.bfloat16
    model = meta_model(cfg, spec, dtype)
    prefix = decoder_prefix(model, spec.num_layers)
    galore = galore_names(model, spec) if setup.method == Method.GALORE else set()
    fsdp = setup.engine == Engine.FSDP2
    if qlora:
        quantize_decoder(model, spec, setup.quant, device, sharded=fsdp)
    if not fsdp:
        materialize(model, device)
    if setup.lora_like:
        for p in model.parameters():
            p.requires_grad_(False)
        model = apply_lora(model, spec, setup, "meta" if fsdp else device)
    if setup.gradient_checkpointing:
        enable_checkpointing(model, setup)
    built = Built(model=model, setup=setup, device=device, vocab=spec.vocab, num_layers=spec.num_layers)
    if setup.lora_like:
        prefix = decoder_prefix(model, spec.num_layers)  # peft adds base_model.model.
    if fsdp:
        built.simulated, built.rank, notes = shard(model, setup, device, prefix)
        built.notes += notes
        if built.simulated:
            built.notes.append(f"FSDP simulated: rank 0 of {setup.fsdp} on a fake process group")
    if setup.engine in (Engine.DDP, Engine.FSDP1):
        _wrap_replicated(built, prefix)
    make_optimizer(built, galore)
    return built


def _wrap_replicated(built: Built, prefix: str) -> None:
    """DDP or FSDP1 around the materialized model (rank 0 of a fake group on one device)."""
    setup = built.setup
    if setup.engine == Engine.DDP:
        built.model, built.simulated = wrap_ddp(built.model, setup, built.device)
        world = setup.data_parallel
    else:
        built.model, built.simulated = shard_fsdp1(built.model, setup, built.device, prefix)
        world = setup.fsdp
    if built.simulated:
        built.notes.append(f"{setup.engine.value.upper()} simulated: rank 0 of {world} on a fake process group")


