"""Structured-sparsity projections, ADMM state, hard pruning and retraining masks.

Everything that touches weights works on a `(groups x members)` view of the weight, so no
Python loop runs over blocks, groups or elements. The rules are those of docs/algorithm.md
section 3; `project()` is the one place they live.
"""
import difflib
import math
import os

import torch
import yaml

# Types cut into gM x gN blocks (`--connectivity-block-size`): the run name gets `-r{gM}c{gN}`.
BLOCK_TYPES = ('blk-kgs', 'blk-vanilla', 'kgr', 'kgc')
SPARSITY_TYPES = BLOCK_TYPES + ('filter', 'irregular')
BALANCED_TYPES = ('kgr', 'kgc')   # every block prunes as many groups; scored by the plain L2 norm
PLAIN_NORM_TYPES = BALANCED_TYPES + ('filter',)   # scored by the plain L2 norm (no non-zero count)
KGC_CHUNK = 9          # kgc: kernel positions per chunk (3x3x3 kernels give 3 chunks)
PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'profiles')


def strip_module_prefix(name):
    """`module.conv1.weight` (as DataParallel saved it) -> `conv1.weight`."""
    return name[len('module.'):] if name.startswith('module.') else name


# ----------------------------------------------------------------------------- groups

def _blocked(weight, block_size, chunk=None):
    """Zero-pad `(O, I, ...)` to multiples of the block and view it as `(O/gM, gM, I/gN, gN, K)`.

    With `chunk`, K is also padded to a multiple of it and split: `(O/gM, gM, I/gN, gN, K/chunk, chunk)`.
    """
    gm, gn = block_size
    o, i = weight.shape[:2]
    w = weight.reshape(o, i, -1)
    k = w.shape[-1]
    po, pi, pk = -o % gm, -i % gn, (-k % chunk if chunk else 0)
    if po or pi or pk:
        w = torch.nn.functional.pad(w, (0, pk, 0, pi, 0, po))
    blocks = ((o + po) // gm, gm, (i + pi) // gn, gn)
    return w.view(*blocks, (k + pk) // chunk, chunk) if chunk else w.view(*blocks, k)


def _unblocked(blocks, shape):
    """Inverse of `_blocked`: crop the padding and restore `shape`."""
    ob, gm, ib, gn = blocks.shape[:4]
    w = blocks.reshape(ob * gm, ib * gn, -1)
    return w[:shape[0], :shape[1], :math.prod(shape[2:])].reshape(shape)


def _kgc_chunk(shape):
    """Kernel positions per kgc chunk: 9, or K itself for smaller kernels (see `_check`)."""
    return min(KGC_CHUNK, math.prod(shape[2:]))


def _kgr_rows(gm, ratio):
    """Rows kgr prunes in every block: ceil(gM * ratio), without float noise (0.3 * 10 is not above 3)."""
    return math.ceil(round(gm * ratio, 9))


def check_sparsity_type(sparsity_type):
    """Refuse a name that is not one of SPARSITY_TYPES, listing them."""
    if sparsity_type not in SPARSITY_TYPES:
        raise ValueError(f"unknown sparsity type {sparsity_type!r}; choose one of {', '.join(SPARSITY_TYPES)}")


def _check(weight, ratio, sparsity_type, block_size):
    check_sparsity_type(sparsity_type)
    if weight.dim() < 2 and sparsity_type != 'irregular':
        raise ValueError(f"{sparsity_type} pruning needs a weight with at least 2 dimensions, got shape "
                         f"{tuple(weight.shape)}")
    if not 0 <= ratio < 1:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    if sparsity_type in BLOCK_TYPES and (len(block_size) != 2 or min(block_size) < 1):
        raise ValueError(f"block size must be two positive integers (gM gN), got {block_size}")
    if ratio > 0 and sparsity_type == 'kgr' and _kgr_rows(block_size[0], ratio) >= block_size[0]:
        raise ValueError(f"kgr at ratio {ratio} prunes ceil({block_size[0]} * {ratio}) = "
                         f"{_kgr_rows(block_size[0], ratio)} of the {block_size[0]} rows of every block, i.e. the "
                         f"whole weight; use a ratio <= {(block_size[0] - 1) / block_size[0]:.4g} or a larger gM")
    if ratio > 0 and sparsity_type == 'kgc' and math.prod(weight.shape[2:]) == 1:
        raise ValueError(f"kgc groups kernel positions, but a weight of shape {tuple(weight.shape)} has one position "
                         f"per kernel (a linear layer or a 1x1x1 conv): every block would be one group and be "
                         f"pruned whole. Prune this weight with another type (e.g. a kgr profile) instead")


def grid_view(weight, sparsity_type, block_size):
    """`(view, dims)`: a broadcastable view of the weight and the dims that make up one group.

    Reducing `view` over `dims` (keepdim) gives the group grid; the grid broadcasts back onto
    `view`. Blocks are views of the (padded) weight, so no permuted copy is ever made.
    """
    if sparsity_type == 'irregular':
        return weight, ()
    if sparsity_type == 'filter':
        return weight.reshape(weight.shape[0], -1), (1,)
    if sparsity_type == 'kgc':                                 # (Ob, gM, Ib, gN, K/9, 9)
        return _blocked(weight, block_size, _kgc_chunk(weight.shape)), (1, 3, 4)
    b = _blocked(weight, block_size)                           # (Ob, gM, Ib, gN, K)
    return b, {'blk-kgs': (1, 3), 'blk-vanilla': (1, 3, 4), 'kgr': (3, 4)}[sparsity_type]


def from_grid_view(view, weight_shape, sparsity_type):
    """Inverse of `grid_view`: crop the padding and restore `weight_shape`."""
    if sparsity_type in BLOCK_TYPES:
        return _unblocked(view, weight_shape)
    return view.reshape(weight_shape)


def group_scores(weight, sparsity_type, block_size=(8, 4)):
    """Score of every group, laid out as the group grid (see `keep_groups`): for the block types
    blk-kgs / blk-vanilla, L2 norm / sqrt(max(1, non-zeros in the group)) (the original's rule, which
    keeps partly padded edge blocks comparable); the plain L2 norm for `filter` (the original's
    filter rule) and for the balanced kgr / kgc (the rule of the follow-up that defined them)."""
    view, dims = grid_view(weight, sparsity_type, block_size)
    view = view.float()
    if not dims:                                           # one weight per group
        return view.abs()
    norms = view.square().sum(dim=dims, keepdim=True).sqrt_()
    if sparsity_type in PLAIN_NORM_TYPES:
        return norms
    if torch.count_nonzero(weight) == weight.numel():
        # The common case (no zeros but the padding's) skips a full counting pass.
        nonzeros = group_sizes(weight.shape, sparsity_type, block_size, weight.device)
    else:
        nonzeros = (view != 0).float().sum(dim=dims, keepdim=True)
    return norms / nonzeros.clamp(min=1).sqrt().expand_as(norms)


def group_sizes(shape, sparsity_type, block_size=(8, 4), device='cpu'):
    """Entries of each group that are not padding, broadcastable to the group grid (0 for a
    group made of padding only: a kgr row past the last filter)."""
    k = math.prod(shape[2:])
    if sparsity_type == 'irregular':
        return torch.ones((1,) * len(shape), device=device)
    if sparsity_type == 'filter':
        return torch.full((1, 1), float(shape[1] * k), device=device)
    (gm, gn), (o, i) = block_size, shape[:2]
    ob, ib = -(-o // gm), -(-i // gn)
    cols = (i - gn * torch.arange(ib, device=device)).clamp(max=gn).float().view(1, 1, -1, 1, 1)
    if sparsity_type == 'kgr':
        real_rows = (torch.arange(ob * gm, device=device) < o).float().view(ob, gm, 1, 1, 1)
        return real_rows * cols * k
    members = (o - gm * torch.arange(ob, device=device)).clamp(max=gm).float().view(-1, 1, 1, 1, 1) * cols
    if sparsity_type == 'blk-vanilla':
        return members * k
    if sparsity_type == 'kgc':
        # Position j of a chunk is real in ceil((K - j) / chunk) of the chunks (the last one is padded).
        chunk = _kgc_chunk(shape)
        positions = (k - torch.arange(chunk, device=device) + chunk - 1) // chunk
        return members.unsqueeze(-1) * positions.float()
    return members


def percentile(values, q, dim=None):
    """numpy's default `percentile(values, q)`: linear interpolation between order statistics.

    With `dim`, one percentile per slice along `dim` (kept as a size-1 dim), as numpy's `axis`.
    """
    if dim is None:
        return percentile(values.flatten(), q, dim=0).squeeze(0)
    n = values.shape[dim]
    pos = q / 100 * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    below = torch.kthvalue(values, lo + 1, dim=dim, keepdim=True).values.double()
    above = torch.kthvalue(values, hi + 1, dim=dim, keepdim=True).values.double() if hi != lo else below
    return below + (above - below) * (pos - lo)


def keep_groups(weight, ratio, sparsity_type, block_size=(8, 4)):
    """Boolean group grid, True for the groups `project` keeps.

    The grid is the kept-group index: `(O/gM, 1, I/gN, 1, K)` for blk-kgs,
    `(O/gM, 1, I/gN, 1, 1)` for blk-vanilla, `(O/gM, gM, I/gN, 1, 1)` for kgr,
    `(O/gM, 1, I/gN, 1, 1, min(9, K))` for kgc, `(O, 1)` for filter and the weight's own
    shape for irregular (block counts rounded up).
    """
    _check(weight, ratio, sparsity_type, block_size)
    return select_groups(group_scores(weight.detach(), sparsity_type, block_size), ratio, sparsity_type, block_size)


def select_groups(scores, ratio, sparsity_type, block_size=(8, 4)):
    """The selection rule on a grid of `group_scores`: True for the groups kept at `ratio`
    (`keep_groups` without re-scoring; for callers that try many ratios on one weight)."""
    if ratio == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if sparsity_type == 'kgr':
        # Every block prunes exactly ceil(gM * ratio) rows, the lowest scores; ties go to the
        # lower row index (stable sort). Rows past the last filter are padding, score 0, and are
        # pruned first, so an edge block keeps as many real rows as a full one when it has them.
        order = scores.sort(dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                                .view(1, -1, 1, 1, 1).expand_as(order))
        return rank >= _kgr_rows(block_size[0], ratio)
    if sparsity_type == 'kgc':
        # Per block: the same percentile rule as the other types, over the block's 9 groups only.
        return scores > percentile(scores, 100 * ratio, dim=-1)
    return scores > percentile(scores, 100 * ratio)


def project(weight, ratio, sparsity_type, block_size=(8, 4), return_keep=False):
    """Project `weight` onto the sparsity pattern: the groups scoring at or below the
    `100*ratio`-th percentile become zero, the rest is untouched (docs/algorithm.md section 3).

    With `return_keep=True` also returns the boolean kept-group grid (see `keep_groups`).
    """
    keep = keep_groups(weight, ratio, sparsity_type, block_size)
    w = weight.detach()
    if ratio == 0:
        projected = w.clone()
    else:
        view, _ = grid_view(w, sparsity_type, block_size)
        # A float mask multiplies several times faster than a bool one (no type promotion);
        # adding 0 turns the -0.0 of pruned negative weights into +0.0, so pruned entries are
        # all-zero bits and a compact file (models/compact.py) restores them exactly.
        projected = from_grid_view((view * keep.to(w.dtype)).add_(0.0), w.shape, sparsity_type)
    return (projected, keep) if return_keep else projected


@torch.no_grad()
def mixed_groups(weight, sparsity_type, block_size=(8, 4)):
    """Fraction of `weight`'s groups (of this type and block) that are partly zero: 0 for a weight
    pruned with these groups, more when its zeros are whole groups of another block size."""
    view, dims = grid_view(weight.detach(), sparsity_type, block_size)
    if not dims:
        return 0.0
    sizes = group_sizes(weight.shape, sparsity_type, block_size, weight.device)
    padding = math.prod(view.shape[d] for d in dims) - sizes
    zeros = (view == 0).sum(dim=dims, keepdim=True) - padding
    real = (sizes > 0).expand_as(zeros)
    mixed = real & (zeros > 0) & (zeros < sizes)
    return mixed.sum().item() / max(1, real.sum().item())


def expand_groups(keep, weight_shape, sparsity_type, block_size=(8, 4)):
    """Turn a kept-group grid into an elementwise boolean mask of `weight_shape`."""
    ones = torch.ones(weight_shape, dtype=torch.bool, device=keep.device)
    view, _ = grid_view(ones, sparsity_type, block_size)
    return from_grid_view(view & keep, weight_shape, sparsity_type)


def combined_project(weight, rules, block_size=(8, 4), return_keep=False):
    """Several sparsity patterns at once: `weight` times the mask of every `(ratio, sparsity_type)`
    rule, each computed on `weight` itself (the masks multiply; their order does not matter).

    With `return_keep=True` also returns the list of kept-group grids, one per rule.
    """
    rules = list(rules)
    if not rules:
        raise ValueError("combined_project needs at least one (ratio, sparsity_type) rule")
    if len(rules) == 1:
        projected, keep = project(weight, *rules[0], block_size=block_size, return_keep=True)
        return (projected, [keep]) if return_keep else projected
    w = weight.detach()
    keeps = [keep_groups(w, ratio, kind, block_size) for ratio, kind in rules]
    mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    for keep, (ratio, kind) in zip(keeps, rules):
        if ratio > 0:
            mask &= expand_groups(keep, w.shape, kind, block_size)
    projected = (w * mask.to(w.dtype)).add_(0.0)
    return (projected, keeps) if return_keep else projected


# ----------------------------------------------------------------------------- profiles

def available_profiles():
    return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith('.yaml'))


def resolve_profile_path(name_or_path):
    """`c3d_3.57x` -> `profiles/c3d_3.57x.yaml`; a path to an existing file is taken as it is."""
    if os.path.isfile(name_or_path):
        return name_or_path
    path = os.path.join(PROFILE_DIR, name_or_path + ('' if name_or_path.endswith('.yaml') else '.yaml'))
    if os.path.isfile(path):
        return path
    close = difflib.get_close_matches(os.path.basename(name_or_path), available_profiles(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise FileNotFoundError(
        f"profile {name_or_path!r} not found (looked for {name_or_path} and {path}); {hint}"
        f"shipped profiles: {', '.join(available_profiles())}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"`{key}` is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                                f"keep one", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_profile(name_or_path, model):
    """Read a YAML profile and return `{parameter name: prune ratio}` with names as the
    (unwrapped) model has them. Keys may carry DataParallel's `module.` prefix or not."""
    path = resolve_profile_path(name_or_path)
    with open(path, encoding='utf-8') as f:
        try:
            doc = yaml.load(f, Loader=_UniqueKeyLoader)   # a SafeLoader: no Python objects
        except yaml.YAMLError as exc:
            raise ValueError(f"profile {path}: not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"profile {path}: not a text YAML file ({exc.reason} at byte {exc.start}); "
                             f"save it as UTF-8") from None
    if not isinstance(doc, dict):
        raise ValueError(f"profile {path}: expected a mapping with a `prune_ratios` section, "
                         f"got {type(doc).__name__}")
    if 'prune_ratios' not in doc:
        raise ValueError(f"profile {path}: no `prune_ratios` section (found: {', '.join(map(str, doc)) or 'nothing'})")
    ratios = doc['prune_ratios']
    if not isinstance(ratios, dict) or not ratios:
        raise ValueError(f"profile {path}: `prune_ratios` must map parameter names to ratios, "
                         f"got {ratios!r}")
    params = dict((strip_module_prefix(n), p) for n, p in model.named_parameters())
    profile = {}
    for key, ratio in ratios.items():
        name = strip_module_prefix(str(key))
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('`' + c + '`' for c in close)}?" if close else ""
            raise KeyError(f"profile {path}: key `{key}` is not a parameter of {type(model).__name__}{hint}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise ValueError(f"profile {path}: ratio of `{key}` must be a number in [0, 1), got {ratio!r}")
        if name in profile:
            raise ValueError(f"profile {path}: `{name}` is listed twice (with and without `module.`)")
        if params[name].dim() < 2:
            raise ValueError(f"profile {path}: `{key}` has shape {tuple(params[name].shape)}; "
                             f"only weights with 2 or more dimensions can be pruned")
        profile[name] = float(ratio)
    return profile


def prunable_parameters(model, prune_ratios):
    """`{name: parameter}` of the model's weights named in the profile, names without `module.`."""
    return {strip_module_prefix(n): p for n, p in model.named_parameters()
            if strip_module_prefix(n) in prune_ratios}


def profile_pairs(prune_ratios, sparsity_type):
    """`[(profile, sparsity type), ...]` from one profile and type, or from a list of profiles
    with a list of as many types (or one type for all): several profiles pruned at once."""
    profiles = [prune_ratios] if isinstance(prune_ratios, dict) else list(prune_ratios)
    types = [sparsity_type] if isinstance(sparsity_type, str) else list(sparsity_type)
    if len(types) == 1:
        types = types * len(profiles)
    if not profiles or len(types) != len(profiles):
        raise ValueError(f"got {len(profiles)} profiles and {len(types)} sparsity types: give one type per "
                         f"profile (--sparsity-type kgr kgc --config-file A B), or one type for all")
    for kind in types:
        check_sparsity_type(kind)
    return list(zip(profiles, types))


def weight_rules(prune_ratios, sparsity_type):
    """`{weight name: [(ratio, sparsity type), ...]}`: the rules of every profile that lists the
    weight, in profile order (see `profile_pairs`; `combined_project` applies them)."""
    rules = {}
    for profile, kind in profile_pairs(prune_ratios, sparsity_type):
        for name, ratio in profile.items():
            rules.setdefault(name, []).append((ratio, kind))
    return rules


def check_rules(params, rules, block_size):
    """Refuse, naming the weight, a rule that `project` would refuse (before any work is done)."""
    for name, w in params.items():
        for ratio, kind in rules[name]:
            try:
                _check(w, ratio, kind, block_size)
            except ValueError as exc:
                raise ValueError(f"`{name}` at ratio {ratio} ({kind}): {exc}") from None


def check_block_size(shapes, block_size):
    """Refuse a block larger than every one of the weight `shapes` it is to cut: its padding
    would dwarf the weights (`10000 10000` would allocate terabytes)."""
    gm, gn = block_size
    shapes = [s for s in shapes if len(s) >= 2]
    if not shapes:
        return
    most_o, most_i = max(s[0] for s in shapes), max(s[1] for s in shapes)
    if gm > most_o or gn > most_i:
        raise ValueError(f"--connectivity-block-size {gm} {gn} is larger than every pruned weight (at most "
                         f"{most_o} filters x {most_i} input channels): use gM <= {most_o} and gN <= {most_i} "
                         f"(gM = {most_o} puts all filters of the widest layer in one block)")


# ----------------------------------------------------------------------------- ADMM

class _Penalty(torch.autograd.Function):
    """0.5 * rho * sum_i ||W_i * M_i + C_i||^2 with its gradient rho * (W_i * M_i + C_i).

    M and C are fixed between Z/U updates, so they are precomputed there; per batch this costs
    one fused multiply-add, one dot product and one scaled copy per weight.
    """

    @staticmethod
    def forward(ctx, rho, masks, offsets, *weights):
        residuals = [torch.addcmul(c, w, m) if m is not None else w + c
                     for w, m, c in zip(weights, masks, offsets)]
        ctx.rho, ctx.residuals = rho, residuals
        total = sum(torch.dot(r.flatten(), r.flatten()) for r in residuals)
        return 0.5 * rho * total

    @staticmethod
    def backward(ctx, grad):
        scale = ctx.rho * grad
        return (None, None, None) + tuple(r.mul_(scale) for r in ctx.residuals)


class Regulariser:
    """What the training loop sees of a pruning regulariser (ADMM, Reweighted): `start()` at the
    start of a stage, `on_epoch(e)` before epoch e, `loss()` added to every batch, `report()` per
    weight, `tensors()` that data-parallel processes must agree on, and its state for --resume."""
    UPDATED = 'updated'

    def start(self):
        raise NotImplementedError

    def update(self):
        raise NotImplementedError

    def due(self, epoch):
        raise NotImplementedError

    def reports_after(self, epoch):
        """Whether the loop logs `report()` after `epoch` (and always after the last)."""
        return self.due(epoch + 1)

    def on_epoch(self, epoch):
        """Run the periodic update if `epoch` (1-based) is due; return whether it was."""
        if self.due(epoch):
            self.update()
            return True
        return False


class ADMM(Regulariser):
    """Z and U for the profiled weights, and the augmented-Lagrangian penalty.

    `prune_ratios` / `sparsity_type` are one profile and type, or lists of both (several
    profiles at once: Z = W times every profile's mask, see `combined_project`).
    `penalty='seed'` pulls only the entries where Z is zero toward -U (what the original
    trains with); `penalty='textbook'` is `0.5 * rho * ||W - Z + U||^2` over every entry.
    """

    def __init__(self, model, prune_ratios, rho, sparsity_type='blk-kgs', block_size=(8, 4), penalty='seed',
                 update_every=10):
        if penalty not in ('seed', 'textbook'):
            raise ValueError(f"ADMM penalty must be 'seed' or 'textbook', got {penalty!r}")
        self.rules = weight_rules(prune_ratios, sparsity_type)
        self.params = prunable_parameters(model, self.rules)
        check_rules(self.params, self.rules, block_size)
        self.rho, self.block_size, self.penalty = rho, tuple(block_size), penalty
        self.update_every = update_every
        self.Z, self.U = {}, {}
        self._masks, self._offsets = [], []

    @torch.no_grad()
    def initialize(self):
        """Start of a stage: Z = project(W), U = 0."""
        for name, w in self.params.items():
            self.Z[name] = self._project(name, w)
            self.U[name] = torch.zeros_like(w)
        self._precompute()

    start = initialize
    UPDATED = 'Z and U updated'

    def tensors(self):
        """Everything that must agree between data-parallel processes."""
        return list(self.Z.values()) + list(self.U.values())

    def due(self, epoch):
        """Whether Z and U are updated at the first batch of `epoch` (1-based): every
        `update_every` epochs, never at the first."""
        return epoch != 1 and (epoch - 1) % self.update_every == 0

    def reports_after(self, epoch):
        """The original logs `Weight < 1e-4` after every epoch e with (e - 1) % admm_epochs == 0."""
        return (epoch - 1) % self.update_every == 0

    @torch.no_grad()
    def update(self):
        """Periodic step: Z = project(W + U), then U = U + W - Z."""
        for name, w in self.params.items():
            self.Z[name] = self._project(name, w + self.U[name])
            self.U[name].add_(w).sub_(self.Z[name])
        self._precompute()

    def _project(self, name, w):
        return combined_project(w.detach(), self.rules[name], self.block_size)

    def _precompute(self):
        if self.penalty == 'seed':
            self._masks = [(self.Z[n] == 0).to(w.dtype) for n, w in self.params.items()]
            self._offsets = [self.U[n] * m for n, m in zip(self.params, self._masks)]
        else:
            self._masks = [None] * len(self.params)
            self._offsets = [self.U[n] - self.Z[n] for n in self.params]

    def loss(self):
        """The ADMM penalty for the current weights (a scalar with a gradient)."""
        if not self._offsets:
            raise RuntimeError("ADMM.loss() before initialize()")
        return _Penalty.apply(self.rho, self._masks, self._offsets, *self.params.values())

    def state_dict(self):
        return {'rho': self.rho, 'Z': dict(self.Z), 'U': dict(self.U)}

    def load_state_dict(self, state):
        missing = set(self.params) - set(state['Z'])
        if missing:
            raise KeyError(f"ADMM state lacks Z for {', '.join(sorted(missing))}: was it saved with another profile?")
        for name, w in self.params.items():
            self.Z[name] = state['Z'][name].to(w.device, w.dtype)
            self.U[name] = state['U'][name].to(w.device, w.dtype)
        self.rho = state.get('rho', self.rho)
        self._precompute()

    @torch.no_grad()
    def report(self, threshold=1e-4):
        """Per weight: fraction of entries with |w| < threshold, and ||W - Z|| / ||W||."""
        rows = {}
        for name, w in self.params.items():
            norm = torch.linalg.vector_norm(w).item()
            dist = torch.linalg.vector_norm(w - self.Z[name]).item() if name in self.Z else float('nan')
            rows[name] = {'near_zero': (w.abs() < threshold).float().mean().item(),
                          'distance': dist / norm if norm > 0 else 0.0}
        return rows


# ----------------------------------------------------------------------------- reweighted regularisation

class Reweighted(Regulariser):
    """The RT3D paper's reweighted group regularisation: `penalty * sum_g alpha_g * ||w_g||_2`
    over the groups of every profiled weight, `alpha_g = 1 / (||w_g||^2 + eps)` frozen between
    `reweight()` calls, so groups that are already small are pushed hardest toward zero.

    Groups are those of `sparsity_type` (lists of profiles and types as in `ADMM`: a weight
    listed by several profiles gets every profile's groups). Weights at ratio 0 are left alone.
    """

    def __init__(self, model, prune_ratios, penalty=1e-6, sparsity_type='blk-kgs', block_size=(8, 4), eps=1e-6,
                 milestones=()):
        if eps <= 0:
            raise ValueError(f"reweighting eps must be positive (it keeps alpha finite at zero groups), got {eps}")
        rules = weight_rules(prune_ratios, sparsity_type)
        check_rules(prunable_parameters(model, rules), rules, block_size)
        kinds = {name: [kind for ratio, kind in listed if ratio > 0] for name, listed in rules.items()}
        self.rules = {name: listed for name, listed in kinds.items() if listed}
        self.params = prunable_parameters(model, self.rules)
        self.penalty, self.block_size, self.eps = penalty, tuple(block_size), eps
        # The follow-up divides the penalty by the number of profiles, so two profiles at once
        # do not regularise twice as hard as one.
        self.profiles = len(profile_pairs(prune_ratios, sparsity_type))
        self.milestones = tuple(milestones)
        self.alpha = {}

    def _norms(self, w, kind):
        """L2 norm of every group of `w`, as the group grid (differentiable)."""
        view, dims = grid_view(w, kind, self.block_size)
        if not dims:
            return view.abs()
        # vector_norm's gradient at an all-zero group is 0, not NaN (it masks norm == 0).
        return torch.linalg.vector_norm(view, dim=dims, keepdim=True)

    @torch.no_grad()
    def reweight(self):
        """alpha_g = 1 / (||w_g||^2 + eps) from the current weights (0 for groups of padding only)."""
        for name, w in self.params.items():
            self.alpha[name] = []
            for kind in self.rules[name]:
                norms = self._norms(w.detach().float(), kind)
                real = group_sizes(w.shape, kind, self.block_size, w.device) > 0
                self.alpha[name].append((real / (norms.square() + self.eps)).to(w.dtype))

    start = update = reweight
    UPDATED = 'group weights recomputed'

    def tensors(self):
        """Everything that must agree between data-parallel processes."""
        return [a for alphas in self.alpha.values() for a in alphas]

    def due(self, epoch):
        """Whether alpha is recomputed at the first batch of `epoch` (1-based): the epoch after a
        milestone, as the follow-up does."""
        return epoch > 1 and epoch - 1 in self.milestones

    def loss(self):
        """`penalty / profiles * sum_g alpha_g ||w_g||` for the current weights (a scalar with a
        gradient; none flows into alpha)."""
        if not self.alpha:
            raise RuntimeError("Reweighted.loss() before reweight()")
        total = sum((alpha * self._norms(w, kind)).sum()
                    for name, w in self.params.items()
                    for kind, alpha in zip(self.rules[name], self.alpha[name]))
        return self.penalty / self.profiles * total

    def state_dict(self):
        return {'penalty': self.penalty, 'eps': self.eps, 'alpha': {n: list(a) for n, a in self.alpha.items()}}

    def load_state_dict(self, state):
        alpha = state['alpha']
        missing = set(self.params) - set(alpha)
        if missing:
            raise KeyError(f"reweighting state lacks alpha for {', '.join(sorted(missing))}: "
                           f"was it saved with another profile?")
        for name, w in self.params.items():
            own = [tuple(self._norms(torch.empty(w.shape, device='meta'), k).shape) for k in self.rules[name]]
            saved = [tuple(a.shape) for a in alpha[name]]
            if saved != own:
                raise ValueError(f"reweighting state: alpha of {name} has group grids {saved}, this profile and "
                                 f"sparsity type give {own}: was it saved with another --sparsity-type or block size?")
            self.alpha[name] = [a.to(w.device, w.dtype) for a in alpha[name]]
        self.penalty, self.eps = state.get('penalty', self.penalty), state.get('eps', self.eps)

    @torch.no_grad()
    def report(self, threshold=1e-4):
        """Per weight: fraction of entries with |w| < threshold, and fraction of groups whose
        RMS (norm / sqrt(entries)) is below it (over the groups of all its types)."""
        rows = {}
        for name, w in self.params.items():
            small = total = 0
            for kind in self.rules[name]:
                members = group_sizes(w.shape, kind, self.block_size, w.device)
                rms = self._norms(w.float(), kind) / members.clamp(min=1).sqrt()
                real = (members > 0).expand_as(rms)
                small += (real & (rms < threshold)).sum().item()
                total += real.sum().item()
            rows[name] = {'near_zero': (w.abs() < threshold).float().mean().item(), 'small_groups': small / total}
        return rows


# ----------------------------------------------------------------------------- hard pruning and masks

@torch.no_grad()
def hard_prune(model, prune_ratios, sparsity_type='blk-kgs', block_size=(8, 4)):
    """Project every profiled weight in place; return `{name: kept-group grid}` (bool, on CPU).

    With lists of profiles and types the masks multiply (`combined_project`) and the result is a
    list: one `{name: kept-group grid}` per profile, each grid computed on the unpruned weight.
    """
    pairs = profile_pairs(prune_ratios, sparsity_type)
    rules = weight_rules(prune_ratios, sparsity_type)
    params = prunable_parameters(model, rules)
    check_rules(params, rules, block_size)
    kept = [{} for _ in pairs]
    for name, w in params.items():
        projected, keeps = combined_project(w, rules[name], block_size, return_keep=True)
        w.copy_(projected)
        listing = (i for i, (profile, _) in enumerate(pairs) if name in profile)
        for i, keep in zip(listing, keeps):
            kept[i][name] = keep.cpu()
    return kept[0] if isinstance(prune_ratios, dict) else kept


class Masks:
    """Gradient masks that keep zero weights at zero: `mask = (W != 0)`, multiplied into the
    gradients after each backward pass. Only parameters that have zeros get a mask."""

    def __init__(self, model, weights_only=False):
        self.params, self.masks = [], []
        with torch.no_grad():
            for _, p in model.named_parameters():
                if weights_only and p.dim() < 2:
                    continue
                mask = p != 0
                if not bool(mask.all()):
                    self.params.append(p)
                    self.masks.append(mask.to(p.dtype))

    def __len__(self):
        return len(self.params)

    @torch.no_grad()
    def apply_to_grads(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        masks = [m for p, m in zip(self.params, self.masks) if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, masks)


@torch.no_grad()
def sparsity_report(model, prune_ratios=None):
    """Per parameter (all of dim >= 2, or those of the profile): zeros / size."""
    rows = {}
    for n, p in model.named_parameters():
        name = strip_module_prefix(n)
        if (prune_ratios is None and p.dim() >= 2) or (prune_ratios is not None and name in prune_ratios):
            rows[name] = (p == 0).sum().item() / p.numel()
    return rows
