#!/usr/bin/env bash
# Here (no GPU): fetch into .whl/ (git-ignored) the wheels the GPU machine lacks for
# `vramplan verify`: pydantic and its needs, bitsandbytes, galore-torch, torch-optimi,
# lomo-optim, adam-mini and apollo-torch (calibrate.py's StableAdamW, LOMO, Adam-mini and APOLLO cases),
# the losses' kernels and stacks (liger-kernel, cut-cross-entropy, trl, torchtune, unsloth-zoo), hqq (an sdist,
# built here into a pure-Python wheel) and termcolor. The machine's image already has torch,
# transformers, peft, accelerate, rich, pandas, matplotlib, nvidia-ml-py (device KINDS.md).
# About 52 MB: within the 64 MiB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
           bitsandbytes==0.50.2 galore-torch==1.0 termcolor==3.3.0 torch-optimi==0.3.3 lomo-optim==0.1.1 \
           adam-mini==1.1.1 apollo-torch==1.0.3 \
           liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 torchtune==0.6.1 unsloth-zoo==2026.10.9; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$pkg"
done
# axolotl's DPO and GRPO steps run trl==1.9.0 (axolotl 0.19.0's pin; its GRPO trainer imports requests):
# installed apart, under VRAMPLAN_TRL19 (device_batch.sh), for those cases' worker processes only
mkdir -p .whl/trl19
for pkg in trl==1.9.0 requests==2.34.2 urllib3==2.8.0 idna==3.21 certifi==2026.10.19.post1 \
           charset-normalizer==3.5.3; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl/trl19 "$pkg"
done
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" hqq==0.2.8.post1
python3 -m pip wheel -q --no-deps -w .whl "$tmp"/hqq-*.tar.gz
rm -rf "$tmp"
ls -la .whl
