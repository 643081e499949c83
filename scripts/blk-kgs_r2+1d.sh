#!/usr/bin/env bash
# Kernel group sparsity (KGS) pruning of R(2+1)D-18 (Kinetics-pretrained baseline) with the
# original's blk-kgs_r2+1d.sh settings (scripts/recipe.sh): profile r2+1d-pretrained_2.56x,
# 4 rhos, 50 ADMM epochs and 130 retraining epochs, the paper-length run.
#   DATA=/data/UCF101 bash scripts/blk-kgs_r2+1d.sh [more options]
# Override with ADMM_EPOCHS, RETRAIN_EPOCHS (EPOCHS: both), CONFIG (e.g. r2+1d-pretrained_3.20x),
# TEACHER, DATASET, PYTHON; --multi-gpu among the options for the original's DataParallel over all
# visible GPUs.
exec bash "$(dirname "$0")/recipe.sh" r2+1d-pretrained blk-kgs r2+1d-pretrained_2.56x 4 50 130 "$@"
