"""DeepSpeed JSON (deepspeed config; keys as written by the HF/axolotl/LLaMA-Factory examples).

``"auto"`` values are filled by the HF integration from the trainer's arguments
(transformers integrations/deepspeed.py), so they leave the field to the framework file.
"""

from __future__ import annotations

from vramplan.configs.collect import Collector
from vramplan.configs.reading import ConfigFormat, ConfigReading, Distributed
from vramplan.setup import DeepSpeedStage, Precision

_STAGES = {1: DeepSpeedStage.ZERO1, 2: DeepSpeedStage.ZERO2, 3: DeepSpeedStage.ZERO3}
_OFFLOAD_DEVICES = {"cpu": True, "nvme": True, "none": False}
_KNOWN = frozenset(
    {
        "zero_optimization",
        "train_micro_batch_size_per_gpu",
        "train_batch_size",
        "gradient_accumulation_steps",
        "bf16",
        "fp16",
        "optimizer",
        "scheduler",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
        "wall_clock_breakdown",
        "steps_per_print",
        "gradient_clipping",
    }
)
# zero_optimization keys that size communication buckets/prefetch: memory the engine module owns
_BUCKET_KEYS = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters",
    "stage3_param_persistence_threshold",
    "sub_group_size",
)


def read(data: dict, path: str, engine: dict | None = None) -> ConfigReading:
    c = Collector(path, data)
    _zero(c, c.get("zero_optimization", {}))
    for key, field in (
        ("train_micro_batch_size_per_gpu", "batch_size"),
        ("gradient_accumulation_steps", "gradient_accumulation"),
    ):
        value = c.get(key)
        if value is not None and value != "auto":
            c.set(key, field, c.pos_int(key, value))
    _precision(c)
    optimizer = c.get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("type"):
        c.unmodelled(
            "optimizer.type",
            f"DeepSpeed's own {optimizer['type']} replaces the trainer's optim; give --optim for the same states",
        )
    return c.finish(ConfigFormat.DEEPSPEED, None, None, _KNOWN)


def _zero(c: Collector, zero: dict) -> None:
    if not isinstance(zero, dict):
        raise c.fail("zero_optimization", "a mapping", zero)
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise c.fail("zero_optimization.stage", "0, 1, 2 or 3", stage)
    if stage == 0:
        c.distributed = Distributed.DDP
        c.unmodelled("zero_optimization.stage", "ZeRO stage 0 is plain data parallelism: modelled unsharded")
        return
    c.distributed = Distributed.DEEPSPEED
    c.set("zero_optimization.stage", "deepspeed", _STAGES[stage])
    for key, field in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_params")):
        _offload(c, zero, key, field, stage)
    for key in _BUCKET_KEYS:
        if key in zero and zero[key] != "auto":
            c.unmodelled(f"zero_optimization.{key}", 'bucket and prefetch sizes are taken as HF\'s "auto" values')


def _offload(c: Collector, zero: dict, key: str, field: str, stage: int) -> None:
    section = zero.get(key)
    if section is None:
        return
    full = f"zero_optimization.{key}.device"
    device = section.get("device", "none") if isinstance(section, dict) else section
    on = c.choice(full, device, _OFFLOAD_DEVICES)
    if on and field == "offload_params" and stage != 3:
        raise c.fail(full, "none below ZeRO stage 3 (offload_param is a stage-3 option)", device)
    c.set(full, field, on, "NVMe offload modelled as CPU offload" if device == "nvme" else "")


def _precision(c: Collector) -> None:
    for key, precision in (("bf16", Precision.MIXED), ("fp16", Precision.FP16)):
        section = c.get(key, {})
        enabled = section.get("enabled", False) if isinstance(section, dict) else section
        if enabled is True:
            c.set(
                f"{key}.enabled",
                "precision",
                precision,
                "DeepSpeed keeps fp32 master weights in the optimizer and computes in half precision",
            )
        elif enabled not in (False, "auto"):
            raise c.fail(f"{key}.enabled", 'true, false or "auto"', enabled)
