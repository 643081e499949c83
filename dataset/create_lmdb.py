"""Pack the frame folders of a list file into an LMDB database, one Arrow IPC record per video.

Run it inside dataset/, as the original README does:
    python create_lmdb.py -d ucf101_frame -s train -vr 0 10000
    python create_lmdb.py -d ucf101_frame -s train -vr 10000 20000   # adds to the same database
    python create_lmdb.py -d kinetics_frame -s mini_train            # mini_train.txt -> mini_train.lmdb
Writes {d}/{s}.lmdb from the list {d}/{s}.txt. Re-running a range overwrites its records. Every
frame is checked to decode; a Kinetics folder (kinetics_frame) packs the first 64 frames of a video.
"""

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb
from tqdm import tqdm

if __package__:
    from . import record_format as fmt
    from .errors import DataError
    from .frame_check import frame_problem
    from .layout import MINI_PREFIX, SPLITS, dataset_facts
    from .video_list import VideoRecord, read_list_file
else:  # run as a script from dataset/, as in the original README
    import record_format as fmt
    from errors import DataError
    from frame_check import frame_problem
    from layout import MINI_PREFIX, SPLITS, dataset_facts
    from video_list import VideoRecord, read_list_file

INITIAL_MAP_SIZE = 1 << 28  # 256 MiB; doubled whenever a commit does not fit
BATCH_VIDEOS = 64  # videos per write transaction (~64 MB of UCF101 frames at short side 128)


def open_database(db_path: Path) -> lmdb.Environment:
    """Open (or create) the database for writing; a new one is a single file, as the original's."""
    size = db_path.stat().st_size if db_path.is_file() else 0
    return lmdb.open(
        str(db_path), subdir=db_path.is_dir(), map_size=max(INITIAL_MAP_SIZE, 2 * size),
        readonly=False, meminit=False,
    )


class FrameError(Exception):
    """A frame file that is missing, empty or does not decode: nothing of its batch is written."""


def check_database(env: lmdb.Environment) -> None:
    """RecordFormatError if the database was written by another tool (its index, else its first record, tells)."""
    with env.begin(buffers=True) as txn:
        if (raw := txn.get(fmt.KEYS_KEY)) is not None:
            fmt.decode_keys(raw)
            if (raw := txn.get(fmt.FRAMES_KEY)) is not None:
                fmt.decode_frame_counts(raw)
            return  # this tool's index: a record that does not decode is damaged, and re-packing it is the fix
        for key in txn.cursor().iternext(values=False):
            if bytes(key) not in fmt.INDEX_KEYS:
                fmt.decode_record(txn.get(key), bytes(key).decode(errors="replace"))
                break


def default_max_frames(frame_dir: Path) -> int | None:
    """The frame cap of the dataset a `<name>_frame` folder holds: 64 for kinetics_frame, else None (all)."""
    name = frame_dir.resolve().name
    return dataset_facts(name.removesuffix("_frame"))["max_frames"] if name.endswith("_frame") else None


def load_video(frame_dir: Path, record: VideoRecord, max_frames: int | None = None) -> tuple[bytes, bytes, int]:
    """(key, serialised record, frame count) of one video: its frames 00001.jpg .. N (at most max_frames),
    each checked to decode, so that training never meets a frame that does not."""
    folder = frame_dir / record.video_id
    count = record.num_frames if max_frames is None else min(record.num_frames, max_frames)
    frames = []
    for index in range(1, count + 1):
        path = folder / f"{index:05d}.jpg"
        redo = f"re-extract the video (delete {folder}, re-run extract_videos.py)"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FrameError(
                f"frame file {path} of video {record.video_id!r} not found (the list says {record.num_frames} "
                f"frames); {redo}"
            ) from None
        if (problem := frame_problem(data)) is not None:
            raise FrameError(f"frame file {path} of video {record.video_id!r} {problem}; {redo}")
        frames.append(data)
    value = fmt.encode_record(record.video_id, record.label, frames)
    return record.video_id.encode("ascii"), value, count


def database_index(txn: lmdb.Transaction, new: dict[str, int]) -> dict[str, int]:
    """`{video id: frame count}` of every record in the database as this transaction sees it.

    Read from the database itself, not from this process's view: another create_lmdb.py may
    have committed records since this one started (write transactions are serialised, so the
    view inside one is complete). Records older than the `__frames__` entry have their count
    read from their header.
    """
    stored = txn.get(fmt.FRAMES_KEY)
    known = {**(fmt.decode_frame_counts(stored) if stored is not None else {}), **new}
    index = {}
    for raw in txn.cursor().iternext(values=False):
        key = bytes(raw)
        if key in fmt.INDEX_KEYS:
            continue
        video_id = key.decode("ascii")
        count = known.get(video_id)
        index[video_id] = count if count is not None else fmt.decode_record(txn.get(key), video_id).num_frames
    return index


def commit(env: lmdb.Environment, items: list[tuple[bytes, bytes, int]]) -> int:
    """Write one batch and the index entries (`__keys__`, `__len__`, `__frames__`) in one transaction,
    growing the map when full; returns the number of videos the database then holds."""
    while True:
        try:
            with env.begin(write=True, buffers=True) as txn:
                for key, value, _ in items:
                    txn.put(key, value)
                index = database_index(txn, {key.decode("ascii"): count for key, _, count in items})
                txn.put(fmt.KEYS_KEY, fmt.encode_keys(list(index)))
                txn.put(fmt.LEN_KEY, str(len(index)).encode())
                txn.put(fmt.FRAMES_KEY, fmt.encode_frame_counts(index))
            return len(index)
        except lmdb.MapFullError:  # the transaction was aborted; retry it in a map twice as large
            env.set_mapsize(env.info()["map_size"] * 2)
        except lmdb.MapResizedError:  # another writer grew the map: adopt its size
            env.set_mapsize(0)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "-d", "--dataset", required=True, help="frame folder written by extract_videos.py, e.g. ucf101_frame"
    )
    splits = [*SPLITS, *(MINI_PREFIX + split for split in SPLITS)]
    parser.add_argument(
        "-s", "--split", required=True, choices=splits,
        help="which list file to pack: DIR/SPLIT.txt into DIR/SPLIT.lmdb (mini_train, mini_val: a mini dataset's)",
    )
    parser.add_argument(
        "-vr", "--video-range", type=int, nargs=2, metavar=("START", "END"),
        help="pack list lines START..END-1 only (default: all); END past the end means the end",
    )
    parser.add_argument("-n", "--workers", type=int, default=4, help="threads reading frame files (default 4)")
    parser.add_argument(
        "--max-frames", type=int, metavar="N",
        help="pack only the first N frames of each video, 0 for all (default: the dataset's cap, from the folder "
        "name: 64 for kinetics_frame, all for the others)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    frame_dir = Path(args.dataset)
    list_path = frame_dir / f"{args.split}.txt"
    db_path = frame_dir / f"{args.split}.lmdb"
    max_frames = default_max_frames(frame_dir) if args.max_frames is None else (args.max_frames or None)
    try:
        records = read_list_file(list_path)  # refuses a video listed twice, before anything is written
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    start, end = args.video_range or (0, len(records))
    end = min(end, len(records))
    if not 0 <= start < end:
        print(f"error: -vr {start} {end} selects no line of {list_path} ({len(records)} lines)", file=sys.stderr)
        return 2
    part = records[start:end]
    for record in part:
        if not record.video_id.isascii():
            print(f"error: video id {record.video_id!r} in {list_path} is not ASCII", file=sys.stderr)
            return 2

    env = None  # a new database is created at the first commit: a run refused before it leaves no empty one
    if db_path.exists():
        env = open_database(db_path)
        try:
            check_database(env)
        except fmt.RecordFormatError as err:
            env.close()
            print(f"error: {fmt.old_database_message(db_path)}\n({err})", file=sys.stderr)
            return 2

    first = 0
    try:
        progress = tqdm(total=len(part), desc=f"lmdb {args.split}", unit="video")
        with ThreadPoolExecutor(args.workers) as pool, progress:
            for first in range(0, len(part), BATCH_VIDEOS):
                batch = part[first:first + BATCH_VIDEOS]
                # A batch is committed whole, with the index, or not at all: the database stays consistent.
                items = list(pool.map(lambda record: load_video(frame_dir, record, max_frames), batch))
                if env is None:
                    env = open_database(db_path)
                stored = commit(env, items)
                progress.update(len(batch))
    except FrameError as err:
        failed = start + first
        done = f"list lines {start}..{failed - 1} are packed; " if first else ""
        print(
            f"error: {err}\n{done}nothing of list lines {failed}..{min(failed + BATCH_VIDEOS, end) - 1} (the batch "
            f"holding it) was written. Fix the video, then re-run with -vr {failed} {end}",
            file=sys.stderr,
        )
        return 1
    except fmt.RecordFormatError as err:  # an older database's record, read to index it
        print(f"error: {db_path}: {err}: that record is damaged; re-pack its video (its list line in -vr)",
              file=sys.stderr)
        return 1
    finally:
        if env is not None:
            env.close()
    capped = f" (the first {max_frames} frames of each video)" if max_frames else ""
    print(f"wrote list lines {start}..{end - 1} of {list_path} into {db_path}{capped}, which now holds {stored} videos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
