"""opt_main.py end to end through the command line, on a tiny generated dataset at 16x16x16."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, drop
from runner import GEOMETRY, RUN, kill_when_logged, run

import admm
import profile_flops
from models import build_model, read_checkpoint


@pytest.mark.e2e
def test_baseline_is_saved_under_the_original_naming(trained):
    names = [os.path.basename(p) for p in glob.glob(os.path.join(trained['ckpt'], '*.pt'))]
    best = [n for n in names if re.fullmatch(r'ucf101_c3d_baseline_epoch-\d+_top1-\d+\.\d{3}\.pt', n)]
    assert len(best) == 1, names


@pytest.mark.e2e
def test_run_directory_follows_the_seed_layout(trained):
    files = trained['files']                # what the runs wrote (conftest removes the files no test reads)
    # The original's files: stage files, the profile copy under its own name, the retrained model of the last
    # epoch, its results and plot; the best model renamed with its epoch and top-1. Ours besides: logs, kept index.
    assert {f'{RUN}_0.01.pt', f'{RUN}_0.1.pt', 'c3d_2.53x_v2.yaml', f'{RUN}_2rhos.pt', f'{RUN}_2rhos_results.npz',
            f'{RUN}_2rhos_results.pdf', f'{RUN}_admm.log', f'{RUN}_retrain.log',
            f'{RUN}_2rhos_kept.npz'} <= files, files
    assert any(re.fullmatch(rf'{re.escape(RUN)}_2rhos_epoch-\d_top1-\d+\.\d{{3}}\.pt', f) for f in files), files
    assert f'{RUN}_2rhos_best.pt' not in files                      # renamed at the end, as the original does
    assert not any('.tmp' in f for f in files)


@pytest.mark.e2e
def test_retraining_results_hold_the_originals_loss_and_acc(trained):
    folder = os.path.join(trained['ckpt'], RUN)
    results = np.load(os.path.join(folder, f'{RUN}_2rhos_results.npz'))
    assert np.array_equal(results['loss'], results['val_loss']) and np.array_equal(results['acc'], results['val_top1'])
    assert len(results['acc']) == 3
    _, meta = read_checkpoint(os.path.join(folder, f'{RUN}_2rhos.pt'))      # the last epoch, with its optimiser
    assert meta['epoch'] == 3 and {'optimizer', 'top1'} <= set(meta) and meta['top1'] == results['acc'][-1]


@pytest.mark.e2e
def test_admm_results_hold_every_stage_s_epochs_in_order(trained):
    folder = os.path.join(trained['ckpt'], RUN)
    results = np.load(os.path.join(folder, f'{RUN}_admm_results.npz'))
    # 2 rhos x 2 epochs, as the log reported them epoch by epoch
    log = open(os.path.join(folder, f'{RUN}_admm.log')).read()
    logged = re.findall(r'epoch \d+/2: .* val loss [\d.]+ top-1 ([\d.]+)', log)
    assert len(results['acc']) == len(logged) == 4
    assert [f'{v:.2f}' for v in results['acc']] == logged


@pytest.mark.e2e
def test_logs_hold_the_command_options_batches_and_epochs(trained):
    text = open(os.path.join(trained['ckpt'], RUN, f'{RUN}_admm.log')).read()
    assert 'command: ' in text and '--admm' in text
    assert json.loads(text.split('options: ', 1)[1].splitlines()[0])['rho_num'] == 2
    assert re.search(r'epoch 1 batch 1/\d+ loss', text)
    assert re.search(r'epoch 2/2: train loss .* val loss .* top-1', text)
    assert 'Z and U updated' in text                       # admm-epochs 1: an update at epoch 2
    assert '||W-Z||/||W||' in text                          # the convergence report
    assert re.search(r'Weight < 1e-4:\n.*  conv2.weight: \d+/221184 = 0\.\d{4}', text)    # the original's report
    assert 'prune ratios (blk-kgs):' in text and '  conv3b.weight: 0.85' in text          # the profile, listed
    assert text.count('stage 1/2') == 1 and text.count('stage 2/2') == 1


@pytest.mark.e2e
def test_admm_stage_files_hold_z_and_u(trained):
    meta = trained['metadata'][os.path.join(trained['ckpt'], RUN, f'{RUN}_0.1.pt')]     # as written (conftest)
    assert meta['rho'] == pytest.approx(0.1)
    assert meta['admm_z'] == set(admm.load_profile('c3d_2.53x_v2', build_model('c3d', 5, crop_size=16)))


@pytest.mark.e2e
def test_retrained_weights_have_exactly_the_profile_group_structure(trained):
    folder = os.path.join(trained['ckpt'], RUN)
    final = glob.glob(os.path.join(folder, f'{RUN}_2rhos_epoch-*.pt'))[0]
    state, meta = read_checkpoint(final)
    kept = np.load(os.path.join(folder, f'{RUN}_2rhos_kept.npz'))
    ratios = admm.load_profile(os.path.join(folder, 'c3d_2.53x_v2.yaml'), build_model('c3d', 5, crop_size=16))
    assert set(kept.files) == set(ratios)
    for name, ratio in ratios.items():
        w = state[name]
        grid = torch.from_numpy(kept[name])
        kept_mask = admm.expand_groups(grid, w.shape, 'blk-kgs')
        assert not w[~kept_mask].any(), name                              # pruned groups are zero
        assert (w[kept_mask] == 0).float().mean() < 1e-5, name            # kept ones train (an initial exact
                                                                          # zero may stay: a masked gradient)
        # numpy's percentile with `<=` prunes floor(ratio * (n - 1)) + 1 of n groups of distinct scores
        assert (~grid).sum().item() == np.floor(ratio * (grid.numel() - 1)) + 1, name
    # the unprofiled weights stay dense
    assert torch.count_nonzero(state['conv1.weight']) == state['conv1.weight'].numel()
    assert f"epoch-{meta['epoch']}_top1-{meta['top1']:.3f}.pt" in final       # the best epoch, named


@pytest.mark.e2e
def test_learning_rate_warms_up_then_anneals(trained):
    folder = os.path.join(trained['ckpt'], RUN)
    lr = np.load(os.path.join(folder, f'{RUN}_2rhos_results.npz'))['lr']     # the rate of each epoch's first batch
    n = int(re.search(r'epoch 1 batch \d+/(\d+)', open(os.path.join(folder, f'{RUN}_retrain.log')).read()).group(1))
    # --warmup-epochs 1 from 1e-5 to 1e-3, then cosine over all 3 epochs; the scheduler steps before each batch
    assert lr[0] == pytest.approx(1e-5 + (1e-3 - 1e-5) / n)
    assert lr[1] == pytest.approx(1e-3)                                          # the hand-over: step 0 of cosine
    assert lr[2] == pytest.approx(4e-8 + (1e-3 - 4e-8) * (1 + np.cos(np.pi * n / (3 * n))) / 2)


@pytest.mark.e2e
def test_evaluate_reports_accuracy_sparsity_and_flops(trained, data):
    final = glob.glob(os.path.join(trained['ckpt'], RUN, f'{RUN}_2rhos_epoch-*.pt'))[0]
    out = run('--evaluate', '--load-path', final, *trained['common'])
    result = json.loads(out.stdout.split('RESULT ', 1)[1])
    assert 0 <= result['top1'] <= 100 and result['top5'] >= result['top1']
    model = build_model('c3d', 5, crop_size=16)
    expected = profile_flops.profile(model, 16, 16, admm.load_profile('c3d_2.53x_v2', model))['flops_reduction']
    assert result['flops_reduction'] == pytest.approx(expected, rel=0.01)
    assert 'density' in out.stdout


@pytest.mark.e2e
def test_new_admm_run_moves_the_old_directory_aside(trained, data, tmp_path):
    ckpt = tmp_path / 'ck'
    os.makedirs(ckpt / RUN)
    (ckpt / RUN / 'old.txt').write_text('keep me')
    baseline = glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt'))[0]
    run('--admm', '--epochs', 1, '--rho-num', 1, '--load-path', baseline, '--max-batches', 1,
        '--data_location', data, '--ckpt-root', ckpt, *GEOMETRY)
    assert (ckpt / f'{RUN}_v1' / 'old.txt').read_text() == 'keep me'
    assert (ckpt / RUN / f'{RUN}_0.0001.pt').exists()


# ----------------------------------------------------------------------------- resume

@pytest.mark.e2e
def test_resume_after_a_kill_mid_epoch_ends_with_the_same_weights(trained, data, tmp_path):
    baseline = glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt'))[0]
    args = ['--admm', '--epochs', 3, '--admm-epochs', 2, '--rho', 0.01, '--rho-num', 1, '--load-path', baseline,
            '--lr', 0.001, '--data_location', data, *GEOMETRY]
    run(*args, '--ckpt-root', tmp_path / 'straight')
    drop(tmp_path / 'straight' / RUN / '*_last.pt')        # only the stage file is compared

    killed = tmp_path / 'killed'
    log = killed / RUN / f'{RUN}_admm.log'
    kill_when_logged(*args, '--ckpt-root', killed, log=log)
    assert not (killed / RUN / f'{RUN}_0.01.pt').exists(), 'the run finished before it could be killed'
    run(*args, '--ckpt-root', killed, '--resume')

    a, _ = read_checkpoint(str(tmp_path / 'straight' / RUN / f'{RUN}_0.01.pt'))
    b, meta = read_checkpoint(str(killed / RUN / f'{RUN}_0.01.pt'))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(meta['history']['val_top1']) == 3


def test_atomic_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    from training.files import atomic_save
    path = str(tmp_path / 'model.pt')
    atomic_save({'x': torch.ones(3)}, path)

    def broken(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', broken)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({'x': torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)['x'], torch.ones(3))


# ----------------------------------------------------------------------------- errors

@pytest.mark.e2e
def test_admm_with_masked_retrain_is_refused():
    out = run('--admm', '--masked-retrain', check=False)
    assert out.returncode == 2 and '--admm and --masked-retrain cannot be combined' in out.stderr


@pytest.mark.e2e
def test_missing_baseline_names_the_paths_and_how_to_train_one(data, tmp_path):
    out = run('--admm', '--epochs', 1, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY, check=False)
    assert out.returncode == 1
    assert 'ucf101_c3d_transfer_epoch-14_top1-81.571.pt' in out.stdout and '--baseline' in out.stdout
    assert 'Traceback' not in out.stdout + out.stderr


@pytest.mark.e2e
def test_checkpoint_of_another_class_count_is_refused(trained, data, tmp_path):
    baseline = glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt'))[0]
    args = [a if a != '5' else '7' for a in GEOMETRY]
    out = run('--admm', '--epochs', 1, '--load-path', baseline, '--data_location', data, '--ckpt-root', tmp_path,
              *args, check=False)
    assert out.returncode == 1 and 'fc8.weight' in out.stdout and '--num-classes 5' in out.stdout


@pytest.mark.e2e
def test_checkpoint_of_another_architecture_is_refused(trained, data, tmp_path):
    baseline = glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt'))[0]
    args = [a if a != 'c3d' else 'r2+1d' for a in GEOMETRY]
    out = run('--evaluate', '--load-path', baseline, '--data_location', data, *args, check=False)
    assert out.returncode == 1 and 'missing keys' in out.stdout and 'Traceback' not in out.stderr


@pytest.mark.e2e
def test_non_finite_loss_stops_before_saving(trained, data, tmp_path):
    baseline = glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt'))[0]
    state, _ = read_checkpoint(baseline)
    state['fc8.bias'][0] = float('nan')
    bad = tmp_path / 'bad.pt'
    torch.save(state, bad)
    out = run('--admm', '--epochs', 1, '--rho-num', 1, '--load-path', bad, '--data_location', data,
              '--ckpt-root', tmp_path, *GEOMETRY, check=False)
    assert out.returncode == 1 and 'epoch 1, batch 1' in out.stdout
    assert not glob.glob(str(tmp_path / RUN / '*.pt'))


@pytest.mark.e2e
def test_retrain_without_admm_run_says_what_to_do(data, tmp_path):
    out = run('--masked-retrain', '--epochs', 1, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY,
              check=False)
    assert out.returncode == 1 and 'Run the ADMM phase first' in out.stdout and '--load-path' in out.stdout


@pytest.mark.e2e
def test_resume_without_a_previous_run_is_an_error(data, tmp_path):
    out = run('--masked-retrain', '--resume', '--epochs', 1, '--load-path', 'x.pt', '--data_location', data,
              '--ckpt-root', tmp_path, *GEOMETRY, check=False)
    assert out.returncode == 1 and 'nothing to resume' in out.stdout


@pytest.mark.e2e
def test_missing_data_names_the_list_file(tmp_path):
    out = run('--baseline', '--epochs', 1, '--data_location', tmp_path, '--ckpt-root', tmp_path, *GEOMETRY,
              check=False)
    assert out.returncode == 1 and str(tmp_path / 'ucf101_frame' / 'val.txt') in out.stdout


# ----------------------------------------------------------------------------- distributed

@pytest.mark.e2e
def test_torchrun_with_two_cpu_processes(trained, data, tmp_path):
    baseline = glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt'))[0]
    common = ['--rho', 0.01, '--rho-num', 1, '--config-file', 'c3d_2.53x_v2',
              '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY]
    common[common.index('--batch-size') + 1] = '2'
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                os.path.join(ROOT, 'opt_main.py')]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    # --load-path only for --admm: with --masked-retrain it would mean one-shot pruning of the baseline
    for phase in (['--admm', '--epochs', 2, '--admm-epochs', 1, '--load-path', baseline],
                  ['--masked-retrain', '--epochs', 1]):
        out = subprocess.run(torchrun + [str(a) for a in phase + common], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        drop(tmp_path / RUN / '*_admm_last.pt')          # retraining starts from the stage file
    text = open(tmp_path / RUN / f'{RUN}_admm.log').read()
    assert 'Z and U updated (identical on 2 processes)' in text
    assert 'identical on 2 processes' in open(tmp_path / RUN / f'{RUN}_retrain.log').read()
    # one process wrote: every epoch line once, no stray temporary files
    assert text.count('epoch 2/2: train loss') == 1
    assert not glob.glob(str(tmp_path / RUN / '*.tmp*'))
    final = glob.glob(str(tmp_path / RUN / f'{RUN}_1rhos_epoch-*.pt'))
    assert len(final) == 1


@pytest.mark.e2e
def test_original_recipe_script_runs_both_phases(trained, data, tmp_path):
    for f in glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt')):
        os.link(f, tmp_path / os.path.basename(f))     # the teacher for --distill and the ADMM start
    env = {**os.environ, 'PYTHON': sys.executable, 'DATA': data, 'ADMM_EPOCHS': '1', 'RETRAIN_EPOCHS': '2'}
    extra = ['--ckpt-root', str(tmp_path), '--rho-num', '1', '--warmup-epochs', '1', '--max-batches', '1',
             *GEOMETRY]
    out = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'blk-kgs_c3d.sh'), *extra], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    folder = tmp_path / RUN
    assert (folder / f'{RUN}_0.0001.pt').exists()
    assert glob.glob(str(folder / f'{RUN}_1rhos_distill_epoch-*_top1-*.pt'))
    assert 'distilling from' in (folder / f'{RUN}_retrain.log').read_text()


# ----------------------------------------------------------------------------- other methods and export

def baseline_of(trained):
    return glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt'))[0]


@pytest.mark.e2e
def test_reweighted_then_masked_retrain(trained, data, tmp_path):
    common = ['--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY, '--config-file', 'c3d_2.53x_v2',
              '--max-batches', 2]
    run('--rew', '--epochs', 2, '--rew-milestones', 1, '--penalty', 1e-4, '--load-path', baseline_of(trained),
        *common)
    log = (tmp_path / RUN / f'{RUN}_rew.log').read_text()
    assert 'group weights recomputed' in log and 'small groups' in log
    run('--masked-retrain', '--epochs', 1, *common)
    assert (tmp_path / RUN / f'{RUN}_rew.pt').exists()
    assert glob.glob(str(tmp_path / RUN / f'{RUN}_rew_retrained_epoch-1_top1-*.pt'))


@pytest.mark.e2e
def test_one_shot_pruning_of_the_baseline(trained, data, tmp_path):
    run('--masked-retrain', '--epochs', 1, '--load-path', baseline_of(trained), '--max-batches', 1,
        '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY)
    final = glob.glob(str(tmp_path / RUN / f'{RUN}_oneshot_epoch-1_top1-*.pt'))
    assert final
    state, _ = read_checkpoint(final[0])
    expected = admm.project(state['conv2.weight'], 0.0, 'blk-kgs')
    assert torch.equal(state['conv2.weight'], expected) and (state['conv2.weight'] == 0).float().mean() > 0.5


@pytest.mark.e2e
def test_two_profiles_at_once_multiply_their_masks(trained, data, tmp_path):
    run_dir = tmp_path / 'ucf101_c3d_kgr+kgc-r8c4'
    common = ['--sparsity-type', 'kgr', 'kgc', '--config-file', 'c3d_2.00x_uniform', 'c3d_2.53x_v2',
              '--rho-num', 1, '--max-batches', 1, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY]
    run('--admm', '--epochs', 1, '--load-path', baseline_of(trained), *common)
    run('--masked-retrain', '--epochs', 1, *common)
    kept = np.load(glob.glob(str(run_dir / '*_1rhos_kept.npz'))[0])
    assert {'kgr/conv2.weight', 'kgc/conv2.weight'} <= set(kept.files)
    state, _ = read_checkpoint(glob.glob(str(run_dir / '*_1rhos_epoch-*.pt'))[0])
    w = state['conv2.weight']
    both = admm.expand_groups(torch.from_numpy(kept['kgr/conv2.weight']), w.shape, 'kgr') & \
        admm.expand_groups(torch.from_numpy(kept['kgc/conv2.weight']), w.shape, 'kgc')
    assert not w[~both].any()


@pytest.mark.e2e
def test_export_compact_and_onnx(trained, tmp_path):
    pytest.importorskip('onnx')
    final = glob.glob(os.path.join(trained['ckpt'], RUN, f'{RUN}_2rhos_epoch-*.pt'))[0]
    out = tmp_path / 'model.compact.pt'
    run('--export', final, '--export-out', out, '--onnx', *GEOMETRY)
    from models.compact import load_compact
    restored = load_compact(str(out))
    state, _ = read_checkpoint(final)
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert os.path.getsize(out) < os.path.getsize(final)
    assert (tmp_path / 'model.compact.onnx').stat().st_size > 1e6


@pytest.mark.e2e
def test_onnx_without_export_is_refused():
    out = run('--evaluate', '--onnx', check=False)
    assert out.returncode == 2 and '--onnx goes with --export' in out.stderr
