"""The original's command lines, defaults and schedules (docs/original.md), rule by rule."""
import json
import math
import os
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import admm
from options import get_parser, parse_args
from training import engine, optim

# The original README's two commands, and the option lists of its recipe scripts (C3D, R(2+1)D,
# S3D; ADMM then masked retraining), as users paste them.
ORIGINAL_COMMANDS = [
    "--data_location /data/UCF101/ --admm  --epoch 50  --arch r2+1d  --config-file  r2+1d-pretrained_3.20x",
    "--data_location /data/UCF101/  --masked-retrain  --epoch 50  --arch r2+1d  --config-file  "
    "r2+1d-pretrained_3.20x --combine-progressive  --warmup",
    "--multi-gpu --arch c3d --dataset ucf101 --sparsity-type blk-kgs --config-file c3d_2.53x_v2 "
    "--connectivity-block-size 8 4 --admm --rho 0.0001 --rho-num 4 --epoch 1 --lr 5e-4 --optmzr sgd "
    "--log-interval 50 --smooth --smooth-eps 0.1",
    "--multi-gpu --arch c3d --dataset ucf101 --sparsity-type blk-kgs --config-file c3d_2.53x_v2 "
    "--connectivity-block-size 8 4 --combine-progressive --masked-retrain --rho 0.0001 --rho-num 4 --epoch 1 "
    "--lr 5e-4 --optmzr sgd --log-interval 50 --warmup --warmup-lr 1e-5 --lr-scheduler cosine --distill "
    "--teacharch c3d --teacher-path checkpoint/ucf101_c3d_transfer_epoch-14_top1-81.571.pt",
    "--multi-gpu --arch r2+1d-pretrained --dataset ucf101 --sparsity-type blk-kgs --config-file "
    "r2+1d-pretrained_2.56x --connectivity-block-size 8 4 --admm --rho 0.0001 --rho-num 4 --epoch 50 --lr 5e-4 "
    "--optmzr sgd --log-interval 50 --smooth --smooth-eps 0.1",
    "--multi-gpu --arch r2+1d-pretrained --dataset ucf101 --sparsity-type blk-kgs --config-file "
    "r2+1d-pretrained_2.56x --connectivity-block-size 8 4 --combine-progressive --masked-retrain --rho 0.0001 "
    "--rho-num 4 --epoch 130 --lr 5e-4 --optmzr sgd --log-interval 50 --warmup --warmup-lr 1e-5 --lr-scheduler "
    "cosine --distill --teacharch r2+1d-pretrained --teacher-path "
    "checkpoint/ucf101_r2+1d-pretrained_transfer_epoch-14_top1-93.981.pt",
    "--multi-gpu --arch s3d --dataset ucf101 --sparsity-type blk-kgs --config-file s3d_2.09x "
    "--connectivity-block-size 8 4 --admm --rho 0.0001 --rho-num 1 --epoch 1 --lr 5e-4 --optmzr sgd "
    "--log-interval 50 --smooth --smooth-eps 0.1",
    "--multi-gpu --arch s3d --dataset ucf101 --sparsity-type blk-kgs --config-file s3d_2.09x "
    "--connectivity-block-size 8 4 --combine-progressive --masked-retrain --rho 0.0001 --rho-num 1 --epoch 1 "
    "--lr 5e-4 --optmzr sgd --log-interval 50 --warmup --warmup-lr 1e-5 --lr-scheduler cosine --distill "
    "--teacharch s3d --teacher-path checkpoint/ucf101-s3d-ts-max-f16-multisteps-bs32-e20_epoch-20_top1-90.573.pt",
]


@pytest.mark.parametrize('command', ORIGINAL_COMMANDS)
def test_the_originals_commands_parse(command):
    args = parse_args(shlex.split(command))
    assert args.phase in ('admm', 'masked_retrain')
    if '--smooth-eps 0.1' in command:
        assert args.smooth_eps == 0.1
    if '--epoch ' in command:
        assert args.epochs == int(command.split('--epoch ')[1].split()[0])


# The original's recipe scripts' settings (docs/original.md, "The original's recipe scripts"), written out:
# arch, profile, --rho-num, ADMM epochs, retraining epochs.
RECIPE_SCRIPTS = {
    'blk-kgs_c3d.sh': ('c3d', 'c3d_2.53x_v2', 4, 1, 1),
    'blk-kgs_r2+1d.sh': ('r2+1d-pretrained', 'r2+1d-pretrained_2.56x', 4, 50, 130),
    'blk-kgs_s3d.sh': ('s3d', 's3d_2.09x', 1, 1, 1),
}
# Each script's two command lines (ADMM, retraining) in ORIGINAL_COMMANDS.
SCRIPT_COMMANDS = {'blk-kgs_c3d.sh': ORIGINAL_COMMANDS[2:4], 'blk-kgs_r2+1d.sh': ORIGINAL_COMMANDS[4:6],
                   'blk-kgs_s3d.sh': ORIGINAL_COMMANDS[6:8]}
# Where ours differs from the original's command lines, by design: the data folder is an environment
# variable, --multi-gpu is one of the extra options, and the teacher is the baseline opt_main.py finds
# (the original's download in checkpoint/ when it is there) unless TEACHER names one.
NOT_COMPARED = {'data_location', 'multi_gpu', 'teacher_path', 'notes'}


def recorded_calls(tmp_path, script, *extra, **env):
    """The opt_main.py command lines a script runs, recorded by a stand-in for the interpreter."""
    record = tmp_path / 'calls.jsonl'
    stub = tmp_path / 'python'
    stub.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"with open({str(record)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    stub.chmod(0o755)
    environ = {k: v for k, v in os.environ.items()
               if k not in ('CONFIG', 'EPOCHS', 'ADMM_EPOCHS', 'RETRAIN_EPOCHS', 'TEACHER', 'DATA', 'DATASET')}
    out = subprocess.run(['bash', os.path.join(ROOT, 'scripts', script), *extra], capture_output=True, text=True,
                         env={**environ, 'PYTHON': str(stub), **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert all(call[0] == 'opt_main.py' for call in calls)
    return [call[1:] for call in calls]


@pytest.mark.parametrize('script', sorted(RECIPE_SCRIPTS))
def test_recipe_scripts_run_the_originals_settings(tmp_path, script):
    arch, profile, rho_num, admm_epochs, retrain_epochs = RECIPE_SCRIPTS[script]
    admm_run, retrain = calls = recorded_calls(tmp_path, script)
    assert len(calls) == 2
    for argv, phase, epochs in ((admm_run, 'admm', admm_epochs), (retrain, 'masked_retrain', retrain_epochs)):
        args = parse_args(argv)
        assert (args.phase, args.arch, args.dataset, args.config_file, args.sparsity_type) == \
            (phase, arch, 'ucf101', [profile], ['blk-kgs'])
        assert (args.connectivity_block_size, args.rho, args.rho_num, args.epochs) == ([8, 4], 1e-4, rho_num, epochs)
        assert (args.lr, args.optmzr, args.log_interval) == (5e-4, 'sgd', 50)
    # Label smoothing in the ADMM run only; the retraining run's switches.
    assert '--smooth' in admm_run and parse_args(admm_run).smooth_eps == 0.1
    assert not any(a.startswith('--smooth') for a in retrain) and parse_args(retrain).smooth_eps == 0
    args = parse_args(retrain)
    assert args.combine_progressive and args.warmup and args.distill and args.teacharch == arch
    assert (args.warmup_lr, args.lr_scheduler) == (1e-5, 'cosine')
    assert not any(a in admm_run for a in ('--combine-progressive', '--warmup', '--distill', '--lr-scheduler'))


@pytest.mark.parametrize('script', sorted(RECIPE_SCRIPTS))
def test_recipe_scripts_parse_like_the_originals_command_lines(tmp_path, script):
    for ours, original in zip(recorded_calls(tmp_path, script), SCRIPT_COMMANDS[script], strict=True):
        assert f'--sparsity-type blk-kgs --config-file {RECIPE_SCRIPTS[script][1]} ' in original
        a, b = vars(parse_args(ours)), vars(parse_args(shlex.split(original)))
        differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)} - NOT_COMPARED
        assert not differ, {k: (a.get(k), b.get(k)) for k in differ}


def test_recipe_scripts_take_the_paper_length_epochs_and_more_options(tmp_path):
    admm_run, retrain = recorded_calls(tmp_path, 'blk-kgs_c3d.sh', '--multi-gpu', '--rho-num', '2',
                                       ADMM_EPOCHS='50', RETRAIN_EPOCHS='130', CONFIG='c3d_3.57x',
                                       TEACHER='checkpoint/t.pt', DATA='/data/UCF101')
    a, r = parse_args(admm_run), parse_args(retrain)
    assert (a.epochs, r.epochs) == (50, 130)
    for args in (a, r):
        assert args.multi_gpu and args.rho_num == 2 and args.config_file == ['c3d_3.57x']
        assert args.data_location == '/data/UCF101'
    assert r.teacher_path == 'checkpoint/t.pt' and a.teacher_path is None


def test_blk_vanilla_is_ours_with_the_c3d_recipe(tmp_path):
    admm_run, retrain = recorded_calls(tmp_path, 'blk-vanilla_c3d.sh')
    a, r = parse_args(admm_run), parse_args(retrain)
    assert a.sparsity_type == r.sparsity_type == ['blk-vanilla'] and (a.epochs, r.epochs) == (50, 50)
    assert a.config_file == ['c3d_2.53x_v2'] and a.rho_num == 4 and a.smooth_eps == 0.1 and r.smooth_eps == 0


def test_every_spelling_of_the_original_is_accepted_with_its_meaning():
    args = parse_args(shlex.split(
        '--admm --smooth --smooth-eps 0.1 --mixup --alpha 0.2 -j 3 --wd 1e-3 -conn-blk 16 8 --lr-decay 30 --logger '
        '--block-size 8 --s 0.0001 --epoch 7 --multi-gpu --no-cuda --load-path x.pt --data_location d'))
    assert (args.smooth_eps, args.alpha, args.workers, args.weight_decay) == (0.1, 0.2, 3, 1e-3)
    assert args.connectivity_block_size == [16, 8] and args.epochs == 7 and args.multi_gpu and args.no_cuda
    notes = '\n'.join(args.notes)
    for unused in ('--lr-decay 30', '--block-size 8', '--s 0.0001'):
        assert f"{unused}: accepted for the original's command lines" in notes
    assert '--logger' in notes


def test_switches_without_their_values_change_nothing_and_say_so():
    args = parse_args(['--admm', '--smooth', '--mixup'])
    assert args.smooth_eps == 0 and args.alpha == 0
    assert any('--smooth without --smooth-eps' in n for n in args.notes)
    assert any('--mixup without --alpha' in n for n in args.notes)


@pytest.mark.parametrize('option, value', [
    ('seed', 2019), ('log_interval', 50), ('workers', 12), ('epochs', 100), ('arch', 'r2+1d'),
    ('lr_scheduler', 'cosine'), ('lr', 5e-4), ('momentum', 0.9), ('batch_size', 32), ('admm_epochs', 10),
    ('rho', 1e-4), ('rho_num', 4), ('optmzr', 'sgd'), ('sparsity_type', ['blk-kgs']), ('dataset', 'ucf101'),
    ('connectivity_block_size', [8, 4]), ('warmup_lr', 1e-5), ('warmup_epochs', 5), ('alpha', 0.0),
    ('smooth_eps', 0.0), ('temperature', 3.0), ('kd_coefficient', 0.5), ('lr_decay', 30), ('s', 1e-4),
    ('block_size', 8), ('accum_steps', 1)])
def test_defaults_are_the_originals(option, value):
    assert getattr(parse_args(['--admm']), option) == value


def test_weight_decay_is_5e_4_with_sgd_and_adam_never_takes_any():
    # The original: SGD(..., weight_decay=args.weight_decay) and Adam(params, lr) without it.
    assert parse_args(['--admm']).weight_decay == 5e-4
    assert parse_args(['--admm', '--wd', '1e-4']).weight_decay == 1e-4
    assert parse_args(['--admm', '--optmzr', 'adam']).weight_decay == 0
    args = parse_args(['--admm', '--optmzr', 'adam', '--wd', '1e-4'])
    assert args.weight_decay == 0
    assert any('ignored with --optmzr adam' in n for n in args.notes)


def test_no_tricks_leaves_distillation_on_as_the_original_does():
    args = parse_args(['--masked-retrain', '--no-tricks', '--distill', '--warmup', '--smooth-eps', '0.1',
                       '--alpha', '0.2', '--lr-scheduler', 'cosine'])
    assert args.distill
    assert (args.warmup, args.smooth_eps, args.alpha, args.lr_scheduler) == (False, 0.0, 0.0, 'default')


def test_the_originals_smoke_recipe_with_warmup_longer_than_the_run_is_accepted_with_a_warning():
    args = parse_args(['--masked-retrain', '--epoch', '1', '--warmup'])
    assert any(n.startswith('warning: --warmup-epochs 5 is not shorter than --epochs 1') for n in args.notes)


# ----------------------------------------------------------------------------- learning rates

def lr_per_batch(scheduler_of, epochs, steps=3, lr=1.0):
    """The learning rate every batch runs at, stepping as the training loop does: the scheduler
    moves on before each batch's forward pass (`Updater.begin`), the optimiser after its backward."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    updater = engine.Updater(opt, scheduler_of(opt, steps))
    rates = []
    for _ in range(epochs * steps):
        updater.begin()
        rates.append(opt.param_groups[0]['lr'])
        updater.step()
    return rates


def per_epoch(rates, steps=3):
    """Every batch of an epoch runs at one rate under the epoch rules: that rate, per epoch."""
    epochs = [rates[i:i + steps] for i in range(0, len(rates), steps)]
    assert all(e == [e[0]] * steps for e in epochs), epochs
    return [e[0] for e in epochs]


@pytest.mark.parametrize('admm_epochs, expected', [
    # lr = --lr if (e - 1) % A == 0 else --lr * 0.5 ** (((e - 1) % A) // (A / 3)), A / 3 a float division
    (10, [1, 1, 1, 1, .5, .5, .5, .25, .25, .25, 1, 1]),
    (4, [1, 1, .5, .25, 1]),
    (3, [1, .5, .25, 1]),
    (2, [1, .5, 1]),
    (1, [1, 1, 1]),
    (6, [1, 1, .5, .5, .25, .25, 1]),
])
def test_admm_learning_rate_is_the_originals_formula(admm_epochs, expected):
    rates = lr_per_batch(lambda opt, steps: optim.epoch_scheduler(
        opt, lambda e: optim.admm_lr_factor(e, admm_epochs), steps), len(expected))
    assert per_epoch(rates) == pytest.approx(expected)


def test_rew_learning_rate_follows_the_follow_up():
    # At the first batch of every epoch e > 1: x1.6 if e - 1 is a milestone, else x0.98.
    milestones = {2, 3}
    expected = [1.0, 0.98, 0.98 * 1.6, 0.98 * 1.6 * 1.6, 0.98 * 1.6 * 1.6 * 0.98]
    rates = lr_per_batch(lambda opt, steps: optim.epoch_scheduler(
        opt, lambda e: optim.rew_lr_factor(e, milestones), steps), 5)
    assert per_epoch(rates) == pytest.approx(expected)


def originals_rate(kind, batch, lr, epochs, steps, warmup_epochs=0, warmup_lr=None):
    """The original's retraining rate at `batch` (0-based), written out: its scheduler steps before
    every batch, so batch b runs after s = b + 1 steps. GradualWarmupScheduler(multiplier = lr /
    warmup_lr, total_iter = W * N) gives warmup_lr * ((multiplier - 1) * s / (W * N) + 1) while
    s <= W * N; after it the main scheduler, built for T_max = E * N / milestones [45, 90, 120] * N /
    step_size int(0.2 * E) * N, has taken k = s - W * N - 1 steps (k = s without a warmup)."""
    s, warm = batch + 1, warmup_epochs * steps
    if warm and s <= warm:
        return warmup_lr * ((lr / warmup_lr - 1) * s / warm + 1)
    k = s - warm - 1 if warm else s
    if kind == 'cosine':
        return 4e-8 + (lr - 4e-8) * (1 + math.cos(math.pi * k / (epochs * steps))) / 2
    if kind == 'multistep':
        return lr * 0.5 ** sum(k >= m * steps for m in (45, 90, 120))
    return lr * 0.5 ** (k // (max(1, int(0.2 * epochs)) * steps))


@pytest.mark.parametrize('kind', ['cosine', 'multistep', 'default'])
@pytest.mark.parametrize('epochs, steps, warmup_epochs', [(10, 3, 0), (10, 3, 2), (130, 1, 0), (130, 2, 5)])
def test_retraining_rates_are_the_originals_batch_by_batch(kind, epochs, steps, warmup_epochs):
    lr, warmup_lr = 5e-4, 1e-5
    rates = lr_per_batch(lambda opt, n: optim.make_scheduler(opt, kind, lr, epochs, n, warmup_epochs,
                                                             warmup_lr if warmup_epochs else None),
                         epochs, steps, lr)
    expected = [originals_rate(kind, b, lr, epochs, steps, warmup_epochs, warmup_lr) for b in range(epochs * steps)]
    assert rates == pytest.approx(expected, rel=1e-9, abs=0)


def test_multistep_after_a_warmup_halves_45_epochs_after_it():
    # W = 5: the first halving at the first batch of epoch 51 (the original's), not of epoch 46.
    steps = 3
    rates = lr_per_batch(lambda opt, n: optim.make_scheduler(opt, 'multistep', 1.0, 130, n, 5, 0.01), 130, steps)
    first = {e: rates[(e - 1) * steps] for e in (50, 51, 96, 126)}       # the first batch of epoch e
    assert first == pytest.approx({50: 1.0, 51: 0.5, 96: 0.25, 126: 0.125})
    assert rates[50 * steps - 1] == 1.0                                   # the last batch of epoch 50


def test_cosine_without_warmup_reaches_4e_8_at_the_last_batch_and_after_a_warmup_does_not():
    plain = lr_per_batch(lambda opt, n: optim.make_scheduler(opt, 'cosine', 5e-4, 3, n), 3, 4, 5e-4)
    assert plain[-1] == pytest.approx(4e-8)
    warm = lr_per_batch(lambda opt, n: optim.make_scheduler(opt, 'cosine', 5e-4, 10, n, 5, 1e-5), 10, 4, 5e-4)
    assert warm[-1] == pytest.approx(4e-8 + (5e-4 - 4e-8) * (1 + math.cos(math.pi * (10 * 4 - 20 - 1) / 40)) / 2)
    assert warm[-1] > 1e-4


def test_warmup_longer_than_the_run_ramps_without_finishing():
    steps, warmup_epochs, lr, warmup_lr = 4, 5, 5e-4, 1e-5
    seen = lr_per_batch(lambda opt, n: optim.make_scheduler(opt, 'cosine', lr, 1, n, warmup_epochs, warmup_lr),
                        1, steps, lr)
    ramp = [warmup_lr + (lr - warmup_lr) * s / (warmup_epochs * steps) for s in range(1, steps + 1)]
    assert seen == pytest.approx(ramp)


# ----------------------------------------------------------------------------- gradient accumulation

class Batches(list):
    """A list of (clips, labels) batches that a training loop iterates like a DataLoader."""


def accumulate_vs_one_batch(accum, groups, sizes, masks=False, penalty=False):
    """Weights after training on `sizes`-long batches with --accum-steps, and after one optimiser
    step per group on the concatenated batch (what accumulation must equal)."""
    torch.manual_seed(0)
    data = [(torch.randn(n, 6), torch.randint(0, 3, (n,))) for n in sizes]
    results = []
    for mode in ('accumulated', 'concatenated'):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
        with torch.no_grad():
            model[0].weight[:, :2] = 0                              # a pruned block, kept at zero by masks
        keep = admm.Masks(model) if masks else None
        reg = None
        if penalty:
            reg = admm.ADMM(model, {'0.weight': 0.5}, rho=0.1, sparsity_type='irregular')
            reg.start()
        if mode == 'accumulated':
            loader, recipe_accum = Batches(data), accum
        else:
            cut = [0]
            for g in groups:
                cut.append(cut[-1] + g)
            loader = Batches([(torch.cat([c for c, _ in data[a:b]]), torch.cat([y for _, y in data[a:b]]))
                              for a, b in zip(cut, cut[1:])])
            recipe_accum = 1
        recipe = engine.Recipe(epochs=1, optimizer='sgd', lr=0.1, momentum=0.9, weight_decay=1e-3,
                                 accum_steps=recipe_accum, log_interval=100)
        opt = optim.make_optimizer(model.parameters(), 'sgd', 0.1, 0.9, 1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        engine.train_one_epoch(model, loader, engine.Updater(opt, sched), torch.nn.CrossEntropyLoss(),
                               torch.device('cpu'), 1, recipe, regulariser=reg, masks=keep)
        results.append(([p.detach().clone() for p in model.parameters()], sched.last_epoch))
    return results


@pytest.mark.parametrize('masks, penalty', [(False, False), (True, False), (True, True)])
def test_accumulating_four_batches_is_one_step_on_their_union(masks, penalty):
    (acc, acc_steps), (one, one_steps) = accumulate_vs_one_batch(4, [4, 4], [3] * 8, masks, penalty)
    assert acc_steps == one_steps == 2                 # the scheduler steps with the optimiser
    for a, b in zip(acc, one):
        assert torch.allclose(a, b, atol=1e-6)
    if masks:
        assert not acc[0][:, :2].any()


def test_the_epochs_last_short_group_steps_too():
    # 6 batches, 4 per step: a step after batch 4 and one after batch 6 (a group of 2).
    (acc, acc_steps), (one, one_steps) = accumulate_vs_one_batch(4, [4, 2], [3] * 6)
    assert acc_steps == one_steps == 2
    for a, b in zip(acc, one):
        assert torch.allclose(a, b, atol=1e-6)


def test_steps_per_epoch_count_the_short_group():
    assert [optim.steps_per_epoch(b, 4) for b in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]
    assert math.ceil(10 / 1) == optim.steps_per_epoch(10, 1)


def test_help_documents_every_original_option():
    text = get_parser().format_help()
    for option in ('--logger', '--log-interval', '--seed', '--workers', '--multi-gpu', '--no-cuda', '--load-path',
                   '--arch', '--batch-size', '--epochs', '--admm-epochs', '--optmzr', '--lr', '--momentum',
                   '--weight-decay', '--sparsity-type', '--config-file', '--admm', '--masked-retrain',
                   '--combine-progressive', '--rho', '--rho-num', '--data_location', '--lr-scheduler', '--warmup',
                   '--warmup-lr', '--warmup-epochs', '--mixup', '--alpha', '--smooth', '--smooth-eps', '--no-tricks',
                   '--dataset', '--resume', '--connectivity-block-size', '--distill', '--teacharch',
                   '--teacher-path', '--temperature', '--kd-coefficient', '--accum-steps'):
        assert option in text, option
