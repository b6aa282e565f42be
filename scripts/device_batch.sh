#!/usr/bin/env bash
# On the GPU machine, through the device tool's `run` with carry [".whl"] (scripts/device_wheels.sh
# fills it here first):
#   bash scripts/device_batch.sh calibrate [calibrate.py options]   # next cases, resumable
#   bash scripts/device_batch.sh tests                              # pytest -m gpu
#   bash scripts/device_batch.sh sequence                           # the dev cases in one process (issue 18)
#   LEASE_S=540 bash scripts/device_batch.sh lease                  # a whole 15-minute lease, below
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
# trl==1.9.0 apart, for axolotl's DPO and GRPO cases (verify/losses.py _need_axolotl_trl)
if compgen -G ".whl/trl19/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/trl19 .whl/trl19/*.whl \
    && export VRAMPLAN_TRL19=/tmp/trl19
fi
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
  lease)
    # A whole lease in one call (issue 19), every result written to $OUT as it comes, so a run
    # stopped at its limit still returns what it measured: (a) the 8B QLoRA verify's wall time
    # and the out-of-memory test, each alone on the GPU; then, sharing it, the other GPU tests
    # and every calibration case (CORE, the capped edge, the CUDA-only kernels, the rest),
    # --jobs cases at a time while their estimated footprints fit (calibrate.py Batch).
    deadline=${LEASE_S:-540} start=$SECONDS
    left() { local l=$(( deadline - (SECONDS - start) )); echo $(( l > 40 ? l : 40 )); }
    TIMEFORMAT="wall %R s"
    { time timeout 150 python3 -m vramplan verify llama-3.1-8b --method qlora --gradient-checkpointing \
        --seq-len 2048 --format json --no-progress; } > "$OUT/verify8b.txt" 2>&1
    timeout 100 python3 -m pytest tests/test_verify_gpu.py -m gpu -q -rs --durations=0 -k oom_is_a_result \
      > "$OUT/pytest_gpu.log" 2>&1
    timeout $(( $(left) - 20 )) python3 -m pytest tests/test_verify_gpu.py -m gpu -q -rs --durations=0 \
      -k "not oom_is_a_result and not within_60" >> "$OUT/pytest_gpu.log" 2>&1 &
    # cases the first lease measured are skipped, except those to measure again and those whose
    # allocator event history is recorded (calibrate.py HISTORY_CASES, REMEASURE)
    OMP_NUM_THREADS=4 python3 scripts/calibrate.py --lease --jobs "${JOBS:-4}" --budget-s $(( $(left) - 15 )) \
      --skip-measured tests/data/h200_verify.jsonl --alloc-history "$OUT/history" \
      --out "$OUT/h200_verify.jsonl" --failure-log "$OUT/failures.log" "$@" > "$OUT/calibrate.log" 2>&1
    wait
    exit 0 ;;
  *) echo "usage: bash scripts/device_batch.sh calibrate|tests|sequence|lease [options]"; exit 2 ;;
esac
