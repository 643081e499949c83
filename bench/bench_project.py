"""Speed of `admm.project` over every pruned weight of C3D under a profile.

    python bench/bench_project.py [--profile c3d_3.57x] [--repeats 5] [--device cpu|cuda]

Prints, from one run: the vectorised projection, a plain per-group Python loop (the naive
baseline, written here), and one elementwise pass over the same weights (the memory-bound
floor), as medians, and the two ratios.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import admm  # noqa: E402
from models import build_model  # noqa: E402


def loop_project(weight, ratio, block_size=(8, 4)):
    """blk-kgs the naive way: one Python iteration per (block, kernel position) group."""
    w = weight.reshape(weight.shape[0], weight.shape[1], -1)
    gm, gn = block_size
    o, i, k = w.shape
    groups, scores = [], []
    for bo in range(0, o, gm):
        for bi in range(0, i, gn):
            for p in range(k):
                g = w[bo:bo + gm, bi:bi + gn, p]
                groups.append((bo, bi, p))
                scores.append((g.norm() / max(1, int((g != 0).sum())) ** 0.5).item())
    threshold = admm.percentile(torch.tensor(scores), 100 * ratio)
    out = w.clone()
    for (bo, bi, p), s in zip(groups, scores):
        if s <= threshold:
            out[bo:bo + gm, bi:bi + gn, p] = 0
    return out.reshape(weight.shape)


def timed(fn, repeats, sync):
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--profile', default='c3d_3.57x')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--loop-repeats', type=int, default=1, help='the loop is slow: repeats for it (0: skip it)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = p.parse_args()

    torch.manual_seed(0)
    model = build_model('c3d', 101).to(args.device)
    ratios = admm.load_profile(args.profile, model)
    weights = admm.prunable_parameters(model, ratios)
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)
    numel = sum(w.numel() for w in weights.values())
    print(f"C3D under {args.profile}: {len(weights)} weights, {numel / 1e6:.1f} M entries, blk-kgs 8x4, "
          f"device {args.device}, {torch.get_num_threads()} threads")

    def vectorised():
        for name, w in weights.items():
            admm.project(w, ratios[name], 'blk-kgs')

    def floor():
        for w in weights.values():
            torch.mul(w, 2.0)

    def loop():
        for name, w in weights.items():
            loop_project(w, ratios[name])

    if args.loop_repeats:
        for name, w in weights.items():   # the loop must agree with the vectorised projection
            if w.shape[1] <= 128:
                assert torch.equal(loop_project(w, ratios[name]), admm.project(w, ratios[name], 'blk-kgs')), name
    vectorised()                      # warm-up
    floor()
    t_vec = timed(vectorised, args.repeats, sync)
    t_floor = timed(floor, args.repeats, sync)
    if args.loop_repeats:
        t_loop = timed(loop, args.loop_repeats, sync)
        print(f"{'per-group loop (naive)':<28} {t_loop * 1e3:>10.1f} ms")
    print(f"{'project() (vectorised)':<28} {t_vec * 1e3:>10.1f} ms")
    print(f"{'one elementwise pass':<28} {t_floor * 1e3:>10.1f} ms")
    if args.loop_repeats:
        print(f"speed-up over the loop: {t_loop / t_vec:.0f}x (aim >= 100x)")
    print(f"cost over the floor: {t_vec / t_floor:.1f}x (aim <= 20x)")


if __name__ == '__main__':
    main()
