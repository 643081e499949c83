"""The datasets the original reads besides UCF101 and HMDB51: Kinetics (`;`-separated lists, at most
64 frames per video, 400 classes) and the `mini_` lists and databases of a name containing `mini`."""

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import (
    DatabaseMismatchError,
    ListFileError,
    MissingDataError,
    VideoDataSet,
    VideoDataSetLMDB,
    create_lmdb,
    dataset_facts,
    frame_root,
    read_list_file,
    split_files,
)
from dataset.make_synthetic import write_video
from dataset.record_format import decode_frame_counts, decode_record

REPO = Path(__file__).resolve().parents[1]
EXTRACT = REPO / "dataset" / "extract_videos.py"
CREATE_LMDB = REPO / "dataset" / "create_lmdb.py"
# Kinetics ids are `<class>/<youtube id>_<start>_<end>`; class names hold spaces.
KINETICS = [("abseiling/aa_000010_000020", 100, 0), ("playing guitar/-bb_000001_000011", 70, 1),
            ("playing guitar/cc c_000003_000013", 40, 1)]


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_kinetics(frame_dir: Path, stored=None, split="train") -> Path:
    """`kinetics_frame/<class>/<video>/00001.jpg ..` and a `;` list; `stored` caps the frames written."""
    for number, (video_id, frames, _) in enumerate(KINETICS):
        folder = frame_dir / video_id
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(1, min(frames, stored or frames) + 1):
            (folder / f"{index:05d}.jpg").write_bytes(jpeg(1000 * number + index))
    (frame_dir / f"{split}.txt").write_text("".join(f"{v};1;{n};{label}\n" for v, n, label in KINETICS))
    return frame_dir


def frames_of(folder: Path, numbers: list[int]) -> torch.Tensor:
    """Frames `numbers` (1-based file names) as a 3 x T x H x W tensor in [0, 1], decoded here."""
    pixels = np.stack([np.asarray(Image.open(folder / f"{n:05d}.jpg").convert("RGB")) for n in numbers])
    return torch.from_numpy(pixels).permute(3, 0, 1, 2).float() / 255


# The 16 segment centres of the first 64 frames, 1-based: tick 4, centre int(2 + 4 k) + 1, written out.
CENTRES_64 = [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63]
# ... and of all 100 frames of the first video: tick 6.25, int(3.125 + 6.25 k) + 1.
CENTRES_100 = [4, 10, 16, 22, 29, 35, 41, 47, 54, 60, 66, 72, 79, 85, 91, 97]


# --- what a dataset name means --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "classes", "max_frames", "mini"), [
    ("ucf101", 101, None, False), ("hmdb51", 51, None, False), ("kinetics", 400, 64, False),
    ("mini-kinetics", 400, 64, True), ("kinetics-mini", 400, 64, True), ("ucf101-mini", 101, None, True),
    ("mini_hmdb51", 51, None, True), ("something", None, None, False),
])
def test_dataset_facts(name, classes, max_frames, mini):
    facts = dataset_facts(name)
    assert (facts["num_classes"], facts["max_frames"], facts["mini"]) == (classes, max_frames, mini)


@pytest.mark.parametrize(("name", "split", "stem"), [
    ("ucf101", "train", "train"), ("kinetics", "val", "val"), ("mini-kinetics", "train", "mini_train"),
    ("ucf101-mini", "val", "mini_val"),
])
def test_split_files_carry_the_mini_prefix_when_the_name_contains_mini(name, split, stem):
    root = os.path.join("data", f"{name}_frame")
    assert split_files(root, name, split) == (os.path.join(root, f"{stem}.txt"), os.path.join(root, f"{stem}.lmdb"))


def test_split_files_refuse_other_splits():
    with pytest.raises(ValueError, match="test"):
        split_files("kinetics_frame", "kinetics", "test")


def test_frame_root_of_a_mini_name_is_its_own_folder_else_the_full_sets(tmp_path):
    assert frame_root(str(tmp_path), "ucf101") == str(tmp_path / "ucf101_frame")
    (tmp_path / "kinetics_frame").mkdir()
    assert frame_root(str(tmp_path), "mini-kinetics") == str(tmp_path / "kinetics_frame")  # shares its frames
    (tmp_path / "mini-kinetics_frame").mkdir()
    assert frame_root(str(tmp_path), "mini-kinetics") == str(tmp_path / "mini-kinetics_frame")


# --- `;` lists ------------------------------------------------------------------------------------


def test_semicolon_list_keeps_spaces_in_video_ids(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("playing guitar/x y_000001_000011;1;250;1\r\n\nabseiling/aa_000010_000020 ; 1 ; 300 ; 0\n")
    assert [tuple(r) for r in read_list_file(listing)] == [
        ("playing guitar/x y_000001_000011", 250, 1), ("abseiling/aa_000010_000020", 300, 0),
    ]


def test_space_separated_list_still_reads_ids_with_spaces(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("Brush hair_u_cm_np1 1 40 3\nv_A_g01_c01 1 12 0\n")
    assert [tuple(r) for r in read_list_file(listing)] == [("Brush hair_u_cm_np1", 40, 3), ("v_A_g01_c01", 12, 0)]


def test_a_line_of_the_other_form_names_the_file_the_line_and_the_form(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("abseiling/aa;1;250;0\nabseiling/bb 1 250 0\n")
    with pytest.raises(ListFileError, match=r"train.txt:2: expected `<video id>;1;<frames>;<label>`"):
        read_list_file(listing)


# --- at most 64 frames ----------------------------------------------------------------------------


def test_clips_of_a_capped_dataset_sample_the_segment_centres_of_the_first_64_frames(tmp_path):
    frame_dir = write_kinetics(tmp_path / "kinetics_frame")
    capped = VideoDataSet(frame_dir, frame_dir / "train.txt", max_frames=64)
    clip, label = capped[0]
    assert label == 0 and torch.allclose(clip, frames_of(frame_dir / KINETICS[0][0], CENTRES_64))
    whole = VideoDataSet(frame_dir, frame_dir / "train.txt")  # no cap: the whole video, as UCF101
    assert torch.allclose(whole[0][0], frames_of(frame_dir / KINETICS[0][0], CENTRES_100))
    short, _ = capped[2]  # 40 frames: under the cap, all of them
    centres_40 = [2, 4, 7, 9, 12, 14, 17, 19, 22, 24, 27, 29, 32, 34, 37, 39]
    assert torch.allclose(short, frames_of(frame_dir / KINETICS[2][0], centres_40))


def test_frame_folders_holding_only_the_first_64_frames_serve_a_capped_dataset(tmp_path):
    # The original's Kinetics folders hold at most 64 frames while its lists give the video's count.
    frame_dir = write_kinetics(tmp_path / "kinetics_frame", stored=64)
    assert len(VideoDataSet(frame_dir, frame_dir / "train.txt", max_frames=64)) == 3
    with pytest.raises(MissingDataError, match=r"00100.jpg"):
        VideoDataSet(frame_dir, frame_dir / "train.txt")


def test_create_lmdb_packs_the_first_64_frames_of_a_kinetics_folder_and_the_datasets_agree(tmp_path):
    frame_dir = write_kinetics(tmp_path / "kinetics_frame")
    result = subprocess.run([sys.executable, str(CREATE_LMDB), "-d", "kinetics_frame", "-s", "train"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "first 64 frames" in result.stdout

    db = frame_dir / "train.lmdb"
    env_items = _read(db)
    assert decode_frame_counts(env_items[b"__frames__"]) == {v: min(n, 64) for v, n, _ in KINETICS}
    record = decode_record(env_items[KINETICS[0][0].encode()])
    assert record.num_frames == 64 and record.frame(63) == (frame_dir / KINETICS[0][0] / "00064.jpg").read_bytes()

    from_db = VideoDataSetLMDB(db, frame_dir / "train.txt", max_frames=64)
    from_folders = VideoDataSet(frame_dir, frame_dir / "train.txt", max_frames=64)
    for index in range(3):
        assert torch.equal(from_db[index][0], from_folders[index][0])
    expected = r"aa_000010_000020 \(list 100, database 64\).*--max-frames 64.*read it with max_frames=64"
    with pytest.raises(DatabaseMismatchError, match=expected):
        VideoDataSetLMDB(db, frame_dir / "train.txt")  # without the cap the records are too short


def test_create_lmdb_max_frames_option_overrides_the_folder_rule(tmp_path, monkeypatch):
    frame_dir = write_kinetics(tmp_path / "kinetics_frame")
    monkeypatch.chdir(tmp_path)
    assert create_lmdb.main(["-d", "kinetics_frame", "-s", "train", "--max-frames", "0"]) == 0
    counts = decode_frame_counts(_read(frame_dir / "train.lmdb")[b"__frames__"])
    assert counts == {v: n for v, n, _ in KINETICS}


# --- mini_ files ----------------------------------------------------------------------------------


def test_create_lmdb_packs_a_mini_list_into_its_mini_database(tmp_path, monkeypatch):
    frame_dir = write_kinetics(tmp_path / "kinetics_frame")
    (frame_dir / "train.txt").rename(frame_dir / "mini_train.txt")
    monkeypatch.chdir(tmp_path)
    assert create_lmdb.main(["-d", "kinetics_frame", "-s", "mini_train"]) == 0
    assert (frame_dir / "mini_train.lmdb").is_file() and not (frame_dir / "train.lmdb").exists()
    list_file, lmdb_path = split_files(frame_root(str(tmp_path), "mini-kinetics"), "mini-kinetics", "train")
    data = VideoDataSetLMDB(lmdb_path, list_file, max_frames=dataset_facts("mini-kinetics")["max_frames"])
    assert [r.video_id for r in data.records] == [v for v, *_ in KINETICS]


# --- extract_videos.py -d kinetics ----------------------------------------------------------------


def test_extract_videos_writes_kinetics_class_folders_the_first_64_frames_and_a_semicolon_list(tmp_path):
    rng = np.random.default_rng(0)
    sources = {("train", "abseiling", "aa_000010_000020"): 80, ("train", "playing guitar", "bb_000001_000011"): 30,
               ("val", "playing guitar", "cc_000003_000013"): 70}
    for (subset, name, stem), frames in sources.items():
        folder = tmp_path / "kinetics" / subset / name
        folder.mkdir(parents=True, exist_ok=True)
        write_video(folder / f"{stem}.avi", rng.integers(0, 256, (frames, 24, 32, 3), dtype=np.uint8))
    result = subprocess.run([sys.executable, str(EXTRACT), "-d", "kinetics", "-j", "1", "--short-side", "0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    frame_dir = tmp_path / "kinetics_frame"
    assert (frame_dir / "train.txt").read_text() == (
        "abseiling/aa_000010_000020;1;64;0\nplaying guitar/bb_000001_000011;1;30;1\n")
    assert (frame_dir / "val.txt").read_text() == "playing guitar/cc_000003_000013;1;64;1\n"
    assert sorted(os.listdir(frame_dir / "abseiling" / "aa_000010_000020")) == [f"{i:05d}.jpg" for i in range(1, 65)]
    assert not (frame_dir / "failed.txt").exists()

    again = subprocess.run([sys.executable, str(EXTRACT), "-d", "kinetics", "-j", "1", "--short-side", "0"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and "3 already complete" in again.stdout  # 64 of 80 frames is complete


def _read(db: Path) -> dict[bytes, bytes]:
    import lmdb

    env = lmdb.open(str(db), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        items = dict(txn.cursor())
    env.close()
    return items
