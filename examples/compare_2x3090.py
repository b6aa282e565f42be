"""Which training strategy fits two RTX 3090s? The same comparison as
`vramplan estimate MODEL --gpus 2xrtx-3090`, from Python.

Run: python examples/compare_2x3090.py [MODEL]   (default llama-3.1-8b)
"""

import sys

import vramplan
from vramplan.hardware import parse_gpus
from vramplan.strategies import compare
from vramplan.units import GiB

model = sys.argv[1] if len(sys.argv) > 1 else "llama-3.1-8b"
gpus = parse_gpus("2xrtx-3090")
spec = vramplan.load_model(model)

# batch and sequence apply to every strategy; the host RAM decides the offload verdicts
rows = compare(spec, gpus, {"batch_size": 1, "seq_len": 2048}, host_ram=64 * GiB)

print(f"{spec.name} on {gpus.count}x {gpus.profile.display_name}, batch 1 x 2048 tokens, 64 GiB host RAM")
print(f"  {'strategy':30s} {'GiB/GPU':>8s} {'host GiB':>9s}  verdict")
for row in rows:
    e = row.estimate
    verdict = "fits" if e.fits else ("host RAM short" if e.fits_gpu else "too big")
    mark = "*" if row.recommended else " "
    print(f"{mark} {row.label:30s} {e.per_gpu.total_bytes / GiB:8.2f} {e.host_ram_bytes / GiB:9.1f}  {verdict}")

best = next((r for r in rows if r.recommended), None)
print(f"recommended: {best.label} ({best.reason})" if best else "nothing fits: try more GPUs or a shorter sequence")
