"""File sizes of the compact export (models/compact.py) against the dense checkpoint.

    python bench/bench_export.py [--types blk-kgs kgr kgc] [--profiles c3d_3.57x c3d_3.57x_all-convs ...]

For every shipped profile (default: every file in profiles/, the original's five first, then ours:
the `_all-convs` and `_uniform` ones; docs/profiles.md), a randomly initialised model of
the profile's architecture is hard-pruned with the profile under each sparsity type and saved
both ways: `torch.save` of the state dict (dense) and `save_compact`. kgc cannot group a
single kernel position, so under kgc the profile's 1x1x1 convs stay dense. Prints a Markdown
table of sizes in MB (10^6 bytes); a profile a type cannot take (kgr above (gM - 1) / gM, e.g.
r2+1d-pretrained_3.20x's 0.9 at gM = 8) gets `-` and the reason below the table.
"""
import argparse
import glob
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import admm
from models import DEFAULT_GEOMETRY, build_model
from models.compact import save_compact


def arch_of(profile):
    """`c3d_3.57x` -> c3d, `r2+1d-pretrained_2.56x` -> r2+1d-pretrained: the longest known prefix."""
    return max((a for a in DEFAULT_GEOMETRY if profile.startswith(a + '_')), key=len)


ORIGINAL_PROFILES = ['c3d_2.53x_v2', 'c3d_3.57x', 'r2+1d-pretrained_2.56x', 'r2+1d-pretrained_3.20x', 's3d_2.09x']


def shipped_profiles():
    """The original's profiles, then ours (the rest of profiles/), each group in name order."""
    names = sorted(os.path.basename(f)[:-5] for f in glob.glob(os.path.join(admm.PROFILE_DIR, '*.yaml')))
    return [n for n in ORIGINAL_PROFILES if n in names] + [n for n in names if n not in ORIGINAL_PROFILES]


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--types', nargs='+', default=['blk-kgs', 'kgr', 'kgc'], choices=admm.SPARSITY_TYPES)
    p.add_argument('--profiles', nargs='+', default=shipped_profiles())
    args = p.parse_args()

    print('| profile | dense | ' + ' | '.join(f'compact, {t}' for t in args.types) + ' |')
    print('|---|---|' + '---|' * len(args.types))
    refused = []
    with tempfile.TemporaryDirectory() as tmp:
        for profile in args.profiles:
            torch.manual_seed(0)
            model = build_model(arch_of(profile), 101, pretrained=False)
            dense_state = {k: v.clone() for k, v in model.state_dict().items()}
            torch.save(dense_state, os.path.join(tmp, 'dense.pt'))
            cells = [os.path.getsize(os.path.join(tmp, 'dense.pt')) / 1e6]
            params = dict(model.named_parameters())
            for kind in args.types:
                model.load_state_dict(dense_state)
                ratios = admm.load_profile(profile, model)
                if kind == 'kgc':
                    ratios = {n: r for n, r in ratios.items() if math.prod(params[n].shape[2:]) > 1}
                try:
                    admm.hard_prune(model, ratios, kind)        # checks every ratio before touching a weight
                except ValueError as exc:
                    refused.append(f'{profile}, {kind}: {exc}')
                    cells.append(None)
                    continue
                save_compact(model.state_dict(), os.path.join(tmp, 'compact.pt'), kind)
                cells.append(os.path.getsize(os.path.join(tmp, 'compact.pt')) / 1e6)
            print(f'| {profile} | ' + ' | '.join('-' if c is None else f'{c:.1f}' for c in cells) + ' |', flush=True)
    for line in refused:
        print(f'\n- {line}')


if __name__ == '__main__':
    main()
