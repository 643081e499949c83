"""What a run is, read off the command line once (`read_specs`): no function below `main` sees
`args`. `run_options` is the part that defines what a run computes; every checkpoint holds it and
--resume compares it."""
import dataclasses
import json
import os

from dataset import frame_root
from models import DEFAULT_GEOMETRY

from .data import DataSpec
from .engine import Recipe
from .optim import amp_dtype
from .runtime import Env


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Which phase, on what, and where its files go."""
    phase: str
    arch: str
    dataset: str
    data_location: str
    ckpt_root: str
    load_path: str | None
    resume: bool
    tensorboard: bool
    options: dict                  # every option as parsed, for the log
    notes: tuple                   # what the command line means, for the log


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """The learning rate of the baseline and retraining (and --rew with --rew-lr scheduler)."""
    kind: str                      # default, multistep, cosine
    warmup_epochs: int             # 0: no warmup
    warmup_lr: float | None


@dataclasses.dataclass(frozen=True)
class PruningSpec:
    """Profiles, sparsity types and block, and the regulariser's settings (ADMM, reweighted)."""
    config_files: tuple
    sparsity_types: tuple
    block_size: tuple              # (gM, gN)
    combine_progressive: bool
    rho: float
    rho_num: int
    admm_epochs: int
    admm_penalty: str
    penalty: float
    rew_milestones: tuple
    rew_eps: float
    rew_lr: str
    retrain_from: str

    @property
    def rhos(self) -> list:
        """The ADMM stages' rho: rho * 10**i, rounded as the stage files are named."""
        return [float(f"{self.rho * 10 ** i:.6g}") for i in range(self.rho_num)]


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    teacharch: str | None          # None: the student's architecture
    teacher_path: str | None
    temperature: float
    kd_coefficient: float
    teacher_mode: str              # eval (ours) or train (the original's)


@dataclasses.dataclass(frozen=True)
class DeploySpec:
    """--export and --evaluate's output forms."""
    export: str | None
    export_out: str | None
    onnx: bool
    force: bool
    sparse_exec: bool


@dataclasses.dataclass(frozen=True)
class Specs:
    run: RunSpec
    data: DataSpec
    recipe: Recipe
    schedule: ScheduleSpec
    pruning: PruningSpec
    distill: DistillSpec | None
    deploy: DeploySpec


def geometry(arch, crop_size=None, scale_size=None):
    """(crop, (low, high) short-side range of training; validation scales to low)."""
    g = DEFAULT_GEOMETRY[arch]
    scale = tuple(scale_size) if scale_size else g['scale_range']
    return crop_size or g['crop_size'], (scale[0], scale[-1])


def read_specs(args, env: Env) -> Specs:
    """Every spec of the run, from the parsed command line (options.parse_args)."""
    crop, scale = geometry(args.arch, args.crop_size, args.scale_size)
    data = DataSpec(root=frame_root(args.data_location, args.dataset), dataset=args.dataset,
                    num_frames=args.num_frames, crop=crop, scale=scale, temporal_jitter=args.temporal_jitter,
                    batch_size=args.batch_size, test_batch_size=args.test_batch_size or args.batch_size,
                    workers=args.workers, seed=args.seed, num_classes=args.num_classes)
    dtype = amp_dtype(args.amp, args.amp_dtype, env.device)
    notes = list(args.notes)
    if args.amp and dtype is None:
        notes.append("--amp: this CPU has no native bf16 (no AVX-512 BF16 / AMX), where bf16 autocast runs many times "
                     "slower than float32: training in float32 (--amp-dtype bf16 forces it)")
    channels_last = args.channels_last == 'on' or (args.channels_last == 'auto' and env.device.type == 'cuda'
                                                   and dtype is not None)
    recipe = Recipe(epochs=args.epochs, optimizer=args.optmzr, lr=args.lr, momentum=args.momentum,
                    weight_decay=args.weight_decay, smooth_eps=args.smooth_eps, mixup_alpha=args.alpha,
                    accum_steps=args.accum_steps, amp_dtype=dtype, channels_last=channels_last, seed=args.seed,
                    log_interval=args.log_interval, max_batches=args.max_batches, multi_gpu=args.multi_gpu)
    run = RunSpec(phase=args.phase, arch=args.arch, dataset=args.dataset, data_location=args.data_location,
                  ckpt_root=args.ckpt_root, load_path=args.load_path, resume=args.resume,
                  tensorboard=args.tensorboard,
                  options={k: v for k, v in vars(args).items() if k not in ('max_batches', 'notes')},
                  notes=tuple(notes))
    schedule = ScheduleSpec(args.lr_scheduler, args.warmup_epochs if args.warmup else 0,
                            args.warmup_lr if args.warmup else None)
    pruning = PruningSpec(config_files=tuple(args.config_file), sparsity_types=tuple(args.sparsity_type),
                          block_size=tuple(args.connectivity_block_size),
                          combine_progressive=args.combine_progressive, rho=args.rho, rho_num=args.rho_num,
                          admm_epochs=args.admm_epochs, admm_penalty=args.admm_penalty, penalty=args.penalty,
                          rew_milestones=tuple(args.rew_milestones), rew_eps=args.rew_eps, rew_lr=args.rew_lr,
                          retrain_from=args.retrain_from)
    distill = DistillSpec(args.teacharch, args.teacher_path, args.temperature, args.kd_coefficient,
                          args.teacher_mode) if args.distill else None
    deploy = DeploySpec(args.export, args.export_out, args.onnx, args.force, args.sparse_exec)
    return Specs(run, data, recipe, schedule, pruning, distill, deploy)


def run_options(specs: Specs, phase: str, classes: int, rules=(), source=None) -> dict:
    """The options that define what a run computes: saved in every checkpoint, and compared
    before --resume continues one (workers, logging, paths and precision may change)."""
    run, data, recipe, pruning, distill = specs.run, specs.data, specs.recipe, specs.pruning, specs.distill
    o = dict(phase=phase, arch=run.arch, dataset=run.dataset, num_classes=classes, num_frames=data.num_frames,
             crop_size=data.crop, scale_size=list(data.scale), temporal_jitter=data.temporal_jitter,
             batch_size=data.batch_size, processes=int(os.environ.get('WORLD_SIZE', 1)), epochs=recipe.epochs,
             optmzr=recipe.optimizer, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
             accum_steps=recipe.accum_steps, seed=recipe.seed, smooth_eps=recipe.smooth_eps, alpha=recipe.mixup_alpha,
             distill=distill is not None, max_batches=recipe.max_batches, source=source)
    if distill is not None:
        o.update(teacharch=distill.teacharch, temperature=distill.temperature, kd_coefficient=distill.kd_coefficient,
                 teacher_mode=distill.teacher_mode)
    if phase != 'admm' and (phase != 'rew' or pruning.rew_lr == 'scheduler'):
        s = specs.schedule
        o.update(lr_scheduler=s.kind, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr)
    if phase != 'baseline':
        o.update(profiles=[r for r, _ in rules], sparsity_type=[t for _, t in rules],
                 connectivity_block_size=list(pruning.block_size), combine_progressive=pruning.combine_progressive)
    if phase == 'admm':
        o.update(rho=pruning.rho, rho_num=pruning.rho_num, admm_epochs=pruning.admm_epochs,
                 admm_penalty=pruning.admm_penalty)
    if phase == 'rew':
        o.update(penalty=pruning.penalty, rew_milestones=list(pruning.rew_milestones), rew_eps=pruning.rew_eps,
                 rew_lr=pruning.rew_lr)
    return json.loads(json.dumps(o))         # plain lists, floats and strings, as a checkpoint reads back
