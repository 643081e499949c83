"""The one training loop: `train_step` (one batch), `train_one_epoch`, `evaluate` and `fit`.

Where the pruning enters, all in `train_step`: the teacher's distillation term and the
regulariser's penalty (ADMM or reweighted) are added to the loss; the masks zero the gradients of
pruned weights before the optimiser steps. `fit` starts the regulariser with the stage, lets it
update before the epochs it is due (`on_epoch`), and writes the resume point after every epoch.
"""
import contextlib
import dataclasses
import re
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoints import checkpoint
from .data import Data, to_device
from .files import atomic_save
from .optim import make_optimizer, steps_per_epoch
from .runtime import (
    Env,
    TrainingDiverged,
    UserError,
    check_same_on_all_ranks,
    is_main,
    log,
    seed_everything,
    unwrap,
    wrap,
)

HISTORY_KEYS = ('train_loss', 'train_top1', 'val_loss', 'val_top1', 'val_top5', 'lr')
REPORT_LABELS = {'distance': '||W-Z||/||W||', 'small_groups': 'small groups'}


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


class Teacher:
    """A frozen dense model whose softened outputs the student matches. The original's term, mixed
    with the task loss as `(1 - c) * task + c * kd`: the soft cross-entropy
    `-(log_softmax(s / T) * softmax(t / T)).sum(1).mean()`, without a T**2 factor. The teacher runs in
    eval mode (`train_mode=False`, ours: dropout off, BatchNorm's running statistics) or, as the
    original left it, in train mode."""

    def __init__(self, model, temperature, coefficient, train_mode=False):
        self.model, self.t, self.c = model.train(train_mode), temperature, coefficient
        self.model.requires_grad_(False)

    def loss(self, task_loss, logits, clips):
        with torch.no_grad():
            target = self.model(clips)
        kd = -(F.log_softmax(logits.float() / self.t, dim=1) * F.softmax(target.float() / self.t, dim=1)).sum(1).mean()
        return (1 - self.c) * task_loss + self.c * kd


@dataclasses.dataclass
class Updater:
    """The optimiser with its per-step scheduler and, under fp16, the gradient scaler."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None
    epoch_lr: float | None = None      # the rate of the current epoch's first batch (its history entry)

    def begin(self):
        """Start a step: zero the gradients and move the learning rate on. The original steps its
        scheduler before each batch's forward pass, so the first batch already runs at step 1's rate."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():     # torch warns when a scheduler steps before the first optimiser step
            warnings.filterwarnings('ignore', message=re.escape('Detected call of `lr_scheduler.step()`'))
            self.scheduler.step()

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self):
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    @property
    def lr(self):
        return self.optimizer.param_groups[0]['lr']


@dataclasses.dataclass(frozen=True)
class Group:
    """Where a batch stands in its gradient-accumulation group."""
    first: bool        # zero the gradients before it
    size: int          # batches in the group (the last group of an epoch may be shorter)
    last: bool         # step after it


def train_step(model, clips, labels, criterion, updater, recipe, group, *, regulariser=None, masks=None,
               teacher=None):
    """One batch: forward, loss, backward, and at the end of its accumulation group the masked step.
    Returns (task loss, total loss, logits), detached."""
    if group.first:
        updater.begin()                             # zero the gradients, step the learning rate
    if recipe.mixup_alpha > 0:
        lam = float(np.random.beta(recipe.mixup_alpha, recipe.mixup_alpha))
        perm = torch.randperm(clips.shape[0], device=clips.device)
        clips = lam * clips + (1 - lam) * clips[perm]
    # Only the group's last backward all-reduces the gradients under DDP.
    sync = contextlib.nullcontext() if group.last or not hasattr(model, 'no_sync') else model.no_sync()
    with sync:
        with torch.autocast(clips.device.type, dtype=recipe.amp_dtype, enabled=recipe.amp_dtype is not None):
            logits = model(clips)
            if recipe.mixup_alpha > 0:
                task = lam * criterion(logits, labels) + (1 - lam) * criterion(logits, labels[perm])
            else:
                task = criterion(logits, labels)
            loss = teacher.loss(task, logits, clips) if teacher else task       # distillation
        if regulariser is not None:
            loss = loss + regulariser.loss()        # ADMM / reweighted penalty: float32, on the float32 weights
        updater.backward(loss / group.size)
    if group.last:
        if masks is not None:
            masks.apply_to_grads()                  # pruned weights stay exactly zero
        updater.step()
    return task.detach(), loss.detach(), logits.detach()


def batches_per_epoch(loader, max_batches: int | None = None) -> int:
    """Batches one epoch trains on: the loader's, or fewer with --max-batches."""
    return len(loader) if max_batches is None else min(len(loader), max_batches)


def train_one_epoch(model, loader, updater, criterion, device, epoch, recipe, *, regulariser=None, masks=None,
                    teacher=None):
    """One pass over `loader`; returns (mean task loss, top-1 %).

    Gradients are accumulated over `recipe.accum_steps` batches (each loss divided by the batches
    in its group, so a step sees what one big batch would). Running figures stay on the device and
    are read back every `log_interval` batches, where a non-finite loss stops the run naming its batch.
    """
    model.train()
    batches = batches_per_epoch(loader, recipe.max_batches)
    accum = recipe.accum_steps
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
        group_start = i - i % accum
        size = min(accum, batches - group_start)                         # the last group may be shorter
        group = Group(first=i == group_start, size=size, last=i + 1 == group_start + size)
        task, loss, logits = train_step(model, clips, labels, criterion, updater, recipe, group,
                                        regulariser=regulariser, masks=masks, teacher=teacher)
        if i == 0:
            updater.epoch_lr = updater.lr
        with torch.no_grad():
            seen += labels.shape[0]
            sums += torch.stack([task.double() * labels.shape[0], (logits.argmax(1) == labels).sum().double()])
            first_bad = torch.where(torch.isfinite(loss) | (first_bad < batches), first_bad, i)
        bar.update()
        if (i + 1) % recipe.log_interval == 0 or i + 1 == batches:
            bad = int(first_bad)                    # the one host read-back per log interval
            if bad < batches:
                raise TrainingDiverged(f"the loss became non-finite at epoch {epoch}, batch {bad + 1}: lower --lr "
                                       f"(or --rho / --penalty); nothing of this epoch was saved")
            total, correct = sums.tolist()
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{100 * correct / seen:.1f}", lr=f"{updater.lr:.2e}",
                            clips_s=f"{rate:.1f}", refresh=False)
            log.info(f"epoch {epoch} batch {i + 1}/{batches} loss {task.item():.4f} total {loss.item():.4f} "
                     f"lr {updater.lr:.3e} {rate:.1f} clips/s", extra={'file_only': True})
    bar.close()
    totals = torch.cat([sums, torch.tensor([float(seen)], dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    total, correct, seen = totals.tolist()
    return total / seen, 100 * correct / seen


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, max_batches: int | None = None,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> tuple:
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


def log_report(regulariser, board=None, step: int = 0) -> None:
    """The regulariser's per-weight figures, in the log (the original's `Weight < 1e-4:` lines, then
    ours) and on TensorBoard."""
    log.info("Weight < 1e-4:")
    for name, row in regulariser.report().items():
        w = regulariser.params[name].detach()
        zeros, size = int((w.abs() < 1e-4).sum()), w.numel()
        log.info(f"  {name}: {zeros}/{size} = {zeros / size:.4f}   " +
                 "  ".join(f"{REPORT_LABELS[k]}: {v:.4f}" for k, v in row.items() if k in REPORT_LABELS))
        if board is not None:
            for k, v in row.items():
                board.add_scalar(f"{k}/{name}", v, step)


def placed(model: torch.nn.Module, env: Env, recipe: Recipe) -> torch.nn.Module:
    """The model in its memory format, wrapped for data parallelism (once per phase: DDP keeps
    references to the parameters)."""
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    return wrap(model, env, recipe.multi_gpu)


def new_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimiser over `model`'s parameters (the foreach kind under an fp16 scaler)."""
    return make_optimizer(model.parameters(), recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay,
                          scaled=recipe.amp_dtype == torch.float16)


def fit(model, data: Data, recipe: Recipe, env: Env, schedule, *, meta, resume_path, best_path=None, resume=None,
        stage=0, regulariser=None, masks=None, teacher=None, board=None, optimizer=None):
    """Train `model` for `recipe.epochs` epochs (from where `resume` stopped), validating after each.

    `schedule(optimizer, steps_per_epoch)` builds the per-step learning-rate scheduler; `optimizer`
    continues one of an earlier stage (the original's multi-rho ADMM keeps one), else a new one. The
    regulariser (admm.ADMM or admm.Reweighted) starts with the stage, updates before the epochs it
    is due (`on_epoch`) and adds its loss to every batch; `masks` keep zero weights at zero; the
    teacher distils except in the last 5 epochs. After every epoch the resume point goes to
    `resume_path` (model, optimiser, scheduler, regulariser, epoch, best, `meta`); the best-top-1
    model to `best_path` if given. Returns (history, best)."""
    base = unwrap(model)
    wrapped = model if model is not base else placed(model, env, recipe)
    scaler = torch.amp.GradScaler(env.device.type, enabled=recipe.amp_dtype == torch.float16)
    optimizer = optimizer or new_optimizer(base, recipe)
    steps = steps_per_epoch(batches_per_epoch(data.train, recipe.max_batches), recipe.accum_steps)
    updater = Updater(optimizer, schedule(optimizer, steps), scaler if scaler.is_enabled() else None)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=recipe.smooth_eps)
    history, best, start = {k: [] for k in HISTORY_KEYS}, {'top1': -1.0, 'epoch': 0}, 1
    if resume is not None:
        base.load_state_dict(resume['state_dict'])
        optimizer.load_state_dict(resume['optimizer'])
        updater.scheduler.load_state_dict(resume['scheduler'])
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
        tick = time.perf_counter()
        distil = teacher if epoch <= recipe.epochs - 5 else None   # the last 5 epochs train on the labels alone
        loss, top1 = train_one_epoch(wrapped, data.train, updater, criterion, env.device, epoch, recipe,
                                     regulariser=regulariser, masks=masks, teacher=distil)
        v1, v5, vloss = evaluate(wrapped, data.val, env.device, recipe.max_batches, recipe.amp_dtype,
                                 recipe.channels_last)
        lr = updater.epoch_lr
        figures = dict(zip(HISTORY_KEYS, (loss, top1, vloss, v1, v5, lr)))
        for k, v in figures.items():
            history[k].append(v)
        log.info(f"epoch {epoch}/{recipe.epochs}: train loss {loss:.4f} top-1 {top1:.2f} | val loss {vloss:.4f} "
                 f"top-1 {v1:.2f} top-5 {v5:.2f} | lr {lr:.2e} | {time.perf_counter() - tick:.0f} s")
        step = stage * recipe.epochs + epoch
        if board is not None:
            for k, v in figures.items():
                board.add_scalar(f"{k.split('_')[0]}/{k}", v, step)
        if regulariser is not None and (regulariser.reports_after(epoch) or epoch == recipe.epochs):
            log_report(regulariser, board, step)
        state = checkpoint(meta, base.state_dict(), epoch, v1, history)
        if best_path and v1 > best['top1']:
            best = {'top1': v1, 'epoch': epoch}
            atomic_save(state, best_path)
        atomic_save(dict(state, best=best, optimizer=optimizer.state_dict(), scheduler=updater.scheduler.state_dict(),
                         scaler=scaler.state_dict(),
                         **({'regulariser': regulariser.state_dict()} if regulariser is not None else {})),
                    resume_path)
    return history, best
