"""Runs that never lose work, and bad input that gets one clear `error:` line (no traceback)."""
import glob
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import link_tree, removed_when_passed
from runner import GEOMETRY, ROOT, RUN, fails_cleanly, run

import admm
from models import build_model, read_checkpoint
from options import parse_args

ADMM = ['--admm', '--epochs', 1, '--rho-num', 1, '--rho', 0.01, '--max-batches', 1, '--config-file', 'c3d_2.53x_v2']


def opt_main(*args):
    return [sys.executable, os.path.join(ROOT, 'opt_main.py'), *map(str, args)]


# ----------------------------------------------------------------------------- nothing destroyed

@pytest.mark.e2e
def test_export_onto_its_own_input_is_refused_and_the_checkpoint_survives(trained, tmp_path):
    final = glob.glob(os.path.join(trained['ckpt'], RUN, f'{RUN}_2rhos_epoch-*.pt'))[0]
    mine = shutil.copy(final, tmp_path / 'model.pt')
    before = open(mine, 'rb').read()
    out = run('--export', mine, '--export-out', mine, *GEOMETRY, check=False)
    fails_cleanly(out, 'is the checkpoint being exported')
    assert open(mine, 'rb').read() == before
    fails_cleanly(run('--export', mine, '--export-out', mine, '--force', *GEOMETRY, check=False), 'being exported')
    assert open(mine, 'rb').read() == before
    read_checkpoint(str(mine))


@pytest.mark.e2e
def test_export_does_not_replace_an_existing_file_without_force(trained, tmp_path):
    final = glob.glob(os.path.join(trained['ckpt'], RUN, f'{RUN}_2rhos_epoch-*.pt'))[0]
    out_path = tmp_path / 'out.compact.pt'
    out_path.write_bytes(b'precious')
    fails_cleanly(run('--export', final, '--export-out', out_path, *GEOMETRY, check=False), 'pass --force')
    assert out_path.read_bytes() == b'precious'
    run('--export', final, '--export-out', out_path, '--force', *GEOMETRY)
    assert out_path.stat().st_size > 1000


@pytest.mark.e2e
def test_a_second_run_on_a_run_directory_in_use_is_refused(data, baseline, tmp_path):
    common = ['--load-path', baseline, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY]
    first = subprocess.Popen(opt_main(*ADMM, '--epochs', 1000, *common), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    lock = tmp_path / f'{RUN}.lock'
    try:
        deadline = time.time() + 120
        while not (tmp_path / RUN / f'{RUN}_admm_last.pt').exists() and time.time() < deadline:
            assert first.poll() is None, 'the first run stopped'
            time.sleep(0.05)
        second = run(*ADMM, '--config-file', 'c3d_3.57x', *common, check=False)
        text = fails_cleanly(second, 'another run is writing here', f'pid {first.pid}', str(lock))
        assert 'c3d_2.53x_v2' in text                                  # the first run's command, named
        assert first.poll() is None and not glob.glob(str(tmp_path / f'{RUN}_v*'))   # nothing moved aside
    finally:
        first.kill()
        first.wait()
    # The first run was killed: its lock is stale, and the next run takes it over.
    assert lock.exists()
    third = run(*ADMM, *common)
    assert 'taking over the lock' in third.stdout and not lock.exists()
    assert (tmp_path / f'{RUN}_v1' / f'{RUN}_admm_last.pt').exists()   # the killed run, moved aside whole
    assert (tmp_path / RUN / f'{RUN}_0.01.pt').exists()


def test_zero_epochs_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        parse_args(['--masked-retrain', '--epochs', '0'])
    assert 'argument --epochs: must be >= 1, got 0' in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

@pytest.mark.e2e
@pytest.mark.parametrize('content', ['empty', 'truncated', 'random'])
def test_broken_checkpoints_get_one_error_line(data, baseline, tmp_path, content):
    raw = open(baseline, 'rb').read()
    bad = tmp_path / 'bad.pt'
    bad.write_bytes({'empty': b'', 'truncated': raw[:len(raw) // 3], 'random': os.urandom(5000)}[content])
    out = run(*ADMM, '--load-path', bad, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY, check=False)
    text = fails_cleanly(out, f'{bad} is not a readable PyTorch checkpoint')
    assert 'weights_only=False' not in text
    assert not (tmp_path / RUN).exists()


@pytest.mark.e2e
def test_a_resume_file_of_another_kind_is_refused(data, baseline, tmp_path):
    os.link(baseline, tmp_path / 'ucf101_c3d_baseline.pt')            # a model, not a resume point
    out = run('--baseline', '--epochs', 1, '--resume', '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY,
              check=False)
    fails_cleanly(out, 'it is not a resume point')


@pytest.mark.e2e
def test_fewer_classes_than_the_labels_is_refused_before_training(data, tmp_path):
    args = [a if a != '5' else '3' for a in GEOMETRY]
    out = run('--baseline', '--epochs', 1, '--data_location', data, '--ckpt-root', tmp_path, *args, check=False)
    fails_cleanly(out, 'has labels up to 4', '--num-classes 5')
    assert not glob.glob(str(tmp_path / '*.pt'))


@pytest.mark.parametrize('option, value, message', [
    ('--batch-size', 0, 'must be >= 1'), ('--workers', -1, 'must be >= 0'), ('--lr', -1, 'must be > 0'),
    ('--admm-epochs', 0, 'must be >= 1'), ('--log-interval', 0, 'must be >= 1'), ('--rho-num', 0, 'must be >= 1'),
    ('--epochs', -1, 'must be >= 1'), ('--crop-size', 0, 'must be >= 1'), ('--accum-steps', 0, 'must be >= 1'),
    ('--rho', 0, 'must be > 0'), ('--momentum', 1.5, 'must be >= 0 and < 1'), ('--smooth-eps', 1, '< 1'),
    ('--num-classes', 1, 'must be >= 2'), ('--lr', 'fast', "expected a number, got 'fast'"),
])
def test_bad_values_name_the_option(option, value, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(['--admm', option, str(value)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and option in err and message in err and 'Traceback' not in err


def test_block_size_zero_names_the_option(capsys):
    with pytest.raises(SystemExit):
        parse_args(['--admm', '--connectivity-block-size', '0', '4'])
    assert 'argument --connectivity-block-size/-conn-blk: must be >= 1, got 0' in capsys.readouterr().err


@pytest.mark.e2e
def test_a_huge_block_is_refused_before_any_allocation(data, baseline, tmp_path):
    start = time.time()
    # c3d_2.53x_v2_all-convs prunes conv5b, 512 x 512: the limit the message names
    out = run(*ADMM, '--config-file', 'c3d_2.53x_v2_all-convs', '--connectivity-block-size', 100000, 100000,
              '--load-path', baseline, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY, check=False)
    fails_cleanly(out, 'use gM <= 512 and gN <= 512')
    assert time.time() - start < 120


@pytest.mark.e2e
def test_a_profile_with_a_key_given_twice_is_refused(data, baseline, tmp_path):
    profile = tmp_path / 'twice.yaml'
    profile.write_text('prune_ratios:\n  conv2.weight: 0.5\n  conv2.weight: 0.7\n')
    out = run(*ADMM, '--config-file', profile, '--load-path', baseline, '--data_location', data, '--ckpt-root',
              tmp_path, *GEOMETRY, check=False)
    fails_cleanly(out, '`conv2.weight` is given twice (lines 2 and 3)')


@pytest.mark.e2e
def test_an_empty_lmdb_left_by_a_killed_writer_is_named(data, tmp_path):
    copy = tmp_path / 'data'
    shutil.copytree(data, copy)
    shutil.rmtree(copy / 'ucf101_frame' / 'train.lmdb', ignore_errors=True)
    if (copy / 'ucf101_frame' / 'train.lmdb').exists():
        os.remove(copy / 'ucf101_frame' / 'train.lmdb')
    import lmdb
    lmdb.open(str(copy / 'ucf101_frame' / 'train.lmdb'), subdir=False).close()   # created, nothing written
    out = run('--baseline', '--epochs', 1, '--data_location', copy, '--ckpt-root', tmp_path, *GEOMETRY, check=False)
    text = fails_cleanly(out, 'train.lmdb')
    assert 'pyarrow.serialize' not in text                             # not blamed on the original's format


@pytest.mark.e2e
def test_checkpoints_hold_the_run_defining_options(trained):
    # Every checkpoint the runs wrote, resume points included, as read when they were written (conftest)
    metadata = trained['metadata']
    assert {os.path.basename(p) for p in metadata} >= {'ucf101_c3d_baseline.pt', f'{RUN}_admm_last.pt',
                                                        f'{RUN}_0.01.pt', f'{RUN}_0.1.pt', f'{RUN}_2rhos.pt'}
    for path, meta in metadata.items():
        assert meta['options']['arch'] == 'c3d' and meta['options']['seed'] == 3, path
        assert 'rng' not in meta['keys'], path          # one RNG mechanism: every epoch re-seeds
    options = metadata[os.path.join(trained['ckpt'], RUN, f'{RUN}_0.1.pt')]['options']
    model = build_model('c3d', 5, crop_size=16)
    assert options['profiles'] == [admm.load_profile('c3d_2.53x_v2', model)]
    assert options['rho_num'] == 2 and options['sparsity_type'] == ['blk-kgs']


# ----------------------------------------------------------------------------- beside a finished run
# Last in the module: the finished run (1 GB) is removed as soon as these have run.

@pytest.fixture(scope='module')
def previous_run(request, data, baseline, tmp_path_factory):
    """A finished ADMM run: mistaken commands must leave it where it is; a retraining starts from a copy."""
    root = removed_when_passed(request, tmp_path_factory.mktemp('previous'))
    run(*ADMM, '--load-path', baseline, '--data_location', data, '--ckpt-root', root, *GEOMETRY)
    return root


@pytest.mark.e2e
@pytest.mark.parametrize('mistake, message', [
    (['--config-file', 'c3d_3.75x'], "profile 'c3d_3.75x' not found"),
    (['--connectivity-block-size', 10000, 10000], 'larger than every pruned weight'),
    (['--num-classes', 3], 'has labels up to 4'),
    (['--teacher-path', 'nowhere.pt', '--distill'], 'nowhere.pt'),
])
def test_a_refused_fresh_run_leaves_the_previous_run_where_it_was(data, baseline, previous_run, mistake, message):
    before = sorted(os.listdir(previous_run / RUN))
    out = run(*ADMM, '--load-path', baseline, '--data_location', data, '--ckpt-root', previous_run, *GEOMETRY,
              *mistake, check=False)
    fails_cleanly(out, message)
    assert sorted(os.listdir(previous_run / RUN)) == before and not glob.glob(str(previous_run / f'{RUN}_v*'))


@pytest.mark.e2e
def test_admm_resume_with_another_profile_is_refused(data, baseline, previous_run):
    out = run(*ADMM, '--config-file', 'c3d_3.57x', '--resume', '--load-path', baseline, '--data_location', data,
              '--ckpt-root', previous_run, *GEOMETRY, check=False)
    fails_cleanly(out, 'profiles:', 'in the run being resumed')


@pytest.mark.e2e
def test_temporaries_of_a_killed_save_are_removed_at_the_next_start(data, previous_run, tmp_path):
    link_tree(previous_run / RUN, tmp_path / RUN)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = tmp_path / RUN / f'{RUN}_1rhos.pt.tmp{dead.pid}'
    stale.write_bytes(b'half a checkpoint')
    run('--masked-retrain', '--epochs', 1, '--max-batches', 1, '--rho', 0.01, '--rho-num', 1, '--config-file',
        'c3d_2.53x_v2', '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY)
    assert not stale.exists()
    assert f'removed {stale}' in (tmp_path / RUN / f'{RUN}_retrain.log').read_text()
