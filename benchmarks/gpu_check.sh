#!/usr/bin/env bash
# GPU check: core equivalence tests and the scale benchmark on an NVIDIA GPU (~8 min at most).
#
# Usage (from anywhere; runs in the repository root):
#   bash benchmarks/gpu_check.sh                 # outputs under ${OUT:-/tmp/gpu_check}
#   OUT=/some/dir GPU_CHECK_BUDGET_S=420 bash benchmarks/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   # dry run of the steps on the CPU
#
# Needs Python with jax (CUDA build), flax, numpy, pytest, tqdm installed; gpfq_jax is
# imported from this checkout (PYTHONPATH). If jax has no GPU backend, the script tries
# `pip install "jax[cuda12]==<installed jax version>"` when nvidia-smi works and PyPI is
# reachable (GPU_CHECK_NO_INSTALL=1 forbids it); otherwise it prints why and exits 2.
# Steps, each with its own time limit:
#   1. tests (200 s):    pytest tests/test_gpfq.py tests/test_stats.py tests/test_baselines.py
#   2. resnet18 (150 s): scale.py part (d): ResNet-18, 224x224, 256 images, patch fraction 1.0
#   3. large (70 s):     scale.py part (c): 4096->4096 dense, 3x3x512->512 conv
#   4. memory (70 s):    scale.py part (b) at m = 2k, 8k (host peak RSS and GPU peak bytes)
#   5. dtype (45 s):     scale.py float32 vs float64 statistics on one 1024->1024 layer
# A step gets at most what is left of the budget (default 480 s); later ones are skipped
# once it is spent. CPU reference: step 1 takes ~2.3 CPU-minutes on this project's 2-core box.
# Then prints a summary table (step, exit code, seconds) and the benchmark tables.
# Files: $OUT/<step>.log, $OUT/scale_gpu.json, $OUT/summary.txt. Exit code: 0 if every
# step passed, 1 if any failed or timed out, 2 if no GPU backend.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
PY="${PYTHON:-python}"
DEVICE="${GPU_CHECK_DEVICE:-gpu}"   # "cpu": dry run of the same steps without a GPU
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
printf "%-10s %-6s %-8s %s\n" step rc seconds status > "$SUMMARY"
FAILED=0

remaining() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# step NAME LIMIT_S CMD...: run CMD with a time limit (capped by the remaining budget).
step() {
  local name=$1 limit=$2; shift 2
  local left; left=$(remaining)
  if (( left < 20 )); then
    printf "%-10s %-6s %-8s %s\n" "$name" - 0 "skipped (budget spent)" | tee -a "$SUMMARY"
    FAILED=1; return
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s) -> $OUT/$name.log"
  local s; s=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? status=ok
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; FAILED=1
  elif (( rc != 0 )); then status="FAILED"; FAILED=1; fi
  tail -n 5 "$OUT/$name.log" | tr '\r' '\n' | tail -n 5; echo
  printf "%-10s %-6s %-8s %s\n" "$name" "$rc" "$(( $(date +%s) - s ))" "$status" >> "$SUMMARY"
}

has_gpu() {
  timeout 120 "$PY" -c "import jax; d = jax.devices('gpu'); print(jax.__version__, d)" \
    > "$OUT/gpu_probe.log" 2>&1
}

echo "=== host"; (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  || echo "nvidia-smi not found") 2>&1 | tee "$OUT/nvidia_smi.txt"
if ! timeout 60 "$PY" -c "import jax, flax, numpy, pytest, tqdm, gpfq_jax" 2> "$OUT/imports.log"; then
  echo "ERROR: cannot import jax/flax/numpy/pytest/tqdm/gpfq_jax with $PY:"; tail -n 3 "$OUT/imports.log"
  exit 2
fi
if [[ "$DEVICE" == cpu ]]; then
  echo "GPU_CHECK_DEVICE=cpu: dry run on the CPU backend"
elif ! has_gpu; then
  echo "jax has no GPU backend:"; tail -n 2 "$OUT/gpu_probe.log"
  JAXVER=$("$PY" -c "import jax; print(jax.__version__)")
  if ! nvidia-smi > /dev/null 2>&1; then
    echo "nvidia-smi fails: no NVIDIA GPU/driver visible, so not installing jax[cuda12]."
  elif [[ "${GPU_CHECK_NO_INSTALL:-0}" == 1 ]]; then
    echo "GPU_CHECK_NO_INSTALL=1: not installing jax[cuda12]."
  elif timeout 15 "$PY" -c "import urllib.request as u; u.urlopen('https://pypi.org/simple/jax/', timeout=10)" \
      > /dev/null 2>&1; then
    echo "PyPI reachable: installing jax[cuda12]==$JAXVER (limit 300 s)"
    timeout 300 "$PY" -m pip install -q "jax[cuda12]==$JAXVER" > "$OUT/pip.log" 2>&1 \
      || { echo "pip install failed:"; tail -n 5 "$OUT/pip.log"; }
  else
    echo "PyPI is not reachable: cannot install jax[cuda12] here."
  fi
  if ! has_gpu; then
    echo "NO GPU BACKEND: jax.devices('gpu') fails (see $OUT/gpu_probe.log). Install a CUDA"
    echo "build of jax (pip install 'jax[cuda12]' or 'jax[cuda13]') and rerun. Nothing run."
    exit 2
  fi
fi
[[ "$DEVICE" == gpu ]] && echo "=== GPU: $(tail -n 1 "$OUT/gpu_probe.log")"
PLATFORM=cuda; [[ "$DEVICE" == cpu ]] && PLATFORM=cpu

SCALE=("$PY" benchmarks/scale.py --device "$DEVICE" --out "$OUT/scale_gpu.json" --timeout-s 300)
step tests 200 env JAX_PLATFORMS=$PLATFORM "$PY" -m pytest tests/test_gpfq.py tests/test_stats.py \
  tests/test_baselines.py -q -p no:cacheprovider
step resnet18 150 "${SCALE[@]}" --parts resnet18 --patch-fractions 1.0
step large 70 "${SCALE[@]}" --parts large
step memory 70 "${SCALE[@]}" --parts memory --memory-ms 2000,8000
step dtype 45 "${SCALE[@]}" --parts dtype

echo; echo "=== summary ($(( $(date +%s) - T0 )) s; budget ${BUDGET_S} s)"; cat "$SUMMARY"
if [[ -f "$OUT/scale_gpu.json" ]]; then
  echo; "$PY" benchmarks/scale.py --show "$OUT/scale_gpu.json" 2>&1 | tee "$OUT/tables.md"
fi
exit "$FAILED"
