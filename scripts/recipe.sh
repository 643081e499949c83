#!/usr/bin/env bash
# The original's pruning recipe, shared by the blk-*_ARCH.sh scripts:
#   bash scripts/recipe.sh ARCH SPARSITY_TYPE PROFILE RHO_NUM ADMM_EPOCHS RETRAIN_EPOCHS [more opt_main.py options]
# ADMM pruning with label smoothing 0.1, then masked retraining (progressive combining, warmup,
# cosine schedule, distillation from the dense baseline, no smoothing), both with the original
# scripts' rho 1e-4, lr 5e-4, SGD, blocks 8x4. Environment: DATA (default dataset), DATASET
# (ucf101), CONFIG (the profile; default PROFILE), ADMM_EPOCHS, RETRAIN_EPOCHS (default the
# arguments; EPOCHS sets both), TEACHER (--teacher-path; default: the baseline opt_main.py finds,
# the original's download when it is in checkpoint/), PYTHON. More options reach both runs and
# win over the recipe's (argparse keeps the last value): e.g. --multi-gpu, as the original's
# scripts pass it, for DataParallel over all visible GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCH=$1 TYPE=$2 DEFAULT_PROFILE=$3 RHO_NUM=$4 DEFAULT_ADMM_EPOCHS=$5 DEFAULT_RETRAIN_EPOCHS=$6
shift 6
PYTHON=${PYTHON:-python}
DATA=${DATA:-dataset}
DATASET=${DATASET:-ucf101}
CONFIG=${CONFIG:-$DEFAULT_PROFILE}
ADMM_EPOCHS=${ADMM_EPOCHS:-${EPOCHS:-$DEFAULT_ADMM_EPOCHS}}
RETRAIN_EPOCHS=${RETRAIN_EPOCHS:-${EPOCHS:-$DEFAULT_RETRAIN_EPOCHS}}
TEACHER_PATH=()
if [ -n "${TEACHER:-}" ]; then TEACHER_PATH=(--teacher-path "$TEACHER"); fi

COMMON=(--arch "$ARCH" --dataset "$DATASET" --data_location "$DATA" --sparsity-type "$TYPE" --config-file "$CONFIG"
        --connectivity-block-size 8 4 --rho 0.0001 --rho-num "$RHO_NUM" --lr 5e-4 --optmzr sgd --log-interval 50)

"$PYTHON" opt_main.py --admm --epochs "$ADMM_EPOCHS" "${COMMON[@]}" --smooth --smooth-eps 0.1 "$@"
"$PYTHON" opt_main.py --masked-retrain --epochs "$RETRAIN_EPOCHS" "${COMMON[@]}" --combine-progressive \
    --warmup --warmup-lr 1e-5 --lr-scheduler cosine --distill --teacharch "$ARCH" ${TEACHER_PATH[@]+"${TEACHER_PATH[@]}"} "$@"
