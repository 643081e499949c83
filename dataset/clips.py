"""Video clip datasets over frame folders (VideoDataSet) or an LMDB database (VideoDataSetLMDB)."""

import os
from pathlib import Path

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import decode_clip
from .errors import ClipReadError, DatabaseMismatchError, DataError, EmptyDatabaseError, MissingDataError
from .frame_check import frame_problem
from .record_format import (
    FRAMES_KEY,
    INDEX_KEYS,
    KEYS_KEY,
    RecordFormatError,
    decode_frame_counts,
    decode_keys,
    decode_record,
    old_database_message,
)
from .video_list import VideoRecord, read_list_file

EXAMPLES = 3  # mismatching videos named in an error message

# LMDB allows one environment per database in a process, so datasets over one database share it:
# real path -> (pid that opened it, environment).
_ENVIRONMENTS: dict[str, tuple[int, lmdb.Environment]] = {}


def _open_readonly(path: str, readahead: bool = False) -> lmdb.Environment:
    # Training reads few frames of random videos, where the kernel's readahead would read pages for nothing.
    return lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False, readahead=readahead, meminit=False)


def _shared_environment(path: Path) -> lmdb.Environment:
    """This process's read-only environment of the database at `path`, opened on first use.

    A handle must not be used across a fork: a DataLoader worker drops the one it inherited and
    opens its own (spawned workers start without any).
    """
    key = os.path.realpath(path)
    pid, env = _ENVIRONMENTS.get(key, (None, None))
    if pid != os.getpid():
        if env is not None:
            env.close()
        env = _open_readonly(key)
        _ENVIRONMENTS[key] = (os.getpid(), env)
    return env


def sample_frame_indices(num_frames: int, num_groups: int, jitter: bool = False) -> np.ndarray:
    """0-based frame indices, one per equal segment: its centre (the seed's rule) or, with jitter, a random frame in it.

    Fewer frames than segments repeat frames, as the seed does.
    """
    tick = num_frames / num_groups
    starts = tick * np.arange(num_groups)
    offsets = torch.rand(num_groups).numpy() * tick if jitter else tick / 2.0
    return np.minimum((starts + offsets).astype(np.int64), num_frames - 1)


class _ClipDataset(Dataset):
    """Shared logic; subclasses read the frames. `(clip, label)` items, clip 3 x num_groups x H x W float
    (uint8 from a `uint8=True` transform).

    One frame per equal segment of the video's first `max_frames` frames (None: all of it): its
    centre, or a random one with `temporal_jitter`; videos of fewer than `filter_video` frames are
    left out (0 keeps all); `transform` turns the clip's JPEG bytes into the tensor (get_augmentor),
    None gives full-size frames in [0, 1]. Inputs that cannot work raise a DataError subclass when
    the dataset is built; a clip that cannot be read raises ClipReadError, one line naming the
    video, the frame and what to do.
    """

    SOURCE = "frame folder"

    def __init__(
        self, root_path, list_file, num_groups: int = 16, transform=None, is_train: bool = False,
        filter_video: int = 16, temporal_jitter: bool = False, max_frames: int | None = None,
    ):
        self.root_path, self.list_file = Path(root_path), Path(list_file)
        self.num_groups, self.transform = num_groups, transform
        self.is_train = is_train  # kept from the seed's signature: the seed samples train and val alike
        self.temporal_jitter = temporal_jitter
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be a positive int or None (all frames), got {max_frames!r}")
        self.max_frames = max_frames
        records = read_list_file(self.list_file)
        if not records:
            raise DataError(
                f"list file {self.list_file} has no videos; extract_videos.py lists the videos it extracted "
                "(see failed.txt beside it for those it could not)"
            )
        # Position in the list (create_lmdb.py's -vr counts these), for the repair a read error suggests.
        self.list_position = {record.video_id: position for position, record in enumerate(records)}
        self.num_classes = max(record.label for record in records) + 1
        self.records = [record for record in records if record.num_frames >= filter_video]
        if not self.records:
            longest = max(record.num_frames for record in records)
            raise DataError(
                f"no video in {self.list_file} has {filter_video} frames or more (the longest has {longest}); "
                "extract longer videos, or lower the frame filter (filter_video)"
            )

    def __len__(self) -> int:
        return len(self.records)

    def used_frames(self, record: VideoRecord) -> int:
        """How many of the video's first frames its clips sample from: all, or at most max_frames."""
        return record.num_frames if self.max_frames is None else min(record.num_frames, self.max_frames)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        indices = sample_frame_indices(self.used_frames(record), self.num_groups, self.temporal_jitter).tolist()
        frames = self.read_frames(record, indices)
        try:
            clip = self.transform(frames) if self.transform is not None else decode_clip(frames)
        except Exception as err:
            error = self._decode_error(record, indices, frames, err)
            if error is err:
                raise
            raise error from err
        return clip, record.label

    def _decode_error(self, record: VideoRecord, indices: list[int], frames: list[bytes], err: Exception):
        """The ClipReadError for a clip that failed: naming its first bad frame (found by decoding the
        frames one by one, only on this error path), else the error if it is an OSError / ValueError;
        `err` itself for any other error."""
        for frame, data in zip(indices, frames):
            problem = frame_problem(data, full=True)
            if problem is not None:
                return ClipReadError(f"{self.frame_name(record, frame)} {problem}; {self.repair(record)}")
        if isinstance(err, (OSError, ValueError)):
            return ClipReadError(
                f"{self.SOURCE} {self.root_path}: video {record.video_id!r}: its frames decode one by one but not "
                f"as a clip ({type(err).__name__}: {err}); {self.repair(record)}"
            )
        return err  # every frame decodes and the error is not about data: a program error, keep its traceback

    def frame_name(self, record: VideoRecord, frame: int) -> str:
        """`<where>: frame N of video '<id>'`, frame 0-based."""
        raise NotImplementedError

    def repair(self, record: VideoRecord) -> str:
        """What to do about a damaged video, in words for the end of a message."""
        raise NotImplementedError

    def read_frames(self, record: VideoRecord, indices: list[int]) -> list[bytes]:
        raise NotImplementedError


class VideoDataSet(_ClipDataset):
    """Clips read from frame folders root_path/<video id>/00001.jpg ..., as written by extract_videos.py."""

    def __init__(
        self, root_path, list_file, num_groups: int = 16, transform=None, is_train: bool = False,
        filter_video: int = 16, temporal_jitter: bool = False, max_frames: int | None = None,
    ):
        super().__init__(
            root_path, list_file, num_groups, transform, is_train, filter_video, temporal_jitter, max_frames
        )
        # One stat per video (the last frame its clips may use) finds a wrong root or a list from
        # another extraction now rather than at some batch of some epoch.
        root = str(self.root_path)
        missing = [
            record for record in self.records
            if not os.path.isfile(os.path.join(root, record.video_id, f"{self.used_frames(record):05d}.jpg"))
        ]
        if not missing:
            return
        if len(missing) == len(self.records) and not any(
            os.path.isdir(os.path.join(root, record.video_id)) for record in missing
        ):
            raise MissingDataError(
                f"none of the {len(missing)} videos of {self.list_file} has a frame folder under {self.root_path} "
                f"(e.g. {self.root_path / missing[0].video_id}); pass the frame folder that extract_videos.py "
                "wrote (e.g. ucf101_frame)"
            )
        examples = ", ".join(
            str(self.root_path / record.video_id / f"{self.used_frames(record):05d}.jpg")
            for record in missing[:EXAMPLES]
        )
        raise MissingDataError(
            f"{len(missing)} videos of {self.list_file} have fewer frames under {self.root_path} than the list "
            f"says: {examples} not found. The list and the frame folders come from different runs: "
            "re-run extract_videos.py, which writes both"
        )

    def frame_name(self, record: VideoRecord, frame: int) -> str:
        path = self.root_path / record.video_id / f"{frame + 1:05d}.jpg"
        return f"{path}: frame {frame + 1} of video {record.video_id!r}"

    def repair(self, record: VideoRecord) -> str:
        return (f"re-extract the video: delete {self.root_path / record.video_id} and re-run extract_videos.py, "
                "which extracts the folders that are missing")

    def read_frames(self, record: VideoRecord, indices: list[int]) -> list[bytes]:
        frames = []
        for index in indices:
            path = self.root_path / record.video_id / f"{index + 1:05d}.jpg"
            try:
                frames.append(path.read_bytes())
            except FileNotFoundError:
                raise ClipReadError(
                    f"{self.frame_name(record, index)} not found ({self.list_file} says {record.num_frames} "
                    f"frames); {self.repair(record)}"
                ) from None
            except OSError as err:
                raise ClipReadError(
                    f"{self.frame_name(record, index)} cannot be read ({err.strerror or err}); {self.repair(record)}"
                ) from err
        return frames


class VideoDataSetLMDB(_ClipDataset):
    """Clips read from an LMDB database written by create_lmdb.py (root_path is the .lmdb path)."""

    SOURCE = "LMDB database"

    def __init__(
        self, root_path, list_file, num_groups: int = 16, transform=None, is_train: bool = False,
        filter_video: int = 16, temporal_jitter: bool = False, max_frames: int | None = None,
    ):
        super().__init__(
            root_path, list_file, num_groups, transform, is_train, filter_video, temporal_jitter, max_frames
        )
        if not self.root_path.exists():
            raise MissingDataError(f"LMDB database {self.root_path} not found (create_lmdb.py writes it)")
        shared = _ENVIRONMENTS.get(os.path.realpath(self.root_path), (None, None))
        if shared[0] == os.getpid():  # another dataset over this database has it open
            stored, frames = self._stored_index(shared[1])
        else:
            try:
                # readahead: a database without `__frames__` is read whole (below), sequentially per record
                env = _open_readonly(str(self.root_path), readahead=True)
            except lmdb.Error as err:
                raise self._unopenable(err) from None
            try:
                stored, frames = self._stored_index(env)
            finally:
                env.close()  # opened again on first read, in each process
        missing = [record.video_id for record in self.records if record.video_id not in stored]
        if missing:
            raise DatabaseMismatchError(
                f"{len(missing)} videos of {self.list_file} are not in {self.root_path}, e.g. "
                f"{missing[:EXAMPLES]}; run create_lmdb.py with a -vr range that covers them"
            )
        wrong = [(record, frames[record.video_id]) for record in self.records
                 if not self.stored_count_fits(record, frames.get(record.video_id, record.num_frames))]
        if wrong:
            examples = ", ".join(
                f"{record.video_id} (list {record.num_frames}, database {count})" for record, count in wrong[:EXAMPLES]
            )
            counts = {count for _, count in wrong}
            cap = counts.pop() if len(counts) == 1 and all(count < r.num_frames for r, count in wrong) else None
            capped = (f"; or, if it was packed with a frame cap (create_lmdb.py --max-frames {cap}, the default for "
                      f"kinetics_frame), read it with max_frames={cap}") if cap else ""
            raise DatabaseMismatchError(
                f"{len(wrong)} videos of {self.list_file} have other frame counts in {self.root_path}: {examples}. "
                "The database was made from another extraction: re-create it from the current frames (delete it, "
                f"run create_lmdb.py), or use the list file it was made from{capped}"
            )

    def stored_count_fits(self, record: VideoRecord, stored: int) -> bool:
        """Whether a record of `stored` frames serves the listed video: all its frames, or the first
        max_frames of them (create_lmdb.py --max-frames)."""
        return stored in (record.num_frames, self.used_frames(record))

    def _empty(self) -> EmptyDatabaseError:
        return EmptyDatabaseError(
            f"LMDB database {self.root_path} is empty: a create_lmdb.py run was killed before its first "
            "commit. Re-run it (python create_lmdb.py -d <dataset>_frame -s <train|val>), which fills this database"
        )

    def _unopenable(self, err: lmdb.Error) -> DataError:
        data_file = self.root_path / "data.mdb" if self.root_path.is_dir() else self.root_path
        if not data_file.is_file() or data_file.stat().st_size == 0:
            return self._empty()
        return DataError(
            f"{self.root_path} cannot be read as an LMDB database ({err}); delete it and re-create it with "
            "create_lmdb.py"
        )

    def _stored_index(self, env: lmdb.Environment) -> tuple[set[str], dict[str, int]]:
        """(ids in the database, frame count of each listed video in it), read without reading frames."""
        with env.begin(buffers=True) as txn:
            raw = txn.get(KEYS_KEY)
            if raw is None:
                self._raise_no_index(txn)
            try:
                stored = set(decode_keys(raw))
                raw = txn.get(FRAMES_KEY)
                if raw is not None:
                    return stored, decode_frame_counts(raw)
            except RecordFormatError as err:
                raise RecordFormatError(f"{old_database_message(self.root_path)} ({err})") from None
            # A database written before `__frames__`: each listed record's header. py-lmdb touches
            # every page of a value it returns (to fault them in without the GIL), so this reads
            # the records once (cold cache: as long as reading them all); re-running
            # create_lmdb.py on any range adds `__frames__` and makes this free.
            counts = {}
            for record in self.records:
                raw = txn.get(record.video_id.encode("ascii")) if record.video_id in stored else None
                if raw is None:
                    continue
                try:
                    counts[record.video_id] = decode_record(raw, record.video_id).num_frames
                except RecordFormatError as err:  # the index is this tool's, so this record is damaged
                    raise DataError(self._damaged(record, err)) from None
            return stored, counts

    def _raise_no_index(self, txn: lmdb.Transaction) -> None:
        first = next((bytes(key) for key in txn.cursor().iternext(values=False) if bytes(key) not in INDEX_KEYS), None)
        if first is None:
            raise self._empty()
        try:
            decode_record(txn.get(first), first.decode(errors="replace"))
        except RecordFormatError as err:  # records in another format: the original tool's
            raise RecordFormatError(f"{old_database_message(self.root_path)} ({err})") from None
        raise DataError(
            f"LMDB database {self.root_path} has records but no '__keys__' index; re-run create_lmdb.py with "
            "any -vr range, which rebuilds the index from the records"
        )

    def pack_command(self, record: VideoRecord) -> str:
        """The create_lmdb.py command that re-packs this one video into this database."""
        position = self.list_position[record.video_id]
        folder, stem = self.list_file.parent, self.list_file.stem
        if os.path.realpath(folder / f"{stem}.lmdb") == os.path.realpath(self.root_path):
            return f"python create_lmdb.py -d {folder} -s {stem} -vr {position} {position + 1}"
        return f"create_lmdb.py over {self.list_file} with -vr {position} {position + 1}, into {self.root_path}"

    def _damaged(self, record: VideoRecord, err: Exception) -> str:
        return (f"LMDB database {self.root_path}: the record of video {record.video_id!r} is damaged ({err}); "
                f"re-pack that video, which overwrites its record: {self.pack_command(record)}")

    def frame_name(self, record: VideoRecord, frame: int) -> str:
        return f"LMDB database {self.root_path}: frame {frame + 1} of video {record.video_id!r}"

    def repair(self, record: VideoRecord) -> str:
        return (f"re-pack the video from intact frames: {self.pack_command(record)} (create_lmdb.py checks every "
                f"frame it packs; if {self.list_file.parent / record.video_id} is damaged too, delete it and re-run "
                "extract_videos.py first)")

    def read_frames(self, record: VideoRecord, indices: list[int]) -> list[bytes]:
        try:
            with _shared_environment(self.root_path).begin(buffers=True) as txn:
                raw = txn.get(record.video_id.encode("ascii"))
                if raw is None:
                    raise ClipReadError(
                        f"LMDB database {self.root_path}: video {record.video_id!r} of {self.list_file} is no longer "
                        f"in it (it was when the dataset was built); re-pack it: {self.pack_command(record)}"
                    )
                try:
                    clip = decode_record(raw, record.video_id)
                except Exception as err:  # noqa: BLE001  the format was checked at open: this record is damaged
                    raise ClipReadError(self._damaged(record, err)) from None
                if not self.stored_count_fits(record, clip.num_frames):
                    raise ClipReadError(
                        f"LMDB database {self.root_path}: video {record.video_id!r} has {clip.num_frames} frames in it "
                        f"but {record.num_frames} in {self.list_file}: the database was re-packed since the dataset "
                        "was built; restart the run, or re-create the database from the current frames"
                    )
                return [clip.frame(index) for index in indices]  # copied out before the buffer is released
        except lmdb.Error as err:
            what = ("it no longer exists; restore it or re-create it" if not self.root_path.exists() else
                    "the database file is damaged; delete it and re-create it")
            raise ClipReadError(
                f"LMDB database {self.root_path}: LMDB cannot read video {record.video_id!r} ({err}): {what} with "
                "create_lmdb.py"
            ) from err
