"""accelerate config YAML (as ``accelerate config`` writes it; accelerate==1.16.0).

It says how the script is launched: the engine (FSDP, DeepSpeed, DDP), the world size and
the autocast precision. The training knobs live in the framework's own file.
"""

from __future__ import annotations

from vramplan.configs.collect import Collector
from vramplan.configs.reading import ConfigFormat, ConfigReading, Distributed
from vramplan.configs.vocab import FSDP_STRATEGY, fsdp_reshard
from vramplan.setup import ActivationOffload, DeepSpeedStage, Precision

_DISTRIBUTED = {
    "FSDP": Distributed.FSDP,
    "DEEPSPEED": Distributed.DEEPSPEED,
    "MULTI_GPU": Distributed.DDP,
    "NO": Distributed.NONE,
}
_PRECISION = {"bf16": Precision.MIXED, "fp16": Precision.FP16, "no": Precision.BF16}
_STAGES = {1: DeepSpeedStage.ZERO1, 2: DeepSpeedStage.ZERO2, 3: DeepSpeedStage.ZERO3}
_DEVICES = {"cpu": True, "nvme": True, "none": False}
_KNOWN = frozenset(
    {
        "compute_environment",
        "debug",
        "downcast_bf16",
        "machine_rank",
        "main_training_function",
        "rdzv_backend",
        "same_network",
        "tpu_env",
        "tpu_use_cluster",
        "tpu_use_sudo",
        "use_cpu",
        "enable_cpu_affinity",
        "gpu_ids",
        "main_process_ip",
        "main_process_port",
        "dynamo_config",
    }
)


def read(data: dict, path: str, engine: dict | None = None) -> ConfigReading:
    c = Collector(path, data)
    kind = c.choice("distributed_type", c.get("distributed_type", "NO"), _DISTRIBUTED)
    c.distributed = kind
    processes = c.get("num_processes")
    if processes is not None:
        c.world = c.pos_int("num_processes", processes)
    c.set_int("num_machines", "nodes")
    mixed = c.get("mixed_precision")
    if mixed is not None:
        c.set(
            "mixed_precision",
            "precision",
            c.choice("mixed_precision", mixed, _PRECISION),
            "bf16 autocast" if mixed == "bf16" else "",
        )
    if kind == Distributed.FSDP:
        _fsdp(c, c.mapping("fsdp_config", c.get("fsdp_config")))
    elif kind == Distributed.DEEPSPEED:
        _deepspeed(c, c.mapping("deepspeed_config", c.get("deepspeed_config")))
    return c.finish(ConfigFormat.ACCELERATE, None, None, _KNOWN)


def _fsdp(c: Collector, cfg: dict) -> None:
    if c.world is not None:
        c.set("num_processes", "fsdp", c.world, "FSDP world size = processes over all nodes")
    version = cfg.get("fsdp_version", 1)  # accelerate default 1 (accelerate/utils/launch.py:281)
    c.set(
        "fsdp_config.fsdp_version",
        "fsdp_version",
        c.choice("fsdp_config.fsdp_version", version, {1: 1, 2: 2}),
        "" if "fsdp_version" in cfg else "accelerate's default",
    )
    if "fsdp_sharding_strategy" in cfg:
        key = "fsdp_config.fsdp_sharding_strategy"
        c.set(key, "fsdp_sharding", c.choice(key, cfg["fsdp_sharding_strategy"], FSDP_STRATEGY))
    if "fsdp_reshard_after_forward" in cfg:
        key = "fsdp_config.fsdp_reshard_after_forward"
        c.set(key, "fsdp_sharding", fsdp_reshard(c, key, cfg["fsdp_reshard_after_forward"]))
    if "fsdp_offload_params" in cfg:
        c.set(
            "fsdp_config.fsdp_offload_params",
            "cpu_offload",
            c.flag("fsdp_config.fsdp_offload_params", cfg["fsdp_offload_params"]),
        )
    if cfg.get("fsdp_activation_checkpointing") is not None:
        key = "fsdp_config.fsdp_activation_checkpointing"
        if c.flag(key, cfg["fsdp_activation_checkpointing"]):
            c.set(key, "gradient_checkpointing", True, "FSDP applies non-reentrant checkpointing per layer")
    if cfg.get("fsdp_activation_checkpointing_offload") is True:
        c.set(
            "fsdp_config.fsdp_activation_checkpointing_offload",
            "activation_offload",
            ActivationOffload.CHECKPOINTS,
            "each checkpointed layer's input to pinned host RAM",
        )


def _deepspeed(c: Collector, cfg: dict) -> None:
    if cfg.get("deepspeed_config_file"):
        c.reference("deepspeed_config.deepspeed_config_file", ConfigFormat.DEEPSPEED, cfg["deepspeed_config_file"])
        return
    stage = cfg.get("zero_stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise c.fail("deepspeed_config.zero_stage", "0, 1, 2 or 3", stage)
    if stage == 0:
        c.distributed = Distributed.DDP
        c.unmodelled("deepspeed_config.zero_stage", "ZeRO stage 0 is plain data parallelism: modelled unsharded")
        return
    c.set("deepspeed_config.zero_stage", "deepspeed", _STAGES[stage])
    for key, field in (("offload_optimizer_device", "offload_optimizer"), ("offload_param_device", "offload_params")):
        if cfg.get(key) is not None:
            on = c.choice(f"deepspeed_config.{key}", cfg[key], _DEVICES)
            if on and field == "offload_params" and stage != 3:
                raise c.fail(f"deepspeed_config.{key}", "none below ZeRO stage 3", cfg[key])
            c.set(f"deepspeed_config.{key}", field, on)
    if cfg.get("gradient_accumulation_steps") is not None:
        key = "deepspeed_config.gradient_accumulation_steps"
        c.set(key, "gradient_accumulation", c.pos_int(key, cfg["gradient_accumulation_steps"]))
