"""Video data for training: clip datasets over frame folders or LMDB, and their transforms.

Preparing the data (extract_videos.py, create_lmdb.py) is described in dataset/README.md. What a
dataset name means (class count, frame cap, `mini_` files): dataset_facts, frame_root, split_files.
"""

from .augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipEvalTransform,
    ClipTrainTransform,
    get_augmentor,
    normalize_clips,
)
from .clips import VideoDataSet, VideoDataSetLMDB, sample_frame_indices
from .errors import ClipReadError, DatabaseMismatchError, DataError, EmptyDatabaseError, MissingDataError
from .layout import dataset_facts, frame_root, split_files
from .record_format import RecordFormatError
from .video_list import (
    DuplicateVideoError,
    ListFileError,
    VideoRecord,
    num_classes_from_list,
    read_list_file,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipEvalTransform",
    "ClipReadError",
    "ClipTrainTransform",
    "DataError",
    "DatabaseMismatchError",
    "DuplicateVideoError",
    "EmptyDatabaseError",
    "ListFileError",
    "MissingDataError",
    "RecordFormatError",
    "VideoDataSet",
    "VideoDataSetLMDB",
    "VideoRecord",
    "dataset_facts",
    "frame_root",
    "get_augmentor",
    "normalize_clips",
    "num_classes_from_list",
    "read_list_file",
    "sample_frame_indices",
    "split_files",
]
