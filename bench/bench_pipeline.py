"""Does the training loop keep the device busy? The real loop against the step-only ceiling.

    python bench/bench_pipeline.py [--arch c3d] [--crop-size 16] [--batch-size 8] [--workers 2]
        [--epochs 3] [--amp] [--channels-last] [--data DIR] [--device cpu|cuda]

In one run, on the same model, batch and precision:
  (a) the ceiling: the training step alone, on random clips already on the device;
  (b) the loop: `training.engine.train_one_epoch` over an LMDB of synthetic videos at the clip size
      (our loader: uint8 clips normalised on the device, workers kept across epochs), giving
      steady-state clips/s (each epoch after its first 2 batches) and seconds per epoch;
  (c) loop / ceiling;
and the same for the original's way of loading (float clips normalised in the workers, new
workers every epoch, float32) as the baseline row. With --amp, our loop also runs in float32 so
both precisions stand side by side. Prints a markdown table; medians over epochs 2..E.
The synthetic set is written to --data (default: a temporary folder) unless it is already there.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from dataset import VideoDataSetLMDB, get_augmentor  # noqa: E402
from models import build_model  # noqa: E402
from training.data import DataSpec, make_data  # noqa: E402
from training.engine import Recipe, Updater, train_one_epoch  # noqa: E402
from training.optim import amp_dtype, guard_bf16, make_optimizer  # noqa: E402
from training.runtime import Env  # noqa: E402


class Timed:
    """Iterates `loader`, recording when each batch arrives."""

    def __init__(self, loader):
        self.loader, self.times = loader, []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.times = [time.perf_counter()]
        for batch in self.loader:
            self.times.append(time.perf_counter())
            yield batch


def prepare(data, crop, videos_per_class, python=sys.executable):
    """A synthetic 5-class set at frames of the clip's scale size, extracted and packed as UCF101 would be."""
    if os.path.isfile(os.path.join(data, 'ucf101_frame', 'train.lmdb')):
        return
    height = (crop * 8 // 7 + 1) // 2 * 2          # 128 for a 112 crop, as UCF101's short side
    tools = os.path.join(HERE, 'dataset')
    for cmd in (['make_synthetic.py', '--out', data, '--preset', 'camera', '--videos-per-class', str(videos_per_class),
                 '--test-per-class', '1', '--height', str(height), '--width', str(height * 4 // 3 // 2 * 2)],
                ['extract_videos.py', '-d', 'ucf101', '--root', data, '--short-side', '0'],
                ['create_lmdb.py', '-d', os.path.join(data, 'ucf101_frame'), '-s', 'train']):
        subprocess.run([python, os.path.join(tools, cmd[0]), *cmd[1:]], check=True, stdout=subprocess.DEVNULL)


def measure(model, loader, recipe, device, epochs, seed_sampler):
    """(steady clips/s, seconds per epoch) of `epochs` epochs of train_one_epoch over `loader`."""
    optimizer = make_optimizer(model.parameters(), 'sgd', 1e-4, 0.9, 5e-4)
    updater = Updater(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    criterion = torch.nn.CrossEntropyLoss()
    timed = Timed(loader)
    rates, seconds = [], []
    for epoch in range(1, epochs + 1):
        seed_sampler(epoch)
        start = time.perf_counter()
        train_one_epoch(model, timed, updater, criterion, device, epoch, recipe)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        end = time.perf_counter()
        steady = timed.times[3:]        # batches 3..N, timed from the arrival of the 3rd: the workers are up
        if epoch > 1:
            seconds.append(end - start)
            rates.append(loader.batch_size * len(steady) / (end - steady[0]))
    return statistics.median(rates), statistics.median(seconds)


def ceiling(model, recipe, device, batch, shape, classes, steps):
    """Clips/s of the training step alone on random clips resident on the device."""
    clips = [(torch.randn(batch, *shape, device=device), torch.randint(0, classes, (batch,), device=device))
             for _ in range(steps)]
    optimizer = make_optimizer(model.parameters(), 'sgd', 1e-4, 0.9, 5e-4)
    updater = Updater(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    criterion = torch.nn.CrossEntropyLoss()
    train_one_epoch(model, clips[:2], updater, criterion, device, 0, recipe)   # warm up
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        train_one_epoch(model, clips, updater, criterion, device, 0, recipe)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        rates.append(batch * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', default='c3d')
    p.add_argument('--crop-size', type=int, default=16, help='clip height and width (the GPU script: 112)')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--epochs', type=int, default=3, help='epochs per loop (the first is not counted)')
    p.add_argument('--batches', type=int, default=8, help='batches per epoch (sets the synthetic set size)')
    p.add_argument('--amp', action='store_true', help='our loop in bf16 autocast too (fp16 where bf16 is missing)')
    p.add_argument('--channels-last', action='store_true', help='with --amp: channels_last_3d')
    p.add_argument('--data', help='folder for the synthetic set (kept, reused when present)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()

    device = torch.device(args.device)
    env = Env(device, 0, 1, 1)
    data = args.data or tempfile.mkdtemp(prefix='pipeline_')
    prepare(data, args.crop_size, -(-args.batches * args.batch_size // 5))
    crop, scale = args.crop_size, (args.crop_size * 8 // 7, args.crop_size * 8 // 7)
    root = os.path.join(data, 'ucf101_frame')
    spec = DataSpec(root=root, dataset='ucf101', num_frames=16, crop=crop, scale=scale,
                    temporal_jitter=False, batch_size=args.batch_size, test_batch_size=args.batch_size,
                    workers=args.workers, seed=1, num_classes=5)
    ours = make_data(spec, env).train
    original_set = VideoDataSetLMDB(os.path.join(root, 'train.lmdb'), os.path.join(root, 'train.txt'),
                                    num_groups=16, transform=get_augmentor(True, crop, scale), is_train=True)
    original = DataLoader(original_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                          num_workers=args.workers, pin_memory=device.type == 'cuda', persistent_workers=False)

    precisions = [None] + ([amp_dtype(True, None, device)] if args.amp else [])
    rows = []
    for name, loader, dtype in [('original: float clips, new workers each epoch', original, None)] + \
            [('ours: uint8 clips, persistent workers', ours, d) for d in precisions]:
        torch.manual_seed(0)
        model = build_model(args.arch, 5, crop_size=crop).to(device)
        channels_last = args.channels_last and dtype is not None
        if channels_last:
            model.to(memory_format=torch.channels_last_3d)
        recipe = Recipe(epochs=1, optimizer='sgd', lr=1e-4, momentum=0.9, weight_decay=5e-4,
                        amp_dtype=dtype, channels_last=channels_last, log_interval=10 ** 6)
        if dtype is not None:
            guard_bf16(model, dtype, spec.num_frames, spec.crop, device)
        top = ceiling(model, recipe, device, args.batch_size, (3, 16, crop, crop), 5, args.batches)
        seed = (lambda e: loader.sampler.set_epoch(e)) if loader is ours else (lambda e: torch.manual_seed(e))
        rate, seconds = measure(model, loader, recipe, device, args.epochs, seed)
        precision = 'float32' if dtype is None else str(dtype)[6:] + (' + channels_last' if channels_last else '')
        rows.append((name, precision, top, rate, seconds))
        print(f"ROW {name} | {precision} | ceiling {top:.1f} | loop {rate:.1f} clips/s | {seconds:.2f} s/epoch",
              flush=True)

    print(f"\n{args.arch}, 16x{crop}x{crop}, batch {args.batch_size}, {args.workers} workers, {args.batches} batches "
          f"per epoch, {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else os.cpu_count()})")
    print("\n| loader | precision | step ceiling clips/s | loop clips/s (steady) | s / epoch | loop / ceiling |")
    print("|---|---|---|---|---|---|")
    for name, precision, top, rate, seconds in rows:
        print(f"| {name} | {precision} | {top:.1f} | {rate:.1f} | {seconds:.2f} | {100 * rate / top:.0f}% |")
    base = rows[0]
    for name, precision, _, rate, seconds in rows[1:]:
        print(f"\n{name} ({precision}) vs the original's way: {rate / base[3]:.2f}x clips/s, "
              f"{base[4] / seconds:.2f}x shorter epochs")


if __name__ == '__main__':
    main()
