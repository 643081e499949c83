"""Clip transforms: JPEG frames in, normalised 3 x T x H x W float tensor out (or uint8, normalised later).

A transform takes the clip's frames as encoded JPEG bytes, so it can let libjpeg decode at a
reduced scale (PIL draft mode) and resize only the crop. One random draw (scale, crop, flip)
per clip keeps all frames of a clip aligned. With `uint8=True` it returns the pixels as uint8,
a quarter of the bytes to pass from DataLoader workers and to copy to the GPU, and
`normalize_clips` normalises the batch where it lands, to the same values.
"""

import functools
import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_crops(
    frames: Sequence[bytes], short_side: int, size: int, position: tuple[float, float] | None = None,
    flip: bool = False,
) -> np.ndarray:
    """Decode JPEG frames, scale the short side to short_side, crop size x size: T x size x size x 3 uint8.

    position: (x, y) in [0, 1) picks the crop offset uniformly; None takes the centre crop.
    """
    clip = np.empty((len(frames), size, size, 3), np.uint8)
    for t, data in enumerate(frames):
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        scale = short_side / min(width, height)
        scaled_w, scaled_h = round(width * scale), round(height * scale)
        if position is None:
            left, top = round((scaled_w - size) / 2), round((scaled_h - size) / 2)
        else:
            left = min(int(position[0] * (scaled_w - size + 1)), scaled_w - size)
            top = min(int(position[1] * (scaled_h - size + 1)), scaled_h - size)
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale when that still covers the scaled size
        image.draft("RGB", (scaled_w, scaled_h))
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size == (scaled_w, scaled_h):  # frames extracted at this short side: a plain crop
            pixels = np.asarray(image.crop((left, top, left + size, top + size)))
        else:  # resize only the crop's box, mapped into the decoded image: the pixels of resize-then-crop
            fx, fy = image.width / scaled_w, image.height / scaled_h
            box = (left * fx, top * fy, (left + size) * fx, (top + size) * fy)
            pixels = np.asarray(image.resize((size, size), Image.BILINEAR, box=box))
        clip[t] = pixels[:, ::-1] if flip else pixels
    return clip


@functools.lru_cache(maxsize=16)
def _normalize_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) with (x / 255 - mean) / std == x * scale - offset, computed on the CPU.

    Computed once on the CPU, so every device gets the same float32 constants (the results are
    then bit-identical), and cached, so no per-batch host-to-device copy waits for the GPU.
    """
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    offset = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1, 1) / std_t
    return scale.to(device), offset.to(device)


class ClipNormalize:
    """T x H x W x 3 uint8 array -> 3 x T x H x W float32 tensor, (x / 255 - mean) / std."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.scale, self.offset = _normalize_constants(tuple(mean), tuple(std), torch.device("cpu"))

    def __call__(self, clip: np.ndarray) -> torch.Tensor:
        out = torch.empty((3, *clip.shape[:3]), dtype=torch.float32)
        out.copy_(torch.from_numpy(clip).permute(3, 0, 1, 2))  # transpose and convert in one pass
        return out.mul_(self.scale).sub_(self.offset)


def uint8_clip(clip: np.ndarray) -> torch.Tensor:
    """T x H x W x 3 uint8 array -> 3 x T x H x W uint8 tensor, contiguous (batches stack with one plain copy)."""
    return torch.from_numpy(np.ascontiguousarray(clip.transpose(3, 0, 1, 2)))  # numpy: twice torch's uint8 permute


def normalize_clips(
    clips: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 clips (3 x T x H x W, or a batch N x 3 x T x H x W) -> (x / 255 - mean) / std as `dtype`, on their device.

    Equal to the float transform's output for the clips of a `uint8=True` transform.
    """
    if clips.dtype != torch.uint8 or clips.dim() not in (4, 5) or clips.shape[-4] != 3:
        raise ValueError(
            f"normalize_clips expects uint8 clips 3 x T x H x W or N x 3 x T x H x W (a transform made with "
            f"uint8=True), got {clips.dtype} {tuple(clips.shape)}"
        )
    scale, offset = _normalize_constants(tuple(mean), tuple(std), clips.device)
    out = clips.to(torch.float32).mul_(scale).sub_(offset)  # the float transform's arithmetic, in its order
    return out if dtype == torch.float32 else out.to(dtype)


class ClipTrainTransform:
    """Training: short side scaled to a random size in scale_range, random crop, random horizontal flip."""

    def __init__(
        self, image_size: int, scale_range: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD, uint8: bool = False,
    ):
        self.image_size, self.scale_range = image_size, scale_range
        self.normalize = uint8_clip if uint8 else ClipNormalize(mean, std)

    def __call__(self, frames: Sequence[bytes]) -> torch.Tensor:
        # torch's generator: seeded per DataLoader worker and by torch.manual_seed
        short_side = int(torch.randint(self.scale_range[0], self.scale_range[1] + 1, ()))
        x, y, flip = torch.rand(3).tolist()
        clip = decode_crops(frames, short_side, self.image_size, (x, y), flip < 0.5)
        return self.normalize(clip)


class ClipEvalTransform:
    """Validation: short side scaled to scale_range[0], centre crop."""

    def __init__(
        self, image_size: int, scale_range: tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD, uint8: bool = False,
    ):
        self.image_size, self.short_side = image_size, scale_range[0]
        self.normalize = uint8_clip if uint8 else ClipNormalize(mean, std)

    def __call__(self, frames: Sequence[bytes]) -> torch.Tensor:
        return self.normalize(decode_crops(frames, self.short_side, self.image_size))


def get_augmentor(
    is_train: bool, image_size: int, scale_range: int | tuple[int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD,
    uint8: bool = False,
):
    """The clip transform: C3D / R(2+1)D use (112, (128, 128)), S3D (224, (256, 320)) for training.

    uint8=True returns unnormalised uint8 clips; `normalize_clips(batch, mean, std)` finishes them.
    """
    if isinstance(scale_range, int):
        scale_range = (scale_range, scale_range)
    low, high = (int(s) for s in scale_range)
    if not image_size <= low <= high:
        raise ValueError(f"need image_size <= scale_range[0] <= scale_range[1], got {image_size} and {scale_range}")
    transform = ClipTrainTransform if is_train else ClipEvalTransform
    return transform(int(image_size), (low, high), mean, std, uint8)


def decode_clip(frames: Sequence[bytes]) -> torch.Tensor:
    """Full-size decode without augmentation: 3 x T x H x W float tensor in [0, 1]."""
    clip = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in frames])
    return ClipNormalize(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(clip)
