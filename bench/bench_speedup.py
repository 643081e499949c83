"""Measured CPU speedup of pruned models: dense conv3d (oneDNN) vs the KGS path (models/sparse_conv.py)
vs the slim `filter` model (models/slim.py), per layer and whole model, side by side in one run.

    python bench/bench_speedup.py                        # C3D and R(2+1)D, batch 1, all threads (~10 min)
    python bench/bench_speedup.py --arch c3d --batch 1 8 --threads 0 1 --block-sizes 8x4 64x16 all
    python bench/bench_speedup.py --arch c3d --layers-only --profiles c3d_3.57x
    python bench/bench_speedup.py --arch c3d --onnx      # also onnxruntime: dense, slim and KGS-exported models

Models are randomly initialised and hard-pruned with each profile (speed depends on the kept pattern,
not on the values): blk-kgs at every block size (`all` = one block row of all filters: gM = O), and
`filter` with the profile's ratios scaled until the slim model's own FLOPs reduction matches the
profile's (removing a filter also removes the next layer's input channels, so the same ratios would
prune much more). Times are medians of `--reps` interleaved repeats (dense, KGS, slim, dense, ...),
so load on a shared machine hits all of them alike; speedup = dense median / median. In whole
models each pruned conv takes the KGS path where that measured faster on its input (sparse_exec
with an example input; `--no-calibrate`: where the cost model predicts it). FLOPs reduction is
profile_flops' (a pruned weight's MACs scaled by its density) for KGS and counted on the slim model
itself (`models.slim.macs`, corrections included); "MACs run" counts what the KGS model executes (its
GEMMs with their padding, dense layers in full). Prints Markdown tables (and writes them to `--out`).
"""
import argparse
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import admm  # noqa: E402
import profile_flops  # noqa: E402
from models import DEFAULT_GEOMETRY, build_model  # noqa: E402
from models.slim import macs, slim_model  # noqa: E402
from models.sparse_conv import KGSConv3d, interleaved_medians, sparse_exec  # noqa: E402

PROFILES = {'c3d': ['c3d_2.53x_v2', 'c3d_3.57x'], 'r2+1d': ['r2+1d-pretrained_2.56x', 'r2+1d-pretrained_3.20x']}
BLOCKS = ['8x4', '16x4', '32x8', '64x16', 'all']
ALL_FILTERS = 1 << 16          # blocks taller than any layer: one block row of all filters


def parse_block(text):
    """'8x4' -> (8, 4); 'all' -> one block row of all filters (gM larger than any layer), gN 4."""
    if text == 'all':
        return ALL_FILTERS, 4
    try:
        gm, gn = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size {text!r}: write GMxGN (e.g. 8x4) or 'all'") from None
    return gm, gn


def block_name(block):
    return 'all' if block[0] >= ALL_FILTERS else f'{block[0]}x{block[1]}'


def interleaved(fns, reps):
    """Median seconds of each named callable, called in turn `reps` times after one warm-up round
    (`models.sparse_conv.interleaved_medians`), without gradients."""
    with torch.no_grad():
        return dict(zip(fns, interleaved_medians(list(fns.values()), reps)))


@torch.no_grad()
def kgs_pruned(model, profile, block):
    """A copy of `model` hard-pruned with blk-kgs at `block`, every weight of the profile blocked by its own
    filter count when gM is 'all' (so a 64-filter layer is one block row, not one padded to 65536)."""
    model = copy.deepcopy(model)
    ratios = admm.load_profile(profile, model)
    params = dict(model.named_parameters())
    for name, ratio in ratios.items():
        w = params[name]
        w.copy_(admm.project(w, ratio, 'blk-kgs', (min(block[0], w.shape[0]), block[1])))
    return model


@torch.no_grad()
def filter_pruned(model, profile, target, clip):
    """`(model, scale)`: a copy of `model` filter-pruned with the profile's ratios times `scale`, the scale
    found by bisection so that the slim model's FLOPs reduction is `target` (within 2%)."""
    ratios = admm.load_profile(profile, model)
    dense = macs(model, clip)
    lo, hi = 0.0, 1.0 / max(ratios.values()) * 0.999
    best = None
    for _ in range(14):
        scale = (lo + hi) / 2
        pruned = copy.deepcopy(model)
        admm.hard_prune(pruned, {n: r * scale for n, r in ratios.items()}, 'filter')
        reduction = dense / macs(slim_model(pruned, arch_of(model)), clip)
        best = (pruned, scale, reduction)
        if abs(reduction / target - 1) < 0.02:
            break
        lo, hi = (scale, hi) if reduction < target else (lo, scale)
    return best


def arch_of(model):
    return {'C3D': 'c3d', 'VideoResNet': 'r2+1d', 'S3D': 's3d'}[type(model).__name__]


def geometry(arch):
    g = DEFAULT_GEOMETRY[arch]
    return g['num_frames'], g['crop_size']


def conv_inputs(model, clip):
    """`{conv name: input tensor}` of every Conv3d / KGSConv3d for one forward pass of `clip`."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv3d, KGSConv3d)):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0])))
    with torch.no_grad():
        model(clip)
    for h in hooks:
        h.remove()
    return seen


def layer_table(arch, dense, variants, clip, reps):
    """Per pruned conv: dense ms and, per KGS variant, ms and speedup (every layer converted, none kept
    dense, so the table shows the raw KGS path), plus the layer's MACs reduction."""
    inputs = conv_inputs(dense, clip)
    rows = []
    for name, x in inputs.items():
        conv = dense.get_submodule(name)
        fns, cells = {'dense': lambda c=conv, x=x: c(x)}, {}
        for label, model in variants.items():
            pruned = model.get_submodule(name)
            if bool((pruned.weight != 0).all()):
                continue
            kgs = KGSConv3d.from_conv(pruned, model.block[0])
            fns[label] = lambda k=kgs, x=x: k(x)
            cells[label] = kgs
        if not cells:
            continue
        t = interleaved(fns, reps)
        row = [name, tuple(x.shape[1:]), f"{t['dense'] * 1e3:.1f}"]
        for label in variants:
            if label in cells:
                row.append(f"{t[label] * 1e3:.1f} ({t['dense'] / t[label]:.2f}x, {1 / cells[label].gemm_density:.1f}x)")
            else:
                row.append('dense')
        for kgs in cells.values():
            kgs.release()
        rows.append(row)
        print('  ' + ' | '.join(map(str, row)), flush=True)
    head = ['layer', 'input (C, T, H, W)', 'dense ms'] + [f'KGS {v}: ms (speedup, MACs red.)' for v in variants]
    return markdown(head, rows)


def markdown(head, rows):
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows]
    return '\n'.join(lines)


def onnx_latency(models, clip, reps):
    """onnxruntime median ms of each model, exported at the clip's shape (CPU provider, default threads)."""
    import onnxruntime as ort

    from models.compact import export_onnx
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, model in models.items():
            path = os.path.join(tmp, 'm.onnx')
            export_onnx(model, path, tuple(clip.shape))
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            sessions[name] = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        feed = {'clip': clip.numpy()}
        t = interleaved({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}, reps)
    for name, v in t.items():
        out[name] = v
    return out


@torch.no_grad()
def checkpoint_speedup(path, block, num_classes, reps=5, batch=1):
    """`(dense s, KGS s)`: a trained C3D checkpoint's conv weights (its real kept pattern) in a C3D at
    16x112x112 (fc6 follows the clip size, so it is left random), dense vs `sparse_exec` at `block`
    (each layer on the path measured faster)."""
    from models import read_checkpoint
    state, _ = read_checkpoint(path)
    model = build_model('c3d', num_classes).eval()
    convs = {k: v for k, v in state.items() if k.startswith('conv')}
    model.load_state_dict(convs, strict=False)
    kgs = copy.deepcopy(model)
    clip = torch.randn(batch, 3, 16, 112, 112)
    sparse_exec(kgs, block, example_input=clip)
    t = interleaved({'dense': lambda: model(clip), 'kgs': lambda: kgs(clip)}, reps)
    return t['dense'], t['kgs']


def run_model(arch, profile, blocks, batch, reps, onnx, layers, whole, min_speedup, calibrate):
    """Markdown tables for one architecture, profile and batch: per layer and / or whole model."""
    num_frames, crop = geometry(arch)
    torch.manual_seed(0)
    base = build_model(arch, 101, pretrained=False).eval()
    clip_shape = (batch, 3, num_frames, crop, crop)
    clip = torch.randn(clip_shape)
    dense_macs = macs(base, clip_shape)
    variants, reductions = {}, {'dense': 1.0}
    for block in blocks:
        model = kgs_pruned(base, profile, block)
        model.block = block
        variants[block_name(block)] = model
        reductions[f'KGS {block_name(block)}'] = profile_flops.profile(model, num_frames, crop)['flops_reduction']
    tables = []
    if layers:
        tables.append(layer_table(arch, base, variants, clip, reps))
    if not whole:
        return '\n\n'.join(tables)
    rows, fns, notes = [], {'dense': lambda: base(clip)}, {'dense': ''}
    for label, model in variants.items():
        report = sparse_exec(model, model.block, min_speedup=min_speedup, example_input=clip if calibrate else None)
        on = sum(r['path'] == 'kgs' for r in report.values())
        notes[f'KGS {label}'] = (f"{on} of {sum(r['density'] < 1 for r in report.values())} pruned convs on the KGS "
                                 f"path; MACs run {dense_macs / macs(model, clip_shape):.2f}x fewer")
        fns[f'KGS {label}'] = lambda m=model: m(clip)
    target = reductions[f'KGS {block_name(blocks[0])}']
    pruned, scale, reduction = filter_pruned(base, profile, target, clip_shape)
    slim = slim_model(pruned, arch)
    reductions['slim filter'] = reduction
    notes['slim filter'] = f"filter type, the profile's ratios x{scale:.2f}"
    fns['slim filter'] = lambda: slim(clip)
    t = interleaved(fns, reps)
    for name in fns:
        rows.append([name, f"{reductions[name]:.2f}x", f"{t[name] * 1e3:.0f}", f"{t['dense'] / t[name]:.2f}x",
                     notes[name]])
    tables.append(markdown(['model', 'FLOPs reduction', 'ms', 'speedup', 'note'], rows))
    if onnx:
        last = block_name(blocks[-1])
        lat = onnx_latency({'dense': base, 'slim filter': slim, f'KGS {last} (exported)': variants[last]},
                           clip[:1], reps)
        tables.append(markdown(['onnxruntime, batch 1', 'ms', 'speedup'],
                               [[n, f"{v * 1e3:.0f}", f"{lat['dense'] / v:.2f}x"] for n, v in lat.items()]))
    for m in variants.values():
        for k in m.modules():
            if isinstance(k, KGSConv3d):
                k.release()
    return '\n\n'.join(tables)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', nargs='+', default=['c3d', 'r2+1d'], choices=sorted(PROFILES))
    p.add_argument('--profiles', nargs='+', help='default: the two shipped profiles of each architecture')
    p.add_argument('--block-sizes', nargs='+', type=parse_block, default=[parse_block(b) for b in BLOCKS],
                   help='GMxGN blocks of blk-kgs, or all (one block row of all filters)')
    p.add_argument('--batch', nargs='+', type=int, default=[1])
    p.add_argument('--threads', nargs='+', type=int, default=[0], help='0: all cores (torch default)')
    p.add_argument('--reps', type=int, default=5, help='interleaved repeats per measurement (median)')
    p.add_argument('--layers-only', action='store_true', help='per-layer table only (every pruned conv on KGS)')
    p.add_argument('--no-layers', action='store_true', help='whole-model table only')
    p.add_argument('--min-speedup', type=float, default=1.1,
                   help="sparse_exec's threshold: slower layers stay dense in whole-model runs")
    p.add_argument('--no-calibrate', action='store_true',
                   help="whole models: choose each layer's path by sparse_exec's cost model, not by measuring it")
    p.add_argument('--onnx', action='store_true', help='also onnxruntime latency of dense, slim and KGS models')
    p.add_argument('--out', help='also write the tables to this Markdown file')
    args = p.parse_args(argv)

    default_threads = torch.get_num_threads()
    sections = []
    for arch in args.arch:
        for profile in args.profiles or PROFILES[arch]:
            for threads in args.threads:
                torch.set_num_threads(threads or default_threads)
                for batch in args.batch:
                    title = (f"### {arch}, {profile}, batch {batch}, {torch.get_num_threads()} thread(s), "
                             f"clip {'x'.join(map(str, geometry(arch)[:1] + (geometry(arch)[1],) * 2))}")
                    print(title, flush=True)
                    start = time.time()
                    table = run_model(arch, profile, args.block_sizes, batch, args.reps, args.onnx,
                                      not args.no_layers, not args.layers_only, args.min_speedup,
                                      not args.no_calibrate)
                    sections.append(f"{title} ({time.time() - start:.0f} s)\n\n{table}")
                    print('\n' + sections[-1] + '\n', flush=True)
    torch.set_num_threads(default_threads)
    if args.out:
        with open(args.out, 'w') as f:
            f.write('\n\n'.join(sections) + '\n')


if __name__ == '__main__':
    main()
