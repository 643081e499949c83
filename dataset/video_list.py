"""List files, one video per line: `<video id> 1 <frames> <label>` (UCF101, HMDB51) or `<video id>;1;<frames>;<label>`
(Kinetics, whose video ids may contain spaces), as extract_videos.py writes them."""

from pathlib import Path
from typing import NamedTuple

try:
    from .errors import DataError, MissingDataError
except ImportError:  # imported as a script's sibling module from dataset/ (create_lmdb.py)
    from errors import DataError, MissingDataError

FORMS = {" ": "`<video id> 1 <frames> <label>`", ";": "`<video id>;1;<frames>;<label>`"}


class VideoRecord(NamedTuple):
    video_id: str
    num_frames: int
    label: int


class ListFileError(DataError):
    """A list file line that does not parse."""


class DuplicateVideoError(ListFileError):
    """A list file that lists one video id twice: its clips would count twice, under both labels."""


def _split(line: str, separator: str) -> list[str] | None:
    """The four fields of a line, numbers stripped; None if it does not have that form."""
    # From the right: HMDB51 and Kinetics video ids may contain spaces.
    parts = line.rsplit(None, 3) if separator == " " else [part.strip() for part in line.rsplit(";", 3)]
    if len(parts) != 4 or not parts[0] or not all(p.lstrip("-").isdigit() for p in parts[1:]):
        return None
    return parts


def read_list_file(path) -> list[VideoRecord]:
    """The videos of a list file, in file order.

    The first line's form (`;`-separated or not) is the file's. ListFileError names the file and
    line of a bad line; DuplicateVideoError names both lines of a video id listed twice.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"list file {path} not found (extract_videos.py writes it)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ListFileError(
            f"{path} is not a text list file ({err}); expected lines {FORMS[' ']} or {FORMS[';']} as "
            "extract_videos.py writes"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read list file {path}: {err.strerror}") from None
    records, lines, separator = [], [], None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if separator is None:
            separator = ";" if _split(line, ";") is not None else " "
        parts = _split(line, separator)
        if parts is None:
            raise ListFileError(
                f"{path}:{number}: expected {FORMS[separator]} (the form of the file's first line), got {line!r}"
            )
        num_frames, label = int(parts[2]), int(parts[3])
        if num_frames < 1 or label < 0:
            raise ListFileError(f"{path}:{number}: frame count must be >= 1 and label >= 0, got {line!r}")
        records.append(VideoRecord(parts[0], num_frames, label))
        lines.append(number)
    _refuse_duplicates(path, records, lines)
    return records


def _refuse_duplicates(path: Path, records: list[VideoRecord], lines: list[int]) -> None:
    first: dict[str, int] = {}
    repeats = []
    for index, record in enumerate(records):
        seen = first.setdefault(record.video_id, index)
        if seen != index:
            repeats.append((seen, index))
    if not repeats:
        return
    (a, b), *others = repeats
    labels = (f"label {records[a].label} both times" if records[a].label == records[b].label
              else f"labels {records[a].label} and {records[b].label}")
    fix = ("delete one of the two lines" if records[a].label == records[b].label
           else "keep the line with the right label and delete the other")
    more = f"; {len(others)} more repeated line(s), e.g. {records[others[0][1]].video_id!r}" if others else ""
    raise DuplicateVideoError(
        f"{path}: video {records[a].video_id!r} is listed twice, on lines {lines[a]} and {lines[b]} ({labels}){more}. "
        f"Each video must be listed once (its clips would count twice): {fix}"
    )


def num_classes_from_list(path) -> int:
    """Number of classes implied by a list file: its largest label + 1."""
    return max(record.label for record in read_list_file(path)) + 1
