"""What a torch.compile'd decoder layer saves for backward next to the eager one, on the CPU.

usage: python scripts/compile_layer_probe.py      (a minute or two: inductor compiles 2 graphs)

--compile models the compiled chunked loss, not the compiled layers (docs/memory-model.md,
"torch.compile"): the estimate keeps the eager layer's saved tensors, an upper bound. This
probe measures how far above: one transformers LlamaDecoderLayer (h 256, ffn 1024, GQA 8/2,
SDPA, bf16) at 2 x 512 tokens, eager and after `.compile()` (what torchtune's compile_model
does to each layer), its weights trained or frozen, under the allocation tracer
(vramplan/verify/cputrace.py). Printed in units of N·h·2 bytes (one bf16 hidden state): the
live bytes at the end of forward (the layer's input and output, 2 units, plus what it saved)
and the backward's peak.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

B, S, H, F = 2, 512, 256, 1024


def _layer(compiled: bool, trained: bool):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=H, intermediate_size=F, num_attention_heads=8, num_key_value_heads=2, vocab_size=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16)
    for p in layer.parameters():
        p.requires_grad_(trained)
    if compiled:
        layer.compile(backend="inductor")
    return layer, LlamaRotaryEmbedding(cfg)


def probe(compiled: bool, trained: bool) -> tuple[float, float]:
    import torch

    from vramplan.verify.cputrace import AllocationTrace

    layer, rotary = _layer(compiled, trained)
    pos = torch.arange(S).unsqueeze(0)
    with AllocationTrace() as trace:
        for step in range(3):  # step 0 compiles; steps 1 and 2 run the compiled graphs
            x = torch.randn(B, S, H, dtype=torch.bfloat16, requires_grad=True)
            emb = rotary(x, pos)
            with trace.phase("forward", step):
                out = layer(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
                out = out[0] if isinstance(out, tuple) else out
            with trace.phase("backward", step):
                out.sum().backward()
            del out, x
    unit = B * S * H * 2
    fwd = next(p for p in trace.phases() if p.name == "forward" and p.step == 2)
    bwd = next(p for p in trace.phases() if p.name == "backward" and p.step == 2)
    return fwd.end_bytes / unit, bwd.peak_bytes / unit


def main() -> int:
    for trained in (True, False):
        for compiled in (False, True):
            end, peak = probe(compiled, trained)
            what = ("compiled" if compiled else "eager") + (", trained" if trained else ", frozen")
            print(f"{what:20s} end of forward {end:6.2f}   backward peak {peak:6.2f}   (x N·h·2 bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
