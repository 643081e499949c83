"""The LMDB record format: one Arrow IPC stream per video, and the `__keys__` / `__len__` entries.

A record is a one-row Arrow table (video_id, label, num_frames, frames: list<binary> of JPEG
bytes). Arrow IPC is read by any current pyarrow without pickle, unlike the original tool's
`pyarrow.serialize`, which pyarrow removed.
"""

import pyarrow as pa

try:
    from .errors import DataError
except ImportError:  # imported as a script's sibling module from dataset/ (create_lmdb.py)
    from errors import DataError

FORMAT_TAG = b"rt3d-clip-record/1"
KEYS_KEY = b"__keys__"
LEN_KEY = b"__len__"
FRAMES_KEY = b"__frames__"  # video id -> frame count, so a list can be checked without reading records
INDEX_KEYS = (KEYS_KEY, LEN_KEY, FRAMES_KEY)

# Every Arrow IPC stream message since Arrow 0.15 starts with this continuation marker; records
# from the original tool (pyarrow.serialize, Arrow <= 0.17) start with their tensor/buffer counts.
_IPC_STREAM_MAGIC = b"\xff\xff\xff\xff"

_RECORD_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("label", pa.int32()),
        ("num_frames", pa.int32()),
        ("frames", pa.list_(pa.binary())),
    ],
    metadata={b"format": FORMAT_TAG},
)
_KEYS_SCHEMA = pa.schema([("key", pa.string())], metadata={b"format": FORMAT_TAG})
_FRAMES_SCHEMA = pa.schema([("key", pa.string()), ("num_frames", pa.int32())], metadata={b"format": FORMAT_TAG})


class RecordFormatError(DataError):
    """An LMDB value that is not in this tool's format (e.g. written by the original create_lmdb.py)."""


def _to_ipc(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _from_ipc(buf, what: str, expected: pa.Schema) -> pa.RecordBatch:
    view = memoryview(buf)
    if bytes(view[:4]) != _IPC_STREAM_MAGIC:
        raise RecordFormatError(f"{what} is not an Arrow IPC stream")
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(view))
        batch = reader.read_next_batch()
        # Full validation checks every offset against its buffer: a damaged record fails here, not
        # by reading past a buffer later. A few microseconds per record.
        batch.validate(full=True)
    except (pa.ArrowException, StopIteration, OSError) as err:
        raise RecordFormatError(f"{what} is not a readable Arrow IPC stream ({err})") from None
    metadata = batch.schema.metadata or {}
    if metadata.get(b"format") != FORMAT_TAG or not batch.schema.equals(expected, check_metadata=False):
        raise RecordFormatError(f"{what} is an Arrow stream but not a {FORMAT_TAG.decode()} record")
    return batch


def encode_record(video_id: str, label: int, frames: list[bytes]) -> bytes:
    """Serialise one video (its JPEG frames in order and its label) to Arrow IPC bytes."""
    batch = pa.record_batch(
        [
            pa.array([video_id], pa.string()),
            pa.array([label], pa.int32()),
            pa.array([len(frames)], pa.int32()),
            pa.array([frames], pa.list_(pa.binary())),
        ],
        schema=_RECORD_SCHEMA,
    )
    return _to_ipc(batch)


class ClipRecord:
    """A decoded record; `frame(i)` gives the JPEG bytes of frame i (0-based)."""

    def __init__(self, batch: pa.RecordBatch):
        self.video_id = batch.column(0)[0].as_py()
        self.label = batch.column(1)[0].as_py()
        self.num_frames = batch.column(2)[0].as_py()
        self._frames = batch.column(3).flatten()  # flat binary array: no per-frame Python objects yet

    def frame(self, index: int) -> bytes:
        return self._frames[index].as_py()


def decode_record(buf, key: str = "?") -> ClipRecord:
    """Parse a record written by encode_record; RecordFormatError for anything else."""
    record = ClipRecord(_from_ipc(buf, f"LMDB record {key!r}", _RECORD_SCHEMA))
    if record.num_frames is None or len(record._frames) != record.num_frames:
        raise RecordFormatError(
            f"LMDB record {key!r} says {record.num_frames} frames but holds {len(record._frames)}"
        )
    return record


def encode_keys(keys: list[str]) -> bytes:
    """Serialise the sorted list of video ids stored under `__keys__`."""
    return _to_ipc(pa.record_batch([pa.array(sorted(keys), pa.string())], schema=_KEYS_SCHEMA))


def decode_keys(buf) -> list[str]:
    """Parse the `__keys__` entry; RecordFormatError if it is not in this tool's format."""
    return _from_ipc(buf, "LMDB entry '__keys__'", _KEYS_SCHEMA).column(0).to_pylist()


def encode_frame_counts(counts: dict[str, int]) -> bytes:
    """Serialise `{video id: frame count}`, stored under `__frames__`."""
    keys = sorted(counts)
    arrays = [pa.array(keys, pa.string()), pa.array([counts[k] for k in keys], pa.int32())]
    return _to_ipc(pa.record_batch(arrays, schema=_FRAMES_SCHEMA))


def decode_frame_counts(buf) -> dict[str, int]:
    """Parse the `__frames__` entry; RecordFormatError if it is not in this tool's format."""
    batch = _from_ipc(buf, "LMDB entry '__frames__'", _FRAMES_SCHEMA)
    return dict(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))


def old_database_message(db_path) -> str:
    """What to tell a user whose database this tool cannot read."""
    return (
        f"{db_path} was not written by this version of create_lmdb.py (the original tool stored "
        "records with pyarrow.serialize, which current pyarrow cannot read). Delete it and "
        "re-create it from the frame folders: python create_lmdb.py -d <dataset>_frame -s "
        "<train|val> -vr 0 <number of videos>"
    )
