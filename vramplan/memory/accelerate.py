"""accelerate's FSDP preparation, as the HF Trainer, TRL, axolotl and LLaMA-Factory reach it
with an fsdp_config (FSDP2 is transformers' default version): what it does to parameter dtypes
and sharding, beyond the units (fsdp.py).

accelerate==1.16.0 accelerate/utils/fsdp_utils.py:
  - :771-783: a frozen bitsandbytes Params4bit that is not floating point (the default
    bnb_4bit_quant_storage=uint8) goes into fully_shard's ignored_params (torch >= 2.7): it
    stays whole on every GPU and is never all-gathered. A floating storage (bf16) shards.
  - :798-806: under mixed precision (bf16=True) and when the model has no Params4bit, every
    trainable parameter is upcast to fp32 (fp32 masters; MixedPrecisionPolicy(param_dtype)
    casts for compute), so a bf16-loaded full fine-tune holds fp32 weights, grads and
    optimizer states, and bf16 adapters become fp32.
accelerate==1.16.0 accelerate/accelerator.py:1960-2010 (FSDP1): under mixed precision every
FSDP unit whose FlatParameter requires grad is upcast to fp32 ("we follow DeepSpeed's strategy
to hold the parameters in full precision"), 4-bit or not: a full fine-tune's units and the
adapters' own units (peft's fsdp_auto_wrap_policy); the frozen layer units stay.
accelerate==1.16.0 accelerate/utils/dataclasses.py:2009: the policy accelerate builds from
mixed_precision="bf16" is MixedPrecisionPolicy / MixedPrecision(param_dtype=bf16,
reduce_dtype=bf16): gradients are reduce-scattered in bf16. [modelled from source, not measured]
"""

from __future__ import annotations

from vramplan.setup import Method, Quant, QuantStorage, Stack, TrainingSetup

# The stacks that wrap FSDP2 with accelerate's fsdp2_prepare_model (HF Trainer, TRL, axolotl,
# LLaMA-Factory; torchtune and Answer.AI's train.py wrap it themselves).
ACCELERATE_STACKS = (Stack.HF_TRAINER, Stack.TRL, Stack.AXOLOTL, Stack.LLAMAFACTORY)


def accelerate_fsdp(setup: TrainingSetup) -> bool:
    """accelerate wraps the model in FSDP (an HF-based stack, either version)."""
    return setup.sharded and setup.stack in ACCELERATE_STACKS


def accelerate_fsdp2(setup: TrainingSetup) -> bool:
    """accelerate's fsdp2_prepare_model wraps the model (an HF-based stack on FSDP2)."""
    return accelerate_fsdp(setup) and setup.fsdp_version == 2


def _has_params4bit(setup: TrainingSetup) -> bool:
    return setup.method == Method.QLORA and setup.quant == Quant.NF4


def ignores_4bit(setup: TrainingSetup) -> bool:
    """The 4-bit base stays unsharded on every GPU (uint8 quant storage)."""
    return accelerate_fsdp2(setup) and _has_params4bit(setup) and setup.quant_storage_dtype == QuantStorage.UINT8


def upcasts_trainable(setup: TrainingSetup) -> bool:
    """Every trainable parameter is held in fp32 (bf16 mixed precision; FSDP2: no Params4bit)."""
    if not (accelerate_fsdp(setup) and setup.mixed_precision):
        return False
    return setup.fsdp_version == 1 or not _has_params4bit(setup)


def reduces_in_bf16(setup: TrainingSetup) -> bool:
    """accelerate's mixed precision policy reduces in the compute dtype (bf16), not fp32."""
    return accelerate_fsdp(setup) and setup.mixed_precision


def accelerate_note(setup: TrainingSetup) -> list[str]:
    """What accelerate's FSDP preparation changed in this estimate, said as modelled from source."""
    if not accelerate_fsdp(setup):
        return []
    done = []
    if upcasts_trainable(setup):
        done.append("trainable parameters held in fp32")
    if reduces_in_bf16(setup):
        done.append("gradients reduced in bf16")
    if ignores_4bit(setup):
        done.append("the uint8 4-bit base left unsharded on every GPU (--quant-storage bf16 shards it)")
    if not done:
        return []
    return [
        "accelerate's FSDP preparation: " + ", ".join(done) + " (modelled from source, not measured: "
        "accelerate==1.16.0 utils/fsdp_utils.py:771-806, accelerator.py:1960-2010, utils/dataclasses.py:2009)"
    ]
