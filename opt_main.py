"""RT3D pruning: train a dense baseline, ADMM-prune it, masked-retrain it, evaluate it.

    python opt_main.py --baseline --arch c3d --epochs 20
    python opt_main.py --admm --arch c3d --config-file c3d_3.57x --epochs 50
    python opt_main.py --masked-retrain --arch c3d --config-file c3d_3.57x --combine-progressive --warmup
    python opt_main.py --evaluate --arch c3d --load-path checkpoint/.../model.pt
    torchrun --nproc_per_node=4 opt_main.py --admm ...          # DistributedDataParallel

Files follow the original's layout (README, "Runs and files").
"""
import glob
import json
import logging
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import admm
from models import DEFAULT_GEOMETRY, CheckpointMismatch, build_model, load_weights, read_checkpoint
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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class UserError(RuntimeError):
    """A problem with the command line or the files it names (printed without a traceback)."""


# ----------------------------------------------------------------------------- processes and devices

def setup_distributed(args):
    """Read torchrun's environment; return (device, rank, world_size)."""
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    world = int(os.environ.get('WORLD_SIZE', 1))
    rank, local_rank = int(os.environ.get('RANK', 0)), int(os.environ.get('LOCAL_RANK', 0))
    if world > 1:
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group('nccl' if use_cuda else 'gloo')
    device = torch.device(f'cuda:{local_rank}' if use_cuda and world > 1 else 'cuda' if use_cuda else 'cpu')
    return device, rank, world


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


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


def seed_epoch(seed, stage, epoch):
    """Every epoch starts from RNG states fixed by (seed, stage, epoch), so a resumed run repeats
    exactly what an uninterrupted one would have done."""
    s = (seed * 1_000_003 + stage * 10_007 + epoch) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def setup_logging(path=None):
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    if not is_main():
        log.addHandler(logging.NullHandler())
        return

    class TqdmHandler(logging.Handler):   # console lines that do not break the progress bar
        def emit(self, record):
            if record.levelno >= logging.INFO and not getattr(record, 'file_only', False):
                tqdm.write(self.format(record), file=sys.stdout)

    console = TqdmHandler()
    console.setFormatter(logging.Formatter('%(message)s'))
    log.addHandler(console)
    if path:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%Y-%m-%d %H:%M:%S'))
        log.addHandler(handler)


# ----------------------------------------------------------------------------- files

def atomic_save(obj, path):
    """Write to a temporary file beside `path`, then rename: a kill at any moment leaves the
    previous file intact."""
    if not is_main():
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rho_values(args):
    return [float(f"{args.rho * 10 ** i:.6g}") for i in range(args.rho_num)]


def run_name(args):
    types = '+'.join(dict.fromkeys(args.sparsity_type))
    block = any(t in admm.BLOCK_TYPES for t in args.sparsity_type)
    gm, gn = args.connectivity_block_size
    return f"{args.dataset}_{args.arch}_{types}" + (f"-r{gm}c{gn}" if block else "")


def run_paths(args, method='admm'):
    """Files of a pruning run. `method` names the retrained model: after ADMM it is
    `{name}_{R}rhos` (the original's name), after --rew `{name}_rew_retrained`, and from any
    other model (--load-path: one-shot pruning) `{name}_oneshot`."""
    name = run_name(args)
    folder = os.path.join(args.ckpt_root, name)
    stem = {'admm': f"{name}_{args.rho_num}rhos", 'rew': f"{name}_rew_retrained", 'oneshot': f"{name}_oneshot"}
    retrained = stem[method] + ('_distill' if args.distill else '')
    profiles = [f"{name}.yaml"] if len(args.config_file) == 1 else \
        [f"{name}_{i + 1}.yaml" for i in range(len(args.config_file))]
    return {
        'dir': folder, 'name': name,
        'profiles': [os.path.join(folder, f) for f in profiles],
        'stage': lambda rho: os.path.join(folder, f"{name}_{rho:g}.pt"),
        'admm_resume': os.path.join(folder, f"{name}_admm_last.pt"),
        'rew': os.path.join(folder, f"{name}_rew.pt"),
        'rew_resume': os.path.join(folder, f"{name}_rew_last.pt"),
        'retrained': os.path.join(folder, retrained + '.pt'),
        'retrain_resume': os.path.join(folder, retrained + '_last.pt'),
        'kept': os.path.join(folder, retrained + '_kept.npz'),
        'curves': os.path.join(folder, retrained + '_curves'),
        'log': lambda phase: os.path.join(folder, f"{name}_{phase}.log"),
    }


def open_run(run, phase):
    """Start a pruning run's directory: a fresh --admm / --rew moves an existing one aside, keeps a
    copy of the profiles, and opens the phase's log. Returns (paths, model, rules)."""
    a, paths = run.args, run_paths(run.args)
    if is_main():
        if os.path.isdir(paths['dir']) and not a.resume:
            log.info(f"moved the previous run aside to {move_aside(paths['dir'])}")
        os.makedirs(paths['dir'], exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    setup_logging(paths['log'](phase))
    log_command(a)
    base = new_model(a, run.classes, run.device)
    rules = load_rules(a, base)
    if is_main() and not a.resume:
        for source, copy in zip(a.config_file, paths['profiles']):
            shutil.copyfile(admm.resolve_profile_path(source), copy)
    return paths, base, rules


def baseline_glob(args, arch=None):
    return os.path.join(args.ckpt_root, f"{args.dataset}_{arch or args.arch}_baseline_epoch-*_top1-*.pt")


def find_baseline(args, arch=None):
    """The original's baseline file if present, else the newest baseline this tool trained."""
    arch = arch or args.arch
    original = ORIGINAL_BASELINES.get((args.dataset, arch))
    if original and os.path.isfile(os.path.join(args.ckpt_root, original)):
        return os.path.join(args.ckpt_root, original)
    ours = sorted(glob.glob(baseline_glob(args, arch)), key=os.path.getmtime)
    if ours:
        return ours[-1]
    looked = ([os.path.join(args.ckpt_root, original)] if original else []) + [baseline_glob(args, arch)]
    raise UserError(
        f"no baseline checkpoint for {args.dataset} / {arch}: looked for {' and '.join(looked)}.\n"
        f"Download the original's baseline into {args.ckpt_root}/ (README, 'Baseline models'), pass "
        f"--load-path PATH, or train one: python opt_main.py --baseline --arch {arch} --dataset {args.dataset} "
        f"--data_location {args.data_location}")


def move_aside(folder):
    """Rename an existing run directory to `folder_v1`, `_v2`, ... instead of overwriting it."""
    n = 1
    while os.path.exists(f"{folder}_v{n}"):
        n += 1
    os.rename(folder, f"{folder}_v{n}")
    return f"{folder}_v{n}"


# ----------------------------------------------------------------------------- data

def geometry(args):
    g = DEFAULT_GEOMETRY[args.arch]
    crop = args.crop_size or g['crop_size']
    scale = tuple(args.scale_size) if args.scale_size else g['scale_range']
    if len(scale) == 1:
        scale = (scale[0], scale[0])
    return crop, scale


def clip_dataset(args, split, is_train):
    """`{data_location}/{dataset}_frame/{split}.lmdb` with `{split}.txt`, else the frame folders."""
    from dataset import VideoDataSet, VideoDataSetLMDB, get_augmentor
    root = os.path.join(args.data_location, f"{args.dataset}_frame")
    list_file = os.path.join(root, f"{split}.txt")
    if not os.path.isfile(list_file):
        raise UserError(f"list file {list_file} not found. Prepare the data first (README, 'Data preparation'): "
                        f"dataset/extract_videos.py writes it, dataset/create_lmdb.py the {split}.lmdb beside it; "
                        f"or point --data_location at the folder holding {args.dataset}_frame/")
    crop, scale = geometry(args)
    transform = get_augmentor(is_train, crop, scale if is_train else (scale[0], scale[0]))
    kw = dict(num_groups=args.num_frames, transform=transform, is_train=is_train,
              temporal_jitter=is_train and args.temporal_jitter)
    lmdb_path = os.path.join(root, f"{split}.lmdb")
    if os.path.exists(lmdb_path):
        return VideoDataSetLMDB(lmdb_path, list_file, **kw)
    log.info(f"{lmdb_path} not found: reading frame folders under {root}")
    return VideoDataSet(root, list_file, **kw)


def num_classes(args):
    if args.num_classes:
        return args.num_classes
    if args.dataset in KNOWN_CLASSES:
        return KNOWN_CLASSES[args.dataset]
    from dataset import num_classes_from_list
    root = os.path.join(args.data_location, f"{args.dataset}_frame")
    return max(num_classes_from_list(os.path.join(root, f"{s}.txt")) for s in ('train', 'val'))


def make_loaders(args, world, rank, need_train=True):
    val_set = clip_dataset(args, 'val', is_train=False)
    if world > 1:   # each rank a disjoint share, no padding: the summed counts are exact
        val_set = Subset(val_set, range(rank, len(val_set), world))
    common = dict(num_workers=args.workers, pin_memory=torch.cuda.is_available() and not args.no_cuda,
                  persistent_workers=False)
    val_loader = DataLoader(val_set, batch_size=args.test_batch_size or args.batch_size, shuffle=False, **common)
    if not need_train:
        return None, val_loader
    train_set = clip_dataset(args, 'train', is_train=True)
    generator = torch.Generator()
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            generator=generator, **common)
    else:
        loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                            generator=generator, **common)
    if len(loader) == 0:
        raise UserError(f"{len(train_set)} training clips make no full batch of {args.batch_size} per process: "
                        f"lower --batch-size")
    return loader, val_loader


def start_epoch_data(loader, seed):
    """Fix this epoch's shuffle order and worker seeds."""
    loader.generator.manual_seed(seed)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(seed)


# ----------------------------------------------------------------------------- models

def new_model(args, classes, device, pretrained=False, arch=None):
    crop, _ = geometry(args)
    return build_model(arch or args.arch, classes, num_frames=args.num_frames, crop_size=crop,
                       pretrained=pretrained).to(device)


def wrap(model, args, device, world):
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda'
                                                         else None)
    if args.multi_gpu and device.type == 'cuda' and torch.cuda.device_count() > 1:
        log.info(f"--multi-gpu: DataParallel over {torch.cuda.device_count()} GPUs "
                 f"(torchrun with DistributedDataParallel is faster)")
        return torch.nn.DataParallel(model)
    return model


def load_into(model, path, args, arch=None):
    try:
        return load_weights(model, path, arch=arch or args.arch)
    except CheckpointMismatch as exc:
        raise UserError(str(exc)) from None
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None


def make_optimizer(args, model):
    # The fused kernels update all parameters in one pass (C3D's 46-78 M parameters: 0.2 s less
    # per step on 2 CPU cores); the same arithmetic as the default implementation.
    if args.optmzr == 'adam':
        return torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=True)


def batches_per_epoch(loader, max_batches=None):
    """Batches one epoch trains on: the loader's, or fewer with --max-batches."""
    return len(loader) if max_batches is None else min(len(loader), max_batches)


def make_scheduler(args, optimizer, loader):
    """Per-batch schedule over `loader`'s epochs: optional linear warmup, then default / multistep / cosine."""
    sched = torch.optim.lr_scheduler
    iters_per_epoch = batches_per_epoch(loader, args.max_batches)
    warm = args.warmup_epochs * iters_per_epoch if args.warmup else 0
    total = args.epochs * iters_per_epoch
    if args.lr_scheduler == 'cosine':
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=args.lr * 1e-4)
    elif args.lr_scheduler == 'multistep':
        main = sched.MultiStepLR(optimizer, [max(1, e * iters_per_epoch - warm) for e in (45, 90, 120)], gamma=0.5)
    else:
        main = sched.StepLR(optimizer, step_size=max(1, round(0.2 * args.epochs)) * iters_per_epoch, gamma=0.5)
    if not warm:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=args.warmup_lr / args.lr, end_factor=1.0, total_iters=warm)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warm])


def admm_lr_scheduler(args, optimizer):
    """The original's ADMM rhythm, stepped per epoch: back to --lr at the start of every
    --admm-epochs window, halved every admm_epochs // 3 epochs within it."""
    step = max(1, args.admm_epochs // 3)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 ** ((k % args.admm_epochs) // step))


# ----------------------------------------------------------------------------- one epoch

class Teacher:
    """A frozen dense model whose softened outputs the student matches."""

    def __init__(self, model, temperature, coefficient):
        self.model, self.t, self.c = model.eval(), temperature, coefficient

    def loss(self, task_loss, logits, clips):
        with torch.no_grad():
            target = self.model(clips)
        kd = F.kl_div(F.log_softmax(logits / self.t, dim=1), F.softmax(target / self.t, dim=1),
                      reduction='batchmean') * self.t ** 2
        return (1 - self.c) * task_loss + self.c * kd


def train_one_epoch(model, loader, optimizer, criterion, device, epoch, *, scheduler=None, penalty=None,
                    masks=None, teacher=None, mixup_alpha=0.0, scaler=None, log_interval=10, max_batches=None):
    """One pass over `loader`; returns (mean task loss, top-1 %). `penalty` is a callable adding the
    pruning regulariser (ADMM), `masks` keeps pruned weights at zero, `scheduler` steps per batch."""
    model.train()
    amp = scaler is not None and scaler.is_enabled()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    batches = batches_per_epoch(loader, max_batches)
    # A terminal gets a lively bar; a log file (no terminal) a line every 30 s instead of hundreds.
    bar = tqdm(total=batches, desc=f"epoch {epoch}", leave=False, disable=not is_main(), dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)
    for i, (clips, labels) in enumerate(loader):
        if i >= batches:
            break
        clips, labels = clips.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if mixup_alpha > 0:
            lam = float(np.random.beta(mixup_alpha, mixup_alpha))
            perm = torch.randperm(clips.shape[0], device=device)
            clips = lam * clips + (1 - lam) * clips[perm]
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(clips)
            if mixup_alpha > 0:
                task = lam * criterion(logits, labels) + (1 - lam) * criterion(logits, labels[perm])
            else:
                task = criterion(logits, labels)
            loss = teacher.loss(task, logits, clips) if teacher else task
        if penalty is not None:
            loss = loss + penalty()
        # One device-to-host copy per batch for the finiteness check and the running figures.
        loss_value, task_value, hits = torch.stack([loss.detach().float(), task.detach().float(),
                                                    (logits.argmax(1) == labels).sum().float()]).tolist()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"the loss became {loss_value} at epoch {epoch}, batch {i + 1}: lower --lr "
                                   f"(or --rho); nothing of this epoch was saved")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if masks is not None:
            masks.apply_to_grads()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()

        total_loss += task_value * labels.shape[0]
        correct += int(hits)
        seen += labels.shape[0]
        rate = seen / (time.perf_counter() - start)
        lr = optimizer.param_groups[0]['lr']
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}", lr=f"{lr:.2e}",
                        clips_s=f"{rate:.1f}", refresh=False)
        bar.update()
        if (i + 1) % log_interval == 0 or i + 1 == batches:
            log.info(f"epoch {epoch} batch {i + 1}/{batches} loss {task_value:.4f} "
                     f"total {loss_value:.4f} lr {lr:.3e} {rate:.1f} clips/s", extra={'file_only': True})
    bar.close()
    stats = torch.tensor([total_loss, correct, seen], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / stats[2]).item(), (100 * stats[1] / stats[2]).item()


@torch.no_grad()
def evaluate(model, loader, device, max_batches=None):
    """Top-1 %, top-5 % and mean loss over the validation set (summed over processes)."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)
    for i, (clips, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        clips, labels = clips.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(clips)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        # Summed on the device: no host round trip per batch.
        stats += torch.stack([(top5[:, 0] == labels).sum().double(), (top5 == labels[:, None]).any(1).sum().double(),
                              F.cross_entropy(logits, labels, reduction='sum').double(),
                              torch.tensor(labels.shape[0], dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(stats)
    n = max(stats[3].item(), 1)
    return 100 * stats[0].item() / n, 100 * stats[1].item() / n, stats[2].item() / n


# ----------------------------------------------------------------------------- shared phase machinery

class Run:
    """What every phase needs: device, data, criterion, teacher, history, and checkpoint helpers."""

    def __init__(self, args, device, rank, world):
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.classes = num_classes(args)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.smooth_eps)
        self.scaler = torch.amp.GradScaler('cuda', enabled=args.amp and device.type == 'cuda')
        if args.amp and device.type != 'cuda':
            log.info("--amp needs CUDA: training in float32")
        self.history = {k: [] for k in ('train_loss', 'train_top1', 'val_loss', 'val_top1', 'val_top5', 'lr')}

    def loaders(self, need_train=True):
        self.train_loader, self.val_loader = make_loaders(self.args, self.world, self.rank, need_train)

    def teacher(self):
        a = self.args
        if not a.distill:
            return None
        arch = a.teacharch or a.arch
        path = a.teacher_path or find_baseline(a, arch)
        model = new_model(a, self.classes, self.device, arch=arch)
        load_into(model, path, a, arch)
        log.info(f"distilling from {path} (T={a.temperature}, coefficient {a.kd_coefficient})")
        return Teacher(model, a.temperature, a.kd_coefficient)

    def epoch(self, model, optimizer, epoch, epochs, stage=0, **kw):
        """Train one epoch and validate; append to history; return val top-1."""
        a = self.args
        start_epoch_data(self.train_loader, seed_epoch(a.seed, stage, epoch))
        tick = time.perf_counter()
        teacher = kw.pop('teacher', None)
        if teacher is not None and epoch > epochs - 5:
            teacher = None     # the original trains the last 5 epochs on the labels alone
        lr = optimizer.param_groups[0]['lr']
        loss, top1 = train_one_epoch(model, self.train_loader, optimizer, self.criterion, self.device, epoch,
                                     teacher=teacher, mixup_alpha=a.alpha, scaler=self.scaler,
                                     log_interval=a.log_interval, max_batches=a.max_batches, **kw)
        v1, v5, vloss = evaluate(model, self.val_loader, self.device, a.max_batches)
        for k, v in zip(self.history, (loss, top1, vloss, v1, v5, lr)):
            self.history[k].append(v)
        log.info(f"epoch {epoch}/{epochs}: train loss {loss:.4f} top-1 {top1:.2f} | val loss {vloss:.4f} "
                 f"top-1 {v1:.2f} top-5 {v5:.2f} | lr {lr:.2e} | {time.perf_counter() - tick:.0f} s")
        return v1

    def checkpoint(self, model, **extra):
        a = self.args
        crop, _ = geometry(a)
        return {'state_dict': unwrap(model).state_dict(), 'arch': a.arch, 'num_classes': self.classes,
                'num_frames': a.num_frames, 'crop_size': crop, 'history': dict(self.history), **extra}

    def resume_state(self, optimizer, scheduler):
        return {'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'rng': torch.get_rng_state(),
                'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                'scaler': self.scaler.state_dict()}

    def restore(self, resume, model, optimizer, scheduler):
        """Load a resume file read by `read_resume` (written by `checkpoint(..., **resume_state(...))`);
        return its dict."""
        path, state, meta = resume
        unwrap(model).load_state_dict(state)
        optimizer.load_state_dict(meta['optimizer'])
        scheduler.load_state_dict(meta['scheduler'])
        torch.set_rng_state(meta['rng'])
        if meta.get('cuda_rng') and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(meta['cuda_rng'])
        if meta.get('scaler'):
            self.scaler.load_state_dict(meta['scaler'])
        self.history = {k: list(v) for k, v in meta['history'].items()}
        log.info(f"resumed from {path} after epoch {meta['epoch']}")
        return meta


def read_resume(path):
    """`(path, state dict, other entries)` of the resume file `path`, or a message when there is none."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: nothing to resume, {path} does not exist (run without --resume)")
    return (path, *read_checkpoint(path))


def log_command(args):
    log.info("command: " + " ".join(sys.argv))
    log.info("options: " + json.dumps({k: v for k, v in vars(args).items() if k != 'max_batches'}, default=str))


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


def load_rules(args, model):
    """[(prune_ratios, sparsity_type)] for the profiles on the command line."""
    try:
        return [(admm.load_profile(c, unwrap(model)), t) for c, t in zip(args.config_file, args.sparsity_type)]
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise UserError(exc.args[0] if exc.args else str(exc)) from None


def pruning_args(rules):
    """ADMM / hard_prune take one profile and type, or lists of both (masks multiply)."""
    if len(rules) == 1:
        return rules[0]
    return [r for r, _ in rules], [t for _, t in rules]


# ----------------------------------------------------------------------------- phases

def train_keeping_best(run, model, optimizer, scheduler, start, best, best_path, resume_path, **kw):
    """Epochs `start..--epochs` with a per-batch scheduler. The best-top-1 model is kept at
    `best_path` and renamed `..._epoch-{E}_top1-{acc:.3f}.pt` at the end; a resume file is
    written after every epoch. Returns the final path and the best epoch."""
    a = run.args
    for epoch in range(start, a.epochs + 1):
        top1 = run.epoch(model, optimizer, epoch, a.epochs, scheduler=scheduler, **kw)
        if top1 > best['top1']:
            best = {'top1': top1, 'epoch': epoch}
            atomic_save(run.checkpoint(model, epoch=epoch, top1=top1), best_path)
        atomic_save(run.checkpoint(model, epoch=epoch, top1=top1, best=best,
                                   **run.resume_state(optimizer, scheduler)), resume_path)
    final = f"{best_path[:-3]}_epoch-{best['epoch']}_top1-{best['top1']:.3f}.pt"
    if is_main() and os.path.exists(best_path):
        os.replace(best_path, final)
    return final, best


def run_baseline(run):
    a = run.args
    stem = os.path.join(a.ckpt_root, f"{a.dataset}_{a.arch}_baseline")
    os.makedirs(a.ckpt_root, exist_ok=True)
    setup_logging(stem + '.log')
    log_command(a)
    run.loaders()
    model = new_model(a, run.classes, run.device, pretrained=a.arch == 'r2+1d-pretrained' and not a.load_path)
    if a.load_path:
        load_into(model, a.load_path, a)
    model = wrap(model, a, run.device, run.world)
    optimizer = make_optimizer(a, model)
    scheduler = make_scheduler(a, optimizer, run.train_loader)
    start, best = 1, {'top1': -1.0, 'epoch': 0}
    if a.resume:
        meta = run.restore(read_resume(stem + '_last.pt'), model, optimizer, scheduler)
        start, best = meta['epoch'] + 1, meta['best']
    final, best = train_keeping_best(run, model, optimizer, scheduler, start, best, stem + '.pt', stem + '_last.pt',
                                     teacher=run.teacher())
    save_curves(run.history, stem + '_curves')
    log.info(f"baseline: best top-1 {best['top1']:.3f} at epoch {best['epoch']}; saved {final}")
    return final


def run_admm(run):
    a = run.args
    paths, base, rules = open_run(run, 'admm')
    run.loaders()
    rhos = rho_values(a)
    start_stage, start_epoch, resume = 0, 1, None
    if a.resume:
        resume = read_resume(paths['admm_resume'])
        start_stage, start_epoch = resume[2]['stage'], resume[2]['epoch'] + 1
    teacher = run.teacher()
    ratios, types = pruning_args(rules)
    for stage in range(start_stage, len(rhos)):
        rho = rhos[stage]
        source = (a.load_path or find_baseline(a)) if stage == 0 else paths['stage'](rhos[stage - 1])
        if resume is None:
            load_into(base, source, a)
            log.info(f"stage {stage + 1}/{len(rhos)}: rho {rho:g}, starting from {source}")
        model = wrap(base, a, run.device, run.world)
        optimizer = make_optimizer(a, model)
        scheduler = admm_lr_scheduler(a, optimizer)
        state = admm.ADMM(base, ratios, rho, types, tuple(a.connectivity_block_size), penalty=a.admm_penalty)
        if resume is not None:
            state.load_state_dict(run.restore(resume, model, optimizer, scheduler)['admm'])
            resume = None
        else:
            state.initialize()
            start_epoch = 1
        check_same_on_all_ranks(list(state.Z.values()) + list(state.U.values()), 'ADMM Z and U')
        masks = admm.Masks(base, weights_only=True) if a.combine_progressive else None
        if masks is not None:
            log.info(f"--combine-progressive: keeping the zeros of {len(masks)} weights")
        for epoch in range(start_epoch, a.epochs + 1):
            if epoch != 1 and (epoch - 1) % a.admm_epochs == 0:
                state.update()
                check_same_on_all_ranks(list(state.Z.values()) + list(state.U.values()), 'ADMM Z and U')
                log.info(f"epoch {epoch}: Z and U updated" + (f" (identical on {run.world} processes)"
                                                               if run.world > 1 else ""))
            run.epoch(model, optimizer, epoch, a.epochs, stage=stage, penalty=state.loss, masks=masks,
                      teacher=teacher)
            scheduler.step()
            if epoch % a.admm_epochs == 0 or epoch == a.epochs:
                log_convergence(state)
            atomic_save(run.checkpoint(model, epoch=epoch, stage=stage, rho=rho, admm=state.state_dict(),
                                       **run.resume_state(optimizer, scheduler)), paths['admm_resume'])
        atomic_save(run.checkpoint(model, epoch=a.epochs, rho=rho, top1=run.history['val_top1'][-1],
                                   admm=state.state_dict()), paths['stage'](rho))
        log.info(f"stage {stage + 1} done: saved {paths['stage'](rho)}")
        run.history = {k: [] for k in run.history}
    save_curves(run_history_from_stages(paths, rhos), os.path.join(paths['dir'], f"{paths['name']}_admm_curves"))
    return paths['stage'](rhos[-1])


def run_history_from_stages(paths, rhos):
    """Concatenate the per-stage histories saved in the stage files."""
    history = None
    for rho in rhos:
        if not os.path.isfile(paths['stage'](rho)):
            continue
        h = read_checkpoint(paths['stage'](rho))[1].get('history', {})
        history = {k: v for k, v in h.items()} if history is None else \
            {k: history[k] + list(h.get(k, [])) for k in history}
    return history or {'val_top1': []}


def log_convergence(state):
    for name, row in state.report().items():
        log.info(f"  {name:<32} |w|<1e-4: {row['near_zero']:.3f}  ||W-Z||/||W||: {row['distance']:.4f}")


def retrain_source(a):
    """(model to hard-prune, method naming the result): --load-path (one-shot pruning), else the
    last ADMM stage or the --rew model (--retrain-from; auto takes whichever is newer)."""
    if a.load_path:
        return a.load_path, 'oneshot'
    paths = run_paths(a)
    choices = {'admm': paths['stage'](rho_values(a)[-1]), 'rew': paths['rew']}
    if a.retrain_from != 'auto':
        return choices[a.retrain_from], a.retrain_from
    present = sorted((os.path.getmtime(f), m) for m, f in choices.items() if os.path.isfile(f))
    method = present[-1][1] if present else 'admm'
    return choices[method], method


def run_retrain(run):
    a = run.args
    source, method = retrain_source(a)
    paths = run_paths(a, method)
    if is_main():
        os.makedirs(paths['dir'], exist_ok=True)
    setup_logging(paths['log']('retrain'))
    log_command(a)
    base = new_model(a, run.classes, run.device)
    if method != 'oneshot' and all(os.path.isfile(p) for p in paths['profiles']):
        log.info(f"profile: {', '.join(paths['profiles'])} (the copy the pruning phase saved)")
        a.config_file = paths['profiles']
    rules = load_rules(a, base)
    resume = read_resume(paths['retrain_resume']) if a.resume else None
    if not a.resume and not os.path.isfile(source):
        raise UserError(f"no model to retrain: {source} does not exist. Run the ADMM phase first "
                        f"(--admm with the same --arch, --dataset, --sparsity-type, --rho, --rho-num) or --rew, "
                        f"or pass --load-path MODEL for one-shot pruning of a trained model")
    run.loaders()
    model = wrap(base, a, run.device, run.world)
    optimizer = make_optimizer(a, model)
    scheduler = make_scheduler(a, optimizer, run.train_loader)
    start, best = 1, {'top1': -1.0, 'epoch': 0}
    if a.resume:
        meta = run.restore(resume, model, optimizer, scheduler)
        start, best = meta['epoch'] + 1, meta['best']
    else:
        load_into(base, source, a)
        ratios, types = pruning_args(rules)
        kept = admm.hard_prune(base, ratios, types, tuple(a.connectivity_block_size))
        if isinstance(kept, list):       # several profiles: one grid per profile and weight
            kept = {f"{t}/{n}": g for t, grids in zip(types, kept) for n, g in grids.items()}
        if is_main():
            np.savez_compressed(paths['kept'], **{k: v.numpy() for k, v in kept.items()})
        top1, _, _ = evaluate(model, run.val_loader, run.device, a.max_batches)
        log.info(f"hard-pruned {source} ({method}): {len(kept)} weight grids, top-1 {top1:.2f} before "
                 f"retraining; kept-group index in {paths['kept']}")
    masks = admm.Masks(base)
    check_same_on_all_ranks(masks.masks, 'pruning masks')
    log.info(f"masks on {len(masks)} parameters" + (f", identical on {run.world} processes"
                                                     if run.world > 1 else ""))
    final, best = train_keeping_best(run, model, optimizer, scheduler, start, best, paths['retrained'],
                                     paths['retrain_resume'], masks=masks, teacher=run.teacher())
    save_curves(run.history, paths['curves'])
    log_sparsity(unwrap(model), rules)
    log.info(f"retrained: best top-1 {best['top1']:.3f} at epoch {best['epoch']}; saved {final}")
    return final


def run_rew(run):
    """Reweighted group regularisation: task loss + penalty * sum_g alpha_g ||w_g||, alpha
    recomputed at the start and at --rew-milestones epochs."""
    a = run.args
    paths, base, rules = open_run(run, 'rew')
    run.loaders()
    model = wrap(base, a, run.device, run.world)
    optimizer = make_optimizer(a, model)
    scheduler = make_scheduler(a, optimizer, run.train_loader)
    ratios, types = pruning_args(rules)
    reg = admm.Reweighted(base, ratios, a.penalty, types, tuple(a.connectivity_block_size), eps=a.rew_eps)
    start = 1
    if a.resume:
        meta = run.restore(read_resume(paths['rew_resume']), model, optimizer, scheduler)
        reg.load_state_dict(meta['rew'])
        start = meta['epoch'] + 1
    else:
        source = a.load_path or find_baseline(a)
        load_into(base, source, a)
        reg.reweight()
        log.info(f"reweighted regularisation from {source}: penalty {a.penalty:g}, eps {a.rew_eps:g}")
    masks = admm.Masks(base, weights_only=True) if a.combine_progressive else None
    teacher = run.teacher()
    for epoch in range(start, a.epochs + 1):
        if epoch in a.rew_milestones and epoch != 1:
            reg.reweight()
            log.info(f"epoch {epoch}: group weights recomputed")
        run.epoch(model, optimizer, epoch, a.epochs, scheduler=scheduler, penalty=reg.loss, masks=masks,
                  teacher=teacher)
        if epoch in a.rew_milestones or epoch == a.epochs:
            for name, row in reg.report().items():
                log.info(f"  {name:<32} |w|<1e-4: {row['near_zero']:.3f}  small groups: {row['small_groups']:.3f}")
        atomic_save(run.checkpoint(model, epoch=epoch, rew=reg.state_dict(),
                                   **run.resume_state(optimizer, scheduler)), paths['rew_resume'])
    atomic_save(run.checkpoint(model, epoch=a.epochs, top1=run.history['val_top1'][-1], rew=reg.state_dict()),
                paths['rew'])
    save_curves(run.history, os.path.join(paths['dir'], f"{paths['name']}_rew_curves"))
    log.info(f"saved {paths['rew']}; prune and retrain it with --masked-retrain")
    return paths['rew']


def run_export(run):
    """A checkpoint in compact form (kept groups and their index), and optionally ONNX."""
    from models.compact import export_onnx, load_compact, save_compact
    a = run.args
    setup_logging()
    out = a.export_out or (a.export[:-3] if a.export.endswith('.pt') else a.export) + '.compact.pt'
    model = new_model(a, run.classes, torch.device('cpu'))
    load_into(model, a.export, a)
    state = model.state_dict()
    types = list(dict.fromkeys(a.sparsity_type + ['irregular']))
    compact = save_compact(state, out, types, tuple(a.connectivity_block_size))
    restored = load_compact(out)
    assert all(torch.equal(restored[k], v) for k, v in state.items()), "compact round trip differs"
    log.info(f"{a.export}: {os.path.getsize(a.export) / 2**20:.1f} MiB -> {out}: {os.path.getsize(out) / 2**20:.1f} "
             f"MiB ({len(compact)} weights stored compactly; models.compact.load_compact reads it back)")
    if a.onnx:
        crop, _ = geometry(a)
        onnx_path = out[:-3] + '.onnx' if out.endswith('.pt') else out + '.onnx'
        export_onnx(model, onnx_path, (1, 3, a.num_frames, crop, crop))
        log.info(f"wrote {onnx_path} ({os.path.getsize(onnx_path) / 2**20:.1f} MiB) for clips of "
                 f"1x3x{a.num_frames}x{crop}x{crop}")
    return out


def log_sparsity(model, rules):
    profiled = {n for r, _ in rules for n in r}
    for name, zeros in admm.sparsity_report(model, profiled).items():
        log.info(f"  {name:<32} sparsity {zeros:.3f}")


def run_evaluate(run):
    import profile_flops
    a = run.args
    setup_logging()
    path = a.load_path or find_baseline(a)
    model = new_model(a, run.classes, run.device)
    meta = load_into(model, path, a)
    run.loaders(need_train=False)
    top1, top5, loss = evaluate(wrap(model, a, run.device, run.world), run.val_loader, run.device, a.max_batches)
    crop, _ = geometry(a)
    report = profile_flops.profile(model.cpu(), a.num_frames, crop)
    pruned = [row for row in report['layers'] if row['density'] < 1]
    for row in pruned:
        log.info(f"  {row['name']:<32} density {row['density']:.3f}")
    result = {'checkpoint': path, 'top1': top1, 'top5': top5, 'loss': loss,
              'flops_reduction': report['flops_reduction'], 'params_reduction': report['params_reduction'],
              'dense_gmacs': report['dense_macs'] / 1e9, 'pruned_gmacs': report['pruned_macs'] / 1e9,
              'epoch': meta.get('epoch')}
    log.info(f"{path}: top-1 {top1:.2f}  top-5 {top5:.2f}  loss {loss:.4f}  FLOPs reduction "
             f"{report['flops_reduction']:.2f}x ({result['pruned_gmacs']:.3f} of {result['dense_gmacs']:.3f} "
             f"GMACs)  parameters reduction {report['params_reduction']:.2f}x")
    if is_main():
        print("RESULT " + json.dumps(result))
    return result


def main(argv=None):
    args = parse_args(argv)
    device, rank, world = setup_distributed(args)
    setup_logging()
    torch.manual_seed(args.seed)
    try:
        run = Run(args, device, rank, world)
        phase = {'baseline': run_baseline, 'admm': run_admm, 'rew': run_rew, 'masked_retrain': run_retrain,
                 'evaluate': run_evaluate, 'export': run_export}[args.phase]
        return phase(run)
    except (UserError, TrainingDiverged) as exc:
        log.error(f"error: {exc}")
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
