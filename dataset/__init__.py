"""Video data for training: clip datasets over frame folders or LMDB, and their transforms.

Preparing the data (extract_videos.py, create_lmdb.py) is described in dataset/README.md.
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
from .errors import DatabaseMismatchError, DataError, EmptyDatabaseError, MissingDataError
from .record_format import RecordFormatError
from .video_list import (
    ListFileError,
    VideoRecord,
    num_classes_from_list,
    read_list_file,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipEvalTransform",
    "ClipTrainTransform",
    "DataError",
    "DatabaseMismatchError",
    "EmptyDatabaseError",
    "ListFileError",
    "MissingDataError",
    "RecordFormatError",
    "VideoDataSet",
    "VideoDataSetLMDB",
    "VideoRecord",
    "get_augmentor",
    "normalize_clips",
    "num_classes_from_list",
    "read_list_file",
    "sample_frame_indices",
]
