"""Optimisers, learning-rate schedules (the original's rhythms as torch schedulers) and precision."""
import math

import torch


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float,
                   scaled: bool = False) -> torch.optim.Optimizer:
    """SGD or Adam. The fused kernels update all parameters in one pass (0.2 s less per C3D step
    on 2 CPU cores); under an fp16 GradScaler the foreach implementation is used, because the
    fused one let NaNs through after a skipped step on CUDA (the scaler's found-inf path)."""
    impl = dict(foreach=True) if scaled else dict(fused=True)
    if name == 'adam':
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, **impl)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **impl)


def steps_per_epoch(batches: int, accum_steps: int) -> int:
    return math.ceil(batches / accum_steps)


def make_scheduler(optimizer, kind: str, lr: float, epochs: int, steps: int, warmup_epochs: int = 0,
                   warmup_lr: float | None = None):
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


def admm_lr_factor(epoch: int, admm_epochs: int) -> float:
    """The original's ADMM rhythm: back to --lr at the start of every --admm-epochs window, halved
    every admm_epochs / 3 epochs (a float division) within it."""
    offset = (epoch - 1) % admm_epochs
    return 1.0 if offset == 0 else 0.5 ** (offset // (admm_epochs / 3))


def rew_lr_factor(epoch: int, milestones) -> float:
    """The follow-up's --rew rhythm: at the start of each epoch e > 1, x1.6 if e - 1 is a
    milestone, else x0.98."""
    return math.prod(1.6 if e - 1 in milestones else 0.98 for e in range(2, epoch + 1))


def epoch_scheduler(optimizer, factor, steps: int):
    """A per-step LambdaLR whose factor depends on the (1-based) epoch only."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step // steps + 1))


def amp_dtype(amp: bool, forced: str | None, device: torch.device) -> torch.dtype | None:
    """None (float32), or the autocast dtype: bf16 where the device has it, else fp16."""
    if not amp:
        return None
    if forced:
        return {'bf16': torch.bfloat16, 'fp16': torch.float16}[forced]
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def guard_bf16(model: torch.nn.Module, amp: torch.dtype | None, num_frames: int, crop: int,
               device: torch.device) -> list:
    """Under bf16 autocast on the CPU, run in float32 the 3D convolutions whose bf16 results this
    machine computes wrongly (models/precision.py); return what to log, if anything."""
    if amp != torch.bfloat16 or device.type != 'cpu':
        return []
    from models.precision import find_wrong_bf16, run_in_float32
    wrong = find_wrong_bf16(model, (2, 3, num_frames, crop, crop), device)
    run_in_float32(model, wrong, device.type)
    return [f"bf16 autocast: {', '.join(wrong)} compute wrong bf16 results on this CPU (PyTorch's oneDNN "
            f"conv3d); they run in float32"] if wrong else []
