#!/usr/bin/env bash
# Kernel group sparsity (KGS) pruning of C3D.
# The original's recipe: ADMM pruning (4 rhos), then masked retraining with warmup, cosine
# schedule and distillation from the dense baseline. Override with environment variables:
#   DATA=/data/UCF101 ADMM_EPOCHS=50 RETRAIN_EPOCHS=50 CONFIG=c3d_3.57x bash scripts/blk-kgs_c3d.sh [more options]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DATA=${DATA:-dataset}
DATASET=${DATASET:-ucf101}
CONFIG=${CONFIG:-c3d_3.57x}
ADMM_EPOCHS=${ADMM_EPOCHS:-${EPOCHS:-50}}
RETRAIN_EPOCHS=${RETRAIN_EPOCHS:-${EPOCHS:-50}}

COMMON=(--arch c3d --dataset "$DATASET" --data_location "$DATA" --config-file "$CONFIG"
        --sparsity-type blk-kgs --connectivity-block-size 8 4 --rho 0.0001 --rho-num 4
        --lr 5e-4 --optmzr sgd --smooth-eps 0.1)

"$PYTHON" opt_main.py --admm --epochs "$ADMM_EPOCHS" "${COMMON[@]}" "$@"
"$PYTHON" opt_main.py --masked-retrain --epochs "$RETRAIN_EPOCHS" "${COMMON[@]}" \
    --combine-progressive --warmup --warmup-lr 1e-5 --lr-scheduler cosine --distill "$@"
