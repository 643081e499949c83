"""Reweighted group regularisation: alpha, the penalty and its gradient, state, report."""
import pytest
import torch
from conftest import Tiny

import admm

RATIOS = {'conv2.weight': 0.5, 'fc.weight': 0.25}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny(45)                 # 45 filters: kgr's last block has padding rows


def explicit_groups(w, sparsity_type):
    """`(groups, members)` matrix of the weight's groups, gathered by index arithmetic (padding dropped)."""
    if sparsity_type == 'irregular':
        return list(w.reshape(-1, 1))
    o, i = w.shape[:2]
    w3 = w.reshape(o, i, -1)
    k = w3.shape[2]
    oi, ii, ki = torch.meshgrid(torch.arange(o), torch.arange(i), torch.arange(k), indexing='ij')
    ids = {'blk-kgs': ((oi // 8) * 1000 + ii // 4) * 100 + ki,
           'blk-vanilla': (oi // 8) * 1000 + ii // 4,
           'kgr': oi * 1000 + ii // 4,
           'kgc': ((oi // 8) * 1000 + ii // 4) * 100 + ki % min(9, k),
           'filter': oi}[sparsity_type]
    return [w3[ids == g] for g in ids.unique()]


def formula(w, sparsity_type, eps):
    """penalty / alpha from first principles, one group at a time."""
    groups = explicit_groups(w, sparsity_type)
    alphas = [1 / (g.detach().square().sum() + eps) for g in groups]
    return sum(a * g.square().sum().sqrt() for a, g in zip(alphas, groups)), sorted(a.item() for a in alphas)


@pytest.mark.parametrize('sparsity_type', admm.SPARSITY_TYPES)
def test_alpha_is_one_over_squared_group_norm_plus_eps(model, sparsity_type):
    ratios = {'conv2.weight': 0.5}
    rew = admm.Reweighted(model, ratios, sparsity_type=sparsity_type, eps=1e-2)
    rew.reweight()
    alpha = rew.alpha['conv2.weight'][0]
    real = admm.group_sizes(model.conv2.weight.shape, sparsity_type, (8, 4), 'cpu') > 0
    got = sorted(alpha[real.expand_as(alpha)].tolist())
    _, expected = formula(model.conv2.weight, sparsity_type, 1e-2)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('sparsity_type', admm.SPARSITY_TYPES)
def test_penalty_and_gradient_match_autograd_of_the_formula(model, sparsity_type):
    ratios = {'conv2.weight': 0.5}
    rew = admm.Reweighted(model, ratios, penalty=0.3, sparsity_type=sparsity_type, eps=1e-3)
    rew.reweight()
    w = model.conv2.weight
    loss = rew.loss()
    loss.backward()
    wd = w.detach().clone().requires_grad_()
    expected, _ = formula(wd, sparsity_type, 1e-3)
    (0.3 * expected).backward()
    assert loss.item() == pytest.approx(0.3 * expected.item(), rel=1e-5)
    assert torch.allclose(w.grad, wd.grad, rtol=1e-4, atol=1e-7)


def test_gradient_matches_finite_differences(model):
    rew = admm.Reweighted(model, {'conv2.weight': 0.5}, penalty=1.0, sparsity_type='blk-kgs')
    rew.reweight()
    w = model.conv2.weight
    rew.loss().backward()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = tuple(torch.randint(s, (1,), generator=g).item() for s in w.shape)
        with torch.no_grad():
            h = 1e-2
            w[idx] += h
            up = rew.loss().item()
            w[idx] -= 2 * h
            down = rew.loss().item()
            w[idx] += h
        assert w.grad[idx].item() == pytest.approx((up - down) / (2 * h), rel=2e-2, abs=1e-4)


def test_no_gradient_flows_into_alpha_and_zero_groups_get_a_zero_gradient(model):
    with torch.no_grad():
        model.conv2.weight.copy_(admm.project(model.conv2.weight, 0.5, 'blk-kgs'))
    rew = admm.Reweighted(model, {'conv2.weight': 0.5}, sparsity_type='blk-kgs')
    rew.reweight()
    assert not rew.alpha['conv2.weight'][0].requires_grad
    rew.loss().backward()
    grad = model.conv2.weight.grad
    assert torch.isfinite(grad).all()
    assert not grad[model.conv2.weight == 0].any()


def test_reweight_recomputes_alpha_from_the_current_weights(model):
    rew = admm.Reweighted(model, RATIOS, eps=1e-3)
    rew.reweight()
    before = rew.alpha['conv2.weight'][0].clone()
    with torch.no_grad():
        model.conv2.weight.mul_(0.5)
    assert torch.equal(rew.alpha['conv2.weight'][0], before)      # frozen until reweight()
    rew.reweight()
    norms_sq = 1 / before - 1e-3
    assert torch.allclose(rew.alpha['conv2.weight'][0], 1 / (0.25 * norms_sq + 1e-3), rtol=1e-4)


@pytest.mark.parametrize('sparsity_type', ['blk-kgs', 'kgr', 'kgc'])
def test_sgd_on_the_penalty_shrinks_the_weakest_groups_more_than_the_strongest(model, sparsity_type):
    w = model.conv2.weight
    grid_shape = admm.group_scores(w, sparsity_type).shape
    weak = (torch.arange(grid_shape.numel()) % 2 == 0).view(grid_shape)       # every other group 10x weaker
    with torch.no_grad():
        w.mul_(torch.where(admm.expand_groups(weak, w.shape, sparsity_type), 0.1, 1.0))
    real = (admm.group_sizes(w.shape, sparsity_type, (8, 4), 'cpu') > 0).expand(grid_shape)
    start = admm.group_scores(w, sparsity_type)
    rew = admm.Reweighted(model, {'conv2.weight': 0.5}, penalty=1e-3, sparsity_type=sparsity_type, eps=1e-4)
    opt = torch.optim.SGD([w], lr=2e-4)          # small steps: a subgradient step past zero would oscillate
    for step in range(10):
        if step % 5 == 0:
            rew.reweight()
        opt.zero_grad()
        rew.loss().backward()
        opt.step()
    shrink = 1 - admm.group_scores(w, sparsity_type).detach() / start
    weakest, strongest = shrink[weak & real].mean(), shrink[~weak & real].mean()
    assert 0 < 10 * strongest < weakest < 1


def test_weights_at_ratio_zero_and_unlisted_weights_are_not_penalised(model):
    rew = admm.Reweighted(model, {'conv2.weight': 0.5, 'fc.weight': 0.0})
    assert set(rew.params) == {'conv2.weight'}
    rew.reweight()
    rew.loss().backward()
    assert model.fc.weight.grad is None and model.conv1.weight.grad is None


def test_two_profiles_penalise_the_groups_of_both_types_divided_by_the_profile_count(model):
    # The follow-up: penalty / (number of profiles) * sum over every profile's groups.
    rew = admm.Reweighted(model, [{'conv2.weight': 0.5}, {'conv2.weight': 0.3}], penalty=1.0,
                          sparsity_type=['kgr', 'kgc'])
    rew.reweight()
    w = model.conv2.weight.detach()
    expected = (formula(w, 'kgr', 1e-6)[0] + formula(w, 'kgc', 1e-6)[0]) / 2
    assert rew.loss().item() == pytest.approx(expected.item(), rel=1e-5)


def test_default_eps_is_the_follow_ups(model):
    rew = admm.Reweighted(model, {'conv2.weight': 0.5})
    rew.reweight()
    _, expected = formula(model.conv2.weight, 'blk-kgs', 1e-6)
    real = admm.group_sizes(model.conv2.weight.shape, 'blk-kgs', (8, 4), 'cpu') > 0
    alpha = rew.alpha['conv2.weight'][0]
    assert sorted(alpha[real.expand_as(alpha)].tolist()) == pytest.approx(expected, rel=1e-5)


def test_alpha_is_recomputed_at_the_first_batch_after_each_milestone(model):
    # Milestone m: the follow-up recomputes at the first batch of epoch m + 1 (never at epoch 1).
    rew = admm.Reweighted(model, {'conv2.weight': 0.5}, milestones=(1, 3))
    assert [e for e in range(1, 7) if rew.due(e)] == [2, 4]
    rew.start()
    before = rew.alpha['conv2.weight'][0].clone()
    with torch.no_grad():
        model.conv2.weight.mul_(0.5)
    assert not rew.on_epoch(3) and torch.equal(rew.alpha['conv2.weight'][0], before)
    assert rew.on_epoch(4) and not torch.equal(rew.alpha['conv2.weight'][0], before)


def test_admm_updates_every_update_every_epochs_but_never_at_the_first(model):
    state = admm.ADMM(model, {'conv2.weight': 0.5}, rho=1e-3, update_every=3)
    assert [e for e in range(1, 11) if state.due(e)] == [4, 7, 10]


def test_state_dict_round_trip_restores_alpha(model, tmp_path):
    rew = admm.Reweighted(model, RATIOS, penalty=2e-6, sparsity_type='kgr')
    rew.reweight()
    torch.save(rew.state_dict(), tmp_path / 'rew.pt')
    with torch.no_grad():
        model.conv2.weight.mul_(3)
    other = admm.Reweighted(model, RATIOS, sparsity_type='kgr')
    other.load_state_dict(torch.load(tmp_path / 'rew.pt', weights_only=True))
    assert other.penalty == 2e-6
    for name in rew.alpha:
        assert all(torch.equal(a, b) for a, b in zip(other.alpha[name], rew.alpha[name]))
    assert other.loss().item() == pytest.approx(rew.loss().item())


def test_state_of_another_profile_or_type_is_refused(model):
    rew = admm.Reweighted(model, {'conv2.weight': 0.5}, sparsity_type='kgr')
    rew.reweight()
    with pytest.raises(KeyError, match='fc.weight'):
        admm.Reweighted(model, RATIOS, sparsity_type='kgr').load_state_dict(rew.state_dict())
    with pytest.raises(ValueError, match='conv2.weight has group grids'):
        admm.Reweighted(model, {'conv2.weight': 0.5}, sparsity_type='blk-kgs').load_state_dict(rew.state_dict())


def test_loss_before_reweight_is_an_error(model):
    with pytest.raises(RuntimeError, match='reweight'):
        admm.Reweighted(model, RATIOS).loss()


def test_report_counts_near_zero_entries_and_small_groups(model):
    with torch.no_grad():
        model.conv2.weight.copy_(admm.project(model.conv2.weight, 0.5, 'kgr'))
    rew = admm.Reweighted(model, {'conv2.weight': 0.5}, sparsity_type='kgr')
    row = rew.report()['conv2.weight']
    w = model.conv2.weight
    assert row['near_zero'] == pytest.approx((w.abs() < 1e-4).float().mean().item())
    # 45 filters x 4 channel blocks are real kgr groups; the pruned ones are exactly the zero rows.
    zero_groups = (w.reshape(45, 4, 4, -1) == 0).all(dim=(2, 3)).sum().item()
    assert row['small_groups'] == pytest.approx(zero_groups / (45 * 4))
