"""`--evaluate --sparse-exec` and `--export --sparse-exec`: the pruned model in its faster form, from the
command line, with the same predictions as the masked model."""
import glob
import json
import os
import re

import pytest
import torch
from runner import GEOMETRY, RUN, fails_cleanly, run

from models import build_model, read_checkpoint
from models.slim import load_model

pytestmark = pytest.mark.e2e

C3D_CONVS = ['conv2', 'conv3a', 'conv3b', 'conv4a', 'conv4b', 'conv5a', 'conv5b']
TRAINED_CONVS = ['conv2', 'conv3a', 'conv3b']      # what the trained run's profile, c3d_2.53x_v2, prunes


def result(out):
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith('RESULT '))[7:])


def filter_pruned(baseline, path):
    """The baseline with every other filter of conv2..conv5b zeroed (weight and bias): a filter-pruned model."""
    state, _ = read_checkpoint(baseline)
    for name in C3D_CONVS:
        state[f'{name}.weight'][1::2] = 0
        state[f'{name}.bias'][1::2] = 0
    torch.save({'state_dict': state}, path)
    return state


def test_evaluate_sparse_exec_of_a_filter_pruned_model_runs_slim_with_the_same_predictions(data, baseline, tmp_path):
    path = tmp_path / 'filter.pt'
    filter_pruned(baseline, path)
    common = ['--evaluate', '--load-path', path, '--data_location', data, *GEOMETRY]
    plain = result(run(*common))
    out = run(*common, '--sparse-exec', '--sparsity-type', 'filter')
    fast = result(out)
    speed = fast['sparse_exec']
    assert speed['slim_layers'] >= len(C3D_CONVS)        # every pruned conv narrowed (and its consumers)
    assert speed['max_abs_difference'] < 1e-3
    assert speed['dense_ms'] > 0 and speed['fast_ms'] > 0
    assert abs(speed['speedup'] - speed['dense_ms'] / speed['fast_ms']) < 1e-6
    assert fast['top1'] == plain['top1'] and fast['top5'] == plain['top5']
    assert abs(fast['loss'] - plain['loss']) < 1e-4
    assert fast['flops_reduction'] == plain['flops_reduction'] > 1.5
    assert 'sparse-exec: slim' in out.stdout + out.stderr


def test_evaluate_sparse_exec_of_a_kgs_model_keeps_its_predictions_and_reports_each_layer(data, trained):
    final = glob.glob(os.path.join(trained['ckpt'], RUN, f'{RUN}_2rhos_epoch-*.pt'))[0]
    common = ['--evaluate', '--load-path', final, '--data_location', data, *GEOMETRY]
    plain = result(run(*common))
    out = run(*common, '--sparse-exec')
    fast = result(out)
    speed = fast['sparse_exec']
    assert speed['pruned_convs'] == len(TRAINED_CONVS) and 0 <= speed['kgs_layers'] <= speed['pruned_convs']
    text = out.stdout + out.stderr
    # unpruned convs that measured faster compiled (conv1, ...) are counted apart, not as KGS layers
    compiled = re.findall(r'sparse-exec (\S+) +compiled ', text)
    assert speed['unpruned_compiled'] == len([n for n in compiled if n not in TRAINED_CONVS])
    assert speed['kgs_layers'] == len([n for n in compiled if n in TRAINED_CONVS])
    assert speed['slim_layers'] == 0                      # a block type: no channel removed
    assert speed['max_abs_difference'] < 1e-3
    assert fast['top1'] == plain['top1'] and abs(fast['loss'] - plain['loss']) < 1e-4
    for name in TRAINED_CONVS:                            # each layer's choice, measured, is logged
        assert f'sparse-exec {name}' in text and 'measured' in text


def test_export_sparse_exec_writes_a_faster_model_that_loads_without_pickle(baseline, tmp_path):
    path = tmp_path / 'filter.pt'
    state = filter_pruned(baseline, path)
    run('--export', path, '--sparse-exec', '--sparsity-type', 'filter', '--onnx', *GEOMETRY)
    fast_path = tmp_path / 'filter.compact.fast.pt'
    assert fast_path.exists() and (tmp_path / 'filter.compact.onnx').exists()
    fast = load_model(fast_path)
    assert fast.conv2.out_channels == 64                  # 128 filters, half of them pruned
    dense = build_model('c3d', 5, pretrained=False, num_frames=16, crop_size=16).eval()
    dense.load_state_dict(state)
    clip = torch.randn(2, 3, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(fast(clip), dense(clip), atol=1e-4)
    # A second export refuses to replace the fast file without --force
    before = fast_path.read_bytes()
    (tmp_path / 'filter.compact.pt').unlink()
    fails_cleanly(run('--export', path, '--sparse-exec', '--sparsity-type', 'filter', *GEOMETRY, check=False),
                  'filter.compact.fast.pt exists', 'pass --force')
    assert fast_path.read_bytes() == before


def test_sparse_exec_needs_evaluate_or_export_and_float32():
    fails_cleanly(run('--baseline', '--sparse-exec', *GEOMETRY, check=False), '--sparse-exec goes with', code=2)
    fails_cleanly(run('--evaluate', '--sparse-exec', '--amp', *GEOMETRY, check=False), 'drop --amp', code=2)
