import os
import shutil
import sys

import pytest

# Tests import the project's top-level modules (admm, models, ...) and the test helpers.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

from runner import GEOMETRY, make_data, run  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def remove_run_files_when_all_pass(request, tmp_path_factory):
    """The end-to-end runs write C3D checkpoints (190-590 MB each, ~28 GB in all): once every test has
    passed they are removed, so repeated runs do not fill the disk (KEEP_TEST_FILES=1 keeps them)."""
    yield
    if request.session.testsfailed == 0 and not os.environ.get('KEEP_TEST_FILES'):
        shutil.rmtree(tmp_path_factory.getbasetemp(), ignore_errors=True)


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    """A tiny UCF101-shaped dataset in LMDB form (see runner.make_data)."""
    return make_data(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='session')
def trained(data, tmp_path_factory):
    """baseline -> ADMM (2 rhos) -> masked retrain with warmup, in one checkpoint root."""
    ckpt = tmp_path_factory.mktemp('ckpt')
    common = ['--data_location', data, '--ckpt-root', ckpt, *GEOMETRY]
    run('--baseline', '--epochs', 2, '--lr', 0.003, *common)
    run('--admm', '--epochs', 2, '--admm-epochs', 1, '--rho', 0.01, '--rho-num', 2, '--config-file', 'c3d_2.53x_v2',
        '--lr', 0.001, *common)
    retrain = run('--masked-retrain', '--epochs', 3, '--warmup', '--warmup-epochs', 1, '--warmup-lr', 1e-5,
                  '--lr-scheduler', 'cosine', '--rho', 0.01, '--rho-num', 2, '--config-file', 'c3d_2.53x_v2',
                  '--lr', 0.001, '--combine-progressive', *common)
    return {'ckpt': str(ckpt), 'common': common, 'retrain_out': retrain.stdout}


@pytest.fixture(scope='session')
def baseline(trained):
    import glob
    return glob.glob(os.path.join(trained['ckpt'], 'ucf101_c3d_baseline_epoch-*.pt'))[0]
