"""Video clip datasets over frame folders (VideoDataSet) or an LMDB database (VideoDataSetLMDB)."""

import os
from pathlib import Path

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import decode_clip
from .record_format import (
    KEYS_KEY,
    RecordFormatError,
    decode_keys,
    decode_record,
    old_database_message,
)
from .video_list import VideoRecord, read_list_file


def sample_frame_indices(num_frames: int, num_groups: int, jitter: bool = False) -> np.ndarray:
    """0-based frame indices, one per equal segment: its centre (the seed's rule) or, with jitter, a random frame in it.

    Fewer frames than segments repeat frames, as the seed does.
    """
    tick = num_frames / num_groups
    starts = tick * np.arange(num_groups)
    offsets = torch.rand(num_groups).numpy() * tick if jitter else tick / 2.0
    return np.minimum((starts + offsets).astype(np.int64), num_frames - 1)


class _ClipDataset(Dataset):
    """Shared logic; subclasses read the frames. `(clip, label)` items, clip 3 x num_groups x H x W float.

    One frame per equal segment of the video: its centre, or a random one with `temporal_jitter`;
    videos of fewer than `filter_video` frames are left out (0 keeps all); `transform` turns the
    clip's JPEG bytes into the tensor (get_augmentor), None gives full-size frames in [0, 1].
    """

    def __init__(
        self, root_path, list_file, num_groups: int = 16, transform=None, is_train: bool = False,
        filter_video: int = 16, temporal_jitter: bool = False,
    ):
        self.root_path, self.list_file = Path(root_path), Path(list_file)
        self.num_groups, self.transform = num_groups, transform
        self.is_train = is_train  # kept from the seed's signature: the seed samples train and val alike
        self.temporal_jitter = temporal_jitter
        records = read_list_file(self.list_file)
        if not records:
            raise ValueError(f"list file {self.list_file} has no videos")
        self.num_classes = max(record.label for record in records) + 1
        self.records = [record for record in records if record.num_frames >= filter_video]
        if not self.records:
            raise ValueError(f"no video in {self.list_file} has {filter_video} frames or more (filter_video)")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        indices = sample_frame_indices(record.num_frames, self.num_groups, self.temporal_jitter)
        frames = self.read_frames(record, indices.tolist())
        clip = self.transform(frames) if self.transform is not None else decode_clip(frames)
        return clip, record.label

    def read_frames(self, record: VideoRecord, indices: list[int]) -> list[bytes]:
        raise NotImplementedError


class VideoDataSet(_ClipDataset):
    """Clips read from frame folders root_path/<video id>/00001.jpg ..., as written by extract_videos.py."""

    def read_frames(self, record: VideoRecord, indices: list[int]) -> list[bytes]:
        frames = []
        for index in indices:
            path = self.root_path / record.video_id / f"{index + 1:05d}.jpg"
            try:
                frames.append(path.read_bytes())
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"frame file {path} not found ({self.list_file} says {record.num_frames} frames)"
                ) from None
        return frames


class VideoDataSetLMDB(_ClipDataset):
    """Clips read from an LMDB database written by create_lmdb.py (root_path is the .lmdb path)."""

    def __init__(
        self, root_path, list_file, num_groups: int = 16, transform=None, is_train: bool = False,
        filter_video: int = 16, temporal_jitter: bool = False,
    ):
        super().__init__(root_path, list_file, num_groups, transform, is_train, filter_video, temporal_jitter)
        if not self.root_path.exists():
            raise FileNotFoundError(f"LMDB database {self.root_path} not found (create_lmdb.py writes it)")
        self._env, self._env_pid = None, None
        env = self._open()
        try:
            stored = self._stored_keys(env)
        finally:
            env.close()  # never carried into forked workers; each opens its own
        missing = [record.video_id for record in self.records if record.video_id not in stored]
        if missing:
            raise LookupError(
                f"{len(missing)} videos of {self.list_file} are not in {self.root_path}, e.g. {missing[:3]}; "
                "run create_lmdb.py with a -vr range that covers them"
            )

    def _open(self) -> lmdb.Environment:
        return lmdb.open(
            str(self.root_path), subdir=self.root_path.is_dir(), readonly=True, lock=False,
            readahead=False, meminit=False,
        )

    def _stored_keys(self, env: lmdb.Environment) -> set[str]:
        with env.begin() as txn:
            try:
                raw = txn.get(KEYS_KEY)
                if raw is None:
                    raise RecordFormatError("no '__keys__' entry")
                return set(decode_keys(raw))
            except RecordFormatError as err:
                raise RecordFormatError(f"{old_database_message(self.root_path)} ({err})") from None

    def _environment(self) -> lmdb.Environment:
        # Opened on first use in each process: an LMDB handle must not be used across a fork, so a
        # DataLoader worker drops the one it inherited (py-lmdb allows one handle per path) and opens its own.
        if self._env_pid != os.getpid():
            if self._env is not None:
                self._env.close()
            self._env, self._env_pid = self._open(), os.getpid()
        return self._env

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_env"] = state["_env_pid"] = None  # spawned workers open their own
        return state

    def read_frames(self, record: VideoRecord, indices: list[int]) -> list[bytes]:
        with self._environment().begin(buffers=True) as txn:
            raw = txn.get(record.video_id.encode("ascii"))
            if raw is None:
                raise KeyError(f"video {record.video_id!r} of {self.list_file} is not in {self.root_path}")
            try:
                clip = decode_record(raw, record.video_id)
            except RecordFormatError as err:
                raise RecordFormatError(f"{old_database_message(self.root_path)} ({err})") from None
            if clip.num_frames != record.num_frames:
                raise ValueError(
                    f"video {record.video_id!r} has {clip.num_frames} frames in {self.root_path} but "
                    f"{record.num_frames} in {self.list_file}; re-create the database from the current frames"
                )
            return [clip.frame(index) for index in indices]  # copied out before the buffer is released
