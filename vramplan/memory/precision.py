"""Precision: the dtype dense weights are held in (--model-dtype, prepare_model_for_kbit_training's
upcast), whether autocast runs over an fp32 or a bf16 stream, and fp16's GradScaler."""

from __future__ import annotations

from vramplan.memory.accelerate import upcasts_trainable
from vramplan.memory.storage import BLOCK
from vramplan.setup import AdapterDtype, ModelDtype, Precision, Quant, SavedModule, TrainingSetup


def kbit_upcast(setup: TrainingSetup) -> bool:
    """prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not a
    bitsandbytes Params4bit to fp32 (embeddings, norms, lm_head, biases; a non-quantized
    LoRA base whole), except on a model transformers quantized with hqq (or gptq, aqlm, eetq,
    torchao), which it leaves alone. peft==0.21.2 utils/other.py:184-209. [CPU trace: build]"""
    return setup.kbit_prep and setup.lora_like and setup.quant != Quant.HQQ4


def dense_weight_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of a dense (not 4-bit, not adapter) parameter: the loading dtype
    (--model-dtype; fp32 masters under mixed by default), fp32 after kbit_upcast, and fp32 for
    a full fine-tune under accelerate's FSDP2 (its trainable parameters: memory/accelerate.py)."""
    if kbit_upcast(setup) or (upcasts_trainable(setup) and not setup.lora_like):
        return 4
    return setup.weight_dtype.bytes


def upcast_roots(setup: TrainingSetup) -> bool:
    """axolotl's full fine-tune outside FSDP keeps embed_tokens, lm_head and every `norm` module in
    fp32 over the bf16-loaded model: _configure_embedding_dtypes casts them to fp32 and casts them
    back only for an adapter, FSDP, an attention that needs it (not sdpa/eager) or CCE
    (axolotl==0.19.0 loaders/model.py:435-490, 1153-1175; utils/schemas/config.py:1517-1522).
    Each becomes an fp32 parameter (parameters.Param.upcast: its grad and AdamW states fp32 too);
    the fp32 embedding makes the residual stream fp32 (fp32_stream_autocast) and autocast caches
    lm_head's bf16 cast (autocast.cast_cache). [CPU trace: axolotl-full-fp32-roots*]"""
    return setup.fp32_embeddings_norms and setup.weight_dtype != ModelDtype.FP32


def embedding_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of the input embedding the step runs: peft's modules_to_save copy when
    the framework cast it (LLaMA-Factory's fp32 cast of every trainable parameter), axolotl's
    fp32 upcast, else the dense weights' dtype."""
    if upcast_roots(setup):
        return 4
    cast = setup.modules_to_save_dtype
    if setup.lora_like and SavedModule.EMBED_TOKENS in setup.modules_to_save and cast is not None:
        return cast.bytes
    return dense_weight_bytes(setup)


def frozen_fp32_autocast(setup: TrainingSetup) -> bool:
    """autocast over fp32 dense weights: each frozen one is cast to bf16 at every call."""
    return setup.autocast and dense_weight_bytes(setup) == 4


def fp32_stream_autocast(setup: TrainingSetup) -> bool:
    """autocast over fp32 weights (masters, or the embedding kbit_upcast made fp32): the
    embedding's output is fp32, residual adds are not autocast ops, so the stream stays fp32
    and each Linear casts its own half copy. Over bf16 weights (--model-dtype bf16: the HF
    Trainer's bf16=True on a bf16-loaded model, axolotl, Unsloth) a cast of a bf16 tensor to
    bf16 is a no-op (ATen autocast_mode.cpp cached_cast) and the stream stays bf16."""
    # an fp32 embedding copy over bf16 weights (LLaMA-Factory's cast modules_to_save) makes the
    # stream fp32 from the embedding on: residual adds keep fp32, RMSNorm returns its weight
    # times the fp32 input (transformers LlamaRMSNorm.forward) [CPU trace: lora-modules-to-save-fp32-copies]
    return frozen_fp32_autocast(setup) or (setup.autocast and embedding_bytes(setup) == 4)


def trained_layers_fp32(setup: TrainingSetup) -> bool:
    """--train-layers-dtype fp32 under autocast over bf16 weights (LLaMA-Factory's freeze tuning
    without pure_bf16): a trained layer's RMSNorm multiplies its fp32 weight by the bf16
    normalized input (transformers LlamaRMSNorm.forward: ``self.weight * hidden_states.to(input_dtype)``),
    so the norm's output is fp32 and each Linear reading it casts its own bf16 copy, as over an
    fp32 stream; the residual stream, and what the norms save, stay bf16. [CPU trace: the freeze-* cases]"""
    return (
        setup.autocast
        and setup.train_layers is not None
        and setup.train_layers_dtype == AdapterDtype.FP32
        and not fp32_stream_autocast(setup)
    )


# torch.amp.GradScaler (torch==2.13 torch/amp/grad_scaler.py): _lazy_init_scale_growth_tracker
# makes _scale (fp32) and _growth_tracker (int32), 0-d tensors on the device, kept for the run
# (:173-180); unscale_ makes found_inf (fp32 0-d, kept per device until update()) and
# inv_scale = _scale.double().reciprocal().float() (a float64 temporary, then fp32) (:340-356).
# _amp_foreach_non_finite_check_and_unscale_ unscales the grads in place (:246-300): no copy.
GRAD_SCALER_STATE_TENSORS = 2
GRAD_SCALER_STEP_TENSORS = 3  # found_inf, inv_scale and its float64 temporary


def grad_scaler_state(setup: TrainingSetup) -> int:
    """Persistent bytes of fp16's GradScaler: two 0-d tensors, one allocator block each."""
    return GRAD_SCALER_STATE_TENSORS * BLOCK if setup.precision == Precision.FP16 else 0


def grad_scaler_step(setup: TrainingSetup) -> int:
    """What unscale_ adds at the optimizer step: found_inf and inv_scale (with its float64
    temporary), one block each."""
    return GRAD_SCALER_STEP_TENSORS * BLOCK if setup.precision == Precision.FP16 else 0


FP16_NOTE = (
    "--precision fp16: fp16 autocast and the GradScaler are modelled from source, not measured "
    "(torch==2.13 torch/amp/grad_scaler.py; the same 2-byte activations as bf16 autocast)"
)
DORA_NOTE = (
    "DoRA: each adapted Linear's weight norm and per-token working set (the products with the "
    "magnitude, its grad before the reduction over tokens; under checkpointing the recompute) rest "
    "on the CPU trace of peft==0.21.2 (docs/cpu-trace.md), not on a GPU measurement"
)


def precision_notes(setup: TrainingSetup) -> list[str]:
    """What the estimate says about the parts of these knobs no trace checks."""
    notes = [FP16_NOTE] if setup.precision == Precision.FP16 else []
    if setup.dora and setup.lora_like:
        notes.append(DORA_NOTE)
    return notes


__all__ = [
    "ModelDtype",
    "dense_weight_bytes",
    "embedding_bytes",
    "frozen_fp32_autocast",
    "fp32_stream_autocast",
    "grad_scaler_state",
    "grad_scaler_step",
    "kbit_upcast",
    "precision_notes",
    "trained_layers_fp32",
    "upcast_roots",
]


def head_compute_bytes(setup: TrainingSetup) -> int:
    """The dtype an output head's product is in (lm_head's, a reward model's score head): bf16/fp16
    under autocast or bf16 weights, fp32 for fp32 weights without autocast."""
    return 2 if setup.precision != Precision.BF16 or setup.weight_dtype == ModelDtype.BF16 else 4
