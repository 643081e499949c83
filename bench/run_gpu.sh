#!/usr/bin/env bash
# The checks that need CUDA, in one go (about 5 minutes on one H100): the CUDA tests, the training
# pipeline against its step ceiling for C3D and R(2+1)D at 16x112x112, the pruning machinery's cost
# per step, the projection. Everything goes to $OUT (default gpu_results/), logs included, so a run
# cut short still reports what it finished.
#   bash bench/run_gpu.sh                 # QUALITY=1 also runs the (long) quality benchmark
# On a machine without lmdb / av / scikit-video, put their cp312 wheels in .whl/ first (they are
# installed from there; see docs/benchmarks.md, "On a GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site
fi

"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_projection.py \
    tests/test_amp.py tests/test_dataset_transforms.py -k 'cuda or gpu' 2>&1 \
    | tail -6 | tee "$OUT/cuda_tests.txt"
# The loop against its ceiling: fp32 and bf16 + channels_last_3d, our loader and the original's.
for arch in c3d r2+1d; do
    "$PYTHON" bench/bench_pipeline.py --device cuda --arch "$arch" --crop-size 112 --batch-size 32 \
        --workers 14 --batches 12 --epochs 4 --amp --channels-last --data /tmp/pipeline112 2>&1 \
        | grep -v 'it/s' | tee "$OUT/bench_pipeline_$arch.txt"
done
"$PYTHON" bench/bench_train_step.py --device cuda --crop-size 112 --batch-size 8 --repeats 20 2>&1 \
    | tee "$OUT/bench_train_step.txt"
"$PYTHON" bench/bench_project.py --device cuda --repeats 20 --loop-repeats 0 2>&1 | tee "$OUT/bench_project.txt"

if [ "${QUALITY:-0}" = 1 ]; then
    ROOT=${QUALITY_ROOT:-/tmp/quality}
    read -r -a QARGS <<< "${QUALITY_ARGS:-}"
    for preset in camera handheld; do
        "$PYTHON" bench/bench_quality.py --root "$ROOT" --presets "$preset" --workers 8 --baseline-epochs 20 \
            "${QARGS[@]}" > "$OUT/quality_$preset.log" 2>&1
        grep -E '^ROW|^### |^\|' "$OUT/quality_$preset.log"
    done
fi
