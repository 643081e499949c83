"""profile_flops: FLOPs of the dense models, pruned counts, the command line."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import admm
import profile_flops
from models import build_model


def test_dense_c3d_is_38_5_gmacs():
    report = profile_flops.profile(build_model('c3d', 101), 16, 112)
    assert report['dense_macs'] / 1e9 == pytest.approx(38.5, abs=0.1)
    assert report['dense_flops'] == 2 * report['dense_macs']
    assert report['flops_reduction'] == pytest.approx(1.0)


def test_layer_macs_of_a_conv_follow_the_formula():
    macs = profile_flops.layer_macs(build_model('c3d', 101), 16, 112)
    # conv2: 128 filters x 64 x 27 per output, output 16 x 56 x 56
    assert macs['conv2.weight'] == 128 * 64 * 27 * 16 * 56 * 56
    assert macs['fc6.weight'] == 8192 * 4096


@pytest.mark.e2e
def test_real_zeros_of_a_checkpoint_are_counted(tmp_path):
    torch.manual_seed(0)
    model = build_model('c3d', 101)
    ratios = admm.load_profile('c3d_3.57x', model)
    admm.hard_prune(model, ratios, 'blk-kgs')
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'pruned.pt')
    out = subprocess.run([sys.executable, 'profile_flops.py', '--arch', 'c3d', '--checkpoint',
                          str(tmp_path / 'pruned.pt'), '--json'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report['flops_reduction'] == pytest.approx(3.57, rel=0.02)
    conv2 = next(row for row in report['layers'] if row['name'] == 'conv2.weight')
    assert conv2['density'] == pytest.approx((model.conv2.weight != 0).float().mean().item())
    assert {'dense_flops', 'pruned_flops', 'params_reduction'} <= set(report)


@pytest.mark.e2e
def test_table_output_and_crop_size():
    out = subprocess.run([sys.executable, 'profile_flops.py', '--arch', 'c3d', '--config-file', 'c3d_2.53x_v2',
                          '--crop-size', '32'], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'conv5b.weight' in out.stdout and 'FLOPs reduction' in out.stdout and '3x16x32x32' in out.stdout


def test_flops_reduction_is_close_at_a_small_clip():
    torch.manual_seed(0)
    model = build_model('c3d', 5, crop_size=32)
    ratios = admm.load_profile('c3d_2.53x_v2', model)
    assert profile_flops.profile(model, 16, 32, ratios)['flops_reduction'] == pytest.approx(2.53, rel=0.02)


# --- bad inputs: one `error:` line naming the file and what to do, non-zero exit, no traceback -------

def error_line(argv, capsys):
    """What profile_flops prints for a bad input; fails on a traceback (any exception but SystemExit)."""
    with pytest.raises(SystemExit) as exit_:
        profile_flops.main(argv)
    message = exit_.value.code if isinstance(exit_.value.code, str) else capsys.readouterr().err.strip()
    assert exit_.value.code != 0 and message.startswith('error: ') and '\n' not in message, message
    return message


def test_out_in_a_missing_folder_creates_the_folder(tmp_path):
    out = tmp_path / 'new' / 'profiles' / 'c3d_1.50x.yaml'
    profile_flops.main(['--arch', 'c3d', '--crop-size', '32', '--target', '1.5', '--out', str(out)])
    assert 'prune_ratios:' in out.read_text()


@pytest.mark.parametrize('option', ['--out', '--plot'])
def test_output_path_under_a_file_is_one_error_line_naming_it(tmp_path, capsys, option):
    (tmp_path / 'file').write_text('')
    out = tmp_path / 'file' / 'x.yaml'
    source = ['--target', '1.5', '--out', str(out)] if option == '--out' else ['--plot', str(out)]
    message = error_line(['--arch', 'c3d', '--crop-size', '32', *source], capsys)
    assert f"{option} {out}" in message and 'is a file, not a folder' in message


def test_checkpoint_that_is_not_one_is_one_error_line_naming_it(tmp_path, capsys):
    (tmp_path / 'notes.pt').write_text('hello')
    message = error_line(['--arch', 'c3d', '--checkpoint', str(tmp_path / 'notes.pt')], capsys)
    assert str(tmp_path / 'notes.pt') in message and 'checkpoint' in message


def test_missing_checkpoint_is_one_error_line_naming_it(tmp_path, capsys):
    assert str(tmp_path / 'nowhere.pt') in error_line(['--arch', 'c3d', '--checkpoint', str(tmp_path / 'nowhere.pt')],
                                                       capsys)


def test_checkpoint_of_another_arch_is_one_error_line(tmp_path, capsys):
    torch.save(build_model('c3d', 5, crop_size=32).state_dict(), tmp_path / 'c3d.pt')
    message = error_line(['--arch', 'r2+1d', '--checkpoint', str(tmp_path / 'c3d.pt')], capsys)
    assert str(tmp_path / 'c3d.pt') in message and '--arch' in message


@pytest.mark.parametrize('argv', [['--arch', 'c9d'], ['--arch', 'c3d', '--num-classes', '0'],
                                  ['--arch', 'c3d', '--crop-size', '-8']])
def test_bad_option_values_are_one_error_line(capsys, argv):
    assert argv[-2] in error_line(argv, capsys)


@pytest.mark.parametrize('content', [b'prune_ratios: [unclosed\n', b'\xff\xfe\x00 not text'])
def test_unreadable_profile_is_one_error_line_naming_it(tmp_path, capsys, content):
    (tmp_path / 'bad.yaml').write_bytes(content)
    message = error_line(['--arch', 'c3d', '--crop-size', '32', '--config-file', str(tmp_path / 'bad.yaml')], capsys)
    assert str(tmp_path / 'bad.yaml') in message


def test_bad_layers_pattern_is_one_error_line(tmp_path, capsys):
    message = error_line(['--arch', 'c3d', '--crop-size', '32', '--target', '1.5', '--layers', 'conv[',
                          '--out', str(tmp_path / 'x.yaml')], capsys)
    assert '--layers' in message
