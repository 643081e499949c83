"""Compact export: exact round trip, smaller files, and ONNX that runs like the PyTorch model."""
import copy
import math
import os

import numpy as np
import pytest
import torch

import admm
from models import build_model
from models.compact import export_onnx, load_compact, save_compact


def bits(t):
    """Compare tensors bit for bit (so -0.0 and +0.0 differ)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def assert_identical(restored, original):
    assert list(restored) == list(original)
    for name, t in original.items():
        assert restored[name].dtype == t.dtype and restored[name].shape == t.shape, name
        assert torch.equal(bits(restored[name]), bits(t)), name


@pytest.fixture(scope='module')
def s3d():
    torch.manual_seed(0)
    return build_model('s3d', 5)


def pruned(model, profile, sparsity_type):
    model = copy.deepcopy(model)
    ratios = admm.load_profile(profile, model)
    if sparsity_type == 'kgc':            # kgc cannot group a single kernel position
        ratios = {n: r for n, r in ratios.items() if math.prod(dict(model.named_parameters())[n].shape[2:]) > 1}
    admm.hard_prune(model, ratios, sparsity_type)
    return model


@pytest.mark.parametrize('sparsity_type', admm.SPARSITY_TYPES)
def test_c3d_round_trip_is_bit_for_bit_and_smaller(tmp_path, c3d_32, sparsity_type):
    # every conv but the first pruned: enough of the weights for the file to be a fifth smaller
    state = pruned(c3d_32, 'c3d_3.57x_all-convs', sparsity_type).state_dict()
    stored = save_compact(state, tmp_path / 'c.pt', sparsity_type)
    assert set(stored) == set(admm.load_profile('c3d_3.57x_all-convs', c3d_32))
    assert_identical(load_compact(tmp_path / 'c.pt'), state)
    torch.save(state, tmp_path / 'dense.pt')
    assert os.path.getsize(tmp_path / 'c.pt') < 0.8 * os.path.getsize(tmp_path / 'dense.pt')


@pytest.mark.parametrize('sparsity_type', ['blk-kgs', 'kgr', 'kgc', 'blk-vanilla'])
def test_s3d_round_trip_keeps_every_tensor_including_batchnorm_counters(tmp_path, s3d, sparsity_type):
    state = pruned(s3d, 's3d_2.09x_all-convs', sparsity_type).state_dict()      # more than 20 weights pruned
    assert any(t.dtype == torch.int64 for t in state.values())
    stored = save_compact(state, tmp_path / 's.pt', sparsity_type)
    assert len(stored) > 20
    assert_identical(load_compact(tmp_path / 's.pt'), state)
    torch.save(state, tmp_path / 'dense.pt')
    assert os.path.getsize(tmp_path / 's.pt') < os.path.getsize(tmp_path / 'dense.pt')


def test_module_prefixes_and_negative_zeros_survive(tmp_path):
    w = torch.randn(16, 8, 3, 3, 3)
    w = admm.project(w, 0.7, 'blk-kgs')
    w[0, 0, 0, 0, 0] = -0.0 if w[0, 0, 0, 0, 0] == 0 else w[0, 0, 0, 0, 0]
    state = {'module.conv.weight': w, 'module.conv.bias': torch.randn(16)}
    save_compact(state, tmp_path / 'c.pt', prune_names=['conv.weight'])
    assert_identical(load_compact(tmp_path / 'c.pt'), state)


def test_dense_and_irregularly_sparse_weights_stay_dense(tmp_path):
    dense = torch.randn(32, 16, 3, 3, 3)
    speckled = dense * (torch.rand_like(dense) > 0.3)       # zeros that make up no whole kgs group
    stored = save_compact({'a': dense, 'b': speckled}, tmp_path / 'c.pt', 'blk-kgs')
    assert stored == []
    assert_identical(load_compact(tmp_path / 'c.pt'), {'a': dense, 'b': speckled})


def test_the_file_loads_without_unpickling_objects(tmp_path, c3d_32):
    save_compact(pruned(c3d_32, 'c3d_3.57x', 'kgr').state_dict(), tmp_path / 'c.pt', 'kgr')
    data = torch.load(tmp_path / 'c.pt', weights_only=True)
    assert data['format'] == 'rt3d-compact'
    entry = data['compact']['conv2.weight']
    assert entry['sparsity_type'] == 'kgr' and entry['index'].dtype == torch.uint8


def test_stored_index_is_the_kept_group_grid_of_hard_prune(tmp_path, c3d_32):
    model = copy.deepcopy(c3d_32)
    kept = admm.hard_prune(model, admm.load_profile('c3d_3.57x', model), 'blk-kgs')
    save_compact(model.state_dict(), tmp_path / 'c.pt', 'blk-kgs')
    entry = torch.load(tmp_path / 'c.pt', weights_only=True)['compact']['conv3a.weight']
    index = np.unpackbits(entry['index'].numpy())[:entry['groups']].astype(bool)
    assert np.array_equal(index, kept['conv3a.weight'].flatten().numpy())


def test_a_file_of_another_kind_is_refused(tmp_path):
    torch.save({'conv.weight': torch.zeros(2, 2)}, tmp_path / 'plain.pt')
    with pytest.raises(ValueError, match='not a compact model file'):
        load_compact(tmp_path / 'plain.pt')


def test_unknown_prune_name_is_refused(tmp_path):
    with pytest.raises(KeyError, match='conv9.weight'):
        save_compact({'conv.weight': torch.zeros(8, 4)}, tmp_path / 'c.pt', prune_names=['conv9.weight'])


def test_onnx_file_runs_like_the_pytorch_model(tmp_path, s3d):
    ort = pytest.importorskip('onnxruntime')
    model = pruned(s3d, 's3d_2.09x', 'blk-kgs').eval()
    export_onnx(model, tmp_path / 's3d.onnx', (2, 3, 8, 64, 64))
    session = ort.InferenceSession(str(tmp_path / 's3d.onnx'), providers=['CPUExecutionProvider'])
    clip = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    got = session.run(None, {'clip': clip.numpy()})[0]
    with torch.no_grad():
        expected = model(clip).numpy()
    assert got.shape == (2, 5)
    assert np.allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_onnx_export_restores_training_mode(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 4 * 4, 2))
    export_onnx(model, tmp_path / 'm.onnx', (1, 3, 4, 6, 6))
    assert model.training and os.path.getsize(tmp_path / 'm.onnx') > 0


def test_several_types_let_each_weight_take_the_smallest(tmp_path):
    torch.manual_seed(0)
    w = admm.combined_project(torch.randn(64, 32, 3, 3, 3), [(0.5, 'kgr'), (0.5, 'kgc')])
    sizes = {}
    for types in (['kgr'], ['kgc'], ['kgr', 'kgc', 'irregular']):
        save_compact({'w': w}, tmp_path / 'c.pt', types)
        assert_identical(load_compact(tmp_path / 'c.pt'), {'w': w})
        sizes[tuple(types)] = os.path.getsize(tmp_path / 'c.pt')
    assert sizes[('kgr', 'kgc', 'irregular')] < min(sizes[('kgr',)], sizes[('kgc',)])
