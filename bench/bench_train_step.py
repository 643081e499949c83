"""Cost of the pruning machinery in a training step: ADMM penalty and gradient masks.

    python bench/bench_train_step.py [--crop-size 32] [--batch-size 8] [--repeats 7] [--device cpu|cuda]

Times, in one run on the same model and batch, interleaved: a plain SGD step; the step with the
ADMM penalty (as `--admm` trains); the step with the penalty and the gradient masks
(`--admm --combine-progressive`); and the step with the masks alone (`--masked-retrain`).
Prints medians and each overhead relative to the plain step.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import admm  # noqa: E402
from models import build_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', default='c3d')
    p.add_argument('--profile', default='c3d_3.57x')
    p.add_argument('--crop-size', type=int, default=32)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.arch, 101, crop_size=args.crop_size, pretrained=False).to(device)
    ratios = admm.load_profile(args.profile, model)
    clips = torch.randn(args.batch_size, 3, 16, args.crop_size, args.crop_size, device=device)
    labels = torch.randint(0, 101, (args.batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4)
    state = admm.ADMM(model, ratios, rho=1e-3)
    state.initialize()
    with torch.no_grad():          # masks with the profile's zeros (Z = project(W)), as in retraining
        saved = {n: p.clone() for n, p in state.params.items()}
        for n, p in state.params.items():
            p.copy_(state.Z[n])
        masks = admm.Masks(model)
        for n, p in state.params.items():
            p.copy_(saved[n])
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def step(penalty, mask):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(clips), labels)
        if penalty:
            loss = loss + state.loss()
        loss.backward()
        if mask:
            masks.apply_to_grads()
        optimizer.step()

    variants = {'plain step': (False, False), '+ ADMM penalty': (True, False),
                '+ penalty and masks': (True, True), '+ masks (retraining)': (False, True)}
    times = {k: [] for k in variants}
    for v in variants.values():      # warm-up
        step(*v)
    for _ in range(args.repeats):    # interleaved, so drifts of a shared machine hit all alike
        for name, v in variants.items():
            sync()
            start = time.perf_counter()
            step(*v)
            sync()
            times[name].append(time.perf_counter() - start)
    n_pruned = sum(p.numel() for p in state.params.values())
    print(f"{args.arch} at 16x{args.crop_size}x{args.crop_size}, batch {args.batch_size}, {args.profile} "
          f"({n_pruned / 1e6:.1f} M pruned weights), {device}, {args.repeats} repeats, median")
    base = statistics.median(times['plain step'])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:<22} {t * 1e3:9.1f} ms   {100 * (t / base - 1):+6.1f} %")


if __name__ == '__main__':
    main()
