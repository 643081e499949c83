"""Profiles: loading, validation errors, and that every shipped profile's name is true."""
import os
import re

import pytest
import torch
import yaml

import admm
import profile_flops
from models import build_model

PROFILES = admm.available_profiles()


def write(tmp_path, text, name='p.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_profile_by_name_and_by_path_give_the_same_ratios(c3d):
    by_name = admm.load_profile('c3d_3.57x', c3d)
    by_path = admm.load_profile(os.path.join(admm.PROFILE_DIR, 'c3d_3.57x.yaml'), c3d)
    assert by_name == by_path and 'conv2.weight' in by_name


def test_keys_with_and_without_module_prefix(tmp_path, c3d):
    a = admm.load_profile(write(tmp_path, 'prune_ratios:\n  module.conv2.weight: 0.5\n'), c3d)
    b = admm.load_profile(write(tmp_path, 'prune_ratios:\n  conv2.weight: 0.5\n', 'q.yaml'), c3d)
    assert a == b == {'conv2.weight': 0.5}


def test_unknown_key_names_the_key_and_suggests_close_names(tmp_path, c3d):
    with pytest.raises(KeyError, match=r"module\.conv9\.weight.*did you mean.*conv\d\w?\.weight"):
        admm.load_profile(write(tmp_path, 'prune_ratios:\n  module.conv9.weight: 0.5\n'), c3d)


@pytest.mark.parametrize('value', ['1.0', '-0.2', '1.5', '"half"', 'true'])
def test_ratio_outside_zero_one_is_refused(tmp_path, c3d, value):
    with pytest.raises(ValueError, match=r"conv2\.weight.*\[0, 1\)"):
        admm.load_profile(write(tmp_path, f'prune_ratios:\n  conv2.weight: {value}\n'), c3d)


def test_missing_prune_ratios_section(tmp_path, c3d):
    with pytest.raises(ValueError, match='no `prune_ratios` section'):
        admm.load_profile(write(tmp_path, 'ratios:\n  conv2.weight: 0.5\n'), c3d)


@pytest.mark.parametrize('text', ['- conv2.weight\n- 0.5\n', 'just a string\n', ''])
def test_yaml_that_is_not_a_mapping(tmp_path, c3d, text):
    with pytest.raises(ValueError, match='expected a mapping'):
        admm.load_profile(write(tmp_path, text), c3d)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, c3d):
    text = 'prune_ratios:\n  conv2.weight: 0.5\n  conv3a.weight: 0.3\n  module.conv2.weight: 0.7\n  conv2.weight: 0.7\n'
    with pytest.raises(ValueError, match=r'`conv2.weight` is given twice \(lines 2 and 5\)'):
        admm.load_profile(write(tmp_path, text), c3d)


def test_a_second_prune_ratios_section_is_refused(tmp_path, c3d):
    text = 'prune_ratios:\n  conv2.weight: 0.5\nprune_ratios:\n  conv3a.weight: 0.3\n'
    with pytest.raises(ValueError, match=r'`prune_ratios` is given twice \(lines 1 and 3\)'):
        admm.load_profile(write(tmp_path, text), c3d)


def test_bias_cannot_be_pruned(tmp_path, c3d):
    with pytest.raises(ValueError, match='conv2.bias'):
        admm.load_profile(write(tmp_path, 'prune_ratios:\n  conv2.bias: 0.5\n'), c3d)


def test_python_tags_are_not_executed(tmp_path, c3d):
    with pytest.raises(ValueError, match='not valid YAML'):
        admm.load_profile(write(tmp_path, 'prune_ratios: !!python/object/apply:os.system ["echo hi"]\n'), c3d)


def test_unknown_profile_name_lists_the_shipped_ones(c3d):
    with pytest.raises(FileNotFoundError, match=r"c3d_3\.75x.*did you mean.*c3d_3\.57x"):
        admm.load_profile('c3d_3.75x', c3d)


def arch_of(profile_name):
    for arch in ('r2+1d-pretrained', 'r2+1d', 's3d', 'c3d'):
        if profile_name.startswith(arch + '_'):
            return arch
    raise AssertionError(f"profile {profile_name} does not start with an architecture name")


# The original's profiles: the ratios the RT3D authors' group published under these names
# (docs/profiles.md, "The original's"), written out here key by key; every layer not listed stays dense.
R21D_LAYER1 = ['module.layer1.0.conv1.0.0.weight', 'module.layer1.0.conv1.0.3.weight',
               'module.layer1.0.conv2.0.0.weight', 'module.layer1.0.conv2.0.3.weight',
               'module.layer1.1.conv1.0.0.weight', 'module.layer1.1.conv1.0.3.weight',
               'module.layer1.1.conv2.0.0.weight', 'module.layer1.1.conv2.0.3.weight']
R21D_LAYER2 = ['module.layer2.0.conv1.0.0.weight', 'module.layer2.0.conv1.0.3.weight',
               'module.layer2.0.conv2.0.0.weight', 'module.layer2.0.conv2.0.3.weight',
               'module.layer2.1.conv1.0.0.weight', 'module.layer2.1.conv1.0.3.weight',
               'module.layer2.1.conv2.0.0.weight', 'module.layer2.1.conv2.0.3.weight']   # not downsample.0
ORIGINAL = {
    'c3d_2.53x_v2': {'module.conv2.weight': 0.85, 'module.conv3a.weight': 0.8, 'module.conv3b.weight': 0.85},
    'c3d_3.57x': {'module.conv2.weight': 0.85, 'module.conv3a.weight': 0.8, 'module.conv3b.weight': 0.85,
                  'module.conv4b.weight': 0.8},
    'r2+1d-pretrained_2.56x': {**dict.fromkeys(R21D_LAYER1, 0.8), **dict.fromkeys(R21D_LAYER2, 0.7)},
    'r2+1d-pretrained_3.20x': {**dict.fromkeys(R21D_LAYER1, 0.9), **dict.fromkeys(R21D_LAYER2, 0.8)},
    's3d_2.09x': {
        'module.conv1.conv.weight': 0.2,
        'module.conv3.conv.weight': 0.8, 'module.conv3.conv_t.weight': 0.8,
        'module.inception3a.branch2.1.conv.weight': 0.5, 'module.inception3a.branch2.1.conv_t.weight': 0.5,
        'module.inception3b.branch2.1.conv.weight': 0.7, 'module.inception3b.branch2.1.conv_t.weight': 0.7,
        'module.inception4c.branch2.1.conv.weight': 0.5, 'module.inception4c.branch2.1.conv_t.weight': 0.5,
        'module.inception4d.branch2.1.conv.weight': 0.5, 'module.inception4d.branch2.1.conv_t.weight': 0.5,
        'module.inception4e.branch2.1.conv.weight': 0.7, 'module.inception4e.branch2.1.conv_t.weight': 0.7,
    },
}
# What our counter measures for them (blk-kgs 8x4, 16 frames at 112, S3D at 224), as docs/profiles.md
# states it (to 3 decimals; S3D's to 2). s3d_2.09x is the one name that does not hold: it measures
# 1.78x and keeps the original's name.
ORIGINAL_MEASURED = {'c3d_2.53x_v2': 2.529, 'c3d_3.57x': 3.568, 'r2+1d-pretrained_2.56x': 2.568,
                     'r2+1d-pretrained_3.20x': 3.224, 's3d_2.09x': 1.78}
KNOWN_EXCEPTIONS = {'s3d_2.09x'}


def test_every_architecture_has_profiles():
    assert {arch_of(p) for p in PROFILES} >= {'c3d', 'r2+1d', 'r2+1d-pretrained', 's3d'}
    for name in ORIGINAL:
        assert name in PROFILES and f'{name}_all-convs' in PROFILES


@pytest.mark.parametrize('name', sorted(ORIGINAL))
def test_the_originals_profiles_hold_exactly_the_originals_ratios(name):
    with open(os.path.join(admm.PROFILE_DIR, f'{name}.yaml')) as f:
        text = yaml.safe_load(f)
    assert text == {'prune_ratios': ORIGINAL[name]}
    model = build_model(arch_of(name), 101, pretrained=False)
    assert admm.load_profile(name, model) == {k.removeprefix('module.'): r for k, r in ORIGINAL[name].items()}


@pytest.mark.parametrize('name', sorted(ORIGINAL))
def test_our_all_convs_profile_prunes_every_conv_but_the_first(name):
    model = build_model(arch_of(name), 101, pretrained=False)
    convs = [n for n, p in model.named_parameters() if p.dim() >= 3]
    ratios = admm.load_profile(f'{name}_all-convs', model)
    assert set(ratios) == set(convs[1:]) and all(r > 0 for r in ratios.values())


def measured_reduction(name):
    arch = arch_of(name)
    torch.manual_seed(0)
    model = build_model(arch, 101, pretrained=False)
    ratios = admm.load_profile(name, model)
    crop = 224 if arch == 's3d' else 112
    return profile_flops.profile(model, 16, crop, ratios)['flops_reduction']


@pytest.mark.parametrize('name', PROFILES)
def test_profile_name_states_the_measured_flops_reduction(name):
    stated = float(re.search(r'_(\d+\.\d+)x', name).group(1))
    measured = measured_reduction(name)
    if name in KNOWN_EXCEPTIONS:
        # The original's name, kept although our counter disagrees: it must disagree as stated.
        assert measured != pytest.approx(stated, rel=0.02), f"{name} now holds: drop it from the exceptions"
    else:
        assert measured == pytest.approx(stated, rel=0.02), f"{name}: measured {measured:.3f}x"
    if name in ORIGINAL_MEASURED:
        assert measured == pytest.approx(ORIGINAL_MEASURED[name], abs=0.005), f"{name}: measured {measured:.3f}x"


def test_the_known_exception_is_one_of_the_originals_and_said_so_in_its_file():
    assert KNOWN_EXCEPTIONS <= set(ORIGINAL)
    for name in KNOWN_EXCEPTIONS:
        header = open(os.path.join(admm.PROFILE_DIR, f'{name}.yaml')).read().split('prune_ratios:')[0]
        assert f'measures {ORIGINAL_MEASURED[name]:.2f}x' in header
