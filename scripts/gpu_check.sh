#!/usr/bin/env bash
# GPU check: build the CUDA kernels, run the GPU tests and the GPU benchmarks, write JSON.
# Not yet run on a GPU; its steps are capped at 240 + 150 + 150 s (timeouts below), so it ends within
# about 9 minutes whatever happens. Usage: bash scripts/gpu_check.sh [OUTPUT_DIR]
# (default: $OUT when set, else gpu_results/). Works offline: no build isolation, no deps fetched.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_results}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$out/nvidia-smi.txt"

# Only the architecture of the card here: a short build (see README, DIFFCORE_CUDA_ARCHS).
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
start=$(date +%s)
DIFFCORE_CUDA=ON DIFFCORE_CUDA_ARCHS="$arch" timeout 240 python3 -m pip install -q --no-build-isolation --no-deps \
  -Cbuild-dir=build/gpu -e . > "$out/install.log" 2>&1
install_rc=$?
build_s=$(( $(date +%s) - start ))

timeout 150 python3 -m pytest tests -m "gpu or cuda_ext" -q -p no:cacheprovider \
  --junitxml "$out/tests.xml" > "$out/tests.log" 2>&1
tests_rc=$?
timeout 150 python3 -m pytest bench -m gpu --benchmark-only -q -p no:cacheprovider \
  --benchmark-json "$out/bench.json" > "$out/bench.log" 2>&1
bench_rc=$?

python3 scripts/summarize_gpu_check.py "$out" "$install_rc" "$tests_rc" "$bench_rc" "$build_s"
tail -n 30 "$out/tests.log"; tail -n 40 "$out/bench.log"
