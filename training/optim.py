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
    """The original's per-step schedule, stepped before every step's forward pass (`Updater.begin`):
    default halves every int(0.2 * epochs) epochs, multistep at 45, 90 and 120 epochs, cosine
    anneals to 4e-8 over all `epochs` (T_max = epochs * steps). With a warmup, the rate ramps
    linearly from `warmup_lr` to `lr` over `warmup_epochs`, and the main schedule starts counting
    one step after that (the original's GradualWarmupScheduler hand-over), so cosine does not
    reach 4e-8 and multistep halves 45 epochs after the warmup. A warmup as long as the run or
    longer simply does not finish, as in the original."""
    sched = torch.optim.lr_scheduler
    warm = warmup_epochs * steps
    if kind == 'cosine':
        main = sched.CosineAnnealingLR(optimizer, T_max=epochs * steps, eta_min=4e-8)
    elif kind == 'multistep':
        main = sched.MultiStepLR(optimizer, [e * steps for e in (45, 90, 120)], gamma=0.5)
    else:
        main = sched.StepLR(optimizer, step_size=max(1, int(0.2 * epochs)) * steps, gamma=0.5)
    if not warm:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=warmup_lr / lr, end_factor=1.0, total_iters=warm)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warm + 1])


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
    """A per-step LambdaLR whose factor depends on the (1-based) epoch only. It is stepped before
    each step's forward pass, so after s steps the rate is that of the epoch holding step s."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factor(max(s - 1, 0) // steps + 1))


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), as oneDNN reports it."""
    check = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def amp_dtype(amp: bool, forced: str | None, device: torch.device) -> torch.dtype | None:
    """None (float32), or the autocast dtype: bf16 where the device has it natively, fp16 on a GPU
    without it, float32 (None) on a CPU without it (emulated bf16 is many times slower there)."""
    if not amp:
        return None
    if forced:
        return {'bf16': torch.bfloat16, 'fp16': torch.float16}[forced]
    if device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


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
