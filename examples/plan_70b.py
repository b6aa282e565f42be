"""Plan Llama-2-70B training on two 24 GB cards with the Python API (offline, a few seconds).

python examples/plan_70b.py
"""

import vramplan
from vramplan.units import GiB

df = vramplan.plan("llama-70b", gpus="2x24GB", host_ram="128GB", top=5)
print(f"{df.attrs['model']} on {df.attrs['gpus']}: {df.attrs['evaluated']:,} points searched")
print(f"recommended: {df.iloc[0]['label']} - {df.attrs['reason']}\n")
show = df[
    ["label", "micro_batch", "seq_len", "tokens_per_s", "per_gpu_bytes", "host_ram_bytes", "headroom_bytes"]
].copy()
for col in ("per_gpu_bytes", "host_ram_bytes", "headroom_bytes"):
    show[col.replace("_bytes", "_gib")] = (show.pop(col) / GiB).round(2)
print(show.round({"tokens_per_s": 0}).to_string(index=False))
