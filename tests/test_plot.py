"""profile_flops --plot: per-layer density and kept/pruned maps of kernel groups as a PNG."""
import matplotlib.image
import pytest
import torch

import admm
import profile_flops
from models import build_model

CROP = 32


def assert_png(path, min_size=(500, 800)):
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= min_size[0] and image.shape[1] >= min_size[1]
    assert image[..., :3].std() > 0.05          # not a blank page


def test_plot_of_a_profile_projected_on_random_weights(tmp_path, capsys):
    out = tmp_path / 'c3d.png'
    profile_flops.main(['--arch', 'c3d', '--crop-size', str(CROP), '--config-file', 'c3d_3.57x',
                        '--plot', str(out)])
    assert_png(out)
    assert f'wrote {out}' in capsys.readouterr().err


def test_plot_of_a_checkpoint_with_chosen_layers_and_two_profiles(tmp_path):
    torch.manual_seed(0)
    model = build_model('c3d', 101, crop_size=CROP)
    admm.hard_prune(model, [admm.load_profile('c3d_3.57x', model), admm.load_profile('c3d_2.00x_uniform', model)],
                    ['kgr', 'kgc'])
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'pruned.pt')
    out = tmp_path / 'ckpt.png'
    profile_flops.main(['--arch', 'c3d', '--crop-size', str(CROP), '--checkpoint', str(tmp_path / 'pruned.pt'),
                        '--sparsity-type', 'kgr', '--plot', str(out), '--plot-layers', 'conv2.weight', 'fc6.weight'])
    assert_png(out)


def test_unknown_plot_layer_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(SystemExit, match=r"'conv3.weight' is not a weight of c3d; did you mean .*conv3a.weight"):
        profile_flops.main(['--arch', 'c3d', '--crop-size', str(CROP), '--config-file', 'c3d_3.57x',
                            '--plot', str(tmp_path / 'x.png'), '--plot-layers', 'conv3.weight'])


def test_kgs_map_shows_the_kept_positions_of_each_block():
    w = torch.randn(16, 8, 3, 3, 3)
    out, keep = admm.project(w, 0.6, 'blk-kgs', return_keep=True)
    matrix, ylabel, xlabel, rows = profile_flops.group_map(out, 'blk-kgs')
    assert rows == 4 and 'block' in ylabel and 'kernel position' in xlabel
    assert torch.equal(matrix, keep.reshape(4, 27).float())


def test_kgr_map_shows_filters_by_channel_blocks_with_equal_counts_per_block():
    w = torch.randn(16, 8, 3, 3, 3)
    matrix, ylabel, xlabel, rows = profile_flops.group_map(admm.project(w, 0.5, 'kgr'), 'kgr')
    assert matrix.shape == (16, 2) and ylabel == 'filter' and rows == 16
    assert (matrix.view(2, 8, 2).sum(dim=1) == 4).all()
