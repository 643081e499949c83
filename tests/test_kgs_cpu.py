"""The compiled KGS kernel (models/kgs_cpu.py): equal to the dense conv of the pruned weight for every
layer shape the models use and odd ones, on 1 and 2 threads; CompiledKGSConv3d in whole models; and
the fallback to the torch path, with the reason logged, when the kernel is disabled or cannot be built."""
import copy
import gc
import logging
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_same, kgs_pruned_c3d, pruned_conv, trained_looking

import admm
from models import build_model, kgs_cpu, sparse_conv
from models.slim import faster_model, load_model, save_model
from models.sparse_conv import CompiledKGSConv3d, CompiledMaxPool3d, KGSConv3d, sparse_exec

needs_kernel = pytest.mark.skipif(not kgs_cpu.available(), reason=f"no compiled kernel: {kgs_cpu.why_unavailable()}")


def assert_exact(y, ref):
    """float32 sums in another order than float64's: a few ulps of the largest output."""
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


def reference(x, weight, bias, stride, padding, dilation):
    return F.conv3d(x.double(), weight.double(), None if bias is None else bias.double(), stride, padding, dilation)


def kgs_weight(o, i, kernel, block=(8, 4), ratio=0.6, seed=0):
    torch.manual_seed(seed)
    kernel = (kernel,) * 3 if isinstance(kernel, int) else kernel
    return admm.project(torch.randn(o, i, *kernel), ratio, 'blk-kgs', block)


@pytest.fixture(params=[1, 2], ids=['1 thread', '2 threads'])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_the_kernel_builds_where_a_compiler_and_ninja_are_found(monkeypatch):
    monkeypatch.delenv('RT3D_NO_COMPILED_KGS', raising=False)
    compiler = shutil.which('c++') or shutil.which('g++') or shutil.which('clang++')
    if compiler and shutil.which('ninja'):
        assert kgs_cpu.available(), kgs_cpu.why_unavailable()
        assert kgs_cpu.why_unavailable() is None
    else:
        assert not kgs_cpu.available() and 'could not be built' in kgs_cpu.why_unavailable()


def test_the_instruction_set_follows_the_cpu_unless_forced(monkeypatch):
    monkeypatch.delenv('RT3D_KGS_ISA', raising=False)
    expected = {'AVX512': 'avx512', 'AVX2': 'avx2'}.get(torch.backends.cpu.get_cpu_capability(), 'portable')
    assert kgs_cpu.isa() == expected
    monkeypatch.setenv('RT3D_KGS_ISA', 'Portable')
    assert kgs_cpu.isa() == 'portable'
    monkeypatch.setenv('RT3D_KGS_ISA', 'sse9')
    with pytest.raises(ValueError, match='RT3D_KGS_ISA'):
        kgs_cpu.isa()


# (out, in, kernel, stride, padding, dilation, input (N, I, T, H, W)): the models' conv shapes, small
# spatially, with O and I not multiples of the block, and odd sizes around the vector width (8 or 16).
SHAPES = {
    'c3d 3x3x3': (13, 6, 3, 1, 1, 1, (2, 6, 5, 9, 7)),
    'c3d 3x3x3, rows of 28 (3.5 vectors)': (16, 8, 3, 1, 1, 1, (1, 8, 3, 4, 28)),
    'c3d 3x3x3, rows of exactly 16': (8, 4, 3, 1, 1, 1, (1, 4, 2, 3, 16)),
    'r2+1d stem 1x7x7 stride 2': (45, 3, (1, 7, 7), (1, 2, 2), (0, 3, 3), 1, (1, 3, 3, 16, 15)),
    'r2+1d spatial 1x3x3 stride 2': (16, 7, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, (2, 7, 4, 9, 9)),
    'r2+1d temporal 3x1x1 stride 2': (10, 9, (3, 1, 1), (2, 1, 1), (1, 0, 0), 1, (1, 9, 7, 5, 6)),
    'r2+1d downsample 1x1x1 stride 2': (9, 5, 1, 2, 0, 1, (3, 5, 5, 7, 7)),
    's3d 1x1x1': (11, 10, 1, 1, 0, 1, (2, 10, 3, 5, 4)),
    's3d conv1 3x7x7 stride 2': (8, 3, (3, 7, 7), (1, 2, 2), (1, 3, 3), 1, (1, 3, 4, 16, 15)),
    's3d separable 1x3x3 then 3x1x1': (12, 9, (1, 3, 3), 1, (0, 1, 1), 1, (1, 9, 3, 6, 5)),
    'one frame (T=1)': (10, 6, 3, 1, 1, 1, (2, 6, 1, 5, 5)),
    'one voxel': (9, 4, 3, 1, 1, 1, (1, 4, 1, 1, 1)),
    'no padding, output 1x1x1': (6, 5, 3, 1, 0, 1, (1, 5, 3, 3, 3)),
    'dilated, no padding in T': (12, 4, 3, 1, (0, 2, 2), 2, (1, 4, 7, 8, 8)),
    'W stride 3, dilation 2': (7, 5, 3, (1, 2, 3), (1, 2, 4), (1, 1, 2), (2, 5, 5, 11, 13)),
    # input channels in multiples of 4 are stored in blocks of 4 rows, and chunks end on a block
    'blocks of 4 channels, W stride 3, dilation 2': (7, 8, 3, (1, 2, 3), (1, 2, 4), (1, 1, 2), (2, 8, 5, 11, 13)),
    'blocks of 4 channels in several chunks, W stride 2': (12, 40, 3, (1, 2, 2), 1, 1, (2, 40, 3, 9, 11)),
    # a kernel of 1x1 in H and W runs each plane as rows of another length (here one row of 196)
    'temporal 3x1x1 on 14x14 planes': (12, 8, (3, 1, 1), 1, (1, 0, 0), 1, (2, 8, 3, 14, 14)),
    # and reads its input in place, one kernel plane per chunk, dropping those that fall in the T padding
    'temporal 3x1x1, T padding 2 and dilation 2, whole vectors': (16, 64, (3, 1, 1), 1, (2, 0, 0), (2, 1, 1),
                                                                 (2, 64, 5, 4, 8)),
    'temporal 5x1x1, T stride 3, padding 1': (9, 20, (5, 1, 1), (3, 1, 1), (1, 0, 0), 1, (1, 20, 11, 3, 3)),
    # kernel planes that read only the T padding are left out at the first and last output planes, by
    # channel range, and kept where a tile's vectors span two output planes (rows of 7: one vector each)
    'several channel ranges, 2 output planes (c3d conv5)': (16, 64, 3, 1, 1, 1, (1, 64, 2, 7, 7)),
    'several channel ranges, T stride 2, padding 2, dilation 2': (16, 96, 3, (2, 1, 1), (2, 1, 1), (2, 1, 1),
                                                                  (1, 96, 5, 5, 7)),
}


@needs_kernel
@pytest.mark.parametrize('shape', SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize('gm', [1, 3, 8, 64])
def test_compiled_kernel_equals_the_dense_conv_of_the_pruned_weight(shape, gm, threads):
    o, i, k, s, p, d, x_shape = SHAPES[shape]
    weight = kgs_weight(o, i, k, block=(gm, 2))
    bias = torch.randn(o)
    x = torch.randn(x_shape)
    kernel = kgs_cpu.pack(weight, gm, bias, s, p, d)
    assert_exact(kgs_cpu.conv(x, kernel), reference(x, weight, bias, s, p, d))
    assert_exact(kgs_cpu.conv(x, kernel), reference(x, weight, bias, s, p, d))   # the cached plan again


@needs_kernel
def test_a_fused_relu_is_applied_once_after_the_last_chunk_of_every_block_row(threads):
    weight = kgs_weight(24, 64, 3, ratio=0.5)
    weight[8:16] = 0                                   # a block row of bias only: ReLU of the bias
    bias = torch.randn(24)
    bias[3] = float('nan')                             # (a NaN input would reach only the kept columns' outputs)
    x = torch.randn(1, 64, 3, 6, 11)
    kernel = kgs_cpu.pack(weight, 8, bias, 1, 1, 1, relu=True)
    y, ref = kgs_cpu.conv(x, kernel), torch.relu(reference(x, weight, bias, 1, 1, 1))
    assert torch.equal(y.isnan(), ref.isnan()) and bool(ref.isnan().any())   # NaN stays NaN, as torch.relu
    assert_exact(y.nan_to_num(0.5), ref.nan_to_num(0.5))
    assert bool((y[0, 8:16] == bias[8:16].clamp(min=0).view(8, 1, 1, 1)).all())
    assert bool(y[0, 3].isnan().all())


@needs_kernel
@pytest.mark.parametrize('relu', [True, False], ids=['ReLU', 'no ReLU'])
@pytest.mark.parametrize('shape', [(1, 3, 4, 12, 16), (2, 3, 3, 9, 21), (1, 8, 2, 5, 9)],
                         ids=['whole vectors', 'odd H and W, a row end of 5', 'channel blocks, W of 9'])
def test_the_2x2_pool_after_the_conv_is_applied_as_the_outputs_are_stored(shape, relu, threads):
    # C3D's conv1 -> ReLU -> pool1 (1, 2, 2): an odd last row or column pools with nothing and is left out
    def pooled_reference(x, weight, bias):
        ref = reference(x, weight, bias, 1, 1, 1)
        return F.max_pool3d(torch.relu(ref) if relu else ref, (1, 2, 2), (1, 2, 2))

    weight = kgs_weight(20, shape[1], 3, ratio=0.3)
    weight[8:16] = 0                                   # a block row of bias only
    bias = torch.randn(20)
    x = torch.randn(shape)
    kernel = kgs_cpu.pack(weight, 8, bias, 1, 1, 1, relu=relu, pool=True)
    ref = pooled_reference(x, weight, bias)
    for _ in range(2):
        y = kgs_cpu.conv(x, kernel)
        assert y.shape == ref.shape
        assert_exact(y, ref)
    assert bool((y[:, 8:16] == (bias[8:16].clamp(min=0) if relu else bias[8:16]).view(8, 1, 1, 1)).all())
    with pytest.raises(RuntimeError, match='too small for the 2x2 pool'):
        kgs_cpu.conv(torch.randn(1, shape[1], 2, 1, 5), kernel)
    # NaN wins a window, as in nn.MaxPool3d (every column kept: the dense conv spreads a NaN input as the
    # kernel does, where a pruned one multiplies it by the zeros the kernel skips)
    weight = kgs_weight(20, shape[1], 3, ratio=0.0)
    x[0, 0, 1, 2, 3] = float('nan')
    kernel = kgs_cpu.pack(weight, 8, bias, 1, 1, 1, relu=relu, pool=True)
    y, ref = kgs_cpu.conv(x, kernel), pooled_reference(x, weight, bias)
    assert torch.equal(y.isnan(), ref.isnan()) and bool(ref.isnan().any())
    assert_exact(y.nan_to_num(0.5), ref.nan_to_num(0.5))


@needs_kernel
@pytest.mark.parametrize('where', ['storage with room after it', 'storage ending with the input', 'a view'])
def test_a_kernel_one_row_high_reads_its_input_in_place_and_fuses_the_relu_after_every_kernel_plane(where, threads):
    # 3x1x1 with T padding 1: the first and last output planes skip a kernel plane, whose chunk is
    # then not the last (nor the first) of their block rows; rows of 7x7 = 49 end in a partial vector,
    # which reads past the row (from a copy where the input's storage ends there)
    weight = kgs_weight(24, 36, (3, 1, 1), ratio=0.5)
    weight[8:16] = 0                                   # a block row of bias only
    bias = torch.randn(24)
    shape, numel = (2, 36, 4, 7, 7), 2 * 36 * 4 * 49
    if where == 'storage with room after it':
        x = torch.randn(numel + 64)[:numel].view(shape)
    elif where == 'storage ending with the input':
        x = torch.randn(numel + 64)[64:].view(shape)
    else:
        x = torch.randn(2, 4, 36, 7, 7).transpose(1, 2)
    kernel = kgs_cpu.pack(weight, 8, bias, 1, (1, 0, 0), 1, relu=True)
    ref = torch.relu(reference(x, weight, bias, 1, (1, 0, 0), 1))
    before = x.clone()
    for _ in range(2):
        assert_exact(kgs_cpu.conv(x, kernel), ref)
    assert torch.equal(x, before)                      # read, never written
    assert bool((ref[:, :, 0] == 0).any()) and bool((ref[:, :, -1] > 0).any())


@needs_kernel
@pytest.mark.parametrize('channels', [36, 512], ids=['one channel range', 'several channel ranges'])
def test_in_place_the_kernel_planes_of_a_channel_range_add_in_one_call(channels, threads):
    # A tile takes the kernel planes its output plane reads in one call. With all input channels in one
    # range that call starts from the bias and applies the ReLU; a block row keeping only kernel plane 0
    # reads nothing for the first output plane (T padding 1): the bias alone, through the ReLU. With 512
    # channels (every column kept: 64 channels of 3 columns reach the columns a call may hold) the
    # ranges add to the bias written first, and the ReLU follows the last.
    weight = kgs_weight(32, channels, (3, 1, 1), ratio=0.5 if channels < 64 else 0.0)
    weight[8:16] = 0                                   # a block row of bias only
    weight[16:24, :, 1:] = 0                           # a block row keeping kernel plane 0 alone
    bias = torch.randn(32)
    x = torch.randn(1, channels, 3, 4, 5)
    kernel = kgs_cpu.pack(weight, 8, bias, 1, (1, 0, 0), 1, relu=True)
    ref = torch.relu(reference(x, weight, bias, 1, (1, 0, 0), 1))
    assert torch.equal(ref[0, 16:24, 0], bias[16:24].clamp(min=0).view(8, 1, 1).expand(8, 4, 5))
    for _ in range(2):
        assert_exact(kgs_cpu.conv(x, kernel), ref)


@needs_kernel
def test_kernel_without_bias_with_strided_input_and_changing_shapes(threads):
    weight = kgs_weight(20, 8, 3)
    kernel = kgs_cpu.pack(weight, 8, None, 1, 1, 1)
    for shape in [(1, 8, 4, 8, 8), (3, 8, 5, 6, 7), (1, 8, 4, 8, 8), (2, 8, 4, 4, 20)]:
        x = torch.randn(shape)
        assert_exact(kgs_cpu.conv(x, kernel), reference(x, weight, None, 1, 1, 1))
    x = torch.randn(2, 6, 8, 9, 8).transpose(1, 4)[:, :, :5]           # (2, 8, 5, 9, 8), not contiguous
    assert_exact(kgs_cpu.conv(x, kernel), reference(x, weight, None, 1, 1, 1))
    x = torch.randn(2, 8, 4, 6, 6).to(memory_format=torch.channels_last_3d)
    assert_exact(kgs_cpu.conv(x, kernel), reference(x, weight, None, 1, 1, 1))


@needs_kernel
def test_block_rows_that_keep_nothing_give_their_bias_and_a_dense_weight_runs_whole(threads):
    weight = kgs_weight(24, 8, 3)
    weight[8:16] = 0                                   # one whole block row pruned
    weight[20:] = 0                                    # and half of the last one
    bias = torch.randn(24)
    x = torch.randn(1, 8, 4, 6, 9)
    kernel = kgs_cpu.pack(weight, 8, bias, 1, 1, 1)
    y = kgs_cpu.conv(x, kernel)
    assert_exact(y, reference(x, weight, bias, 1, 1, 1))
    assert torch.equal(y[0, 8:16], bias[8:16].view(8, 1, 1, 1).expand(8, 4, 6, 9))
    dense = torch.randn(16, 5, 3, 3, 3)
    kernel = kgs_cpu.pack(dense, 8, None, 1, 1, 1)
    assert kernel.kept_columns == 2 * 5 * 27
    assert_exact(kgs_cpu.conv(x[:, :5], kernel), reference(x[:, :5], dense, None, 1, 1, 1))


def test_the_kernel_runs_exactly_the_kept_columns_of_each_block_row():
    if not kgs_cpu.available():
        pytest.skip(kgs_cpu.why_unavailable())
    weight = kgs_weight(21, 12, 3, block=(8, 4), ratio=0.7)
    kernel = kgs_cpu.pack(weight, 8, None, 1, 1, 1)
    columns = weights = 0
    for first in range(0, 21, 8):                     # the rule written out: a column is kept if any filter uses it
        rows = weight[first:first + 8].reshape(len(weight[first:first + 8]), -1)
        kept = int((rows != 0).any(dim=0).sum())
        columns += kept
        weights += kept * rows.shape[0]
    assert kernel.kept_columns == columns and kernel.kept_weights == weights
    assert weights < 0.5 * weight.numel()


@needs_kernel
@pytest.mark.parametrize('side', [64, 1024])               # 128 KiB and 32 MiB outputs: every size is kept
def test_the_output_buffer_is_used_again_only_once_the_caller_has_let_it_go(side):
    weight, x = torch.randn(8, 1, 1, 1, 1), torch.randn(1, 1, 1, side, side)
    kernel = kgs_cpu.pack(weight, 8)
    first = kgs_cpu.conv(x, kernel)
    kept = first.clone()
    second = kgs_cpu.conv(x * 2, kernel)                 # `first` still held: a new buffer
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept)
    assert_exact(second, reference(x * 2, weight, None, 1, 0, 1))
    address = second.data_ptr()
    del second
    other = torch.empty(8 * side * side + 64)            # a freed buffer's addresses would go to this one
    third = kgs_cpu.conv(x * 3, kernel)                  # let go: its buffer again (kept), with the new result
    assert third.data_ptr() == address and other.data_ptr() != address and torch.equal(first, kept)
    assert_exact(third, reference(x * 3, weight, None, 1, 0, 1))


@needs_kernel
def test_kept_outputs_stay_within_the_bound_of_all_kernels_together():
    weight, x = torch.randn(8, 1, 1, 1, 1), torch.randn(1, 1, 1, 64, 64)
    size = 4 * (8 * 64 * 64 + kgs_cpu._load().lanes)            # bytes of one output buffer, slack included
    gc.collect()                                  # no other test's kernel let go (and counted off) midway
    gc.disable()
    previous = kgs_cpu.keep_outputs_up_to(kgs_cpu.kept_output_bytes() + size + size // 2)   # room for one
    try:
        before = kgs_cpu.kept_output_bytes()
        a, b = kgs_cpu.pack(weight, 8), kgs_cpu.pack(weight, 8)
        address = kgs_cpu.conv(x, a).data_ptr()           # let go at once
        assert kgs_cpu.kept_output_bytes() == before + size
        assert_exact(kgs_cpu.conv(x * 2, b), reference(x * 2, weight, None, 1, 0, 1))
        assert kgs_cpu.kept_output_bytes() == before + size          # b's would pass the bound: not kept
        out = kgs_cpu.conv(x * 3, a)
        assert out.data_ptr() == address                  # a's kept buffer again
        assert_exact(out, reference(x * 3, weight, None, 1, 0, 1))
        del out, a                                        # a's kept buffer is counted off
        assert kgs_cpu.kept_output_bytes() == before
        kgs_cpu.conv(x, b)
        assert kgs_cpu.kept_output_bytes() == before + size
        del b
        assert kgs_cpu.kept_output_bytes() == before
    finally:
        kgs_cpu.keep_outputs_up_to(previous)
        gc.enable()
    with pytest.raises(RuntimeError, match="bytes >= 0"):
        kgs_cpu.keep_outputs_up_to(-1)


@needs_kernel
def test_fma_peak_is_measured_and_cached():
    peak = kgs_cpu.fma_peak_gmacs(1)
    assert peak > 0.5                                   # any CPU of the last 20 years does far more
    assert kgs_cpu.fma_peak_gmacs(1) == peak
    assert kgs_cpu.fma_peak_gmacs() == kgs_cpu.fma_peak_gmacs(torch.get_num_threads())


@needs_kernel
def test_the_kernel_runs_on_every_thread_torch_is_given(threads):
    # at::parallel_for in an extension built without OpenMP runs on one thread whatever torch is told
    assert kgs_cpu.parallel_threads() == torch.get_num_threads()


POOLS = {   # kernel, stride, padding, input: C3D's pools (pool5 padded), S3D's, and odd sizes
    'c3d pool1 (1,2,2)': ((1, 2, 2), (1, 2, 2), 0, (1, 4, 3, 10, 12)),
    'c3d pool2 2': (2, 2, 0, (2, 5, 5, 9, 9)),
    'c3d pool5 2, padding (0,1,1)': (2, 2, (0, 1, 1), (1, 8, 2, 7, 7)),
    's3d pool1 (1,3,3) stride (1,2,2)': ((1, 3, 3), (1, 2, 2), (0, 1, 1), (2, 5, 4, 15, 16)),
    's3d branch4 3, stride 1, padding 1': (3, 1, 1, (1, 6, 4, 5, 5)),
    's3d pool4 2, stride (1,2,2)': (2, (1, 2, 2), 0, (1, 4, 4, 8, 8)),
    'one row, padded all round': (3, 1, 1, (1, 2, 3, 1, 5)),
    'padding in T and W only': (3, 1, (1, 0, 1), (1, 2, 3, 4, 5)),
    's3d pool3 3, stride 2, padding 1, long rows': (3, 2, 1, (1, 3, 7, 6, 37)),
    'stride 3 in W, 1 in T': ((2, 2, 3), (1, 2, 3), (1, 0, 1), (1, 2, 5, 7, 20)),
    'dilation 2': (3, 1, 1, (1, 3, 9, 8, 19), 2),
    'kernel planes 4, stride 1': ((4, 1, 2), 1, (2, 0, 1), (1, 2, 6, 3, 9)),
}


@needs_kernel
@pytest.mark.parametrize('pool', POOLS, ids=list(POOLS))
def test_compiled_max_pool_equals_pytorch_s_nan_included(pool, threads):
    kernel, stride, padding, shape, *dilation = POOLS[pool]
    dilation = dilation[0] if dilation else 1
    torch.manual_seed(0)
    x = torch.randn(shape)
    x.view(-1)[::37] = float('nan')                    # a NaN in a window wins, as in PyTorch
    x.view(-1)[5::41] = float('-inf')
    y = kgs_cpu.max_pool3d(x, kernel, stride, padding, dilation)
    ref = F.max_pool3d(x, kernel, stride, padding, dilation)
    assert torch.equal(y.isnan(), ref.isnan()) and bool(ref.isnan().any())
    assert torch.equal(y.nan_to_num(0.5), ref.nan_to_num(0.5))


# ----------------------------------------------------------------------------- the module in models

@needs_kernel
def test_compiled_module_equals_the_conv_and_rebuilds_when_its_weights_change():
    conv = pruned_conv(20, 12, 3, padding=1)
    module = CompiledKGSConv3d.from_conv(conv, 8)
    x = torch.randn(2, 12, 4, 7, 9)
    with torch.no_grad():
        assert_exact(module(x), reference(x, conv.weight, conv.bias, 1, 1, 1))
        kernel = module._kernel()
        other = pruned_conv(20, 12, 3, padding=1, seed=5)
        module.load_state_dict(CompiledKGSConv3d.from_conv(other, 8).state_dict())
        assert module._kernel() is not kernel
        assert_exact(module(x), reference(x, other.weight, other.bias, 1, 1, 1))


@needs_kernel
def test_compiled_module_with_gradients_or_copies_runs_as_kgsconv3d():
    conv = pruned_conv(12, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    module = CompiledKGSConv3d.from_conv(conv, 4)
    x = torch.randn(2, 8, 3, 9, 9, requires_grad=True)
    y = module(x)                                      # with gradients: the portable torch form
    assert y.grad_fn is not None
    assert_exact(y.detach(), reference(x.detach(), conv.weight.detach(), conv.bias.detach(), (1, 2, 2), (0, 1, 1), 1))
    with torch.no_grad():
        ref = module(x)
        twin = copy.deepcopy(module)
        assert_exact(twin(x), ref)
    meta = copy.deepcopy(module).to('meta')
    assert meta(torch.empty(2, 8, 3, 9, 9, device='meta')).shape == (2, 12, 3, 5, 5)


ARCHS = {'c3d': ((1, 3, 16, 32, 32), 'c3d_3.57x', {'crop_size': 32}),
         'r2+1d': ((2, 3, 8, 32, 32), 'r2+1d-pretrained_3.20x', {}),
         's3d': ((1, 3, 4, 32, 32), 's3d_2.09x', {})}


@needs_kernel
@pytest.mark.parametrize('arch', ARCHS)
def test_faster_model_runs_every_architecture_compiled_with_the_masked_model_s_outputs(arch, tmp_path):
    clip, profile, geometry = ARCHS[arch]
    torch.manual_seed(0)
    model = trained_looking(build_model(arch, 5, **geometry), seed=1)
    ratios = admm.load_profile(profile, model)
    admm.hard_prune(model, ratios, 'blk-kgs', (8, 4))
    x = torch.randn(clip)
    with torch.no_grad():
        ref = model(x)
        fast, report = faster_model(copy.deepcopy(model), arch, 'blk-kgs', (8, 4))
        y = fast(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=2e-5 * max(1.0, ref.abs().max().item()))
    compiled = {n for n, row in report['kgs'].items() if row['path'] == 'compiled'}
    assert compiled and compiled <= {n[:-len('.weight')] for n in ratios}
    assert all(type(fast.get_submodule(n)) is CompiledKGSConv3d for n in compiled)
    pools = [n for n, m in model.named_modules() if isinstance(m, nn.MaxPool3d)]
    assert report['pools'] == pools and all(type(fast.get_submodule(n)) is CompiledMaxPool3d for n in pools)
    batchnorms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm3d)]
    assert sorted(report['folded']) == sorted(batchnorms)      # each follows a conv in these three models
    # C3D's and S3D's ReLUs are applied by their forwards (models.fusion): each compiled conv takes its own
    # (S3D's BatchNorms are folded away); R(2+1)D's sit in Sequentials, or follow the residual sums
    if arch == 'r2+1d':
        assert report['relu_fused'] and not any(n.endswith('.relu') for n in report['relu_fused'])
    else:
        assert sorted(report['relu_fused']) == sorted(f'{n}.relu' for n in compiled)
        assert all(fast.get_submodule(n).relu for n in compiled)
    save_model(fast, tmp_path / 'fast.pt', arch, 5, **geometry)
    loaded = load_model(tmp_path / 'fast.pt')
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


@needs_kernel
def test_relus_after_compiled_convs_in_sequentials_are_fused_and_still_applied_without_the_kernel(monkeypatch):
    from models.slim import fuse_relu
    from models.sparse_conv import dense_exec
    model = nn.Sequential(pruned_conv(16, 8, 3, padding=1), nn.Identity(), nn.ReLU(inplace=True),
                          nn.Sequential(pruned_conv(12, 16, (3, 1, 1), padding=(1, 0, 0), seed=1)), nn.ReLU(),
                          nn.ReLU(), nn.Conv3d(12, 4, 1), nn.ReLU()).eval()
    x = torch.randn(2, 8, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
    sparse_exec(model, (8, 4), min_speedup=0)
    assert fuse_relu(model) == ['2', '4']              # not the second ReLU in a row, nor after a dense conv
    assert model[0].relu and model[3][0].relu and isinstance(model[4], nn.Identity)
    assert isinstance(model[5], nn.ReLU) and isinstance(model[7], nn.ReLU)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
        monkeypatch.setenv('RT3D_NO_COMPILED_KGS', '1')        # the torch path applies it too
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='ReLU'):
        dense_exec(model)


@needs_kernel
def test_a_relu_a_forward_applies_goes_into_a_compiled_conv_only_where_an_identity_lies_between(monkeypatch):
    from models.s3d import STConv3d
    from models.slim import fuse_relu
    from models.sparse_conv import dense_exec
    model, x, ref = kgs_pruned_c3d((8, 4))
    sparse_exec(model, (8, 4), min_speedup=0)         # the pruned convs compiled; conv1 and conv4a stay dense
    compiled = [n for n, m in model.named_children() if type(m) is CompiledKGSConv3d]
    assert compiled and 'conv1' not in compiled
    calls = []
    model.relu.register_forward_hook(lambda *args: calls.append(1))
    assert fuse_relu(model) == [f'{n}.relu' for n in compiled]
    with torch.no_grad():
        assert_same(model(x), ref)
        assert len(calls) == 8 - len(compiled) + 2         # the dense convs' ReLUs, and fc6's and fc7's
        monkeypatch.setenv('RT3D_NO_COMPILED_KGS', '1')   # the torch path applies the ReLU it holds
        assert_same(model(x), ref)
    monkeypatch.delenv('RT3D_NO_COMPILED_KGS')
    with pytest.raises(ValueError, match='ReLU'):
        dense_exec(model)
    # S3D's separable conv: a ReLU after a BatchNorm stays with the forward; after an Identity (where
    # fold_batchnorm leaves one) it goes into the conv
    block = trained_looking(STConv3d(8, 16, 3))
    with torch.no_grad():
        block.conv.weight.copy_(admm.project(block.conv.weight, 0.5, 'blk-kgs', (8, 4)))
        block.conv_t.weight.copy_(admm.project(block.conv_t.weight, 0.5, 'blk-kgs', (8, 4)))
    sparse_exec(block, (8, 4), min_speedup=0)
    block.bn_t = nn.Identity()
    x = torch.randn(1, 8, 4, 6, 6)
    with torch.no_grad():
        ref = block(x)
    assert fuse_relu(block) == ['conv_t.relu']
    assert block.conv_t.relu and not block.conv.relu
    with torch.no_grad():
        assert_same(block(x), ref)


@needs_kernel
def test_c3d_s_pool1_goes_into_its_compiled_conv1_and_reloads_so(tmp_path, monkeypatch):
    from models.slim import fuse_pool, fuse_relu
    model, x, _ = kgs_pruned_c3d((8, 4))
    with torch.no_grad():
        model.conv1.weight[:, :, 0] = 0                # pruned: compiled at min_speedup 0
        ref = model(x)
    sparse_exec(model, (8, 4), min_speedup=0)
    assert fuse_pool(model) == ['pool1'] and model.conv1.pool and isinstance(model.pool1, nn.Identity)
    assert fuse_pool(model) == []
    with torch.no_grad():
        assert_same(model(x), ref)                     # the forward's ReLU after the pooled conv1
        assert 'conv1.relu' in fuse_relu(model)
        assert_same(model(x), ref)                     # the ReLU, then the pool, in the kernel
        monkeypatch.setenv('RT3D_NO_COMPILED_KGS', '1')
        assert_same(model(x), ref)                     # and in the torch path
        monkeypatch.delenv('RT3D_NO_COMPILED_KGS')
        y = model(x)
    save_model(model, tmp_path / 'c3d.pt', 'c3d', 5, crop_size=32)
    loaded = load_model(tmp_path / 'c3d.pt')
    assert loaded.conv1.pool and loaded.conv1.relu and isinstance(loaded.pool1, nn.Identity)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
    with pytest.raises(ValueError, match='pool'):
        sparse_conv.dense_exec(model)

    class Net(nn.Module):                              # a pool of another shape stays a pool
        fusable_pools = (('conv', 'pool'),)

        def __init__(self):
            super().__init__()
            self.conv, self.pool = pruned_conv(8, 3, 3, padding=1), nn.MaxPool3d(2, 2)

        def forward(self, x):
            return self.pool(self.conv(x))

    net = Net().eval()
    sparse_exec(net, (8, 4), min_speedup=0)
    assert type(net.conv) is CompiledKGSConv3d and fuse_pool(net) == [] and not net.conv.pool


@needs_kernel
def test_saved_compiled_model_reloads_compiled_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = build_model('c3d', 5, crop_size=32).eval()
    admm.hard_prune(model, admm.load_profile('c3d_3.57x', model), 'blk-kgs', (8, 4))
    sparse_exec(model, (8, 4), min_speedup=0)
    save_model(model, tmp_path / 'm.pt', 'c3d', 5, crop_size=32)
    torch.load(tmp_path / 'm.pt', weights_only=True)
    loaded = load_model(tmp_path / 'm.pt')
    assert type(loaded.conv3b) is CompiledKGSConv3d
    x = torch.randn(1, 3, 16, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.conv3b._compiled[1] is not None          # it ran compiled


@needs_kernel
def test_measured_choice_may_run_an_unpruned_conv_compiled_and_keeps_its_reason():
    def model():
        return nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(),
                             pruned_conv(16, 16, 3, ratio=0.8, padding=1)).eval()
    converted, x = model(), torch.randn(1, 3, 4, 12, 12)
    with torch.no_grad():
        ref = converted(x)
    report = sparse_exec(converted, (8, 4), min_speedup=0, example_input=x, reps=1)
    assert report['0']['path'] == 'compiled' and report['0']['reason'] == 'no zeros'
    assert report['2']['path'] == 'compiled' and report['2']['measured_speedup'] > 0
    with torch.no_grad():
        torch.testing.assert_close(converted(x), ref, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize('speedup, min_speedup', [(1.05, 1.1), (0.95, 1.1), (0.5, 0.0)])
def test_an_unpruned_conv_takes_the_compiled_kernel_where_measured_faster_at_all(monkeypatch, speedup,
                                                                                 min_speedup):
    # The rule: a pruned conv needs `min_speedup`; an unpruned one (the same MACs either way) any speedup > 1,
    # or `min_speedup` where that is lower (0: every measured conv compiled, whatever the timing says).
    timed = []

    def fake_medians(fns, reps, clock=None):
        timed.append(len(fns))
        return [speedup, 1.0]          # dense, then compiled

    monkeypatch.setattr(sparse_conv, 'interleaved_medians', fake_medians)
    model = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.ReLU(),
                          pruned_conv(16, 16, 3, ratio=0.8, padding=1)).eval()
    report = sparse_exec(model, (8, 4), min_speedup=min_speedup, example_input=torch.randn(1, 3, 4, 12, 12),
                         reps=1)
    unpruned, pruned = speedup >= min(1.0, min_speedup), speedup >= min_speedup
    assert timed == [2, 2]
    assert report['0']['measured_speedup'] == report['2']['measured_speedup'] == speedup
    assert report['0']['path'] == ('compiled' if unpruned else 'dense') and report['0']['reason'] == 'no zeros'
    assert report['2']['path'] == ('compiled' if pruned else 'dense')
    assert report['2']['reason'] == ('' if pruned else f'measured {speedup:.2f}x < {min_speedup}x')
    assert isinstance(model[0], CompiledKGSConv3d) == unpruned and isinstance(model[2], CompiledKGSConv3d) == pruned


# ----------------------------------------------------------------------------- the fallback

def test_disabled_by_the_environment_the_torch_path_runs_and_says_why(monkeypatch, caplog):
    monkeypatch.setenv('RT3D_NO_COMPILED_KGS', '1')
    assert not kgs_cpu.available()
    assert 'RT3D_NO_COMPILED_KGS' in kgs_cpu.why_unavailable()
    model, x, ref = kgs_pruned_c3d((8, 4))
    with caplog.at_level(logging.INFO, logger='models'):
        report = sparse_exec(model, (8, 4), min_speedup=0)
    said = [r.getMessage() for r in caplog.records if 'not available' in r.getMessage()]
    assert len(said) == 1 and 'RT3D_NO_COMPILED_KGS' in said[0]
    assert report['conv3b']['path'] == 'kgs' and type(model.conv3b) is KGSConv3d
    with torch.no_grad():
        assert_same(model(x), ref)


def test_a_compiled_module_loaded_where_the_kernel_is_disabled_runs_the_torch_path(monkeypatch, caplog):
    conv = pruned_conv(16, 8, 3, padding=1)
    module = CompiledKGSConv3d.from_conv(conv, 8)
    monkeypatch.setenv('RT3D_NO_COMPILED_KGS', '1')
    monkeypatch.setitem(kgs_cpu._state, 'logged', False)
    x = torch.randn(1, 8, 4, 6, 6)
    with caplog.at_level(logging.WARNING, logger='models'), torch.no_grad():
        y, again = module(x), module(x)
    torch.testing.assert_close(y, conv(x), rtol=1e-4, atol=1e-5)
    assert torch.equal(y, again)
    said = [r.getMessage() for r in caplog.records if 'not available' in r.getMessage()]
    assert len(said) == 1 and 'RT3D_NO_COMPILED_KGS' in said[0]        # once per process, not per call


def test_compiled_pools_run_as_max_pool_where_the_kernel_is_disabled_or_gradients_flow(monkeypatch):
    pool = CompiledMaxPool3d(2, 2, (0, 1, 1))
    x = torch.randn(1, 4, 4, 7, 7, requires_grad=True)
    y = pool(x)
    assert y.grad_fn is not None and torch.equal(y, F.max_pool3d(x, 2, 2, (0, 1, 1)))
    monkeypatch.setenv('RT3D_NO_COMPILED_KGS', '1')
    with torch.no_grad():
        assert torch.equal(pool(x), F.max_pool3d(x, 2, 2, (0, 1, 1)))


PORTABLE_CHECK = """
import torch, torch.nn.functional as F
import admm
from models import kgs_cpu
assert kgs_cpu.isa() == 'portable' and kgs_cpu.available(), kgs_cpu.why_unavailable()
torch.manual_seed(0)
for o, i, k, s, p, shape in [(13, 6, 3, 1, 1, (2, 6, 3, 9, 7)),
                             (16, 7, (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 7, 2, 9, 20)),
                             (10, 9, (3, 1, 1), (2, 1, 1), (1, 0, 0), (1, 9, 5, 4, 6))]:
    w = admm.project(torch.randn(o, i, *((k,) * 3 if isinstance(k, int) else k)), 0.6, 'blk-kgs', (8, 4))
    x, b = torch.randn(shape), torch.randn(o)
    ref = F.conv3d(x.double(), w.double(), b.double(), s, p)
    y = kgs_cpu.conv(x, kgs_cpu.pack(w, 8, b, s, p))
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max(), (o, i, k)
w = admm.project(torch.randn(8, 3, 3, 3, 3), 0.3, 'blk-kgs', (8, 4))
x, b = torch.randn(1, 3, 2, 7, 9), torch.randn(8)
ref = F.max_pool3d(torch.relu(F.conv3d(x.double(), w.double(), b.double(), 1, 1)), (1, 2, 2), (1, 2, 2))
y = kgs_cpu.conv(x, kgs_cpu.pack(w, 8, b, 1, 1, relu=True, pool=True))        # conv1 -> ReLU -> pool1
assert y.shape == ref.shape and (y - ref).abs().max() <= 1e-5 * ref.abs().max()
x = torch.randn(1, 3, 4, 9, 10)
assert torch.equal(kgs_cpu.max_pool3d(x, 2, 2, (0, 1, 1)), F.max_pool3d(x, 2, 2, (0, 1, 1)))
for args in [(3, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1))]:
    assert torch.equal(kgs_cpu.max_pool3d(x, *args), F.max_pool3d(x, *args))
print('portable ok')
"""


def build_and_run(script, cwd, **env):
    """Run `script` in a fresh Python process (the kernel built there with `env`); its finished process."""
    if not (shutil.which('c++') and shutil.which('ninja')):
        pytest.skip('needs a compiler and ninja to build')
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'PYTHONPATH': root, **env}
    env.pop('RT3D_NO_COMPILED_KGS', None)
    return subprocess.run([sys.executable, '-c', script], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.e2e
def test_the_portable_build_computes_the_same(tmp_path):
    """The C++ path for CPUs without AVX2 (built here with RT3D_KGS_ISA=portable, in its own process)."""
    done = build_and_run(PORTABLE_CHECK, tmp_path, RT3D_KGS_ISA='portable')
    assert done.returncode == 0 and 'portable ok' in done.stdout, done.stderr[-2000:]


def test_a_failed_build_is_reported_with_the_compiler_s_error(monkeypatch, tmp_path):
    if not (shutil.which('c++') and shutil.which('ninja')):
        pytest.skip('needs a compiler and ninja to fail a build')
    source = tmp_path / 'broken.cpp'
    source.write_text('#error this kernel does not compile\n')
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'ext'))
    monkeypatch.delenv('RT3D_NO_COMPILED_KGS', raising=False)
    monkeypatch.setattr(kgs_cpu, 'SOURCE', str(source))
    monkeypatch.setattr(kgs_cpu, '_state', {})
    assert not kgs_cpu.available()
    reason = kgs_cpu.why_unavailable()
    assert 'could not be built' in reason and 'this kernel does not compile' in reason


NO_OPENMP_CHECK = """
import logging, torch, torch.nn.functional as F
import admm
from models import kgs_cpu
logging.basicConfig(level=logging.WARNING, format='%(message)s')
kgs_cpu.OPENMP = ['-fno-such-openmp-option']          # a compiler that refuses OpenMP
assert kgs_cpu.available(), kgs_cpu.why_unavailable()
torch.set_num_threads(2)
assert kgs_cpu.parallel_threads() == 1
w = admm.project(torch.randn(16, 6, 3, 3, 3), 0.6, 'blk-kgs', (8, 4))
x, b = torch.randn(1, 6, 4, 9, 11), torch.randn(16)
ref = F.conv3d(x.double(), w.double(), b.double(), 1, 1)
y = kgs_cpu.conv(x, kgs_cpu.pack(w, 8, b, 1, 1))
assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
print('one thread ok')
"""


@pytest.mark.e2e
def test_a_compiler_without_openmp_builds_a_one_thread_kernel_and_says_so(tmp_path):
    done = build_and_run(NO_OPENMP_CHECK, tmp_path, TORCH_EXTENSIONS_DIR=str(tmp_path / 'ext'))
    assert done.returncode == 0 and 'one thread ok' in done.stdout, done.stderr[-2000:]
    warning = [line for line in done.stderr.splitlines() if 'without OpenMP' in line]
    assert len(warning) == 1 and 'no-such-openmp-option' in warning[0] and 'one thread' in warning[0]
