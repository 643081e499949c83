"""Mixed precision: bf16 autocast (CPU and CUDA), fp16 with a gradient scaler, and the pruning
machinery kept exact in float32; TensorBoard logs."""
import glob
import os

import numpy as np
import pytest
import torch
from conftest import drop, removed_when_passed
from runner import GEOMETRY, RUN, run

import admm
from models import build_model, read_checkpoint
from training import engine, optim

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
PRUNE = ['--config-file', 'c3d_2.53x_v2', '--rho', 0.01, '--rho-num', 1, '--max-batches', 2]


def test_amp_picks_bf16_only_where_the_cpu_has_it_and_honours_a_forced_dtype(monkeypatch):
    cpu = torch.device('cpu')
    assert optim.amp_dtype(False, None, cpu) is None
    monkeypatch.setattr(optim, 'cpu_has_bf16', lambda: True)
    assert optim.amp_dtype(True, None, cpu) == torch.bfloat16
    monkeypatch.setattr(optim, 'cpu_has_bf16', lambda: False)
    assert optim.amp_dtype(True, None, cpu) is None              # emulated bf16 is many times slower: float32
    assert optim.amp_dtype(True, 'bf16', cpu) == torch.bfloat16
    assert optim.amp_dtype(True, 'fp16', cpu) == torch.float16


# What --amp gives on this machine: bf16 autocast where the CPU computes bf16 natively; float32
# elsewhere (emulated bf16 runs C3D many times slower: the bf16 path is then checked on a small
# model by test_bf16_autocast_keeps_the_penalty_and_the_masks_in_float32).
NATIVE_BF16 = optim.cpu_has_bf16()
PRECISION_LINE = 'mixed precision: bfloat16 autocast' if NATIVE_BF16 else '--amp: this CPU has no native bf16'


@pytest.fixture(scope='module')
def amp_runs(request, data, baseline, tmp_path_factory):
    """Every training phase for a few batches under --amp on the CPU. The tests read the
    logs, curves and the retrained model: each other checkpoint goes once the next phase no longer needs it."""
    root = removed_when_passed(request, tmp_path_factory.mktemp('amp'))
    common = ['--data_location', data, '--ckpt-root', root, '--amp', *GEOMETRY, *PRUNE]
    outs = {'baseline': run('--baseline', '--epochs', 1, '--data_location', data, '--ckpt-root', root, '--amp',
                            '--max-batches', 2, '--tensorboard', *GEOMETRY)}
    drop(root / '*.pt')                                     # ADMM starts from the shared baseline
    outs['admm'] = run('--admm', '--epochs', 2, '--admm-epochs', 1, '--load-path', baseline, *common)
    drop(root / RUN / f'{RUN}_admm_last.pt')
    outs['retrain'] = run('--masked-retrain', '--epochs', 1, *common)
    drop(root / RUN / f'{RUN}_0.01.pt', root / RUN / f'{RUN}_1rhos.pt')
    outs['rew'] = run('--rew', '--epochs', 2, '--rew-milestones', 1, '--penalty', 1e-4, '--load-path', baseline,
                      *common, '--ckpt-root', root / 'rew')
    drop(root / 'rew' / RUN / '*.pt')
    return root, outs


@pytest.mark.e2e
def test_every_phase_trains_under_amp_with_finite_losses(amp_runs):
    root, outs = amp_runs
    for phase, out in outs.items():
        assert PRECISION_LINE in out.stdout, phase
        if not NATIVE_BF16:
            assert 'mixed precision' not in out.stdout, phase
    for curves in glob.glob(str(root / '**' / '*_results.npz'), recursive=True):
        loaded = np.load(curves)
        assert np.isfinite(loaded['train_loss']).all() and np.isfinite(loaded['val_loss']).all(), curves


def test_bf16_autocast_keeps_the_penalty_and_the_masks_in_float32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 8, 3),
                                torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))
    ratios = {'2.weight': 0.5}
    admm.hard_prune(model, ratios)
    masks = admm.Masks(model)
    reg = admm.ADMM(model, ratios, rho=1e-3)
    reg.start()
    recipe = engine.Recipe(epochs=1, optimizer='sgd', lr=1e-2, momentum=0.9, weight_decay=5e-4,
                           amp_dtype=torch.bfloat16, log_interval=100)
    opt = optim.make_optimizer(model.parameters(), 'sgd', 1e-2, 0.9, 5e-4)
    updater = engine.Updater(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    loader = [(torch.randint(0, 256, (4, 3, 4, 6, 6), dtype=torch.uint8), torch.randint(0, 5, (4,))) for _ in range(3)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 4, 6, 6)).dtype == torch.bfloat16          # autocast is in force
    loss, _ = engine.train_one_epoch(model, loader, updater, torch.nn.CrossEntropyLoss(), torch.device('cpu'), 1,
                                     recipe, regulariser=reg, masks=masks)
    assert np.isfinite(loss) and reg.loss().dtype == torch.float32
    for p, m in zip(masks.params, masks.masks):
        assert p.dtype == torch.float32 and not p[m == 0].any()


@pytest.mark.e2e
def test_pruned_weights_stay_exactly_zero_under_amp(amp_runs):
    root, _ = amp_runs
    final = glob.glob(str(root / RUN / f'{RUN}_1rhos_epoch-*.pt'))[0]
    state, _ = read_checkpoint(final)
    kept = np.load(str(root / RUN / f'{RUN}_1rhos_kept.npz'))
    for name in kept.files:
        mask = admm.expand_groups(torch.from_numpy(kept[name]), state[name].shape, 'blk-kgs')
        assert state[name].dtype == torch.float32 and not state[name][~mask].any(), name


@pytest.mark.e2e
def test_tensorboard_logs_the_epoch_figures(amp_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    root, _ = amp_runs
    events = glob.glob(str(root / 'tensorboard' / 'ucf101_c3d_baseline' / 'events.*'))
    assert events
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    assert {'train/train_loss', 'val/val_top1', 'lr/lr'} <= tags
    assert len(acc.Scalars('val/val_top1')) == 1


@pytest.mark.parametrize('name', ['sgd', 'adam'])
def test_the_optimiser_under_a_scaler_skips_steps_with_infinite_gradients(name):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = optim.make_optimizer(model.parameters(), name, 0.1, 0.9, 1e-3, scaled=True)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    for poisoned in (False, True, False):
        before = [p.detach().clone() for p in model.parameters()]
        state_before = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 6)).square().mean()).backward()
        if poisoned:
            model.weight.grad[0, 0] = float('inf')
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        after = list(model.parameters())
        if poisoned:
            assert all(torch.equal(a, b) for a, b in zip(after, before))        # skipped: nothing moved
            assert {k: v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}.keys() == \
                state_before.keys()
            assert scaler.get_scale() == scale / 2
        else:
            assert not all(torch.equal(a, b) for a, b in zip(after, before))
        assert all(torch.isfinite(p).all() for p in after)


@CUDA
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_cuda_mixed_precision_keeps_the_loss_finite_and_pruned_weights_zero(dtype):
    device = torch.device('cuda')
    torch.manual_seed(0)
    model = build_model('c3d', 5, crop_size=32).to(device)
    ratios = admm.load_profile('c3d_2.53x_v2', model)
    admm.hard_prune(model, ratios)
    masks = admm.Masks(model)
    reg = admm.ADMM(model, ratios, rho=1e-3)
    reg.start()
    recipe = engine.Recipe(epochs=1, optimizer='sgd', lr=1e-3, momentum=0.9, weight_decay=5e-4,
                             amp_dtype=dtype, channels_last=True, log_interval=100)
    model.to(memory_format=torch.channels_last_3d)
    scaler = torch.amp.GradScaler('cuda', enabled=dtype == torch.float16)
    opt = optim.make_optimizer(model.parameters(), 'sgd', 1e-3, 0.9, 5e-4, scaled=scaler.is_enabled())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loader = [(torch.randint(0, 256, (4, 3, 16, 32, 32), dtype=torch.uint8), torch.randint(0, 5, (4,)))
              for _ in range(6)]
    updater = engine.Updater(opt, sched, scaler if scaler.is_enabled() else None)
    loss, _ = engine.train_one_epoch(model, loader, updater, torch.nn.CrossEntropyLoss(), device, 1, recipe,
                                     regulariser=reg, masks=masks)
    assert np.isfinite(loss)
    for p, m in zip(masks.params, masks.masks):
        assert p.dtype == torch.float32 and not p[m == 0].any()


def test_layers_that_compute_wrong_bf16_results_are_found_and_run_in_float32(monkeypatch):
    from models import precision
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1))
    real = precision.F.conv3d

    def broken(x, w, *rest):        # a backend whose bf16 kernel is wrong for the 1x1x1 conv only
        out = real(x, w, *rest)
        return out * 3 if torch.is_autocast_enabled('cpu') and w.shape[-1] == 1 else out
    monkeypatch.setattr(precision.F, 'conv3d', broken)
    assert precision.find_wrong_bf16(model, (2, 3, 4, 5, 5), torch.device('cpu')) == ['2']

    precision.run_in_float32(model, ['2'], 'cpu')
    x = torch.randn(2, 3, 4, 5, 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
        inner = model[1](model[0](x))
    assert out.dtype == torch.float32 and inner.dtype == torch.bfloat16     # the first conv stays in bf16
    assert torch.allclose(out, torch.nn.functional.conv3d(inner.float(), model[2].weight, model[2].bias))
