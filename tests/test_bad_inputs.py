"""The second round of bad inputs: nothing lost, nothing miscounted, one clear `error:` line."""
import errno
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from runner import GEOMETRY, ROOT, RUN, fails_cleanly, kill_when_logged, run

import admm
from models import build_model, read_checkpoint
from training import phases
from training.files import RunFiles, atomic_save, find_baseline, written_atomically
from training.runtime import UserError

ONE = ['--epochs', 1, '--max-batches', 1]


# ----------------------------------------------------------------------------- results never mixed

def test_a_new_result_takes_its_own_stem_when_one_is_there(tmp_path):
    files = RunFiles.pruning(str(tmp_path), 'ucf101', 'c3d', ['blk-kgs'], (8, 4), 2)
    os.makedirs(files.dir)
    stem = files.result('oneshot')
    assert files.claim(stem, resume=False) == stem
    open(stem + '_kept.npz', 'wb').close()                 # any file of a result claims its stem
    assert files.claim(stem, resume=False) == stem + '_v2'
    open(stem + '_v2.pt', 'wb').close()
    assert files.claim(stem, resume=False) == stem + '_v3'
    assert files.claim(stem, resume=True) == stem + '_v2'   # --resume: the newest stem with a resume point


@pytest.mark.e2e
def test_a_second_one_shot_retraining_keeps_the_first_results_files(trained, data, baseline, tmp_path):
    common = ['--masked-retrain', *ONE, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY]
    run(*common, '--load-path', baseline)
    folder = tmp_path / RUN
    first = {p: open(p, 'rb').read() for p in glob.glob(str(folder / f'{RUN}_oneshot*'))}
    assert str(folder / f'{RUN}_oneshot_kept.npz') in first and len(first) >= 4
    other = glob.glob(os.path.join(trained['ckpt'], RUN, f'{RUN}_2rhos_epoch-*.pt'))[0]   # other kept groups
    out = run(*common, '--load-path', other)
    assert f'this run\'s files are {folder / RUN}_oneshot_v2' in out.stdout
    assert {p: open(p, 'rb').read() for p in first} == first             # the first result, untouched
    assert (folder / f'{RUN}_oneshot_v2_kept.npz').exists()
    assert len(glob.glob(str(folder / f'{RUN}_oneshot_v2_epoch-1_top1-*.pt'))) == 1


@pytest.mark.e2e
def test_a_resumed_retraining_ends_with_the_weights_of_an_uninterrupted_one(data, baseline, tmp_path):
    # The masks of a resumed run come from the weights it resumes (not from a new model's).
    args = ['--masked-retrain', '--epochs', 2, '--max-batches', 3, '--load-path', baseline, '--lr', 0.001,
            '--data_location', data, *GEOMETRY]
    run(*args, '--ckpt-root', tmp_path / 'straight')
    cut = tmp_path / 'cut'
    log = cut / RUN / f'{RUN}_retrain.log'
    kill_when_logged(*args, '--ckpt-root', cut, log=log)
    assert not glob.glob(str(cut / RUN / f'{RUN}_oneshot_epoch-*.pt')), 'the run finished before it could be killed'
    run(*args, '--ckpt-root', cut, '--resume')
    a, _ = read_checkpoint(glob.glob(str(tmp_path / 'straight' / RUN / f'{RUN}_oneshot.pt'))[0])
    b, _ = read_checkpoint(str(cut / RUN / f'{RUN}_oneshot.pt'))
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- paths

def test_a_baseline_under_a_root_with_glob_characters_is_found(tmp_path):
    root = tmp_path / 'run[1]'
    root.mkdir()
    mine = root / 'ucf101_c3d_baseline_epoch-3_top1-50.000.pt'
    mine.write_bytes(b'')
    assert find_baseline(str(root), 'ucf101', 'c3d', 'data') == str(mine)


# ----------------------------------------------------------------------------- file systems that refuse

def test_a_full_disk_during_a_save_is_one_error_and_the_previous_file_survives(tmp_path, monkeypatch):
    path = str(tmp_path / 'model.pt')
    atomic_save({'x': torch.ones(3)}, path)

    def full(obj, f):
        f.write(b'part of a checkpoint')
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:                 # torch's writer reports it as a RuntimeError
            raise RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed') from exc
    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(UserError, match=f'could not write {path}: No space left on device .its previous version'):
        atomic_save({'x': torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)['x'], torch.ones(3))
    assert os.listdir(tmp_path) == ['model.pt']                           # no temporary left behind


def test_a_write_refused_by_the_file_system_names_the_file(tmp_path):
    target = tmp_path / 'no' / 'model.pt'                                 # a folder that is not there
    with pytest.raises(UserError, match=f'could not write {target}: No such file or directory'):
        with written_atomically(str(target)) as tmp:
            open(tmp, 'wb').close()


@pytest.mark.e2e
def test_a_ckpt_root_that_is_a_file_is_one_error_line(data, baseline, tmp_path):
    root = tmp_path / 'root'
    root.write_text('not a folder')
    out = run('--admm', *ONE, '--rho-num', 1, '--load-path', baseline, '--data_location', data,
              '--ckpt-root', root, *GEOMETRY, check=False)
    fails_cleanly(out, f'--ckpt-root {root} is a file, not a folder')
    assert root.read_text() == 'not a folder'


@pytest.mark.e2e
def test_a_ckpt_root_the_file_system_refuses_is_one_error_line(data, baseline):
    out = run('--admm', *ONE, '--rho-num', 1, '--load-path', baseline, '--data_location', data,
              '--ckpt-root', '/sys/rt3d-test', *GEOMETRY, check=False)
    fails_cleanly(out, '/sys/rt3d-test')


@pytest.mark.e2e
def test_export_onto_a_file_system_that_refuses_is_one_error_line(trained):
    final = glob.glob(os.path.join(trained['ckpt'], RUN, f'{RUN}_2rhos_epoch-*.pt'))[0]
    out = run('--export', final, '--export-out', '/sys/model.compact.pt', *GEOMETRY, check=False)
    fails_cleanly(out, 'could not write /sys/model.compact.pt')


# ----------------------------------------------------------------------------- messages

def test_a_profile_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    bad = tmp_path / 'latin1.yaml'
    text = 'prune_ratios:\n  conv2.weight: 0.5  # r\xe9duit\n'
    bad.write_bytes(text.encode('latin-1'))
    offset = text.index('\xe9')
    with pytest.raises(UserError, match=rf'profile {bad}: not a text YAML file \(.* at byte {offset}\)'):
        phases.load_rules([str(bad)], ['blk-kgs'], build_model('c3d', 5, crop_size=16), (8, 4))


@pytest.mark.e2e
def test_resuming_a_finished_retraining_says_it_finished_and_where_its_result_is(trained):
    out = run('--masked-retrain', '--resume', '--epochs', 3, '--warmup', '--warmup-epochs', 1, '--warmup-lr', 1e-5,
              '--lr-scheduler', 'cosine', '--rho', 0.01, '--rho-num', 2, '--config-file', 'c3d_2.53x_v2',
              '--lr', 0.001, '--combine-progressive', *trained['common'], check=False)
    final = glob.glob(os.path.join(trained['ckpt'], RUN, f'{RUN}_2rhos_epoch-*.pt'))[0]
    fails_cleanly(out, 'nothing to resume', 'epoch 3 of 3: that run finished', f'its result is {final}')


@pytest.mark.e2e
def test_ctrl_c_says_what_was_saved_and_how_to_resume(data, tmp_path):
    args = ['--baseline', '--epochs', 50, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY]
    # As from a terminal: a shell without job control starts background commands with SIGINT ignored,
    # and Python keeps it ignored, so the child gets the default disposition back explicitly.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'opt_main.py'), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    saved = tmp_path / 'ucf101_c3d_baseline.pt'
    try:
        deadline = time.time() + 300
        while not saved.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    text = stdout + stderr
    assert proc.returncode == 130 and 'Traceback' not in text, text[-3000:]
    line = next(line for line in text.splitlines() if line.startswith('interrupted: '))
    assert line.startswith(f'interrupted: the last epoch that finished is saved in {saved}; continue with: ')
    assert line.endswith(' --resume')
    assert not (tmp_path / 'ucf101_c3d_baseline.lock').exists()


# ----------------------------------------------------------------------------- the block size of the pattern

def test_mixed_groups_counts_groups_that_are_partly_zero():
    w = torch.ones(16, 4, 1, 1, 1)
    w[:8] = 0                                           # rows 0-7 pruned: whole 8x4 groups
    assert admm.mixed_groups(w, 'blk-kgs', (8, 4)) == 0
    assert admm.mixed_groups(w, 'blk-kgs', (16, 4)) == 1      # the one 16x4 group is half zero
    w[0, 0] = 1                                         # a kept entry in a pruned 8x4 group
    assert admm.mixed_groups(w, 'blk-kgs', (8, 4)) == 0.5


@pytest.mark.e2e
def test_evaluate_sparse_exec_refuses_a_block_size_the_zeros_do_not_fit(trained):
    final = glob.glob(os.path.join(trained['ckpt'], RUN, f'{RUN}_2rhos_epoch-*.pt'))[0]
    out = run('--evaluate', '--sparse-exec', '--load-path', final, *trained['common'], '-conn-blk', 16, 4,
              check=False)
    fails_cleanly(out, '--connectivity-block-size 16 4 does not fit the zeros of conv2.weight')


# ----------------------------------------------------------------------------- data errors during an epoch

@pytest.mark.e2e
@pytest.mark.parametrize('workers', [0, 2])
def test_a_broken_frame_met_while_training_is_one_error_line_naming_the_video(data, tmp_path, workers):
    copy = tmp_path / 'data'
    shutil.copytree(data, copy)
    for db in glob.glob(str(copy / 'ucf101_frame' / '*.lmdb')):        # read the frame folders
        shutil.rmtree(db) if os.path.isdir(db) else os.remove(db)
    video = open(copy / 'ucf101_frame' / 'train.txt').read().split()[0]
    frames = sorted(glob.glob(str(copy / 'ucf101_frame' / video / '*.jpg')))
    open(frames[len(frames) // 2], 'wb').close()                      # a zero-byte frame in the middle
    args = list(map(str, GEOMETRY))
    args[args.index('--workers') + 1] = str(workers)
    out = run('--baseline', '--epochs', 1, '--data_location', copy, '--ckpt-root', tmp_path / 'ck', *args,
              check=False)
    fails_cleanly(out, video, 'is empty (0 bytes)')
