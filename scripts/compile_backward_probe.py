"""A compiled decoder layer's backward working set next to the eager one, on the CPU.

usage: python scripts/compile_backward_probe.py MODE COMPILED CKPT FFN ADAPTERS
       MODE full|frozen|lora, COMPILED c|e, CKPT k|n (checkpointed or not), FFN the
       intermediate size, ADAPTERS bf16|fp32 (LoRA only)      (a minute: inductor compiles)

--compile models a full fine-tune's compiled layer saves without checkpointing
(memory/compile.py), not its backward's working set, which stays the eager layer's
(layer.LayerPoints): an upper bound for a full layer (full e/c n 768: 6.00 / 4.50), not for a
LoRA one (wider compiled: LoRA layers stay eager; docs/memory-model.md, "torch.compile").
This measures the gap: one transformers LlamaDecoderLayer (h 256, GQA 8/2,
SDPA, bf16) at 2 x 256 tokens, peft LoRA r16 on every Linear, under the allocation tracer;
printed in units of N·h·2 bytes: the live bytes at the end of forward (weights, the layer's
input, output and its grad, what it saved) and how far the backward's peak rises above them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

B, S, H = 2, 256, 256


def _layer(mode: str, compiled: bool, ffn: int, adapters: str):
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=H, intermediate_size=ffn, num_attention_heads=8, num_key_value_heads=2, vocab_size=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16)
    for p in layer.parameters():
        p.requires_grad_(mode == "full")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        holder = torch.nn.ModuleDict({"l": layer})
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        layer = get_peft_model(holder, LoraConfig(r=16, target_modules=targets, lora_dropout=0.0)).base_model.model.l
        for name, p in layer.named_parameters():
            if "lora" in name and adapters == "bf16":
                p.data = p.data.to(torch.bfloat16)
    if compiled:
        layer.compile(backend="inductor")
    return layer, LlamaRotaryEmbedding(cfg)


def probe(mode: str, compiled: bool, ckpt: bool, ffn: int, adapters: str) -> tuple[float, float]:
    import torch
    from torch.utils.checkpoint import checkpoint

    from vramplan.verify.cputrace import AllocationTrace

    layer, rotary = _layer(mode, compiled, ffn, adapters)
    pos = torch.arange(S).unsqueeze(0)

    def run(x, emb):
        return layer(x, position_embeddings=emb, attention_mask=None, position_ids=pos)

    with AllocationTrace() as trace:
        for step in range(3):  # step 0 compiles; steps 1 and 2 run the compiled graphs
            x = torch.randn(B, S, H, dtype=torch.bfloat16, requires_grad=True)
            emb = rotary(x, pos)
            with trace.phase("forward", step):
                out = checkpoint(run, x, emb, use_reentrant=False) if ckpt else run(x, emb)
                out = out[0] if isinstance(out, tuple) else out
                grad = torch.ones_like(out)
            with trace.phase("backward", step):
                out.backward(grad)
            del out, x, grad
    unit = B * S * H * 2
    fwd = next(p for p in trace.phases() if p.name == "forward" and p.step == 2)
    bwd = next(p for p in trace.phases() if p.name == "backward" and p.step == 2)
    return fwd.end_bytes / unit, (bwd.peak_bytes - fwd.end_bytes) / unit


def main() -> int:
    mode, compiled, ckpt, ffn, adapters = sys.argv[1:6]
    end, above = probe(mode, compiled == "c", ckpt == "k", int(ffn), adapters)
    print(f"{' '.join(sys.argv[1:6])}: end of forward {end:6.2f}   backward peak above it {above:6.2f} (x N·h·2 B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
