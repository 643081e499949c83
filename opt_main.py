"""RT3D pruning: train a dense baseline, ADMM-prune it, masked-retrain it, evaluate it.

    python opt_main.py --baseline --arch c3d --epochs 20
    python opt_main.py --admm --arch c3d --config-file c3d_3.57x --epochs 50
    python opt_main.py --masked-retrain --arch c3d --config-file c3d_3.57x --combine-progressive --warmup
    python opt_main.py --evaluate --arch c3d --load-path checkpoint/.../model.pt
    torchrun --nproc_per_node=4 opt_main.py --admm ...          # DistributedDataParallel

Parse the command line once, set up processes and logging, dispatch to the phase; the phases
live in `training/` (its docstring says how the code fits).
"""
import shlex
import sys

import torch.distributed as dist

from dataset import DataError
from options import parse_args
from training.deploy import run_evaluate, run_export
from training.files import SAVED, RunLock
from training.phases import run_admm, run_baseline, run_retrain, run_rew
from training.runtime import TrainingDiverged, UserError, log, seed_everything, setup_distributed, setup_logging
from training.specs import read_specs

PHASES = {'baseline': run_baseline, 'admm': run_admm, 'rew': run_rew, 'masked_retrain': run_retrain,
          'evaluate': run_evaluate, 'export': run_export}


def interrupted(phase):
    """One line for Ctrl-C: what the run saved, and how to go on from there."""
    command = ' '.join(shlex.quote(a) for a in [sys.executable.rsplit('/', 1)[-1], *sys.argv])
    if phase in ('evaluate', 'export'):
        return f"interrupted: nothing of {phase} was written; run it again: {command}"
    if not SAVED:
        return f"interrupted before the first epoch ended: nothing was saved; start again: {command}"
    resume = command if '--resume' in sys.argv else command + ' --resume'
    return f"interrupted: the last epoch that finished is saved in {SAVED[-1]}; continue with: {resume}"


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.no_cuda)
    setup_logging()
    seed_everything(args.seed, 0, 0)        # the initial weights of a model trained from scratch
    try:
        return PHASES[args.phase](read_specs(args, env), env)
    except (UserError, TrainingDiverged, DataError) as exc:
        log.error(f"error: {exc}")
        sys.exit(1)
    except OSError as exc:
        if exc.filename is None:
            raise
        log.error(f"error: {exc.filename}: {exc.strerror or exc}")      # a file system that refused
        sys.exit(1)
    except KeyboardInterrupt:
        log.error(interrupted(args.phase))
        sys.exit(130)
    finally:
        for lock in list(RunLock.held_locks):
            lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
