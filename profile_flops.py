"""Per-layer parameters, FLOPs and density of a model under a pruning profile or a checkpoint.

    python profile_flops.py --arch c3d --config-file c3d_3.57x
    python profile_flops.py --arch c3d --config-file c3d_3.57x c3d_2.00x_uniform --sparsity-type kgr kgc
    python profile_flops.py --arch c3d --checkpoint checkpoint/run/model.pt --json
    python profile_flops.py --arch c3d --target 3.0 --rule flops --out profiles/c3d_3.00x.yaml
    python profile_flops.py --arch c3d --checkpoint checkpoint/run/model.pt --plot sparsity.png

FLOPs are counted by PyTorch's `FlopCounterMode` on a meta-device copy of the model (no
memory, no time) and reported as MACs (multiply-accumulates; 1 MAC = 2 FLOPs, the unit in
which C3D is usually quoted as 38.5 G). A pruned weight's MACs are scaled by its density,
the fraction of its entries that are non-zero.
"""
import argparse
import copy
import difflib
import functools
import json
import math
import os
import re
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import admm
from models import (
    DEFAULT_GEOMETRY,
    CheckpointError,
    build_model,
    check_state_dict,
    read_checkpoint,
    strip_module_prefix,
)


def layer_macs(model, num_frames, crop_size):
    """`{weight name: MACs}` for every conv / linear weight, counted on one clip."""
    meta = copy.deepcopy(model).to('meta')
    with FlopCounterMode(display=False) as counter:
        meta(torch.empty(1, 3, num_frames, crop_size, crop_size, device='meta'))
    counts = counter.get_flop_counts()
    root = type(model).__name__
    macs = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, 'weight', None)
        if isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)) and weight is not None:
            flops = sum(counts.get(f"{root}.{module_name}", {}).values())
            macs[strip_module_prefix(f"{module_name}.weight")] = flops // 2
    return macs


@torch.no_grad()
def densities(model, prune_ratios=None, sparsity_type='blk-kgs', block_size=(8, 4)):
    """Non-zero fraction of every weight with dim >= 2: as the model is, or as `project` would
    leave it under `prune_ratios` (so edge blocks and ties count exactly as pruning makes them).
    `prune_ratios` / `sparsity_type` may be lists of both (several profiles, masks multiply)."""
    rules = admm.weight_rules(prune_ratios, sparsity_type) if prune_ratios else {}
    admm.check_rules(admm.prunable_parameters(model, rules), rules, block_size)
    out = {}
    for n, p in model.named_parameters():
        name = strip_module_prefix(n)
        if p.dim() < 2:
            continue
        w = p
        if any(ratio > 0 for ratio, _ in rules.get(name, ())):
            w = admm.combined_project(p, rules[name], block_size)
        out[name] = (w != 0).sum().item() / w.numel()
    return out


def profile(model, num_frames, crop_size, prune_ratios=None, sparsity_type='blk-kgs', block_size=(8, 4)):
    """Per-layer table and totals as a plain dict (what `--json` prints). With several profiles
    (lists of `prune_ratios` and `sparsity_type`), a layer's `ratio` is the list of its ratios."""
    macs = layer_macs(model, num_frames, crop_size)
    dens = densities(model, prune_ratios, sparsity_type, block_size)
    params = {strip_module_prefix(n): p.numel() for n, p in model.named_parameters()}
    rules = admm.weight_rules(prune_ratios, sparsity_type) if prune_ratios else {}
    several = prune_ratios is not None and not isinstance(prune_ratios, dict)
    layers = []
    for name, m in macs.items():
        d = dens.get(name, 1.0)
        ratios = [r for r, _ in rules.get(name, ())]
        layers.append({'name': name, 'params': params[name], 'macs': m, 'density': d, 'macs_kept': m * d,
                       'ratio': ratios if several else (ratios[0] if ratios else 0.0)})
    dense_macs = sum(macs.values())
    pruned_macs = sum(row['macs_kept'] for row in layers)
    dense_params = sum(params.values())
    pruned_params = dense_params - sum(params[n] * (1 - d) for n, d in dens.items())
    return {
        'arch': getattr(model, 'arch', type(model).__name__), 'input': [3, num_frames, crop_size, crop_size],
        'unit': 'MACs (multiply-accumulates; FLOPs = 2 x MACs)',
        'dense_macs': dense_macs, 'pruned_macs': pruned_macs,
        'dense_flops': 2 * dense_macs, 'pruned_flops': 2 * pruned_macs,
        'flops_reduction': dense_macs / pruned_macs,
        'dense_params': dense_params, 'pruned_params': pruned_params,
        'params_reduction': dense_params / pruned_params,
        'layers': layers,
    }


def format_table(report):
    lines = [f"{'layer':<34} {'params':>11} {'GMACs':>8} {'ratio':>6} {'density':>8} {'GMACs kept':>11}"]
    for row in report['layers']:
        ratio = row['ratio']
        ratio = f"{ratio:.3f}" if not isinstance(ratio, list) else "/".join(f"{r:.2f}" for r in ratio) or "-"
        lines.append(f"{row['name']:<34} {row['params']:>11,} {row['macs'] / 1e9:>8.3f} {ratio:>6} "
                     f"{row['density']:>8.3f} {row['macs_kept'] / 1e9:>11.3f}")
    lines.append(f"{'total':<34} {report['dense_params']:>11,} {report['dense_macs'] / 1e9:>8.3f} {'':>6} "
                 f"{report['pruned_macs'] / report['dense_macs']:>8.3f} {report['pruned_macs'] / 1e9:>11.3f}")
    lines.append(f"input {'x'.join(map(str, report['input']))}; {report['unit']}")
    lines.append(f"FLOPs reduction {report['flops_reduction']:.3f}x, parameters reduction "
                 f"{report['params_reduction']:.3f}x ({report['pruned_params']:,.0f} of "
                 f"{report['dense_params']:,} parameters left)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- target profiles

def seed_layers(model, sparsity_type='blk-kgs'):
    """The weights a generated profile prunes by default: every conv weight but the first, no linear
    layer (our `*_all-convs` profiles; the original's prune a few middle layers, docs/profiles.md).
    For kgc, 1x1x1 convs are left out too (a single kernel position cannot be grouped by position)."""
    convs = [(strip_module_prefix(n), p) for n, p in model.named_parameters() if p.dim() >= 3]
    return [n for n, p in convs[1:] if sparsity_type != 'kgc' or math.prod(p.shape[2:]) > 1]


def target_profile(model, target, num_frames, crop_size, layers=None, rule='uniform', sparsity_type='blk-kgs',
                   block_size=(8, 4), max_ratio=0.95, tolerance=0.01):
    """Ratios for `layers` whose measured FLOPs reduction is within `tolerance` of `target`;
    returns `(ratios, measured reduction)`.

    The rule: `uniform` gives every layer the ratio s; `flops` gives layer l
    `min(max_ratio, s * sqrt(MACs_l / MACs of the heaviest layer))`, so the heaviest layers give
    up the most. s is found by bisection; ratios are rounded to 4 decimals. The reduction is
    measured as `profile` measures it: each layer's MACs scaled by the density that projecting
    the model's weights at its ratio leaves. kgr and kgc change density in steps (1/gM, 1/9 of a
    layer), which can jump over the target: the flops rule then raises single layers' ratios,
    each time the change that comes closest, until within `tolerance`; uniform stays uniform.
    Raises ValueError for a target the layers cannot reach at `max_ratio` (kgr: at most
    (gM-1)/gM), or cannot hit within `tolerance`.
    """
    if not target >= 1:
        raise ValueError(f"target must be a FLOPs reduction of at least 1x, got {target}")
    if not 0 < max_ratio < 1:
        raise ValueError(f"max ratio must be in (0, 1), got {max_ratio}")
    layers = layers or seed_layers(model, sparsity_type)
    if sparsity_type == 'kgr':
        max_ratio = min(max_ratio, (block_size[0] - 1) / block_size[0])
    macs = layer_macs(model, num_frames, crop_size)
    dense = sum(macs.values())
    params = dict((strip_module_prefix(n), p) for n, p in model.named_parameters())
    unknown = [n for n in layers if n not in macs]
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not conv or linear weights of {type(model).__name__}")
    admm.check_rules({n: params[n] for n in layers}, {n: [(max_ratio, sparsity_type)] for n in layers}, block_size)
    # Scores do not depend on the ratio: score once, then each trial ratio costs a grid comparison.
    with torch.no_grad():
        scores = {n: admm.group_scores(params[n], sparsity_type, block_size) for n in layers}
        sizes = {n: admm.group_sizes(params[n].shape, sparsity_type, block_size, params[n].device) for n in layers}
    heaviest = max(macs[n] for n in layers)
    shape = {n: 1.0 if rule == 'uniform' else math.sqrt(macs[n] / heaviest) for n in layers}

    def ratios(scale):
        return {n: round(min(max_ratio, scale * shape[n]), 4) for n in layers}

    @functools.cache
    def density(n, r):
        keep = admm.select_groups(scores[n], r, sparsity_type, block_size)
        return (keep * sizes[n]).sum().item() / params[n].numel()

    def reduction(found):
        return dense / (dense - sum(macs[n] * (1 - density(n, r)) for n, r in found.items()))

    def miss(found):
        return abs(reduction(found) / target - 1)

    lo, hi = 0.0, max_ratio / min(shape.values())
    most = reduction(ratios(hi))
    if most < target * (1 - tolerance):
        raise ValueError(f"target {target}x is out of reach: pruning {len(layers)} layers at up to {max_ratio:.4g} "
                         f"gives {most:.3f}x. Allow more layers (--layers) or a higher --max-ratio.")
    for _ in range(60):          # bisection on the scale; the reduction grows with it
        if ratios(lo) == ratios(hi):
            break
        mid = (lo + hi) / 2
        if miss(ratios(mid)) <= tolerance / 4:
            lo = hi = mid
            break
        lo, hi = (mid, hi) if reduction(ratios(mid)) < target else (lo, mid)
    found = min(ratios(lo), ratios(hi), key=miss)
    if rule == 'flops' and miss(found) > tolerance:
        # kgr and kgc change density in steps, and one step of a heavy layer can jump over the
        # target. Finish by raising single layers' ratios from the profile below the target,
        # each time the change that comes closest, on a grid of 1/80 (which holds kgr's k/8 and kgc's k/8).
        grid = [round(j / 80, 4) for j in range(1, int(max_ratio * 80 + 1e-9) + 1)]

        def closest_step(found, n):
            # The reduction grows with one layer's ratio: bisect for the first grid ratio reaching the target.
            options = [r for r in grid if r > found[n]]
            a, b = 0, len(options)
            while a < b:
                m = (a + b) // 2
                a, b = (m + 1, b) if reduction({**found, n: options[m]}) < target else (a, m)
            return min(({**found, n: r} for r in options[max(a - 1, 0):a + 1]), key=miss, default=found)

        found = ratios(lo)
        while miss(found) > tolerance:
            step = min((closest_step(found, n) for n in layers), key=miss)
            if miss(step) >= miss(found):
                break
            found = step
    if miss(found) > tolerance:
        raise ValueError(f"could not get within {tolerance:.0%} of {target}x: the closest {rule} profile gives "
                         f"{reduction(found):.3f}x ({sparsity_type} changes density in steps); try another "
                         f"target, --rule flops, or --layers")
    return found, profile(model, num_frames, crop_size, found, sparsity_type, block_size)['flops_reduction']


def write_profile(path, ratios, comment):
    with open(path, 'w') as f:
        f.write("".join(f"# {line}\n" for line in comment.splitlines()))
        f.write("prune_ratios:\n")
        for name, r in ratios.items():
            f.write(f"  module.{name}: {r}\n")


# ----------------------------------------------------------------------------- pictures

def group_map(weight, sparsity_type='blk-kgs', block_size=(8, 4), max_rows=64, max_cols=64):
    """Kept fraction of the weight's kernel groups as a 2D map: `(matrix, ylabel, xlabel, rows in all)`.

    Rows are blocks (filter block, channel block) and columns kernel positions; for kgr and filter
    (and kernels of one position) rows are filters and columns channel blocks. A cell is the
    fraction of its entries that are non-zero: 1 kept, 0 pruned. Only the first rows/columns.
    """
    gm, gn = block_size
    o, k = weight.shape[0], math.prod(weight.shape[2:])
    nz = (weight.detach() != 0).float().cpu()
    blocks, _ = admm.grid_view(nz, 'blk-kgs', block_size)                   # (O/gM, gM, I/gN, gN, K)
    if sparsity_type in ('kgr', 'filter') or k == 1:
        kept = blocks.sum(dim=(3, 4), keepdim=True) / admm.group_sizes(nz.shape, 'kgr', block_size).clamp(min=1)
        return kept.reshape(-1, blocks.shape[2])[:min(o, max_rows), :max_cols], 'filter', \
            f'channel block ({gn} channels)', o
    kept = blocks.sum(dim=(1, 3), keepdim=True) / admm.group_sizes(nz.shape, 'blk-kgs', block_size)
    return (kept.reshape(-1, k)[:max_rows], f'block ({gm} filters x {gn} channels)', 'kernel position (t, h, w)',
            blocks.shape[0] * blocks.shape[2])


def plot_sparsity(model, path, layers=None, sparsity_type='blk-kgs', block_size=(8, 4), title=''):
    """Write a PNG: per-layer density (bars) and kept/pruned maps of kernel groups for `layers`
    (default: the most pruned, the least pruned and the largest pruned conv weight)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    weights = {strip_module_prefix(n): p.detach() for n, p in model.named_parameters() if p.dim() >= 2}
    density = {n: (w != 0).float().mean().item() for n, w in weights.items()}
    if layers is None:
        # Three different pictures: the most pruned, the least pruned and the largest conv weight.
        convs = [n for n, w in weights.items() if w.dim() >= 3]
        candidates = [n for n in convs if density[n] < 1] or convs
        by_density = sorted(candidates, key=lambda n: (density[n], -weights[n].numel()))
        chosen = {by_density[0], by_density[-1], max(candidates, key=lambda n: weights[n].numel())}
        layers = [n for n in weights if n in chosen]
    fig = plt.figure(figsize=(max(12, 0.2 * len(weights) + 4), 10), layout='constrained')
    grid = fig.add_gridspec(2, max(1, len(layers)), height_ratios=[1, 1.5])

    bars = fig.add_subplot(grid[0, :])
    names = list(weights)
    colours = ['tab:green' if density[n] < 1 else 'lightgray' for n in names]
    bars.bar(range(len(names)), [density[n] for n in names], color=colours)
    if len(names) <= 40:
        for x, n in enumerate(names):
            bars.text(x, density[n] + 0.01, f"{density[n]:.2f}", ha='center', va='bottom', fontsize=7)
    bars.set_xticks(range(len(names)), names, rotation=90, fontsize=7 if len(names) < 40 else 5)
    bars.set_xlim(-0.6, len(names) - 0.4)
    bars.set_ylim(0, 1.1)
    bars.set_ylabel('density (kept fraction)')
    bars.set_title(f"{title}per-layer density" if title else 'per-layer density')
    bars.legend(handles=[matplotlib.patches.Patch(color='tab:green', label='pruned layer'),
                         matplotlib.patches.Patch(color='lightgray', label='dense layer')],
                loc='lower right', fontsize=8)
    bars.grid(axis='y', alpha=0.3)

    image = None
    for col, name in enumerate(layers):
        ax = fig.add_subplot(grid[1, col])
        w = weights[name]
        matrix, ylabel, xlabel, total = group_map(w, sparsity_type, block_size)
        image = ax.imshow(matrix.numpy(), cmap='Greens', vmin=0, vmax=1, aspect='auto', interpolation='nearest')
        if xlabel.startswith('kernel') and w.dim() == 5 and w.shape[2] > 1:
            for t in range(1, w.shape[2]):         # lines between the temporal slices of the kernel
                ax.axvline(t * w.shape[3] * w.shape[4] - 0.5, color='tab:orange', lw=1)
        if ylabel == 'filter':
            for r in range(block_size[0], matrix.shape[0], block_size[0]):
                ax.axhline(r - 0.5, color='tab:orange', lw=0.6)
        ax.set_title(f"{name}\n{tuple(w.shape)}, density {density[name]:.3f}\n"
                     f"first {matrix.shape[0]} of {total} rows", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    if image is not None:
        bar = fig.colorbar(image, ax=fig.axes[1:], fraction=0.025, ticks=[0, 0.5, 1])
        bar.ax.set_yticklabels(['0 pruned', '0.5', '1 kept'], fontsize=8)
        bar.set_label(f'kept fraction of the cell ({sparsity_type} groups)', fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, like every other error of this tool (argparse would print the whole usage first).
        self.exit(2, f"error: {message} (python profile_flops.py --help lists the options)\n")


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv=None):
    p = _Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', required=True, choices=sorted(DEFAULT_GEOMETRY))
    p.add_argument('--num-classes', type=positive_int, default=101)
    src = p.add_mutually_exclusive_group()
    src.add_argument('--config-file', nargs='+', help='profile name (profiles/NAME.yaml) or path to a YAML profile; '
                     'several profiles (one --sparsity-type each) prune at once')
    src.add_argument('--checkpoint', help='count the real zeros of this checkpoint')
    src.add_argument('--target', type=float, help='write a profile reaching this FLOPs reduction (with --out)')
    p.add_argument('--sparsity-type', nargs='+', default=['blk-kgs'], choices=admm.SPARSITY_TYPES)
    p.add_argument('--connectivity-block-size', type=positive_int, nargs=2, default=[8, 4], metavar=('gM', 'gN'))
    p.add_argument('--num-frames', type=positive_int, default=16)
    p.add_argument('--crop-size', type=positive_int, help='clip height and width (default: the architecture\'s)')
    p.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    g = p.add_argument_group('target profiles (--target)')
    g.add_argument('--out', help='where to write the generated profile')
    g.add_argument('--rule', default='uniform', choices=['uniform', 'flops'],
                   help='uniform: one ratio for all layers; flops: ratios grow with the layer\'s MACs')
    g.add_argument('--layers', help='regular expression of the weights to prune '
                   '(default: every conv weight but the first, as our *_all-convs profiles)')
    g.add_argument('--max-ratio', type=float, default=0.95, help='largest ratio any layer may get')
    g.add_argument('--seed', type=int, default=0, help='initialisation seed of the weights projected')
    g = p.add_argument_group('pictures')
    g.add_argument('--plot', metavar='OUT.png', help='draw per-layer density and kept/pruned maps of kernel groups '
                   '(of the checkpoint, or of random weights projected under --config-file / --target)')
    g.add_argument('--plot-layers', nargs='+', metavar='NAME', help='weights to map (default: the most pruned, '
                   'the least pruned and the largest pruned conv weight)')
    return p.parse_args(argv)


def one_line(exc):
    """An exception's message on one line (checkpoint mismatches and YAML errors span several)."""
    if isinstance(exc, OSError) and exc.strerror:  # from open() and friends: (errno, strerror, filename)
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    elif isinstance(exc, KeyError) and exc.args:  # str() of a KeyError is its message in quotes
        text = str(exc.args[0])
    else:
        text = str(exc)
    return re.sub(r"\s*\n\s*", "; ", re.sub(r":\s*\n\s*", ": ", text.strip()))


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        sys.exit(f"error: {one_line(exc)}")


def make_parent_folder(path, option):
    """Create the folder an output goes into, before any work: a typo in it should not cost a run."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{option} {path}: {folder} is a file, not a folder") from None
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot create the folder {folder} ({exc.strerror})") from None


def load_checkpoint(path):
    try:
        return read_checkpoint(path)
    except (FileNotFoundError, CheckpointError):
        raise
    except Exception as exc:  # noqa: BLE001  torch.load's own errors for a file that is no checkpoint (KeyError, ...)
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {one_line(exc)}); "
                         "copy or download it again, or train it again") from None


def load_profile(name, model):
    try:
        return admm.load_profile(name, model)
    except UnicodeDecodeError as exc:
        raise ValueError(f"profile {name}: not a text YAML file ({exc.reason} at byte {exc.start})") from None


def run(args):
    crop = args.crop_size or DEFAULT_GEOMETRY[args.arch]['crop_size']
    block = tuple(args.connectivity_block_size)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, args.num_classes, num_frames=args.num_frames, crop_size=crop, pretrained=False)
    model.arch = args.arch
    names = [strip_module_prefix(n) for n, p in model.named_parameters() if p.dim() >= 2]
    for name in args.plot_layers or ():
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            raise ValueError(f"--plot-layers: {name!r} is not a weight of {args.arch}"
                             + (f"; did you mean {', '.join(close)}?" if close else ""))
    for path, option in ((args.out, '--out'), (args.plot, '--plot')):
        if path:
            make_parent_folder(path, option)
    ratios, types = None, args.sparsity_type
    if args.checkpoint:
        state, _ = load_checkpoint(args.checkpoint)
        check_state_dict(model, state, args.checkpoint, arch=args.arch)
        model.load_state_dict(state, strict=False)
    elif args.config_file:
        ratios = [load_profile(name, model) for name in args.config_file]
        admm.profile_pairs(ratios, types)                 # one type per profile, or one for all
        if len(ratios) == 1:
            ratios = ratios[0]
        types = types[0] if len(types) == 1 else types
    elif args.target is not None:
        if not args.out:
            raise ValueError("--target needs --out PATH for the profile it writes")
        if len(types) != 1:
            raise ValueError(f"--target writes a profile for one --sparsity-type, got {' '.join(types)}")
        types = types[0]
        layers = None
        if args.layers:
            try:
                pattern = re.compile(args.layers)
            except re.error as exc:
                raise ValueError(f"--layers {args.layers!r} is not a regular expression: {exc}") from None
            layers = [n for n in names if pattern.search(n)]
            if not layers:
                raise ValueError(f"--layers {args.layers!r} matches no weight of {args.arch}; the weights are the "
                                 f"rows of `python profile_flops.py --arch {args.arch}`")
        ratios, got = target_profile(model, args.target, args.num_frames, crop, layers, args.rule, types, block,
                                     args.max_ratio)
        write_profile(args.out, ratios,
                      f"{args.arch}: {got:.3f}x FLOPs reduction at {args.num_frames}x{crop}x{crop} "
                      f"({types}, block {block[0]}x{block[1]}, rule {args.rule}).\n"
                      f"Written by: python profile_flops.py --arch {args.arch} --target {args.target} "
                      f"--rule {args.rule} --max-ratio {args.max_ratio}"
                      + (f" --layers '{args.layers}'" if args.layers else "")
                      + (f" --crop-size {crop}" if args.crop_size else "")
                      + (f" --sparsity-type {types}" if types != 'blk-kgs' else "")
                      + f" --out {args.out}")
        print(f"wrote {args.out}: {got:.3f}x", file=sys.stderr)
    report = profile(model, args.num_frames, crop, ratios, types, block)
    print(json.dumps(report) if args.json else format_table(report))
    if args.plot:
        if ratios:
            admm.hard_prune(model, ratios, types, block)
        kind = types if isinstance(types, str) else types[0]
        source = (os.path.basename(args.checkpoint) if args.checkpoint else
                  ' + '.join(args.config_file) if args.config_file else args.out or 'dense')
        kinds = types if isinstance(types, str) else ' + '.join(types)
        plot_sparsity(model, args.plot, args.plot_layers, kind, block,
                      title=f"{args.arch}, {source} ({kinds}, block {block[0]}x{block[1]}): "
                            f"{report['flops_reduction']:.2f}x FLOPs reduction; ")
        print(f"wrote {args.plot}", file=sys.stderr)


if __name__ == '__main__':
    main()
