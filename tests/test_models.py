"""Model construction, parameter names, and loading the original's checkpoint forms."""
import io
import os
import re

import numpy as np
import pytest
import torch

from models import CheckpointError, CheckpointMismatch, build_model, load_weights, read_checkpoint


def test_c3d_parameter_names_and_fc6_size(c3d):
    names = [n for n, _ in c3d.named_parameters()]
    expected = [f'{layer}.{kind}' for layer in ('conv1', 'conv2', 'conv3a', 'conv3b', 'conv4a', 'conv4b',
                                                'conv5a', 'conv5b', 'fc6', 'fc7', 'fc8') for kind in ('weight', 'bias')]
    assert names == expected
    assert c3d.fc6.in_features == 8192


@pytest.mark.parametrize('frames, crop', [(16, 32), (16, 64), (16, 16), (32, 112)])
def test_c3d_runs_at_smaller_clips(frames, crop):
    model = build_model('c3d', 7, num_frames=frames, crop_size=crop)
    assert model(torch.randn(2, 3, frames, crop, crop)).shape == (2, 7)


def test_c3d_refuses_a_clip_too_small():
    with pytest.raises(ValueError, match='at least 16 frames'):
        build_model('c3d', 7, num_frames=8, crop_size=32)


def test_r2plus1d_names_follow_torchvision():
    model = build_model('r2+1d', 10)
    names = dict(model.named_parameters())
    assert names['layer1.0.conv1.0.0.weight'].shape[2:] == (1, 3, 3)     # spatial
    assert names['layer1.0.conv1.0.3.weight'].shape[2:] == (3, 1, 1)     # temporal
    assert names['fc.weight'].shape == (10, 512)
    assert model(torch.randn(1, 3, 8, 32, 32)).shape == (1, 10)


def test_s3d_names_and_shapes():
    model = build_model('s3d', 10)
    names = dict(model.named_parameters())
    assert names['conv1.conv.weight'].shape == (64, 3, 3, 7, 7)
    assert names['conv3.conv_t.bias'].shape == (192,)
    assert names['inception4b.branch2.1.conv.weight'].shape == (224, 112, 1, 3, 3)
    assert names['inception5b.branch4.1.conv.weight'].shape == (128, 832, 1, 1, 1)
    assert names['fc.weight'].shape == (10, 1024)
    assert model.conv1.bn.eps == 1e-3
    assert model(torch.randn(1, 3, 8, 64, 64)).shape == (1, 10)


def test_s3d_temporal_stride_option():
    kept = build_model('s3d', 5, without_t_stride=True).eval()
    halved = build_model('s3d', 5, without_t_stride=False).eval()
    assert kept.pool2.stride == (1, 2, 2) and halved.pool2.stride == (2, 2, 2)


def test_unknown_arch():
    with pytest.raises(ValueError, match='unknown --arch'):
        build_model('resnet50', 10)


def test_pretrained_r2plus1d_offline_says_how_to_proceed(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    from torchvision.models.video import R2Plus1D_18_Weights

    def offline(self, *a, **k):
        raise OSError('network unreachable')
    monkeypatch.setattr(R2Plus1D_18_Weights.KINETICS400_V1.__class__, 'get_state_dict', offline)
    with pytest.raises(RuntimeError, match=r'(?s)Kinetics-400.*--load-path'):
        build_model('r2+1d-pretrained', 10)


@pytest.mark.parametrize('form', ['bare', 'state_dict', 'module', 'state_dict+module'])
def test_loads_every_checkpoint_form_of_the_original(tmp_path, c3d, form):
    state = c3d.state_dict()
    if 'module' in form:
        state = {'module.' + k: v for k, v in state.items()}
    ckpt = {'state_dict': state, 'epoch': 14, 'top1': 81.571} if 'state_dict' in form else state
    path = tmp_path / 'ckpt.pt'
    torch.save(ckpt, path)
    fresh = build_model('c3d', 101)
    meta = load_weights(fresh, str(path))
    for k, v in c3d.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    if 'state_dict' in form:
        assert meta['epoch'] == 14


def test_wrong_class_count_names_the_classifier_and_the_fix(tmp_path, c3d):
    torch.save(c3d.state_dict(), tmp_path / 'c.pt')
    with pytest.raises(CheckpointMismatch, match=r"(?s)fc8\.weight.*\(101, 4096\).*--num-classes 101"):
        load_weights(build_model('c3d', 51), str(tmp_path / 'c.pt'))


def test_wrong_architecture_names_missing_and_unexpected_keys(tmp_path, c3d):
    torch.save({'state_dict': c3d.state_dict()}, tmp_path / 'c.pt')
    with pytest.raises(CheckpointMismatch, match=r"(?s)missing keys: stem\.0\.weight.*unexpected keys: conv1\.weight"):
        load_weights(build_model('r2+1d', 101), str(tmp_path / 'c.pt'))


def test_checkpoint_with_pickled_objects_is_refused_with_advice(tmp_path):
    import argparse
    torch.save({'state_dict': {}, 'args': argparse.Namespace(lr=1)}, tmp_path / 'c.pt')
    with pytest.raises(RuntimeError, match='weights_only'):
        load_weights(build_model('c3d', 5, crop_size=32), str(tmp_path / 'c.pt'))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.pt'):
        load_weights(build_model('c3d', 5, crop_size=32), str(tmp_path / 'nowhere.pt'))


def legacy_save(obj, path):
    """The pre-1.6 (non-zip) format, naming numpy's scalar constructor as numpy 1.x did in 2020."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    path.write_bytes(buf.getvalue().replace(b'numpy._core.multiarray\nscalar', b'numpy.core.multiarray\nscalar'))


def test_2020_baseline_with_numpy_scalars_in_the_legacy_format_loads(tmp_path, c3d):
    path = tmp_path / 'ucf101_c3d_transfer_epoch-14_top1-81.571.pt'
    legacy_save({'state_dict': {'module.' + k: v for k, v in c3d.state_dict().items()},
                 'epoch': 14, 'top1': np.float64(81.571), 'best': np.float32(0.5)}, path)
    assert b'numpy.core.multiarray\nscalar' in path.read_bytes()
    fresh = build_model('c3d', 101)
    meta = load_weights(fresh, str(path))
    assert meta['top1'] == pytest.approx(81.571) and isinstance(meta['top1'], np.floating)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in c3d.state_dict().items())


class RunsCode:
    def __reduce__(self):
        return (os.system, ('touch PWNED',))


@pytest.mark.parametrize('legacy', [False, True])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, legacy, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'evil.pt'
    obj = {'state_dict': {}, 'top1': np.float64(1.0), 'payload': RunsCode()}
    legacy_save(obj, path) if legacy else torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r'(?s)will not unpickle.*system'):
        read_checkpoint(str(path))
    assert not (tmp_path / 'PWNED').exists()


@pytest.mark.parametrize('content', ['empty', 'truncated', 'truncated-legacy', 'random', 'text', 'one byte'])
def test_broken_checkpoint_files_get_one_clear_message(tmp_path, c3d, content):
    whole = io.BytesIO()
    torch.save(c3d.state_dict(), whole, _use_new_zipfile_serialization=content != 'truncated-legacy')
    data = {'empty': b'', 'random': os.urandom(4096), 'text': b'hello world\nnot a model\n', 'one byte': b'a'}.get(
        content, whole.getvalue()[:len(whole.getvalue()) // 2])
    path = tmp_path / 'model.pt'
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf'{re.escape(str(path))} is not a readable PyTorch checkpoint '
                                              rf'\({len(data)} bytes') as info:
        read_checkpoint(str(path))
    assert 'weights_only=False' not in str(info.value)
