"""RT3D pruning: train a dense baseline, ADMM-prune it, masked-retrain it, evaluate it.

    python opt_main.py --baseline --arch c3d --epochs 20
    python opt_main.py --admm --arch c3d --config-file c3d_3.57x --epochs 50
    python opt_main.py --masked-retrain --arch c3d --config-file c3d_3.57x --combine-progressive --warmup
    python opt_main.py --evaluate --arch c3d --load-path checkpoint/.../model.pt
    torchrun --nproc_per_node=4 opt_main.py --admm ...          # DistributedDataParallel

Parse the command line once, set up processes and logging, dispatch to the phase; the phases
live in `training/` (its docstring says how the code fits).
"""
import sys

import torch.distributed as dist

from options import parse_args
from training.deploy import run_evaluate, run_export
from training.files import RunLock
from training.phases import run_admm, run_baseline, run_retrain, run_rew
from training.runtime import TrainingDiverged, UserError, log, seed_everything, setup_distributed, setup_logging
from training.specs import read_specs

PHASES = {'baseline': run_baseline, 'admm': run_admm, 'rew': run_rew, 'masked_retrain': run_retrain,
          'evaluate': run_evaluate, 'export': run_export}


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.no_cuda)
    setup_logging()
    seed_everything(args.seed, 0, 0)        # the initial weights of a model trained from scratch
    try:
        return PHASES[args.phase](read_specs(args, env), env)
    except (UserError, TrainingDiverged) as exc:
        log.error(f"error: {exc}")
        sys.exit(1)
    finally:
        for lock in list(RunLock.held_locks):
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
