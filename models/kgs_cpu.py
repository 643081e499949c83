"""The compiled KGS convolution for the CPU (models/csrc/kgs_cpu.cpp), built at first use.

    from models import kgs_cpu
    if kgs_cpu.available():
        kernel = kgs_cpu.pack(conv.weight, block_rows=8, bias=conv.bias, stride=1, padding=1)
        y = kgs_cpu.conv(x, kernel)                  # == F.conv3d(x, conv.weight, conv.bias, 1, 1)
    else:
        print(kgs_cpu.why_unavailable())

The C++ source is compiled once per source version and instruction set by
`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja) and cached in PyTorch's
extensions folder (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions). The instruction set
follows this CPU: AVX-512, AVX2 + FMA, or portable C++ (`RT3D_KGS_ISA=avx512|avx2|portable`
overrides it). `RT3D_NO_COMPILED_KGS=1` turns the compiled path off. docs/kgs_kernel.md has the design.
"""
import hashlib
import logging
import os
import threading
import time

import torch

log = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'kgs_cpu.cpp')
FLAGS = {'avx512': ['-mavx512f', '-mavx2', '-mfma'], 'avx2': ['-mavx2', '-mfma'], 'portable': []}
# at::parallel_for runs its threads through OpenMP only where the extension itself is compiled with it
# (without, every call runs on one thread); the library is the one PyTorch loaded (same soname).
OPENMP = ['-fopenmp']

_state = {}              # 'module' or 'error', once tried
_build_lock = threading.Lock()
_peaks = {}
_highest = {}    # (threads, clock): highest_fma_peak's running maximum


def isa():
    """The instruction set the kernel is built for: `RT3D_KGS_ISA` if set, else the best this CPU has."""
    forced = os.environ.get('RT3D_KGS_ISA', '').strip().lower()
    if forced:
        if forced not in FLAGS:
            raise ValueError(f"RT3D_KGS_ISA={forced!r}: choose one of {', '.join(FLAGS)}")
        return forced
    capability = torch.backends.cpu.get_cpu_capability()     # what ATen detected: AVX512 needs F, BW, VL, DQ
    return {'AVX512': 'avx512', 'AVX2': 'avx2'}.get(capability, 'portable')


def _disabled():
    return os.environ.get('RT3D_NO_COMPILED_KGS', '').strip() not in ('', '0')


def _load():
    """The compiled extension, building it on first use; None (and the reason kept) if it cannot be had."""
    if _disabled():
        return None
    if 'module' in _state or 'error' in _state:
        return _state.get('module')
    with _build_lock:
        if 'module' in _state or 'error' in _state:
            return _state.get('module')
        try:
            target = isa()
            quiet = logging.getLogger('torch.utils.cpp_extension')      # its import warns about CUDA_HOME
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                from torch.utils import cpp_extension
            finally:
                quiet.setLevel(level)
            start = time.perf_counter()
            try:
                module = _build(cpp_extension, target, OPENMP)
            except Exception as exc:      # a compiler without OpenMP (Apple's clang): one thread, said once
                try:
                    module = _build(cpp_extension, target, [])
                except Exception:
                    raise exc from None
                log.warning(f"compiled KGS kernel built without OpenMP ({_first_error(exc)}): it runs on one thread")
            seconds = time.perf_counter() - start
            if seconds > 1:
                log.info(f"compiled KGS kernel ({target}) built in {seconds:.0f} s")
            _state['module'] = module
        except Exception as exc:          # no compiler, no ninja, a failed build: the torch path runs instead
            log.debug(f"building {SOURCE} failed:\n{exc}")
            _state['error'] = f"the C++ extension could not be built: {_first_error(exc)}"
    return _state.get('module')


def _build(cpp_extension, target, openmp):
    with open(SOURCE, 'rb') as f:
        digest = hashlib.sha256(f.read() + ' '.join(openmp + FLAGS[target]).encode()).hexdigest()[:12]
    return cpp_extension.load(name=f'rt3d_kgs_cpu_{target}_{digest}', sources=[SOURCE],
                              extra_cflags=['-O3', *openmp, *FLAGS[target]], extra_ldflags=openmp, verbose=False)


def _first_error(exc):
    """The line of a build failure that says what went wrong (the compiler's first error), not ninja's last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for marks in (('error:', 'fatal error'), ('not found', 'no such file', 'required', 'error')):
        found = [line for line in lines if any(m in line.lower() for m in marks)]
        if found:
            return found[0][:300]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def available():
    """True when the compiled kernel can run here (built now if needed)."""
    return _load() is not None


def why_unavailable():
    """Why the compiled kernel cannot run (no compiler, build failed, disabled), or None if it can."""
    if _disabled():
        return 'disabled by the environment variable RT3D_NO_COMPILED_KGS'
    _load()
    return _state.get('error')


def log_unavailable_once():
    """One log line per process saying why the compiled kernel cannot run (its callers then use torch ops)."""
    if not _state.get('logged'):
        _state['logged'] = True
        log.warning(f"compiled KGS kernel not available ({why_unavailable()}): KGS layers run as KGSConv3d "
                    f"(torch ops)")


def _required(what):
    """The compiled module, or a RuntimeError that starts with `what` and says why it is not available."""
    module = _load()
    if module is None:
        raise RuntimeError(f"{what}: {why_unavailable()}")
    return module


def fma_peak_gmacs(threads=None, cached=True):
    """Measured FMA peak of this CPU in GMAC/s: a register-only FMA loop (about 10 ms) on `threads`
    threads (default torch.get_num_threads()), best of three; cached per thread count unless not `cached`
    (then one run, for benchmarks that measure it between their own runs on a busy machine). Every
    reading also counts towards `highest_fma_peak`."""
    module = _required("fma_peak_gmacs needs the compiled kernel")
    threads = int(threads or torch.get_num_threads())
    if not cached:
        reading = module.fma_peak_gmacs(threads, 1)
        highest_fma_peak(threads, [reading])
        return reading
    if threads not in _peaks:
        _peaks[threads] = module.fma_peak_gmacs(threads, 3)
        highest_fma_peak(threads, [_peaks[threads]])
    return _peaks[threads]


def highest_fma_peak(threads=None, readings=(), clock='wall'):
    """The highest FMA peak in GMAC/s read in this process on `threads` threads (default
    torch.get_num_threads()): every `fma_peak_gmacs` reading (wall clock) and `readings` given here, kept
    apart per `clock` (a benchmark may time the probe by the process's CPU time instead); 0.0 before any.
    Benchmarks take shares of the peak against it: the CPU's peak does not change within a run, a low
    reading is other load on the machine (on a virtual machine a probe can read half), and a share taken
    against a low reading reads high (over 100% seen)."""
    key = (int(threads or torch.get_num_threads()), clock)
    _highest[key] = max([_highest.get(key, 0.0), *map(float, readings)])
    return _highest[key]


def keep_outputs_up_to(nbytes):
    """Keep at most `nbytes` of output buffers between calls, all compiled convs of the process together
    (default 1 GiB); returns the previous bound. Each compiled conv keeps its last output and writes the
    next one into it once the caller holds no tensor on it (a fresh buffer of a few MB costs page
    faults, up to a third of a call); past the bound, further outputs go with the caller."""
    return _required("keep_outputs_up_to needs the compiled kernel").keep_outputs_up_to(int(nbytes))


def kept_output_bytes():
    """Bytes of output buffers the compiled convs of this process keep now (see `keep_outputs_up_to`)."""
    return _required("kept_output_bytes needs the compiled kernel").kept_output_bytes()


def parallel_threads():
    """Threads the kernel's parallel loops really run on (torch.get_num_threads() where it is built
    with OpenMP, 1 where not)."""
    return _required("parallel_threads needs the compiled kernel").parallel_threads()


def _triple(v):
    return [int(a) for a in v] if isinstance(v, (tuple, list)) else [int(v)] * 3


def pack(weight, block_rows, bias=None, stride=1, padding=0, dilation=1, relu=False, pool=False):
    """The kernel for one Conv3d: the kept columns of each block of `block_rows` filters of `weight`
    (O, I, kT, kH, kW) and their weights, packed for the tiles. Zero columns are never run. `relu`:
    the ReLU that follows the conv is applied as the outputs are stored; `pool`: and then a max pool
    of kernel and stride (1, 2, 2), which halves H and W (rounded down)."""
    module = _required("the compiled KGS kernel is not available")
    weight = weight.detach().to('cpu', torch.float32)
    bias = None if bias is None else bias.detach().to('cpu', torch.float32)
    return module.KGSKernel(weight, bias, int(block_rows), _triple(stride), _triple(padding), _triple(dilation),
                            bool(relu), bool(pool))


def conv(x, kernel):
    """The convolution of `x` (N, I, T, H, W), float32 on the CPU, by a kernel from `pack`."""
    return kernel.forward(x)


def max_pool3d(x, kernel_size, stride=None, padding=0, dilation=1):
    """`F.max_pool3d(x, ...)` (floor mode, no indices) of a float32 CPU input, by the compiled kernel."""
    module = _required("the compiled kernel is not available")
    kernel_size = _triple(kernel_size)
    stride = kernel_size if stride is None else _triple(stride)
    return module.max_pool3d(x, kernel_size, stride, _triple(padding), _triple(dilation))
