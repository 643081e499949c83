"""ADMM Z/U updates, the penalty, hard pruning and the retraining masks."""
import pytest
import torch
from conftest import Tiny

import admm

RATIOS = {'conv2.weight': 0.5, 'fc.weight': 0.25}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny()


def test_initialize_sets_z_to_the_projection_and_u_to_zero(model):
    state = admm.ADMM(model, RATIOS, rho=1e-2)
    state.initialize()
    for name, w in state.params.items():
        assert torch.equal(state.Z[name], admm.project(w, RATIOS[name], 'blk-kgs'))
        assert not state.U[name].any()


def test_update_projects_w_plus_u_and_accumulates_the_residual(model):
    state = admm.ADMM(model, RATIOS, rho=1e-2)
    state.initialize()
    with torch.no_grad():
        for w in state.params.values():
            w.add_(0.1)
    u_before = {n: u.clone() for n, u in state.U.items()}
    state.update()
    for name, w in state.params.items():
        z = admm.project(w + u_before[name], RATIOS[name], 'blk-kgs')
        assert torch.equal(state.Z[name], z)
        assert torch.allclose(state.U[name], u_before[name] + w - z)


def test_seed_penalty_counts_only_entries_where_z_is_zero(model):
    rho = 0.3
    state = admm.ADMM(model, RATIOS, rho=rho)
    state.initialize()
    with torch.no_grad():
        for u in state.U.values():
            u.normal_()
    state._precompute()
    expected = sum(0.5 * rho * (((w + state.U[n]) * (state.Z[n] == 0)) ** 2).sum() for n, w in state.params.items())
    assert state.loss().item() == pytest.approx(expected.item(), rel=1e-5)


def test_textbook_penalty_is_the_full_augmented_lagrangian(model):
    rho = 0.3
    state = admm.ADMM(model, RATIOS, rho=rho, penalty='textbook')
    state.initialize()
    with torch.no_grad():
        for w in state.params.values():
            w.add_(0.05)
    expected = sum(0.5 * rho * ((w - state.Z[n] + state.U[n]) ** 2).sum() for n, w in state.params.items())
    assert state.loss().item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize('penalty', ['seed', 'textbook'])
def test_penalty_gradient_matches_autograd_of_the_formula(model, penalty):
    state = admm.ADMM(model, RATIOS, rho=0.7, penalty=penalty)
    state.initialize()
    with torch.no_grad():
        for n in state.U:
            state.U[n].normal_()
            state.params[n].add_(0.01)
    state._precompute()
    state.loss().mul(2.0).backward()
    for n, w in state.params.items():
        wd = w.detach().clone().requires_grad_()
        if penalty == 'seed':
            f = 0.5 * 0.7 * (((wd + state.U[n]) * (state.Z[n] == 0)) ** 2).sum()
        else:
            f = 0.5 * 0.7 * ((wd - state.Z[n] + state.U[n]) ** 2).sum()
        (2.0 * f).backward()
        assert torch.allclose(w.grad, wd.grad, atol=1e-6)


def test_penalty_pulls_pruned_entries_toward_zero(model):
    state = admm.ADMM(model, {'conv2.weight': 0.5}, rho=1.0)
    state.initialize()
    w = state.params['conv2.weight']
    opt = torch.optim.SGD([w], lr=0.5)
    pruned = state.Z['conv2.weight'] == 0
    before = w[pruned].abs().sum().item()
    for _ in range(5):
        opt.zero_grad()
        state.loss().backward()
        opt.step()
    assert w[pruned].abs().sum().item() < 0.1 * before


def test_state_dict_round_trip(model):
    state = admm.ADMM(model, RATIOS, rho=1e-3)
    state.initialize()
    state.update()
    saved = state.state_dict()
    other = admm.ADMM(model, RATIOS, rho=1e-3)
    other.load_state_dict(saved)
    for n in RATIOS:
        assert torch.equal(other.Z[n], state.Z[n]) and torch.equal(other.U[n], state.U[n])
    assert other.loss().item() == pytest.approx(state.loss().item())


def test_state_dict_from_another_profile_is_refused(model):
    state = admm.ADMM(model, {'conv2.weight': 0.5}, rho=1e-3)
    state.initialize()
    other = admm.ADMM(model, RATIOS, rho=1e-3)
    with pytest.raises(KeyError, match='fc.weight'):
        other.load_state_dict(state.state_dict())


def test_loss_before_initialize_is_an_error(model):
    with pytest.raises(RuntimeError, match='initialize'):
        admm.ADMM(model, RATIOS, rho=1e-3).loss()


def test_report_gives_distance_and_near_zero_fraction(model):
    state = admm.ADMM(model, RATIOS, rho=1e-3)
    state.initialize()
    rows = state.report()
    w, z = state.params['conv2.weight'], state.Z['conv2.weight']
    assert rows['conv2.weight']['distance'] == pytest.approx((torch.norm(w - z) / torch.norm(w)).item())
    with torch.no_grad():
        w.copy_(z)
    rows = state.report()
    assert rows['conv2.weight']['distance'] == 0
    assert rows['conv2.weight']['near_zero'] == pytest.approx((z.abs() < 1e-4).float().mean().item())


def test_hard_prune_projects_in_place_and_returns_the_kept_groups(model):
    expected = admm.project(model.conv2.weight, 0.5, 'blk-kgs')
    kept = admm.hard_prune(model, RATIOS, 'blk-kgs')
    assert torch.equal(model.conv2.weight, expected)
    assert set(kept) == set(RATIOS)
    assert torch.equal(admm.expand_groups(kept['conv2.weight'], expected.shape, 'blk-kgs'), expected != 0)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adamw'])
def test_masks_keep_pruned_weights_at_zero_through_training(model, optimizer):
    admm.hard_prune(model, RATIOS, 'blk-kgs')
    zeros = {n: (p == 0).clone() for n, p in model.named_parameters()}
    masks = admm.Masks(model)
    assert len(masks) >= 2
    make = {'sgd': lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
            'adam': lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=5e-4),
            'adamw': lambda p: torch.optim.AdamW(p, lr=0.01)}[optimizer]
    opt = make(model.parameters())
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(2, 3, 4, 6, 6)).sum().backward()
        masks.apply_to_grads()
        opt.step()
    for n, p in model.named_parameters():
        assert not p[zeros[n]].any(), n
    assert model.conv2.weight.count_nonzero() > 0
