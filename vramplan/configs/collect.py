"""The bookkeeping a reader does while it walks a file: fields set, keys used, checks."""

from __future__ import annotations

import re
from typing import Any

from vramplan.configs.reading import (
    ConfigFormat,
    ConfigReading,
    Distributed,
    Reference,
    Unmodelled,
    Used,
)
from vramplan.errors import VramplanError
from vramplan.setup import SavedModule, Stack, saved_modules

# Keys every trainer has that do not change the memory of a step: not reported as unknown.
NOT_MEMORY = frozenset(
    {
        "output_dir",
        "learning_rate",
        "lr",
        "lr_scheduler",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_ratio",
        "warmup_steps",
        "weight_decay",
        "num_epochs",
        "num_train_epochs",
        "max_steps",
        "epochs",
        "seed",
        "data_seed",
        "logging_steps",
        "logging_dir",
        "logging_first_step",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "saves_per_epoch",
        "evals_per_epoch",
        "eval_steps",
        "eval_strategy",
        "evaluation_strategy",
        "report_to",
        "run_name",
        "wandb_project",
        "wandb_entity",
        "wandb_watch",
        "wandb_name",
        "wandb_log_model",
        "hub_model_id",
        "push_to_hub",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "dataset",
        "datasets",
        "dataset_name",
        "dataset_prepared_path",
        "val_set_size",
        "val_size",
        "max_samples",
        "template",
        "chat_template",
        "special_tokens",
        "tokenizer_type",
        "tokenizer_name_or_path",
        "model_type",
        "trust_remote_code",
        "do_train",
        "do_eval",
        "plot_loss",
        "save_only_model",
        "ddp_timeout",
        "preprocessing_num_workers",
        "dataloader_num_workers",
        "overwrite_cache",
        "tf32",
        "max_grad_norm",
        "gradient_clipping",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "lora_alpha",
        "lora_model_dir",
        "env",
        "per_device_eval_batch_size",
        "eval_sample_packing",
        "loss_watchdog_threshold",
        "loss_watchdog_patience",
        "save_first_step",
        "strict",
        "shuffle",
        "log_every_n_steps",
        "log_peak_memory_stats",
        "metric_logger",
        "profiler",
        "checkpointer",
        "device",
        "clip_grad_norm",
        "max_steps_per_epoch",
        "save_adapter_weights_only",
        "low_cpu_ram",
        "eval_dataset",
        "remove_unused_columns",
        "dataset_text_field",
        "dataset_config",
        "dataset_train_split",
        "dataset_test_split",
        "gradient_checkpointing_kwargs",
        "save_safetensors",
        "bf16_full_eval",
        "fp16_full_eval",
        # seen often in the frameworks' examples (scripts/config_sweep.py): logging, prompt
        # masking, batching order, DDP's unused-parameter search, schedules; evaluation runs
        # forward passes without grad between steps, narrower than the step, like
        # per_device_eval_batch_size above
        "log_level",
        "eot_tokens",
        "train_on_inputs",
        "group_by_length",
        "ddp_find_unused_parameters",
        "cosine_min_lr_ratio",
        "cosine_constant_lr_ratio",
        "eval_batch_size",
        "batch_size_val",
        "dataset_val",
        "run_val_every_n_steps",
    }
)


class Collector:
    """Accumulates one reader's result; its checks raise one-line errors naming file and key."""

    def __init__(self, path: str, data: dict):
        self.path, self.data = path, data
        self.fields: dict[str, Any] = {}
        self.used: list[Used] = []
        self.skipped: list[Unmodelled] = []
        self.refs: list[Reference] = []
        self.seen: set[str] = set()
        self.distributed = Distributed.NONE
        self.world: int | None = None

    # ---- access
    def get(self, key: str, default: Any = None, data: dict | None = None) -> Any:
        """A value, None-as-unset (YAML's blank ``key:`` means the framework's default)."""
        source = self.data if data is None else data
        if data is None:
            self.seen.add(key)
        value = source.get(key)
        return default if value is None else value

    def set(self, key: str, field: str, value: Any, note: str = "") -> None:
        self.fields[field] = value
        self.used.append(Used(key, field, value, note))
        self.seen.add(key.split(".")[0])

    def record(self, key: str, what: str, value: Any, note: str) -> None:
        """A key's use that sets no setup field (the model a builder stands for), said like one."""
        self.used.append(Used(key, what, value, note))
        self.seen.add(key.split(".")[0])

    def unmodelled(self, key: str, why: str) -> None:
        self.skipped.append(Unmodelled(key, why))
        self.seen.add(key.split(".")[0])

    def reference(self, key: str, fmt: ConfigFormat, value: Any) -> None:
        self.refs.append(Reference(key, fmt, value))
        self.seen.add(key.split(".")[0])

    # ---- checks
    def fail(self, key: str, allowed: str, value: Any) -> VramplanError:
        return VramplanError(f"must be {allowed}, got {value!r}", f"{self.path}: {key}")

    def pos_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, "a positive integer", value)
        return value

    def flag(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def prob(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise self.fail(key, "a number in [0, 1)", value)
        return float(value)

    def choice(self, key: str, value: Any, table: dict) -> Any:
        """Look ``value`` up in ``table``; strings match without regard to case."""
        lookup = {k.lower() if isinstance(k, str) else k: v for k, v in table.items()}
        norm = value.lower() if isinstance(value, str) else value
        # true/false only where the table has them (True == 1 would otherwise match an int key)
        bool_ok = not isinstance(norm, bool) or any(k is norm for k in table)
        if not bool_ok or isinstance(norm, (list, dict)) or norm not in lookup:
            raise self.fail(key, "one of " + ", ".join(str(k) for k in table), value)
        return lookup[norm]

    def mapping(self, key: str, value: Any) -> dict:
        """A nested section: absent/blank is empty, anything but a mapping is an error."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "a mapping of keys to values", value)
        return value

    def names(self, key: str, value: Any, sep: str | None = None) -> list[str]:
        """A list of names, or one string (split on ``sep`` when given)."""
        if isinstance(value, str):
            return [v.strip() for v in value.split(sep)] if sep else [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, "a name or a list of names", value)
        return value

    def set_modules_to_save(self, key: str, sep: str | None = None, note: str = "") -> None:
        """peft modules_to_save: embed_tokens and lm_head (by their last dotted part, as peft
        matches names) are modelled; other modules (a norm, a classifier head) are named as not."""
        value = self.get(key)
        if not value:
            return
        names = self.names(key, value, sep)
        allowed = {m.value for m in SavedModule}
        known = [n for n in names if n.rsplit(".", 1)[-1] in allowed]
        others = [n for n in names if n.rsplit(".", 1)[-1] not in allowed]
        if others:
            self.unmodelled(key, f"{', '.join(others)}: only embed_tokens and lm_head copies are modelled")
        if known:
            self.set(key, "modules_to_save", saved_modules(known, key), note)

    def model(self, key: str) -> str | None:
        value = self.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, "a Hugging Face id or a local path", value)
        return value

    def set_int(self, key: str, field: str, note: str = "") -> None:
        value = self.get(key)
        if value is not None:
            self.set(key, field, self.pos_int(key, value), note)

    def set_flag(self, key: str, field: str, note: str = "", invert: bool = False) -> None:
        value = self.get(key)
        if value is not None:
            self.set(key, field, self.flag(key, value) != invert, note)

    def finish(
        self, fmt: ConfigFormat, stack: Stack | None, model: str | None, known: frozenset = frozenset()
    ) -> ConfigReading:
        unknown = sorted(k for k in self.data if k not in self.seen and k not in known and k not in NOT_MEMORY)
        return ConfigReading(
            format=fmt,
            stack=stack,
            model=model,
            fields=dict(self.fields),
            used_keys=tuple(self.used),
            unmodelled=tuple(self.skipped),
            unknown=tuple(unknown),
            source_files=(self.path,),
            distributed=self.distributed,
            world=self.world,
            references=tuple(self.refs),
        )


def set_regex_targets(c: Collector, key: str, pattern: str) -> None:
    """target_modules as one string: peft matches it as a regular expression in full against
    each module's name (peft==0.21.2 tuners/tuners_utils.py:2370-2371); matched against the
    model's Linears once it is known (memory/lora.regex_target_names)."""
    try:
        re.compile(pattern)
    except re.error:
        raise c.fail(key, "a list of module names, or one string that is a regular expression", pattern) from None
    c.set(key, "lora_target_regex", pattern, "one string: a regular expression peft matches in full against names")
