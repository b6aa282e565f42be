"""Estimate a model that is not a preset: write its config.json and point vramplan at it.

The architecture is built from the config on the meta device (no weights, no download);
the analysis is cached, so a second run is fast. Run: python examples/estimate_custom_config.py
"""

import json
import tempfile
from pathlib import Path

import vramplan
from vramplan.units import GiB

# A small Llama-style model: 8 layers of width 1024 (about 0.2B parameters).
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

with tempfile.TemporaryDirectory() as tmp:
    config = Path(tmp) / "config.json"
    config.write_text(json.dumps(CONFIG))

    spec = vramplan.load_model(str(config))
    print(f"{spec.params_total / 1e6:.0f}M parameters, {spec.num_layers} layers")

    est = vramplan.estimate(
        str(config), gpus="rtx-4090", method="full", batch_size=8, seq_len=2048, gradient_checkpointing=True
    )
    verdict = "fits" if est.fits else "does not fit"
    print(
        f"full fine-tune, 8x2048 tokens, checkpointing: {est.per_gpu.total_bytes / GiB:.2f} GiB per GPU "
        f"on {est.gpu_name} ({verdict}, headroom {est.headroom_bytes / GiB:.2f} GiB)"
    )
    # one row per category; bytes are integers, gib is for reading
    print(est.to_frame()[["category", "gib", "share"]].round(3).to_string(index=False))
