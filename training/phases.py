"""The training phases: --baseline, --admm, --rew and --masked-retrain.

Each reads the same way: check everything it will need (data, model, profiles, checkpoints,
teacher, resume point) before it touches the disk, then lock its run directory (`begin`) and
train with `engine.fit`. Files follow the original's layout; `RunFiles` names them all.
"""
import dataclasses
import os
import shutil
from collections.abc import Callable

import numpy as np
import torch

import admm
from models import read_checkpoint

from .checkpoints import checkpoint, load_into, model_meta, new_model, read_resume
from .data import Data, make_data
from .engine import Teacher, evaluate, fit, new_optimizer, placed
from .files import RunFiles, atomic_save, finals, find_baseline
from .optim import admm_lr_factor, epoch_scheduler, guard_bf16, make_scheduler, rew_lr_factor
from .runtime import Env, UserError, check_same_on_all_ranks, is_main, log, log_command, setup_logging
from .specs import Specs, run_options


def load_rules(config_files, sparsity_types, model: torch.nn.Module, block_size: tuple) -> list:
    """[(prune_ratios, sparsity_type)] of the profiles, checked against the model's weights."""
    try:
        rules = [(admm.load_profile(c, model), t) for c, t in zip(config_files, sparsity_types)]
        shapes = dict((n, p.shape) for n, p in model.named_parameters())
        admm.check_block_size([shapes[n] for r, t in rules if t in admm.BLOCK_TYPES for n in r], block_size)
        weight_rules = admm.weight_rules(*pruning_args(rules))
        admm.check_rules(admm.prunable_parameters(model, weight_rules), weight_rules, block_size)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise UserError(exc.args[0] if exc.args else str(exc)) from None
    return rules


def pruning_args(rules: list) -> tuple:
    """ADMM / hard_prune take one profile and type, or lists of both (masks multiply)."""
    if len(rules) == 1:
        return rules[0]
    return [r for r, _ in rules], [t for _, t in rules]


def make_teacher(specs: Specs, env: Env, classes: int) -> tuple:
    """(Teacher, its checkpoint) for --distill, else (None, None)."""
    distill, run, data = specs.distill, specs.run, specs.data
    if distill is None:
        return None, None
    arch = distill.teacharch or run.arch
    path = distill.teacher_path or find_baseline(run.ckpt_root, run.dataset, arch, run.data_location)
    model = new_model(arch, classes, data.num_frames, data.crop, env.device)
    load_into(model, path, arch)
    return Teacher(model, distill.temperature, distill.kd_coefficient, distill.teacher_mode == 'train'), path


def lr_schedule(specs: Specs) -> Callable:
    """`schedule(optimizer, steps per epoch)` of --lr-scheduler with --warmup (baseline, retraining)."""
    s, recipe = specs.schedule, specs.recipe
    return lambda opt, steps: make_scheduler(opt, s.kind, recipe.lr, recipe.epochs, steps, s.warmup_epochs,
                                             s.warmup_lr)


def open_board(enabled: bool, folder: str):
    """A TensorBoard writer in `folder` (rank 0, with --tensorboard), else None."""
    if not enabled or not is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(folder)


def save_results(history: dict, stem: str) -> None:
    """Per-epoch figures as `{stem}_results.npz` (the original's `loss` and `acc`: validation loss and
    top-1, and every history key) and their plot `{stem}_results.pdf`."""
    if not is_main() or not history['val_top1']:
        return
    figures = {k: np.asarray(v, dtype=np.float64) for k, v in history.items()}
    np.savez(stem + '_results.npz', loss=figures['val_loss'], acc=figures['val_top1'], **figures)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    epochs = np.arange(1, len(history['val_top1']) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, history['train_loss'], label='train')
    ax1.plot(epochs, history['val_loss'], label='validation')
    ax1.set(xlabel='epoch', ylabel='loss', title='loss')
    ax2.plot(epochs, history['train_top1'], label='train top-1')
    ax2.plot(epochs, history['val_top1'], label='validation top-1')
    ax2.plot(epochs, history['val_top5'], label='validation top-5')
    ax2.set(xlabel='epoch', ylabel='accuracy (%)', title='accuracy')
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # whole epochs
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(stem + '_results.pdf')
    plt.close(fig)


def finish(files: RunFiles, stem: str, best: dict) -> str:
    """Rename the kept best model `{stem}_best.pt` to its final name; return that name."""
    final = files.final(stem, best['epoch'], best['top1'])
    if is_main():
        if not os.path.isfile(stem + '_best.pt'):
            raise UserError(f"the best model {stem}_best.pt is missing (was it moved while the run trained?); "
                            f"nothing was renamed")
        os.replace(stem + '_best.pt', final)
    return final


def read_result_resume(stem: str, options: dict, epochs: int) -> dict:
    """The resume point `{stem}.pt` of a baseline or retraining, refused if that run has finished."""
    resume = read_resume(stem + '.pt', options)
    if resume['epoch'] >= epochs:
        done = finals(stem)
        raise UserError(f"--resume: nothing to resume, {stem}.pt is epoch {resume['epoch']} of {epochs}: that run "
                        f"finished" + (f"; its result is {done[-1]}" if done else '') +
                        ". A new run (without --resume) writes its files beside it, under a _v2 name")
    return resume


def begin(specs: Specs, files: RunFiles, phase: str, fresh: bool, data: Data, teacher_path: str | None) -> None:
    """Everything is checked: lock the run's files (moving an old run directory aside for a fresh
    run), open the phase's log, say what the command line and the data setup mean."""
    files.start(fresh)
    setup_logging(files.log(phase) if is_main() else None)
    log_command(specs.run.options, specs.run.notes)
    for note in data.notes:
        log.info(note)
    files.tidy()
    if teacher_path:
        d = specs.distill
        log.info(f"distilling from {teacher_path} (T={d.temperature}, coefficient {d.kd_coefficient}, teacher in "
                 f"{d.teacher_mode} mode)")


def meta_of(specs: Specs, classes: int, options: dict, **more) -> dict:
    return dict(model_meta(specs.run.arch, classes, specs.data.num_frames, specs.data.crop), options=options, **more)


# ----------------------------------------------------------------------------- baseline

def run_baseline(specs: Specs, env: Env) -> str:
    run, data_spec, recipe = specs.run, specs.data, specs.recipe
    files = RunFiles.baseline(run.ckpt_root, run.dataset, run.arch)
    data = make_data(data_spec, env)
    model = new_model(run.arch, data.classes, data_spec.num_frames, data_spec.crop, env.device,
                      pretrained=run.arch == 'r2+1d-pretrained' and not run.load_path)
    if run.load_path:
        load_into(model, run.load_path, run.arch)
    data.notes += guard_bf16(model, recipe.amp_dtype, data_spec.num_frames, data_spec.crop, env.device)
    options = run_options(specs, 'baseline', data.classes, source=run.load_path)
    stem = files.claim(files.result('baseline'), run.resume)
    resume = read_result_resume(stem, options, recipe.epochs) if run.resume else None
    teacher, teacher_path = make_teacher(specs, env, data.classes)

    begin(specs, files, 'baseline', False, data, teacher_path)
    history, best = fit(model, data, recipe, env, lr_schedule(specs), meta=meta_of(specs, data.classes, options),
                        resume_path=stem + '.pt', best_path=stem + '_best.pt', resume=resume, teacher=teacher,
                        board=open_board(run.tensorboard, files.tensorboard('baseline')))
    save_results(history, stem)
    final = finish(files, stem, best)
    log.info(f"baseline: best top-1 {best['top1']:.3f} at epoch {best['epoch']}; saved {final}")
    return final


# ----------------------------------------------------------------------------- pruning

def pruning_files(specs: Specs) -> RunFiles:
    run, p = specs.run, specs.pruning
    return RunFiles.pruning(run.ckpt_root, run.dataset, run.arch, p.sparsity_types, p.block_size, p.rho_num,
                            specs.distill is not None)


def pruning_setup(specs: Specs, env: Env, config_files) -> tuple:
    """What --admm, --rew and --masked-retrain check before they touch the disk: data, model,
    profiles, teacher. Returns (data, model, rules, teacher, teacher_path)."""
    run, data_spec = specs.run, specs.data
    data = make_data(data_spec, env)
    model = new_model(run.arch, data.classes, data_spec.num_frames, data_spec.crop, env.device)
    data.notes += guard_bf16(model, specs.recipe.amp_dtype, data_spec.num_frames, data_spec.crop, env.device)
    rules = load_rules(config_files, specs.pruning.sparsity_types, model, specs.pruning.block_size)
    return (data, model, rules, *make_teacher(specs, env, data.classes))


def copy_profiles(config_files, files: RunFiles) -> None:
    if is_main():
        for source, copy in zip(config_files, files.profile_copies(config_files)):
            shutil.copyfile(admm.resolve_profile_path(source), copy)


def log_profiles(rules: list) -> None:
    """Every profile's per-layer ratios, as the original lists them at the start."""
    for ratios, kind in rules:
        log.info(f"prune ratios ({kind}):")
        for name, ratio in ratios.items():
            log.info(f"  {name}: {ratio}")


def keep_zeros(model: torch.nn.Module) -> admm.Masks:
    masks = admm.Masks(model, weights_only=True)
    log.info(f"--combine-progressive: keeping the zeros of {len(masks)} weights")
    return masks


@dataclasses.dataclass
class Regularised:
    """What --admm and --rew start from (see `start_regularised`)."""
    files: RunFiles
    data: Data
    model: object
    rules: list
    teacher: Teacher | None
    source: str
    options: dict
    resume: dict | None


def start_regularised(specs: Specs, env: Env, phase: str) -> 'Regularised':
    """The start --admm and --rew share: check everything, load the dense model (unless resuming),
    lock the run directory (a fresh run moves an old one aside) and keep a copy of the profiles."""
    run = specs.run
    files = pruning_files(specs)
    data, model, rules, teacher, teacher_path = pruning_setup(specs, env, specs.pruning.config_files)
    source = run.load_path or find_baseline(run.ckpt_root, run.dataset, run.arch, run.data_location)
    options = run_options(specs, phase, data.classes, rules, source)
    resume = read_resume(files.resume(phase), options) if run.resume else None
    if resume is None:
        load_into(model, source, run.arch)
    else:                       # the weights as they stood: --combine-progressive's masks are read off them
        model.load_state_dict(resume['state_dict'])

    begin(specs, files, phase, resume is None, data, teacher_path)
    log_profiles(rules)
    if resume is None:
        copy_profiles(specs.pruning.config_files, files)
    return Regularised(files, data, model, rules, teacher, source, options, resume)


def run_admm(specs: Specs, env: Env) -> str:
    r = start_regularised(specs, env, 'admm')
    p, recipe = specs.pruning, specs.recipe
    files, data, model, resume = r.files, r.data, r.model, r.resume
    rhos = p.rhos
    ratios, types = pruning_args(r.rules)
    board = open_board(specs.run.tensorboard, files.tensorboard('admm'))

    def schedule(opt, steps):
        return epoch_scheduler(opt, lambda e: admm_lr_factor(e, p.admm_epochs), steps)

    first = resume['stage'] if resume else 0
    wrapped = placed(model, env, recipe)
    optimizer = new_optimizer(model, recipe)        # one for every stage: momentum carries over, as in the original
    # Each stage starts from the weights the previous one ended with (and saved as its stage file); the
    # histories of stages a resumed run does not repeat are read from their stage files.
    histories = [stage_history(files.stage(rho)) for rho in rhos[:first]]
    for stage in range(first, len(rhos)):
        rho = rhos[stage]
        if not (resume and stage == first):
            log.info(f"stage {stage + 1}/{len(rhos)}: rho {rho:g}, starting from "
                     f"{r.source if stage == 0 else files.stage(rhos[stage - 1])}")
        state = admm.ADMM(model, ratios, rho, types, p.block_size, penalty=p.admm_penalty,
                          update_every=p.admm_epochs)
        masks = keep_zeros(model) if p.combine_progressive else None
        meta = meta_of(specs, data.classes, r.options, stage=stage, rho=rho)
        history, _ = fit(wrapped, data, recipe, env, schedule, meta=meta, resume_path=files.resume('admm'),
                         resume=resume if stage == first else None, stage=stage, regulariser=state, masks=masks,
                         teacher=r.teacher, board=board, optimizer=optimizer)
        atomic_save(checkpoint(meta, model.state_dict(), recipe.epochs, history['val_top1'][-1], history,
                               admm=state.state_dict()), files.stage(rho))
        histories.append(history)
        log.info(f"stage {stage + 1} done: saved {files.stage(rho)}")
    save_results(joined(histories), files.path(f"{files.name}_admm"))
    return files.stage(rhos[-1])


def stage_history(path: str) -> dict | None:
    """The per-epoch history saved in a stage file, None if the file is not there."""
    return read_checkpoint(path)[1].get('history', {}) if os.path.isfile(path) else None


def joined(histories: list) -> dict:
    """The stages' histories one after the other (the keys of the first)."""
    present = [h for h in histories if h is not None]
    if not present:
        return {'val_top1': []}
    return {k: [v for h in present for v in h.get(k, [])] for k in present[0]}


def run_rew(specs: Specs, env: Env) -> str:
    """Reweighted group regularisation (the follow-up's): task loss + penalty / profiles *
    sum_g alpha_g ||w_g||, alpha recomputed after each --rew-milestones epoch."""
    r = start_regularised(specs, env, 'rew')
    p, recipe = specs.pruning, specs.recipe
    files, data, model, resume = r.files, r.data, r.model, r.resume
    if resume is None:
        log.info(f"reweighted regularisation from {r.source}: penalty {p.penalty:g}, eps {p.rew_eps:g}, "
                 f"learning rate: {p.rew_lr}")
    ratios, types = pruning_args(r.rules)
    reg = admm.Reweighted(model, ratios, p.penalty, types, p.block_size, eps=p.rew_eps, milestones=p.rew_milestones)
    milestones = set(p.rew_milestones)
    schedule = lr_schedule(specs) if p.rew_lr == 'scheduler' else \
        lambda opt, steps: epoch_scheduler(opt, lambda e: rew_lr_factor(e, milestones), steps)
    meta = meta_of(specs, data.classes, r.options)
    history, _ = fit(model, data, recipe, env, schedule, meta=meta, resume_path=files.resume('rew'), resume=resume,
                     regulariser=reg, masks=keep_zeros(model) if p.combine_progressive else None,
                     teacher=r.teacher, board=open_board(specs.run.tensorboard, files.tensorboard('rew')))
    atomic_save(checkpoint(meta, model.state_dict(), recipe.epochs, history['val_top1'][-1], history,
                           rew=reg.state_dict()), files.rew)
    save_results(history, files.path(f"{files.name}_rew"))
    log.info(f"saved {files.rew}; prune and retrain it with --masked-retrain")
    return files.rew


# ----------------------------------------------------------------------------- retraining

def retrain_source(load_path: str | None, retrain_from: str, files: RunFiles, last_rho: float) -> tuple:
    """(model to hard-prune, method naming the result): --load-path (one-shot pruning), else the
    last ADMM stage or the --rew model (--retrain-from; auto takes whichever is newer)."""
    if load_path:
        return load_path, 'oneshot'
    choices = {'admm': files.stage(last_rho), 'rew': files.rew}
    if retrain_from != 'auto':
        return choices[retrain_from], retrain_from
    present = sorted((os.path.getmtime(f), m) for m, f in choices.items() if os.path.isfile(f))
    method = present[-1][1] if present else 'admm'
    return choices[method], method


def run_retrain(specs: Specs, env: Env) -> str:
    run, p, recipe = specs.run, specs.pruning, specs.recipe
    files = pruning_files(specs)
    source, method = retrain_source(run.load_path, p.retrain_from, files, p.rhos[-1])
    profiles = files.profile_copies(p.config_files)
    copies = method != 'oneshot' and all(os.path.isfile(f) for f in profiles)
    data, model, rules, teacher, teacher_path = pruning_setup(specs, env, profiles if copies else p.config_files)
    options = run_options(specs, 'masked_retrain', data.classes, rules, source)
    stem = files.claim(files.result(method), run.resume)
    resume = read_result_resume(stem, options, recipe.epochs) if run.resume else None
    if resume is None:
        if not os.path.isfile(source):
            raise UserError(f"no model to retrain: {source} does not exist. Run the ADMM phase first "
                            f"(--admm with the same --arch, --dataset, --sparsity-type, --rho, --rho-num) or --rew, "
                            f"or pass --load-path MODEL for one-shot pruning of a trained model")
        load_into(model, source, run.arch)
    else:                       # the pruned weights as they stood: the masks are read off their zeros
        model.load_state_dict(resume['state_dict'])

    begin(specs, files, 'retrain', False, data, teacher_path)
    if copies:
        log.info(f"profile: {', '.join(profiles)} (the copy the pruning phase saved)")
    log_profiles(rules)
    if stem != files.result(method):
        log.info(f"{files.result(method)}* holds another result: this run's files are {stem}*")
    if resume is None:
        ratios, types = pruning_args(rules)
        kept = admm.hard_prune(model, ratios, types, p.block_size)
        if isinstance(kept, list):       # several profiles: one grid per profile and weight
            kept = {f"{t}/{n}": g for t, grids in zip(types, kept) for n, g in grids.items()}
        if is_main():
            np.savez_compressed(stem + '_kept.npz', **{k: v.numpy() for k, v in kept.items()})
        top1, _, _ = evaluate(model, data.val, env.device, recipe.max_batches)
        log.info(f"hard-pruned {source} ({method}): {len(kept)} weight grids, top-1 {top1:.2f} before "
                 f"retraining; kept-group index in {stem}_kept.npz")
    masks = admm.Masks(model)
    check_same_on_all_ranks(masks.masks, 'pruning masks')
    log.info(f"masks on {len(masks)} parameters" + (f", identical on {env.world} processes" if env.world > 1 else ""))
    history, best = fit(model, data, recipe, env, lr_schedule(specs), meta=meta_of(specs, data.classes, options),
                        resume_path=stem + '.pt', best_path=stem + '_best.pt', resume=resume, masks=masks,
                        teacher=teacher, board=open_board(run.tensorboard, files.tensorboard('masked_retrain')))
    save_results(history, stem)
    profiled = {n for r, _ in rules for n in r}
    for name, zeros in admm.sparsity_report(model, profiled).items():
        log.info(f"  {name:<32} sparsity {zeros:.3f}")
    final = finish(files, stem, best)
    log.info(f"retrained: best top-1 {best['top1']:.3f} at epoch {best['epoch']}; saved {final}")
    return final
