"""The distillation teacher in eval mode (ours) against train mode (the original's), on real clips.

    python bench/bench_teacher_mode.py --arch c3d --load-path BASELINE.pt --data_location DATA \
        [--dataset ucf101] [--crop-size 112 --scale-size 128] [--temperature 3] [--batches 8]

For the validation clips of a dataset (the same clips each pass), with the teacher a trained
dense model: the teacher's top-1 in each mode, and how much the soft targets softmax(t / T) that
the student is trained to match change when the teacher is in train mode: the mean KL divergence
of the train-mode targets from the eval-mode ones, and between two train-mode passes over the
same clips (dropout and BatchNorm's batch statistics give another target each time). The
distillation term is the original's soft cross-entropy; its gradient with respect to the
student's logits is (softmax(s / T) - softmax(t / T)) / T, so a target that moves by d moves the
gradient by d / T.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import frame_root  # noqa: E402
from models import ARCHITECTURES, build_model, load_weights  # noqa: E402
from training.data import clip_dataset, known_classes, to_device  # noqa: E402


def kl(p, q):
    """Mean over clips of KL(p || q) for rows of probabilities."""
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1).mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='c3d', choices=sorted(ARCHITECTURES))
    p.add_argument('--load-path', required=True, help='the teacher: a trained dense checkpoint')
    p.add_argument('--data_location', required=True)
    p.add_argument('--dataset', default='ucf101')
    p.add_argument('--num-classes', type=int)
    p.add_argument('--num-frames', type=int, default=16)
    p.add_argument('--crop-size', type=int, default=112)
    p.add_argument('--scale-size', type=int, default=128)
    p.add_argument('--temperature', type=float, default=3.0, help='--temperature of the distillation (default 3)')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--batches', type=int, default=8, help='validation batches to use (default 8)')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    data = clip_dataset(frame_root(args.data_location, args.dataset), args.dataset, 'val', False, args.num_frames,
                        args.crop_size, (args.scale_size, args.scale_size), False)
    classes = args.num_classes or known_classes(args.dataset) or data.num_classes
    model = build_model(args.arch, classes, num_frames=args.num_frames, crop_size=args.crop_size)
    load_weights(model, args.load_path, args.arch)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=False)
    logits = {'eval': [], 'train 1': [], 'train 2': []}
    labels = []
    with torch.no_grad():
        for i, (clips, label) in enumerate(loader):
            if i == args.batches:
                break
            clips = to_device(clips, torch.device('cpu'))
            labels.append(label)
            logits['eval'].append(model.eval()(clips))
            logits['train 1'].append(model.train()(clips))
            logits['train 2'].append(model.train()(clips))
    labels = torch.cat(labels)
    logits = {k: torch.cat(v) for k, v in logits.items()}
    soft = {k: F.softmax(v / args.temperature, dim=1) for k, v in logits.items()}
    print(f"teacher {args.load_path}, {len(labels)} validation clips of {args.dataset}, T = {args.temperature:g}")
    for mode in ('eval', 'train 1'):
        top1 = (logits[mode].argmax(1) == labels).float().mean().item() * 100
        print(f"  teacher top-1 in {mode.split()[0]} mode: {top1:.2f} %")
    print(f"  soft targets, KL(train || eval): {kl(soft['train 1'], soft['eval']):.4f} nats per clip")
    print(f"  soft targets, KL(train pass 2 || train pass 1): {kl(soft['train 2'], soft['train 1']):.4f} nats per clip")
    moved = (soft['train 1'] - soft['eval']).abs().sum(1).mean().item() / 2
    print(f"  total variation between the train- and eval-mode targets: {moved:.4f} (mean over clips; 1 = disjoint)")


if __name__ == '__main__':
    main()
