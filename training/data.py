"""Clip datasets and loaders for training and validation, checked before a run touches the disk."""
import dataclasses
import os

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from .runtime import Env, UserError, log


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the clips are and how they are cut and batched, read off the command line once."""
    root: str                      # {data_location}/{dataset}_frame (dataset.frame_root)
    dataset: str
    num_frames: int
    crop: int
    scale: tuple
    temporal_jitter: bool
    batch_size: int
    test_batch_size: int
    workers: int
    seed: int
    num_classes: int | None        # None: the dataset's (101 / 51 / 400), else from the list files


@dataclasses.dataclass
class Data:
    train: DataLoader | None
    val: DataLoader
    classes: int
    notes: list                    # what the run's log says once it is open

    def set_epoch(self, seed):
        self.train.sampler.set_epoch(seed)


class SeededClips(torch.utils.data.Dataset):
    """Draws each clip's randomness (frames, scale, crop, flip) from (epoch seed, index) alone:
    the same clips with any number of workers, workers kept across epochs, or after a resume."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((seed * 1_000_003 + index) % 2**63)
            return self.dataset[index]


class SeededSampler(Sampler):
    """`(index, epoch seed)` pairs in the order of `sampler`, reshuffled by `set_epoch(seed)`."""

    def __init__(self, sampler):
        self.sampler, self.seed = sampler, 0

    def set_epoch(self, seed):
        self.seed = seed
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(seed)
        else:
            self.sampler.generator.manual_seed(seed)

    def __iter__(self):
        return ((index, self.seed) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


def clip_dataset(root: str, name: str, split: str, is_train: bool, num_frames: int, crop: int, scale: tuple,
                 temporal_jitter: bool):
    """`{root}/{split}.lmdb` with `{split}.txt` (`mini_` before both for a mini dataset name), else the
    frame folders under `root`. Clips come as uint8 (a quarter of the bytes between processes);
    `to_device` normalises them."""
    from dataset import VideoDataSet, VideoDataSetLMDB, dataset_facts, get_augmentor, split_files
    list_file, lmdb_path = split_files(root, name, split)
    if not os.path.isfile(list_file):
        raise UserError(f"list file {list_file} not found. Prepare the data first (dataset/README.md): "
                        f"dataset/extract_videos.py writes it, dataset/create_lmdb.py the "
                        f"{os.path.basename(lmdb_path)} beside it; "
                        f"or point --data_location at the folder holding {os.path.basename(root)}/")
    transform = get_augmentor(is_train, crop, scale if is_train else (scale[0], scale[0]), uint8=True)
    kw = dict(num_groups=num_frames, transform=transform, is_train=is_train,
              temporal_jitter=is_train and temporal_jitter, max_frames=dataset_facts(name)['max_frames'])
    if os.path.exists(lmdb_path):
        return VideoDataSetLMDB(lmdb_path, list_file, **kw)
    log.info(f"{lmdb_path} not found: reading frame folders under {root}")
    return VideoDataSet(root, list_file, **kw)


def known_classes(name: str) -> int | None:
    """101 / 51 / 400 for UCF101 / HMDB51 / Kinetics (and their mini names), None for another name."""
    from dataset import dataset_facts
    return dataset_facts(name)['num_classes']


def usable_workers(requested: int, local_world: int) -> int:
    """At most the CPU cores this process may use: more loader processes than cores only add memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return min(requested, max(1, cores // max(1, local_world)))


def make_data(spec: DataSpec, env: Env, need_train: bool = True) -> Data:
    """Datasets and loaders, checked against the model's class count; UserError for any problem."""
    splits = ('val', 'train') if need_train else ('val',)
    try:
        sets = {s: clip_dataset(spec.root, spec.dataset, s, s == 'train', spec.num_frames, spec.crop, spec.scale,
                                spec.temporal_jitter) for s in splits}
    except (OSError, LookupError, ValueError) as exc:      # dataset.DataError is a ValueError
        raise UserError(str(exc.args[0]) if exc.args else str(exc)) from None
    classes = spec.num_classes or known_classes(spec.dataset) or max(s.num_classes for s in sets.values())
    for data in sets.values():
        if data.num_classes > classes:
            raise UserError(f"{data.list_file} has labels up to {data.num_classes - 1}, but the model has {classes} "
                            f"classes: pass --num-classes {data.num_classes} (or correct the list file)")
    workers = usable_workers(spec.workers, env.local_world)
    notes = [f"--workers {spec.workers}: using {workers}, the CPU cores this process has"] \
        if workers < spec.workers else []
    # Workers live across epochs (each epoch's randomness comes with the indices, SeededClips).
    common = dict(num_workers=workers, pin_memory=env.device.type == 'cuda', persistent_workers=workers > 0)
    val_set = sets['val']
    if env.world > 1:   # each rank a disjoint share, no padding: the summed counts are exact
        val_set = Subset(val_set, range(env.rank, len(val_set), env.world))
    val = DataLoader(val_set, batch_size=spec.test_batch_size, shuffle=False, **common)
    if not need_train:
        return Data(None, val, classes, notes)
    train_set = sets['train']
    if len(train_set) == 0:
        raise UserError(f"{train_set.list_file} lists no training clip that can be used: check the list file")
    order = DistributedSampler(train_set, num_replicas=env.world, rank=env.rank, shuffle=True, seed=spec.seed) \
        if env.world > 1 else RandomSampler(train_set, generator=torch.Generator())
    # The last, partial batch is kept, as in the original.
    train = DataLoader(SeededClips(train_set), batch_size=spec.batch_size, sampler=SeededSampler(order), **common)
    return Data(train, val, classes, notes)


def to_device(clips: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch of clips on `device`: uint8 ones (our loaders') normalised there to float32, float
    ones taken as they are."""
    from dataset import normalize_clips
    clips = clips.to(device, non_blocking=True)
    if clips.dtype == torch.uint8:
        clips = normalize_clips(clips)
    return clips.contiguous(memory_format=torch.channels_last_3d) if channels_last else clips
