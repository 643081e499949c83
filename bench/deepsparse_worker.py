"""DeepSparse timings for bench_speedup.py, run with the Python of a separate DeepSparse venv
(deepsparse 1.8 pins onnx < 1.15 and numpy < 2; docs/benchmarks.md has the setup).

    python deepsparse_worker.py --threads 2 --input clip.npy dense=/tmp/dense.onnx slim=/tmp/slim.onnx

Compiles each ONNX file (`--threads` cores; `compiling NAME` before and `compiled NAME SECONDS` after
each, on stdout, so a compiler crash names its graph), prints `ready {"name": [input shape], ...}`,
then answers each line on stdin: `time NAME` with the seconds one inference took, `output NAME` with
its first output as a JSON list, `quit` (or the end of stdin) stops. So the caller can put DeepSparse
in the same round-robin as its other runtimes. The input is `--input` (a .npy file, the caller's clip),
else random at the graph's static shape with `--batch` clips. With `--reps N` it runs the files
round-robin itself instead and prints `{"name": median seconds}` as JSON.
Needs the DeepSparse venv only (deepsparse, onnx, numpy; no torch, nothing of the project).
"""
import argparse
import json
import os
import statistics
import sys
import time

# DeepSparse would report usage over the network; the bench machine has none and wants no delays.
os.environ.setdefault('NM_DISABLE_ANALYTICS', '1')

import numpy as np  # noqa: E402
from deepsparse import compile_model  # noqa: E402


def parse_file(text):
    name, sep, path = text.partition('=')
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=PATH.onnx")
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: no such ONNX file")
    return name, path


def input_shape(path, batch):
    """The static shape of the graph's one input, with `batch` as its first dimension."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    initialised = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialised]
    if len(inputs) != 1:
        raise SystemExit(f"{path}: expected one input, found {[i.name for i in inputs]}")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if not all(dims[1:]):
        raise SystemExit(f"{path}: input {inputs[0].name} has a dynamic shape {dims}; export it at a fixed shape")
    return [batch] + dims[1:]


def timed(engine, feed):
    start = time.perf_counter()
    engine.run(feed)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('files', nargs='+', type=parse_file, help='NAME=PATH.onnx')
    p.add_argument('--threads', type=int, required=True, help='cores DeepSparse may use (num_cores)')
    p.add_argument('--input', help='.npy file of the input (float32); default random at the static shape')
    p.add_argument('--batch', type=int, default=1, help='clips of the random input (without --input)')
    p.add_argument('--reps', type=int, help='run round-robin here, print medians and exit')
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    given = np.ascontiguousarray(np.load(args.input, allow_pickle=False), dtype=np.float32) if args.input else None
    engines, feeds, shapes = {}, {}, {}
    for name, path in args.files:
        start = time.time()
        print(f"compiling {name}", flush=True)           # names the graph if the compiler crashes
        shapes[name] = input_shape(path, args.batch) if given is None else list(given.shape)
        engines[name] = compile_model(path, batch_size=shapes[name][0], num_cores=args.threads)
        feeds[name] = [rng.standard_normal(shapes[name], dtype=np.float32) if given is None else given]
        engines[name].run(feeds[name])                       # warm-up outside the caller's clock
        print(f"compiled {name} {time.time() - start:.1f}", flush=True)
    if args.reps:
        times = {name: [] for name in engines}
        for _ in range(args.reps):
            for name in engines:
                times[name].append(timed(engines[name], feeds[name]))
        print(json.dumps({name: statistics.median(t) for name, t in times.items()}))
        return
    print('ready ' + json.dumps(shapes), flush=True)
    for line in sys.stdin:
        command, _, name = line.strip().partition(' ')
        if command == 'quit':
            break
        if command not in ('time', 'output') or name not in engines:
            print(f"error {line.strip()!r}: write `time NAME`, `output NAME` or `quit`; NAME one of "
                  f"{', '.join(engines)}", flush=True)
        elif command == 'time':
            print(f"{timed(engines[name], feeds[name]):.9f}", flush=True)
        else:
            print(json.dumps(engines[name].run(feeds[name])[0].ravel().tolist()), flush=True)

if __name__ == '__main__':
    main()
