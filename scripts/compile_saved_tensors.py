"""List what one decoder layer saves for backward, eager or compiled, on the CPU.

usage: python scripts/compile_saved_tensors.py c|e      (a minute when inductor compiles)

The source of memory/compile.py's per-tensor rule for a compiled full fine-tune: one
transformers LlamaDecoderLayer (h 256, ffn 768, GQA 8/2, SDPA, bf16, weights trained) at
2 x 256 tokens, `.compile()`d as torchtune's compile_model does (c) or eager (e); a warm-up
step compiles, then a saved_tensors_hooks pack hook lists every saved tensor of the next
forward (dtype, shape, bytes per token), each storage once, the weights left out; the total in
units of N·h·2 bytes. torch 2.13: compiled 15.70, eager 22.70 (docs/memory-model.md,
"torch.compile").
"""

from __future__ import annotations

import sys

B, S, H, F = 2, 256, 256, 768


def main() -> int:
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=H, intermediate_size=F, num_attention_heads=8, num_key_value_heads=2, vocab_size=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16)
    if sys.argv[1:] == ["c"]:
        layer.compile(backend="inductor")
    rotary, pos = LlamaRotaryEmbedding(cfg), torch.arange(S).unsqueeze(0)
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, tuple] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            saved[ptr] = (t.dtype, tuple(t.shape), t.untyped_storage().nbytes())
        return t

    for listed in (False, True):
        x = torch.randn(B, S, H, dtype=torch.bfloat16, requires_grad=True)
        emb = rotary(x, pos)
        if listed:  # the warm-up step compiles outside the hooks
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = layer(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
        else:
            out = layer(x, position_embeddings=emb, attention_mask=None, position_ids=pos)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    n = B * S
    for dtype, shape, nbytes in saved.values():
        print(f"{str(dtype):16s} {str(shape):20s} {nbytes / n:8.1f} B/token")
    print(f"total {sum(b for *_, b in saved.values()) / (n * H * 2):.2f} x N·h·2 bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
