"""Decode UCF101 / HMDB51 / Kinetics videos into JPEG frame folders and the train/val list files.

Run it inside dataset/, as the original README does:  python extract_videos.py -d ucf101
Writes {root}/{d}_frame/<video id>/00001.jpg ... and {d}_frame/train.txt, val.txt with lines
`<video id> 1 <frames> <label from 0>` (Kinetics: `<video id>;1;<frames>;<label>`, the first 64
frames of each video). Re-running skips videos whose frame folder is complete; a video that
decodes fewer frames than its container declares is listed in failed.txt and tried again.
"""

import argparse
import functools
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

if __package__:
    from .layout import dataset_facts
else:  # run as a script from dataset/, as in the original README
    from layout import dataset_facts

JPEG_QUALITY = 95
VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".flv", ".wmv"}
PARTIAL_DIR = ".partial"  # frames are written here and renamed into place once complete


class SplitError(Exception):
    """A split file, class index or video folder is missing or malformed."""


@dataclass(frozen=True)
class Video:
    video_id: str
    path: Path | None  # None: listed in the split but not found on disk
    label: int
    subset: str  # "train" or "val"


def index_videos(video_dir: Path) -> dict[str, Path]:
    """Map file name -> path for videos directly in video_dir or one class folder below it."""
    if not video_dir.is_dir():
        raise SplitError(f"video folder {video_dir} not found (unpack the dataset's videos there)")
    found = {}
    for path in sorted(video_dir.glob("*")) + sorted(video_dir.glob("*/*")):
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            found.setdefault(path.name, path)
    return found


def _read_lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise SplitError(f"split file {path} not found")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]


def read_ucf101_split(root: Path, split: int) -> list[Video]:
    """Videos of UCF101 split `split` from {root}/ucfTrainTestlist and {root}/ucf101."""
    list_dir = root / "ucfTrainTestlist"
    class_index = list_dir / "classInd.txt"
    # Class names are matched case-insensitively: UCF101 itself spells HandstandPushups two ways.
    labels = {}
    for number, line in _read_lines(class_index):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise SplitError(f"{class_index}:{number}: expected `<index> <class>`, got {line!r}")
        labels[parts[1].lower()] = int(parts[0]) - 1

    files = index_videos(root / "ucf101")
    videos = []
    for subset, list_name in (("train", f"trainlist0{split}.txt"), ("val", f"testlist0{split}.txt")):
        list_path = list_dir / list_name
        for number, line in _read_lines(list_path):
            parts = line.split()
            relative = parts[0].replace("\\", "/")
            class_name = relative.rsplit("/", 1)[0].lower() if "/" in relative else None
            if class_name in labels:
                label = labels[class_name]
            elif len(parts) > 1 and parts[1].isdigit():
                label = int(parts[1]) - 1
            else:
                raise SplitError(f"{list_path}:{number}: class of {relative!r} is not in {class_index}")
            name = relative.rsplit("/", 1)[-1]
            videos.append(Video(Path(name).stem, files.get(name), label, subset))
    return videos


def read_hmdb51_split(root: Path, split: int) -> list[Video]:
    """Videos of HMDB51 split `split` from {root}/hmdb51_labels/<class>_test_split<N>.txt and {root}/hmdb51."""
    label_dir = root / "hmdb51_labels"
    if not label_dir.is_dir():
        raise SplitError(f"split folder {label_dir} not found (unpack the HMDB51 split files there)")
    pattern = re.compile(rf"^(.+)_test_split{split}\.txt$")
    split_files = sorted(p for p in label_dir.iterdir() if pattern.match(p.name))
    if not split_files:
        raise SplitError(f"no split files {label_dir}/<class>_test_split{split}.txt found")

    files = index_videos(root / "hmdb51")
    videos = []
    for label, split_file in enumerate(split_files):  # classes in alphabetical order
        for number, line in _read_lines(split_file):
            parts = line.rsplit(None, 1)
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise SplitError(f"{split_file}:{number}: expected `<video>.avi <0|1|2>`, got {line!r}")
            if parts[1] != "0":  # 0: not used in this split
                name = parts[0]
                subset = "train" if parts[1] == "1" else "val"
                videos.append(Video(Path(name).stem, files.get(name), label, subset))
    return videos


def read_kinetics_split(root: Path, split: int) -> list[Video]:
    """Videos of {root}/kinetics/{train,val}/<class>/<video>: labels are the training classes in alphabetical
    order, video ids `<class>/<file name without suffix>` (class names hold spaces). `split` is not used."""
    classes = {}
    videos = []
    for subset in ("train", "val"):
        subset_dir = root / "kinetics" / subset
        if not subset_dir.is_dir():
            raise SplitError(
                f"video folder {subset_dir} not found (unpack Kinetics as kinetics/train/<class>/<video>.mp4 and "
                "kinetics/val/<class>/<video>.mp4)"
            )
        class_dirs = sorted(p for p in subset_dir.iterdir() if p.is_dir())
        if subset == "train":
            classes = {p.name: label for label, p in enumerate(class_dirs)}
        for class_dir in class_dirs:
            if class_dir.name not in classes:
                raise SplitError(f"class folder {class_dir} has no counterpart in {root / 'kinetics' / 'train'}")
            for path in sorted(class_dir.iterdir()):
                if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
                    videos.append(Video(f"{class_dir.name}/{path.stem}", path, classes[class_dir.name], subset))
    return videos


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to short_side (0: unchanged)."""
    if short_side <= 0:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def decode_pyav(src: Path, dst: Path, short_side: int, max_frames: int | None = None) -> int:
    """Write every frame of src (the first max_frames) as dst/00001.jpg ... with PyAV; returns the frame count."""
    import av  # imported here so that --backend ffmpeg works without PyAV

    count = 0
    with av.open(str(src)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        for frame in container.decode(container.streams.video[0]):
            width, height = scaled_size(frame.width, frame.height, short_side)
            image = frame.to_image(width=width, height=height, interpolation="AREA")
            count += 1
            image.save(dst / f"{count:05d}.jpg", quality=JPEG_QUALITY)
            if count == max_frames:
                break
    return count


@functools.cache
def _passthrough_option() -> list[str]:
    """ffmpeg 5.1 and later spell it -fps_mode (newer ones dropped -vsync); older ones only know -vsync."""
    command = ["ffmpeg", "-hide_banner", "-h", "long"]
    help_text = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    return ["-fps_mode", "passthrough"] if "-fps_mode" in help_text else ["-vsync", "passthrough"]


def decode_ffmpeg(src: Path, dst: Path, short_side: int, max_frames: int | None = None) -> int:
    """Write every frame of src (the first max_frames) as dst/00001.jpg ... with the ffmpeg program; returns the
    frame count."""
    command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(src), "-map", "0:v:0"]
    if short_side > 0:
        s = short_side
        scale = f"scale=w='if(lte(iw,ih),{s},round(iw*{s}/ih))':h='if(lte(iw,ih),round(ih*{s}/iw),{s})'"
        command += ["-vf", scale]  # the same sizes as scaled_size()
    if max_frames:
        command += ["-frames:v", str(max_frames)]
    # passthrough: one image per decoded frame, never duplicated or dropped to reach a frame rate
    command += [*_passthrough_option(), "-q:v", "2", str(dst / "%05d.jpg")]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or [f"ffmpeg exited with {result.returncode}"]
        raise RuntimeError(lines[-1])
    return len(list(dst.glob("*.jpg")))


def complete_frame_count(folder: Path) -> int:
    """Frame count of a finished frame folder (00001.jpg .. N contiguous), 0 if absent or incomplete."""
    try:
        names = {name for name in os.listdir(folder) if name.endswith(".jpg")}
    except FileNotFoundError:
        return 0
    count = len(names)
    if count == 0 or names != {f"{i:05d}.jpg" for i in range(1, count + 1)}:
        return 0
    return count if (folder / f"{count:05d}.jpg").stat().st_size > 0 else 0


def declared_frames(src: Path) -> tuple[int, bool]:
    """(frame count the container declares, whether it is estimated from duration x frame rate); (0, False) if unknown.

    Read with PyAV (for either backend) from the header only; without PyAV the count is unknown.
    """
    try:
        import av
    except ImportError:
        return 0, False
    try:
        with av.open(str(src)) as container:
            if not container.streams.video:
                return 0, False
            stream = container.streams.video[0]
            if stream.frames > 0:  # the header's count (AVI's stream header, MP4's sample table)
                return stream.frames, False
            rate = stream.average_rate or stream.guessed_rate
            if rate and stream.duration and stream.time_base:
                return round(float(stream.duration * stream.time_base * rate)), True
            if rate and container.duration:
                return round(container.duration / av.time_base * float(rate)), True
    except av.FFmpegError:
        pass
    return 0, False


def is_short(decoded: int, declared: int, estimated: bool = False) -> bool:
    """True if fewer frames decoded than the container declares, beyond what containers misstate.

    Headers are often off by a frame or two (and estimates from duration x frame rate by more), so
    a shortfall counts only above max(2, 1% of the declared count), or max(2, 5%) for an estimate.
    """
    return declared > 0 and declared - decoded > max(2, declared // (20 if estimated else 100))


def shortfall_message(decoded: int, declared: int, estimated: bool) -> str:
    what = f"about {declared} frames its duration and frame rate imply" if estimated else \
        f"{declared} frames its header declares"
    return (
        f"decoded only {decoded} of the {what} (a truncated or damaged file?); replace the file and "
        "re-run, which extracts it again, or pass --allow-short to keep the frames that decode"
    )


def extract_one(task: tuple) -> tuple[str, int, str | None, bool]:
    """Extract one video unless already done; returns (video id, frames, error or None, skipped)."""
    video_id, src, frame_dir, short_side, backend, allow_short, max_frames = task

    def expected() -> tuple[int, bool]:  # the frames a complete folder holds, as the container declares them
        declared, estimated = declared_frames(Path(src))
        return (min(declared, max_frames) if max_frames and declared else declared), estimated

    final = Path(frame_dir) / video_id
    count = complete_frame_count(final)
    declared = (0, False)
    if count and not allow_short:
        declared = expected()
    if count and not is_short(count, *declared):
        return video_id, count, None, True

    partial = Path(frame_dir) / PARTIAL_DIR / video_id
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    decode = decode_ffmpeg if backend == "ffmpeg" else decode_pyav
    try:
        count = decode(Path(src), partial, short_side, max_frames)
        if count == 0:
            raise ValueError("no frames could be decoded")
        if not allow_short:
            declared = expected()
            if is_short(count, *declared):
                # Not renamed into place, so not complete: the next run tries again.
                raise ValueError(shortfall_message(count, *declared))
    except Exception as err:  # noqa: BLE001  any decoder failure is this video's failure, not the run's
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # e.g. a short folder an older version took for complete
        return video_id, 0, f"{type(err).__name__}: {err}".strip(), False
    if final.exists():  # an incomplete folder from an interrupted older run
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)  # Kinetics ids are <class>/<video>
    os.replace(partial, final)  # atomic: a folder under its final name is always complete
    return video_id, count, None, False


def run_tasks(tasks: list[tuple], workers: int):
    """extract_one's results in the order videos finish, from a pool of `workers` processes."""
    if workers <= 1:
        yield from map(extract_one, tasks)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap_unordered(extract_one, tasks)


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-d", "--dataset", required=True, choices=["ucf101", "hmdb51", "kinetics"], help="dataset to extract"
    )
    parser.add_argument(
        "--split", type=int, default=1, choices=[1, 2, 3],
        help="official split for the list files (default 1; Kinetics has one)",
    )
    parser.add_argument(
        "--root", default=".",
        help="folder holding ucf101/ + ucfTrainTestlist/, hmdb51/ + hmdb51_labels/ or kinetics/{train,val}/ "
        "(default: current folder)",
    )
    parser.add_argument(
        "--short-side", type=int, default=128,
        help="scale frames so the shorter side has this many pixels; 128 suits C3D and R(2+1)D, "
        "S3D (224 crops) wants 256 or more; 0 keeps the source size (default 128)",
    )
    parser.add_argument(
        "-j", "--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (default: all cores)"
    )
    parser.add_argument(
        "--backend", choices=["pyav", "ffmpeg"], default="pyav",
        help="pyav decodes in-process (default); ffmpeg runs the ffmpeg program, which must be on PATH",
    )
    parser.add_argument(
        "--allow-short", action="store_true",
        help="keep videos that decode fewer frames than their container declares (by default such a video is "
        "listed in failed.txt, left out and extracted again on the next run)",
    )
    parser.add_argument(
        "--max-frames", type=int, metavar="N",
        help="extract only the first N frames of each video, 0 for all (default: 64 for kinetics, as the "
        "original, which trains on those; all for the others)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.root)
    if args.backend == "ffmpeg" and shutil.which("ffmpeg") is None:
        print(
            "error: --backend ffmpeg needs the `ffmpeg` program on PATH (Debian/Ubuntu: apt install "
            "ffmpeg); or leave out --backend to decode with PyAV, which needs no program",
            file=sys.stderr,
        )
        return 2
    read_split = {"ucf101": read_ucf101_split, "hmdb51": read_hmdb51_split, "kinetics": read_kinetics_split}[
        args.dataset]
    max_frames = dataset_facts(args.dataset)["max_frames"] if args.max_frames is None else (args.max_frames or None)
    try:
        listed = read_split(root, args.split)
    except SplitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    videos = {}
    for video in listed:
        seen = videos.setdefault(video.video_id, video)
        if (seen.label, seen.subset) != (video.label, video.subset):
            print(f"error: video {video.video_id} is listed twice, with different labels or subsets", file=sys.stderr)
            return 2

    frame_dir = root / f"{args.dataset}_frame"
    frame_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(frame_dir / PARTIAL_DIR, ignore_errors=True)  # left over by an interrupted run

    missing = [v for v in videos.values() if v.path is None]
    failures = {v.video_id: f"video file not found under {root / args.dataset}" for v in missing}
    tasks = [
        (v.video_id, str(v.path), str(frame_dir), args.short_side, args.backend, args.allow_short, max_frames)
        for v in videos.values() if v.path is not None
    ]
    frames, skipped = {}, 0
    with tqdm(total=len(tasks), desc=f"extract {args.dataset}", unit="video") as progress:
        for video_id, count, error, was_skipped in run_tasks(tasks, args.workers):
            if error:
                failures[video_id] = error
                progress.write(f"failed: {video_id}: {error}", file=sys.stderr)
            else:
                frames[video_id] = count
                skipped += was_skipped
            progress.update()
    shutil.rmtree(frame_dir / PARTIAL_DIR, ignore_errors=True)

    # Sorted by video id, so the list files do not depend on which worker finished first. Kinetics
    # lists are `;`-separated, as the original's: its video ids hold spaces.
    sep = ";" if args.dataset == "kinetics" else " "
    for subset in ("train", "val"):
        lines = [f"{v}{sep}1{sep}{frames[v]}{sep}{videos[v].label}\n" for v in sorted(frames)
                 if videos[v].subset == subset]
        write_text_atomically(frame_dir / f"{subset}.txt", "".join(lines))
    failed_list = frame_dir / "failed.txt"
    if failures:
        lines = [f"{v}\t{videos[v].path or '-'}\t{failures[v]}\n" for v in sorted(failures)]
        write_text_atomically(failed_list, "".join(lines))
    elif failed_list.exists():
        failed_list.unlink()

    print(f"{args.dataset}: {len(frames)} videos in {frame_dir} ({skipped} already complete), {len(failures)} failed")
    if failures:
        print(
            f"the failed videos are listed in {failed_list} and left out of train.txt / val.txt; "
            "a re-run tries them again", file=sys.stderr,
        )
    if not frames:
        print("error: no video could be extracted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
