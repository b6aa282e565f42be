#!/usr/bin/env bash
# On the GPU machine, through the device tool's `run` with carry [".whl"] (scripts/device_wheels.sh
# fills it here first):
#   bash scripts/device_batch.sh calibrate [calibrate.py options]   # next cases, resumable
#   bash scripts/device_batch.sh tests                              # pytest -m gpu
#   bash scripts/device_batch.sh sequence                           # the dev cases in one process (issue 18)
# Installs the carried wheels under /tmp/site, records the machine and library versions,
# and copies every result to $OUT, which comes back. Calibration appends to
# tests/data/h100_verify.jsonl: cases already in the committed file are skipped, so
# commit what came back, then call again until no case is left.
set -uo pipefail
: "${OUT:?run on the device machine, where \$OUT is the folder that comes back}"
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing .whl/*.whl failed: run scripts/device_wheels.sh here and carry .whl"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
python3 - > "$OUT/versions.txt" <<'PY'
import importlib.metadata as md
for p in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "galore-torch", "hqq", "pydantic"):
    print(p, md.version(p))
PY
mode=${1:-calibrate}; shift || true
case "$mode" in
  calibrate)
    data=tests/data/h100_verify.jsonl
    python3 scripts/calibrate.py --out "$data" "$@" 2>&1 | tee "$OUT/calibrate.log"
    rc=${PIPESTATUS[0]}
    cp "$data" "$OUT/" 2>/dev/null
    exit "$rc" ;;
  tests)
    python3 -m pytest -m gpu -q -rs "$@" 2>&1 | tee "$OUT/pytest_gpu.log"
    exit "${PIPESTATUS[0]}" ;;
  sequence)
    python3 scripts/sequence_reserved.py --out "$OUT/h100_dev_sequence.jsonl" "$@" 2>&1 | tee "$OUT/sequence.log"
    exit "${PIPESTATUS[0]}" ;;
  *) echo "usage: bash scripts/device_batch.sh calibrate|tests|sequence [options]"; exit 2 ;;
esac
