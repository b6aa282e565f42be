"""Plot where the memory goes for the standard strategies on two 24 GB cards.

Run: python examples/plot_breakdown.py [OUT.png|OUT.svg]   (default: a file in a temp dir)
The command line does the same: vramplan plot breakdown llama-70b --gpus 2x24GB -o OUT.png
"""

import sys
import tempfile
from pathlib import Path

import vramplan
from vramplan.units import GiB

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "breakdown.png"

# all strategies side by side (pass method=... and other setup fields for one configuration)
fig = vramplan.plot_breakdown("llama-70b", gpus="2x24GB", path=out, host_ram=128 * GiB)
print(f"wrote {out} ({out.stat().st_size // 1024} KiB, {len(fig.axes[0].get_yticklabels())} configurations)")

# one configuration: the Answer.AI-style QLoRA + FSDP + CPU offload recipe
one = out.with_name(out.stem + "-qlora" + out.suffix)
vramplan.plot_breakdown(
    "llama-70b",
    gpus="2x24GB",
    path=one,
    host_ram=128 * GiB,
    method="qlora",
    lora_r=64,
    fsdp=2,
    cpu_offload=True,
    gradient_checkpointing=True,
    batch_size=2,
)
print(f"wrote {one}")
