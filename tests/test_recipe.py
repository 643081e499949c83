"""The original's retraining recipe beyond the learning rate: distillation, the optimiser across
ADMM stages, the last partial batch, dataset names (the learning rates are in test_original_cli.py)."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from runner import GEOMETRY, RUN, run

from models import read_checkpoint
from training.data import DataSpec, make_data
from training.engine import Teacher
from training.runtime import Env


def test_distillation_is_the_originals_soft_cross_entropy_without_t_squared():
    torch.manual_seed(0)
    teacher_model = torch.nn.Linear(6, 4)
    clips, logits, task = torch.randn(5, 6), torch.randn(5, 4), torch.tensor(1.7)
    T, c = 3.0, 0.4
    loss = Teacher(teacher_model, T, c).loss(task, logits, clips)
    with torch.no_grad():
        target = teacher_model(clips)
    # -(log_softmax(s / T) * softmax(t / T)).sum(1).mean(), mixed as (1 - c) * task + c * kd
    kd = -(F.log_softmax(logits / T, dim=1) * F.softmax(target / T, dim=1)).sum(dim=1).mean()
    assert loss.item() == pytest.approx(((1 - c) * task + c * kd).item(), rel=1e-6)


def test_the_teacher_runs_in_eval_mode_unless_asked_for_the_originals_train_mode():
    net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Dropout(0.5))
    assert not Teacher(net, 3, 0.5).model.training
    assert Teacher(net, 3, 0.5, train_mode=True).model.training


@pytest.mark.e2e
def test_multi_rho_admm_keeps_one_optimiser_for_every_stage(data, baseline, tmp_path):
    # Adam counts its steps: two stages of one batch give 2 on one optimiser (1 on a new one per stage).
    run('--admm', '--epochs', 1, '--max-batches', 1, '--rho-num', 2, '--rho', 0.01, '--optmzr', 'adam',
        '--load-path', baseline, '--data_location', data, '--ckpt-root', tmp_path, *GEOMETRY)
    _, meta = read_checkpoint(str(tmp_path / RUN / f'{RUN}_admm_last.pt'))
    steps = {float(s['step']) for s in meta['optimizer']['state'].values()}
    assert steps == {2.0} and meta['stage'] == 1


def test_the_last_partial_training_batch_is_kept(data):
    spec = DataSpec(root=os.path.join(data, 'ucf101_frame'), dataset='ucf101', num_frames=16, crop=16, scale=(18, 18),
                    temporal_jitter=False, batch_size=4, test_batch_size=4, workers=0, seed=1, num_classes=5)
    loaded = make_data(spec, Env(torch.device('cpu'), 0, 1, 1))
    clips = len(loaded.train.dataset)
    assert clips % 4 and len(loaded.train) == -(-clips // 4)              # ceil: the short last batch counts
    assert sum(len(labels) for _, labels in loaded.train) == clips


def test_a_mini_dataset_reads_the_mini_lists_and_databases(data, tmp_path):
    copy = tmp_path / 'data'
    frames = copy / 'ucf101-mini_frame'
    shutil.copytree(os.path.join(data, 'ucf101_frame'), frames)
    for split in ('train', 'val'):
        os.rename(frames / f'{split}.txt', frames / f'mini_{split}.txt')
        os.rename(frames / f'{split}.lmdb', frames / f'mini_{split}.lmdb')
    spec = DataSpec(root=str(frames), dataset='ucf101-mini', num_frames=16, crop=16, scale=(18, 18),
                    temporal_jitter=False, batch_size=4, test_batch_size=4, workers=0, seed=1, num_classes=None)
    loaded = make_data(spec, Env(torch.device('cpu'), 0, 1, 1))
    assert loaded.classes == 101                                          # UCF101's, as the original
    assert str(loaded.val.dataset.list_file) == str(frames / 'mini_val.txt')
