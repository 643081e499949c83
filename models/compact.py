"""Compact files of pruned models, and ONNX export.

    from models.compact import save_compact, load_compact, export_onnx
    save_compact(model.state_dict(), 'pruned.compact.pt', sparsity_type='blk-kgs')
    model.load_state_dict(load_compact('pruned.compact.pt'))     # bit for bit the dense weights

A pruned weight is stored as its kept groups' values (a `kept groups x group members` matrix)
and a bit index of which groups of the sparsity type those are; every other tensor is stored
as it is. The file is a `torch.save` of plain containers of tensors, strings and ints, so it
loads with `torch.load(weights_only=True)`.
"""
import math
import warnings

import torch

import admm

from . import strip_module_prefix

FORMAT = 'rt3d-compact'
VERSION = 1


def _bits(t):
    """The tensor's bit patterns as integers: a group is kept unless every entry is +0.0, so a
    stray -0.0 is stored rather than lost and the round trip is exact."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _group_rows(weight, sparsity_type, block_size):
    """`(rows, layout)`: the weight as a `groups x members` matrix (padding included), rows in the
    order of `admm.keep_groups`' grid, and what `_from_group_rows` needs to undo it."""
    view, dims = admm.grid_view(weight, sparsity_type, block_size)
    if not dims:                                          # irregular: one entry per group
        return weight.reshape(-1, 1), None
    order = [d for d in range(view.dim()) if d not in dims] + list(dims)
    permuted = view.permute(order)
    groups = math.prod(permuted.shape[:view.dim() - len(dims)])
    return permuted.reshape(groups, -1), (tuple(permuted.shape), order)


def _from_group_rows(rows, layout, shape, sparsity_type):
    if layout is None:
        return rows.reshape(shape)
    permuted_shape, order = layout
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return admm.from_grid_view(rows.reshape(permuted_shape).permute(inverse), shape, sparsity_type)


def _pack(bits):
    """Bool vector -> uint8 vector, 8 flags a byte, first flag in the high bit (numpy's packbits)."""
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, -bits.numel() % 8)).view(-1, 8)
    return (padded << torch.arange(7, -1, -1, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def _unpack(packed, n):
    return ((packed.unsqueeze(1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).flatten()[:n].bool()


def compact_entry(weight, sparsity_type='blk-kgs', block_size=(8, 4)):
    """A weight's compact record: the kept groups' values and the packed bit index of the kept groups."""
    rows, _ = _group_rows(weight.detach().cpu(), sparsity_type, block_size)
    keep = (_bits(rows) != 0).any(dim=1)
    return {'shape': list(weight.shape), 'sparsity_type': sparsity_type, 'block_size': list(block_size),
            'groups': rows.shape[0], 'index': _pack(keep), 'values': rows[keep]}


def dense_from_entry(entry):
    """The dense weight of a `compact_entry` record."""
    shape, kind, block = tuple(entry['shape']), entry['sparsity_type'], tuple(entry['block_size'])
    values = entry['values']
    # Shape the rows as the original's group view does, without needing the original.
    _, layout = _group_rows(torch.empty(shape, dtype=values.dtype, device='meta'), kind, block)
    rows = torch.zeros((entry['groups'], values.shape[1]), dtype=values.dtype)
    keep = _unpack(entry['index'], entry['groups'])
    if int(keep.sum()) != values.shape[0]:
        raise ValueError(f"compact record of shape {shape}: the index keeps {int(keep.sum())} groups but "
                         f"{values.shape[0]} are stored; the file is damaged")
    rows[keep] = values
    return _from_group_rows(rows, layout, shape, kind).contiguous()


def save_compact(state_dict, path, sparsity_type='blk-kgs', block_size=(8, 4), prune_names=None):
    """Write `state_dict` with its pruned weights in compact form; returns the names stored compactly.

    Candidates are the floating-point weights of 2 or more dimensions (or those in `prune_names`,
    with or without `module.`). A candidate is stored compactly when that is smaller: its zero
    pattern, read as whole groups of `sparsity_type`, leaves few enough groups. Lossless either way.
    With a list of types each weight takes the smallest (several profiles at once leave patterns
    that no single type's groups cover; `irregular` always fits, at one bit per entry).
    """
    types = [sparsity_type] if isinstance(sparsity_type, str) else list(sparsity_type)
    for kind in types:
        admm.check_sparsity_type(kind)
    wanted = None if prune_names is None else {strip_module_prefix(n) for n in prune_names}
    if wanted is not None:
        unknown = wanted - {strip_module_prefix(n) for n in state_dict}
        if unknown:
            raise KeyError(f"prune_names {', '.join(sorted(unknown))} are not in the state dict")
    dense, compact = {}, {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        if value.is_floating_point() and value.dim() >= 2 and (wanted is None or strip_module_prefix(name) in wanted):
            entry = min((compact_entry(value, kind, block_size) for kind in types), key=_stored_bytes)
            if _stored_bytes(entry) < value.nbytes:
                compact[name] = entry
                continue
        # A view into a larger storage would save all of that storage.
        dense[name] = value.clone() if value.untyped_storage().nbytes() > value.nbytes else value
    torch.save({'format': FORMAT, 'version': VERSION, 'order': list(state_dict), 'dense': dense,
                'compact': compact}, path)
    return list(compact)


def _stored_bytes(entry):
    return entry['values'].nbytes + entry['index'].nbytes


def load_compact(path):
    """Read a file written by `save_compact`: the dense state dict, equal bit for bit to the one saved."""
    data = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(data, dict) or data.get('format') != FORMAT:
        raise ValueError(f"{path} is not a compact model file (written by models.compact.save_compact)")
    if data['version'] > VERSION:
        raise ValueError(f"{path} is compact format version {data['version']}; this code reads up to {VERSION}")
    return {name: data['dense'][name] if name in data['dense'] else dense_from_entry(data['compact'][name])
            for name in data['order']}


def export_onnx(model, path, input_shape, opset=17):
    """Write `model` (in eval mode) as ONNX for clips of exactly `input_shape` (N, 3, T, H, W),
    with the TorchScript exporter, which needs no package beyond torch."""
    was_training = model.training
    model.eval()
    clip = torch.randn(input_shape, device=next(model.parameters()).device)
    try:
        with warnings.catch_warnings():
            # The torch.export-based exporter would need onnxscript; the TorchScript one is deprecated, not gone.
            # Shapes stay static: S3D's pooling sizes follow the clip, which this exporter cannot make symbolic.
            warnings.simplefilter('ignore', DeprecationWarning)
            torch.onnx.export(model, (clip,), path, dynamo=False, opset_version=opset, input_names=['clip'],
                              output_names=['logits'])
    finally:
        model.train(was_training)
    return path
