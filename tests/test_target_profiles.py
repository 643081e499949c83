"""profile_flops --target: generated profiles measure within 1% of the target, or are refused."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import admm
import profile_flops
from models import build_model

CROP = 32          # C3D at 16x32x32: the same conv weights as at 112, and quick to profile


@pytest.fixture(scope='module')
def c3d():
    torch.manual_seed(0)
    return build_model('c3d', 101, crop_size=CROP)


def measured(path, model, sparsity_type='blk-kgs'):
    ratios = admm.load_profile(str(path), model)
    return ratios, profile_flops.profile(model, 16, CROP, ratios, sparsity_type)['flops_reduction']


@pytest.mark.parametrize('target, rule', [(2.0, 'uniform'), (3.0, 'flops')])
def test_written_profile_loads_and_measures_within_one_percent(tmp_path, c3d, capsys, target, rule):
    out = tmp_path / 'p.yaml'
    profile_flops.main(['--arch', 'c3d', '--crop-size', str(CROP), '--target', str(target), '--rule', rule,
                        '--out', str(out)])
    assert 'FLOPs reduction' in capsys.readouterr().out
    ratios, reduction = measured(out, c3d)
    assert reduction == pytest.approx(target, rel=0.01)
    assert set(ratios) == set(profile_flops.seed_layers(c3d))
    assert f'--target {target}' in out.read_text()


def test_uniform_rule_gives_one_ratio_and_flops_rule_favours_heavy_layers(c3d):
    uniform, got = profile_flops.target_profile(c3d, 2.5, 16, CROP, rule='uniform')
    assert len(set(uniform.values())) == 1 and got == pytest.approx(2.5, rel=0.01)
    flops, got = profile_flops.target_profile(c3d, 2.5, 16, CROP, rule='flops')
    macs = profile_flops.layer_macs(c3d, 16, CROP)
    by_macs = sorted(flops, key=macs.get)
    assert [flops[n] for n in by_macs] == sorted(flops.values()) and got == pytest.approx(2.5, rel=0.01)


def test_kgc_profile_is_finished_by_single_layer_steps(c3d):
    ratios, got = profile_flops.target_profile(c3d, 3.0, 16, CROP, rule='flops', sparsity_type='kgc')
    assert got == pytest.approx(3.0, rel=0.01)
    assert profile_flops.profile(c3d, 16, CROP, ratios, 'kgc')['flops_reduction'] == pytest.approx(got)


def test_kgr_ratios_stay_below_pruning_whole_blocks(c3d):
    # kgr at a ratio above 7/8 would prune all 8 rows of every block: the search stops at 0.875.
    with pytest.raises(ValueError, match='at up to 0.875'):
        profile_flops.target_profile(c3d, 50, 16, CROP, sparsity_type='kgr')


def test_layers_option_prunes_only_the_matching_weights(tmp_path, c3d, capsys):
    out = tmp_path / 'p.yaml'
    profile_flops.main(['--arch', 'c3d', '--crop-size', str(CROP), '--target', '1.2', '--layers', r'conv4|conv5',
                        '--out', str(out)])
    ratios, reduction = measured(out, c3d)
    assert set(ratios) == {'conv4a.weight', 'conv4b.weight', 'conv5a.weight', 'conv5b.weight'}
    assert reduction == pytest.approx(1.2, rel=0.01)


@pytest.mark.e2e
def test_unreachable_target_exits_with_a_message_and_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, 'profile_flops.py', '--arch', 'c3d', '--crop-size', str(CROP),
                          '--target', '50', '--max-ratio', '0.5', '--out', str(tmp_path / 'p.yaml')],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert 'target 50.0x is out of reach' in out.stderr and '--max-ratio' in out.stderr
    assert 'Traceback' not in out.stderr
    assert not (tmp_path / 'p.yaml').exists()


@pytest.mark.parametrize('argv, message', [
    (['--target', '2', '--layers', 'nothing'], "--layers 'nothing' matches no weight of c3d"),
    (['--target', '0.5'], 'at least 1x'),
    (['--target', '2', '--max-ratio', '1.5'], r'max ratio must be in \(0, 1\)'),
    (['--target', '3.0', '--sparsity-type', 'kgr', 'kgc'], 'one --sparsity-type'),
])
def test_bad_requests_are_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        profile_flops.main(['--arch', 'c3d', '--crop-size', str(CROP), '--out', str(tmp_path / 'p.yaml')] + argv)


def test_target_needs_out():
    with pytest.raises(SystemExit, match='--out'):
        profile_flops.main(['--arch', 'c3d', '--crop-size', str(CROP), '--target', '2'])


def test_layers_that_cannot_take_the_type_are_refused_by_name(c3d):
    with pytest.raises(ValueError, match='fc7.weight.*one position per kernel'):
        profile_flops.target_profile(c3d, 1.5, 16, CROP, layers=['fc7.weight'], sparsity_type='kgc')
