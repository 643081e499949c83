#!/usr/bin/env bash
# Kernel group sparsity (KGS) pruning of S3D, with the original's recipe (scripts/recipe.sh: ADMM with 4 rhos, then masked
# retraining with warmup, cosine schedule and distillation). Override with environment variables:
#   DATA=/data/UCF101 ADMM_EPOCHS=50 RETRAIN_EPOCHS=50 CONFIG=s3d_2.09x bash scripts/blk-kgs_s3d.sh [more options]
exec bash "$(dirname "$0")/recipe.sh" s3d blk-kgs s3d_2.09x "$@"
