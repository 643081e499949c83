"""The synthetic action dataset: real videos in UCF101's layout whose classes only motion tells apart."""

import hashlib
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from dataset.make_synthetic import PRESETS, _trajectory, make_dataset

REPO = Path(__file__).resolve().parents[1]


def read_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]).astype(np.float32)


def digest(folder: Path) -> dict[str, str]:
    files = sorted(folder.rglob("*.*"))
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def split_entries(root: Path, list_name: str) -> list[tuple[str, str]]:
    """(class, file name) of every line of a split file."""
    lines = (root / "ucfTrainTestlist" / list_name).read_text().splitlines()
    return [tuple(line.split()[0].split("/")) for line in lines]


def motion_descriptor(video: np.ndarray) -> np.ndarray:
    """Hand-made motion features: how the foreground (distance from the per-pixel temporal median) moves and changes."""
    foreground = np.abs(video - np.median(video, axis=0)).sum(-1)
    frames, height, width = foreground.shape
    energy = foreground.sum((1, 2)) + 1e-6
    cy = (foreground * np.arange(height)[:, None]).sum((1, 2)) / energy / height
    cx = (foreground * np.arange(width)).sum((1, 2)) / energy / width
    t = np.arange(frames) - (frames - 1) / 2
    log_energy = np.log(energy)
    cy_slope, energy_slope = (np.sum(t * (y - y.mean())) / np.sum(t * t) * frames for y in (cy, log_energy))
    return np.array([
        cy_slope, energy_slope, log_energy.mean(), cx.std(), cy.std(), np.diff(log_energy).std(),
        np.log(np.abs(np.diff(video, axis=0)).mean()),
    ])


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-9
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    centroids = np.stack([train_x[train_y == k].mean(0) for k in range(train_y.max() + 1)])
    predicted = np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    return float((predicted == test_y).mean())


@pytest.fixture(scope="module", params=sorted(PRESETS))
def generated(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp(request.param)
    result = subprocess.run(
        [sys.executable, str(REPO / "dataset" / "make_synthetic.py"), "--out", str(root), "--preset", request.param],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    return request.param, root


def test_layout_is_ucf101s_with_train_and_test_from_different_groups(generated):
    preset, root = generated
    classes = (root / "ucfTrainTestlist" / "classInd.txt").read_text().split()[1::2]
    assert classes == list(PRESETS[preset])
    train, test = split_entries(root, "trainlist01.txt"), split_entries(root, "testlist01.txt")
    assert (len(train), len(test)) == (16 * len(classes), 6 * len(classes))
    for name in classes:
        train_groups = {f.rsplit("_", 2)[1] for c, f in train if c == name}  # v_<Class>_gXX_cYY.avi -> gXX
        test_groups = {f.rsplit("_", 2)[1] for c, f in test if c == name}
        assert train_groups and test_groups and not train_groups & test_groups
    assert sorted(p.name for p in (root / "ucf101").iterdir()) == sorted(f for _, f in train + test)


def test_videos_decode_back_with_the_requested_frames_and_size(generated):
    _, root = generated
    for path in sorted((root / "ucf101").iterdir())[::7]:
        assert read_video(path).shape == (32, 48, 64, 3)


def test_frame_differences_tell_the_classes_apart(generated):
    preset, root = generated
    sets = {}
    for subset in ("trainlist01.txt", "testlist01.txt"):
        entries = split_entries(root, subset)
        features = np.stack([motion_descriptor(read_video(root / "ucf101" / f)) for _, f in entries])
        labels = np.array([PRESETS[preset].index(c) for c, _ in entries])
        sets[subset] = features, labels
    accuracy = nearest_centroid_accuracy(*sets["trainlist01.txt"], *sets["testlist01.txt"])
    assert accuracy >= {"motion": 0.85, "shapes": 0.55}[preset]  # chance is 0.2


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_one_frame_has_the_same_distribution_in_every_class(preset):
    # Pooled over frames, each class's object size, position and contrast follow the same distribution.
    height, width, frames = 48, 64, 32
    quantiles = {}
    for name in PRESETS[preset]:
        draws = [_trajectory(name, np.random.default_rng(i), frames, height, width) for i in range(1000)]
        values = {
            "size": np.concatenate([d["size"] for d in draws]) / height,
            "cx": np.concatenate([d["cx"] for d in draws]) / width,
            "cy": np.concatenate([d["cy"] for d in draws]) / height,
            "contrast": np.concatenate([d["contrast"] for d in draws]),
        }
        quantiles[name] = {key: np.quantile(v, [0.1, 0.5, 0.9]) for key, v in values.items()}
    for key in ("size", "cx", "cy", "contrast"):
        table = np.stack([quantiles[name][key] for name in PRESETS[preset]])
        assert np.abs(table - table.mean(0)).max() < 0.025, (key, table)


def test_same_seed_writes_the_same_files_and_another_seed_different_ones(tmp_path):
    options = {"preset": "shapes", "videos_per_class": 2, "test_per_class": 1, "frames": 8, "height": 24, "width": 32}
    make_dataset(tmp_path / "a", seed=5, **options)
    make_dataset(tmp_path / "b", seed=5, **options)
    make_dataset(tmp_path / "c", seed=6, **options)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    changed = [k for k, v in digest(tmp_path / "c").items() if v != digest(tmp_path / "a")[k] and k.endswith(".avi")]
    assert len(changed) == 15


def test_presets_have_different_class_sets():
    assert not set(PRESETS["motion"]) & set(PRESETS["shapes"])
