"""Shared fixtures and helpers.

Two tiers (docs/tests.md): `python -m pytest -m "not e2e"` runs the fast tests; the `e2e` tests run
opt_main.py or the data tools as a user does, on a tiny generated dataset. Their C3D checkpoints are
190-590 MB each, so every file is removed as soon as no test needs it: a passed test's tmp_path at
its end, a module's runs when the module passed, files no test reads as soon as they are written.
KEEP_TEST_FILES=1 keeps every file.
"""
import glob
import os
import shutil
import sys

import pytest
import torch
import torch.nn as nn

# Tests import the project's top-level modules (admm, models, ...) and the test helpers.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

from runner import GEOMETRY, RUN, make_data, run  # noqa: E402

import admm  # noqa: E402
from models import build_model, read_checkpoint  # noqa: E402

KEEP = bool(os.environ.get('KEEP_TEST_FILES'))
RUN_FIXTURES = {'data', 'trained', 'baseline'}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """A test that uses the runs below is end to end whether marked or not: the fast tier never trains."""
    for item in items:
        if RUN_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)


# ----------------------------------------------------------------------------- files

def removed_when_passed(request, path):
    """`path`, removed when the requesting fixture ends if no test failed meanwhile (then it is kept
    to look at), unless KEEP_TEST_FILES is set."""
    failed = request.session.testsfailed

    def remove():
        if not KEEP and request.session.testsfailed == failed:
            shutil.rmtree(path, ignore_errors=True)
    request.addfinalizer(remove)
    return path


def drop(*patterns):
    """Remove the files matching the glob patterns: what a run wrote and no test reads (KEEP_TEST_FILES keeps them)."""
    if KEEP:
        return
    for pattern in patterns:
        for path in glob.glob(str(pattern)):
            os.remove(path)


def link_tree(src, dst):
    """Copy a run directory, its checkpoints as hard links (runs replace a checkpoint by a rename,
    never write into it; logs are appended to, so they are copied)."""
    def link_checkpoints(s, d):
        return os.link(s, d) if s.endswith('.pt') else shutil.copy2(s, d)
    return shutil.copytree(src, dst, copy_function=link_checkpoints, dirs_exist_ok=True)


@pytest.fixture(autouse=True)
def remove_tmp_path_when_passed(request):
    if 'tmp_path' in request.fixturenames:
        removed_when_passed(request, request.getfixturevalue('tmp_path'))


@pytest.fixture(scope='session', autouse=True)
def remove_run_files_when_all_pass(request, tmp_path_factory):
    """Once every test has passed the session's folder goes too, so repeated runs do not fill the disk."""
    yield
    if request.session.testsfailed == 0 and not KEEP:
        shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope='session')
def data(tmp_path_factory):
    """A tiny UCF101-shaped dataset in LMDB form (see runner.make_data)."""
    return make_data(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='session')
def trained(data, tmp_path_factory):
    """baseline -> ADMM (2 rhos) -> masked retrain with warmup, in one checkpoint root.

    The runs write 2.4 GB; tests read the baseline, the retrained model and its resume point. After
    each phase the listing of the run folder (`files`) and the metadata of every checkpoint
    (`metadata`: options, the keys, rho and the names in Z of a stage file) are noted, and the files no
    later phase or test reads (the other resume points, the stage files: 1.6 GB) are removed."""
    ckpt = tmp_path_factory.mktemp('ckpt')
    folder = os.path.join(ckpt, RUN)
    common = ['--data_location', data, '--ckpt-root', ckpt, *GEOMETRY]
    metadata, files = {}, set()

    def note_then_drop(*patterns):
        for path in glob.glob(os.path.join(ckpt, '*.pt')) + glob.glob(os.path.join(folder, '*.pt')):
            if path not in metadata:
                _, meta = read_checkpoint(path)
                metadata[path] = {'options': meta['options'], 'keys': set(meta), 'rho': meta.get('rho'),
                                  'admm_z': set(meta['admm']['Z']) if 'admm' in meta else None}
        files.update(os.listdir(folder) if os.path.isdir(folder) else ())
        drop(*patterns)

    run('--baseline', '--epochs', 2, '--lr', 0.003, *common)
    note_then_drop(os.path.join(ckpt, 'ucf101_c3d_baseline.pt'))
    run('--admm', '--epochs', 2, '--admm-epochs', 1, '--rho', 0.01, '--rho-num', 2, '--config-file', 'c3d_2.53x_v2',
        '--lr', 0.001, *common)
    note_then_drop(os.path.join(folder, f'{RUN}_admm_last.pt'), os.path.join(folder, f'{RUN}_0.01.pt'))
    retrain = run('--masked-retrain', '--epochs', 3, '--warmup', '--warmup-epochs', 1, '--warmup-lr', 1e-5,
                  '--lr-scheduler', 'cosine', '--rho', 0.01, '--rho-num', 2, '--config-file', 'c3d_2.53x_v2',
                  '--lr', 0.001, '--combine-progressive', *common)
    note_then_drop(os.path.join(folder, f'{RUN}_0.1.pt'))
    return {'ckpt': str(ckpt), 'common': common, 'retrain_out': retrain.stdout, 'files': files, 'metadata': metadata}


@pytest.fixture(scope='session')
def baseline(trained):
    return glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt'))[0]


# ----------------------------------------------------------------------------- models and weights

@pytest.fixture(scope='session')
def c3d():
    """C3D as the original builds it (101 classes, 16x112x112), seed 0; shared: tests must not change it."""
    torch.manual_seed(0)
    return build_model('c3d', 101)


@pytest.fixture(scope='session')
def c3d_32():
    """C3D at 16x32x32 (the same conv weights as at 112, quicker), 101 classes, seed 0; shared: tests must not
    change it."""
    torch.manual_seed(0)
    return build_model('c3d', 101, crop_size=32)


def random_weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_same(y, ref):
    # float32 sums in another order: allow a few ulps of the largest output
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=2e-5 * max(1.0, ref.abs().max().item()))


def pruned_conv(o, i, kernel, block=(8, 4), ratio=0.6, seed=0, **kw):
    """A Conv3d with random weights projected onto blk-kgs at `block`, `ratio` of the groups zero."""
    torch.manual_seed(seed)
    conv = nn.Conv3d(i, o, kernel, **kw)
    with torch.no_grad():
        conv.weight.copy_(admm.project(conv.weight, ratio, 'blk-kgs', block))
    return conv


def trained_looking(model, seed=0):
    """`model` in eval mode with non-zero biases and BatchNorm statistics, as after training: pruned
    channels carry constants and folding a BatchNorm changes the weights."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.5)
            elif isinstance(m, (nn.Conv3d, nn.Linear)) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return model.eval()


def kgs_pruned_c3d(block):
    """C3D at 16x32x32 (5 classes, seed 0, eval mode) hard-pruned with the original's c3d_3.57x under
    blk-kgs at `block`, a clip and the model's output on it: (model, clip, output)."""
    torch.manual_seed(0)
    model = build_model('c3d', 5, crop_size=32).eval()
    admm.hard_prune(model, admm.load_profile('c3d_3.57x', model), 'blk-kgs', block)
    x = torch.randn(1, 3, 16, 32, 32)
    with torch.no_grad():
        return model, x, model(x)


class Tiny(nn.Module):
    """Two 3x3x3 convs and a classifier; `filters` of conv2 (45: kgr's last block has padding rows)."""

    def __init__(self, filters=16):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv3d(16, filters, 3, padding=1)
        self.fc = nn.Linear(filters, 5)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3, 4)))
