"""Measured CPU speed of pruned models against what a user would run instead: the dense model in PyTorch
eager, onnxruntime, OpenVINO and DeepSparse, the pruned graphs in those runtimes, and our fast form
(models/sparse_conv.py, models/slim.py), side by side in one run, per layer and whole model.

    python bench/bench_speedup.py                        # C3D and R(2+1)D, 1 clip, 2 threads, KGS 8x4 and all, slim
    python bench/bench_speedup.py --arch c3d --runtimes torch onnxruntime openvino
    python bench/bench_speedup.py --arch c3d --config-file c3d_3.57x c3d_2.53x_v2 --block-sizes 8x4 16x4 32x8 64x16 all
    python bench/bench_speedup.py --arch c3d --layers-only --threads 1 2     # per conv: ms, GMAC/s, share of peak
    python bench/bench_speedup.py --arch c3d --deepsparse-python /work/.venv-deepsparse/bin/python --onnx

Models are randomly initialised and hard-pruned with each profile (speed depends on the kept pattern,
not on the values): blk-kgs at every block size (`all` = one block row of all filters: gM = O), and
`filter` with the profile's ratios scaled until the slim model's own FLOPs reduction matches the first
block size's (removing a filter also removes the next layer's input channels, so the same ratios would
prune much more). Rows of the whole-model table: the dense model, each KGS-pruned model (its masked
dense graph in the ONNX runtimes; in PyTorch its fast form, `sparse_exec` at that block size, each
pruned conv on the KGS path where that measured faster on this clip), and the slim model (the same
graph everywhere). Every runtime runs `--threads` threads on the same clip, the ONNX runtimes the same
file; DeepSparse (its own venv: docs/benchmarks.md) runs in a subprocess that answers one inference
at a time, so all cells are timed round-robin, `--pause` seconds apart (one runtime's idle threads
must not spin into the next one's time), and each is the median of `--reps`: load on a shared machine
hits them all alike. Ratios are against the fastest dense runtime of the same run, printed as
"fast form vs fastest dense runtime". The per-layer table times every conv alone: dense conv3d
against each variant's layer (every pruned conv on the KGS path there, so it shows the raw kernel),
with GMAC/s on the MACs the kept weights need and its share of the measured FMA peak.
Prints Markdown tables (and writes them to `--out`).
"""
import argparse
import copy
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import admm  # noqa: E402
import profile_flops  # noqa: E402
from models import DEFAULT_GEOMETRY, build_model  # noqa: E402
from models.compact import export_onnx  # noqa: E402
from models.slim import faster_model, macs, slim_model  # noqa: E402
from models.sparse_conv import KGSConv3d, interleaved_medians, sparse_exec  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# One profile per architecture by default (the long form names more with --config-file). The all-convs
# profiles were renamed `<name>_all-convs` when `<name>` became the original's few-layer profile: the
# new name is taken where it exists.
PROFILES = {'c3d': ['c3d_3.57x'], 'r2+1d': ['r2+1d-pretrained_3.20x'], 's3d': ['s3d_2.09x']}
BLOCKS = ['8x4', 'all']
ALL_FILTERS = 1 << 16          # blocks taller than any layer: one block row of all filters
RUNTIMES = ['torch', 'onnxruntime', 'openvino', 'deepsparse']
TITLES = {'torch': 'PyTorch (pruned: fast form)', 'onnxruntime': 'onnxruntime', 'openvino': 'OpenVINO',
          'deepsparse': 'DeepSparse'}
ONNX_RUNTIMES = RUNTIMES[1:]


def parse_block(text):
    """'8x4' -> (8, 4); 'all' -> one block row of all filters (gM larger than any layer), gN 4."""
    if text == 'all':
        return ALL_FILTERS, 4
    try:
        gm, gn = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f"block size {text!r}: write GMxGN (e.g. 8x4) or 'all'") from None
    return gm, gn


def block_name(block):
    return 'all' if block[0] >= ALL_FILTERS else f'{block[0]}x{block[1]}'


def default_profile(name):
    """`name_all-convs` where that profile exists, else `name`."""
    renamed = f'{name}_all-convs'
    return renamed if os.path.isfile(os.path.join(admm.PROFILE_DIR, renamed + '.yaml')) else name


def interleaved(fns, reps):
    """Median seconds of each named callable, called in turn `reps` times after one warm-up round
    (`models.sparse_conv.interleaved_medians`), without gradients."""
    with torch.no_grad():
        return dict(zip(fns, interleaved_medians(list(fns.values()), reps)))


def round_robin(timers, reps, pause):
    """Median seconds of each named timer (a callable that runs once and returns the seconds it took),
    called in turn `reps` times after one warm-up round, sleeping `pause` seconds before each call."""
    times = {name: [] for name in timers}
    for i in range(reps + 1):
        for name, timer in timers.items():
            time.sleep(pause)
            seconds = timer()
            if i:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def wall(fn):
    """A timer of `fn`: runs it once without gradients, returns the seconds."""
    def timer():
        with torch.no_grad():
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return timer


@torch.no_grad()
def kgs_pruned(model, profile, block):
    """A copy of `model` hard-pruned with blk-kgs at `block`, every weight of the profile blocked by its own
    filter count when gM is 'all' (so a 64-filter layer is one block row, not one padded to 65536)."""
    model = copy.deepcopy(model)
    ratios = admm.load_profile(profile, model)
    params = dict(model.named_parameters())
    for name, ratio in ratios.items():
        w = params[name]
        w.copy_(admm.project(w, ratio, 'blk-kgs', (min(block[0], w.shape[0]), block[1])))
    return model


@torch.no_grad()
def filter_pruned(model, profile, target, clip):
    """`(model, scale, reduction)`: a copy of `model` filter-pruned with the profile's ratios times `scale`,
    the scale found by bisection so that the slim model's FLOPs reduction is `target` (within 2%)."""
    ratios = admm.load_profile(profile, model)
    dense = macs(model, clip)
    lo, hi = 0.0, 1.0 / max(ratios.values()) * 0.999
    best = None
    for _ in range(14):
        scale = (lo + hi) / 2
        pruned = copy.deepcopy(model)
        admm.hard_prune(pruned, {n: r * scale for n, r in ratios.items()}, 'filter')
        reduction = dense / macs(slim_model(pruned, arch_of(model)), clip)
        best = (pruned, scale, reduction)
        if abs(reduction / target - 1) < 0.02:
            break
        lo, hi = (scale, hi) if reduction < target else (lo, scale)
    return best


def arch_of(model):
    return {'C3D': 'c3d', 'VideoResNet': 'r2+1d', 'S3D': 's3d'}[type(model).__name__]


def geometry(arch):
    g = DEFAULT_GEOMETRY[arch]
    return g['num_frames'], g['crop_size']


def conv_inputs(model, clip):
    """`{conv name: input tensor}` of every Conv3d / KGSConv3d for one forward pass of `clip`."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv3d, KGSConv3d)):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0])))
    with torch.no_grad():
        model(clip)
    for h in hooks:
        h.remove()
    return seen


def release(model):
    """Drop the KGS layers' cached workspaces (memory between measurements)."""
    for m in model.modules():
        if callable(getattr(m, 'release', None)):
            m.release()


def markdown(head, rows):
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------- peak

def mac_peak(threads):
    """`(GMAC/s, label)` of `threads` threads: `models.kgs_cpu.fma_peak_gmacs` where that module exists; before
    it does, the best of a few large fp32 torch.mm (a GEMM, not the FMA units' peak), labelled so."""
    if importlib.util.find_spec('models.kgs_cpu') is not None:
        from models.kgs_cpu import fma_peak_gmacs
        return float(fma_peak_gmacs(threads)), 'FMA peak'
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # Many short products, the fastest taken: on a shared machine one of them fits between other loads.
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = min(wall(lambda: a @ b)() for _ in range(40))
    finally:
        torch.set_num_threads(previous)
    return n ** 3 / best / 1e9, 'GEMM peak (no FMA probe)'


# ----------------------------------------------------------------------------- per layer

def conv_macs(conv, x, out):
    """`(MACs, MACs of the kept weights)` of `conv` on `x` giving `out` (every output sums a weight row)."""
    total = out.numel() * conv.weight[0].numel()
    return total, total * float((conv.weight != 0).float().mean())


def layer_table(dense, variants, slim, clip, reps, peak, probe=None):
    """Per conv of the dense model: dense conv3d ms, GMAC/s and share of the peak; per variant (and the slim
    model) its layer's ms, speedup, kept share, GMAC/s on the kept weights' MACs and share of the peak.
    Every pruned conv of a variant is on the KGS path here, including those the whole model keeps dense.
    `peak`: a callable returning the GMAC/s to take shares against, asked after each conv's rounds;
    `probe`, if given, is called in those rounds: it reads the peak again, and with `peak` being
    `kgs_cpu.highest_fma_peak` the shares are against the highest reading of the run so far.
    Returns the table and the last peak."""
    inputs = conv_inputs(dense, clip)
    forced = {}
    for label, model in variants.items():
        fast = copy.deepcopy(model)
        sparse_exec(fast, model.block, min_speedup=0.0)       # every pruned conv converted
        forced[label] = fast
    if slim is not None:
        forced['slim filter'] = slim
        slim_inputs = conv_inputs(slim, clip)
    rows, totals = [], {label: 0.0 for label in ['dense', *forced]}
    for name, x in inputs.items():
        conv = dense.get_submodule(name)
        fns, cells = {'dense': lambda c=conv, x=x: c(x)}, {}
        for label, model in forced.items():
            layer = model.get_submodule(name)
            if label == 'slim filter':
                if tuple(layer.weight.shape) == tuple(conv.weight.shape):
                    continue
                lx = slim_inputs[name]
                fns[label] = lambda c=layer, x=lx: c(x)
                with torch.no_grad():
                    cells[label] = conv_macs(layer, lx, layer(lx))[0]
            else:
                masked = variants[label].get_submodule(name)
                if bool((masked.weight != 0).all()):
                    continue                                   # not pruned: the same conv3d
                fns[label] = lambda c=layer, x=x: c(x)
                with torch.no_grad():
                    cells[label] = conv_macs(masked, x, conv(x))[1]
        with torch.no_grad():
            dense_macs = conv_macs(conv, x, conv(x))[0]
        if probe is not None:
            fns['peak probe'] = probe
        t = interleaved(fns, reps)
        now = peak()
        row = [name, tuple(x.shape[1:]), f"{dense_macs / 1e9:.2f}", rate(t['dense'], dense_macs, now)]
        totals['dense'] += t['dense']
        for label in forced:
            if label in cells:
                totals[label] += t[label]
                row.append(f"{t['dense'] / t[label]:.2f}x, kept {cells[label] / dense_macs:.0%}: "
                           + rate(t[label], cells[label], now))
            else:
                totals[label] += t['dense']
                row.append('dense')
        rows.append(row)
        print('  ' + ' | '.join(map(str, row)), flush=True)
    rows.append(['all convs', '', '', f"{totals['dense'] * 1e3:.1f} ms"]
                + [f"{totals[label] * 1e3:.1f} ms ({totals['dense'] / totals[label]:.2f}x)" for label in forced])
    for model in forced.values():
        release(model)
    head = ['conv', 'input (C, T, H, W)', 'GMAC', 'dense conv3d: ms, GMAC/s (peak)']
    head += [f"{'KGS ' if label != 'slim filter' else ''}{label}: speedup, kept MACs: ms, GMAC/s (peak)"
             for label in forced]
    return markdown(head, rows), now


def rate(seconds, mac_count, peak):
    gmacs = mac_count / seconds / 1e9
    return f"{seconds * 1e3:.1f} ms, {gmacs:.1f} ({gmacs / peak:.0%})"


# ----------------------------------------------------------------------------- runtimes

def available_runtimes(wanted, deepsparse_python):
    """`(runtimes, notes)`: the runtimes of `wanted` that can run here, and one line for each that cannot."""
    out, notes = [], []
    for name in wanted:
        if name in ('onnxruntime', 'openvino') and importlib.util.find_spec(name) is None:
            notes.append(f"{TITLES[name]}: skipped, not installed (pip install -r bench/requirements.txt)")
        elif name == 'deepsparse' and not deepsparse_python:
            notes.append("DeepSparse: skipped; to run it, make its venv (docs/benchmarks.md, section DeepSparse) "
                         "and pass --deepsparse-python PATH or set DEEPSPARSE_PYTHON")
        elif name == 'deepsparse' and deepsparse_version(deepsparse_python) is None:
            raise SystemExit(f"--deepsparse-python / DEEPSPARSE_PYTHON {deepsparse_python!r} is not a Python with "
                             f"deepsparse installed; make the venv as docs/benchmarks.md says")
        else:
            out.append(name)
    return out, notes


def deepsparse_version(python):
    """deepsparse's version in the venv of `python`, or None when that Python cannot run or lacks it."""
    if not python or not os.access(python, os.X_OK):
        return None
    found = subprocess.run([python, '-c', "from importlib.metadata import version; print(version('deepsparse'))"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def onnxruntime_session(path, clip, threads):
    """A function running `path` once on `clip` with onnxruntime's CPU provider at `threads` threads."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    feed = {session.get_inputs()[0].name: clip}
    return lambda: session.run(None, feed)[0]


def openvino_session(path, clip, threads):
    """A function running `path` once on `clip` with OpenVINO's CPU plugin: `threads` threads, one stream,
    latency hint, fp32 (no bf16 / int8 it might otherwise pick on other CPUs)."""
    import openvino as ov
    compiled = ov.Core().compile_model(path, 'CPU', {'INFERENCE_NUM_THREADS': threads, 'NUM_STREAMS': 1,
                                                      'PERFORMANCE_HINT': 'LATENCY',
                                                      'INFERENCE_PRECISION_HINT': 'f32'})
    request = compiled.create_infer_request()
    output = compiled.output(0)
    return lambda: request.infer({0: clip})[output]


class DeepSparse:
    """bench/deepsparse_worker.py in DeepSparse's own venv: compiles the ONNX files, then times one
    inference per request, so DeepSparse takes its turns in the same round-robin as the other runtimes.
    A graph whose compilation kills the worker (DeepSparse 1.8 segfaults on some convs) is left out and
    the worker started again without it: `failed` names those graphs."""

    def __init__(self, python, files, clip_path, threads, log_dir):
        self.python, self.files, self.clip_path, self.threads = python, dict(files), clip_path, threads
        self.log = os.path.join(log_dir, 'deepsparse.log')
        self.failed = {}
        self._start()

    def _start(self):
        command = [self.python, os.path.join(HERE, 'deepsparse_worker.py'), '--threads', str(self.threads),
                   '--input', self.clip_path] + [f'{name}={path}' for name, path in self.files.items()]
        with open(self.log, 'w') as log:    # DeepSparse's banner and crash dumps; the last lines are shown
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            text=True, env={**os.environ, 'NM_DISABLE_ANALYTICS': '1'})

    def _ask(self, line):
        self.process.stdin.write(line + '\n')
        self.process.stdin.flush()
        return self._answer()

    def _answer(self):
        answer = self.process.stdout.readline()
        if answer.startswith('error'):
            raise RuntimeError(f"DeepSparse worker: {answer.strip()}")
        if not answer:
            self.process.wait(timeout=30)
            raise RuntimeError(f"DeepSparse worker ({self.python}) stopped: {self._last_words()}")
        return answer.strip()

    def _last_words(self):
        """The line of the worker's log that says why it stopped (after it stopped)."""
        with open(self.log) as f:
            lines = [line.strip() for line in f if line.strip()]
        said = [line for line in lines if 'signal' in line.lower() or 'error' in line.lower()]
        return (said or lines or ['no message'])[-1]

    def wait_ready(self, names):
        """Wait until every graph compiled, printing each; `names` maps file keys to row labels."""
        compiling = None
        while True:
            line = self.process.stdout.readline()
            if line.startswith('ready'):
                return
            if line.startswith('compiling '):
                compiling = line.split()[1]
            elif line.startswith('compiled '):
                _, key, seconds = line.split()
                print(f"  DeepSparse: {names[key]} compiled in {float(seconds):.0f} s", flush=True)
            elif not line:
                self.process.wait()
                if compiling is None:
                    raise RuntimeError(f"DeepSparse worker ({self.python}) stopped before compiling: "
                                       f"{self._last_words()}; check the venv as docs/benchmarks.md says")
                self.failed[compiling] = self._last_words()
                print(f"  DeepSparse: {names[compiling]} crashed the compiler ({self.failed[compiling]}); "
                      f"left out", flush=True)
                del self.files[compiling]
                if not self.files:
                    return
                self._start()
                compiling = None

    def timer(self, name):
        return lambda: float(self._ask(f'time {name}'))

    def output(self, name):
        return np.array(json.loads(self._ask(f'output {name}')), dtype=np.float32)

    def close(self):
        if self.process.poll() is None:
            try:
                self._ask('quit')
            except (RuntimeError, BrokenPipeError):
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def relative_difference(out, ref):
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    return float(np.abs(np.asarray(out, dtype=np.float32).reshape(ref.shape) - ref).max() / max(np.abs(ref).max(),
                                                                                            1e-12))


# ----------------------------------------------------------------------------- whole model

def whole_table(times, reductions, notes, runtimes, failures=None):
    """`(markdown table, headline lines)` from `times[(row, runtime)]` seconds: each cell ms and its speedup
    over the fastest dense runtime; one line per pruned row with its fast form against that runtime.
    `failures[(row, runtime)]` says why a cell has no time."""
    failures = failures or {}
    name = {rt: TITLES[rt].split(' (')[0] for rt in runtimes}
    dense = {rt: times[('dense', rt)] for rt in runtimes if ('dense', rt) in times}
    fastest = min(dense, key=dense.get) if dense else None
    base = dense.get(fastest)

    def cell(row, rt):
        t = times.get((row, rt))
        if t is None:
            return failures.get((row, rt), '')
        text = f"{t * 1e3:.0f}" + (f" ({base / t:.2f}x)" if base else '')
        return f"**{text}**" if (row, rt) == ('dense', fastest) else text

    rows = [[row, f"{reductions[row]:.2f}x"] + [cell(row, rt) for rt in runtimes] + [notes.get(row, '')]
            for row in reductions]
    head = ['model', 'FLOPs reduction'] + [f"{TITLES[rt]} ms" for rt in runtimes] + ['note']
    if not base:
        return markdown(head, rows), ["no dense runtime was timed: no ratios"]
    lines = [f"fastest dense runtime: {name[fastest]}, {base * 1e3:.0f} ms"]
    for row in reductions:
        t = times.get((row, 'torch'))
        if row != 'dense' and t is not None and 'exported' not in row:
            lines.append(f"{row}: fast form vs fastest dense runtime: {base / t:.2f}x "
                         f"({t * 1e3:.0f} ms against {name[fastest]} {base * 1e3:.0f} ms)")
    pruned = {key: t for key, t in times.items() if key[0] != 'dense'}
    if pruned:
        row, rt = min(pruned, key=pruned.get)
        form = 'fast form' if rt == 'torch' else 'graph'
        lines.append(f"fastest pruned model: {row} ({form}) in {name[rt]}, {pruned[row, rt] * 1e3:.0f} ms: "
                     f"{base / pruned[row, rt]:.2f}x the fastest dense runtime")
    return markdown(head, rows), lines


def run_model(arch, profile, blocks, batch, reps, runtimes, opts, peak):
    """Markdown tables for one architecture, profile and batch at the current thread count."""
    threads = torch.get_num_threads()
    num_frames, crop = opts.frames or geometry(arch)[0], opts.crop or geometry(arch)[1]
    torch.manual_seed(0)
    base = build_model(arch, 101, num_frames=num_frames, crop_size=crop, pretrained=False).eval()
    clip_shape = (batch, 3, num_frames, crop, crop)
    clip = torch.randn(clip_shape)
    dense_macs = macs(base, clip_shape)
    variants, reductions, notes = {}, {'dense': 1.0}, {}
    for block in blocks:
        model = kgs_pruned(base, profile, block)
        model.block = block
        variants[block_name(block)] = model
        reductions[f'KGS {block_name(block)}'] = profile_flops.profile(model, num_frames, crop)['flops_reduction']
    slim = None
    if not opts.no_slim:
        target = reductions[f'KGS {block_name(blocks[0])}']
        pruned, scale, reduction = filter_pruned(base, profile, target, clip_shape)
        slim, _ = faster_model(pruned, arch, 'filter')
        del pruned
        reductions['slim filter'] = reduction
        notes['slim filter'] = f"filter type, the profile's ratios x{scale:.2f}"
    tables = []
    if not opts.no_layers:
        print(f"  per conv (peak {peak[0]:.1f} GMAC/s: {peak[1]}, {threads} thread(s))", flush=True)
        peak_now, probe = (lambda: peak[0]), None
        if peak[1] == 'FMA peak':
            from models.kgs_cpu import fma_peak_gmacs, highest_fma_peak
            peak_now = functools.partial(highest_fma_peak, threads)
            probe = functools.partial(fma_peak_gmacs, threads, cached=False)
        table, highest = layer_table(base, variants, slim, clip, reps, peak_now, probe)
        how = ' (the highest probe reading of the rounds; shares against the highest so far)' if probe else ''
        tables.append(f"Per conv, {peak[1]} {highest:.1f} GMAC/s at {threads} thread(s){how}:\n\n" + table)
    if opts.layers_only:
        return '\n\n'.join(tables)

    # Fast forms in PyTorch (models.slim.faster_model): each pruned conv on the compiled KGS kernel (or the torch
    # KGS path) where that is faster on this clip, BatchNorms folded, pools and ReLUs compiled.
    fast = {}
    for label, model in variants.items():
        f = copy.deepcopy(model).eval()
        if opts.min_speedup is not None:
            report = sparse_exec(f, model.block, min_speedup=opts.min_speedup,
                                 example_input=None if opts.no_calibrate else clip)
        else:
            f, report = faster_model(f, arch, 'blk-kgs', model.block, example_input=None if opts.no_calibrate else clip)
            report = report['kgs']
        fast[f'KGS {label}'] = f
        pruned = [r for r in report.values() if r['density'] < 1]
        on = {path: sum(r['path'] == path for r in pruned) for path in ('compiled', 'kgs')}
        notes[f'KGS {label}'] = (f"of {len(pruned)} pruned convs {on['compiled']} "
                                 f"compiled, {on['kgs']} on the torch KGS path; MACs run "
                                 f"{dense_macs / macs(f, clip_shape):.2f}x fewer")
    if slim is not None:
        fast['slim filter'] = slim
    reference = {'dense': base, **{f'KGS {k}': v for k, v in variants.items()}}
    if slim is not None:
        reference['slim filter'] = slim
    graphs = dict(reference)                      # what the ONNX runtimes run: masked dense graphs and slim
    if opts.onnx:
        for label in variants:
            graphs[f'KGS {label}, fast form exported'] = fast[f'KGS {label}']
            reductions[f'KGS {label}, fast form exported'] = reductions[f'KGS {label}']
            reference[f'KGS {label}, fast form exported'] = variants[label]

    timers, outputs, failures = {}, {}, {}
    if 'torch' in runtimes:
        timers[('dense', 'torch')] = wall(lambda: base(clip))
        for label, model in fast.items():
            timers[(label, 'torch')] = wall(lambda m=model: m(clip))
            with torch.no_grad():
                outputs[(label, 'torch')] = model(clip)
    with torch.no_grad():
        expected = {label: model(clip) for label, model in reference.items()}
    tmp = tempfile.mkdtemp(prefix='bench_speedup_')
    worker = None
    try:
        files = {}
        onnx_runtimes = [rt for rt in runtimes if rt in ONNX_RUNTIMES]
        if onnx_runtimes:
            for i, (label, model) in enumerate(graphs.items()):
                files[label] = export_onnx(model, os.path.join(tmp, f'{i}.onnx'), clip_shape)
            np.save(os.path.join(tmp, 'clip.npy'), clip.numpy())
        # From here the masked PyTorch models are files: free them (C3D's are 300 MB each).
        for held in (graphs, reference, variants):
            held.clear()
        model = None
        keys = {f'm{i}': label for i, label in enumerate(files)}         # file keys of the DeepSparse worker
        if 'deepsparse' in runtimes:           # compiles in its process while the others build their sessions
            worker = DeepSparse(opts.deepsparse_python, {key: files[label] for key, label in keys.items()},
                                os.path.join(tmp, 'clip.npy'), threads, tmp)
        x = clip.numpy()
        for rt, make in (('onnxruntime', onnxruntime_session), ('openvino', openvino_session)):
            if rt in runtimes:
                for label, path in files.items():
                    run = make(path, x, threads)
                    outputs[(label, rt)] = run()
                    timers[(label, rt)] = wall(run)
        if worker is not None:
            worker.wait_ready(keys)
            for key in worker.files:
                outputs[(keys[key], 'deepsparse')] = worker.output(key)
                timers[(keys[key], 'deepsparse')] = worker.timer(key)
            failures.update({(keys[key], 'deepsparse'): 'compiler crashed' for key in worker.failed})
        worst = max(((relative_difference(out, expected[label]), label, rt) for (label, rt), out in outputs.items()),
                    default=(0.0, '', ''))
        times = round_robin(timers, reps, opts.pause)
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(tmp, ignore_errors=True)
        for model in fast.values():
            release(model)
    table, lines = whole_table(times, reductions, notes, runtimes, failures)
    check = (f"largest output difference from PyTorch's on the same graph: {worst[0]:.1e} of the largest logit"
             + (f" ({worst[1]}, {TITLES[worst[2]].split(' (')[0]})" if worst[1] else ''))
    if worst[0] > 1e-3:
        check = '**WARNING** ' + check
    tables.append(table + '\n\n' + '\n'.join(f"- {line}" for line in lines + [check]))
    return '\n\n'.join(tables)


@torch.no_grad()
def checkpoint_speedup(path, block, num_classes, reps=5, batch=1):
    """`(dense s, KGS s)`: a trained C3D checkpoint's conv weights (its real kept pattern) in a C3D at
    16x112x112 (fc6 follows the clip size, so it is left random), dense vs `sparse_exec` at `block`
    (each layer on the path measured faster)."""
    from models import read_checkpoint
    state, _ = read_checkpoint(path)
    model = build_model('c3d', num_classes).eval()
    convs = {k: v for k, v in state.items() if k.startswith('conv')}
    model.load_state_dict(convs, strict=False)
    kgs = copy.deepcopy(model)
    clip = torch.randn(batch, 3, 16, 112, 112)
    sparse_exec(kgs, block, example_input=clip)
    t = interleaved({'dense': lambda: model(clip), 'kgs': lambda: kgs(clip)}, reps)
    return t['dense'], t['kgs']


def profiles_by_arch(archs, names):
    """`{arch: [profile, ...]}`: the default profile of each arch, or each of `names` under the archs whose
    model it fits (a profile that fits none is an error naming it)."""
    if not names:
        return {arch: [default_profile(p) for p in PROFILES[arch]] for arch in archs}
    out, fitted = {arch: [] for arch in archs}, set()
    for arch in archs:
        model = build_model(arch, 101, pretrained=False).to('meta')
        for name in names:
            try:
                admm.load_profile(name, model)
            except KeyError:
                continue
            out[arch].append(name)
            fitted.add(name)
    unfit = [n for n in names if n not in fitted]
    if unfit:
        raise SystemExit(f"--config-file {', '.join(unfit)}: fits none of --arch {' '.join(archs)} (its keys are "
                         f"not that model's parameters); choose the matching --arch")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    g = p.add_argument_group('what to measure')
    g.add_argument('--arch', nargs='+', default=['c3d', 'r2+1d'], choices=sorted(PROFILES),
                   help='architectures, built with random weights (default: c3d r2+1d)')
    g.add_argument('--config-file', '--profiles', dest='profiles', nargs='+',
                   help="profiles (names in profiles/ or paths); default: "
                        + ', '.join(f'{a} {PROFILES[a][0]}[_all-convs]' for a in PROFILES))
    g.add_argument('--block-sizes', nargs='+', type=parse_block, default=[parse_block(b) for b in BLOCKS],
                   help='GMxGN blocks of blk-kgs, or all (one block row of all filters); long form: '
                        '8x4 16x4 32x8 64x16 all')
    g.add_argument('--no-slim', action='store_true', help='leave out the slim filter model')
    g.add_argument('--frames', type=int, help="clip frames (default: the architecture's, 16)")
    g.add_argument('--crop', type=int, help="clip height and width (default: the architecture's, 112 or 224)")
    g.add_argument('--layers-only', action='store_true', help='per-conv table only (PyTorch)')
    g.add_argument('--no-layers', action='store_true', help='whole-model table only')
    g = p.add_argument_group('runtimes and timing')
    g.add_argument('--runtimes', nargs='+', default=RUNTIMES, choices=RUNTIMES,
                   help='torch: dense eager and our fast forms; the others run the exported ONNX graphs')
    g.add_argument('--deepsparse-python', default=os.environ.get('DEEPSPARSE_PYTHON'),
                   help="Python of a venv with deepsparse 1.8 (docs/benchmarks.md); default $DEEPSPARSE_PYTHON")
    g.add_argument('--onnx', action='store_true',
                   help='also the KGS fast forms exported to ONNX (their portable form) in the ONNX runtimes')
    g.add_argument('--batch', nargs='+', type=int, default=[1], help='clips per inference (default 1)')
    g.add_argument('--threads', nargs='+', type=int, default=[2],
                   help='threads of every runtime (0: all cores, torch default)')
    g.add_argument('--reps', type=int, default=5, help='interleaved repeats per measurement (median)')
    g.add_argument('--pause', type=float, default=0.05, help='seconds between two timed calls of the whole models')
    g.add_argument('--min-speedup', type=float,
                   help="the fast form as sparse_exec alone with this threshold (slower layers stay dense) instead of "
                        "models.slim.faster_model (sparse_exec at 1.1, BatchNorms folded, pools and ReLUs compiled)")
    g.add_argument('--no-calibrate', action='store_true',
                   help="fast form: choose each layer's path by sparse_exec's cost model, not by measuring it")
    p.add_argument('--out', help='also write the tables to this Markdown file')
    args = p.parse_args(argv)
    if args.layers_only and args.no_layers:
        p.error('--layers-only and --no-layers leave nothing to measure')
    if args.reps < 1:
        p.error('--reps must be at least 1')

    runtimes, skipped = available_runtimes(args.runtimes, args.deepsparse_python)
    for line in skipped:
        print(line, flush=True)
    profiles = profiles_by_arch(args.arch, args.profiles)
    default_threads = torch.get_num_threads()
    sections = [f"CPU: {cpu_name()}; runtimes: {versions(runtimes, args.deepsparse_python)}"] + skipped
    print(sections[0], flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        peak = mac_peak(torch.get_num_threads())
        for arch in args.arch:
            frames, crop = args.frames or geometry(arch)[0], args.crop or geometry(arch)[1]
            for profile in profiles[arch]:
                for batch in args.batch:
                    title = (f"### {arch}, {profile}, batch {batch}, {torch.get_num_threads()} thread(s), "
                             f"clip {frames}x{crop}x{crop}")
                    print(title, flush=True)
                    start = time.time()
                    table = run_model(arch, profile, args.block_sizes, batch, args.reps, runtimes, args, peak)
                    sections.append(f"{title} ({time.time() - start:.0f} s)\n\n{table}")
                    print('\n' + sections[-1] + '\n', flush=True)
    torch.set_num_threads(default_threads)
    if args.out:
        with open(args.out + '.tmp', 'w') as f:
            f.write('\n\n'.join(sections) + '\n')
        os.replace(args.out + '.tmp', args.out)
    return sections


def cpu_name():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def versions(runtimes, deepsparse_python):
    out = [f"torch {torch.__version__}"]
    for name in runtimes:
        if name in ('onnxruntime', 'openvino'):
            module = __import__(name)
            out.append(f"{name} {getattr(module, '__version__', '?')}")
    if 'deepsparse' in runtimes:
        out.append(f"deepsparse {deepsparse_version(deepsparse_python)} (its own venv)")
    return ', '.join(out)


if __name__ == '__main__':
    main()
