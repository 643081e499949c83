"""Per-layer parameters, FLOPs and density of a model under a pruning profile or a checkpoint.

    python profile_flops.py --arch c3d --config-file c3d_3.57x
    python profile_flops.py --arch c3d --checkpoint checkpoint/run/model.pt --json
    python profile_flops.py --arch c3d --target 3.0 --out profiles/c3d_3.00x.yaml

FLOPs are counted by PyTorch's `FlopCounterMode` on a meta-device copy of the model (no
memory, no time) and reported as MACs (multiply-accumulates; 1 MAC = 2 FLOPs, the unit in
which C3D is usually quoted as 38.5 G). A pruned weight's MACs are scaled by its density,
the fraction of its entries that are non-zero.
"""
import argparse
import copy
import json
import math
import re
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import admm
from models import DEFAULT_GEOMETRY, build_model, read_checkpoint, strip_module_prefix


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
    leave it under `prune_ratios` (so edge blocks and ties count exactly as pruning makes them)."""
    out = {}
    for n, p in model.named_parameters():
        name = strip_module_prefix(n)
        if p.dim() < 2:
            continue
        w = p
        if prune_ratios and prune_ratios.get(name, 0) > 0:
            w = admm.project(p, prune_ratios[name], sparsity_type, block_size)
        out[name] = (w != 0).sum().item() / w.numel()
    return out


def profile(model, num_frames, crop_size, prune_ratios=None, sparsity_type='blk-kgs', block_size=(8, 4)):
    """Per-layer table and totals as a plain dict (what `--json` prints)."""
    macs = layer_macs(model, num_frames, crop_size)
    dens = densities(model, prune_ratios, sparsity_type, block_size)
    params = {strip_module_prefix(n): p.numel() for n, p in model.named_parameters()}
    layers = []
    for name, m in macs.items():
        d = dens.get(name, 1.0)
        layers.append({'name': name, 'params': params[name], 'macs': m, 'density': d,
                       'macs_kept': m * d, 'ratio': (prune_ratios or {}).get(name, 0.0)})
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
        lines.append(f"{row['name']:<34} {row['params']:>11,} {row['macs'] / 1e9:>8.3f} {row['ratio']:>6.3f} "
                     f"{row['density']:>8.3f} {row['macs_kept'] / 1e9:>11.3f}")
    lines.append(f"{'total':<34} {report['dense_params']:>11,} {report['dense_macs'] / 1e9:>8.3f} {'':>6} "
                 f"{report['pruned_macs'] / report['dense_macs']:>8.3f} {report['pruned_macs'] / 1e9:>11.3f}")
    lines.append(f"input {'x'.join(map(str, report['input']))}; {report['unit']}")
    lines.append(f"FLOPs reduction {report['flops_reduction']:.3f}x, parameters reduction "
                 f"{report['params_reduction']:.3f}x ({report['pruned_params']:,.0f} of "
                 f"{report['dense_params']:,} parameters left)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- target profiles

def seed_layers(model):
    """The weights the original's profiles prune: every conv weight but the first; no linear layer."""
    convs = [strip_module_prefix(n) for n, p in model.named_parameters() if p.dim() >= 3]
    return convs[1:]


def target_profile(model, target, num_frames, crop_size, layers=None, rule='uniform', sparsity_type='blk-kgs',
                   block_size=(8, 4), max_ratio=0.95, tolerance=0.01):
    """Ratios for `layers` whose measured FLOPs reduction is within `tolerance` of `target`.

    `uniform`: one ratio for every layer. `flops`: ratio proportional to the square root of
    the layer's share of MACs (the heaviest layers give up the most), capped at `max_ratio`.
    Raises ValueError when even `max_ratio` everywhere cannot reach the target.
    """
    layers = layers or seed_layers(model)
    macs = layer_macs(model, num_frames, crop_size)
    heaviest = max(macs[n] for n in layers)
    shape = {n: 1.0 if rule == 'uniform' else math.sqrt(macs[n] / heaviest) for n in layers}

    def ratios(scale):
        return {n: round(min(max_ratio, scale * shape[n]), 4) for n in layers}

    def reduction(scale):
        return profile(model, num_frames, crop_size, ratios(scale), sparsity_type, block_size)['flops_reduction']

    hi = max_ratio / min(shape.values())
    best = reduction(hi)
    if best < target * (1 - tolerance):
        raise ValueError(f"target {target}x is out of reach: pruning {len(layers)} layers at up to {max_ratio} "
                         f"gives {best:.3f}x. Allow more layers (--layers) or a higher --max-ratio.")
    lo = 0.0
    for _ in range(40):          # bisection on the scale; reduction grows with it
        mid = (lo + hi) / 2
        got = reduction(mid)
        if abs(got / target - 1) <= tolerance / 4:
            return ratios(mid), got
        lo, hi = (mid, hi) if got < target else (lo, mid)
    got = reduction(hi)
    if abs(got / target - 1) > tolerance:
        raise ValueError(f"could not get within {tolerance:.0%} of {target}x (closest {got:.3f}x)")
    return ratios(hi), got


def write_profile(path, ratios, comment):
    with open(path, 'w') as f:
        f.write("".join(f"# {line}\n" for line in comment.splitlines()))
        f.write("prune_ratios:\n")
        for name, r in ratios.items():
            f.write(f"  module.{name}: {r}\n")


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', required=True, choices=sorted(DEFAULT_GEOMETRY))
    p.add_argument('--num-classes', type=int, default=101)
    src = p.add_mutually_exclusive_group()
    src.add_argument('--config-file', help='profile name (profiles/NAME.yaml) or path to a YAML profile')
    src.add_argument('--checkpoint', help='count the real zeros of this checkpoint')
    src.add_argument('--target', type=float, help='write a profile reaching this FLOPs reduction (with --out)')
    p.add_argument('--sparsity-type', default='blk-kgs', choices=admm.SPARSITY_TYPES)
    p.add_argument('--connectivity-block-size', type=int, nargs=2, default=[8, 4], metavar=('gM', 'gN'))
    p.add_argument('--num-frames', type=int, default=16)
    p.add_argument('--crop-size', type=int, help='clip height and width (default: the architecture\'s)')
    p.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    g = p.add_argument_group('target profiles (--target)')
    g.add_argument('--out', help='where to write the generated profile')
    g.add_argument('--rule', default='uniform', choices=['uniform', 'flops'],
                   help='uniform: one ratio for all layers; flops: ratios grow with the layer\'s MACs')
    g.add_argument('--layers', help='regular expression of the weights to prune '
                   '(default: every conv weight but the first, as the original\'s profiles)')
    g.add_argument('--max-ratio', type=float, default=0.95, help='largest ratio any layer may get')
    g.add_argument('--seed', type=int, default=0, help='initialisation seed of the weights projected')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    crop = args.crop_size or DEFAULT_GEOMETRY[args.arch]['crop_size']
    block = tuple(args.connectivity_block_size)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, args.num_classes, num_frames=args.num_frames, crop_size=crop, pretrained=False)
    model.arch = args.arch
    ratios = None
    if args.checkpoint:
        state, _ = read_checkpoint(args.checkpoint)
        from models import check_state_dict
        check_state_dict(model, state, args.checkpoint, arch=args.arch)
        model.load_state_dict(state, strict=False)
    elif args.config_file:
        ratios = admm.load_profile(args.config_file, model)
    elif args.target:
        if not args.out:
            sys.exit("--target needs --out PATH for the profile it writes")
        layers = None
        if args.layers:
            layers = [n for n in (strip_module_prefix(n) for n, p in model.named_parameters() if p.dim() >= 2)
                      if re.search(args.layers, n)]
            if not layers:
                sys.exit(f"--layers {args.layers!r} matches no weight of {args.arch}")
        try:
            ratios, got = target_profile(model, args.target, args.num_frames, crop, layers, args.rule,
                                         args.sparsity_type, block, args.max_ratio)
        except ValueError as exc:
            sys.exit(f"error: {exc}")
        write_profile(args.out, ratios,
                      f"{args.arch}: {got:.3f}x FLOPs reduction at {args.num_frames}x{crop}x{crop} "
                      f"({args.sparsity_type}, block {block[0]}x{block[1]}, rule {args.rule}).\n"
                      f"Written by: python profile_flops.py --arch {args.arch} --target {args.target} "
                      f"--rule {args.rule} --max-ratio {args.max_ratio}"
                      + (f" --layers '{args.layers}'" if args.layers else "")
                      + (f" --crop-size {crop}" if args.crop_size else "")
                      + (f" --sparsity-type {args.sparsity_type}" if args.sparsity_type != 'blk-kgs' else "")
                      + f" --out {args.out}")
        print(f"wrote {args.out}: {got:.3f}x", file=sys.stderr)
    report = profile(model, args.num_frames, crop, ratios, args.sparsity_type, block)
    print(json.dumps(report) if args.json else format_table(report))


if __name__ == '__main__':
    main()
