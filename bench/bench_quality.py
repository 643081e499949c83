"""Accuracy after pruning: ADMM vs reweighted vs one-shot, each followed by the same masked
retraining, for several sparsity types, on the synthetic action sets.

    python bench/bench_quality.py --root /tmp/quality [--presets camera handheld]
        [--types blk-kgs blk-vanilla kgr kgc] [--methods admm rew oneshot] [--config-file c3d_3.57x]
        [--block-sizes 8x4 32x8 all] [--speed]

For each preset: writes the dataset (dataset/make_synthetic.py: 160 training and 30 test videos
per class; extract_videos.py --short-side 24; create_lmdb.py) unless `{root}/{preset}/data` holds
one, trains one dense C3D baseline, then for every type and method prunes it to the same profile
and retrains it with the same recipe. All phases run through `opt_main.main`, in this process.
Prints one table per preset (best validation top-1, the original's model selection) and writes
them to `{root}/quality.md`. With several `--block-sizes` the block types run at each (`all`: one
block row of all filters, gM = 512 for C3D); `--speed` adds the measured CPU speedup of each pruned
model's kept pattern at the real clip size (bench_speedup.checkpoint_speedup: its conv weights in
a 16x112x112 C3D, dense conv3d vs models.sparse_conv.sparse_exec, batch 1, medians of 5).
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from bench_speedup import ALL_FILTERS, checkpoint_speedup, parse_block  # noqa: E402

import admm  # noqa: E402
import opt_main  # noqa: E402
import profile_flops  # noqa: E402

C3D_WIDEST = 512         # `all`: blocks of 512 filters are one block row in every C3D layer


def block_size(text):
    """'8x4' -> (8, 4); 'all' -> (512, 4), one block row of all filters in every C3D layer."""
    gm, gn = parse_block(text)
    return (C3D_WIDEST, gn) if gm >= ALL_FILTERS else (gm, gn)


def block_label(block):
    return 'all' if block[0] == C3D_WIDEST else f'{block[0]}x{block[1]}'


def prepare(data, preset, python):
    if os.path.isfile(os.path.join(data, 'ucf101_frame', 'val.lmdb')):
        return
    tools = os.path.join(HERE, 'dataset')
    for cmd in (['make_synthetic.py', '--out', data, '--preset', preset, '--videos-per-class', '160',
                 '--test-per-class', '30'],
                ['extract_videos.py', '-d', 'ucf101', '--root', data, '--short-side', '24'],
                ['create_lmdb.py', '-d', os.path.join(data, 'ucf101_frame'), '-s', 'train'],
                ['create_lmdb.py', '-d', os.path.join(data, 'ucf101_frame'), '-s', 'val']):
        subprocess.run([python, os.path.join(tools, cmd[0]), *cmd[1:]], check=True, stdout=subprocess.DEVNULL)


def top1_of(path):
    return float(path.rsplit('_top1-', 1)[1][:-3])


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--root', required=True, help='work folder (datasets, checkpoints, the table)')
    p.add_argument('--presets', nargs='+', default=['camera', 'handheld'])
    p.add_argument('--types', nargs='+', default=['blk-kgs', 'blk-vanilla', 'kgr', 'kgc'])
    p.add_argument('--methods', nargs='+', default=['admm', 'rew', 'oneshot'], choices=['admm', 'rew', 'oneshot'])
    p.add_argument('--config-file', default='c3d_3.57x')
    p.add_argument('--crop-size', type=int, default=16)
    p.add_argument('--baseline-epochs', type=int, default=14)
    p.add_argument('--prune-epochs', type=int, default=3, help='per ADMM stage (2 stages); --rew trains twice as long')
    p.add_argument('--retrain-epochs', type=int, default=5)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--block-sizes', nargs='+', type=block_size, default=[(8, 4)],
                   help="blocks for the block types, GMxGN or all (one block row of all filters)")
    p.add_argument('--speed', action='store_true', help='add the measured CPU speedup (16x112x112, batch 1)')
    p.add_argument('--extra', nargs=argparse.REMAINDER, default=[], help='more opt_main.py options for every phase')
    args = p.parse_args()

    common = ['--arch', 'c3d', '--dataset', 'ucf101', '--num-classes', '5', '--crop-size', str(args.crop_size),
              '--scale-size', str(args.crop_size + 2), '--batch-size', '16', '--workers', str(args.workers),
              '--optmzr', 'adam', '--weight-decay', '0', '--lr', '1e-4', '--seed', '1', '--log-interval', '50',
              *args.extra]
    retrain = ['--masked-retrain', '--epochs', str(args.retrain_epochs), '--warmup', '--warmup-epochs', '1',
               '--warmup-lr', '1e-6', '--lr-scheduler', 'cosine']
    tables = []
    for preset in args.presets:
        start = time.time()
        folder = os.path.join(args.root, preset)
        data = os.path.join(folder, 'data')
        prepare(data, preset, sys.executable)
        base_root = os.path.join(folder, 'baseline')
        found = glob.glob(os.path.join(base_root, 'ucf101_c3d_baseline_epoch-*.pt'))
        baseline = found[0] if found else opt_main.main(
            ['--baseline', '--epochs', str(args.baseline_epochs), '--lr-scheduler', 'multistep',
             '--data_location', data, '--ckpt-root', base_root, *common])
        rows = {}
        configs = [(kind, block) for kind in args.types
                   for block in (args.block_sizes if kind in admm.BLOCK_TYPES else args.block_sizes[:1])]
        for kind, block in configs:
            for method in args.methods:
                name = kind if len(args.block_sizes) == 1 else f'{kind}-{block_label(block)}'
                ckpt = os.path.join(folder, name, method)
                shutil.rmtree(ckpt, ignore_errors=True)
                os.makedirs(ckpt)
                shutil.copy(baseline, ckpt)               # the start of --admm / --rew
                prune = ['--config-file', args.config_file, '--sparsity-type', kind, '--rho', '0.001',
                         '--rho-num', '2', '--connectivity-block-size', *map(str, block), '--data_location', data,
                         '--ckpt-root', ckpt, *common]
                if method == 'admm':
                    opt_main.main(['--admm', '--epochs', str(args.prune_epochs), '--admm-epochs', '1', *prune])
                elif method == 'rew':
                    opt_main.main(['--rew', '--epochs', str(2 * args.prune_epochs), '--penalty', '1e-4',
                                   '--rew-milestones', *map(str, range(2, 2 * args.prune_epochs + 1, 2)),
                                   '--lr-scheduler', 'multistep', *prune])
                final = opt_main.main([*retrain, *prune, *(['--load-path', baseline] if method == 'oneshot' else [])])
                report = profile_flops.profile(_loaded(final, args.crop_size), 16, args.crop_size)
                speed = checkpoint_speedup(final, block, 5) if args.speed and method == args.methods[0] else None
                rows[(kind, block, method)] = (top1_of(final), report['flops_reduction'], speed)
                print(f"ROW {preset} {name} {method}: top-1 {top1_of(final):.1f} %, "
                      f"{report['flops_reduction']:.2f}x fewer FLOPs"
                      + (f", CPU {speed[0] / speed[1]:.2f}x faster ({speed[0] * 1e3:.0f} -> {speed[1] * 1e3:.0f} ms)"
                         if speed else '') + f" ({time.time() - start:.0f} s)", flush=True)
        speed_head = ' CPU speedup, 16x112x112 batch 1 |' if args.speed else ''
        lines = [f"### {preset}: baseline top-1 {top1_of(baseline):.1f} %, C3D 16x{args.crop_size}x{args.crop_size}, "
                 f"profile {args.config_file} ({time.time() - start:.0f} s)", '',
                 '| type | block | FLOPs reduction | ' + ' | '.join(args.methods) + ' |' + speed_head,
                 '|---|---|---|' + '---|' * (len(args.methods) + bool(args.speed))]
        for kind, block in configs:
            first = rows[(kind, block, args.methods[0])]
            cells = [f"{rows[(kind, block, m)][0]:.1f}" for m in args.methods]
            speed = [f"{first[2][0] / first[2][1]:.2f}x"] if args.speed else []
            label = block_label(block) if kind in admm.BLOCK_TYPES else '-'
            lines.append(f"| {kind} | {label} | {first[1]:.2f}x | " + ' | '.join(cells + speed) + ' |')
        tables.append('\n'.join(lines))
        print('\n' + tables[-1] + '\n', flush=True)
    with open(os.path.join(args.root, 'quality.md'), 'w') as f:
        f.write('\n\n'.join(tables) + '\n')
    with open(os.path.join(args.root, 'quality.json'), 'w') as f:
        json.dump({'tables': tables}, f)


def _loaded(path, crop):
    from models import build_model, load_weights
    model = build_model('c3d', 5, crop_size=crop)
    load_weights(model, path)
    return model


if __name__ == '__main__':
    main()
