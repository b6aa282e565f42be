"""Which framework wrote a config file, from its keys (first match wins).

Decisive keys per format (research notes, part B0): DeepSpeed's ``zero_optimization`` /
``train_micro_batch_size_per_gpu``; accelerate's ``distributed_type``; torchtune's
``_component_`` values; axolotl's ``base_model``/``micro_batch_size``/``sequence_len``/``adapter``;
LLaMA-Factory's ``finetuning_type``/``stage``/``cutoff_len``/``template``/``lora_target``/
``quantization_bit``; TRL's CLI keys; else transformers ``TrainingArguments`` keys.
"""

from __future__ import annotations

from vramplan.configs.reading import ConfigFormat
from vramplan.errors import VramplanError

_DEEPSPEED = ("zero_optimization", "train_micro_batch_size_per_gpu", "train_batch_size")
_ACCELERATE = ("distributed_type",)
_AXOLOTL = ("base_model", "micro_batch_size", "sequence_len", "adapter", "lora_target_linear", "sample_packing")
_LLAMAFACTORY = ("finetuning_type", "stage", "cutoff_len", "lora_target", "quantization_bit", "lora_rank")
_TRL = (
    "model_name_or_path",
    "use_peft",
    "max_length",
    "max_seq_length",
    "packing",
    "padding_free",
    "loss_type",
    "load_in_4bit",
    "lora_r",
    "dataset_name",
    "activation_offloading",
    "accelerate_config",
    # GRPOConfig's (trl==1.16.0 grpo_config.py; configs/hf.py _grpo)
    "num_generations",
    "use_vllm",
)
# LLaMA-Factory's v1 trainer (llamafactory==0.9.5 llamafactory/v1/config/model_args.py,
# training_args.py; run with USE_V1=1, cli.py:19): its own loop, configured by plugin sections.
# It shares micro_batch_size with axolotl, so it is told apart before axolotl.
_LLAMAFACTORY_V1 = (
    "model_class",
    "peft_config",
    "kernel_config",
    "quant_config",
    "dist_config",
    "optim_config",
    "init_config",
    "lr_scheduler_config",
    "batching_strategy",
)
_HF = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "optim",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "activation_checkpointing",
    "output_dir",
    "num_train_epochs",
    "fsdp",
    "deepspeed",
)

_ALLOWED = (
    "a config of axolotl, TRL/HF TrainingArguments, LLaMA-Factory, torchtune, accelerate or DeepSpeed "
    "(none of their keys found: e.g. base_model, model_name_or_path, finetuning_type, model._component_, "
    "distributed_type, zero_optimization)"
)


def detect_format(data: dict, path: str) -> ConfigFormat:
    def has(keys: tuple[str, ...]) -> bool:
        return any(k in data for k in keys)

    if has(_DEEPSPEED):
        return ConfigFormat.DEEPSPEED
    if has(_ACCELERATE):
        return ConfigFormat.ACCELERATE
    if any(isinstance(v, dict) and "_component_" in v for v in data.values()):
        return ConfigFormat.TORCHTUNE
    v1 = sorted(k for k in _LLAMAFACTORY_V1 if k in data)
    if v1 and isinstance(data.get("model"), str):
        raise VramplanError(
            f"is a LLaMA-Factory v1 config ({', '.join(v1)}; USE_V1=1, llamafactory==0.9.5 llamafactory/v1), "
            "whose own training loop vramplan does not model; give MODEL and flags (--method, --lora-r, "
            "--batch-size, --seq-len, --fsdp) for the run, or a v0 config (finetuning_type, stage)",
            f"--config {path}",
        )
    if has(_AXOLOTL):
        return ConfigFormat.AXOLOTL
    if has(_LLAMAFACTORY) or (isinstance(data.get("template"), str) and "model_name_or_path" in data):
        return ConfigFormat.LLAMAFACTORY
    if has(_TRL):
        return ConfigFormat.TRL
    if has(_HF):
        return ConfigFormat.HF
    raise VramplanError(f"is not {_ALLOWED}", f"--config {path}")
