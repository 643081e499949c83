"""Profiles: loading, validation errors, and that every shipped profile's name is true."""
import os
import re

import pytest
import torch

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


def test_every_architecture_has_profiles():
    assert {arch_of(p) for p in PROFILES} >= {'c3d', 'r2+1d', 'r2+1d-pretrained', 's3d'}
    for name in ('c3d_2.53x_v2', 'c3d_3.57x', 'r2+1d-pretrained_2.56x', 'r2+1d-pretrained_3.20x', 's3d_2.09x'):
        assert name in PROFILES


@pytest.mark.parametrize('name', PROFILES)
def test_profile_name_states_the_measured_flops_reduction(name):
    stated = float(re.search(r'_(\d+\.\d+)x', name).group(1))
    arch = arch_of(name)
    torch.manual_seed(0)
    model = build_model(arch, 101, pretrained=False)
    ratios = admm.load_profile(name, model)
    crop = 224 if arch == 's3d' else 112
    measured = profile_flops.profile(model, 16, crop, ratios)['flops_reduction']
    assert measured == pytest.approx(stated, rel=0.02), f"{name}: measured {measured:.3f}x"
