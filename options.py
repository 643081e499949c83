"""Every option of `opt_main.py`, grouped by topic.

Every spelling of the original's `options.py` is accepted with its meaning and default
(docs/original.md); the README's "Differences from the original" lists the few
defaults that differ and why. Values are checked here, so a bad one stops the run before it
touches a file.
"""
import argparse
import os

import admm
from models import ARCHITECTURES, ARCHS, DEFAULT_GEOMETRY

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ('baseline', 'admm', 'rew', 'masked_retrain', 'evaluate', 'export')
# Accepted so the original's command lines run; the original parsed them and never used them.
UNUSED_BY_THE_ORIGINAL = {'lr_decay': 30, 's': 0.0001, 'block_size': 8}


def _number(kind, low, low_ok=True, high=None, high_ok=False):
    """An argparse type: a `kind` in the given range, with a message naming the range."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value < low or (value == low and not low_ok) or \
                (high is not None and (value > high or (value == high and not high_ok))):
            bounds = f"{'>=' if low_ok else '>'} {low}" + \
                (f" and {'<=' if high_ok else '<'} {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__     # argparse names the type in its messages
    return parse


positive_int = _number(int, 1)
count = _number(int, 0)
positive = _number(float, 0, low_ok=False)
non_negative = _number(float, 0)
fraction = _number(float, 0, high=1)           # [0, 1)


def get_parser():
    p = argparse.ArgumentParser(
        description='RT3D: ADMM structured pruning of 3D CNNs for video action recognition.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group('Phase (choose one)')
    g.add_argument('--baseline', action='store_true', help='train the dense model that pruning starts from')
    g.add_argument('--admm', action='store_true', help='ADMM pruning training')
    g.add_argument('--rew', action='store_true',
                   help="reweighted group regularisation (the follow-up's algorithm), an alternative to --admm")
    g.add_argument('--masked-retrain', action='store_true', help='hard prune, then retrain with the masks fixed')
    g.add_argument('--evaluate', action='store_true',
                   help='top-1/top-5, sparsity and FLOPs of a checkpoint (--load-path) on the validation set')
    g.add_argument('--export', metavar='PATH_IN', help='write checkpoint PATH_IN in compact form to --export-out')
    g.add_argument('--export-out', metavar='PATH_OUT', help='compact file to write (default: PATH_IN with .compact.pt)')
    g.add_argument('--onnx', action='store_true', help='with --export: also write PATH_OUT with .onnx, for deployment')
    g.add_argument('--force', action='store_true', help='with --export: replace an existing PATH_OUT')
    g.add_argument('--sparse-exec', action='store_true',
                   help='with --evaluate: run the pruned model in its faster form (slim for filter, KGS execution '
                        'for the block types, each layer where measured faster) and report the speedup; with '
                        '--export: also write PATH_OUT with .fast.pt (models.slim.load_model reads it)')

    g = p.add_argument_group('Model and data')
    g.add_argument('--arch', default='r2+1d', choices=ARCHS, help='network')
    g.add_argument('--dataset', default='ucf101',
                   help="ucf101, hmdb51, kinetics (';' lists, the first 64 frames, 400 classes), or the name of a "
                        "`{name}_frame` folder; a name containing `mini` reads mini_train.* / mini_val.*")
    g.add_argument('--data_location', '--data-location', default=os.path.join(HERE, 'dataset'),
                   help='folder holding {dataset}_frame/ with train.lmdb, val.lmdb (or frame folders), '
                        'train.txt, val.txt')
    g.add_argument('--num-classes', type=_number(int, 2),
                   help='default: 101 for ucf101, 51 for hmdb51, 400 for kinetics, else from the lists')
    g.add_argument('--num-frames', type=positive_int, default=16, help='frames per clip')
    g.add_argument('--crop-size', type=positive_int, help='clip height and width (default: 112, S3D 224)')
    g.add_argument('--scale-size', type=positive_int, nargs='+', metavar='N',
                   help='short side before cropping: validation scales to the first value, training to a '
                        'random one in [first, second] (default: 128, S3D 256 320)')
    g.add_argument('--temporal-jitter', action='store_true',
                   help='training clips take a random frame in each segment instead of its centre')
    g.add_argument('-j', '--workers', type=count, default=12,
                   help='data loading processes per GPU / process (at most the CPU cores available to it)')
    g.add_argument('--batch-size', type=positive_int, default=32, help='clips per batch (per process under torchrun)')
    g.add_argument('--test-batch-size', type=positive_int, help='validation batch size (default: --batch-size)')

    g = p.add_argument_group('Pruning')
    g.add_argument('--config-file', nargs='+',
                   help='profile name (profiles/NAME.yaml) or path to a YAML profile; several for several '
                        'sparsity types (default: c3d_2.53x_v2, r2+1d-pretrained_2.56x or s3d_2.09x)')
    g.add_argument('--sparsity-type', nargs='+', default=['blk-kgs'], choices=admm.SPARSITY_TYPES,
                   help='how weights are grouped for pruning')
    g.add_argument('--connectivity-block-size', '-conn-blk', type=positive_int, nargs=2, default=[8, 4],
                   metavar=('gM', 'gN'), help='block of gM filters by gN input channels')
    g.add_argument('--combine-progressive', action='store_true',
                   help='keep weights that are already zero (an earlier pruning) at zero')
    g.add_argument('--rho', type=positive, default=0.0001, help='ADMM penalty of the first stage')
    g.add_argument('--rho-num', type=positive_int, default=4, help='ADMM stages; stage i uses rho * 10**i')
    g.add_argument('--admm-epochs', type=positive_int, default=10, help='epochs between Z/U updates')
    g.add_argument('--admm-penalty', default='seed', choices=['seed', 'textbook'],
                   help="seed: 0.5*rho*||W+U||^2 where Z is 0 (the original); textbook: 0.5*rho*||W-Z+U||^2")
    g.add_argument('--penalty', type=non_negative, default=1e-6,
                   help='--rew: weight of the reweighted group penalty (divided by the number of profiles)')
    g.add_argument('--rew-milestones', type=positive_int, nargs='+', default=[10, 20, 30, 40, 50, 75, 100, 125],
                   help='--rew: alpha is recomputed at the first batch of the epoch after each milestone')
    g.add_argument('--rew-eps', type=positive, default=1e-6, help='--rew: alpha = 1 / (||w_g||^2 + eps)')
    g.add_argument('--rew-lr', default='follow-up', choices=['follow-up', 'scheduler'],
                   help="--rew learning rate: the follow-up's (each epoch x0.98, x1.6 after a milestone) or "
                        "--lr-scheduler with --warmup as in retraining")
    g.add_argument('--retrain-from', choices=['auto', 'admm', 'rew'], default='auto',
                   help='--masked-retrain without --load-path: the last ADMM stage or the --rew model '
                        '(auto: whichever was written last)')
    g.add_argument('--block-size', type=int, help=argparse.SUPPRESS)     # the original's, unused
    g.add_argument('--s', type=float, help=argparse.SUPPRESS)            # the original's, unused

    g = p.add_argument_group('Optimisation')
    g.add_argument('--epochs', type=positive_int, default=100, help='epochs (per ADMM stage); --epoch also works')
    g.add_argument('--optmzr', default='sgd', choices=['sgd', 'adam'], help='optimiser')
    g.add_argument('--lr', type=positive, default=5e-4, help='learning rate')
    g.add_argument('--lr-decay', type=int, help=argparse.SUPPRESS)       # the original's, unused
    g.add_argument('--momentum', type=fraction, default=0.9, help='SGD momentum (the original fixed it at 0.9)')
    g.add_argument('--weight-decay', '--wd', type=non_negative,
                   help="SGD's weight decay (default 5e-4; Adam takes none, as in the original)")
    g.add_argument('--lr-scheduler', default='cosine', choices=['default', 'multistep', 'cosine'],
                   help='retraining / baseline, stepped per batch: default halves every int(0.2 * epochs) '
                        'epochs; multistep halves at 45, 90, 120; cosine anneals to 4e-8')
    g.add_argument('--warmup', action='store_true', help='ramp the learning rate up first')
    g.add_argument('--warmup-lr', type=positive, default=1e-5, help='learning rate the warmup starts from')
    g.add_argument('--warmup-epochs', type=positive_int, default=5, help='length of the warmup')
    g.add_argument('--accum-steps', type=positive_int, default=1,
                   help='accumulate gradients over N batches (one step per N batches and at the end of an '
                        'epoch): 1 is the original RT3D, 4 the follow-up')
    g.add_argument('--amp', action='store_true',
                   help='mixed precision: bf16 autocast where the device has it natively (CUDA with bf16, a CPU with '
                        'AVX-512 BF16 / AMX), fp16 with a gradient scaler on other GPUs, float32 on other CPUs')
    g.add_argument('--amp-dtype', choices=['bf16', 'fp16'],
                   help='with --amp: force this precision (bf16 on a CPU without it natively is emulated: many '
                        'times slower than float32)')
    g.add_argument('--channels-last', default='auto', choices=['auto', 'on', 'off'],
                   help='channels_last_3d memory format (auto: on for CUDA with --amp, where it measured faster)')

    g = p.add_argument_group('Training tricks')
    g.add_argument('--smooth', action='store_true',
                   help="the original's switch; smoothing is on exactly when --smooth-eps > 0")
    g.add_argument('--smooth-eps', type=fraction, default=0.0, help='label smoothing (0: off)')
    g.add_argument('--mixup', action='store_true', help="the original's switch; mixup is on exactly when --alpha > 0")
    g.add_argument('--alpha', type=non_negative, default=0.0, help='mixup Beta(alpha, alpha) (0: off)')
    g.add_argument('--no-tricks', action='store_true',
                   help='no smoothing, mixup or warmup; the default scheduler (distillation stays, as in the original)')
    g.add_argument('--distill', action='store_true', help='distil from the dense baseline (off in the last 5 epochs)')
    g.add_argument('--teacharch', choices=ARCHS, help='teacher architecture (default: --arch)')
    g.add_argument('--teacher-path', help='teacher checkpoint (default: the baseline)')
    g.add_argument('--teacher-mode', default='eval', choices=['eval', 'train'],
                   help="eval: the teacher's dropout is off and its BatchNorm uses running statistics; train: as "
                        "the original left it (dropout on, batch statistics)")
    g.add_argument('--temperature', type=positive, default=3.0, help='distillation temperature')
    g.add_argument('--kd-coefficient', type=_number(float, 0, high=1, high_ok=True), default=0.5,
                   help='weight of the distillation loss')

    g = p.add_argument_group('Checkpoints, runs and logs')
    g.add_argument('--load-path', help='model to start from (default: the baseline, or the last ADMM stage)')
    g.add_argument('--ckpt-root', default='checkpoint', help='baselines and run directories')
    g.add_argument('--resume', action='store_true', help='continue the interrupted run from its last epoch')
    g.add_argument('--seed', type=int, default=2019, help='random seed')
    g.add_argument('--log-interval', type=positive_int, default=50, help='batches between log lines')
    g.add_argument('--logger', action='store_true',
                   help="the original's switch; the run's log file is always written")
    g.add_argument('--tensorboard', action='store_true',
                   help='also write a TensorBoard log to the run directory (needs the tensorboard package)')
    g.add_argument('--no-cuda', action='store_true', help='train on the CPU even if CUDA is there')
    g.add_argument('--multi-gpu', action='store_true',
                   help='without torchrun: DataParallel over all visible GPUs. Prefer '
                        '`torchrun --nproc_per_node=N opt_main.py ...` (DistributedDataParallel)')
    g.add_argument('--max-batches', type=positive_int, help=argparse.SUPPRESS)   # tests: cut every epoch short
    return p


def parse_args(argv=None):
    """Parse and check the command line; `args.notes` lists what the log should say about it."""
    parser = get_parser()
    args = parser.parse_args(argv)
    phases = [f for f in PHASES if getattr(args, f)]
    if len(phases) > 1:
        parser.error(' and '.join('--' + f.replace('_', '-') for f in phases) + ' cannot be combined: '
                     'run one phase at a time (--admm first, then --masked-retrain)')
    if not phases:
        parser.error('choose a phase: --baseline, --admm, --rew, --masked-retrain, --evaluate or --export')
    if (args.onnx or args.export_out or args.force) and not args.export:
        flag = '--onnx' if args.onnx else '--export-out' if args.export_out else '--force'
        parser.error(f'{flag} goes with --export PATH_IN')
    if args.sparse_exec and not (args.evaluate or args.export):
        parser.error('--sparse-exec goes with --evaluate or --export PATH_IN')
    if args.sparse_exec and args.evaluate and (args.amp or args.multi_gpu):
        parser.error(f"--sparse-exec runs the model in float32 in one process: drop "
                     f"{'--amp' if args.amp else '--multi-gpu'}")
    if args.amp_dtype and not args.amp:
        parser.error('--amp-dtype goes with --amp')
    args.phase = phases[0]
    if not args.config_file:
        # The original's default `--config-file c3d` names no file; each architecture gets its profile.
        args.config_file = [ARCHITECTURES[args.arch].default_profile]
    if len(args.config_file) != len(args.sparsity_type):
        if len(args.sparsity_type) == 1:
            args.sparsity_type = args.sparsity_type * len(args.config_file)
        else:
            parser.error(f'--sparsity-type gives {len(args.sparsity_type)} types but --config-file '
                         f'{len(args.config_file)} profiles: give one type per profile')
    if args.scale_size and len(args.scale_size) > 2:
        parser.error('--scale-size takes one or two values')
    crop = args.crop_size or DEFAULT_GEOMETRY[args.arch]['crop_size']
    scale = args.scale_size or DEFAULT_GEOMETRY[args.arch]['scale_range']
    if min(scale) < crop:
        parser.error(f'--scale-size {" ".join(map(str, scale))} is smaller than the crop ({crop}): the short side '
                     f'must be at least --crop-size')

    args.notes = []
    if args.optmzr == 'adam':
        if args.weight_decay is not None:
            args.notes.append(f"--weight-decay {args.weight_decay:g}: ignored with --optmzr adam (the original's Adam "
                              f"takes no weight decay)")
        args.weight_decay = 0.0
    elif args.weight_decay is None:
        args.weight_decay = 5e-4
    if args.no_tricks:     # the original's --no-tricks leaves distillation as it is
        args.smooth_eps, args.alpha, args.warmup = 0.0, 0.0, False
        args.lr_scheduler = 'default'
    for name, default in UNUSED_BY_THE_ORIGINAL.items():
        if getattr(args, name) is not None:
            args.notes.append(f"--{name.replace('_', '-')} {getattr(args, name)}: accepted for the original's "
                              f"command lines; the original parsed it and never used it")
        else:
            setattr(args, name, default)
    if args.smooth and not args.smooth_eps:
        args.notes.append('--smooth without --smooth-eps: no label smoothing (as in the original, --smooth-eps '
                          'decides)')
    if args.mixup and not args.alpha:
        args.notes.append('--mixup without --alpha: no mixup (as in the original, --alpha decides)')
    if args.logger:
        args.notes.append('--logger: the log file is always written')
    scheduled = args.phase in ('baseline', 'masked_retrain') or (args.phase == 'rew' and args.rew_lr == 'scheduler')
    if args.warmup and args.warmup_epochs >= args.epochs and scheduled:
        reached = args.warmup_lr + (args.lr - args.warmup_lr) * (args.epochs - 1) / args.warmup_epochs
        args.notes.append(f"warning: --warmup-epochs {args.warmup_epochs} is not shorter than --epochs {args.epochs}: "
                          f"the warmup does not finish (the learning rate ramps from {args.warmup_lr:g} toward "
                          f"{args.lr:g} and starts the last epoch at {reached:.3g}), as in the original")
    return args
