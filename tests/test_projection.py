"""admm.project: the group rules of docs/algorithm.md section 3."""
import numpy as np
import pytest
import torch
from conftest import random_weight
from reference import project_reference

import admm

TYPES = ['blk-kgs', 'blk-vanilla', 'filter', 'irregular']
SHAPES = [(64, 32, 3, 3, 3), (45, 3, 3, 7, 7), (13, 7, 2, 2, 2), (16, 8, 3, 3), (20, 10)]


def groups_of(weight, sparsity_type, block_size=(8, 4)):
    """Group ids of every element, built independently of admm (index arithmetic)."""
    o, i = weight.shape[0], weight.shape[1]
    k = int(np.prod(weight.shape[2:])) if weight.dim() > 2 else 1
    oi, ii, ki = np.meshgrid(np.arange(o), np.arange(i), np.arange(k), indexing='ij')
    gm, gn = block_size
    if sparsity_type == 'irregular':
        ids = np.arange(weight.numel()).reshape(o, i, k)
    elif sparsity_type == 'filter':
        ids = oi
    elif sparsity_type == 'blk-vanilla':
        ids = (oi // gm) * 10_000 + ii // gn
    else:
        ids = ((oi // gm) * 10_000 + ii // gn) * 1000 + ki
    return ids.reshape(weight.shape)


@pytest.mark.parametrize('sparsity_type', TYPES)
@pytest.mark.parametrize('shape', SHAPES)
def test_matches_the_plain_reference(shape, sparsity_type):
    w = random_weight(shape)
    for ratio in (0.25, 0.5, 0.8):
        expected = project_reference(w.numpy(), ratio, sparsity_type)
        assert np.array_equal(admm.project(w, ratio, sparsity_type).numpy(), expected)


@pytest.mark.parametrize('sparsity_type', TYPES)
@pytest.mark.parametrize('shape', SHAPES)
def test_every_group_is_all_zero_or_untouched(shape, sparsity_type):
    w = random_weight(shape, seed=1)
    out = admm.project(w, 0.6, sparsity_type).numpy()
    ids = groups_of(w, sparsity_type)
    for gid in np.unique(ids):
        member = ids == gid
        zeroed = out[member] == 0
        assert zeroed.all() or np.array_equal(out[member], w.numpy()[member])


@pytest.mark.parametrize('sparsity_type', TYPES)
def test_pruned_fraction_of_groups_follows_the_ratio(sparsity_type):
    w = random_weight((64, 32, 3, 3, 3), seed=2)
    ids = groups_of(w, sparsity_type)
    out = admm.project(w, 0.7, sparsity_type).numpy()
    uniq = np.unique(ids)
    pruned = sum((out[ids == g] == 0).all() for g in uniq) / len(uniq)
    # numpy's percentile with `<=` prunes floor(r * (n - 1)) + 1 groups of distinct scores
    assert pruned == (np.floor(0.7 * (len(uniq) - 1)) + 1) / len(uniq)


def test_kgs_prunes_the_same_positions_in_every_kernel_of_a_block():
    w = random_weight((16, 8, 3, 3, 3), seed=3)
    out = admm.project(w, 0.5, 'blk-kgs')
    zero = (out == 0).reshape(2, 8, 2, 4, 27)
    assert torch.equal(zero.all(dim=(1, 3)), zero.any(dim=(1, 3)))


def test_vanilla_removes_whole_kernels_of_a_block():
    w = random_weight((16, 8, 3, 3, 3), seed=4)
    zero = (admm.project(w, 0.5, 'blk-vanilla') == 0).reshape(2, 8, 2, 4, 27)
    assert torch.equal(zero.all(dim=(1, 3, 4)), zero.any(dim=(1, 3, 4)))


def test_padding_blocks_are_scored_by_their_real_entries():
    # 3 input channels in blocks of 4: the padded column must not make the block look weak.
    w = torch.ones(8, 3, 1, 1, 1)
    w[:, :, 0, 0, 0] = 1.0
    scores = admm.group_scores(w, 'blk-kgs')
    assert torch.allclose(scores, torch.ones_like(scores))


def test_score_divides_by_the_non_zero_count():
    w = torch.zeros(8, 4, 1, 1, 2)
    w[:, :, 0, 0, 0] = 1.0             # 32 ones: norm sqrt(32), 32 non-zeros -> 1
    w[0, 0, 0, 0, 1] = 3.0             # one 3: norm 3, 1 non-zero -> 3
    scores = admm.group_scores(w, 'blk-kgs').flatten()
    assert scores.tolist() == pytest.approx([1.0, 3.0])


@pytest.mark.parametrize('sparsity_type', TYPES)
def test_ratio_zero_is_a_no_op(sparsity_type):
    w = random_weight((45, 3, 3, 3, 3))
    assert torch.equal(admm.project(w, 0.0, sparsity_type), w)


@pytest.mark.parametrize('sparsity_type', TYPES)
def test_projection_is_idempotent(sparsity_type):
    w = random_weight((45, 12, 3, 3, 3), seed=5)
    once = admm.project(w, 0.5, sparsity_type)
    assert torch.equal(admm.project(once, 0.5, sparsity_type), once)


def test_ties_at_the_threshold_are_pruned():
    w = torch.ones(8, 8, 1, 1, 1)          # two blocks with equal scores: both are at the threshold
    assert torch.count_nonzero(admm.project(w, 0.3, 'blk-vanilla')) == 0


def test_keeps_shape_dtype_and_does_not_modify_the_input():
    w = random_weight((45, 3, 3, 3, 3)).double()
    before = w.clone()
    out = admm.project(w, 0.5, 'blk-kgs')
    assert out.shape == w.shape and out.dtype == w.dtype
    assert torch.equal(w, before)


@pytest.mark.parametrize('sparsity_type', TYPES)
def test_kept_group_grid_expands_to_the_non_zero_pattern(sparsity_type):
    w = random_weight((45, 3, 3, 3, 3), seed=6)
    out, keep = admm.project(w, 0.5, sparsity_type, return_keep=True)
    assert keep.dtype == torch.bool
    assert torch.equal(admm.expand_groups(keep, w.shape, sparsity_type), out != 0)


def test_custom_block_size():
    w = random_weight((16, 16, 3, 3, 3), seed=7)
    out = admm.project(w, 0.5, 'blk-kgs', block_size=(4, 2))
    zero = (out == 0).reshape(4, 4, 8, 2, 27)
    assert torch.equal(zero.all(dim=(1, 3)), zero.any(dim=(1, 3)))
    assert np.array_equal(out.numpy(), project_reference(w.numpy(), 0.5, 'blk-kgs', (4, 2)))


@pytest.mark.parametrize('bad, message', [
    (dict(ratio=1.0), 'in \\[0, 1\\)'), (dict(ratio=-0.1), 'in \\[0, 1\\)'),
    (dict(sparsity_type='column'), 'unknown sparsity type'), (dict(block_size=(0, 4)), 'block size'),
])
def test_bad_arguments_are_refused(bad, message):
    args = dict(weight=random_weight((8, 4, 3, 3, 3)), ratio=0.5, sparsity_type='blk-kgs', block_size=(8, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        admm.project(**args)


def test_percentile_matches_numpy():
    values = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    for q in (0, 12.5, 50, 73.3, 99.9):
        assert admm.percentile(values, q).item() == pytest.approx(np.percentile(values.numpy(), q), rel=1e-6)


def test_percentile_along_a_dim_matches_numpys_axis():
    values = torch.rand(7, 9, 5, generator=torch.Generator().manual_seed(1))
    for q in (0, 12.5, 50, 73.3, 100):
        for dim in (0, 1, 2):
            got = admm.percentile(values, q, dim=dim)
            want = np.percentile(values.numpy(), q, axis=dim, keepdims=True)
            assert got.shape == want.shape
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('sparsity_type', admm.SPARSITY_TYPES)   # kgr and kgc included
def test_cuda_agrees_with_cpu(sparsity_type):
    w = random_weight((64, 45, 3, 3, 3), seed=8)
    cpu = admm.project(w, 0.55, sparsity_type)
    gpu = admm.project(w.cuda(), 0.55, sparsity_type)
    assert gpu.device.type == 'cuda'
    assert torch.equal(gpu.cpu() != 0, cpu != 0)
    assert torch.allclose(gpu.cpu(), cpu)


def test_a_block_larger_than_every_weight_is_refused_before_any_padding():
    shapes = [(64, 3, 3, 3, 3), (128, 64, 3, 3, 3)]
    admm.check_block_size(shapes, (128, 64))                     # as large as the widest weight: fine
    with pytest.raises(ValueError, match=r'larger than every pruned weight .* use gM <= 128 and gN <= 64'):
        admm.check_block_size(shapes, (10000, 10000))
    with pytest.raises(ValueError, match='gN <= 64'):
        admm.check_block_size(shapes, (8, 65))
