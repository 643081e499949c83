"""One checkpoint schema for every file a run writes, and the checks before --resume continues one.

A checkpoint is a dict of plain tensors, numbers, strings and lists (read back with
`weights_only=True`): `format`, `version`, the model's facts (`arch`, `num_classes`, `num_frames`,
`crop_size`), the run's `options`, `state_dict`, `epoch`, `top1`, `history`; stage files add
`stage` / `rho` and the regulariser's state; resume points add the optimiser, scheduler, scaler and
best-so-far. Bare state dicts and the original's `{'state_dict': ...}` files load everywhere too.
"""
import json
import os

from models import CheckpointError, build_model, load_weights, read_checkpoint

from .runtime import UserError

FORMAT = 'rt3d-checkpoint'
VERSION = 2        # 1: the files of earlier versions, which had no `format` / `version` keys
RESUME_KEYS = ('epoch', 'optimizer', 'scheduler', 'history', 'options')


def model_meta(arch: str, num_classes: int, num_frames: int, crop_size: int) -> dict:
    """What rebuilds the model a checkpoint's weights fit."""
    return {'arch': arch, 'num_classes': num_classes, 'num_frames': num_frames, 'crop_size': crop_size}


def checkpoint(meta: dict, state_dict: dict, epoch: int, top1: float, history: dict, **extra) -> dict:
    """The one builder: `meta` (model_meta + options, and a stage's `stage` / `rho`), the weights,
    where training stood, and what the file's role adds (`best`, `optimizer`, `admm`, ...)."""
    return dict(meta, format=FORMAT, version=VERSION, state_dict=state_dict, epoch=epoch, top1=top1,
                history=history, **extra)


def read_resume(path: str, options: dict) -> dict:
    """The resume file's contents, after checking it continues the run these options define."""
    if not os.path.isfile(path):
        raise UserError(f"--resume: nothing to resume, {path} does not exist (run without --resume)")
    try:
        state, meta = read_checkpoint(path)
    except CheckpointError as exc:
        raise UserError(f"--resume: {exc}") from None
    if meta.get('version', 1) > VERSION:
        raise UserError(f"--resume: {path} was written by a newer version of this tool (checkpoint version "
                        f"{meta['version']}, this tool reads up to {VERSION}): update the tool")
    missing = [k for k in RESUME_KEYS if k not in meta]
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


def new_model(arch: str, classes: int, num_frames: int, crop: int, device, pretrained: bool = False):
    """`build_model` on `device`, its errors as UserError."""
    try:
        return build_model(arch, classes, num_frames=num_frames, crop_size=crop, pretrained=pretrained).to(device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from None


def load_into(model, path: str, arch: str) -> dict:
    """Load a checkpoint's weights into `model`; its other entries are returned, its errors are UserError."""
    try:
        return load_weights(model, path, arch=arch)
    except (CheckpointError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None
