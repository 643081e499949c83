"""Slim models: pruned filters removed for real, and files of models rebuilt for speed.

    from models.slim import slim_model, save_model, load_model
    slim = slim_model(model, 'c3d')       # a smaller copy: same outputs as `model` (eval mode) up to rounding
    save_model(slim, 'model.slim.pt', 'c3d', num_classes=101)    # no pickle
    slim = load_model('model.slim.pt')

A filter whose weights are all zero (the `filter` sparsity type) still produces a channel: the
constant its bias, BatchNorm and ReLU make of zero. `slim_model` removes the filter, the channel's
BatchNorm entries and the matching input channels of every consumer (next conv, R(2+1)D's
mid-channels, S3D's branch concatenations, the classifier), and adds the constant's contribution
back: into the consumer's bias where the consumer has no zero padding, else as a precomputed
border-aware correction (`SlimConv3d`). Channels that every consumer ignores (all-zero input
columns) go too. R(2+1)D's residual streams keep their width: a conv feeding one computes only
its kept filters, and `BatchNormExpand` puts the constants back in place.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ARCHITECTURES, build_model, kgs_cpu
from .sparse_conv import CompiledKGSConv3d, CompiledMaxPool3d, KGSConv3d, _triple, sparse_exec

FORMAT = 'rt3d-model'
VERSION = 1


class SlimConv3d(nn.Conv3d):
    """A Conv3d plus the contribution of removed input channels that held a constant: `const_weight`
    (O, 1, kT, kH, kW) is that constant times their weights, convolved with the zero-padded input's
    support (ones inside, zeros in the padding), so the borders are exact."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer('const_weight', torch.zeros(self.out_channels, 1, *self.kernel_size))
        self._cache = {}

    def correction(self, size, like):
        """The constant channels' contribution for inputs of spatial `size`, shaped (1, O, T', H', W')."""
        key = (tuple(size), like.dtype, like.device)
        if key in self._cache:
            return self._cache[key]
        # Along a dimension without padding every position sees the whole kernel: size it to one output.
        reduced = [n if p else d * (k - 1) + 1 for n, p, k, d in zip(size, self.padding, self.kernel_size,
                                                                      self.dilation)]
        ones = torch.ones((1, 1, *reduced), dtype=like.dtype, device=like.device)
        value = F.conv3d(ones, self.const_weight.to(like.dtype), None, self.stride, self.padding, self.dilation)
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            self._cache = {key: value}
        return value

    def forward(self, x):
        return super().forward(x) + self.correction(x.shape[2:], x)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_cache'] = {}
        return state


class BatchNormExpand(nn.BatchNorm3d):
    """BatchNorm over the kept channels of a conv that feeds a residual sum, then the full width back:
    removed channels take `fill` (what the BatchNorm makes of a zero conv output)."""

    def __init__(self, num_features, full_features, eps=1e-5, momentum=0.1):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.full_features = full_features
        # Output channel c is channel index[c] of cat([kept channels, removed channels' constants]).
        self.register_buffer('index', torch.arange(full_features))
        self.register_buffer('fill', torch.zeros(full_features - num_features))
        self._cache = {}

    def forward(self, x):
        if self.training or torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            y = super().forward(x)
            fill = self.fill.view(1, -1, 1, 1, 1).to(y.dtype).expand(y.shape[0], -1, *y.shape[2:])
            return torch.index_select(torch.cat([y, fill], dim=1), 1, self.index)
        # Eval: the normalised kept channels and the constants' rows go into one buffer, and the output
        # is one gather of whole rows (a copy per channel), not a concatenation and a strided gather.
        n, k = x.shape[:2]
        rows, index = self._rows(x)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        torch.addcmul(shift.view(1, k, 1), x.reshape(n, k, -1), scale.view(1, k, 1),
                      out=rows[:n * k].view(n, k, -1))
        return torch.index_select(rows, 0, index).view(n, self.full_features, *x.shape[2:])

    def _rows(self, x):
        key = (tuple(x.shape), x.dtype, x.device, self.fill._version, self.index._version,
               torch.is_inference_mode_enabled())
        if key not in self._cache:
            n, k, length = x.shape[0], x.shape[1], x[0, 0].numel()
            rows = torch.empty((n * k + len(self.fill), length), dtype=x.dtype, device=x.device)
            rows[n * k:] = self.fill.to(x.dtype)[:, None]
            kept = self.index < k
            sample = torch.arange(n, device=x.device)[:, None]
            index = torch.where(kept, sample * k + self.index, n * k + self.index - k).flatten()
            self._cache = {key: (rows, index)}
        return self._cache[key]

    def __getstate__(self):
        state = self.__dict__.copy()
        state['_cache'] = {}
        return state




# ----------------------------------------------------------------------------- slimming

def _zero_filters(module):
    return (module.weight.detach().flatten(1) == 0).all(dim=1)


def _constants(model, producer, post_ops):
    """What each filter's channel holds when the filter is all zeros: post-ops applied to its bias (or 0)."""
    module = model.get_submodule(producer)
    n = module.weight.shape[0]
    v = module.bias.detach().clone() if module.bias is not None else module.weight.new_zeros(n)
    v = v.view(1, n, 1, 1, 1)
    for op in post_ops:
        v = torch.relu(v) if op == 'relu' else model.get_submodule(op)(v)
    return v.flatten()


def _ignored_inputs(model, consumers, n):
    """Channels (of n) whose input weights are zero in every consumer."""
    ignored = torch.ones(n, dtype=torch.bool)
    for name, per_channel in consumers:
        w = model.get_submodule(name).weight.detach()
        ignored &= (w.reshape(w.shape[0], n, -1) == 0).all(dim=2).all(dim=0).cpu()
    return ignored


@torch.no_grad()
def slim_model(model, arch):
    """A copy of `model` (in eval mode) with every removable channel removed; see the module docstring.

    Outputs equal the eval-mode model's up to float rounding. Returns the new model; its
    `slim_report` attribute lists, per producing layer, the channels kept and removed.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"slim_model knows {', '.join(ARCHITECTURES)}; got arch {arch!r}")
    model = copy.deepcopy(model).eval()
    out_keep, in_keep, in_const = {}, {}, {}     # layer -> kept outputs; kept inputs; (removed inputs, constants)
    bn_keep, expand = {}, {}
    report = {}
    for link in ARCHITECTURES[arch].links(model):
        widths = [model.get_submodule(p).weight.shape[0] for p, _ in link.producers]
        total = sum(widths)
        zero = torch.cat([_zero_filters(model.get_submodule(p)).cpu() for p, _ in link.producers])
        const = torch.cat([_constants(model, p, ops).cpu() for p, ops in link.producers])
        removable = zero if link.exact else zero & (const == 0)
        if not link.residual:
            ignored = _ignored_inputs(model, link.consumers, total)
            removable = removable | ignored
            const = torch.where(ignored & ~zero, torch.zeros_like(const), const)   # read by nobody: no constant
        offset = 0
        kept_all = []
        for (producer, ops), width in zip(link.producers, widths):
            gone = removable[offset:offset + width]
            if bool(gone.all()):
                gone = gone.clone()
                gone[0] = False          # a layer keeps at least one channel (its weights may be zero)
            keep = torch.nonzero(~gone).flatten()
            out_keep[producer] = keep
            for op in ops:
                if op != 'relu':
                    bn_keep[op] = keep
            if link.residual:
                expand[ops[0]] = (keep, torch.nonzero(gone).flatten(), const[offset:offset + width][gone], width)
            kept_all.append(keep + offset)
            report[producer] = {'channels': width, 'kept': len(keep)}
            offset += width
        kept_all = torch.cat(kept_all)
        removed = torch.ones(total, dtype=torch.bool)
        removed[kept_all] = False
        for consumer, per_channel in link.consumers:
            expand_idx = lambda idx, m=per_channel: (idx[:, None] * m + torch.arange(m)).flatten()  # noqa: E731
            in_keep[consumer] = expand_idx(kept_all)
            gone = torch.nonzero(removed).flatten()
            in_const[consumer] = (expand_idx(gone), const[gone].repeat_interleave(per_channel))
    for name in set(out_keep) | set(in_keep):
        _replace_layer(model, name, out_keep.get(name), in_keep.get(name), in_const.get(name))
    for name, keep in bn_keep.items():
        _replace_batchnorm(model, name, keep, expand.get(name))
    model.slim_report = report
    return model


def _replace_layer(model, name, out_idx, in_idx, const):
    old = model.get_submodule(name)
    w = old.weight.detach()
    b = old.bias.detach() if old.bias is not None else None
    extra = None                                        # the removed constant inputs' weights, times the constants
    if const is not None and len(const[0]) and bool((const[1] != 0).any()):
        removed, values = const
        extra = torch.einsum('oj...,j->o...', w[:, removed], values.to(w.dtype))
        if not bool((extra != 0).any()):
            extra = None
    if in_idx is not None:
        w = w[:, in_idx]
    if out_idx is not None:
        w, b = w[out_idx], (b[out_idx] if b is not None else None)
        extra = extra[out_idx] if extra is not None else None
    if isinstance(old, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None or extra is not None)
        bias = (b if b is not None else w.new_zeros(w.shape[0])) + (extra if extra is not None else 0)
    else:
        padded = any(_triple(old.padding))
        cls = SlimConv3d if extra is not None and padded else nn.Conv3d
        folded = extra is not None and not padded       # no padding: every output sees every kernel position
        new = cls(w.shape[1], w.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
                  bias=b is not None or folded)
        bias = b
        if folded:
            bias = (b if b is not None else w.new_zeros(w.shape[0])) + extra.flatten(1).sum(dim=1)
        if cls is SlimConv3d:
            new.const_weight.copy_(extra.unsqueeze(1))
    new = new.to(w.device, w.dtype)
    new.weight.copy_(w)
    if new.bias is not None:
        new.bias.copy_(bias)
    _set_module(model, name, new)


def _replace_batchnorm(model, name, keep, expand):
    old = model.get_submodule(name)
    if expand is None:
        new = nn.BatchNorm3d(len(keep), eps=old.eps, momentum=old.momentum)
    else:
        _, removed, fill, full = expand
        new = BatchNormExpand(len(keep), full, eps=old.eps, momentum=old.momentum)
        new.index.copy_(torch.argsort(torch.cat([keep, removed])))
        new.fill.copy_(fill)
    new = new.to(old.weight.device, old.weight.dtype)
    for attr in ('weight', 'bias', 'running_mean', 'running_var'):
        getattr(new, attr).copy_(getattr(old, attr).detach()[keep.to(old.weight.device)])
    new.num_batches_tracked.copy_(old.num_batches_tracked)
    new.eval()
    _set_module(model, name, new)


def _set_module(model, name, module):
    parent, _, leaf = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def fold_batchnorm(model, arch):
    """Fold, in place, every eval-mode BatchNorm3d that directly follows a plain Conv3d into that conv's
    weight and bias (the BatchNorm becomes nn.Identity): the same outputs up to float rounding, one pass
    over the activations fewer. Per-filter scales keep a pruned weight's zeros. Returns the folded
    BatchNorms, `{batchnorm name: conv name}`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"fold_batchnorm knows {', '.join(ARCHITECTURES)}; got arch {arch!r}")
    folded = {}
    for link in ARCHITECTURES[arch].links(model):
        for producer, ops in link.producers:
            if not ops or ops[0] == 'relu' or ops[0] in folded:
                continue
            conv, bn = model.get_submodule(producer), model.get_submodule(ops[0])
            if type(conv) is not nn.Conv3d or type(bn) is not nn.BatchNorm3d or bn.training \
                    or bn.running_var is None:
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.affine:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
            new = nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, bias=True).to(conv.weight.device, conv.weight.dtype)
            new.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1, 1))
            new.bias.copy_(shift + (conv.bias * scale if conv.bias is not None else 0))
            _set_module(model, producer, new)
            _set_module(model, ops[0], nn.Identity())
            folded[ops[0]] = producer
    return folded


def compile_pools(model):
    """Swap, in place, every nn.MaxPool3d of a CPU model for a CompiledMaxPool3d (same arguments) where the
    compiled kernel is available; returns their names."""
    pools = [(n, m) for n, m in model.named_modules() if type(m) is nn.MaxPool3d and not m.return_indices]
    params = next(model.parameters(), None)
    if not pools or (params is not None and params.device.type != 'cpu') or not kgs_cpu.available():
        return []
    for name, m in pools:
        _set_module(model, name, CompiledMaxPool3d(m.kernel_size, m.stride, m.padding, m.dilation,
                                                   ceil_mode=m.ceil_mode))
    return [n for n, _ in pools]


def fuse_relu(model):
    """Make, in place, the ReLU after each CompiledKGSConv3d part of that conv: the kernel applies it as it
    stores its outputs, one pass over them fewer. An nn.ReLU that follows the conv in an nn.Sequential
    (BatchNorms folded away, nested Sequentials ending in the conv included) becomes nn.Identity; a ReLU
    a module's forward applies (C3D's, S3D's; listed in its `fusable_relus`, models.fusion) is left out by
    that forward once the conv has it, where only an nn.Identity lies between. R(2+1)D's ReLUs after the
    residual sums stay. Returns the ReLUs fused: Sequential positions, or `<conv>.relu` for the others."""
    def last(module):              # the module whose output a Sequential returns
        while isinstance(module, nn.Sequential):
            inner = [m for m in module if not isinstance(m, nn.Identity)]
            if not inner:
                return None
            module = inner[-1]
        return module

    fused = []
    for name, seq in model.named_modules():
        prefix = f'{name}.' if name else ''
        for conv_name, between in getattr(seq, 'fusable_relus', ()):
            conv = getattr(seq, conv_name)
            if type(conv) is CompiledKGSConv3d and not conv.relu and \
                    (between is None or isinstance(getattr(seq, between), nn.Identity)):
                conv.relu = True
                fused.append(f'{prefix}{conv_name}.relu')
        if not isinstance(seq, nn.Sequential):
            continue
        before = None
        for index, module in enumerate(seq):
            if isinstance(module, nn.ReLU):
                conv = last(before) if before is not None else None
                if type(conv) is CompiledKGSConv3d and not conv.relu:
                    conv.relu = True
                    seq[index] = nn.Identity()
                    fused.append(f'{prefix}{index}')
                    continue
            if not isinstance(module, nn.Identity):
                before = module
    return fused


def fuse_pool(model):
    """Make, in place, a max pool of kernel and stride (1, 2, 2) (no padding, dilation or ceil mode) that
    a module's forward applies to a CompiledKGSConv3d's output, past its ReLU (listed in the module's
    `fusable_pools` as `(conv, pool)`, models.fusion), part of the conv: the kernel pools its outputs as
    it stores them, a quarter of the stores and no pass of the pool (C3D's conv1 and pool1), and the pool
    becomes nn.Identity. A ReLU after the pool equals the ReLU before it. Returns the pools fused."""
    fused = []
    for name, module in model.named_modules():
        for conv_name, pool_name in getattr(module, 'fusable_pools', ()):
            conv, pool = getattr(module, conv_name), getattr(module, pool_name)
            if type(conv) is CompiledKGSConv3d and not conv.pool and isinstance(pool, nn.MaxPool3d) \
                    and _triple(pool.kernel_size) == (1, 2, 2) and _triple(pool.stride) == (1, 2, 2) \
                    and _triple(pool.padding) == (0, 0, 0) and _triple(pool.dilation) == (1, 1, 1) \
                    and not pool.ceil_mode and not pool.return_indices:
                conv.pool = True
                setattr(module, pool_name, nn.Identity())
                fused.append(f'{name}.{pool_name}' if name else pool_name)
    return fused


def faster_model(model, arch, sparsity_type, block_size=(8, 4), example_input=None):
    """`(model, report)`: the fastest form this package has for a pruned model (eval mode, same outputs).

    `sparsity_type` is the pruning's type, or the list of them (several profiles at once). With
    `filter` among them, a slim copy (`slim_model`); with a block type among them, pruned convs of the
    (slim) model swapped in place for the compiled KGS kernel (or KGSConv3d where it cannot be built)
    where that is faster (`sparse_exec` with block rows of `block_size[0]` filters, measured on
    `example_input` if given). Always, eval-mode BatchNorms folded into the convs before them
    (`fold_batchnorm`) and, on the CPU with the compiled kernel, max pools compiled (`compile_pools`)
    and ReLUs fused into the compiled convs before them (`fuse_relu`), and C3D's pool1 into conv1
    (`fuse_pool`). `report`: `{'slim': {layer:
    {'channels', 'kept'}}, 'kgs': {conv: {'path' ('compiled', 'kgs' or 'dense'), 'density',
    'estimated_speedup', 'measured_speedup', 'reason'}}, 'folded': {batchnorm: conv}, 'pools': [names],
    'relu_fused': [names], 'pools_fused': [names]}`, each empty when not done.
    """
    types = [sparsity_type] if isinstance(sparsity_type, str) else list(sparsity_type)
    report = {'slim': {}, 'kgs': {}}
    if 'filter' in types:
        model = slim_model(model, arch)
        report['slim'] = model.slim_report
    model.eval()
    report['folded'] = fold_batchnorm(model, arch)
    if any(t != 'filter' for t in types):
        report['kgs'] = sparse_exec(model, block_size, example_input=example_input)
    report['pools'] = compile_pools(model)
    report['relu_fused'] = fuse_relu(model)
    report['pools_fused'] = fuse_pool(model)
    return model, report


def macs(model, clip_shape):
    """Multiply-accumulates of one forward pass at `clip_shape` (N, 3, T, H, W), counted by PyTorch's
    FlopCounterMode on a meta-device copy (what actually runs: slim layers, KGS GEMMs)."""
    from torch.utils.flop_counter import FlopCounterMode
    meta = copy.deepcopy(model).to('meta')
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(clip_shape, device='meta'))
    return counter.get_total_flops() // 2


# ----------------------------------------------------------------------------- files

_CLASSES = {'Conv3d': nn.Conv3d, 'SlimConv3d': SlimConv3d, 'Linear': nn.Linear, 'BatchNorm3d': nn.BatchNorm3d,
            'BatchNormExpand': BatchNormExpand, 'KGSConv3d': KGSConv3d, 'CompiledKGSConv3d': CompiledKGSConv3d,
            'CompiledMaxPool3d': CompiledMaxPool3d, 'Identity': nn.Identity}


def _spec(module):
    if isinstance(module, KGSConv3d):
        return module.spec()
    if isinstance(module, nn.Identity):
        return {}
    if isinstance(module, nn.MaxPool3d):
        return {'kernel_size': list(_triple(module.kernel_size)), 'stride': list(_triple(module.stride)),
                'padding': list(_triple(module.padding)), 'dilation': list(_triple(module.dilation)),
                'ceil_mode': module.ceil_mode}
    if isinstance(module, nn.Conv3d):
        return {'in_channels': module.in_channels, 'out_channels': module.out_channels,
                'kernel_size': list(module.kernel_size), 'stride': list(module.stride),
                'padding': list(module.padding), 'dilation': list(module.dilation), 'bias': module.bias is not None}
    if isinstance(module, nn.Linear):
        return {'in_features': module.in_features, 'out_features': module.out_features,
                'bias': module.bias is not None}
    spec = {'num_features': module.num_features, 'eps': module.eps, 'momentum': module.momentum}
    if isinstance(module, BatchNormExpand):
        spec['full_features'] = module.full_features
    return spec


def save_model(model, path, arch, num_classes, **build_kwargs):
    """Write a model rebuilt by `slim_model` and/or `sparse_exec` (or a plain one) without pickle: the
    architecture, the constructor arguments of every layer that differs from `build_model(arch, ...)`,
    and the state dict. `build_kwargs` are what `build_model` needs again (num_frames, crop_size)."""
    reference = dict(build_model(arch, num_classes, pretrained=False, **build_kwargs).named_modules())
    layers = {}
    for name, module in model.named_modules():
        if type(module).__name__ not in _CLASSES:
            continue
        spec = _spec(module)
        ref = reference.get(name)
        if ref is None or type(ref) is not type(module) or _spec(ref) != spec:
            layers[name] = {'class': type(module).__name__, 'args': spec}
    torch.save({'format': FORMAT, 'version': VERSION, 'arch': arch, 'num_classes': num_classes,
                'build': dict(build_kwargs), 'layers': layers,
                'state_dict': {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    return path


def load_model(path, device='cpu'):
    """The model a `save_model` file holds, in eval mode."""
    data = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(data, dict) or data.get('format') != FORMAT:
        raise ValueError(f"{path} is not a model file written by models.slim.save_model")
    if data['version'] > VERSION:
        raise ValueError(f"{path} is model format version {data['version']}; this code reads up to {VERSION}")
    model = build_model(data['arch'], data['num_classes'], pretrained=False, **data['build'])
    for name, layer in data['layers'].items():
        if layer['class'] not in _CLASSES:
            raise ValueError(f"{path}: layer {name} has unknown class {layer['class']!r}")
        _set_module(model, name, _CLASSES[layer['class']](**layer['args']))
    model.load_state_dict(data['state_dict'])
    return model.to(device).eval()
