#!/usr/bin/env bash
# Kernel group sparsity (KGS) pruning of S3D with the original's blk-kgs_s3d.sh settings
# (scripts/recipe.sh): profile s3d_2.09x (1.78x FLOPs with our counter, docs/profiles.md), 1 rho,
# 1 ADMM epoch and 1 retraining epoch. Those epochs make the original's script a smoke test; the
# paper-length run is the R(2+1)D shape:
#   DATA=/data/UCF101 ADMM_EPOCHS=50 RETRAIN_EPOCHS=130 bash scripts/blk-kgs_s3d.sh [more options]
# Also: CONFIG (another profile), EPOCHS (both runs), TEACHER, DATASET, PYTHON; --multi-gpu among
# the options for the original's DataParallel over all visible GPUs.
exec bash "$(dirname "$0")/recipe.sh" s3d blk-kgs s3d_2.09x 1 1 1 "$@"
