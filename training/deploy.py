"""--evaluate and --export: a trained model's accuracy, FLOPs and faster forms."""
import copy
import json
import os

import torch

import admm

from .checkpoints import load_into, new_model
from .data import known_classes, make_data, to_device
from .engine import evaluate
from .files import find_baseline, written_atomically
from .optim import guard_bf16
from .runtime import Env, UserError, is_main, log, wrap
from .specs import Specs


def check_block(model: torch.nn.Module, block_size) -> None:
    """--connectivity-block-size against the model's weights (admm.check_block_size), as a UserError."""
    try:
        admm.check_block_size([p.shape for p in model.parameters()], tuple(block_size))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_pattern(model: torch.nn.Module, sparsity_types, block_size, tolerance: float = 0.01) -> None:
    """Refuse a block size the pruned convs' zeros do not fit: their kernel groups would be partly
    zero, so the model was pruned with another --connectivity-block-size (KGS execution would then
    compute most of the zeros)."""
    gm, gn = block_size
    for kind in [t for t in sparsity_types if t in admm.BLOCK_TYPES]:
        for name, p in model.named_parameters():
            if p.dim() < 3 or bool(p.detach().all()):
                continue
            mixed = admm.mixed_groups(p, kind, block_size)
            if mixed > tolerance:
                raise UserError(f"--connectivity-block-size {gm} {gn} does not fit the zeros of {name}: "
                                f"{100 * mixed:.0f}% of its {kind} groups of {gm}x{gn} are partly zero. The model was "
                                f"pruned with another block size: pass that one (a run directory's name says it: "
                                f"..._{kind}-r8c4 means 8 4)")


def faster(model: torch.nn.Module, arch: str, sparsity_types, block_size, clip: torch.Tensor) -> tuple:
    """`(fast, report)`: `model` (eval mode, float32, on the CPU or one device) in the fastest form this
    package has for its pruning (models.slim.faster_model), each KGS layer chosen by measuring it on
    `clip`; `report` adds the whole model's figures: dense and fast medians on `clip`, their ratio,
    and the largest output difference."""
    from models.slim import faster_model
    from models.sparse_conv import interleaved_medians
    dense = copy.deepcopy(model).eval()
    with torch.no_grad():      # not inference_mode: its tensors could not be traced for ONNX afterwards
        fast, report = faster_model(model, arch, list(sparsity_types), tuple(block_size), example_input=clip)
        difference = (fast(clip) - dense(clip)).abs().max().item()
        dense_s, fast_s = interleaved_medians([lambda: dense(clip), lambda: fast(clip)], reps=5)
    pruned = [n for n, row in report['kgs'].items() if row['reason'] != 'no zeros']
    kgs = [n for n in pruned if report['kgs'][n]['path'] in ('kgs', 'compiled')]
    # convs without zeros that run compiled because that measured faster (C3D's conv1): not KGS layers
    unpruned = [n for n, row in report['kgs'].items() if row['reason'] == 'no zeros' and row['path'] == 'compiled']
    report.update(dense_ms=1000 * dense_s, fast_ms=1000 * fast_s, speedup=dense_s / fast_s,
                  max_abs_difference=difference, kgs_layers=len(kgs), pruned_convs=len(pruned),
                  unpruned_compiled=len(unpruned), slim_layers=len(report['slim']))
    what = ([f"slim ({len(report['slim'])} layers narrowed)"] if report['slim'] else []) + \
        ([f"KGS execution in {len(kgs)} of {len(pruned)} pruned convs"] if report['kgs'] else []) + \
        ([f"{len(unpruned)} unpruned conv(s) compiled ({', '.join(unpruned)})"] if unpruned else [])
    log.info(f"sparse-exec: {' + '.join(what) or 'nothing to gain'}; {tuple(clip.shape)} clips: dense "
             f"{1000 * dense_s:.1f} ms, fast {1000 * fast_s:.1f} ms ({dense_s / fast_s:.2f}x, medians of 5); "
             f"largest output difference {difference:.2e}")
    return fast, report


def run_export(specs: Specs, env: Env) -> str:
    """A checkpoint in compact form (kept groups and their index), and optionally ONNX."""
    from models.compact import export_onnx, load_compact, save_compact
    run, d, data, p = specs.run, specs.deploy, specs.data, specs.pruning
    out = d.export_out or (d.export[:-3] if d.export.endswith('.pt') else d.export) + '.compact.pt'
    stem = out[:-3] if out.endswith('.pt') else out
    onnx_path, fast_path = stem + '.onnx', stem + '.fast.pt'
    for path in [out] + ([onnx_path] if d.onnx else []) + ([fast_path] if d.sparse_exec else []):
        if os.path.exists(path) and os.path.exists(d.export) and os.path.samefile(path, d.export):
            raise UserError(f"--export-out {path} is the checkpoint being exported: writing it would destroy it; "
                            f"choose another file")
        if os.path.exists(path) and not d.force:
            raise UserError(f"{path} exists: choose another --export-out, or pass --force to replace it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"folder {os.path.dirname(os.path.abspath(out))} of --export-out does not exist: create it")
    classes = data.num_classes or known_classes(run.dataset) or 101
    model = new_model(run.arch, classes, data.num_frames, data.crop, torch.device('cpu'))
    load_into(model, d.export, run.arch)
    state = model.state_dict()
    check_block(model, p.block_size)
    types = list(dict.fromkeys(list(p.sparsity_types) + ['irregular']))
    with written_atomically(out) as tmp:
        compact = save_compact(state, tmp, types, p.block_size)
        restored = load_compact(tmp)
        if not all(torch.equal(restored[k], v) for k, v in state.items()):
            raise RuntimeError("compact round trip differs")
    log.info(f"{d.export}: {os.path.getsize(d.export) / 2**20:.1f} MiB -> {out}: "
             f"{os.path.getsize(out) / 2**20:.1f} MiB ({len(compact)} weights stored compactly; "
             f"models.compact.load_compact reads it back)")
    if d.sparse_exec:
        from models.slim import save_model
        check_pattern(model, p.sparsity_types, p.block_size)
        model, _ = faster(model.eval(), run.arch, p.sparsity_types, p.block_size,
                          torch.randn(1, 3, data.num_frames, data.crop, data.crop))
        with written_atomically(fast_path) as tmp:
            save_model(model, tmp, run.arch, classes, num_frames=data.num_frames, crop_size=data.crop)
        log.info(f"wrote {fast_path} ({os.path.getsize(fast_path) / 2**20:.1f} MiB), the faster form for the CPU "
                 f"at batch 1: models.slim.load_model reads it")
    if d.onnx:
        export_onnx(model, onnx_path, (1, 3, data.num_frames, data.crop, data.crop))
        form = ' of the faster form' if d.sparse_exec else ''
        log.info(f"wrote {onnx_path} ({os.path.getsize(onnx_path) / 2**20:.1f} MiB){form} "
                 f"for clips of 1x3x{data.num_frames}x{data.crop}x{data.crop}")
    return out


def run_evaluate(specs: Specs, env: Env) -> dict:
    import profile_flops
    run, data_spec, recipe, p = specs.run, specs.data, specs.recipe, specs.pruning
    path = run.load_path or find_baseline(run.ckpt_root, run.dataset, run.arch, run.data_location)
    data = make_data(data_spec, env, need_train=False)
    model = new_model(run.arch, data.classes, data_spec.num_frames, data_spec.crop, env.device)
    meta = load_into(model, path, run.arch)
    for note in guard_bf16(model, recipe.amp_dtype, data_spec.num_frames, data_spec.crop, env.device):
        log.info(note)
    report = profile_flops.profile(model, data_spec.num_frames, data_spec.crop)      # reads the model, on any device
    speed = None
    if specs.deploy.sparse_exec:
        check_block(model, p.block_size)
        check_pattern(model, p.sparsity_types, p.block_size)
        clips, _ = next(iter(data.val))
        model, speed = faster(model.eval(), run.arch, p.sparsity_types, p.block_size, to_device(clips, env.device))
        net = model             # no DDP around it: nothing to synchronise, evaluate() sums over processes
    else:
        net = wrap(model, env, recipe.multi_gpu)
    top1, top5, loss = evaluate(net, data.val, env.device, recipe.max_batches, recipe.amp_dtype)
    for row in report['layers']:
        if row['density'] < 1:
            log.info(f"  {row['name']:<32} density {row['density']:.3f}")
    result = {'checkpoint': path, 'top1': top1, 'top5': top5, 'loss': loss,
              'flops_reduction': report['flops_reduction'], 'params_reduction': report['params_reduction'],
              'dense_gmacs': report['dense_macs'] / 1e9, 'pruned_gmacs': report['pruned_macs'] / 1e9,
              'epoch': meta.get('epoch')}
    if speed is not None:
        result['sparse_exec'] = {k: speed[k] for k in ('speedup', 'dense_ms', 'fast_ms', 'max_abs_difference',
                                                       'kgs_layers', 'pruned_convs', 'unpruned_compiled',
                                                       'slim_layers')}
    log.info(f"{path}: top-1 {top1:.2f}  top-5 {top5:.2f}  loss {loss:.4f}  FLOPs reduction "
             f"{report['flops_reduction']:.2f}x ({result['pruned_gmacs']:.3f} of {result['dense_gmacs']:.3f} "
             f"GMACs)  parameters reduction {report['params_reduction']:.2f}x"
             + (f"  measured speedup {speed['speedup']:.2f}x" if speed else ''))
    if is_main():
        print("RESULT " + json.dumps(result, default=float))
    return result
