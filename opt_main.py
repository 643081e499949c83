"""RT3D pruning: train a dense baseline, ADMM-prune it, masked-retrain it, evaluate it.

    python opt_main.py --baseline --arch c3d --epochs 20
    python opt_main.py --admm --arch c3d --config-file c3d_3.57x --epochs 50
    python opt_main.py --masked-retrain --arch c3d --config-file c3d_3.57x --combine-progressive --warmup
    python opt_main.py --evaluate --arch c3d --load-path checkpoint/.../model.pt
    torchrun --nproc_per_node=4 opt_main.py --admm ...          # DistributedDataParallel

Every phase reads the same way: check everything it will need (data, model, profiles,
checkpoints, resume point), then lock its run directory and train with `fit()`. Files follow the
original's layout (README, "Runs and files"); `RunFiles` names them all.
"""
import contextlib
import copy
import dataclasses
import glob
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import admm
from models import DEFAULT_GEOMETRY, CheckpointError, build_model, load_weights, read_checkpoint
from options import parse_args

log = logging.getLogger('rt3d')

# Baselines the original downloads provide, looked for in --ckpt-root before our own.
ORIGINAL_BASELINES = {
    ('ucf101', 'c3d'): 'ucf101_c3d_transfer_epoch-14_top1-81.571.pt',
    ('hmdb51', 'c3d'): 'hmdb51_c3d_transfer_epoch-18_top1-53.458.pt',
    ('ucf101', 'r2+1d'): 'ucf101_r2+1d-pretrained_transfer_epoch-14_top1-93.981.pt',
    ('hmdb51', 'r2+1d'): 'hmdb51_r2+1d-pretrained_transfer_epoch-20_top1-71.300.pt',
    ('ucf101', 'r2+1d-pretrained'): 'ucf101_r2+1d-pretrained_transfer_epoch-14_top1-93.981.pt',
    ('hmdb51', 'r2+1d-pretrained'): 'hmdb51_r2+1d-pretrained_transfer_epoch-20_top1-71.300.pt',
    ('ucf101', 's3d'): 'ucf101-s3d-ts-max-f16-multisteps-bs32-e20_epoch-20_top1-90.573.pt',
    ('hmdb51', 's3d'): 'hmdb51-s3d-ts-max-f16-multisteps-bs32-e20_epoch-17_top1-67.151.pt',
}
KNOWN_CLASSES = {'ucf101': 101, 'hmdb51': 51}
HISTORY_KEYS = ('train_loss', 'train_top1', 'val_loss', 'val_top1', 'val_top5', 'lr')


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class UserError(RuntimeError):
    """A problem with the command line or the files it names (printed without a traceback)."""


# ----------------------------------------------------------------------------- processes and devices

@dataclasses.dataclass(frozen=True)
class Env:
    device: torch.device
    rank: int
    world: int
    local_world: int


def setup_distributed(no_cuda):
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


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def on_main_first(action):
    """Run `action()` on rank 0 only and raise its UserError on every rank, so that no process
    waits forever for one that stopped."""
    message = None
    if is_main():
        try:
            action()
        except UserError as exc:
            message = str(exc)
    if dist.is_initialized():
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)


def check_same_on_all_ranks(tensors, what):
    """Raise unless every process holds the same `tensors` (compared through their sums and norms)."""
    if not dist.is_initialized() or not tensors:
        return
    mine = torch.stack([torch.stack([t.double().sum(), t.double().norm()]) for t in tensors]).flatten()
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"{what} differ between processes: the replicas have diverged")


def unwrap(model):
    return model.module if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) \
        else model


def seed_everything(seed, stage, epoch):
    """Every epoch starts from RNG states fixed by (seed, stage, epoch), so a resumed run repeats
    exactly what an uninterrupted one would have done. The only RNG mechanism: none is saved."""
    s = (seed * 1_000_003 + stage * 10_007 + epoch) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


# ----------------------------------------------------------------------------- logging

def setup_logging(path=None):
    package = logging.getLogger('models')      # the models package's lines (sparse_exec's choices) go alike
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


def log_command(args):
    log.info("command: " + " ".join(sys.argv))
    log.info("options: " + json.dumps({k: v for k, v in vars(args).items() if k not in ('max_batches', 'notes')},
                                      default=str))
    for note in args.notes:
        log.info(note)


# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def written_atomically(path):
    """Yield a temporary name beside `path` to write; it becomes `path` by a rename when the block
    succeeds and is removed when it fails. A kill at any moment leaves the previous file intact (and
    a `.tmp{pid}` file that the next run in this folder removes)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_save(obj, path):
    """`torch.save` through `written_atomically`, synced to disk before the rename."""
    if not is_main():
        return
    with written_atomically(path) as tmp, open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _start_time(pid):
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(')', 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid, host=None, started=None):
    if host not in (None, socket.gethostname()):
        return True                          # another machine's process: we cannot tell, so assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or _start_time(pid) in (None, started)


def remove_stale_temporaries(folder):
    """Delete `*.tmp{pid}` files that a save killed half-way left behind (their process is gone)."""
    for path in glob.glob(os.path.join(glob.escape(folder), '*.tmp*')):
        found = re.search(r'\.tmp(\d+)$', path)
        if found and not _alive(int(found.group(1))):
            size = os.path.getsize(path)
            os.remove(path)
            log.info(f"removed {path} ({size / 2**20:.0f} MiB), left by a save that was killed")


class RunLock:
    """A lock file beside a run directory: the pid, host and command of the run writing there.
    A second run refuses to start; a lock whose process is gone is taken over."""
    held_locks = []            # released when main() ends, however it ends

    def __init__(self, path):
        self.path, self.held = path, False

    def acquire(self):
        me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': _start_time(os.getpid()),
              'since': time.strftime('%Y-%m-%d %H:%M:%S'), 'command': ' '.join(sys.argv)}
        os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                other = self._read()
                if other is None:            # being written by a run starting this instant
                    time.sleep(0.05)
                    continue
                if _alive(other.get('pid', -1), other.get('host'), other.get('started')):
                    raise UserError(
                        f"another run is writing here: pid {other.get('pid')} on {other.get('host')}, since "
                        f"{other.get('since')}: {other.get('command')}\n(lock file {self.path}). Wait for it to "
                        f"finish, or use another --ckpt-root; if that process is gone, delete the lock file")
                log.info(f"taking over the lock {self.path} of pid {other.get('pid')}, which no longer runs")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(me, f)
            self.held = True
            RunLock.held_locks.append(self)
            return
        raise UserError(f"could not take the lock {self.path}: it keeps changing; is another run starting?")

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            if time.time() - os.path.getmtime(self.path) > 10:     # unreadable and old: a dead writer's
                return {'pid': -1}
            return None

    def release(self):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False
            RunLock.held_locks.remove(self)


def first_free(name_of):
    """`name_of(n)` for the smallest n >= 1 that names nothing on disk."""
    n = 1
    while os.path.exists(name_of(n)):
        n += 1
    return name_of(n)


class RunFiles:
    """Every file of a run, by the original's names.

    A pruning run lives in `{ckpt_root}/{dataset}_{arch}_{types}[-r{gM}c{gN}]/`; a baseline is
    `{ckpt_root}/{dataset}_{arch}_baseline...`. Trained results are renamed
    `{stem}_epoch-{E}_top1-{acc:.3f}.pt` at the end, never over an existing file.
    """

    def __init__(self, ckpt_root, name, folder, rho_num=None, distill=False, profiles=1):
        self.root, self.name, self.dir = ckpt_root, name, folder
        self.rho_num, self.distill, self.n_profiles = rho_num, distill, profiles
        self.lock = RunLock(os.path.join(ckpt_root, name + '.lock'))

    @classmethod
    def baseline(cls, ckpt_root, dataset, arch):
        return cls(ckpt_root, f"{dataset}_{arch}_baseline", ckpt_root)

    @classmethod
    def pruning(cls, ckpt_root, dataset, arch, sparsity_types, block_size, rho_num, distill=False):
        types = '+'.join(dict.fromkeys(sparsity_types))
        block = any(t in admm.BLOCK_TYPES for t in sparsity_types)
        name = f"{dataset}_{arch}_{types}" + (f"-r{block_size[0]}c{block_size[1]}" if block else "")
        return cls(ckpt_root, name, os.path.join(ckpt_root, name), rho_num, distill, len(sparsity_types))

    def path(self, file_name):
        return os.path.join(self.dir, file_name)

    @property
    def profiles(self):
        """Copies of the profiles as the pruning phase read them (retraining uses these)."""
        if self.n_profiles == 1:
            return [self.path(f"{self.name}.yaml")]
        return [self.path(f"{self.name}_{i + 1}.yaml") for i in range(self.n_profiles)]

    def stage(self, rho):
        return self.path(f"{self.name}_{rho:g}.pt")

    def resume(self, phase):
        """The resume point of `phase`: baseline, admm, rew (retraining: `result(...)` + `_last.pt`)."""
        return self.path(f"{self.name}_last.pt" if phase == 'baseline' else f"{self.name}_{phase}_last.pt")

    @property
    def rew(self):
        return self.path(f"{self.name}_rew.pt")

    def log(self, phase):
        return self.path(f"{self.name}.log" if phase == 'baseline' else f"{self.name}_{phase}.log")

    def result(self, method):
        """Stem of a trained model: the baseline, or the retrained model after `method` (admm:
        `{run}_{R}rhos`, the original's name; rew: `{run}_rew_retrained`; oneshot: `{run}_oneshot`)."""
        if method == 'baseline':
            return self.path(self.name)
        stem = {'admm': f"{self.name}_{self.rho_num}rhos", 'rew': f"{self.name}_rew_retrained",
                'oneshot': f"{self.name}_oneshot"}[method]
        return self.path(stem + ('_distill' if self.distill else ''))

    def final(self, stem, epoch, top1):
        """`{stem}_epoch-{E}_top1-{acc}.pt`, or `{stem}_v2_epoch-...` (v3, ...) if that exists."""
        return first_free(lambda n: f"{stem}{f'_v{n}' if n > 1 else ''}_epoch-{epoch}_top1-{top1:.3f}.pt")

    def start(self, fresh):
        """Take the lock, then (fresh pruning run) move an existing directory aside to
        `_v1`, `_v2`, ..., create the directory and remove what killed saves left."""
        def action():
            self.lock.acquire()
            if fresh and self.dir != self.root and os.path.isdir(self.dir):
                self.moved_to = first_free(lambda n: f"{self.dir}_v{n}")
                os.rename(self.dir, self.moved_to)
            os.makedirs(self.dir, exist_ok=True)
        self.moved_to = None
        on_main_first(action)
        if dist.is_initialized():
            dist.barrier()

    def tidy(self):
        if is_main():
            remove_stale_temporaries(self.dir)
            if self.moved_to:
                log.info(f"moved the previous run aside to {self.moved_to}")


def find_baseline(ckpt_root, dataset, arch, data_location):
    """The original's baseline file if present, else the newest baseline this tool trained."""
    original = ORIGINAL_BASELINES.get((dataset, arch))
    if original and os.path.isfile(os.path.join(ckpt_root, original)):
        return os.path.join(ckpt_root, original)
    pattern = os.path.join(ckpt_root, f"{dataset}_{arch}_baseline_*epoch-*_top1-*.pt")
    ours = sorted(glob.glob(pattern), key=os.path.getmtime)
    if ours:
        return ours[-1]
    looked = ([os.path.join(ckpt_root, original)] if original else []) + [pattern]
    raise UserError(
        f"no baseline checkpoint for {dataset} / {arch}: looked for {' and '.join(looked)}.\n"
        f"Download the original's baseline into {ckpt_root}/ (README, 'Baseline models'), pass "
        f"--load-path PATH, or train one: python opt_main.py --baseline --arch {arch} --dataset {dataset} "
        f"--data_location {data_location}")


def read_resume(path, options):
    """The resume file's contents, after checking it continues the run these options define."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: nothing to resume, {path} does not exist (run without --resume)")
    try:
        state, meta = read_checkpoint(path)
    except CheckpointError as exc:
        raise UserError(f"--resume: {exc}") from None
    missing = [k for k in ('epoch', 'optimizer', 'scheduler', 'history', 'options') if k not in meta]
    if missing:
        raise UserError(f"--resume: {path} lacks {', '.join(missing)}: it is not a resume point, or one written by "
                        f"an older version of this tool; start afresh without --resume")
    saved = meta['options']
    differ = [k for k in sorted(set(saved) | set(options)) if saved.get(k) != options.get(k)]
    if differ:
        lines = [f"  {k}: {_shown(options.get(k))} now, {_shown(saved.get(k))} in the run being resumed"
                 for k in differ]
        raise UserError(f"--resume: {path} was written by a run with other options:\n" + "\n".join(lines) +
                        "\nResume with the run's own options, or start afresh without --resume")
    return dict(meta, state_dict=state, path=path)


def _shown(value):
    text = json.dumps(value)
    return text if len(text) < 200 else text[:200] + '...'


# ----------------------------------------------------------------------------- data

def geometry(arch, crop_size=None, scale_size=None):
    """(crop, (low, high) short-side range of training; validation scales to low)."""
    g = DEFAULT_GEOMETRY[arch]
    scale = tuple(scale_size) if scale_size else g['scale_range']
    return crop_size or g['crop_size'], (scale[0], scale[-1])


class SeededClips(torch.utils.data.Dataset):
    """Draws each clip's randomness (frames, scale, crop, flip) from (epoch seed, index) alone:
    the same clips with any number of workers, workers kept across epochs, or after a resume."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed * 1_000_003 + index) % 2**63)
            return self.dataset[index]


class SeededSampler(Sampler):
    """`(index, epoch seed)` pairs in the order of `sampler`, reshuffled by `set_epoch(seed)`."""

    def __init__(self, sampler):
        self.sampler, self.seed = sampler, 0

    def set_epoch(self, seed):
        self.seed = seed
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(seed)
        else:
            self.sampler.generator.manual_seed(seed)

    def __iter__(self):
        return ((index, self.seed) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the clips are and how they are cut and batched, read off the command line once."""
    root: str                      # {data_location}/{dataset}_frame
    dataset: str
    num_frames: int
    crop: int
    scale: tuple
    temporal_jitter: bool
    batch_size: int
    test_batch_size: int
    workers: int
    seed: int
    num_classes: int | None        # None: 101 / 51 for ucf101 / hmdb51, else from the list files


@dataclasses.dataclass
class Data:
    train: DataLoader | None
    val: DataLoader
    classes: int
    notes: list                    # what the run's log says once it is open

    def set_epoch(self, seed):
        self.train.sampler.set_epoch(seed)


def clip_dataset(root, split, is_train, num_frames, crop, scale, temporal_jitter):
    """`{root}/{split}.lmdb` with `{split}.txt`, else the frame folders under `root`. Clips come
    as uint8 (a quarter of the bytes between processes); `to_device` normalises them."""
    from dataset import VideoDataSet, VideoDataSetLMDB, get_augmentor
    list_file = os.path.join(root, f"{split}.txt")
    if not os.path.isfile(list_file):
        raise UserError(f"list file {list_file} not found. Prepare the data first (README, 'Data preparation'): "
                        f"dataset/extract_videos.py writes it, dataset/create_lmdb.py the {split}.lmdb beside it; "
                        f"or point --data_location at the folder holding {os.path.basename(root)}/")
    transform = get_augmentor(is_train, crop, scale if is_train else (scale[0], scale[0]), uint8=True)
    kw = dict(num_groups=num_frames, transform=transform, is_train=is_train,
              temporal_jitter=is_train and temporal_jitter)
    lmdb_path = os.path.join(root, f"{split}.lmdb")
    if os.path.exists(lmdb_path):
        return VideoDataSetLMDB(lmdb_path, list_file, **kw)
    log.info(f"{lmdb_path} not found: reading frame folders under {root}")
    return VideoDataSet(root, list_file, **kw)


def usable_workers(requested, local_world):
    """At most the CPU cores this process may use: more loader processes than cores only add memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return min(requested, max(1, cores // max(1, local_world)))


def make_data(spec, env, need_train=True):
    """Datasets and loaders, checked against the model's class count; UserError for any problem."""
    splits = ('val', 'train') if need_train else ('val',)
    try:
        sets = {s: clip_dataset(spec.root, s, s == 'train', spec.num_frames, spec.crop, spec.scale,
                                spec.temporal_jitter) for s in splits}
    except (OSError, LookupError, ValueError) as exc:      # dataset.DataError is a ValueError
        raise UserError(str(exc.args[0]) if exc.args else str(exc)) from None
    classes = spec.num_classes or KNOWN_CLASSES.get(spec.dataset) or max(s.num_classes for s in sets.values())
    for data in sets.values():
        if data.num_classes > classes:
            raise UserError(f"{data.list_file} has labels up to {data.num_classes - 1}, but the model has {classes} "
                            f"classes: pass --num-classes {data.num_classes} (or correct the list file)")
    workers = usable_workers(spec.workers, env.local_world)
    notes = [f"--workers {spec.workers}: using {workers}, the CPU cores this process has"] \
        if workers < spec.workers else []
    # Workers live across epochs (each epoch's randomness comes with the indices, SeededClips).
    common = dict(num_workers=workers, pin_memory=env.device.type == 'cuda', persistent_workers=workers > 0)
    val_set = sets['val']
    if env.world > 1:   # each rank a disjoint share, no padding: the summed counts are exact
        val_set = Subset(val_set, range(env.rank, len(val_set), env.world))
    val = DataLoader(val_set, batch_size=spec.test_batch_size, shuffle=False, **common)
    if not need_train:
        return Data(None, val, classes, notes)
    train_set = sets['train']
    order = DistributedSampler(train_set, num_replicas=env.world, rank=env.rank, shuffle=True, seed=spec.seed) \
        if env.world > 1 else RandomSampler(train_set, generator=torch.Generator())
    train = DataLoader(SeededClips(train_set), batch_size=spec.batch_size, sampler=SeededSampler(order),
                       drop_last=True, **common)
    if len(train) == 0:
        raise UserError(f"{len(train_set)} training clips make no full batch of {spec.batch_size} per process: "
                        f"lower --batch-size")
    return Data(train, val, classes, notes)


def to_device(clips, device, channels_last=False):
    """A batch of clips on `device`: uint8 ones (our loaders') normalised there to float32, float
    ones taken as they are."""
    from dataset import normalize_clips
    clips = clips.to(device, non_blocking=True)
    if clips.dtype == torch.uint8:
        clips = normalize_clips(clips)
    return clips.contiguous(memory_format=torch.channels_last_3d) if channels_last else clips


# ----------------------------------------------------------------------------- models and optimisation

def new_model(arch, classes, num_frames, crop, device, pretrained=False):
    try:
        return build_model(arch, classes, num_frames=num_frames, crop_size=crop, pretrained=pretrained).to(device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def guard_bf16(model, amp, spec, device):
    """Under bf16 autocast on the CPU, run in float32 the 3D convolutions whose bf16 results this
    machine computes wrongly (models/precision.py); return what to log, if anything."""
    if amp != torch.bfloat16 or device.type != 'cpu':
        return []
    from models.precision import find_wrong_bf16, run_in_float32
    wrong = find_wrong_bf16(model, (2, 3, spec.num_frames, spec.crop, spec.crop), device)
    run_in_float32(model, wrong, device.type)
    return [f"bf16 autocast: {', '.join(wrong)} compute wrong bf16 results on this CPU (PyTorch's oneDNN "
            f"conv3d); they run in float32"] if wrong else []


def wrap(model, env, multi_gpu=False):
    if env.world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == 'cuda' else None)
    if multi_gpu and env.device.type == 'cuda' and torch.cuda.device_count() > 1:
        log.info(f"--multi-gpu: DataParallel over {torch.cuda.device_count()} GPUs "
                 f"(torchrun with DistributedDataParallel is faster)")
        return torch.nn.DataParallel(model)
    return model


def load_into(model, path, arch):
    try:
        return load_weights(model, path, arch=arch)
    except (CheckpointError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None


def make_optimizer(params, name, lr, momentum, weight_decay, scaled=False):
    """SGD or Adam. The fused kernels update all parameters in one pass (0.2 s less per C3D step
    on 2 CPU cores); under an fp16 GradScaler the foreach implementation is used, because the
    fused one let NaNs through after a skipped step on CUDA (the scaler's found-inf path)."""
    impl = dict(foreach=True) if scaled else dict(fused=True)
    if name == 'adam':
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **impl)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)


def steps_per_epoch(batches, accum_steps):
    return math.ceil(batches / accum_steps)


def make_scheduler(optimizer, kind, lr, epochs, steps, warmup_epochs=0, warmup_lr=None):
    """Per-step schedule: optional linear warmup from `warmup_lr`, then the original's default
    (halve every int(0.2 * epochs) epochs), multistep (halve at 45, 90, 120) or cosine (to 4e-8).
    A warmup as long as the run or longer simply does not finish, as in the original."""
    sched = torch.optim.lr_scheduler
    warm = warmup_epochs * steps
    total = epochs * steps
    if kind == 'cosine':
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=4e-8)
    elif kind == 'multistep':
        main = sched.MultiStepLR(optimizer, [max(1, e * steps - warm) for e in (45, 90, 120)], gamma=0.5)
    else:
        main = sched.StepLR(optimizer, step_size=max(1, int(0.2 * epochs)) * steps, gamma=0.5)
    if not warm:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=warmup_lr / lr, end_factor=1.0, total_iters=warm)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warm])


def admm_lr_factor(epoch, admm_epochs):
    """The original's ADMM rhythm: back to --lr at the start of every --admm-epochs window, halved
    every admm_epochs / 3 epochs (a float division) within it."""
    offset = (epoch - 1) % admm_epochs
    return 1.0 if offset == 0 else 0.5 ** (offset // (admm_epochs / 3))


def rew_lr_factor(epoch, milestones):
    """The follow-up's --rew rhythm: at the start of each epoch e > 1, x1.6 if e - 1 is a
    milestone, else x0.98."""
    return math.prod(1.6 if e - 1 in milestones else 0.98 for e in range(2, epoch + 1))


def epoch_scheduler(optimizer, factor, steps):
    """A per-step LambdaLR whose factor depends on the (1-based) epoch only."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step // steps + 1))


def amp_dtype(amp, forced, device):
    """None (float32), or the autocast dtype: bf16 where the device has it, else fp16."""
    if not amp:
        return None
    if forced:
        return {'bf16': torch.bfloat16, 'fp16': torch.float16}[forced]
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


# ----------------------------------------------------------------------------- one epoch

class Teacher:
    """A frozen dense model whose softened outputs the student matches."""

    def __init__(self, model, temperature, coefficient):
        self.model, self.t, self.c = model.eval(), temperature, coefficient

    def loss(self, task_loss, logits, clips):
        with torch.no_grad():
            target = self.model(clips)
        kd = F.kl_div(F.log_softmax(logits.float() / self.t, dim=1), F.softmax(target.float() / self.t, dim=1),
                      reduction='batchmean') * self.t ** 2
        return (1 - self.c) * task_loss + self.c * kd


@dataclasses.dataclass
class Recipe:
    """How to train, read off the command line once."""
    epochs: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    smooth_eps: float = 0.0
    mixup_alpha: float = 0.0
    accum_steps: int = 1
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    seed: int = 2019
    log_interval: int = 50
    max_batches: int | None = None
    multi_gpu: bool = False


def batches_per_epoch(loader, max_batches=None):
    """Batches one epoch trains on: the loader's, or fewer with --max-batches."""
    return len(loader) if max_batches is None else min(len(loader), max_batches)


def train_one_epoch(model, loader, optimizer, scheduler, criterion, device, epoch, recipe, *, scaler=None,
                    regulariser=None, masks=None, teacher=None):
    """One pass over `loader`; returns (mean task loss, top-1 %).

    Gradients are accumulated over `recipe.accum_steps` batches (each loss divided by the batches
    in its group, so a step sees what one big batch would); the regulariser's loss is added to
    every batch; masks are applied before every step; the scheduler steps with the optimiser.
    Running figures stay on the device and are read back every `log_interval` batches, where a
    non-finite loss stops the run naming its batch.
    """
    model.train()
    batches = batches_per_epoch(loader, recipe.max_batches)
    accum = recipe.accum_steps
    amp = recipe.amp_dtype is not None
    sums = torch.zeros(2, dtype=torch.float64, device=device)          # task loss x clips, correct clips
    seen = 0
    first_bad = torch.full((), batches, dtype=torch.long, device=device)
    start = time.perf_counter()
    # A terminal gets a lively bar; a log file (no terminal) a line every 30 s instead of hundreds.
    bar = tqdm(total=batches, desc=f"epoch {epoch}", leave=False, disable=not is_main(), dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    for i, (clips, labels) in enumerate(loader):
        if i >= batches:
            break
        clips, labels = to_device(clips, device, recipe.channels_last), labels.to(device, non_blocking=True)
        if recipe.mixup_alpha > 0:
            lam = float(np.random.beta(recipe.mixup_alpha, recipe.mixup_alpha))
            perm = torch.randperm(clips.shape[0], device=device)
            clips = lam * clips + (1 - lam) * clips[perm]
        group_start = i - i % accum
        in_group = min(accum, batches - group_start)                     # the last group may be shorter
        last_of_group = i + 1 == group_start + in_group
        if i == group_start:
            optimizer.zero_grad(set_to_none=True)
        sync = contextlib.nullcontext() if last_of_group or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with torch.autocast(device.type, dtype=recipe.amp_dtype, enabled=amp):
                logits = model(clips)
                if recipe.mixup_alpha > 0:
                    task = lam * criterion(logits, labels) + (1 - lam) * criterion(logits, labels[perm])
                else:
                    task = criterion(logits, labels)
                loss = teacher.loss(task, logits, clips) if teacher else task
            if regulariser is not None:
                loss = loss + regulariser.loss()      # float32, on the float32 weights
            (scaler.scale(loss / in_group) if scaler is not None else loss / in_group).backward()
        if last_of_group:
            if masks is not None:
                masks.apply_to_grads()
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()

        with torch.no_grad():
            seen += labels.shape[0]
            sums += torch.stack([task.detach().double() * labels.shape[0], (logits.argmax(1) == labels).sum().double()])
            first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad < batches), first_bad, i)
        bar.update()
        if (i + 1) % recipe.log_interval == 0 or i + 1 == batches:
            bad = int(first_bad)                    # the one host read-back per log interval
            if bad < batches:
                raise TrainingDiverged(f"the loss became non-finite at epoch {epoch}, batch {bad + 1}: lower --lr "
                                       f"(or --rho / --penalty); nothing of this epoch was saved")
            total, correct = sums.tolist()
            lr = optimizer.param_groups[0]['lr']
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{100 * correct / seen:.1f}", lr=f"{lr:.2e}",
                            clips_s=f"{rate:.1f}", refresh=False)
            log.info(f"epoch {epoch} batch {i + 1}/{batches} loss {task.item():.4f} total {loss.item():.4f} "
                     f"lr {lr:.3e} {rate:.1f} clips/s", extra={'file_only': True})
    bar.close()
    totals = torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    total, correct, seen = totals.tolist()
    return total / seen, 100 * correct / seen


@torch.no_grad()
def evaluate(model, loader, device, max_batches=None, amp_dtype=None, channels_last=False):
    """Top-1 %, top-5 % and mean loss over the validation set (summed over processes)."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)
    for i, (clips, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        clips, labels = to_device(clips, device, channels_last), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(clips).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        # Summed on the device: no host round trip per batch.
        stats += torch.stack([(top5[:, 0] == labels).sum().double(), (top5 == labels[:, None]).any(1).sum().double(),
                              F.cross_entropy(logits, labels, reduction='sum').double(),
                              torch.tensor(labels.shape[0], dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(stats)
    n = max(stats[3].item(), 1)
    return 100 * stats[0].item() / n, 100 * stats[1].item() / n, stats[2].item() / n


# ----------------------------------------------------------------------------- fit: the one training loop

REPORT_LABELS = {'near_zero': '|w|<1e-4', 'distance': '||W-Z||/||W||', 'small_groups': 'small groups'}


def log_report(regulariser, board=None, step=0):
    for name, row in regulariser.report().items():
        log.info(f"  {name:<32} " + "  ".join(f"{REPORT_LABELS[k]}: {v:.4f}" for k, v in row.items()))
        if board is not None:
            for k, v in row.items():
                board.add_scalar(f"{k}/{name}", v, step)


def placed(model, env, recipe):
    """The model in its memory format, wrapped for data parallelism (once per phase: DDP keeps
    references to the parameters)."""
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    return wrap(model, env, recipe.multi_gpu)


def fit(model, data, recipe, env, schedule, *, meta, resume_path, best_path=None, resume=None, stage=0,
        regulariser=None, masks=None, teacher=None, board=None):
    """Train `model` for `recipe.epochs` epochs (from where `resume` stopped), validating after each.

    `schedule(optimizer, steps_per_epoch)` builds the per-step learning-rate scheduler. The
    regulariser (admm.ADMM or admm.Reweighted) starts with the stage, updates before the epochs it
    is due (`on_epoch`) and adds its loss to every batch; `masks` keep zero weights at zero; the
    teacher distils except in the last 5 epochs. After every epoch the resume point goes to
    `resume_path` (model, optimiser, scheduler, regulariser, epoch, best, `meta`); the best-top-1
    model to `best_path` if given. Returns (history, best)."""
    base = unwrap(model)
    wrapped = model if model is not base else placed(model, env, recipe)
    scaler = torch.amp.GradScaler(env.device.type, enabled=recipe.amp_dtype == torch.float16)
    optimizer = make_optimizer(base.parameters(), recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay,
                               scaled=scaler.is_enabled())
    steps = steps_per_epoch(batches_per_epoch(data.train, recipe.max_batches), recipe.accum_steps)
    scheduler = schedule(optimizer, steps)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.smooth_eps)
    history, best, start = {k: [] for k in HISTORY_KEYS}, {'top1': -1.0, 'epoch': 0}, 1
    if resume is not None:
        base.load_state_dict(resume['state_dict'])
        optimizer.load_state_dict(resume['optimizer'])
        scheduler.load_state_dict(resume['scheduler'])
        if resume.get('scaler'):
            scaler.load_state_dict(resume['scaler'])
        if regulariser is not None:
            if 'regulariser' not in resume:
                raise UserError(f"--resume: {resume['path']} holds no {type(regulariser).__name__} state; start "
                                f"afresh without --resume")
            regulariser.load_state_dict(resume['regulariser'])
        history = {k: list(v) for k, v in resume['history'].items()}
        best, start = resume.get('best', best), resume['epoch'] + 1
        log.info(f"resumed from {resume['path']} after epoch {resume['epoch']}")
    elif regulariser is not None:
        regulariser.start()
    if recipe.amp_dtype is not None:
        log.info(f"mixed precision: {str(recipe.amp_dtype)[6:]} autocast" +
                 (" with a gradient scaler" if scaler.is_enabled() else "") +
                 (", channels_last_3d" if recipe.channels_last else ""))
    same = f" (identical on {env.world} processes)" if env.world > 1 else ""
    if regulariser is not None:
        check_same_on_all_ranks(regulariser.tensors(), type(regulariser).__name__ + ' state')

    for epoch in range(start, recipe.epochs + 1):
        data.set_epoch(seed_everything(recipe.seed, stage, epoch))
        if regulariser is not None and regulariser.on_epoch(epoch):
            check_same_on_all_ranks(regulariser.tensors(), type(regulariser).__name__ + ' state')
            log.info(f"epoch {epoch}: {regulariser.UPDATED}{same}")
        tick, lr = time.perf_counter(), optimizer.param_groups[0]['lr']
        distil = teacher if epoch <= recipe.epochs - 5 else None   # the last 5 epochs train on the labels alone
        loss, top1 = train_one_epoch(wrapped, data.train, optimizer, scheduler, criterion, env.device, epoch, recipe,
                                     scaler=scaler if scaler.is_enabled() else None, regulariser=regulariser,
                                     masks=masks, teacher=distil)
        v1, v5, vloss = evaluate(wrapped, data.val, env.device, recipe.max_batches, recipe.amp_dtype,
                                 recipe.channels_last)
        for k, v in zip(HISTORY_KEYS, (loss, top1, vloss, v1, v5, lr)):
            history[k].append(v)
        log.info(f"epoch {epoch}/{recipe.epochs}: train loss {loss:.4f} top-1 {top1:.2f} | val loss {vloss:.4f} "
                 f"top-1 {v1:.2f} top-5 {v5:.2f} | lr {lr:.2e} | {time.perf_counter() - tick:.0f} s")
        step = stage * recipe.epochs + epoch
        if board is not None:
            for k, v in zip(HISTORY_KEYS, (loss, top1, vloss, v1, v5, lr)):
                board.add_scalar(f"{k.split('_')[0]}/{k}", v, step)
        if regulariser is not None and (regulariser.due(epoch + 1) or epoch == recipe.epochs):
            log_report(regulariser, board, step)
        state = dict(meta, state_dict=base.state_dict(), epoch=epoch, top1=v1, history=history)
        if best_path and v1 > best['top1']:
            best = {'top1': v1, 'epoch': epoch}
            atomic_save(state, best_path)
        atomic_save(dict(state, best=best, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict(),
                         **({'regulariser': regulariser.state_dict()} if regulariser is not None else {})),
                    resume_path)
    return history, best


# ----------------------------------------------------------------------------- what a run is


def data_spec(args):
    crop, scale = geometry(args.arch, args.crop_size, args.scale_size)
    return DataSpec(root=os.path.join(args.data_location, f"{args.dataset}_frame"), dataset=args.dataset,
                    num_frames=args.num_frames, crop=crop, scale=scale, temporal_jitter=args.temporal_jitter,
                    batch_size=args.batch_size, test_batch_size=args.test_batch_size or args.batch_size,
                    workers=args.workers, seed=args.seed, num_classes=args.num_classes)


def recipe_of(args, env):
    dtype = amp_dtype(args.amp, args.amp_dtype, env.device)
    channels_last = args.channels_last == 'on' or (args.channels_last == 'auto' and env.device.type == 'cuda'
                                                   and dtype is not None)
    return Recipe(epochs=args.epochs, optimizer=args.optmzr, lr=args.lr, momentum=args.momentum,
                  weight_decay=args.weight_decay, smooth_eps=args.smooth_eps, mixup_alpha=args.alpha,
                  accum_steps=args.accum_steps, amp_dtype=dtype, channels_last=channels_last, seed=args.seed,
                  log_interval=args.log_interval, max_batches=args.max_batches, multi_gpu=args.multi_gpu)


def run_options(args, spec, phase, classes, rules=(), source=None):
    """The options that define what a run computes: saved in every checkpoint, and compared
    before --resume continues one (workers, logging, paths and precision may change)."""
    o = dict(phase=phase, arch=args.arch, dataset=args.dataset, num_classes=classes, num_frames=spec.num_frames,
             crop_size=spec.crop, scale_size=list(spec.scale), temporal_jitter=spec.temporal_jitter,
             batch_size=spec.batch_size, processes=int(os.environ.get('WORLD_SIZE', 1)), epochs=args.epochs,
             optmzr=args.optmzr, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
             accum_steps=args.accum_steps, seed=args.seed, smooth_eps=args.smooth_eps, alpha=args.alpha,
             distill=args.distill, max_batches=args.max_batches, source=source)
    if args.distill:
        o.update(teacharch=args.teacharch, temperature=args.temperature, kd_coefficient=args.kd_coefficient)
    if phase != 'admm' and (phase != 'rew' or args.rew_lr == 'scheduler'):
        o.update(lr_scheduler=args.lr_scheduler, warmup_epochs=args.warmup_epochs if args.warmup else 0,
                 warmup_lr=args.warmup_lr if args.warmup else None)
    if phase != 'baseline':
        o.update(profiles=[r for r, _ in rules], sparsity_type=[t for _, t in rules],
                 connectivity_block_size=list(args.connectivity_block_size),
                 combine_progressive=args.combine_progressive)
    if phase == 'admm':
        o.update(rho=args.rho, rho_num=args.rho_num, admm_epochs=args.admm_epochs, admm_penalty=args.admm_penalty)
    if phase == 'rew':
        o.update(penalty=args.penalty, rew_milestones=list(args.rew_milestones), rew_eps=args.rew_eps,
                 rew_lr=args.rew_lr)
    return json.loads(json.dumps(o))         # plain lists, floats and strings, as a checkpoint reads back


def model_meta(arch, spec, classes):
    return {'arch': arch, 'num_classes': classes, 'num_frames': spec.num_frames, 'crop_size': spec.crop}


def load_rules(config_files, sparsity_types, model, block_size):
    """[(prune_ratios, sparsity_type)] of the profiles, checked against the model's weights."""
    try:
        rules = [(admm.load_profile(c, model), t) for c, t in zip(config_files, sparsity_types)]
        shapes = dict((n, p.shape) for n, p in model.named_parameters())
        admm.check_block_size([shapes[n] for r, t in rules if t in admm.BLOCK_TYPES for n in r], block_size)
        weight_rules = admm.weight_rules(*pruning_args(rules))
        admm.check_rules(admm.prunable_parameters(model, weight_rules), weight_rules, block_size)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise UserError(exc.args[0] if exc.args else str(exc)) from None
    return rules


def pruning_args(rules):
    """ADMM / hard_prune take one profile and type, or lists of both (masks multiply)."""
    if len(rules) == 1:
        return rules[0]
    return [r for r, _ in rules], [t for _, t in rules]


def make_teacher(args, spec, env, classes):
    """(Teacher, its checkpoint) for --distill, else (None, None)."""
    if not args.distill:
        return None, None
    arch = args.teacharch or args.arch
    path = args.teacher_path or find_baseline(args.ckpt_root, args.dataset, arch, args.data_location)
    model = new_model(arch, classes, spec.num_frames, spec.crop, env.device)
    load_into(model, path, arch)
    return Teacher(model, args.temperature, args.kd_coefficient), path


def lr_schedule(args):
    """`schedule(optimizer, steps per epoch)` of --lr-scheduler with --warmup (baseline, retraining)."""
    warmup = args.warmup_epochs if args.warmup else 0
    return lambda opt, steps: make_scheduler(opt, args.lr_scheduler, args.lr, args.epochs, steps, warmup,
                                             args.warmup_lr)


def open_board(enabled, folder):
    """A TensorBoard writer in `folder` (rank 0, with --tensorboard), else None."""
    if not enabled or not is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(folder)


def save_curves(history, stem):
    """Per-epoch loss / accuracy as `stem.npz` and a plot `stem.png`."""
    if not is_main() or not history['val_top1']:
        return
    np.savez(stem + '.npz', **{k: np.asarray(v, dtype=np.float64) for k, v in history.items()})
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = np.arange(1, len(history['val_top1']) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, history['train_loss'], label='train')
    ax1.plot(epochs, history['val_loss'], label='validation')
    ax1.set(xlabel='epoch', ylabel='loss', title='loss')
    ax2.plot(epochs, history['train_top1'], label='train top-1')
    ax2.plot(epochs, history['val_top1'], label='validation top-1')
    ax2.plot(epochs, history['val_top5'], label='validation top-5')
    ax2.set(xlabel='epoch', ylabel='accuracy (%)', title='accuracy')
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(stem + '.png', dpi=100)
    plt.close(fig)


def finish(files, stem, best):
    """Rename the kept best model `{stem}.pt` to its final name; return that name."""
    final = files.final(stem, best['epoch'], best['top1'])
    if is_main():
        if not os.path.isfile(stem + '.pt'):
            raise UserError(f"the best model {stem}.pt is missing (was it moved while the run trained?); "
                            f"nothing was renamed")
        os.replace(stem + '.pt', final)
    return final


def begin(args, files, phase, fresh, data, teacher_path):
    """Everything is checked: lock the run's files (moving an old run directory aside for a fresh
    run), open the phase's log, say what the command line and the data setup mean."""
    files.start(fresh)
    setup_logging(files.log(phase) if is_main() else None)
    log_command(args)
    for note in data.notes:
        log.info(note)
    files.tidy()
    if teacher_path:
        log.info(f"distilling from {teacher_path} (T={args.temperature}, coefficient {args.kd_coefficient})")


# ----------------------------------------------------------------------------- phases

def run_baseline(args, env, spec, recipe):
    files = RunFiles.baseline(args.ckpt_root, args.dataset, args.arch)
    data = make_data(spec, env)
    model = new_model(args.arch, data.classes, spec.num_frames, spec.crop, env.device,
                      pretrained=args.arch == 'r2+1d-pretrained' and not args.load_path)
    if args.load_path:
        load_into(model, args.load_path, args.arch)
    data.notes += guard_bf16(model, recipe.amp_dtype, spec, env.device)
    options = run_options(args, spec, 'baseline', data.classes, source=args.load_path)
    resume = read_resume(files.resume('baseline'), options) if args.resume else None
    teacher, teacher_path = make_teacher(args, spec, env, data.classes)

    begin(args, files, 'baseline', False, data, teacher_path)
    stem = files.result('baseline')
    history, best = fit(model, data, recipe, env, lr_schedule(args),
                        meta=dict(model_meta(args.arch, spec, data.classes), options=options),
                        resume_path=files.resume('baseline'), best_path=stem + '.pt', resume=resume, teacher=teacher,
                        board=open_board(args.tensorboard, os.path.join(args.ckpt_root, 'tensorboard', files.name)))
    save_curves(history, stem + '_curves')
    final = finish(files, stem, best)
    log.info(f"baseline: best top-1 {best['top1']:.3f} at epoch {best['epoch']}; saved {final}")
    return final


def pruning_files(args):
    return RunFiles.pruning(args.ckpt_root, args.dataset, args.arch, args.sparsity_type,
                            args.connectivity_block_size, args.rho_num, args.distill)


def pruning_setup(args, env, spec, recipe, config_files):
    """What --admm, --rew and --masked-retrain check before they touch the disk: data, model,
    profiles, teacher. Returns (data, model, rules, teacher, teacher_path)."""
    data = make_data(spec, env)
    model = new_model(args.arch, data.classes, spec.num_frames, spec.crop, env.device)
    data.notes += guard_bf16(model, recipe.amp_dtype, spec, env.device)
    rules = load_rules(config_files, args.sparsity_type, model, tuple(args.connectivity_block_size))
    return (data, model, rules, *make_teacher(args, spec, env, data.classes))


def copy_profiles(config_files, files):
    if is_main():
        for source, copy in zip(config_files, files.profiles):
            shutil.copyfile(admm.resolve_profile_path(source), copy)


def keep_zeros(model):
    masks = admm.Masks(model, weights_only=True)
    log.info(f"--combine-progressive: keeping the zeros of {len(masks)} weights")
    return masks


@dataclasses.dataclass
class Regularised:
    """What --admm and --rew start from (see `start_regularised`)."""
    files: RunFiles
    data: Data
    model: torch.nn.Module
    rules: list
    teacher: Teacher | None
    source: str
    options: dict
    resume: dict | None


def start_regularised(args, env, spec, recipe, phase):
    """The start --admm and --rew share: check everything, load the dense model (unless resuming),
    lock the run directory (a fresh run moves an old one aside) and keep a copy of the profiles."""
    files = pruning_files(args)
    data, model, rules, teacher, teacher_path = pruning_setup(args, env, spec, recipe, args.config_file)
    source = args.load_path or find_baseline(args.ckpt_root, args.dataset, args.arch, args.data_location)
    options = run_options(args, spec, phase, data.classes, rules, source)
    resume = read_resume(files.resume(phase), options) if args.resume else None
    if resume is None:
        load_into(model, source, args.arch)

    begin(args, files, phase, resume is None, data, teacher_path)
    if resume is None:
        copy_profiles(args.config_file, files)
    return Regularised(files, data, model, rules, teacher, source, options, resume)


def run_admm(args, env, spec, recipe):
    run = start_regularised(args, env, spec, recipe, 'admm')
    files, data, model, teacher, source, options, resume = (run.files, run.data, run.model, run.teacher, run.source,
                                                            run.options, run.resume)
    rhos = [float(f"{args.rho * 10 ** i:.6g}") for i in range(args.rho_num)]
    ratios, types = pruning_args(run.rules)
    board = open_board(args.tensorboard, os.path.join(files.dir, 'tensorboard', 'admm'))
    schedule = lambda opt, steps: epoch_scheduler(opt, lambda e: admm_lr_factor(e, args.admm_epochs),  # noqa: E731
                                                  steps)
    first = resume['stage'] if resume else 0
    wrapped = placed(model, env, recipe)
    for stage in range(first, len(rhos)):
        rho = rhos[stage]
        if stage > first:
            load_into(model, files.stage(rhos[stage - 1]), args.arch)
        if not (resume and stage == first):
            log.info(f"stage {stage + 1}/{len(rhos)}: rho {rho:g}, starting from "
                     f"{source if stage == 0 else files.stage(rhos[stage - 1])}")
        state = admm.ADMM(model, ratios, rho, types, tuple(args.connectivity_block_size),
                          penalty=args.admm_penalty, update_every=args.admm_epochs)
        masks = keep_zeros(model) if args.combine_progressive else None
        meta = dict(model_meta(args.arch, spec, data.classes), options=options, stage=stage, rho=rho)
        history, _ = fit(wrapped, data, recipe, env, schedule, meta=meta, resume_path=files.resume('admm'),
                         resume=resume if stage == first else None, stage=stage, regulariser=state, masks=masks,
                         teacher=teacher, board=board)
        atomic_save(dict(meta, state_dict=model.state_dict(), epoch=args.epochs, top1=history['val_top1'][-1],
                         history=history, admm=state.state_dict()), files.stage(rho))
        log.info(f"stage {stage + 1} done: saved {files.stage(rho)}")
    save_curves(stage_histories(files, rhos), files.path(f"{files.name}_admm_curves"))
    return files.stage(rhos[-1])


def stage_histories(files, rhos):
    """Concatenate the per-stage histories saved in the stage files."""
    history = None
    for rho in rhos:
        if os.path.isfile(files.stage(rho)):
            h = read_checkpoint(files.stage(rho))[1].get('history', {})
            history = dict(h) if history is None else {k: history[k] + list(h.get(k, [])) for k in history}
    return history or {'val_top1': []}


def run_rew(args, env, spec, recipe):
    """Reweighted group regularisation (the follow-up's): task loss + penalty / profiles *
    sum_g alpha_g ||w_g||, alpha recomputed after each --rew-milestones epoch."""
    run = start_regularised(args, env, spec, recipe, 'rew')
    files, data, model, teacher, options, resume = (run.files, run.data, run.model, run.teacher, run.options,
                                                    run.resume)
    if resume is None:
        log.info(f"reweighted regularisation from {run.source}: penalty {args.penalty:g}, eps {args.rew_eps:g}, "
                 f"learning rate: {args.rew_lr}")
    ratios, types = pruning_args(run.rules)
    reg = admm.Reweighted(model, ratios, args.penalty, types, tuple(args.connectivity_block_size), eps=args.rew_eps,
                          milestones=args.rew_milestones)
    milestones = set(args.rew_milestones)
    schedule = lr_schedule(args) if args.rew_lr == 'scheduler' else \
        lambda opt, steps: epoch_scheduler(opt, lambda e: rew_lr_factor(e, milestones), steps)
    meta = dict(model_meta(args.arch, spec, data.classes), options=options)
    history, _ = fit(model, data, recipe, env, schedule, meta=meta, resume_path=files.resume('rew'), resume=resume,
                     regulariser=reg, masks=keep_zeros(model) if args.combine_progressive else None,
                     teacher=teacher, board=open_board(args.tensorboard, os.path.join(files.dir, 'tensorboard', 'rew')))
    atomic_save(dict(meta, state_dict=model.state_dict(), epoch=args.epochs, top1=history['val_top1'][-1],
                     history=history, rew=reg.state_dict()), files.rew)
    save_curves(history, files.path(f"{files.name}_rew_curves"))
    log.info(f"saved {files.rew}; prune and retrain it with --masked-retrain")
    return files.rew


def retrain_source(load_path, retrain_from, files, last_rho):
    """(model to hard-prune, method naming the result): --load-path (one-shot pruning), else the
    last ADMM stage or the --rew model (--retrain-from; auto takes whichever is newer)."""
    if load_path:
        return load_path, 'oneshot'
    choices = {'admm': files.stage(last_rho), 'rew': files.rew}
    if retrain_from != 'auto':
        return choices[retrain_from], retrain_from
    present = sorted((os.path.getmtime(f), m) for m, f in choices.items() if os.path.isfile(f))
    method = present[-1][1] if present else 'admm'
    return choices[method], method


def run_retrain(args, env, spec, recipe):
    files = pruning_files(args)
    source, method = retrain_source(args.load_path, args.retrain_from, files,
                                    float(f"{args.rho * 10 ** (args.rho_num - 1):.6g}"))
    stem = files.result(method)
    copies = method != 'oneshot' and all(os.path.isfile(p) for p in files.profiles)
    data, model, rules, teacher, teacher_path = pruning_setup(args, env, spec, recipe,
                                                               files.profiles if copies else args.config_file)
    options = run_options(args, spec, 'masked_retrain', data.classes, rules, source)
    resume = read_resume(stem + '_last.pt', options) if args.resume else None
    if resume is None:
        if not os.path.isfile(source):
            raise UserError(f"no model to retrain: {source} does not exist. Run the ADMM phase first "
                            f"(--admm with the same --arch, --dataset, --sparsity-type, --rho, --rho-num) or --rew, "
                            f"or pass --load-path MODEL for one-shot pruning of a trained model")
        load_into(model, source, args.arch)

    begin(args, files, 'retrain', False, data, teacher_path)
    if copies:
        log.info(f"profile: {', '.join(files.profiles)} (the copy the pruning phase saved)")
    if resume is None:
        ratios, types = pruning_args(rules)
        kept = admm.hard_prune(model, ratios, types, tuple(args.connectivity_block_size))
        if isinstance(kept, list):       # several profiles: one grid per profile and weight
            kept = {f"{t}/{n}": g for t, grids in zip(types, kept) for n, g in grids.items()}
        if is_main():
            np.savez_compressed(stem + '_kept.npz', **{k: v.numpy() for k, v in kept.items()})
        top1, _, _ = evaluate(model, data.val, env.device, args.max_batches)
        log.info(f"hard-pruned {source} ({method}): {len(kept)} weight grids, top-1 {top1:.2f} before "
                 f"retraining; kept-group index in {stem}_kept.npz")
    masks = admm.Masks(model)
    check_same_on_all_ranks(masks.masks, 'pruning masks')
    log.info(f"masks on {len(masks)} parameters" + (f", identical on {env.world} processes" if env.world > 1 else ""))
    history, best = fit(model, data, recipe, env, lr_schedule(args),
                        meta=dict(model_meta(args.arch, spec, data.classes), options=options),
                        resume_path=stem + '_last.pt', best_path=stem + '.pt', resume=resume, masks=masks,
                        teacher=teacher, board=open_board(args.tensorboard, os.path.join(files.dir, 'tensorboard',
                                                                                         'retrain')))
    save_curves(history, stem + '_curves')
    profiled = {n for r, _ in rules for n in r}
    for name, zeros in admm.sparsity_report(model, profiled).items():
        log.info(f"  {name:<32} sparsity {zeros:.3f}")
    final = finish(files, stem, best)
    log.info(f"retrained: best top-1 {best['top1']:.3f} at epoch {best['epoch']}; saved {final}")
    return final


def run_export(args, env, spec, recipe):
    """A checkpoint in compact form (kept groups and their index), and optionally ONNX."""
    from models.compact import export_onnx, load_compact, save_compact
    out = args.export_out or (args.export[:-3] if args.export.endswith('.pt') else args.export) + '.compact.pt'
    stem = out[:-3] if out.endswith('.pt') else out
    onnx_path, fast_path = stem + '.onnx', stem + '.fast.pt'
    for path in [out] + ([onnx_path] if args.onnx else []) + ([fast_path] if args.sparse_exec else []):
        if os.path.exists(path) and os.path.exists(args.export) and os.path.samefile(path, args.export):
            raise UserError(f"--export-out {path} is the checkpoint being exported: writing it would destroy it; "
                            f"choose another file")
        if os.path.exists(path) and not args.force:
            raise UserError(f"{path} exists: choose another --export-out, or pass --force to replace it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"folder {os.path.dirname(os.path.abspath(out))} of --export-out does not exist: create it")
    classes = spec.num_classes or KNOWN_CLASSES.get(args.dataset, 101)
    model = new_model(args.arch, classes, spec.num_frames, spec.crop, torch.device('cpu'))
    load_into(model, args.export, args.arch)
    state = model.state_dict()
    check_block(model, args.connectivity_block_size)
    types = list(dict.fromkeys(args.sparsity_type + ['irregular']))
    with written_atomically(out) as tmp:
        compact = save_compact(state, tmp, types, tuple(args.connectivity_block_size))
        restored = load_compact(tmp)
        if not all(torch.equal(restored[k], v) for k, v in state.items()):
            raise RuntimeError("compact round trip differs")
    log.info(f"{args.export}: {os.path.getsize(args.export) / 2**20:.1f} MiB -> {out}: "
             f"{os.path.getsize(out) / 2**20:.1f} MiB ({len(compact)} weights stored compactly; "
             f"models.compact.load_compact reads it back)")
    if args.sparse_exec:
        from models.slim import save_model
        model, _ = faster(model.eval(), args, torch.randn(1, 3, spec.num_frames, spec.crop, spec.crop))
        with written_atomically(fast_path) as tmp:
            save_model(model, tmp, args.arch, classes, num_frames=spec.num_frames, crop_size=spec.crop)
        log.info(f"wrote {fast_path} ({os.path.getsize(fast_path) / 2**20:.1f} MiB), the faster form for the CPU "
                 f"at batch 1: models.slim.load_model reads it")
    if args.onnx:
        export_onnx(model, onnx_path, (1, 3, spec.num_frames, spec.crop, spec.crop))
        form = ' of the faster form' if args.sparse_exec else ''
        log.info(f"wrote {onnx_path} ({os.path.getsize(onnx_path) / 2**20:.1f} MiB){form} "
                 f"for clips of 1x3x{spec.num_frames}x{spec.crop}x{spec.crop}")
    return out


def check_block(model, block_size):
    """--connectivity-block-size against the model's weights (admm.check_block_size), as a UserError."""
    try:
        admm.check_block_size([p.shape for p in model.parameters()], tuple(block_size))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def faster(model, args, clip):
    """`(fast, report)`: `model` (eval mode, float32, on the CPU or one device) in the fastest form this
    package has for its pruning (models.slim.faster_model), each KGS layer chosen by measuring it on
    `clip`; `report` adds the whole model's figures: dense and fast medians on `clip`, their ratio,
    and the largest output difference."""
    from models.slim import faster_model
    from models.sparse_conv import interleaved_medians
    dense = copy.deepcopy(model).eval()
    with torch.no_grad():      # not inference_mode: its tensors could not be traced for ONNX afterwards
        fast, report = faster_model(model, args.arch, args.sparsity_type, tuple(args.connectivity_block_size),
                                    example_input=clip)
        difference = (fast(clip) - dense(clip)).abs().max().item()
        dense_s, fast_s = interleaved_medians([lambda: dense(clip), lambda: fast(clip)], reps=5)
    kgs = [n for n, row in report['kgs'].items() if row['path'] == 'kgs']
    pruned = [n for n, row in report['kgs'].items() if row['reason'] != 'no zeros']
    report.update(dense_ms=1000 * dense_s, fast_ms=1000 * fast_s, speedup=dense_s / fast_s,
                  max_abs_difference=difference, kgs_layers=len(kgs), pruned_convs=len(pruned),
                  slim_layers=len(report['slim']))
    what = ([f"slim ({len(report['slim'])} layers narrowed)"] if report['slim'] else []) + \
        ([f"KGS execution in {len(kgs)} of {len(pruned)} pruned convs"] if report['kgs'] else [])
    log.info(f"sparse-exec: {' + '.join(what) or 'nothing to gain'}; {tuple(clip.shape)} clips: dense "
             f"{1000 * dense_s:.1f} ms, fast {1000 * fast_s:.1f} ms ({dense_s / fast_s:.2f}x, medians of 5); "
             f"largest output difference {difference:.2e}")
    return fast, report


def run_evaluate(args, env, spec, recipe):
    import profile_flops
    path = args.load_path or find_baseline(args.ckpt_root, args.dataset, args.arch, args.data_location)
    data = make_data(spec, env, need_train=False)
    model = new_model(args.arch, data.classes, spec.num_frames, spec.crop, env.device)
    meta = load_into(model, path, args.arch)
    for note in guard_bf16(model, recipe.amp_dtype, spec, env.device):
        log.info(note)
    report = profile_flops.profile(model, spec.num_frames, spec.crop)      # reads the model, on any device
    speed = None
    if args.sparse_exec:
        check_block(model, args.connectivity_block_size)
        clips, _ = next(iter(data.val))
        model, speed = faster(model.eval(), args, to_device(clips, env.device))
        net = model             # no DDP around it: nothing to synchronise, evaluate() sums over processes
    else:
        net = wrap(model, env, args.multi_gpu)
    top1, top5, loss = evaluate(net, data.val, env.device, args.max_batches, recipe.amp_dtype)
    for row in report['layers']:
        if row['density'] < 1:
            log.info(f"  {row['name']:<32} density {row['density']:.3f}")
    result = {'checkpoint': path, 'top1': top1, 'top5': top5, 'loss': loss,
              'flops_reduction': report['flops_reduction'], 'params_reduction': report['params_reduction'],
              'dense_gmacs': report['dense_macs'] / 1e9, 'pruned_gmacs': report['pruned_macs'] / 1e9,
              'epoch': meta.get('epoch')}
    if speed is not None:
        result['sparse_exec'] = {k: speed[k] for k in ('speedup', 'dense_ms', 'fast_ms', 'max_abs_difference',
                                                       'kgs_layers', 'pruned_convs', 'slim_layers')}
    log.info(f"{path}: top-1 {top1:.2f}  top-5 {top5:.2f}  loss {loss:.4f}  FLOPs reduction "
             f"{report['flops_reduction']:.2f}x ({result['pruned_gmacs']:.3f} of {result['dense_gmacs']:.3f} "
             f"GMACs)  parameters reduction {report['params_reduction']:.2f}x"
             + (f"  measured speedup {speed['speedup']:.2f}x" if speed else ''))
    if is_main():
        print("RESULT " + json.dumps(result, default=float))
    return result


PHASES = {'baseline': run_baseline, 'admm': run_admm, 'rew': run_rew, 'masked_retrain': run_retrain,
          'evaluate': run_evaluate, 'export': run_export}


def main(argv=None):
    args = parse_args(argv)
    env = setup_distributed(args.no_cuda)
    setup_logging()
    seed_everything(args.seed, 0, 0)        # the initial weights of a model trained from scratch
    try:
        return PHASES[args.phase](args, env, data_spec(args), recipe_of(args, env))
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
