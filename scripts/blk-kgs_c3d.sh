#!/usr/bin/env bash
# Kernel group sparsity (KGS) pruning of C3D, with the original's recipe (scripts/recipe.sh: ADMM with 4 rhos, then masked
# retraining with warmup, cosine schedule and distillation). Override with environment variables:
#   DATA=/data/UCF101 ADMM_EPOCHS=50 RETRAIN_EPOCHS=50 CONFIG=c3d_3.57x bash scripts/blk-kgs_c3d.sh [more options]
exec bash "$(dirname "$0")/recipe.sh" c3d blk-kgs c3d_3.57x "$@"
