"""Mixed precision under torch.autocast: the bf16 casts of fp32 weights it caches."""

from __future__ import annotations

from vramplan.memory.parameters import Param
from vramplan.memory.precision import fp32_stream_autocast
from vramplan.memory.storage import alloc
from vramplan.memory.types import ParamKind
from vramplan.setup import TrainingSetup


def cast_cache(params: list[Param], setup: TrainingSetup, vocab: int, trains_all: bool) -> int:
    """autocast caches bf16 casts of trainable fp32 weights; they are saved for backward
    (without checkpointing every layer's; with it only the root's lm_head). [cal]"""
    # bf16 weights (--model-dtype bf16): casting a bf16 tensor to bf16 is a no-op, nothing cached
    if not (fp32_stream_autocast(setup) and trains_all):
        return 0
    total = 0
    ckpt = setup.gradient_checkpointing
    for p in params:
        matrix = p.trainable and p.kind == ParamKind.DENSE and p.numel != p.dim0
        # in a layer, or lm_head (a root matrix of vocab rows; the embedding is not cast)
        cast = p.layer is not None or p.dim0 == vocab
        if matrix and (not ckpt or p.layer is None) and cast:
            total += alloc(2 * p.numel)
    return total
