"""A command run again over a finished baseline: a second identical run, and --resume."""
import glob

import pytest
from conftest import link_tree, removed_when_passed
from runner import GEOMETRY, fails_cleanly, run

from models import read_checkpoint

pytestmark = pytest.mark.e2e

ONE_BATCH = ['--baseline', '--epochs', 1, '--max-batches', 1, '--lr', 0.001]


@pytest.fixture(scope='module')
def finished(request, data, tmp_path_factory):
    """A finished one-batch baseline; each test works on a copy (its checkpoints hard-linked)."""
    root = removed_when_passed(request, tmp_path_factory.mktemp('finished'))
    run(*ONE_BATCH, '--data_location', data, '--ckpt-root', root, *GEOMETRY)
    return root


def test_a_second_identical_baseline_does_not_replace_the_first(data, finished, tmp_path):
    link_tree(finished, tmp_path)
    first = glob.glob(str(tmp_path / 'ucf101_c3d_baseline_epoch-1_top1-*.pt'))
    assert len(first) == 1
    before = open(first[0], 'rb').read()
    run(*ONE_BATCH, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY)   # the same seed: the same
    second = glob.glob(str(tmp_path / 'ucf101_c3d_baseline_v2_epoch-1_top1-*.pt'))  # epoch and top-1
    assert len(second) == 1 and open(first[0], 'rb').read() == before


def test_resume_with_other_options_is_refused_naming_them(data, finished, tmp_path):
    link_tree(finished, tmp_path)
    out = run('--baseline', '--epochs', 1, '--max-batches', 1, '--lr', 0.01, '--resume', '--data_location', data,
              '--ckpt-root', tmp_path, *GEOMETRY, check=False)
    fails_cleanly(out, 'lr: 0.01 now, 0.001 in the run being resumed', 'ucf101_c3d_baseline.pt')


def test_resume_continues_with_the_saved_options(finished):
    _, meta = read_checkpoint(str(finished / 'ucf101_c3d_baseline.pt'))
    assert meta['options']['lr'] == 0.001 and meta['options']['epochs'] == 1
