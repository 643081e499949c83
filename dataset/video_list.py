"""List files (`<video id> 1 <frames> <label>` per line), as written by extract_videos.py."""

from pathlib import Path
from typing import NamedTuple

try:
    from .errors import DataError, MissingDataError
except ImportError:  # imported as a script's sibling module from dataset/ (create_lmdb.py)
    from errors import DataError, MissingDataError


class VideoRecord(NamedTuple):
    video_id: str
    num_frames: int
    label: int


class ListFileError(DataError):
    """A list file line that does not parse."""


def read_list_file(path) -> list[VideoRecord]:
    """The videos of a list file, in file order; ListFileError names the file and line of a bad line."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"list file {path} not found (extract_videos.py writes it)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ListFileError(
            f"{path} is not a text list file ({err}); expected lines `<video id> 1 <frames> <label>` as "
            "extract_videos.py writes"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read list file {path}: {err.strerror}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        # Split from the right: HMDB51 video ids may contain spaces.
        parts = line.strip().rsplit(None, 3)
        if len(parts) != 4 or not all(p.lstrip("-").isdigit() for p in parts[1:]):
            raise ListFileError(f"{path}:{number}: expected `<video id> 1 <frames> <label>`, got {line!r}")
        num_frames, label = int(parts[2]), int(parts[3])
        if num_frames < 1 or label < 0:
            raise ListFileError(f"{path}:{number}: frame count must be >= 1 and label >= 0, got {line!r}")
        records.append(VideoRecord(parts[0], num_frames, label))
    return records


def num_classes_from_list(path) -> int:
    """Number of classes implied by a list file: its largest label + 1."""
    return max(record.label for record in read_list_file(path)) + 1
