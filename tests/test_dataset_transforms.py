"""Frame sampling, clip transforms and list files, on small JPEGs made in memory."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ListFileError,
    get_augmentor,
    normalize_clips,
    num_classes_from_list,
    read_list_file,
    sample_frame_indices,
)


def jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def textured_frames(count: int, height: int, width: int, seed: int = 0) -> list[bytes]:
    """Smooth colour gradients with a moving bright square: frames whose crops and flips are all different."""
    ys, xs = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(count):
        image = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 40 + 10 * t)], axis=-1)
        image[10 + t:20 + t, 5:15] = 255
        frames.append(jpeg(image.astype(np.uint8)))
    return frames


def test_segment_centres_match_the_seed():
    assert sample_frame_indices(32, 16).tolist() == list(range(1, 32, 2))
    assert sample_frame_indices(40, 16).tolist() == [int(1.25 + 2.5 * x) for x in range(16)]


def test_short_videos_repeat_frames():
    assert sample_frame_indices(8, 16).tolist() == [i // 2 for i in range(16)]
    assert sample_frame_indices(1, 16).tolist() == [0] * 16


def test_temporal_jitter_picks_one_frame_inside_each_segment_reproducibly():
    torch.manual_seed(3)
    first = sample_frame_indices(100, 16, jitter=True)
    torch.manual_seed(3)
    assert np.array_equal(first, sample_frame_indices(100, 16, jitter=True))
    segment = np.arange(16) * 100 / 16
    assert np.all(first >= np.floor(segment)) and np.all(first < segment + 100 / 16)
    draws = {tuple(sample_frame_indices(100, 16, jitter=True)) for _ in range(5)}
    assert len(draws) > 1


def test_validation_transform_is_scale_then_centre_crop_normalised():
    frames = textured_frames(4, 120, 160)
    clip = get_augmentor(False, 112, (128, 128))(frames)
    assert clip.shape == (3, 4, 112, 112) and clip.dtype == torch.float32
    for t, data in enumerate(frames):
        reference = Image.open(io.BytesIO(data)).resize((171, 128), Image.BILINEAR).crop((30, 8, 142, 120))
        expected = (np.asarray(reference) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        assert np.abs(clip[:, t].permute(1, 2, 0).numpy() - expected).mean() < 0.02


def test_normalisation_uses_imagenet_mean_and_std():
    grey = jpeg(np.full((64, 64, 3), 128, np.uint8))
    clip = get_augmentor(False, 32, 32)([grey] * 2)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(clip.mean(dim=(1, 2, 3)), expected, atol=0.02)


def test_training_transform_flips_and_crops_every_frame_of_a_clip_alike():
    # 112 x 112 frames at scale 112: the crop is the whole frame, so a clip is the frames or their mirror.
    frames = textured_frames(3, 112, 112)
    plain = get_augmentor(False, 112, 112)(frames)
    train = get_augmentor(True, 112, (112, 112))
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        clip = train(frames)
        flipped = torch.equal(clip, plain.flip(-1))
        assert flipped or torch.equal(clip, plain)
        seen.add(flipped)
    assert seen == {True, False}


def test_training_crop_is_one_window_for_the_whole_clip():
    frames = textured_frames(1, 120, 160) * 3  # identical frames must stay identical
    torch.manual_seed(0)
    clip = get_augmentor(True, 112, (128, 160))(frames)
    assert clip.shape == (3, 3, 112, 112)
    assert torch.equal(clip[:, 0], clip[:, 1]) and torch.equal(clip[:, 1], clip[:, 2])


def test_small_clips_for_the_demo():
    frames = textured_frames(16, 48, 64)
    assert get_augmentor(True, 32, (36, 36))(frames).shape == (3, 16, 32, 32)
    assert get_augmentor(False, 32, (36, 36))(frames).shape == (3, 16, 32, 32)


def test_large_frames_decode_at_reduced_scale_to_the_same_picture():
    small = textured_frames(2, 128, 171)
    large = [jpeg(np.asarray(Image.open(io.BytesIO(f)).resize((684, 512)))) for f in small]  # 1/4 draft scale
    transform = get_augmentor(False, 112, 128)
    assert (transform(large) - transform(small)).abs().mean() < 0.1


def test_crop_larger_than_the_scaled_frame_is_refused():
    with pytest.raises(ValueError, match="image_size"):
        get_augmentor(True, 224, (128, 128))


@pytest.mark.parametrize("is_train", [True, False])
def test_uint8_clips_normalised_later_equal_the_float_clips(is_train):
    frames = textured_frames(4, 120, 160)
    torch.manual_seed(0)
    expected = get_augmentor(is_train, 112, (128, 144))(frames)
    torch.manual_seed(0)  # the same random scale, crop and flip
    clip = get_augmentor(is_train, 112, (128, 144), uint8=True)(frames)
    assert clip.dtype == torch.uint8 and clip.shape == (3, 4, 112, 112) and clip.is_contiguous()
    assert torch.equal(normalize_clips(clip), expected)
    assert torch.equal(normalize_clips(torch.stack([clip, clip]))[1], expected)  # a batch from the DataLoader
    assert torch.allclose(normalize_clips(clip, dtype=torch.bfloat16).float(), expected, atol=0.02)


def test_uint8_clips_with_another_mean_and_std():
    frames = textured_frames(2, 64, 64)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    expected = get_augmentor(False, 32, 32, mean, std)(frames)
    assert torch.equal(normalize_clips(get_augmentor(False, 32, 32, uint8=True)(frames), mean, std), expected)


def test_normalize_clips_refuses_clips_already_normalised():
    with pytest.raises(ValueError, match="uint8"):
        normalize_clips(torch.zeros(3, 4, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uint8_clips_normalised_on_the_gpu_equal_the_float_clips():
    frames = textured_frames(4, 120, 160)
    expected = get_augmentor(False, 112, 128)(frames)
    clip = get_augmentor(False, 112, 128, uint8=True)(frames)
    assert torch.equal(normalize_clips(clip.cuda()).cpu(), expected)


def test_list_file_parsing_and_num_classes(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("v_A_g01_c01 1 40 0\nclip with spaces 1 17 4\n\n")
    assert [tuple(r) for r in read_list_file(listing)] == [("v_A_g01_c01", 40, 0), ("clip with spaces", 17, 4)]
    assert num_classes_from_list(listing) == 5


@pytest.mark.parametrize("line", ["v_A_g01_c01 1 40", "v_A_g01_c01 1 x 0", "v_A_g01_c01 1 0 0", "v_A 1 10 -1"])
def test_bad_list_lines_name_file_and_line(tmp_path, line):
    listing = tmp_path / "val.txt"
    listing.write_text(f"v_B_g01_c01 1 40 0\n{line}\n")
    with pytest.raises(ListFileError, match=r"val.txt:2: "):
        read_list_file(listing)


def test_missing_list_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        read_list_file(tmp_path / "nowhere.txt")


def test_list_file_that_is_not_text_is_a_list_file_error(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(ListFileError, match="train.txt is not a text list file"):
        read_list_file(listing)
