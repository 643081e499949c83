"""KGS execution: KGSConv3d computes the dense conv of the pruned weight, for every layer shape the
models use and odd ones, and sparse_exec swaps it into whole models without changing their outputs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_same, pruned_conv

import admm
from models import build_model, kgs_cpu
from models.slim import load_model, macs, save_model
from models.sparse_conv import KGSConv3d, dense_exec, sparse_exec

# The path sparse_exec's KGS layers take: compiled where a compiler is found (test_kgs_cpu.py checks it is).
KGS = 'compiled' if kgs_cpu.available() else 'kgs'


# (out, in, kernel, stride, padding, dilation, input (N, I, T, H, W)); out / in not multiples of 8 / 4
SHAPES = {
    'c3d 3x3x3': (13, 6, 3, 1, 1, 1, (2, 6, 5, 9, 7)),
    'r2+1d spatial 1x3x3 stride 2': (16, 7, (1, 3, 3), (1, 2, 2), (0, 1, 1), 1, (2, 7, 4, 9, 9)),
    'r2+1d temporal 3x1x1 stride 2': (10, 9, (3, 1, 1), (2, 1, 1), (1, 0, 0), 1, (1, 9, 7, 5, 6)),
    'downsample 1x1x1 stride 2': (9, 5, 1, 2, 0, 1, (3, 5, 5, 7, 7)),
    's3d 1x1x1': (11, 10, 1, 1, 0, 1, (2, 10, 3, 5, 4)),
    's3d conv1 3x7x7': (8, 3, (3, 7, 7), (1, 2, 2), (1, 3, 3), 1, (1, 3, 4, 16, 15)),
    'dilated, no padding in T': (12, 4, 3, 1, (0, 2, 2), 2, (1, 4, 7, 8, 8)),
    'W stride 3, dilation 2': (7, 5, 3, (1, 2, 3), (1, 2, 4), (1, 1, 2), (2, 5, 5, 11, 13)),
}


@pytest.mark.parametrize('shape', SHAPES, ids=list(SHAPES))
@pytest.mark.parametrize('gm', [1, 8, 64])
def test_kgs_conv_equals_the_dense_conv_of_the_pruned_weight(shape, gm):
    o, i, k, s, p, d, x_shape = SHAPES[shape]
    conv = pruned_conv(o, i, k, block=(gm, 2), stride=s, padding=p, dilation=d)
    x = torch.randn(x_shape)
    kgs = KGSConv3d.from_conv(conv, gm)
    with torch.no_grad():
        assert_same(kgs(x), conv(x))
        assert_same(kgs(x), conv(x))                    # second call reuses the cached index and workspaces


@pytest.mark.parametrize('mode', ['rows', 'plane'])
def test_every_run_layout_gives_the_same_result(mode):
    conv = pruned_conv(20, 12, 3, block=(4, 4), padding=1)
    kgs = KGSConv3d.from_conv(conv, 4)
    kgs.mode = mode
    x = torch.randn(2, 12, 6, 10, 9)
    with torch.no_grad():
        assert_same(kgs(x), conv(x))
    assert next(iter(kgs._plans.values()))['mode'] == mode


def test_tiles_under_a_small_workspace_budget_give_the_same_result():
    conv = pruned_conv(20, 12, 3, block=(4, 4), padding=1)
    kgs = KGSConv3d.from_conv(conv, 4)
    x = torch.randn(3, 12, 6, 10, 9)
    for budget in (1 << 30, 40_000, 1):                 # whole batch, slices of one sample, one run at a time
        kgs.max_workspace = budget
        kgs.release()
        with torch.no_grad():
            assert_same(kgs(x), conv(x))
    assert len(next(iter(kgs._plans.values()))['tiles']) == 3 * 6 * 10


def test_input_shape_changes_rebuild_the_plan():
    conv = pruned_conv(16, 8, 3, padding=1)
    kgs = KGSConv3d.from_conv(conv, 8)
    with torch.no_grad():
        for shape in [(1, 8, 4, 8, 8), (3, 8, 5, 6, 7), (1, 8, 4, 8, 8), (2, 8, 4, 4, 4)]:
            x = torch.randn(shape)
            assert_same(kgs(x), conv(x))
    assert len(kgs._plans) <= 2


def test_kgs_conv_without_bias_and_with_non_contiguous_input():
    conv = pruned_conv(16, 8, 3, padding=1, bias=False)
    kgs = KGSConv3d.from_conv(conv, 16)
    x = torch.randn(2, 6, 8, 9, 8).transpose(1, 4)[:, :, :5]          # (2, 8, 5, 9, 8), strided
    with torch.no_grad():
        assert_same(kgs(x), conv(x))


def test_portable_form_equals_the_fast_form_and_carries_gradients_to_the_input():
    conv = pruned_conv(12, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
    kgs = KGSConv3d.from_conv(conv, 4)
    x = torch.randn(2, 8, 3, 9, 9, requires_grad=True)
    y = kgs(x)                                           # with gradients: the portable form
    assert_same(y, conv(x))
    y.square().sum().backward()
    ref = x.grad.clone()
    x.grad = None
    conv(x).square().sum().backward()
    assert_same(ref, x.grad)


def test_dense_weight_restores_the_pruned_weight_and_a_row_that_keeps_nothing():
    conv = pruned_conv(24, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight[8:16] = 0                             # one whole block row pruned
    kgs = KGSConv3d.from_conv(conv, 8)
    assert torch.equal(kgs.dense_weight(), conv.weight)
    x = torch.randn(1, 8, 4, 6, 6)
    with torch.no_grad():
        assert_same(kgs(x), conv(x))


def test_gemm_is_smaller_than_the_dense_conv_by_the_kept_fraction():
    conv = pruned_conv(64, 32, 3, block=(64, 4), ratio=0.75, padding=1)
    kgs = KGSConv3d.from_conv(conv, 64)
    assert kgs.gemm_density == pytest.approx((conv.weight != 0).float().mean().item(), abs=1e-6)
    assert kgs.gemm_density <= 0.26


@pytest.mark.parametrize('arch, clip, profile, block', [
    # _all-convs: every conv but the first pruned, so a stray exact zero of the random initialisation
    # (which sparse_exec converts at min_speedup=0) never falls in a layer outside the profile
    ('c3d', (2, 3, 16, 32, 32), 'c3d_3.57x_all-convs', (512, 4)),
    ('r2+1d', (2, 3, 8, 32, 32), 'r2+1d-pretrained_3.20x_all-convs', (8, 4)),
    ('s3d', (1, 3, 4, 32, 32), 's3d_2.09x', (32, 8)),
])
def test_sparse_exec_keeps_every_architecture_s_outputs(arch, clip, profile, block):
    torch.manual_seed(0)
    model = build_model(arch, 5, **({'crop_size': 32} if arch == 'c3d' else {})).eval()
    ratios = admm.load_profile(profile, model)
    admm.hard_prune(model, ratios, 'blk-kgs', block)
    x = torch.randn(clip)
    with torch.no_grad():
        ref = model(x)
        report = sparse_exec(model, block, min_speedup=0)
        y = model(x)
    assert_same(y, ref)
    converted = [n for n, row in report.items() if row['path'] == KGS]
    pruned = {n[:-len('.weight')] for n in ratios}
    assert set(converted) == pruned
    assert all(isinstance(model.get_submodule(n), KGSConv3d) for n in converted)


def test_sparse_exec_leaves_dense_and_unprofitable_layers_alone_and_says_why():
    model = build_model('c3d', 5, crop_size=32)
    with torch.no_grad():
        model.conv2.weight.copy_(admm.project(model.conv2.weight, 0.8, 'blk-kgs', (128, 4)))
        model.conv3a.weight.copy_(admm.project(model.conv3a.weight, 0.5, 'irregular', (8, 4)))
    report = sparse_exec(model, (128, 4))
    assert report['conv2']['path'] == KGS and report['conv2']['estimated_speedup'] > 2
    assert report['conv3a']['path'] == 'dense' and 'estimated' in report['conv3a']['reason']
    assert report['conv1']['reason'] == 'no zeros'
    assert isinstance(model.conv3a, nn.Conv3d)


def test_sparse_exec_refuses_an_unknown_layer_and_skips_grouped_convs():
    model = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1, groups=2))
    with torch.no_grad():
        model[0].weight[:4] = 0
    with pytest.raises(KeyError, match='not a Conv3d'):
        sparse_exec(model, (8, 4), layers=['conv9'])
    report = sparse_exec(model, (8, 4), min_speedup=0)
    assert report['0']['path'] == 'dense' and 'groups=1' in report['0']['reason']


def test_dense_exec_undoes_sparse_exec():
    model = build_model('c3d', 5, crop_size=32)
    admm.hard_prune(model, admm.load_profile('c3d_3.57x', model), 'blk-kgs', (32, 8))
    state = copy.deepcopy(model.state_dict())
    sparse_exec(model, (32, 8), min_speedup=0)
    dense_exec(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_saved_sparse_model_loads_without_pickle_and_counts_fewer_macs(tmp_path):
    torch.manual_seed(0)
    model = build_model('c3d', 5, crop_size=32).eval()
    admm.hard_prune(model, admm.load_profile('c3d_3.57x', model), 'blk-kgs', (512, 4))
    clip = (1, 3, 16, 32, 32)
    dense_macs = macs(model, clip)
    sparse_exec(model, (512, 4), min_speedup=0)
    save_model(model, tmp_path / 'm.pt', 'c3d', 5, crop_size=32)
    torch.load(tmp_path / 'm.pt', weights_only=True)
    loaded = load_model(tmp_path / 'm.pt')
    assert isinstance(loaded.conv3b, KGSConv3d)
    x = torch.randn(clip)
    with torch.no_grad():
        assert_same(loaded(x), model(x))
    assert macs(loaded, clip) < 0.5 * dense_macs


def test_onnx_export_of_a_sparse_model_runs_like_pytorch(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    from models.compact import export_onnx
    layers = [pruned_conv(16, 3, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1), seed=1),
              pruned_conv(12, 16, (3, 1, 1), padding=(1, 0, 0), seed=2), nn.ReLU(),
              pruned_conv(20, 12, 3, padding=1, seed=3), nn.Conv3d(20, 4, 1)]       # the last one stays dense
    model = nn.Sequential(*layers).eval()
    sparse_exec(model, (8, 4), min_speedup=0)
    assert sum(isinstance(m, KGSConv3d) for m in model) == 3
    x = torch.randn(1, 3, 4, 16, 16)
    export_onnx(model, str(tmp_path / 'm.onnx'), tuple(x.shape))
    session = ort.InferenceSession(str(tmp_path / 'm.onnx'), providers=['CPUExecutionProvider'])
    with torch.no_grad():
        assert_same(torch.from_numpy(session.run(None, {'clip': x.numpy()})[0]), model(x))


def test_deep_copies_and_meta_copies_work():
    conv = pruned_conv(16, 8, 3, padding=1)
    kgs = KGSConv3d.from_conv(conv, 8)
    x = torch.randn(1, 8, 4, 6, 6)
    with torch.no_grad():
        kgs(x)
        twin = copy.deepcopy(kgs)
        assert_same(twin(x), F.conv3d(x, conv.weight, conv.bias, padding=1))
    meta = copy.deepcopy(kgs).to('meta')
    assert meta(torch.empty(1, 8, 4, 6, 6, device='meta')).shape == (1, 16, 4, 6, 6)


def test_with_an_example_input_the_choice_is_measured():
    def model():
        return nn.Sequential(pruned_conv(32, 16, 3, block=(32, 4), ratio=0.8, padding=1), nn.ReLU(),
                             pruned_conv(32, 32, 3, block=(32, 4), ratio=0.8, padding=1)).eval()
    converted, x = model(), torch.randn(1, 16, 4, 12, 12)
    with torch.no_grad():
        ref = converted(x)
    report = sparse_exec(converted, (32, 4), min_speedup=0, example_input=x, reps=1)
    assert all(report[n]['measured_speedup'] > 0 and report[n]['path'] == KGS for n in ('0', '2'))
    with torch.no_grad():
        assert_same(converted(x), ref)
    report = sparse_exec(model(), (32, 4), min_speedup=1e9, example_input=x, reps=1)    # never fast enough
    assert [row['path'] for row in report.values()] == ['dense', 'dense']
    assert 'measured' in report['0']['reason']


def test_inference_mode_and_no_grad_calls_can_alternate():
    conv = pruned_conv(16, 8, 3, padding=1)
    kgs = KGSConv3d.from_conv(conv, 8)
    x = torch.randn(1, 8, 4, 6, 6)
    with torch.no_grad():
        ref = conv(x)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            assert_same(kgs(x), ref)
