"""Parameters: every tensor the run holds, how it is stored, whether it trains, and the
bytes of its weights and gradients. The 4-bit storage is in quantization.py, the
adapters' in lora.py, the optimizer states in optimizers.py, sharding in fsdp.py."""

from __future__ import annotations

from typing import cast

from vramplan.categories import Category as C
from vramplan.memory.freeze import layer_trains, trained_dtype_bytes
from vramplan.memory.lora import adapter_bytes, lora_targeted
from vramplan.memory.precision import dense_weight_bytes
from vramplan.memory.quantization import quantized_store
from vramplan.memory.reward import is_reward, score_params
from vramplan.memory.storage import alloc
from vramplan.memory.types import SAVED_COPY_ROLES, LinearRole, Param, ParamKind
from vramplan.model_spec import LayerSpec, ModelSpec
from vramplan.setup import Method, Quant, SavedModule, TrainingSetup


def _layer_params(i: int, layer: LayerSpec, setup: TrainingSetup, trains: bool) -> list[Param]:
    full = setup.method in (Method.FULL, Method.GALORE) and trains
    galore = setup.method == Method.GALORE
    base_kind = ParamKind(cast(Quant, setup.quant).value) if setup.method == Method.QLORA else ParamKind.DENSE
    out: list[Param] = []
    for lin in layer.linears:
        # reference step: GaLore projects 2-D weights inside attention and MLP blocks
        proj = (lin.out_features, lin.in_features) if galore and lin.role != LinearRole.OTHER else None
        out.append(Param(lin.numel, lin.out_features, base_kind, full, i, proj, lin.role))
        if lin.bias:
            out.append(Param(lin.out_features, lin.out_features, ParamKind.DENSE, full, i, role=lin.role))
        if lora_targeted(lin, setup):
            out.append(Param(setup.lora_r * lin.in_features, setup.lora_r, ParamKind.LORA, True, i, role=lin.role))
            out.append(Param(lin.out_features * setup.lora_r, lin.out_features, ParamKind.LORA, True, i, role=lin.role))
            if setup.dora:  # lora_magnitude_vector (peft tuners/lora/dora.py:129)
                out.append(Param(lin.out_features, lin.out_features, ParamKind.LORA, True, i, role=lin.role))
    if layer.experts:
        for _, shape in layer.experts.tensors:
            n = shape[0] * shape[1] * shape[2]
            out.append(Param(n, shape[0], ParamKind.DENSE, full, i, shape=tuple(shape)))
    for n in layer.norm_numels:
        out.append(Param(n, n, ParamKind.DENSE, full, i, upcast=setup.fp32_embeddings_norms))
    for n in layer.other_numels:
        out.append(Param(n, n, ParamKind.DENSE, full, i))
    return out


def parameters(spec: ModelSpec, setup: TrainingSetup) -> list[Param]:
    """Every parameter tensor with how it is stored and whether it trains."""
    # --train-layers: the root modules freeze with the prefix (memory/freeze.py)
    full = setup.method in (Method.FULL, Method.GALORE) and setup.train_layers is None
    out: list[Param] = []
    n = len(spec.layers)
    for i, layer in enumerate(spec.layers):
        out.extend(_layer_params(i, layer, setup, layer_trains(i, n, setup)))
    dense, up = ParamKind.DENSE, setup.fp32_embeddings_norms  # axolotl's fp32 roots and norms (precision.py)
    out.append(Param(spec.embed_numel, spec.vocab, dense, full, None, upcast=up))
    if is_reward(setup):  # a sequence-classification model: a score head in lm_head's place
        out.extend(score_params(spec, setup))
    elif spec.lm_head_numel:
        out.append(Param(spec.lm_head_numel, spec.vocab, dense, full, None, upcast=up))
    if spec.final_norm_numel:
        out.append(Param(spec.final_norm_numel, spec.final_norm_numel, dense, full, None, upcast=up))
    if spec.other_numel:
        out.append(Param(spec.other_numel, spec.other_numel, dense, full, None))
    if spec.idle_numel:  # never in the text step's graph: no .grad, so AdamW makes no state for it
        out.append(Param(spec.idle_numel, spec.idle_numel, dense, False, None))
    return out + saved_module_copies(spec, setup)


def saved_module_copies(spec: ModelSpec, setup: TrainingSetup) -> list[Param]:
    """peft's modules_to_save (LoRA/QLoRA): ModulesToSaveWrapper keeps the original frozen and
    trains a deepcopy of it (peft==0.21.2 utils/other.py:652-667), in the original's dtype:
    cast_adapter_dtype upcasts only BaseTunerLayer adapters (tuners/tuners_utils.py:2729-2731), so a
    bf16 copy stays bf16 and one made after prepare_model_for_kbit_training is fp32. A tied lm_head
    is copied too: its copy is a weight of its own, the original stays shared with the embedding.
    [CPU trace: lora-modules-to-save*]"""
    if not setup.lora_like:
        return []
    rows = {
        SavedModule.EMBED_TOKENS: (spec.embed_numel, LinearRole.EMBED),
        SavedModule.LM_HEAD: (spec.lm_head_numel or spec.embed_numel, LinearRole.HEAD),
    }
    return [Param(rows[m][0], spec.vocab, ParamKind.DENSE, True, None, role=rows[m][1]) for m in setup.modules_to_save]


def saved_modules_note(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """What peft's modules_to_save copies cost, said in the estimate: their weights (their grads
    and optimizer states are in those categories)."""
    copies = saved_module_copies(spec, setup)
    if not copies:
        return []
    weights = sum(alloc(_dense_param_bytes(p, setup) * p.numel) for p in copies)
    names = ", ".join(m.value for m in setup.modules_to_save)
    return [
        f"modules_to_save ({names}): peft trains a copy of each beside the frozen original, "
        f"{weights / 2**30:.2f} GiB of weights plus their gradients and optimizer states "
        "(peft==0.21.2 ModulesToSaveWrapper; CPU trace: the `*-to-save*` cases)"
    ]


def upcast_note(spec: ModelSpec, setup: TrainingSetup) -> list[str]:
    """What axolotl's fp32 embeddings and norms cost, said in the estimate (precision.upcast_roots)."""
    if not setup.fp32_embeddings_norms or setup.weight_dtype.bytes == 4:
        return []
    extra = sum(2 * p.numel for p in parameters(spec, setup) if p.upcast)
    return [
        f"fp32 embed_tokens, lm_head and norms (axolotl's full fine-tune outside FSDP/DeepSpeed with sdpa/eager "
        f"attention; flash attention casts them back): {extra / 2**30:.2f} GiB more weights and as much more "
        "gradients than bf16, their optimizer states fp32, and an fp32 residual stream (axolotl==0.19.0 "
        "loaders/model.py:435-490; CPU-traced, not measured on a GPU)"
    ]


def dense_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of a dense parameter (precision.dense_weight_bytes)."""
    return dense_weight_bytes(setup)


def store(p: Param, setup: TrainingSetup, numel: int | None = None) -> dict[C, int]:
    """Bytes of one parameter (or a shard of `numel` elements of it) by category."""
    n = p.numel if numel is None else numel
    if p.kind == ParamKind.LORA:
        return {C.ADAPTERS: alloc(adapter_bytes(setup) * n)}
    if p.kind.quantized:
        return quantized_store(p.kind, n, p.dim0)
    return {C.WEIGHTS: alloc(_dense_param_bytes(p, setup) * n)}


def grad_bytes(p: Param, setup: TrainingSetup) -> int:
    """Bytes per element of a parameter's .grad (0 when it does not train): the
    parameter's own dtype (AccumulateGrad casts to it; the adapters': lora.adapter_bytes)."""
    if not p.trainable:
        return 0
    return adapter_bytes(setup) if p.kind == ParamKind.LORA else _dense_param_bytes(p, setup)


def _dense_param_bytes(p: Param, setup: TrainingSetup) -> int:
    """A dense parameter's bytes per element; a modules_to_save copy is in its original's dtype
    unless the framework casts every trainable parameter (--modules-to-save-dtype: TRL on a
    quantized base to bf16, trl==1.16.0 sft_trainer.py:908-911; LLaMA-Factory to fp32,
    llamafactory==0.9.5 model/adapter.py:284-286), and axolotl's upcast ones are fp32."""
    if p.role in SAVED_COPY_ROLES and setup.modules_to_save_dtype is not None:
        return setup.modules_to_save_dtype.bytes
    if p.upcast:  # axolotl's fp32 embeddings, lm_head and norms (precision.upcast_roots)
        return 4
    cast = trained_dtype_bytes(setup)  # --train-layers-dtype: the trained layers' cast (memory/freeze.py)
    if cast is not None and p.trainable and p.layer is not None:
        return cast
    return dense_bytes(setup)
