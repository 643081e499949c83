#!/usr/bin/env bash
# The original's pruning recipe, shared by the blk-*_ARCH.sh scripts:
#   bash scripts/recipe.sh ARCH SPARSITY_TYPE DEFAULT_PROFILE [more opt_main.py options]
# ADMM pruning (4 rhos), then masked retraining with warmup, cosine schedule and distillation
# from the dense baseline. Environment: DATA (default dataset), DATASET (ucf101), CONFIG (the
# profile; default DEFAULT_PROFILE), EPOCHS, ADMM_EPOCHS, RETRAIN_EPOCHS (50), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=$1 TYPE=$2 DEFAULT_PROFILE=$3
shift 3
PYTHON=${PYTHON:-python}
DATA=${DATA:-dataset}
DATASET=${DATASET:-ucf101}
CONFIG=${CONFIG:-$DEFAULT_PROFILE}
ADMM_EPOCHS=${ADMM_EPOCHS:-${EPOCHS:-50}}
RETRAIN_EPOCHS=${RETRAIN_EPOCHS:-${EPOCHS:-50}}

COMMON=(--arch "$ARCH" --dataset "$DATASET" --data_location "$DATA" --config-file "$CONFIG"
        --sparsity-type "$TYPE" --connectivity-block-size 8 4 --rho 0.0001 --rho-num 4
        --lr 5e-4 --optmzr sgd --smooth-eps 0.1)

"$PYTHON" opt_main.py --admm --epochs "$ADMM_EPOCHS" "${COMMON[@]}" "$@"
"$PYTHON" opt_main.py --masked-retrain --epochs "$RETRAIN_EPOCHS" "${COMMON[@]}" \
    --combine-progressive --warmup --warmup-lr 1e-5 --lr-scheduler cosine --distill "$@"
