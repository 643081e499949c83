"""Pruned 3D convolutions that run from their kept weights (kernel group sparsity).

    from models.sparse_conv import sparse_exec
    report = sparse_exec(model, block_size=(8, 4))   # in place: every pruned Conv3d that gains -> KGSConv3d

Under `blk-kgs` the gM filters of a block row keep the same (input channel, kernel position)
columns, so a block row's output is one dense GEMM: its `gM x U` kept weights times the U
matching rows of the im2col matrix. `KGSConv3d` builds only those rows, with one `index_select`
of contiguous runs of the zero-padded input (no full im2col), and multiplies every block row in
one batched matmul, each row's columns padded to the largest count. The kept pattern is read
from the weight's zeros, so any pruned checkpoint works; the work saved grows with gM, since
each gathered row feeds gM filters (docs/speed.md has the measured trade-off).

Where a C++ compiler is at hand, `sparse_exec` uses `CompiledKGSConv3d` instead: the same module
and file format, run by the compiled direct convolution of `models/kgs_cpu.py` on the CPU
(docs/kgs_kernel.md); elsewhere (GPU, tracing, gradients, no compiler) it runs as a KGSConv3d.
"""
import logging
import math
import statistics
import threading
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kgs_cpu

log = logging.getLogger(__name__)

# Cost model, in units of one MAC of oneDNN's dense conv3d, fitted to C3D's layers on a 2-core
# AVX-512 CPU (docs/speed.md): a MAC of the KGS GEMM costs `_MAC`, and each gathered input element
# `_ELEMENT` more (written by the gather, then streamed once per block row: small blocks pay it
# for few MACs). Used only to keep a layer dense where the KGS path would not gain.
_MAC, _ELEMENT = 1.6, 38.0
# The compiled kernel: one kept MAC costs `_COMPILED_MAC` of oneDNN's dense MACs. On the idle 2-core
# AVX2 machine of docs/kgs_kernel.md ("Figures", two threads) C3D's pruned convs give 0.9-1.9 (conv5's
# 7-wide rows the least, conv3's the most); `sparse_exec` given an example input measures each layer instead.
_COMPILED_MAC = 1.6
WORKSPACE_BYTES = 512 << 20   # gathered rows held at once per layer; a larger input is done in tiles


def _linear_kernel():
    """oneDNN's fp32 inner product (torch.ops.mkldnn._linear_pointwise) where the build has it: on
    the AVX-512 CPUs measured it runs a GEMM about 1.3x faster than torch.mm (MKL); else None."""
    op = getattr(torch.ops.mkldnn, '_linear_pointwise', None) if torch.backends.mkldnn.is_available() else None
    if op is None:
        return None
    try:
        a, b = torch.arange(15.).view(3, 5) / 7, torch.arange(35.).view(5, 7).cos()   # no draw from the global RNG
        if torch.allclose(op(a, b.t(), None, 'none', [], ''), a @ b, atol=1e-5):
            return op
    except (RuntimeError, NotImplementedError):
        pass
    return None


_LINEAR = _linear_kernel()


def _tiles(samples, runs, bytes_per_run, budget):
    """`(n0, n1, q0, q1)` ranges of samples and of runs within a sample whose gathered rows fit `budget`
    bytes: whole samples while they fit, else slices of one sample's runs (small blocks at batch 8)."""
    per_sample = runs * bytes_per_run
    if per_sample <= budget:
        step = max(1, budget // per_sample)
        return [(a, min(a + step, samples), 0, runs) for a in range(0, samples, step)]
    step = max(1, budget // bytes_per_run)
    return [(a, a + 1, q, min(q + step, runs)) for a in range(samples) for q in range(0, runs, step)]


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * 3


def _out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class KGSConv3d(nn.Module):
    """A `Conv3d` computed from its kept columns: per block of `block_rows` filters, a GEMM of the
    kept weights with the gathered input rows. Equal to the dense conv of the same weight up to
    float rounding. Inference only (no gradient reaches the weights); one call at a time per module."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 block_rows=8, width=1):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.dilation = map(_triple, (kernel_size, stride, padding,
                                                                                  dilation))
        gm = max(1, min(int(block_rows), out_channels))
        rows = -(-out_channels // gm)
        self.register_buffer('weight_packed', torch.zeros(rows, gm, width))                     # (R, gM, U)
        self.register_buffer('columns', torch.zeros(rows, width, dtype=torch.long))             # c * K + k
        self.register_buffer('bias', torch.zeros(out_channels) if bias else None)
        self.mode = None        # 'rows' / 'plane' forces a run layout (tests, benchmarks)
        self.max_workspace = WORKSPACE_BYTES
        self._plans = {}
        self._lock = threading.Lock()

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv, block_rows):
        """The KGS form of `conv`, block rows of `block_rows` consecutive filters, kept columns read
        from the weight's zeros (a column is kept if any filter of the block row uses it)."""
        check_convertible(conv)
        w = conv.weight.detach()
        o = w.shape[0]
        gm = max(1, min(int(block_rows), o))
        rows = -(-o // gm)
        flat = F.pad(w.reshape(o, -1), (0, 0, 0, rows * gm - o)).view(rows, gm, -1)
        kept = (flat != 0).any(dim=1)                                      # (block rows, I*K)
        counts = kept.sum(dim=1)
        width = max(1, int(counts.max()))
        # Kept columns first, in ascending order; the padding repeats the first column with weight 0.
        order = torch.argsort((~kept).to(torch.uint8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=w.device) < counts[:, None]
        columns = torch.where(valid, order, order[:, :1])
        module = cls(conv.in_channels, o, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.bias is not None, gm, width).to(w.device, w.dtype)
        module.weight_packed.copy_(torch.gather(flat, 2, columns[:, None, :].expand(rows, gm, width))
                                   * valid[:, None, :])
        module.columns.copy_(columns)
        if conv.bias is not None:
            module.bias.copy_(conv.bias.detach())
        return module

    def spec(self):
        """Constructor arguments (plain ints and lists): what a saved model needs to rebuild this module."""
        return {'in_channels': self.in_channels, 'out_channels': self.out_channels,
                'kernel_size': list(self.kernel_size), 'stride': list(self.stride), 'padding': list(self.padding),
                'dilation': list(self.dilation), 'bias': self.bias is not None, 'block_rows': self.block_rows,
                'width': self.columns.shape[1]}

    @property
    def gemm_density(self):
        """MACs of the batched matmul (padding included) / MACs of the dense conv."""
        rows, gm, width = self.weight_packed.shape
        return rows * gm * width / (self.out_channels * self.in_channels * math.prod(self.kernel_size))

    @property
    def block_rows(self):
        return self.weight_packed.shape[1]

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, block_rows={self.block_rows}, kept_columns={self.columns.shape[1]}, "
                f"gemm_density={self.gemm_density:.3f}")

    def dense_weight(self):
        """The dense `(O, I, kT, kH, kW)` weight this module computes with (zeros restored)."""
        rows, gm, width = self.weight_packed.shape
        k = math.prod(self.kernel_size)
        flat = self.weight_packed.new_zeros(rows, gm, self.in_channels * k)
        # Padding entries repeat a kept column with weight 0; scatter_add keeps that column's value.
        flat.scatter_add_(2, self.columns[:, None, :].expand(rows, gm, width), self.weight_packed)
        return flat.view(rows * gm, -1)[:self.out_channels].reshape(self.out_channels, self.in_channels,
                                                                    *self.kernel_size)

    # ------------------------------------------------------------------ run time

    def forward(self, x):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or (x.requires_grad and torch.is_grad_enabled()):
            return self._forward_portable(x)
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"KGSConv3d expects (N, {self.in_channels}, T, H, W) input, got {tuple(x.shape)}")
        with self._lock:
            plan = self._plan(x)
            if plan['source'] is None:
                flat = x.contiguous().view(-1)
            else:
                for dst, (first, step) in plan['copies']:     # one copy per W phase (the W stride: 1 or 2)
                    dst.copy_(x[..., first::step])
                flat = plan['source']
            length = plan['run']
            runs = flat.as_strided((flat.numel() - length + 1, length), (1, 1))
            o = self.out_channels
            per_run, width = plan['per_run'], plan['out'][2]
            if plan['direct']:        # one sample, one tile, nothing to crop: the GEMM result is the output
                (_, index), = plan['tiles']
                y = self._gemm(torch.index_select(runs, 0, index, out=plan['cols'][:index.numel()]))
                if self.bias is not None:
                    y.add_(self.bias.view(-1, 1))
                return y.view(1, o, *plan['out'])
            out = torch.empty((x.shape[0], o, *plan['out']), dtype=x.dtype, device=x.device)
            target = out.view(x.shape[0], o, -1, per_run, width)            # (N, O, runs per sample, ...)
            # Usually one tile; more only when the gathered rows would pass the workspace budget.
            for (n0, n1, q0, q1), index in plan['tiles']:
                cols = torch.index_select(runs, 0, index, out=plan['cols'][:index.numel()])
                y = self._gemm(cols).view(-1, n1 - n0, q1 - q0, per_run, length // per_run)
                y = y[:o, ..., :width].transpose(0, 1)
                part = target[n0:n1, :, q0:q1]
                if self.bias is None:
                    part.copy_(y)
                else:
                    torch.add(y, self.bias.view(1, -1, 1, 1, 1), out=part)
            return out

    def _gemm(self, cols):
        """(R * gM, columns): every block row's kept weights times its gathered rows."""
        rows, gm, width = self.weight_packed.shape
        cols = cols.view(rows, width, -1)
        if rows == 1:
            if _LINEAR is not None and cols.device.type == 'cpu' and cols.dtype == torch.float32:
                return _LINEAR(self.weight_packed[0], cols[0].t(), None, 'none', [], '')
            return torch.mm(self.weight_packed[0], cols[0])
        return torch.bmm(self.weight_packed, cols).view(rows * gm, -1)

    def _plan(self, x):
        """Index of the input runs to gather, tiles and workspaces for this input shape (built once, cached).

        A run is `length` consecutive elements of the zero-padded input that one kept column contributes
        to consecutive outputs: an output row of W' ('rows'), or a whole output plane computed over the
        padded width ('plane': fewer, longer runs; chosen when W has no padding, so nothing is computed
        for nothing). With a W stride s the padded input is stored as s phases (columns w = phase + j*s),
        so every run is contiguous and the gather copies whole runs.
        """
        # Workspaces made under inference_mode cannot be written outside it: one plan for each.
        key = (tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled())
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        n, _, *size = x.shape
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        out = [_out_size(*a) for a in zip(size, k, s, p, d)]
        if min(out) < 1:
            raise ValueError(f"KGSConv3d: input {tuple(x.shape)} is smaller than the kernel {k} (dilation {d})")
        mode = self.mode or ('plane' if s[1] == s[2] == 1 and p[2] == 0 else 'rows')
        if mode not in ('rows', 'plane') or (mode == 'plane' and not s[1] == s[2] == 1):
            raise ValueError(f"KGSConv3d: run layout {mode!r} is not 'rows' or 'plane' (which needs stride 1 in "
                             f"H and W, got {s})")
        dev = x.device
        tp, hp, wp = (a + 2 * b for a, b in zip(size, p))
        phases = s[2]
        wq = -(-wp // phases)                                     # columns per phase
        plane, channel = hp * wq, tp * hp * wq
        sample = self.in_channels * channel
        c = torch.div(self.columns, math.prod(k), rounding_mode='floor')
        kk = self.columns % math.prod(k)
        kt, kh, kw = kk // (k[1] * k[2]), (kk // k[2]) % k[1], (kk % k[2]) * d[2]
        col_off = ((kw % phases) * n * sample + c * channel + kt * d[0] * plane + kh * d[1] * wq
                   + torch.div(kw, phases, rounding_mode='floor'))                        # (R, U)
        t_off = torch.arange(out[0], device=dev) * s[0] * plane
        if mode == 'rows':
            pos_off = (t_off[:, None] + torch.arange(out[1], device=dev)[None] * s[1] * wq).flatten()
            run, per_run, slack = out[2], 1, 0
        else:
            pos_off = t_off
            run, per_run, slack = out[1] * wp, out[1], (k[2] - 1) * d[2]    # the last run reads past the end
        index = col_off.flatten()[:, None, None] + (torch.arange(n, device=dev) * sample)[:, None] + pos_off
        if phases == 1 and not any(p) and not slack:
            source, copies = None, []                             # runs read the input itself
        else:
            source = torch.zeros(phases * n * sample + slack, dtype=x.dtype, device=dev)
            copies = []
            for phase in range(phases):
                j0 = max(0, -(-(p[2] - phase) // phases))        # first phase column inside the input
                first = phase + j0 * phases - p[2]
                count = len(range(first, size[2], phases))
                if count:
                    dst = source[phase * n * sample:(phase + 1) * n * sample].view(n, self.in_channels, tp, hp, wq)
                    copies.append((dst[:, :, p[0]:p[0] + size[0], p[1]:p[1] + size[1], j0:j0 + count],
                                   (first, phases)))
        tiles = _tiles(n, len(pos_off), index.shape[0] * run * x.element_size(), self.max_workspace)
        tiles = [(t, index[:, t[0]:t[1], t[2]:t[3]].flatten()) for t in tiles]
        cols = torch.empty((max(i.numel() for _, i in tiles), run), dtype=x.dtype, device=dev)
        direct = (n == 1 and len(tiles) == 1 and run == per_run * out[2]
                  and self.weight_packed.shape[0] * self.weight_packed.shape[1] == self.out_channels)
        plan = {'out': tuple(out), 'run': run, 'per_run': per_run, 'tiles': tiles, 'source': source,
                'copies': copies, 'cols': cols, 'mode': mode, 'direct': direct}
        if len(self._plans) >= 2:      # keep the memory of two shapes at most (e.g. batch 1 and 8)
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan
        return plan

    def release(self):
        """Drop the cached index and workspaces (they are rebuilt at the next call)."""
        self._plans.clear()

    def __getstate__(self):          # copies and pickles leave the workspaces and the lock behind
        state = self.__dict__.copy()
        state['_plans'], state['_lock'] = {}, None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()

    def _forward_portable(self, x):
        """The same product with ops ONNX has (no as_strided): per kernel position in use, a slice of the
        padded input and a gather of the channels kept there; one concatenation (the union of the kept
        columns, never the full im2col) and one (batched) matmul. Used when tracing or with gradients."""
        n = x.shape[0]
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        out = [_out_size(*a) for a in zip(x.shape[2:], k, s, p, d)]
        xp = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0]))
        positions, channels, remap = self._union_layout()
        parts = []
        for position, chans in zip(positions, channels):    # at most K = kT*kH*kW steps, unrolled when traced
            a, b, c = position // (k[1] * k[2]), (position // k[2]) % k[1], position % k[2]
            window = xp[:, :, a * d[0]:a * d[0] + (out[0] - 1) * s[0] + 1:s[0],
                        b * d[1]:b * d[1] + (out[1] - 1) * s[1] + 1:s[1],
                        c * d[2]:c * d[2] + (out[2] - 1) * s[2] + 1:s[2]]
            parts.append(torch.index_select(window, 1, chans.to(x.device)))
        union = torch.cat(parts, dim=1).reshape(n, -1, math.prod(out))          # (N, union of kept, L)
        rows, gm, width = self.weight_packed.shape
        cols = torch.index_select(union, 1, remap.to(x.device).flatten()).view(n, rows, width, -1)
        y = torch.matmul(self.weight_packed, cols).view(n, rows * gm, *out)[:, :self.out_channels]
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1, 1)

    def _union_layout(self):
        """`(positions, channels, remap)`: the kernel positions any block row keeps, the channels kept at
        each (their concatenation is the union of kept columns), and each packed column's place in it."""
        with warnings.catch_warnings():          # read once as constants: the layout is fixed by the weights
            warnings.simplefilter('ignore')
            columns = torch.tensor(self.columns.tolist(), dtype=torch.long)   # a constant, not a traced value
            k = math.prod(self.kernel_size)
            order = torch.unique(columns % k * self.in_channels + columns // k)      # position-major, sorted
            positions, counts = torch.unique_consecutive(order // self.in_channels, return_counts=True)
            channels = torch.split(order % self.in_channels, counts.tolist())
            remap = torch.searchsorted(order, columns % k * self.in_channels + columns // k)
        return positions.tolist(), channels, remap


class CompiledKGSConv3d(KGSConv3d):
    """A KGSConv3d (same buffers, same file format) that runs on the CPU by the compiled direct KGS
    convolution of `models.kgs_cpu`; on other devices, when traced, with gradients, or where the
    kernel cannot be built, it runs as a KGSConv3d. `relu`: the ReLU after the conv is part of it
    (`models.slim.fuse_relu`), applied as the compiled kernel stores its outputs. `pool`: so is the
    2x2 max pool in H and W (stride 2) after that (`models.slim.fuse_pool`, C3D's pool1): the
    output's H and W are halved."""

    def __init__(self, *args, relu=False, pool=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = bool(relu)
        self.pool = bool(pool)

    def spec(self):
        return {**super().spec(), 'relu': self.relu, **({'pool': True} if self.pool else {})}

    def extra_repr(self):
        return super().extra_repr() + (', relu' if self.relu else '') + (', pool 2x2' if self.pool else '')

    def forward(self, x):
        if (x.device.type != 'cpu' or x.dtype != torch.float32 or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export() or (x.requires_grad and torch.is_grad_enabled())
                or self.weight_packed.device.type != 'cpu' or self.weight_packed.dtype != torch.float32):
            return self._torch_forward(x)
        kernel = self._kernel()
        if kernel is None:
            return self._torch_forward(x)
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"CompiledKGSConv3d expects (N, {self.in_channels}, T, H, W) input, got {tuple(x.shape)}")
        return kgs_cpu.conv(x, kernel)

    def _torch_forward(self, x):
        y = super().forward(x)
        y = torch.relu(y) if self.relu else y
        return F.max_pool3d(y, (1, 2, 2), (1, 2, 2)) if self.pool else y

    def _kernel(self):
        """The packed kernel of the current weights: built at the first call, again after they change."""
        if not kgs_cpu.available():
            kgs_cpu.log_unavailable_once()
            return None
        buffers = [b for b in (self.weight_packed, self.columns, self.bias) if b is not None]
        key = tuple((b.data_ptr(), b._version) for b in buffers) + (self.relu, self.pool)
        with self._lock:
            cached = self.__dict__.get('_compiled')
            if cached is None or cached[0] != key:
                kernel = kgs_cpu.pack(self.dense_weight(), self.block_rows, self.bias, self.stride, self.padding,
                                      self.dilation, self.relu, self.pool)
                self.__dict__['_compiled'] = cached = (key, kernel)
        return cached[1]

    def release(self):
        super().release()
        self.__dict__.pop('_compiled', None)

    def __getstate__(self):          # the compiled kernel is rebuilt by the copy at its first call
        state = super().__getstate__()
        state.pop('_compiled', None)
        return state


class CompiledMaxPool3d(nn.MaxPool3d):
    """An nn.MaxPool3d computed on the CPU by the compiled kernel, which skips the indices PyTorch's CPU
    max_pool3d computes even for inference (C3D's pool1 takes it longer than the compiled conv1);
    elsewhere, with gradients, indices or ceil mode, it runs as nn.MaxPool3d."""

    def forward(self, x):
        if (self.return_indices or self.ceil_mode or x.device.type != 'cpu' or x.dtype != torch.float32
                or x.dim() != 5 or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or (x.requires_grad and torch.is_grad_enabled()) or not kgs_cpu.available()):
            return super().forward(x)
        return kgs_cpu.max_pool3d(x, self.kernel_size, self.stride, self.padding, self.dilation)


# ----------------------------------------------------------------------------- conversion

def check_convertible(conv):
    """Refuse, naming what differs, a conv that KGSConv3d cannot compute."""
    if not isinstance(conv, nn.Conv3d):
        raise TypeError(f"KGSConv3d converts nn.Conv3d, got {type(conv).__name__}")
    if type(conv) is not nn.Conv3d:
        raise ValueError(f"KGSConv3d converts plain nn.Conv3d; {type(conv).__name__} computes more than the conv")
    if conv.groups != 1:
        raise ValueError(f"KGSConv3d needs groups=1, got groups={conv.groups}")
    if conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
        raise ValueError(f"KGSConv3d needs numeric zero padding, got padding={conv.padding!r} "
                         f"({conv.padding_mode})")


def estimate_speedup(weight, block_rows, compiled=False):
    """Predicted dense time / KGS time of a weight under the cost model (>1: the KGS path gains); of the
    compiled kernel's time with `compiled`, which runs each block row's own kept columns, unpadded."""
    o = weight.shape[0]
    gm = max(1, min(int(block_rows), o))
    rows = -(-o // gm)
    flat = F.pad(weight.detach().reshape(o, -1), (0, 0, 0, rows * gm - o)).view(rows, gm, -1)
    kept = (flat != 0).any(dim=1).sum(dim=1)
    if compiled:
        return o * flat.shape[-1] / max(1.0, float(kept.sum()) * gm * _COMPILED_MAC)
    sparse = rows * max(1, int(kept.max())) * (gm * _MAC + _ELEMENT)
    return o * flat.shape[-1] / sparse


@torch.no_grad()
def sparse_exec(model, block_size=(8, 4), min_speedup=1.1, layers=None, example_input=None, reps=5):
    """Swap, in place, every pruned `Conv3d` of `model` for a KGS module with block rows of `block_size[0]`
    filters where that is at least `min_speedup` times faster; the others stay dense.

    The module is a `CompiledKGSConv3d` (path 'compiled') where the compiled kernel of `models.kgs_cpu`
    can run (a CPU model, a C++ compiler), else a `KGSConv3d` (path 'kgs'; one log line says why).
    Faster is predicted by the cost model, or, given `example_input` (a batch as it will be run), measured:
    each layer, dense and KGS, on its real input, `reps` interleaved calls, medians (the time sizes
    decide: a layer that gains at batch 1 may not at batch 8). Measured, an unpruned conv also takes the
    compiled kernel where that is faster at all, or by `min_speedup` where that is under 1 (its reason stays
    'no zeros').
    `layers` limits it to those module names. Returns `{module name: row}`, one per Conv3d, `row` a dict:
    `path` ('compiled', 'kgs' or 'dense'), `density` (non-zero fraction of the weight),
    `estimated_speedup`, `measured_speedup` (None unless measured) and `reason` (why it stays dense, or
    '').
    """
    gm = int(block_size[0]) if isinstance(block_size, (tuple, list)) else int(block_size)
    if gm < 1:
        raise ValueError(f"block size must have gM >= 1 filters per block row, got {block_size}")
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    if layers is not None:
        unknown = set(layers) - {n for n, _ in convs}
        if unknown:
            raise KeyError(f"sparse_exec: {', '.join(sorted(unknown))} not a Conv3d of {type(model).__name__}; "
                           f"Conv3d modules are {', '.join(n for n, _ in convs)}")
    inputs = _conv_inputs(model, example_input) if example_input is not None else {}
    compiled = _compiled_path(convs)
    report = {}
    for name, conv in convs:
        density = float((conv.weight != 0).float().mean())
        row = {'path': 'dense', 'density': density, 'estimated_speedup': 1.0, 'measured_speedup': None,
               'reason': ''}
        report[name] = row
        if layers is not None and name not in layers:
            row['reason'] = 'not selected'
            continue
        if density == 1.0:
            row['reason'] = 'no zeros'
            # oneDNN runs most dense convs faster; a few (C3D's conv1: 3 input channels) run faster compiled.
            if not (compiled and name in inputs):
                continue
        try:
            check_convertible(conv)
        except ValueError as exc:
            row['reason'] = row['reason'] or str(exc)
            continue
        cls, path = (CompiledKGSConv3d, 'compiled') if compiled else (KGSConv3d, 'kgs')
        row['estimated_speedup'] = estimate_speedup(conv.weight, gm, compiled)
        if name in inputs:
            kgs = cls.from_conv(conv, gm)
            times = interleaved_medians([lambda x=inputs[name]: conv(x), lambda x=inputs[name]: kgs(x)], reps)
            row['measured_speedup'] = times[0] / times[1]
            # An unpruned conv runs the same multiply-adds either way: it takes whichever measured faster (with a
            # margin, C3D's conv4a, 1.07-1.28x faster compiled in three runs, stayed dense in some); a
            # min_speedup under 1 lowers that bar too (0: every measured conv compiled, whatever the timing).
            if row['measured_speedup'] < (min_speedup if density < 1.0 else min(1.0, min_speedup)):
                if density < 1.0:
                    row['reason'] = f"measured {row['measured_speedup']:.2f}x < {min_speedup}x"
                continue
        elif row['estimated_speedup'] < min_speedup:
            row['reason'] = (f"estimated {row['estimated_speedup']:.2f}x < {min_speedup}x: zeros not shared by "
                             f"blocks of {gm} filters, or too few")
            continue
        else:
            kgs = cls.from_conv(conv, gm)
        _set_module(model, name, kgs)
        row['path'] = path
    for name, row in report.items():
        if row['reason'] not in ('no zeros', 'not selected') or row['path'] != 'dense':
            measured = '' if row['measured_speedup'] is None else f"measured {row['measured_speedup']:.2f}x "
            log.info(f"sparse-exec {name:<32} {row['path']:<8} density {row['density']:.3f} "
                     f"estimated {row['estimated_speedup']:.2f}x {measured}{row['reason']}")
    return report


def _compiled_path(convs):
    """Whether the KGS modules of these convs run compiled: all on the CPU and the kernel available (else
    one log line says why not)."""
    if not convs or any(m.weight.device.type != 'cpu' for _, m in convs):
        return False
    if kgs_cpu.available():
        return True
    log.warning(f"sparse-exec: the compiled KGS kernel is not available ({kgs_cpu.why_unavailable()}); "
                f"pruned convs run as KGSConv3d (torch ops)")
    return False


def _conv_inputs(model, example_input):
    """`{Conv3d name: its input}` in one forward pass of `example_input`."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv3d):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0])))
    try:
        model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


def interleaved_medians(fns, reps, clock=time.perf_counter):
    """Median seconds of each callable, called in turn (after one warm-up round), so load hits all alike.
    `clock`: wall time by default; `time.process_time` for the CPU time the calls took."""
    times = [[] for _ in fns]
    for i in range(reps + 1):
        for t, fn in zip(times, fns):
            start = clock()
            fn()
            if i:
                t.append(clock() - start)
    return [statistics.median(t) for t in times]


def dense_exec(model):
    """Undo `sparse_exec` in place: every KGSConv3d back to an equivalent nn.Conv3d."""
    for name, m in list(model.named_modules()):
        if getattr(m, 'relu', False) is True or getattr(m, 'pool', False) is True:
            raise ValueError(f"dense_exec: {name} holds the ReLU or pool after it (models.slim.fuse_relu, "
                             f"fuse_pool); build the dense model from the checkpoint instead")
        if isinstance(m, KGSConv3d):
            conv = nn.Conv3d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                             bias=m.bias is not None).to(m.weight_packed.device, m.weight_packed.dtype)
            with torch.no_grad():
                conv.weight.copy_(m.dense_weight())
                if m.bias is not None:
                    conv.bias.copy_(m.bias)
            _set_module(model, name, conv)
    return model


def _set_module(model, name, module):
    parent, _, leaf = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
