#!/usr/bin/env bash
# The checks that need CUDA, in one go: the CUDA tests, the GPU speed benchmarks and the quality
# benchmark. Results (and the full logs) go to $OUT (default gpu_results/).
#   bash bench/run_gpu.sh              # QUALITY_ROOT=/tmp/quality: datasets, checkpoints, tables
# QUALITY_ARGS adds bench_quality.py options (e.g. "--prune-epochs 2 --retrain-epochs 3" for a
# shorter run); the quality log prints one ROW line per finished run, so a cut run still reports.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
ROOT=${QUALITY_ROOT:-/tmp/quality}
read -r -a QARGS <<< "${QUALITY_ARGS:-}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_projection.py tests/test_balanced.py \
    tests/test_reweighted.py tests/test_admm_state.py 2>&1 | tail -4 | tee "$OUT/cuda_tests.txt"
"$PYTHON" bench/bench_project.py --device cuda --repeats 20 --loop-repeats 0 2>&1 | tee "$OUT/bench_project.txt"
for crop in 32 112; do
    "$PYTHON" bench/bench_train_step.py --device cuda --crop-size $crop --batch-size 8 --repeats 20
done 2>&1 | tee "$OUT/bench_train_step.txt"
# Quality: every type and method on the demo's set and on the second set.
"$PYTHON" bench/bench_quality.py --root "$ROOT" --presets camera --workers 8 --baseline-epochs 20 "${QARGS[@]}" \
    > "$OUT/quality_camera.log" 2>&1
grep -E '^ROW|^### |^\|' "$OUT/quality_camera.log"
"$PYTHON" bench/bench_quality.py --root "$ROOT" --presets handheld --workers 8 \
    --baseline-epochs 20 "${QARGS[@]}" > "$OUT/quality_handheld.log" 2>&1
grep -E '^ROW|^### |^\|' "$OUT/quality_handheld.log"
