"""The compiled KGS kernel (models/kgs_cpu.py) against PyTorch's dense conv3d, per layer and whole model,
side by side in one run, with the share of the CPU's FMA peak it reaches.

    python bench/bench_kgs_layers.py                       # C3D's convs conv2..conv5b, KGS 8x4 at ratio 0.8
    python bench/bench_kgs_layers.py --arch r2+1d --ratio 0.6
    python bench/bench_kgs_layers.py --models              # also whole models, and where their time goes

Layers: random weights hard-pruned by `admm.project(w, ratio, 'blk-kgs', block)` (speed depends on the
kept pattern, not on the values), one clip of the architecture's default geometry, each layer's real
input size. Per layer: dense `F.conv3d` ms, compiled ms, speedup, GMAC/s on the MACs the kept weights
need, and that rate as a share of the FMA peak (`kgs_cpu.fma_peak_gmacs`, a register-only FMA loop
measured in the same interleaved rounds; the highest it has reached in the run so far is used: on a virtual
machine whose two CPUs are at times placed on one physical core the peak halves for a while, and the share
stays a lower bound). Whole models: the masked
(dense) model against `faster_model` (each conv measured dense vs compiled on its input), and the
torch KGS path (`RT3D_NO_COMPILED_KGS=1`) beside them; then a per-layer profile of the fast model.
Times are medians of `--reps` interleaved rounds; speedups are ratios within one run. On a busy
machine, `--threads 1 --cpu-time` times by CPU time: what the work costs where it runs.
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import admm  # noqa: E402
from models import DEFAULT_GEOMETRY, build_model, kgs_cpu  # noqa: E402
from models.slim import faster_model  # noqa: E402
from models.sparse_conv import CompiledKGSConv3d, KGSConv3d, _out_size, interleaved_medians  # noqa: E402

# C3D's profile as the original has it (few layers) and the all-convs profiles (file names of either era).
FEW_LAYER = {'conv2.weight': 0.85, 'conv3a.weight': 0.8, 'conv3b.weight': 0.85, 'conv4b.weight': 0.8}
MODELS = [('c3d', ['c3d_3.57x_all-convs', 'c3d_3.57x'], 'all convs'),
          ('c3d', [FEW_LAYER], 'few layers (original)'),
          ('r2+1d', ['r2+1d-pretrained_3.20x_all-convs', 'r2+1d-pretrained_3.20x'], 'all convs')]


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} logical CPUs, kernel ISA {kgs_cpu.isa()}"


def conv_inputs(model, clip_shape):
    """`{conv name: (conv, input shape)}` of every Conv3d, from one forward pass on the meta device."""
    meta, shapes, hooks = copy.deepcopy(model).to('meta'), {}, []
    for name, m in meta.named_modules():
        if isinstance(m, torch.nn.Conv3d):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: shapes.__setitem__(n, args[0].shape)))
    with torch.no_grad():
        meta(torch.empty(clip_shape, device='meta'))
    for h in hooks:
        h.remove()
    return {n: (model.get_submodule(n), s) for n, s in shapes.items()}


def timed_rounds(fns, reps, threads, clock='wall'):
    """Median seconds of each callable, and the highest FMA peak of the run (`kgs_cpu.highest_fma_peak`)
    with the probes of these interleaved rounds.
    `clock='cpu'`: the process's CPU time instead of wall time (one thread on a busy machine: the time
    the work took where it ran, not the time other processes held the core)."""
    peaks = []
    if clock == 'cpu':
        def peak():
            start = time.process_time()
            kgs_cpu.fma_peak_gmacs(threads, cached=False)
            peaks.append(kgs_cpu._load().fma_loop_macs * threads / (time.process_time() - start) / 1e9)
    else:
        def peak():
            peaks.append(kgs_cpu.fma_peak_gmacs(threads, cached=False))
    fns = list(fns) + [peak]
    with torch.no_grad():
        times = interleaved_medians(fns, reps, time.process_time if clock == 'cpu' else time.perf_counter)
    return times[:-1], kgs_cpu.highest_fma_peak(threads, peaks, clock)


def t_padding_share(weight, frames, stride, padding, dilation):
    """The share of a conv's kept multiply-adds (nonzero weights x output voxels) whose input plane is the T
    padding: the compiled kernel leaves those kernel planes out at the first and last output planes
    (except in a tile that spans two output planes), so its rate on the kept MACs counts them as done."""
    kept = (weight != 0).sum(dim=(0, 1, 3, 4)).tolist()              # nonzero weights per kernel plane
    out = _out_size(frames, len(kept), stride[0], padding[0], dilation[0])
    outside = [sum(not 0 <= o * stride[0] + kt * dilation[0] - padding[0] < frames for o in range(out))
               for kt in range(len(kept))]
    return sum(n * k for n, k in zip(kept, outside)) / max(1, sum(kept) * out)


def layer_table(arch, ratio, block, reps, threads, names, clock='wall'):
    frames, crop = DEFAULT_GEOMETRY[arch]['num_frames'], DEFAULT_GEOMETRY[arch]['crop_size']
    model = build_model(arch, 101, pretrained=False).eval()
    layers = conv_inputs(model, (1, 3, frames, crop, crop))
    first = next(iter(layers))
    rows = ["| layer | input | dense ms | compiled ms | speedup | kept MACs | GMAC/s (kept) | % of FMA peak | "
            "of them on T padding |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    print('\n'.join(rows), flush=True)
    torch.manual_seed(0)
    for name, (conv, shape) in layers.items():
        if (names and name not in names) or (not names and name == first):   # the first conv stays dense
            continue
        weight = admm.project(conv.weight.detach(), ratio, 'blk-kgs', (min(block[0], conv.out_channels), block[1]))
        x = torch.randn(shape)
        kernel = kgs_cpu.pack(weight, block[0], conv.bias, conv.stride, conv.padding, conv.dilation)
        out = F.conv3d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation)
        voxels = out[0, 0].numel() * shape[0]
        (dense_s, fast_s), peak = timed_rounds(
            [lambda: F.conv3d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation),
             lambda: kgs_cpu.conv(x, kernel)], reps, threads, clock)
        kept = kernel.kept_weights * voxels
        rate = kept / fast_s / 1e9
        rows.append(f"| {name} | {tuple(shape[1:])} | {dense_s * 1e3:.1f} | {fast_s * 1e3:.1f} | "
                    f"{dense_s / fast_s:.2f}x | {kept / 1e9:.2f} G ({kept / (weight.numel() * voxels):.2f}) | "
                    f"{rate:.1f} | {100 * rate / peak:.0f}% of {peak:.0f} | "
                    f"{100 * t_padding_share(weight, shape[2], conv.stride, conv.padding, conv.dilation):.0f}% |")
        print(rows[-1], flush=True)
    return rows


def pruned_model(arch, profiles, block):
    model = build_model(arch, 101, pretrained=False).eval()
    for profile in profiles:
        if isinstance(profile, dict):
            ratios = profile
        else:
            try:
                ratios = admm.load_profile(profile, model)
            except (FileNotFoundError, ValueError):
                continue
        torch.manual_seed(0)
        admm.hard_prune(model, ratios, 'blk-kgs', block)
        return model, profile if isinstance(profile, str) else 'inline'
    raise FileNotFoundError(f"none of the profiles {profiles} found")


def profile_model(model, clip, reps):
    """`[(name, kind, seconds)]` per leaf module of `model` (medians of `reps` passes), and the pass's total."""
    spans, starts, hooks = {}, {}, []
    for name, m in model.named_modules():
        if next(m.children(), None) is None:
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: starts.__setitem__(n, time.perf_counter())))
            hooks.append(m.register_forward_hook(
                lambda mod, a, y, n=name: spans.setdefault(n, []).append(time.perf_counter() - starts[n])))
    totals = []
    with torch.no_grad():
        for _ in range(reps + 1):
            start = time.perf_counter()
            model(clip)
            totals.append(time.perf_counter() - start)
    for h in hooks:
        h.remove()
    rows = []
    for name, times in spans.items():
        module = model.get_submodule(name)
        kind = ('compiled conv' if isinstance(module, CompiledKGSConv3d) else 'torch KGS conv'
                if isinstance(module, KGSConv3d) else 'dense conv' if isinstance(module, torch.nn.Conv3d)
                else type(module).__name__)
        rows.append((name, kind, module, statistics.median(times[1:] or times)))
    return rows, statistics.median(totals[1:])


def model_tables(block, reps, threads, clock='wall'):
    out = ["| model | profile | dense ms | torch KGS ms | compiled ms | compiled speedup | over torch KGS |",
           "|---|---|---:|---:|---:|---:|---:|"]
    print('\n'.join(out), flush=True)
    profiles = []
    for arch, candidates, label in MODELS:
        frames, crop = DEFAULT_GEOMETRY[arch]['num_frames'], DEFAULT_GEOMETRY[arch]['crop_size']
        clip = torch.randn(1, 3, frames, crop, crop)
        dense, source = pruned_model(arch, candidates, block)
        fast, report = faster_model(copy.deepcopy(dense), arch, 'blk-kgs', block, example_input=clip)
        os.environ['RT3D_NO_COMPILED_KGS'] = '1'
        try:
            torch_kgs, _ = faster_model(copy.deepcopy(dense), arch, 'blk-kgs', block, example_input=clip)
        finally:
            del os.environ['RT3D_NO_COMPILED_KGS']
        (d, t, c), _ = timed_rounds([lambda: dense(clip), lambda: torch_kgs(clip), lambda: fast(clip)], reps, threads,
                                    clock)
        out.append(f"| {arch} {label} | {source} | {d * 1e3:.0f} | {t * 1e3:.0f} | {c * 1e3:.0f} | {d / c:.2f}x | "
                   f"{t / c:.2f}x |")
        print(out[-1], flush=True)
        paths = {}
        for row in report['kgs'].values():
            paths[row['path']] = paths.get(row['path'], 0) + 1
        profiles.append(f"\n{arch} {label} ({source}): conv paths {paths}; where a pass of the compiled model goes:\n")
        rows, total = profile_model(fast, clip, reps)
        peak = kgs_cpu.highest_fma_peak(threads, [kgs_cpu.fma_peak_gmacs(threads, cached=False) for _ in range(5)])
        profiles += ["| module | kind | ms | share | GMAC/s (needed) | % of peak |", "|---|---|---:|---:|---:|---:|"]
        shapes = conv_inputs(dense, clip.shape)
        kinds = {}
        for name, kind, module, seconds in rows:
            kinds[kind] = kinds.get(kind, 0) + seconds
            rate = ''
            if 'conv' in kind:
                conv = dense.get_submodule(name)
                out_shape = F.conv3d(torch.empty(shapes[name][1], device='meta'), conv.weight.to('meta'), None,
                                     conv.stride, conv.padding, conv.dilation).shape
                needed = int((conv.weight != 0).sum()) * out_shape[2:].numel()
                rate = f"{needed / seconds / 1e9:.1f} | {100 * needed / seconds / 1e9 / peak:.0f}%"
            if seconds / total >= 0.01:
                profiles.append(f"| {name} | {kind} | {seconds * 1e3:.1f} | {100 * seconds / total:.0f}% | "
                                f"{rate or ' | '} |")
        kinds['(between modules: Python, flatten, ...)'] = total - sum(kinds.values())
        profiles.append(f"| **total** | | {total * 1e3:.1f} | | | |")
        profiles.append('\nBy kind: ' + ', '.join(f"{k} {v * 1e3:.1f} ms ({100 * v / total:.0f}%)"
                                                 for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    return out, profiles


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='c3d', choices=['c3d', 'r2+1d', 's3d'])
    parser.add_argument('--layers', nargs='*', default=[], help='conv names (default: all but the first)')
    parser.add_argument('--ratio', type=float, default=0.8, help='blk-kgs prune ratio of every layer')
    parser.add_argument('--block', default='8x4', help='KGS block GMxGN')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--reps', type=int, default=5, help='interleaved rounds (medians)')
    parser.add_argument('--models', action='store_true', help='also whole models and their profile')
    parser.add_argument('--cpu-time', action='store_true',
                        help="time by the process's CPU time, not wall time (for --threads 1 on a busy machine)")
    parser.add_argument('--out', help='also write the tables to this Markdown file')
    args = parser.parse_args()
    if not kgs_cpu.available():
        sys.exit(f"the compiled kernel is not available: {kgs_cpu.why_unavailable()}")
    torch.set_num_threads(args.threads)
    block = tuple(int(v) for v in args.block.lower().split('x'))
    head = [f"CPU: {cpu_name()}; {args.threads} threads; torch {torch.__version__}; medians of {args.reps} "
            f"interleaved rounds of {'CPU' if args.cpu_time else 'wall'} time; FMA peak "
            f"{kgs_cpu.fma_peak_gmacs(args.threads):.1f} GMAC/s (wall) at the start; load average "
            f"{os.getloadavg()[0]:.1f}",
            f"\n{args.arch}, KGS {args.block}, ratio {args.ratio}, 1 clip:\n"]
    print('\n'.join(head), flush=True)
    clock = 'cpu' if args.cpu_time else 'wall'
    lines = head + layer_table(args.arch, args.ratio, block, args.reps, args.threads, args.layers, clock)
    if args.models:
        print(f"\nWhole models, KGS {args.block}, 1 clip:\n", flush=True)
        tables, profiles = model_tables(block, args.reps, args.threads, clock)
        print('\n'.join(profiles), flush=True)
        lines += [f"\nWhole models, KGS {args.block}, 1 clip:\n"] + tables + profiles
    if args.out:
        with open(args.out, 'w') as f:
            f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
