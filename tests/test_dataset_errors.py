"""Bad data met while packing or during an epoch: duplicate video ids, damaged records, broken,
empty or missing frames. Each is one DataError naming the file, the video and what to do.

The frames are small generated JPEGs written straight into frame folders (no video decoding
needed here); create_lmdb.py packs them as a user runs it.
"""

import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from dataset import (
    ClipReadError,
    DataError,
    DuplicateVideoError,
    RecordFormatError,
    VideoDataSet,
    VideoDataSetLMDB,
    create_lmdb,
    get_augmentor,
)
from dataset.record_format import decode_frame_counts, decode_keys, decode_record, encode_record

REPO = Path(__file__).resolve().parents[1]
CREATE_LMDB = REPO / "dataset" / "create_lmdb.py"
VIDEOS = [("v_Alpha_g01_c01", 40, 0), ("v_Alpha_g01_c02", 40, 0), ("v_Beta_g01_c01", 40, 1),
          ("v_Beta_g01_c02", 40, 1), ("v_Gamma_g01_c01", 40, 2)]
# The 16 segment centres of a 40-frame video, 1-based: int(1.25 + 2.5 k) + 1, written out.
CENTRES_40 = [2, 4, 7, 9, 12, 14, 17, 19, 22, 24, 27, 29, 32, 34, 37, 39]


def jpeg(seed: int, size=(32, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def broken_jpeg(data: bytes) -> bytes:
    """The JPEG with a stray start-of-image marker in its compressed data: libjpeg stops ('broken data stream').

    (Random bytes there often decode, with a warning only: libjpeg is lenient.)
    """
    scan = data.index(b"\xff\xda")
    start = scan + 2 + int.from_bytes(data[scan + 2:scan + 4], "big") + 8  # 8 bytes into the compressed data
    return data[:start] + b"\xff\xd8" + data[start + 2:]


def write_frames(frame_dir: Path, videos=VIDEOS, split="train", lines=None) -> Path:
    """Frame folders `<id>/00001.jpg ..` and the list `{split}.txt` of `videos` (id, frames, label)."""
    for number, (video_id, frames, _) in enumerate(videos):
        folder = frame_dir / video_id
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(1, frames + 1):
            (folder / f"{index:05d}.jpg").write_bytes(jpeg(1000 * number + index))
    lines = lines or [f"{video_id} 1 {frames} {label}" for video_id, frames, label in videos]
    (frame_dir / f"{split}.txt").write_text("".join(line + "\n" for line in lines))
    return frame_dir


def pack(frame_dir: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CREATE_LMDB), "-d", str(frame_dir), *map(str, args)],
        cwd=cwd or frame_dir.parent, capture_output=True, text=True, timeout=300, check=False,
    )


def read_db(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        items = dict(txn.cursor())
    env.close()
    return items


def put_value(db: Path, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(db), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


@pytest.fixture
def packed(tmp_path) -> Path:
    """ucf101_frame/ with five videos' frames, train.txt and train.lmdb packed from them."""
    frame_dir = write_frames(tmp_path / "ucf101_frame")
    assert create_lmdb.main(["-d", str(frame_dir), "-s", "train"]) == 0  # in this process: no interpreter start
    return frame_dir


def first_error(loader) -> ClipReadError:
    """The ClipReadError that iterating `loader` raises."""
    batches = iter(loader)
    try:
        with pytest.raises(ClipReadError) as caught:
            for _ in batches:
                pass
    finally:
        # Stop the workers now: an iterator left to the garbage collector after an error waits 5 s
        # for each worker to join (torch 2.14), which would land in some later test.
        getattr(batches, "_shutdown_workers", lambda: None)()
    return caught.value


# --- B: a video listed twice ---------------------------------------------------------------------


DUPLICATES = {
    "same label": ("v_Beta_g01_c01 1 40 1", r"lines 3 and 6 \(label 1 both times\).*delete one of the two lines"),
    "other label": ("v_Beta_g01_c01 1 40 2", r"lines 3 and 6 \(labels 1 and 2\).*keep the line with the right label"),
}


@pytest.mark.parametrize("kind", DUPLICATES)
def test_create_lmdb_refuses_a_video_listed_twice_naming_both_lines_and_writes_nothing(tmp_path, kind):
    extra, expected = DUPLICATES[kind]
    lines = [f"{v} 1 {n} {label}" for v, n, label in VIDEOS] + [extra]
    frame_dir = write_frames(tmp_path / "ucf101_frame", lines=lines)
    result = pack(frame_dir, "-s", "train")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(frame_dir / "train.txt") in result.stderr and "'v_Beta_g01_c01' is listed twice" in result.stderr
    assert re.search(expected, result.stderr)
    assert not (frame_dir / "train.lmdb").exists()


@pytest.mark.parametrize("kind", DUPLICATES)
@pytest.mark.parametrize("reader", ["folders", "lmdb"])
def test_datasets_refuse_a_video_listed_twice_naming_both_lines(packed, tmp_path, kind, reader):
    extra, expected = DUPLICATES[kind]
    listing = tmp_path / "twice.txt"
    listing.write_text((packed / "train.txt").read_text() + extra + "\n")
    with pytest.raises(DuplicateVideoError, match=expected) as caught:
        if reader == "folders":
            VideoDataSet(packed, listing)
        else:
            VideoDataSetLMDB(packed / "train.lmdb", listing)
    assert isinstance(caught.value, DataError)
    assert str(listing) in str(caught.value) and "'v_Beta_g01_c01'" in str(caught.value)


# --- C: a clip that cannot be read during an epoch -----------------------------------------------


def test_missing_middle_frame_through_two_workers_is_one_line_naming_the_file_and_the_fix(packed):
    missing = packed / "v_Beta_g01_c01" / f"{CENTRES_40[7]:05d}.jpg"  # a segment centre, not the last frame
    missing.unlink()
    dataset = VideoDataSet(packed, packed / "train.txt", transform=get_augmentor(False, 16, (20, 20)))
    index = [r.video_id for r in dataset.records].index("v_Beta_g01_c01")
    with pytest.raises(ClipReadError) as direct:
        dataset[index]
    message = str(direct.value)
    assert message.startswith(f"{missing}: frame {CENTRES_40[7]} of video 'v_Beta_g01_c01' not found")
    assert f"delete {packed / 'v_Beta_g01_c01'} and re-run extract_videos.py" in message

    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2)
    error = first_error(loader)  # re-created in this process from the worker's
    assert type(error) is ClipReadError and str(error) == message and "\n" not in str(error)
    assert "Traceback" in error.worker_traceback  # the worker's traceback is kept for a developer


def damage_truncated(value: bytes) -> bytes:
    return value[:len(value) // 2]


def damage_header(value: bytes) -> bytes:
    return bytes(64) + value[64:]  # the Arrow stream marker gone too: looks like no Arrow stream at all


@pytest.mark.parametrize("damage", [damage_truncated, damage_header])
def test_damaged_record_is_named_with_the_command_that_repacks_it_not_blamed_on_the_old_format(packed, damage):
    db = packed / "train.lmdb"
    put_value(db, b"v_Beta_g01_c02", damage(read_db(db)[b"v_Beta_g01_c02"]))
    dataset = VideoDataSetLMDB(db, packed / "train.txt", transform=get_augmentor(False, 16, (20, 20)))
    index = [r.video_id for r in dataset.records].index("v_Beta_g01_c02")
    with pytest.raises(ClipReadError) as caught:
        dataset[index]
    message = str(caught.value)
    assert "\n" not in message and "pyarrow.serialize" not in message
    assert message.startswith(f"LMDB database {db}: the record of video 'v_Beta_g01_c02' is damaged")
    command = f"python create_lmdb.py -d {packed} -s train -vr 3 4"  # its position in train.txt, 0-based
    assert message.endswith(command)

    # The command it gives repairs the record.
    result = pack(packed, *shlex.split(command)[4:])
    assert result.returncode == 0, result.stderr
    clip, label = VideoDataSetLMDB(db, packed / "train.txt", transform=get_augmentor(False, 16, (20, 20)))[index]
    assert label == 1 and clip.shape == (3, 16, 16, 16)


def test_damaged_record_through_two_workers_keeps_its_class_and_message(packed):
    db = packed / "train.lmdb"
    put_value(db, b"v_Alpha_g01_c02", damage_truncated(read_db(db)[b"v_Alpha_g01_c02"]))
    dataset = VideoDataSetLMDB(db, packed / "train.txt", transform=get_augmentor(False, 16, (20, 20), uint8=True))
    error = first_error(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2))
    assert type(error) is ClipReadError
    assert str(error).startswith(f"LMDB database {db}: the record of video 'v_Alpha_g01_c02' is damaged")
    assert "\n" not in str(error)


def test_old_format_is_still_told_at_open(packed, tmp_path):
    db = tmp_path / "train.lmdb"
    env = lmdb.open(str(db), subdir=False, map_size=1 << 22)
    with env.begin(write=True) as txn:  # the original tool's values: int32 counts first, no Arrow stream marker
        txn.put(b"__keys__", b"\x01\x00\x00\x00\x00\x00\x00\x00legacy")
        txn.put(b"v_Alpha_g01_c01", b"\x01\x00\x00\x00\x00\x00\x00\x00legacy")
    env.close()
    with pytest.raises(RecordFormatError, match="pyarrow.serialize"):
        VideoDataSetLMDB(db, packed / "train.txt")


def test_damaged_record_read_at_open_of_a_database_without_frame_counts_is_not_blamed_on_the_format(packed):
    db = packed / "train.lmdb"
    env = lmdb.open(str(db), subdir=False)
    with env.begin(write=True) as txn:  # written before __frames__ existed: open reads each record's header
        txn.delete(b"__frames__")
        txn.put(b"v_Gamma_g01_c01", damage_truncated(txn.get(b"v_Gamma_g01_c01")))
    env.close()
    with pytest.raises(DataError, match=r"record of video 'v_Gamma_g01_c01' is damaged.*-vr 4 5") as caught:
        VideoDataSetLMDB(db, packed / "train.txt")
    assert not isinstance(caught.value, RecordFormatError) and "pyarrow.serialize" not in str(caught.value)


def corrupt(path: Path) -> None:
    path.write_bytes(broken_jpeg(path.read_bytes()))


def empty(path: Path) -> None:
    path.write_bytes(b"")


FRAME_DAMAGE = {"corrupt": (corrupt, "cannot be decoded (broken data stream"), "empty": (empty, "is empty (0 bytes)")}


@pytest.mark.parametrize("kind", FRAME_DAMAGE)
def test_bad_frame_file_names_the_file_the_video_and_the_fix(packed, kind):
    damage, problem = FRAME_DAMAGE[kind]
    frame = packed / "v_Alpha_g01_c02" / f"{CENTRES_40[3]:05d}.jpg"
    damage(frame)
    dataset = VideoDataSet(packed, packed / "train.txt", transform=get_augmentor(True, 16, (20, 24)))
    with pytest.raises(ClipReadError) as caught:
        dataset[1]
    message = str(caught.value)
    assert message.startswith(f"{frame}: frame {CENTRES_40[3]} of video 'v_Alpha_g01_c02' {problem}")
    assert f"delete {packed / 'v_Alpha_g01_c02'} and re-run extract_videos.py" in message
    assert "\n" not in message and "BytesIO" not in message


@pytest.mark.parametrize("kind", FRAME_DAMAGE)
def test_bad_frame_inside_a_record_names_the_database_the_frame_and_the_fix(packed, kind):
    damage, problem = FRAME_DAMAGE[kind]
    frames = [(packed / "v_Gamma_g01_c01" / f"{i:05d}.jpg").read_bytes() for i in range(1, 41)]
    bad = packed / "bad.jpg"
    bad.write_bytes(frames[CENTRES_40[5] - 1])
    damage(bad)
    frames[CENTRES_40[5] - 1] = bad.read_bytes()  # packed by an older create_lmdb.py, which did not check frames
    db = packed / "train.lmdb"
    put_value(db, b"v_Gamma_g01_c01", encode_record("v_Gamma_g01_c01", 2, frames))
    dataset = VideoDataSetLMDB(db, packed / "train.txt")  # no transform: the full-size decode fails alike
    with pytest.raises(ClipReadError) as caught:
        dataset[4]
    message = str(caught.value)
    assert message.startswith(f"LMDB database {db}: frame {CENTRES_40[5]} of video 'v_Gamma_g01_c01' {problem}")
    assert f"python create_lmdb.py -d {packed} -s train -vr 4 5" in message


def test_a_program_error_in_the_transform_is_not_blamed_on_the_data(packed):
    def transform(frames):
        raise TypeError("a bug in a transform")

    with pytest.raises(TypeError, match="a bug in a transform"):
        VideoDataSet(packed, packed / "train.txt", transform=transform)[0]


# --- C: create_lmdb.py checks every frame it packs -----------------------------------------------


@pytest.mark.parametrize("kind", FRAME_DAMAGE)
def test_create_lmdb_refuses_a_bad_frame_naming_it_and_creates_no_database(tmp_path, kind):
    damage, problem = FRAME_DAMAGE[kind]
    frame_dir = write_frames(tmp_path / "ucf101_frame")
    damage(frame_dir / "v_Beta_g01_c02" / "00040.jpg")  # any frame: the packer reads all of them
    result = pack(frame_dir, "-s", "train")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"frame file {frame_dir / 'v_Beta_g01_c02' / '00040.jpg'} of video 'v_Beta_g01_c02' {problem}" \
        in result.stderr
    assert "re-run with -vr 0 5" in result.stderr
    assert not (frame_dir / "train.lmdb").exists()  # nothing committed: no empty database to trip on


def test_create_lmdb_stopped_by_a_bad_frame_keeps_earlier_batches_consistent_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(create_lmdb, "BATCH_VIDEOS", 2)
    frame_dir = write_frames(tmp_path / "ucf101_frame")
    bad = frame_dir / "v_Beta_g01_c02" / "00007.jpg"  # list line 3: the second batch (lines 2..3)
    good = bad.read_bytes()
    bad.write_bytes(broken_jpeg(good))
    monkeypatch.chdir(tmp_path)
    assert create_lmdb.main(["-d", "ucf101_frame", "-s", "train"]) == 1

    items = read_db(frame_dir / "train.lmdb")  # the first batch, with an index that describes it
    assert sorted(k for k in items if not k.startswith(b"__")) == [b"v_Alpha_g01_c01", b"v_Alpha_g01_c02"]
    assert decode_keys(items[b"__keys__"]) == ["v_Alpha_g01_c01", "v_Alpha_g01_c02"] and items[b"__len__"] == b"2"
    (tmp_path / "packed.txt").write_text("".join(f"{v} 1 {n} {label}\n" for v, n, label in VIDEOS[:2]))
    assert len(VideoDataSetLMDB(frame_dir / "train.lmdb", tmp_path / "packed.txt")) == 2  # and reads as a database
    bad.write_bytes(good)  # re-extracted
    assert create_lmdb.main(["-d", "ucf101_frame", "-s", "train", "-vr", "2", "5"]) == 0
    items = read_db(frame_dir / "train.lmdb")
    assert decode_frame_counts(items[b"__frames__"]) == {video_id: frames for video_id, frames, _ in VIDEOS}
    assert decode_record(items[b"v_Beta_g01_c02"]).frame(6) == good


def test_worker_error_message_recovery_leaves_ordinary_messages_alone():
    assert str(ClipReadError("Caught nothing: an ordinary message")) == "Caught nothing: an ordinary message"
    assert not hasattr(ClipReadError("x"), "worker_traceback")
