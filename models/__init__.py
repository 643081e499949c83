"""Model registry: `build_model(arch, num_classes)` and `load_weights(model, path)`."""
import dataclasses
import os
import pickle
from collections.abc import Callable

import torch

from admm import strip_module_prefix  # noqa: F401  (re-exported: checkpoints' names)

from . import c3d, r2plus1d, s3d
from .c3d import C3D
from .s3d import S3D


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Everything the tool knows of one `--arch`: adding an architecture is adding one entry."""
    build: Callable                  # build(num_classes, num_frames, crop_size, pretrained, **kw) -> nn.Module
    crop_size: int                   # clip height and width
    scale_range: tuple               # short side before cropping: training draws from it, validation takes the low end
    default_profile: str             # --config-file when none is given (the original's recipe profile)
    baselines: dict                  # dataset -> file name of the original's downloadable baseline
    links: Callable                  # links(model) -> [models.links.Link]: how channels flow (slim models)
    num_frames: int = 16


def _c3d(num_classes, num_frames, crop_size, pretrained, **kw):
    return C3D(num_classes, num_frames=num_frames, crop_size=crop_size, **kw)


def _r2plus1d(pretrained_default):
    def build(num_classes, num_frames, crop_size, pretrained, **kw):
        return r2plus1d.r2plus1d(num_classes, pretrained=pretrained_default if pretrained is None else pretrained,
                                 **kw)
    return build


def _s3d(num_classes, num_frames, crop_size, pretrained, **kw):
    return S3D(num_classes, **kw)


_R2PLUS1D_BASELINES = {'ucf101': 'ucf101_r2+1d-pretrained_transfer_epoch-14_top1-93.981.pt',
                       'hmdb51': 'hmdb51_r2+1d-pretrained_transfer_epoch-20_top1-71.300.pt'}
ARCHITECTURES = {
    'c3d': Architecture(_c3d, 112, (128, 128), 'c3d_2.53x_v2',
                        {'ucf101': 'ucf101_c3d_transfer_epoch-14_top1-81.571.pt',
                         'hmdb51': 'hmdb51_c3d_transfer_epoch-18_top1-53.458.pt'}, c3d.channel_links),
    'r2+1d': Architecture(_r2plus1d(False), 112, (128, 128), 'r2+1d-pretrained_2.56x', _R2PLUS1D_BASELINES,
                          r2plus1d.channel_links),
    'r2+1d-pretrained': Architecture(_r2plus1d(True), 112, (128, 128), 'r2+1d-pretrained_2.56x',
                                     _R2PLUS1D_BASELINES, r2plus1d.channel_links),
    's3d': Architecture(_s3d, 224, (256, 320), 's3d_2.09x',
                        {'ucf101': 'ucf101-s3d-ts-max-f16-multisteps-bs32-e20_epoch-20_top1-90.573.pt',
                         'hmdb51': 'hmdb51-s3d-ts-max-f16-multisteps-bs32-e20_epoch-17_top1-67.151.pt'},
                        s3d.channel_links),
}
ARCHS = tuple(ARCHITECTURES)
# Clip geometry per architecture (docs/models_and_data.md): frames, crop, and the short-side
# scale range for training (validation uses the lower end).
DEFAULT_GEOMETRY = {name: dict(num_frames=a.num_frames, crop_size=a.crop_size, scale_range=a.scale_range)
                    for name, a in ARCHITECTURES.items()}


def build_model(arch, num_classes, num_frames=16, crop_size=None, pretrained=None, **kw):
    """Build `arch` (one of ARCHS) for `num_classes` classes.

    `num_frames` / `crop_size` matter to C3D only (its fc6 size follows the clip). `pretrained`
    defaults to True for `r2+1d-pretrained` (Kinetics-400 weights) and is ignored elsewhere.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    a = ARCHITECTURES[arch]
    return a.build(num_classes, num_frames, crop_size or a.crop_size, pretrained, **kw)


def original_baseline(arch, dataset):
    """File name of the original's baseline for `arch` on `dataset`, or None."""
    return ARCHITECTURES[arch].baselines.get(dataset) if arch in ARCHITECTURES else None


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (broken, or holding objects we will not unpickle)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint's tensors do not fit the model it is loaded into."""


def _numpy_scalar_types():
    """What a 2020 checkpoint may hold beside its tensors: numpy scalars (e.g. a top-1 as
    `numpy.float64`) and their dtypes, and nothing else. Pickles of numpy 1.x name the scalar
    constructor `numpy.core.multiarray.scalar`, those of numpy 2 `numpy._core...`."""
    import numpy as np
    scalar = np._core.multiarray.scalar if hasattr(np, '_core') else np.core.multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith('DType')] if hasattr(np, 'dtypes') else []
    return [scalar, (scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar'),
            np.dtype, *dtypes]


def read_checkpoint(path):
    """Load a checkpoint file on the CPU without unpickling arbitrary objects.

    Returns `(state_dict, meta)`: the weights with `module.` prefixes removed, and the other
    entries of a dict checkpoint (`epoch`, `top1`, ...), empty for a bare state dict. Raises
    FileNotFoundError, or CheckpointError naming the file and what to do.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    unreadable = (f"{path} is not a readable PyTorch checkpoint ({size} bytes: empty, cut short by an interrupted "
                  f"copy or save, or not a checkpoint at all). Copy or download it again, or train it again")
    try:
        with torch.serialization.safe_globals(_numpy_scalar_types()):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as exc:
        if 'global' not in str(exc).lower():          # not a refused class: a broken or foreign file
            raise CheckpointError(unreadable) from None
        raise CheckpointError(
            f"{path}: holds Python objects other than tensors, plain containers and numpy scalars, which this "
            f"tool will not unpickle (weights_only=True). If you trust the file, re-save just its state dict: "
            f"torch.save(torch.load(path, weights_only=False)['state_dict'], new_path).\n"
            f"Detail: {next(line.strip() for line in str(exc).splitlines() if 'global' in line.lower())}") from None
    except (EOFError, RuntimeError, ValueError, OSError, KeyError, IndexError, TypeError) as exc:
        # What torch.load raises on text, random or cut-short bytes depends on the first bytes.
        if isinstance(exc, FileNotFoundError):
            raise
        raise CheckpointError(unreadable) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a state dict or a dict with 'state_dict', got {type(ckpt).__name__}")
    if isinstance(ckpt.get('state_dict'), dict):
        meta = {k: v for k, v in ckpt.items() if k != 'state_dict'}
        state = ckpt['state_dict']
    else:
        meta, state = {}, ckpt
    return {strip_module_prefix(k): v for k, v in state.items()}, meta


def load_weights(model, path, arch=None):
    """Load `path` into `model` (bare state dict or `{'state_dict': ...}`, with or without `module.`).

    Raises `CheckpointMismatch` naming the first missing, unexpected and wrongly shaped keys.
    Returns the checkpoint's other entries (epoch, top1, optimizer, ...).
    """
    state, meta = read_checkpoint(path)
    check_state_dict(model, state, f"{path}", arch=arch)
    model.load_state_dict(state, strict=False)
    return meta


def check_state_dict(model, state, source, arch=None, shown=5):
    """Raise `CheckpointMismatch` unless `state` has exactly the model's tensors and shapes."""
    own = model.state_dict()
    # Checkpoints from PyTorch < 0.4.1 have no BatchNorm counters; they default to 0.
    missing = [k for k in own if k not in state and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return
    lines = [f"{source} does not fit the {arch or type(model).__name__} model being built:"]

    def listing(title, keys, fmt):
        if keys:
            more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
            lines.append(f"  {len(keys)} {title}: " + ", ".join(fmt(k) for k in keys[:shown]) + more)

    listing("missing keys", missing, str)
    listing("unexpected keys", unexpected, str)
    listing("wrongly shaped", wrong,
            lambda k: f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})")
    hint = "Check --arch"
    classifier = [k for k in wrong if k.endswith('weight') and own[k].dim() == 2 and k == _last_linear(own)]
    if classifier:
        hint = (f"The checkpoint's classifier has {state[classifier[0]].shape[0]} classes and the model "
                f"{own[classifier[0]].shape[0]}: pass --num-classes {state[classifier[0]].shape[0]}, or check --arch")
    elif wrong and all(own[k].dim() == 2 for k in wrong):
        hint = "Only linear layers differ: check --num-frames / --crop-size (C3D's fc6 follows the clip size)"
    lines.append(f"  {hint}.")
    raise CheckpointMismatch("\n".join(lines))


def _last_linear(state):
    names = [k for k, v in state.items() if k.endswith('.weight') and v.dim() == 2]
    return names[-1] if names else None
