"""Every option of `opt_main.py`, grouped by topic. Spellings and defaults follow the original."""
import argparse
import os

import admm
from models import ARCHS

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROFILE = {'c3d': 'c3d_2.53x_v2', 'r2+1d': 'r2+1d-pretrained_2.56x',
                   'r2+1d-pretrained': 'r2+1d-pretrained_2.56x', 's3d': 's3d_2.09x'}


def get_parser():
    p = argparse.ArgumentParser(
        description='RT3D: ADMM structured pruning of 3D CNNs for video action recognition.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group('Phase (choose one)')
    g.add_argument('--baseline', action='store_true', help='train the dense model that pruning starts from')
    g.add_argument('--admm', action='store_true', help='ADMM pruning training')
    g.add_argument('--rew', action='store_true',
                   help='reweighted group regularisation (the RT3D paper\'s algorithm), an alternative to --admm')
    g.add_argument('--masked-retrain', action='store_true', help='hard prune, then retrain with the masks fixed')
    g.add_argument('--evaluate', action='store_true',
                   help='top-1/top-5, sparsity and FLOPs of a checkpoint (--load-path) on the validation set')
    g.add_argument('--export', metavar='PATH_IN', help='write checkpoint PATH_IN in compact form to --export-out')
    g.add_argument('--export-out', metavar='PATH_OUT', help='compact file to write (default: PATH_IN with .compact.pt)')
    g.add_argument('--onnx', action='store_true', help='with --export: also write PATH_OUT with .onnx, for deployment')

    g = p.add_argument_group('Model and data')
    g.add_argument('--arch', default='c3d', choices=ARCHS, help='network')
    g.add_argument('--dataset', default='ucf101', help='ucf101, hmdb51, or the name of a `{name}_frame` folder')
    g.add_argument('--data_location', '--data-location', default=os.path.join(HERE, 'dataset'),
                   help='folder holding {dataset}_frame/ with train.lmdb, val.lmdb (or frame folders), '
                        'train.txt, val.txt')
    g.add_argument('--num-classes', type=int, help='default: 101 for ucf101, 51 for hmdb51, else from the lists')
    g.add_argument('--num-frames', type=int, default=16, help='frames per clip')
    g.add_argument('--crop-size', type=int, help='clip height and width (default: 112, S3D 224)')
    g.add_argument('--scale-size', type=int, nargs='+', metavar='N',
                   help='short side before cropping: validation scales to the first value, training to a '
                        'random one in [first, second] (default: 128, S3D 256 320)')
    g.add_argument('--temporal-jitter', action='store_true',
                   help='training clips take a random frame in each segment instead of its centre')
    g.add_argument('--workers', type=int, default=4, help='data loading processes per GPU / process')
    g.add_argument('--batch-size', type=int, default=32, help='clips per batch (per process under torchrun)')
    g.add_argument('--test-batch-size', type=int, help='validation batch size (default: --batch-size)')

    g = p.add_argument_group('Pruning')
    g.add_argument('--config-file', nargs='+',
                   help='profile name (profiles/NAME.yaml) or path to a YAML profile; several for several '
                        'sparsity types (default: c3d_2.53x_v2, r2+1d-pretrained_2.56x or s3d_2.09x)')
    g.add_argument('--sparsity-type', nargs='+', default=['blk-kgs'], choices=admm.SPARSITY_TYPES,
                   help='how weights are grouped for pruning')
    g.add_argument('--connectivity-block-size', type=int, nargs=2, default=[8, 4], metavar=('gM', 'gN'),
                   help='block of gM filters by gN input channels')
    g.add_argument('--combine-progressive', action='store_true',
                   help='keep weights that are already zero (an earlier pruning) at zero')
    g.add_argument('--rho', type=float, default=0.0001, help='ADMM penalty of the first stage')
    g.add_argument('--rho-num', type=int, default=4, help='ADMM stages; stage i uses rho * 10**i')
    g.add_argument('--admm-epochs', type=int, default=10, help='epochs between Z/U updates')
    g.add_argument('--penalty', type=float, default=1e-6, help='--rew: weight of the reweighted group penalty')
    g.add_argument('--rew-milestones', type=int, nargs='+', default=[10, 20, 30, 40, 50, 75, 100, 125],
                   help='--rew: epochs at which the group weights alpha are recomputed')
    g.add_argument('--rew-eps', type=float, default=1e-3, help='--rew: alpha = 1 / (||w_g||^2 + eps)')
    g.add_argument('--retrain-from', choices=['auto', 'admm', 'rew'], default='auto',
                   help='--masked-retrain without --load-path: the last ADMM stage or the --rew model '
                        '(auto: whichever was written last)')
    g.add_argument('--admm-penalty', default='seed', choices=['seed', 'textbook'],
                   help="seed: 0.5*rho*||W+U||^2 where Z is 0 (the original); textbook: 0.5*rho*||W-Z+U||^2")

    g = p.add_argument_group('Optimisation')
    g.add_argument('--epochs', type=int, default=50, help='epochs (per ADMM stage)')
    g.add_argument('--optmzr', default='sgd', choices=['sgd', 'adam'], help='optimiser')
    g.add_argument('--lr', type=float, default=5e-4, help='learning rate')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=5e-4, help='weight decay')
    g.add_argument('--lr-scheduler', default='default', choices=['default', 'multistep', 'cosine'],
                   help='retraining / baseline: default halves every 20%% of the epochs; multistep halves at '
                        '45, 90, 120; cosine anneals to ~0')
    g.add_argument('--warmup', action='store_true', help='ramp the learning rate up first')
    g.add_argument('--warmup-lr', type=float, default=1e-5, help='learning rate the warmup starts from')
    g.add_argument('--warmup-epochs', type=int, default=5, help='length of the warmup')
    g.add_argument('--amp', action='store_true', help='mixed precision (CUDA only)')

    g = p.add_argument_group('Training tricks')
    g.add_argument('--smooth-eps', type=float, default=0.0, help='label smoothing (0: off)')
    g.add_argument('--alpha', type=float, default=0.0, help='mixup Beta(alpha, alpha) (0: off)')
    g.add_argument('--no-tricks', action='store_true',
                   help='no smoothing, mixup, distillation or warmup; the default scheduler')
    g.add_argument('--distill', action='store_true', help='distil from the dense baseline (off in the last 5 epochs)')
    g.add_argument('--teacharch', help='teacher architecture (default: --arch)')
    g.add_argument('--teacher-path', help='teacher checkpoint (default: the baseline)')
    g.add_argument('--temperature', type=float, default=3.0, help='distillation temperature')
    g.add_argument('--kd-coefficient', type=float, default=0.5, help='weight of the distillation loss')

    g = p.add_argument_group('Checkpoints and runs')
    g.add_argument('--load-path', help='model to start from (default: the baseline, or the last ADMM stage)')
    g.add_argument('--ckpt-root', default='checkpoint', help='baselines and run directories')
    g.add_argument('--resume', action='store_true', help='continue the interrupted run from its last epoch')
    g.add_argument('--seed', type=int, default=1, help='random seed')
    g.add_argument('--log-interval', type=int, default=10, help='batches between log lines')
    g.add_argument('--no-cuda', action='store_true', help='train on the CPU even if CUDA is there')
    g.add_argument('--multi-gpu', action='store_true',
                   help='without torchrun: DataParallel over all visible GPUs. Prefer '
                        '`torchrun --nproc_per_node=N opt_main.py ...` (DistributedDataParallel)')
    g.add_argument('--max-batches', type=int, help=argparse.SUPPRESS)   # tests: cut every epoch short
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    phases = [f for f in ('baseline', 'admm', 'rew', 'masked_retrain', 'evaluate', 'export') if getattr(args, f)]
    if len(phases) > 1:
        parser.error(' and '.join('--' + f.replace('_', '-') for f in phases) + ' cannot be combined: '
                     'run one phase at a time (--admm first, then --masked-retrain)')
    if not phases:
        parser.error('choose a phase: --baseline, --admm, --rew, --masked-retrain, --evaluate or --export')
    if args.onnx and not args.export:
        parser.error('--onnx goes with --export PATH_IN')
    args.phase = phases[0]
    if not args.config_file:
        args.config_file = [DEFAULT_PROFILE[args.arch]]
    if len(args.config_file) != len(args.sparsity_type):
        if len(args.sparsity_type) == 1:
            args.sparsity_type = args.sparsity_type * len(args.config_file)
        else:
            parser.error(f'--sparsity-type gives {len(args.sparsity_type)} types but --config-file '
                         f'{len(args.config_file)} profiles: give one type per profile')
    if args.scale_size and len(args.scale_size) > 2:
        parser.error('--scale-size takes one or two values')
    if args.no_tricks:
        args.smooth_eps, args.alpha, args.distill, args.warmup = 0.0, 0.0, False, False
        args.lr_scheduler = 'default'
    if args.warmup and args.warmup_epochs >= args.epochs:
        parser.error(f'--warmup-epochs ({args.warmup_epochs}) must be smaller than --epochs ({args.epochs})')
    return args
