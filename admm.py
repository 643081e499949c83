"""Structured-sparsity projections, ADMM state, hard pruning and retraining masks.

Everything that touches weights works on a `(groups x members)` view of the weight, so no
Python loop runs over blocks, groups or elements. The rules are those of ALGORITHM.md
section 2; `project()` is the one place they live.
"""
import difflib
import math
import os

import torch
import yaml

from models import strip_module_prefix

BLOCK_TYPES = ('blk-kgs', 'blk-vanilla')
SPARSITY_TYPES = BLOCK_TYPES + ('filter', 'irregular')
PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'profiles')


# ----------------------------------------------------------------------------- groups

def _blocked(weight, block_size):
    """Zero-pad `(O, I, ...)` to multiples of the block and view it as `(O/gM, gM, I/gN, gN, K)`."""
    gm, gn = block_size
    o, i = weight.shape[:2]
    w = weight.reshape(o, i, -1)
    po, pi = -o % gm, -i % gn
    if po or pi:
        w = torch.nn.functional.pad(w, (0, 0, 0, pi, 0, po))
    return w.view((o + po) // gm, gm, (i + pi) // gn, gn, w.shape[-1])


def _unblocked(blocks, shape):
    """Inverse of `_blocked`: crop the padding and restore `shape`."""
    ob, gm, ib, gn, k = blocks.shape
    w = blocks.reshape(ob * gm, ib * gn, k)
    return w[:shape[0], :shape[1]].reshape(shape)


def _check(weight, ratio, sparsity_type, block_size):
    if sparsity_type not in SPARSITY_TYPES:
        raise ValueError(f"unknown sparsity type {sparsity_type!r}; choose one of {', '.join(SPARSITY_TYPES)}")
    if weight.dim() < 2 and sparsity_type != 'irregular':
        raise ValueError(f"{sparsity_type} pruning needs a weight with at least 2 dimensions, got shape "
                         f"{tuple(weight.shape)}")
    if not 0 <= ratio < 1:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    if sparsity_type in BLOCK_TYPES and (len(block_size) != 2 or min(block_size) < 1):
        raise ValueError(f"block size must be two positive integers (gM gN), got {block_size}")


def _grid_view(weight, sparsity_type, block_size):
    """`(view, dims)`: a broadcastable view of the weight and the dims that make up one group.

    Reducing `view` over `dims` (keepdim) gives the group grid; the grid broadcasts back onto
    `view`. Blocks are views of the (padded) weight, so no permuted copy is ever made.
    """
    if sparsity_type == 'irregular':
        return weight, ()
    if sparsity_type == 'filter':
        return weight.reshape(weight.shape[0], -1), (1,)
    b = _blocked(weight, block_size)                       # (Ob, gM, Ib, gN, K)
    return b, ((1, 3, 4) if sparsity_type == 'blk-vanilla' else (1, 3))


def _from_view(view, weight_shape, sparsity_type):
    if sparsity_type in BLOCK_TYPES:
        return _unblocked(view, weight_shape)
    return view.reshape(weight_shape)


def group_scores(weight, sparsity_type, block_size=(8, 4)):
    """Score of every group, laid out as the group grid (see `keep_groups`):
    L2 norm / sqrt(max(1, non-zeros in the group))."""
    view, dims = _grid_view(weight, sparsity_type, block_size)
    view = view.float()
    if not dims:                                           # one weight per group
        return view.abs()
    norms = view.square().sum(dim=dims, keepdim=True).sqrt_()
    if torch.count_nonzero(weight) == weight.numel():
        # The common case (no zeros but the padding's) skips a full counting pass.
        nonzeros = _real_members(weight.shape, sparsity_type, block_size, weight.device)
    else:
        nonzeros = (view != 0).float().sum(dim=dims, keepdim=True)
    return norms / nonzeros.clamp(min=1).sqrt().expand_as(norms)


def _real_members(shape, sparsity_type, block_size, device):
    """Entries of each group that are not padding, broadcastable to the group grid."""
    k = math.prod(shape[2:])
    if sparsity_type == 'filter':
        return torch.full((1, 1), float(shape[1] * k), device=device)
    (gm, gn), (o, i) = block_size, shape[:2]
    rows = (o - gm * torch.arange(-(-o // gm), device=device)).clamp(max=gm).float()
    cols = (i - gn * torch.arange(-(-i // gn), device=device)).clamp(max=gn).float()
    members = rows.view(-1, 1, 1, 1, 1) * cols.view(1, 1, -1, 1, 1)
    return members * k if sparsity_type == 'blk-vanilla' else members


def percentile(values, q):
    """numpy's default `percentile(values, q)`: linear interpolation between order statistics."""
    flat = values.flatten()
    pos = q / 100 * (flat.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, flat.numel() - 1)
    below = torch.kthvalue(flat, lo + 1).values.double()
    above = torch.kthvalue(flat, hi + 1).values.double() if hi != lo else below
    return below + (above - below) * (pos - lo)


def keep_groups(weight, ratio, sparsity_type, block_size=(8, 4)):
    """Boolean group grid, True for the groups `project` keeps.

    The grid is the kept-group index: `(O/gM, 1, I/gN, 1, K)` for blk-kgs,
    `(O/gM, 1, I/gN, 1, 1)` for blk-vanilla, `(O, 1)` for filter and the weight's own shape
    for irregular (block counts rounded up).
    """
    _check(weight, ratio, sparsity_type, block_size)
    scores = group_scores(weight.detach(), sparsity_type, block_size)
    if ratio == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return scores > percentile(scores, 100 * ratio)


def project(weight, ratio, sparsity_type, block_size=(8, 4), return_keep=False):
    """Project `weight` onto the sparsity pattern: the groups scoring at or below the
    `100*ratio`-th percentile become zero, the rest is untouched (ALGORITHM.md section 2).

    With `return_keep=True` also returns the boolean kept-group grid (see `keep_groups`).
    """
    keep = keep_groups(weight, ratio, sparsity_type, block_size)
    w = weight.detach()
    if ratio == 0:
        projected = w.clone()
    else:
        view, _ = _grid_view(w, sparsity_type, block_size)
        # A float mask multiplies several times faster than a bool one (no type promotion).
        projected = _from_view(view * keep.to(w.dtype), w.shape, sparsity_type)
    return (projected, keep) if return_keep else projected


def expand_groups(keep, weight_shape, sparsity_type, block_size=(8, 4)):
    """Turn a kept-group grid into an elementwise boolean mask of `weight_shape`."""
    ones = torch.ones(weight_shape, dtype=torch.bool, device=keep.device)
    view, _ = _grid_view(ones, sparsity_type, block_size)
    return _from_view(view & keep, weight_shape, sparsity_type)


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


def load_profile(name_or_path, model):
    """Read a YAML profile and return `{parameter name: prune ratio}` with names as the
    (unwrapped) model has them. Keys may carry DataParallel's `module.` prefix or not."""
    path = resolve_profile_path(name_or_path)
    with open(path) as f:
        try:
            doc = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ValueError(f"profile {path}: not valid YAML: {exc}") from None
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


class ADMM:
    """Z and U for the profiled weights, and the augmented-Lagrangian penalty.

    `penalty='seed'` pulls only the entries where Z is zero toward -U (what the original
    trains with); `penalty='textbook'` is `0.5 * rho * ||W - Z + U||^2` over every entry.
    """

    def __init__(self, model, prune_ratios, rho, sparsity_type='blk-kgs', block_size=(8, 4), penalty='seed'):
        if penalty not in ('seed', 'textbook'):
            raise ValueError(f"ADMM penalty must be 'seed' or 'textbook', got {penalty!r}")
        self.params = prunable_parameters(model, prune_ratios)
        self.prune_ratios = dict(prune_ratios)
        self.rho, self.sparsity_type, self.block_size, self.penalty = rho, sparsity_type, tuple(block_size), penalty
        self.Z, self.U = {}, {}
        self._masks, self._offsets = [], []

    @torch.no_grad()
    def initialize(self):
        """Start of a stage: Z = project(W), U = 0."""
        for name, w in self.params.items():
            self.Z[name] = self._project(name, w)
            self.U[name] = torch.zeros_like(w)
        self._precompute()

    @torch.no_grad()
    def update(self):
        """Periodic step: Z = project(W + U), then U = U + W - Z."""
        for name, w in self.params.items():
            self.Z[name] = self._project(name, w + self.U[name])
            self.U[name].add_(w).sub_(self.Z[name])
        self._precompute()

    def _project(self, name, w):
        return project(w.detach(), self.prune_ratios[name], self.sparsity_type, self.block_size)

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


# ----------------------------------------------------------------------------- hard pruning and masks

@torch.no_grad()
def hard_prune(model, prune_ratios, sparsity_type='blk-kgs', block_size=(8, 4)):
    """Project every profiled weight in place; return `{name: kept-group grid}` (bool, on CPU)."""
    kept = {}
    for name, w in prunable_parameters(model, prune_ratios).items():
        projected, keep = project(w, prune_ratios[name], sparsity_type, block_size, return_keep=True)
        w.copy_(projected)
        kept[name] = keep.cpu()
    return kept


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
    def apply_to_weights(self):
        if self.params:
            torch._foreach_mul_(self.params, self.masks)


@torch.no_grad()
def sparsity_report(model, prune_ratios=None):
    """Per parameter (all of dim >= 2, or those of the profile): zeros / size."""
    rows = {}
    for n, p in model.named_parameters():
        name = strip_module_prefix(n)
        if (prune_ratios is None and p.dim() >= 2) or (prune_ratios is not None and name in prune_ratios):
            rows[name] = (p == 0).sum().item() / p.numel()
    return rows
