"""Balanced kernel-group sparsity (kgr, kgc) and several profiles at once."""
import math

import numpy as np
import pytest
import torch
from conftest import Tiny, random_weight
from reference import project_reference

import admm

BALANCED = ['kgr', 'kgc']
# 45 filters and 3 input channels pad both block dims; K = 27, 3 (a 3x1x1 kernel), 49 (pads kgc's last chunk).
SHAPES = [(64, 32, 3, 3, 3), (45, 3, 3, 3, 3), (45, 3, 3, 1, 1), (16, 8, 1, 7, 7), (13, 7, 2, 2, 2)]


def kgr_rows_pruned(out, block_size=(8, 4)):
    """`(Ob, gM, Ib)`: whether each filter row of each block is all zero (padding rows and columns count as zero)."""
    o, i = out.shape[:2]
    gm, gn = block_size
    zero_kernels = (out.reshape(o, i, -1) == 0).all(dim=2).float()
    padded = torch.nn.functional.pad(zero_kernels, (0, -i % gn, 0, -o % gm), value=1)
    return padded.view(-(-o // gm), gm, -(-i // gn), gn).bool().all(dim=3)


def kgc_groups_pruned(out, block_size=(8, 4)):
    """Per block: pruned kgc groups (position index j whose entries are zero in every chunk and kernel)."""
    view, _ = admm.grid_view(out, 'kgc', block_size)
    real = admm.group_sizes(out.shape, 'kgc', block_size, out.device) > 0
    nonzero = (view != 0).sum(dim=(1, 3, 4), keepdim=True)
    return ((nonzero == 0) & real).flatten(0, -2).sum(dim=1)              # (blocks,)


@pytest.mark.parametrize('sparsity_type', BALANCED)
@pytest.mark.parametrize('shape', SHAPES)
def test_matches_the_plain_reference(shape, sparsity_type):
    w = random_weight(shape)
    for ratio in (0.2, 0.5, 0.8):
        expected = project_reference(w.numpy(), ratio, sparsity_type)
        assert np.array_equal(admm.project(w, ratio, sparsity_type).numpy(), expected), ratio


@pytest.mark.parametrize('ratio', [0.1, 0.25, 0.5, 0.6, 0.8])
def test_kgr_prunes_exactly_ceil_gm_ratio_rows_in_every_block(ratio):
    w = random_weight((64, 32, 3, 3, 3), seed=1)
    pruned = kgr_rows_pruned(admm.project(w, ratio, 'kgr'))
    assert (pruned.sum(dim=1) == math.ceil(round(8 * ratio, 9))).all()


def test_kgr_edge_blocks_count_padding_rows_as_pruned_first():
    # 45 filters: the last block has 5 real rows and 3 padding rows. At ratio 0.5 every block
    # prunes 4 rows; there 3 are padding, so exactly 1 real row goes and 4 stay, as in a full block.
    w = random_weight((45, 3, 3, 3, 3), seed=2)
    pruned = kgr_rows_pruned(admm.project(w, 0.5, 'kgr'))
    assert (pruned.sum(dim=1) == 4).all()
    real_kept = (~pruned[:, :, 0]).sum(dim=1)
    assert real_kept.tolist() == [4, 4, 4, 4, 4, 4]


def test_kgr_ties_go_to_the_lower_row_index():
    w = torch.ones(16, 4, 3, 3, 3)
    out = admm.project(w, 0.25, 'kgr')
    zero_rows = (out.reshape(16, -1) == 0).all(dim=1)
    assert zero_rows.nonzero().flatten().tolist() == [0, 1, 8, 9]


def test_kgr_ratio_that_would_prune_every_row_is_refused():
    with pytest.raises(ValueError, match=r'kgr at ratio 0\.9 .* whole weight; use a ratio <= 0\.875'):
        admm.project(random_weight((16, 8, 3, 3, 3)), 0.9, 'kgr')
    assert admm.project(random_weight((16, 8, 3, 3, 3)), 0.875, 'kgr').count_nonzero() > 0


def test_kgr_group_is_one_filter_row_of_a_block():
    w = random_weight((16, 8, 3, 3, 3), seed=3)
    zero = (admm.project(w, 0.5, 'kgr') == 0).reshape(2, 8, 2, 4, 27)
    assert torch.equal(zero.all(dim=(3, 4)), zero.any(dim=(3, 4)))


@pytest.mark.parametrize('shape', [(64, 32, 3, 3, 3), (45, 3, 3, 3, 3), (16, 8, 1, 7, 7), (45, 3, 3, 1, 1)])
@pytest.mark.parametrize('ratio', [0.2, 0.5, 0.8])
def test_kgc_prunes_the_same_number_of_groups_in_every_block(shape, ratio):
    w = random_weight(shape, seed=4)
    groups = min(9, math.prod(shape[2:]))
    pruned = kgc_groups_pruned(admm.project(w, ratio, 'kgc'))
    # numpy's percentile with `<=` over distinct scores prunes floor(r * (n - 1)) + 1 of n.
    assert (pruned == math.floor(ratio * (groups - 1)) + 1).all()


def test_kgc_prunes_the_same_position_of_every_chunk_in_every_kernel_of_a_block():
    w = random_weight((16, 8, 3, 3, 3), seed=5)
    zero = (admm.project(w, 0.5, 'kgc') == 0).reshape(2, 8, 2, 4, 3, 9)
    assert torch.equal(zero.all(dim=(1, 3, 4)), zero.any(dim=(1, 3, 4)))


def test_kgc_pads_the_last_chunk_of_a_49_position_kernel():
    # 1x7x7: chunks 0..4 are full, chunk 5 holds positions 45..48 (j = 0..3) and 5 padding slots.
    w = random_weight((8, 4, 1, 7, 7), seed=6)
    out = admm.project(w, 0.5, 'kgc').reshape(8, 4, 49)
    pruned_positions = (out == 0).all(dim=(0, 1)).nonzero().flatten()
    js = set((pruned_positions % 9).tolist())
    assert len(js) == 5 and all(set(range(j, 49, 9)) <= set(pruned_positions.tolist()) for j in js)


def test_kgc_refuses_single_position_kernels():
    with pytest.raises(ValueError, match=r'kgc .* shape \(45, 3\) has one position per kernel'):
        admm.project(random_weight((45, 3)), 0.5, 'kgc')
    assert torch.equal(admm.project(random_weight((45, 3)), 0.0, 'kgc'), random_weight((45, 3)))


@pytest.mark.parametrize('shape, sparsity_type', [(s, t) for s in SHAPES for t in BALANCED] + [((45, 3), 'kgr')])
def test_every_group_is_all_zero_or_untouched(shape, sparsity_type):
    w = random_weight(shape, seed=7)
    out, keep = admm.project(w, 0.6, sparsity_type, return_keep=True)
    mask = admm.expand_groups(keep, shape, sparsity_type)
    assert torch.equal(out[mask], w[mask])
    assert not out[~mask].any()
    # Every kept group keeps at least one non-zero (random weights have no zeros of their own).
    view, dims = admm.grid_view(out, sparsity_type, (8, 4))
    real = admm.group_sizes(shape, sparsity_type, (8, 4), out.device) > 0
    assert torch.equal((view != 0).sum(dim=dims, keepdim=True) > 0, keep & real)


@pytest.mark.parametrize('sparsity_type', BALANCED)
@pytest.mark.parametrize('shape', [(45, 3, 3, 3, 3), (45, 3, 3, 1, 1), (45, 3)])
def test_ratio_zero_is_a_no_op(shape, sparsity_type):
    w = random_weight(shape)
    assert torch.equal(admm.project(w, 0.0, sparsity_type), w)


@pytest.mark.parametrize('shape, sparsity_type', [((45, 12, 3, 3, 3), 'kgr'), ((45, 12, 3, 3, 3), 'kgc'),
                                                   ((45, 3, 3, 1, 1), 'kgr'), ((45, 3, 3, 1, 1), 'kgc'),
                                                   ((45, 3), 'kgr')])
def test_projection_is_idempotent(shape, sparsity_type):
    w = random_weight(shape, seed=8)
    once = admm.project(w, 0.5, sparsity_type)
    assert torch.equal(admm.project(once, 0.5, sparsity_type), once)


@pytest.mark.parametrize('sparsity_type', BALANCED)
def test_custom_block_size_matches_the_reference(sparsity_type):
    w = random_weight((20, 12, 3, 3, 3), seed=9)
    out = admm.project(w, 0.5, sparsity_type, block_size=(4, 2))
    assert np.array_equal(out.numpy(), project_reference(w.numpy(), 0.5, sparsity_type, (4, 2)))


def test_pruned_entries_are_positive_zeros():
    w = -random_weight((16, 8, 3, 3, 3)).abs()
    for sparsity_type in admm.SPARSITY_TYPES:
        out = admm.project(w, 0.5, sparsity_type)
        assert not torch.signbit(out[out == 0]).any(), sparsity_type


def test_balanced_types_are_block_types():
    assert {'kgr', 'kgc'} <= set(admm.BLOCK_TYPES) <= set(admm.SPARSITY_TYPES)


# ----------------------------------------------------------------------------- several profiles at once

def test_combined_masks_multiply_and_are_computed_on_the_same_input():
    w = random_weight((32, 16, 3, 3, 3), seed=10)
    out = admm.combined_project(w, [(0.5, 'kgr'), (0.3, 'kgc')])
    expected = w * (admm.project(w, 0.5, 'kgr') != 0) * (admm.project(w, 0.3, 'kgc') != 0)
    assert torch.equal(out, expected)
    assert torch.equal(admm.combined_project(w, [(0.3, 'kgc'), (0.5, 'kgr')]), out)


def test_combined_with_one_rule_is_project():
    w = random_weight((32, 16, 3, 3, 3), seed=11)
    out, keeps = admm.combined_project(w, [(0.5, 'blk-kgs')], return_keep=True)
    assert torch.equal(out, admm.project(w, 0.5, 'blk-kgs'))
    assert len(keeps) == 1 and torch.equal(keeps[0], admm.keep_groups(w, 0.5, 'blk-kgs'))


def test_weight_rules_gather_every_profile_that_lists_a_weight():
    rules = admm.weight_rules([{'a': 0.5, 'b': 0.2}, {'a': 0.3}], ['kgr', 'kgc'])
    assert rules == {'a': [(0.5, 'kgr'), (0.3, 'kgc')], 'b': [(0.2, 'kgr')]}
    assert admm.weight_rules({'a': 0.5}, 'blk-kgs') == {'a': [(0.5, 'blk-kgs')]}


@pytest.mark.parametrize('profiles, types', [([{'a': 0.5}, {'a': 0.3}], ['kgr', 'kgc', 'blk-kgs']),
                                             ([{'a': 0.5}], ['kgr', 'kgc'])])
def test_profiles_and_types_of_different_counts_are_refused(profiles, types):
    with pytest.raises(ValueError, match=r'profiles and \d sparsity types'):
        admm.weight_rules(profiles, types)


def test_hard_prune_with_two_profiles_returns_one_index_per_profile():
    torch.manual_seed(0)
    model = Tiny(24)
    before = model.conv2.weight.detach().clone()
    a, b = {'conv2.weight': 0.5, 'fc.weight': 0.25}, {'conv2.weight': 0.3}
    kept = admm.hard_prune(model, [a, b], ['kgr', 'kgc'])
    assert isinstance(kept, list) and set(kept[0]) == {'conv2.weight', 'fc.weight'} and set(kept[1]) == {'conv2.weight'}
    assert torch.equal(model.conv2.weight, admm.combined_project(before, [(0.5, 'kgr'), (0.3, 'kgc')]))
    mask = (admm.expand_groups(kept[0]['conv2.weight'], before.shape, 'kgr')
            & admm.expand_groups(kept[1]['conv2.weight'], before.shape, 'kgc'))
    assert torch.equal(model.conv2.weight != 0, mask)


def test_admm_with_two_profiles_projects_onto_both():
    torch.manual_seed(0)
    model = Tiny(24)
    state = admm.ADMM(model, [{'conv2.weight': 0.5}, {'conv2.weight': 0.3}], rho=1e-3, sparsity_type=['kgr', 'kgc'])
    state.initialize()
    w = model.conv2.weight
    assert torch.equal(state.Z['conv2.weight'], admm.combined_project(w, [(0.5, 'kgr'), (0.3, 'kgc')]))
    state.update()
    assert state.loss().item() >= 0


@pytest.mark.parametrize('sparsity_type', BALANCED)
def test_admm_and_hard_prune_accept_the_balanced_types(sparsity_type):
    torch.manual_seed(0)
    model = Tiny(24)
    state = admm.ADMM(model, {'conv2.weight': 0.5}, rho=1e-3, sparsity_type=sparsity_type)
    state.initialize()
    assert torch.equal(state.Z['conv2.weight'], admm.project(model.conv2.weight, 0.5, sparsity_type))
    kept = admm.hard_prune(model, {'conv2.weight': 0.5}, sparsity_type)
    assert torch.equal(model.conv2.weight, state.Z['conv2.weight'])
    assert torch.equal(admm.expand_groups(kept['conv2.weight'], (24, 16, 3, 3, 3), sparsity_type),
                       model.conv2.weight != 0)


# The follow-up's rule for kgr / kgc: a group's score is its plain L2 norm. Below, the two
# groups score 2 and 3 by that rule but 2 / sqrt(1) = 2 and 3 / sqrt(4) = 1.5 with the
# original's normalisation by the non-zero count, so the two rules prune different groups.

def test_kgr_scores_rows_by_their_plain_l2_norm():
    w = torch.tensor([[2.0, 0, 0, 0], [1.5, 1.5, 1.5, 1.5]]).view(2, 4, 1, 1, 1)
    out = admm.project(w, 0.5, 'kgr', block_size=(2, 4))
    assert not out[0].any() and torch.equal(out[1], w[1])              # the row of norm 2 goes


def test_kgc_scores_positions_by_their_plain_l2_norm():
    w = torch.zeros(2, 2, 2, 1, 1)
    w[0, 0, 0] = 2.0                                                     # position 0: one entry, norm 2
    w[:, :, 1] = 1.5                                                     # position 1: four entries, norm 3
    out = admm.project(w, 0.5, 'kgc', block_size=(2, 2))
    assert not out[:, :, 0].any() and torch.equal(out[:, :, 1], w[:, :, 1])


def test_filter_scores_filters_by_their_plain_l2_norm():
    # The original's filter rule: filter 0 (one entry, norm 2) goes before filter 1 (four
    # entries, norm 3); divided by sqrt(non-zeros) it would be the other way round (2 > 1.5).
    w = torch.tensor([[2.0, 0, 0, 0], [1.5, 1.5, 1.5, 1.5]]).view(2, 4, 1, 1, 1)
    out = admm.project(w, 0.5, 'filter')
    assert not out[0].any() and torch.equal(out[1], w[1])


def test_blk_kgs_keeps_the_original_normalisation_on_the_same_weights():
    w = torch.zeros(2, 2, 2, 1, 1)
    w[0, 0, 0] = 2.0
    w[:, :, 1] = 1.5
    out = admm.project(w, 0.5, 'blk-kgs', block_size=(2, 2))
    assert torch.equal(out[:, :, 0], w[:, :, 0]) and not out[:, :, 1].any()   # 2 / 1 beats 3 / 2


@pytest.mark.parametrize('sparsity_type', BALANCED)
def test_second_pruning_round_matches_the_reference(sparsity_type):
    # A model pruned once holds exact zeros (--combine-progressive): there the two rules differ.
    w = random_weight((45, 12, 3, 3, 3), seed=5)
    w = w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(6)) > 0.4)
    for ratio in (0.3, 0.6):
        expected = project_reference(w.numpy(), ratio, sparsity_type)
        assert np.array_equal(admm.project(w, ratio, sparsity_type).numpy(), expected), ratio
