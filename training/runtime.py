"""Processes, devices, seeding and logging: what every phase sets up before it trains."""
import dataclasses
import json
import logging
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

log = logging.getLogger('rt3d')


class UserError(RuntimeError):
    """A problem with the command line or the files it names (printed without a traceback)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class Env:
    device: torch.device
    rank: int
    world: int
    local_world: int


def setup_distributed(no_cuda: bool) -> Env:
    """Read torchrun's environment and start the process group if there is one."""
    use_cuda = torch.cuda.is_available() and not no_cuda
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    if world > 1:
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl' if use_cuda else 'gloo')
    device = torch.device(f'cuda:{local_rank}' if use_cuda and world > 1 else 'cuda' if use_cuda else 'cpu')
    return Env(device, rank, world, int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def on_main_first(action) -> None:
    """Run `action()` on rank 0 only and raise its UserError on every rank, so that no process
    waits forever for one that stopped."""
    message = None
    if is_main():
        try:
            action()
        except UserError as exc:
            message = str(exc)
        except OSError as exc:
            if exc.filename is None:
                raise
            message = f"{exc.filename}: {exc.strerror or exc}"
    if dist.is_initialized():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)


def check_same_on_all_ranks(tensors: list, what: str) -> None:
    """Raise unless every process holds the same `tensors` (compared through their sums and norms)."""
    if not dist.is_initialized() or not tensors:
        return
    mine = torch.stack([torch.stack([t.double().sum(), t.double().norm()]) for t in tensors]).flatten()
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"{what} differ between processes: the replicas have diverged")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) \
        else model


def wrap(model: torch.nn.Module, env: Env, multi_gpu: bool = False) -> torch.nn.Module:
    """DDP under torchrun, DataParallel for --multi-gpu without it, else the model itself."""
    if env.world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == 'cuda' else None)
    if multi_gpu and env.device.type == 'cuda' and torch.cuda.device_count() > 1:
        log.info(f"--multi-gpu: DataParallel over {torch.cuda.device_count()} GPUs "
                 f"(torchrun with DistributedDataParallel is faster)")
        return torch.nn.DataParallel(model)
    return model


def seed_everything(seed: int, stage: int, epoch: int) -> int:
    """Every epoch starts from RNG states fixed by (seed, stage, epoch), so a resumed run repeats
    exactly what an uninterrupted one would have done. The only RNG mechanism: none is saved."""
    s = (seed * 1_000_003 + stage * 10_007 + epoch) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def setup_logging(path: str | None = None) -> None:
    """Console lines (through tqdm, so progress bars stay whole) and, given `path`, a log file;
    the models package's lines (sparse_exec's choices) go alike. Ranks > 0 log nothing."""
    package = logging.getLogger('models')
    for logger in (log, package):
        logger.handlers.clear()
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if not is_main():
        for logger in (log, package):
            logger.addHandler(logging.NullHandler())
        return

    class TqdmHandler(logging.Handler):   # console lines that do not break the progress bar
        def emit(self, record):
            if record.levelno >= logging.INFO and not getattr(record, 'file_only', False):
                tqdm.write(self.format(record), file=sys.stdout)

    console = TqdmHandler()
    console.setFormatter(logging.Formatter('%(message)s'))
    handlers = [console]
    if path:
        handlers.append(logging.FileHandler(path))
        handlers[-1].setFormatter(logging.Formatter('%(asctime)s %(message)s', '%Y-%m-%d %H:%M:%S'))
    for handler in handlers:
        log.addHandler(handler)
        package.addHandler(handler)


def log_command(options: dict, notes: list) -> None:
    """The command line, every option and what the command line means, as the run's first lines."""
    log.info("command: " + " ".join(sys.argv))
    log.info("options: " + json.dumps(options, default=str))
    for note in notes:
        log.info(note)
