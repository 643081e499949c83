#!/usr/bin/env bash
# Kernel group sparsity (KGS) pruning of C3D with the original's blk-kgs_c3d.sh settings
# (scripts/recipe.sh): profile c3d_2.53x_v2, 4 rhos, 1 ADMM epoch and 1 retraining epoch. Those
# epochs make the original's script a smoke test; the paper-length run is the R(2+1)D shape:
#   DATA=/data/UCF101 ADMM_EPOCHS=50 RETRAIN_EPOCHS=130 bash scripts/blk-kgs_c3d.sh [more options]
# Also: CONFIG (another profile), EPOCHS (both runs), TEACHER, DATASET, PYTHON; --multi-gpu among
# the options for the original's DataParallel over all visible GPUs.
exec bash "$(dirname "$0")/recipe.sh" c3d blk-kgs c3d_2.53x_v2 4 1 1 "$@"
