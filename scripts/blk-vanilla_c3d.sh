#!/usr/bin/env bash
# Vanilla block sparsity pruning of C3D, with the original's recipe (scripts/recipe.sh: ADMM with 4 rhos, then masked
# retraining with warmup, cosine schedule and distillation). Override with environment variables:
#   DATA=/data/UCF101 ADMM_EPOCHS=50 RETRAIN_EPOCHS=50 CONFIG=c3d_2.53x_v2 bash scripts/blk-vanilla_c3d.sh [more options]
exec bash "$(dirname "$0")/recipe.sh" c3d blk-vanilla c3d_2.53x_v2 "$@"
