"""What a dataset name means for the data: its class count, its frame cap and the files of each split.

The original's rules: Kinetics has 400 classes and uses at most the first 64 frames of a video; a
name containing `mini` reads `mini_train.txt` / `mini_train.lmdb` (and `mini_val.*`) instead of
`train.*` / `val.*`. A mini name has the facts of the dataset it is a subset of (`mini-kinetics`:
Kinetics' 400 classes and 64-frame cap).
"""

import os

SPLITS = ("train", "val")
MINI_PREFIX = "mini_"
# base name -> (classes, frames used per video: None = all)
KNOWN_DATASETS = {"ucf101": (101, None), "hmdb51": (51, None), "kinetics": (400, 64)}


def is_mini(dataset: str) -> bool:
    """Whether the dataset name asks for the `mini_` lists and databases (the original: `'mini' in name`)."""
    return "mini" in dataset.lower()


def base_dataset(dataset: str) -> str:
    """The full set a name refers to: `mini-kinetics`, `kinetics_mini` and `minikinetics` -> `kinetics`."""
    return dataset.lower().replace("mini", "").strip("-_")


def dataset_facts(dataset: str) -> dict:
    """`num_classes` (101 / 51 / 400, None for an unknown name), `max_frames` (64 for Kinetics, else None),
    `base` (the full set's name) and `mini` (whether the `mini_` files are read)."""
    base = base_dataset(dataset)
    classes, max_frames = KNOWN_DATASETS.get(base, (None, None))
    return {"base": base, "mini": is_mini(dataset), "num_classes": classes, "max_frames": max_frames}


def split_stem(dataset: str, split: str) -> str:
    """`train` / `val`, or `mini_train` / `mini_val` for a mini name: the list file's and database's name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return (MINI_PREFIX if is_mini(dataset) else "") + split


def split_files(root: str, dataset: str, split: str) -> tuple[str, str]:
    """(list file, LMDB database) of `split` under the frame folder `root`: `{root}/[mini_]{split}.txt`, `.lmdb`."""
    stem = split_stem(dataset, split)
    return os.path.join(root, f"{stem}.txt"), os.path.join(root, f"{stem}.lmdb")


def frame_root(data_location: str, dataset: str) -> str:
    """The frame folder of a dataset: `{data_location}/{dataset}_frame`, as for every dataset.

    A mini name whose own folder does not exist reads the full set's (`mini-kinetics` ->
    `kinetics_frame/`), where its `mini_` lists sit beside the full lists and share the frames.
    """
    own = os.path.join(data_location, f"{dataset}_frame")
    full = os.path.join(data_location, f"{base_dataset(dataset)}_frame")
    if is_mini(dataset) and not os.path.isdir(own) and os.path.isdir(full):
        return full
    return own
