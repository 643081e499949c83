#!/usr/bin/env bash
# Vanilla block sparsity pruning of C3D. Ours: the original ships no such script. The recipe of
# blk-kgs_c3d.sh (scripts/recipe.sh: profile c3d_2.53x_v2, 4 rhos) with --sparsity-type blk-vanilla,
# at 50 ADMM and 50 retraining epochs. Override with environment variables:
#   DATA=/data/UCF101 ADMM_EPOCHS=50 RETRAIN_EPOCHS=130 CONFIG=c3d_3.57x bash scripts/blk-vanilla_c3d.sh [more options]
# Also: EPOCHS (both runs), TEACHER, DATASET, PYTHON; --multi-gpu among the options.
exec bash "$(dirname "$0")/recipe.sh" c3d blk-vanilla c3d_2.53x_v2 4 50 50 "$@"
