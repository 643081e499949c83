#!/usr/bin/env bash
# Kernel group sparsity (KGS) pruning of R(2+1)D-18 (Kinetics-pretrained baseline), with the
# original's recipe (scripts/recipe.sh: ADMM with 4 rhos, then masked retraining with warmup,
# cosine schedule and distillation).
# Override with environment variables:
#   DATA=/data/UCF101 ADMM_EPOCHS=50 RETRAIN_EPOCHS=50 CONFIG=r2+1d-pretrained_3.20x bash scripts/blk-kgs_r2+1d.sh [more options]
exec bash "$(dirname "$0")/recipe.sh" r2+1d-pretrained blk-kgs r2+1d-pretrained_3.20x "$@"
