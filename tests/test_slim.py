"""Slim models: removing filter-pruned channels keeps every architecture's outputs (eval mode), with
the constants that pruned channels still carry (biases, BatchNorm shifts) added back exactly."""
import copy

import pytest
import torch
import torch.nn as nn
from conftest import assert_same, kgs_pruned_c3d, trained_looking

import admm
from models import build_model, kgs_cpu
from models.slim import BatchNormExpand, SlimConv3d, load_model, macs, save_model, slim_model

CLIPS = {'c3d': (2, 3, 16, 32, 32), 'r2+1d': (2, 3, 8, 32, 32), 's3d': (1, 3, 4, 32, 32)}
# C3D's: conv5b pruned, so that pool5 loses channels (the original's c3d_3.57x leaves conv5b dense)
PROFILES = {'c3d': 'c3d_3.57x_all-convs', 'r2+1d': 'r2+1d-pretrained_3.20x', 's3d': 's3d_2.09x'}


@pytest.fixture(scope='module')
def models():
    torch.manual_seed(0)
    built = {}
    for arch in CLIPS:
        model = trained_looking(build_model(arch, 5, **({'crop_size': 32} if arch == 'c3d' else {})))
        admm.hard_prune(model, admm.load_profile(PROFILES[arch], model), 'filter')
        built[arch] = model
    return built


@pytest.fixture(scope='module')
def slims(models):
    """The slim form of each model, made once (tests must not change it)."""
    return {arch: slim_model(model, arch) for arch, model in models.items()}


@pytest.mark.parametrize('arch', list(CLIPS))
def test_slim_model_equals_the_masked_model_with_fewer_macs_and_parameters(models, slims, arch):
    model, slim = models[arch], slims[arch]
    x = torch.randn(CLIPS[arch])
    with torch.no_grad():
        assert_same(slim(x), model(x))
    assert macs(slim, CLIPS[arch]) < 0.6 * macs(model, CLIPS[arch])
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


def test_constants_of_pruned_channels_are_added_back_at_the_borders(models, slims):
    slim = slims['c3d']
    corrected = [m for m in slim.modules() if isinstance(m, SlimConv3d)]
    assert corrected and all(m.const_weight.abs().sum() > 0 for m in corrected)
    # The classifier takes the constants of removed pool5 channels in its bias.
    assert slim.fc6.in_features < models['c3d'].fc6.in_features


def test_r2plus1d_residual_streams_keep_their_width(models, slims):
    slim = slims['r2+1d']
    bn = slim.get_submodule('layer1.0.conv2.1')
    assert isinstance(bn, BatchNormExpand) and bn.full_features == 64 and bn.num_features < 64
    assert slim.fc.in_features == 512
    assert slim.get_submodule('layer1.0.conv1.0.3').in_channels < models['r2+1d'].get_submodule(
        'layer1.0.conv1.0.3').in_channels


def test_s3d_concatenations_are_sliced_per_branch(models, slims):
    model, slim = models['s3d'], slims['s3d']
    full = model.inception4a.branch1.conv.in_channels
    kept = slim.inception4a.branch1.conv.in_channels
    assert kept < full
    assert all(slim.get_submodule(f'inception4a.{b}').in_channels == kept
               for b in ('branch2.0.conv', 'branch3.0.conv', 'branch4.1.conv'))


def test_channels_no_consumer_reads_are_removed_too():
    torch.manual_seed(0)
    model = trained_looking(build_model('c3d', 5, crop_size=32))
    with torch.no_grad():
        model.conv3a.weight[:, 5:9] = 0                 # conv2's channels 5-8 feed nothing
    slim = slim_model(model, 'c3d')
    assert slim.conv2.out_channels == 124 and slim.conv3a.in_channels == 124
    x = torch.randn(1, 3, 16, 32, 32)
    with torch.no_grad():
        assert_same(slim(x), model(x))


def test_a_layer_with_every_filter_pruned_keeps_one_channel():
    torch.manual_seed(0)
    model = trained_looking(build_model('c3d', 5, crop_size=32))
    with torch.no_grad():
        model.conv4a.weight.zero_()
    slim = slim_model(model, 'c3d')
    assert slim.conv4a.out_channels == 1
    x = torch.randn(1, 3, 16, 32, 32)
    with torch.no_grad():
        assert_same(slim(x), model(x))


def test_average_pooling_keeps_channels_whose_constant_it_would_blur():
    torch.manual_seed(0)
    model = trained_looking(build_model('s3d', 5, pooling_method='avg'))
    with torch.no_grad():
        model.conv1.conv.weight[:8] = 0                 # constants that pool1 (avg, padded) would change
    slim = slim_model(model, 's3d')
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert_same(slim(x), model(x))


def test_saved_slim_model_loads_without_pickle(tmp_path, slims):
    slim = slims['r2+1d']
    save_model(slim, tmp_path / 's.pt', 'r2+1d', 5)
    torch.load(tmp_path / 's.pt', weights_only=True)
    loaded = load_model(tmp_path / 's.pt')
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), slim(x))


def test_a_file_of_another_kind_is_refused(tmp_path):
    torch.save({'format': 'something else'}, tmp_path / 'x.pt')
    with pytest.raises(ValueError, match='not a model file'):
        load_model(tmp_path / 'x.pt')


def test_unknown_architecture_is_refused(models):
    with pytest.raises(ValueError, match='slim_model knows'):
        slim_model(models['c3d'], 'resnet50')


def test_slim_model_leaves_the_original_untouched(models):
    before = copy.deepcopy(models['c3d'].state_dict())
    slim_model(models['c3d'], 'c3d')
    assert all(torch.equal(v, before[k]) for k, v in models['c3d'].state_dict().items())


def test_onnx_file_of_a_slim_model_runs_like_pytorch(tmp_path, slims):
    ort = pytest.importorskip('onnxruntime')
    from models.compact import export_onnx
    slim = slims['r2+1d']
    x = torch.randn(1, 3, 8, 32, 32)
    export_onnx(slim, str(tmp_path / 's.onnx'), tuple(x.shape))
    session = ort.InferenceSession(str(tmp_path / 's.onnx'), providers=['CPUExecutionProvider'])
    with torch.no_grad():
        assert_same(torch.from_numpy(session.run(None, {'clip': x.numpy()})[0]), slim(x))


def test_with_gradients_the_slim_model_still_equals_the_masked_model(models):
    slim = slim_model(models['r2+1d'], 'r2+1d')              # its own copy: this test sets gradients
    x = torch.randn(1, 3, 8, 32, 32)
    y = slim(x)                                       # grad mode: the generic BatchNormExpand path
    with torch.no_grad():
        assert_same(y, models['r2+1d'](x))
        assert_same(slim(x), y)
    y.sum().backward()
    assert slim.layer1[0].conv2[1].weight.grad is not None


def test_faster_model_slims_filter_models_and_runs_kgs_models_from_their_kept_groups(models):
    from models.slim import faster_model
    from models.sparse_conv import KGSConv3d
    slim, report = faster_model(models['c3d'], 'c3d', 'filter')
    assert report['slim']['conv2']['kept'] < report['slim']['conv2']['channels'] and not report['kgs']
    model, x, ref = kgs_pruned_c3d((512, 4))
    fast, report = faster_model(model, 'c3d', ['blk-kgs'], (512, 4))
    path = 'compiled' if kgs_cpu.available() else 'kgs'
    assert isinstance(fast.conv3b, KGSConv3d) and report['kgs']['conv3b']['path'] == path
    with torch.no_grad():
        assert_same(fast(x), ref)


def test_batchnorms_fold_into_the_convs_before_them_by_the_rule_and_keep_the_outputs(models):
    from models.slim import fold_batchnorm
    model = copy.deepcopy(models['r2+1d'])
    conv, bn = model.stem[0], model.stem[1]
    std = (bn.running_var + bn.eps).sqrt()                      # the rule: y = (conv(x) - mean) / std * gamma + beta
    weight = conv.weight.detach() * (bn.weight / std).detach().view(-1, 1, 1, 1, 1)
    bias = ((0 if conv.bias is None else conv.bias) - bn.running_mean) / std * bn.weight + bn.bias
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        ref = model(x)
        folded = fold_batchnorm(model, 'r2+1d')
        y = model(x)
    assert folded['stem.1'] == 'stem.0' and isinstance(model.stem[1], nn.Identity)
    torch.testing.assert_close(model.stem[0].weight, weight)
    torch.testing.assert_close(model.stem[0].bias, bias.detach())
    assert not any(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    assert_same(y, ref)
    torch.testing.assert_close((model.stem[0].weight == 0), (models['r2+1d'].stem[0].weight == 0))


def test_batchnorms_in_training_mode_or_after_a_slim_conv_stay(models, slims):
    from models.slim import fold_batchnorm
    model = copy.deepcopy(models['r2+1d']).train()
    assert fold_batchnorm(model, 'r2+1d') == {}
    slim = copy.deepcopy(slims['r2+1d'])
    folded = fold_batchnorm(slim, 'r2+1d')
    assert 'layer1.0.conv2.1' not in folded                    # a BatchNormExpand: it restores the width
    assert isinstance(slim.get_submodule('layer1.0.conv2.1'), BatchNormExpand)
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        assert_same(slim(x), models['r2+1d'](x))


def test_slim_layers_with_corrections_are_not_converted_to_kgs(models):
    from models.sparse_conv import sparse_exec
    slim = slim_model(models['c3d'], 'c3d')
    corrected = [n for n, m in slim.named_modules() if isinstance(m, SlimConv3d)]
    with torch.no_grad():
        for name in corrected:
            slim.get_submodule(name).weight[:, :2] = 0
    report = sparse_exec(slim, (8, 4), min_speedup=0)
    assert corrected and all('plain nn.Conv3d' in report[n]['reason'] for n in corrected)


def test_inference_mode_and_no_grad_calls_can_alternate(models, slims):
    slim = slims['r2+1d']
    x = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        ref = models['r2+1d'](x)
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            assert_same(slim(x), ref)
