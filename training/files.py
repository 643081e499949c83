"""Every file of a run: atomic writes, the run directory's lock, the original's file names, and
where the baseline a pruning run starts from is found."""
import contextlib
import glob
import itertools
import json
import os
import re
import socket
import sys
import time

import torch
import torch.distributed as dist

import admm
from models import original_baseline

from .runtime import UserError, is_main, log, on_main_first


def write_failure(exc: BaseException) -> str | None:
    """What the file system said when a write failed: an OSError's reason (itself, or one that torch's
    writer wrapped in a RuntimeError), or the reason torch's own file writer reports; None for
    anything else."""
    inner = exc
    while inner is not None and not isinstance(inner, OSError):
        inner = inner.__cause__ or inner.__context__
    if inner is not None:
        return inner.strerror or str(inner)
    found = re.search(r'(?:open file failed with strerror|file write failed)(?::\s*(.*))?', str(exc))
    return (found.group(1) or 'the write failed (is the disk full?)').strip() if found else None


@contextlib.contextmanager
def written_atomically(path: str):
    """Yield a temporary name beside `path` to write; it becomes `path` by a rename when the block
    succeeds and is removed when it fails. A kill at any moment leaves the previous file intact (and
    a `.tmp{pid}` file that the next run in this folder removes). A write the file system refuses (a
    full disk, a read-only folder) is a UserError naming the file and the cause."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        cause = write_failure(exc)
        if cause is None:
            raise
        kept = " (its previous version is intact)" if os.path.exists(path) else ""
        raise UserError(f"could not write {path}: {cause}{kept}") from None
    finally:
        with contextlib.suppress(OSError):      # nothing to remove, or a file system that refuses: the error that
            os.remove(tmp)                      # matters is the one that stopped the write


SAVED = []          # what this process has saved, newest last (what an interrupted run says it kept)


def atomic_save(obj, path: str) -> None:
    """`torch.save` through `written_atomically`, synced to disk before the rename (rank 0 only)."""
    if not is_main():
        return
    with written_atomically(path) as tmp, open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    SAVED.append(path)


def _start_time(pid):
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(')', 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid, host=None, started=None):
    if host not in (None, socket.gethostname()):
        return True                          # another machine's process: we cannot tell, so assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or _start_time(pid) in (None, started)


def remove_stale_temporaries(folder: str) -> None:
    """Delete `*.tmp{pid}` files that a save killed half-way left behind (their process is gone)."""
    for path in glob.glob(os.path.join(glob.escape(folder), '*.tmp*')):
        found = re.search(r'\.tmp(\d+)$', path)
        if found and not _alive(int(found.group(1))):
            size = os.path.getsize(path)
            os.remove(path)
            log.info(f"removed {path} ({size / 2**20:.0f} MiB), left by a save that was killed")


class RunLock:
    """A lock file beside a run directory: the pid, host and command of the run writing there.
    A second run refuses to start; a lock whose process is gone is taken over."""
    held_locks = []            # released when main() ends, however it ends

    def __init__(self, path):
        self.path, self.held = path, False

    def acquire(self):
        me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': _start_time(os.getpid()),
              'since': time.strftime('%Y-%m-%d %H:%M:%S'), 'command': ' '.join(sys.argv)}
        os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if os.path.isdir(self.path):
                    raise UserError(f"{self.path} is a folder where this run keeps its lock file: move it") from None
                other = self._read()
                if other is None:            # being written by a run starting this instant
                    time.sleep(0.05)
                    continue
                if _alive(other.get('pid', -1), other.get('host'), other.get('started')):
                    raise UserError(
                        f"another run is writing here: pid {other.get('pid')} on {other.get('host')}, since "
                        f"{other.get('since')}: {other.get('command')}\n(lock file {self.path}). Wait for it to "
                        f"finish, or use another --ckpt-root; if that process is gone, delete the lock file")
                log.info(f"taking over the lock {self.path} of pid {other.get('pid')}, which no longer runs")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(me, f)
            self.held = True
            RunLock.held_locks.append(self)
            return
        raise UserError(f"could not take the lock {self.path}: it keeps changing; is another run starting?")

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            if time.time() - os.path.getmtime(self.path) > 10:     # unreadable and old: a dead writer's
                return {'pid': -1}
            return None

    def release(self):
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False
            RunLock.held_locks.remove(self)


def first_free(name_of) -> str:
    """`name_of(n)` for the smallest n >= 1 that names nothing on disk."""
    n = 1
    while os.path.exists(name_of(n)):
        n += 1
    return name_of(n)


class RunFiles:
    """Every file of a run, by the original's names.

    A pruning run lives in `{ckpt_root}/{dataset}_{arch}_{types}[-r{gM}c{gN}]/`; a baseline is
    `{ckpt_root}/{dataset}_{arch}_baseline...`. Trained results are renamed
    `{stem}_epoch-{E}_top1-{acc:.3f}.pt` at the end, never over an existing file.
    """

    def __init__(self, ckpt_root, name, folder, rho_num=None, distill=False, profiles=1):
        self.root, self.name, self.dir = ckpt_root, name, folder
        self.rho_num, self.distill, self.n_profiles = rho_num, distill, profiles
        self.lock = RunLock(os.path.join(ckpt_root, name + '.lock'))
        self.moved_to = None

    @classmethod
    def baseline(cls, ckpt_root, dataset, arch):
        return cls(ckpt_root, f"{dataset}_{arch}_baseline", ckpt_root)

    @classmethod
    def pruning(cls, ckpt_root, dataset, arch, sparsity_types, block_size, rho_num, distill=False):
        types = '+'.join(dict.fromkeys(sparsity_types))
        block = any(t in admm.BLOCK_TYPES for t in sparsity_types)
        name = f"{dataset}_{arch}_{types}" + (f"-r{block_size[0]}c{block_size[1]}" if block else "")
        return cls(ckpt_root, name, os.path.join(ckpt_root, name), rho_num, distill, len(sparsity_types))

    def path(self, file_name: str) -> str:
        return os.path.join(self.dir, file_name)

    def profile_copies(self, config_files) -> list:
        """Where the pruning phase keeps a copy of each profile, as the original: `{profile name}.yaml`
        in the run directory (retraining reads these copies)."""
        names = [os.path.basename(c)[:-5] if c.endswith('.yaml') else os.path.basename(c) for c in config_files]
        return [self.path(f"{n}.yaml" if names.index(n) == i else f"{n}_{i + 1}.yaml") for i, n in enumerate(names)]

    def stage(self, rho: float) -> str:
        return self.path(f"{self.name}_{rho:g}.pt")

    def resume(self, phase: str) -> str:
        """The resume point of admm and rew (a trained result's is `{stem}.pt`, see `claim`)."""
        return self.path(f"{self.name}_{phase}_last.pt")

    @property
    def rew(self):
        return self.path(f"{self.name}_rew.pt")

    def log(self, phase: str) -> str:
        return self.path(f"{self.name}.log" if phase == 'baseline' else f"{self.name}_{phase}.log")

    def tensorboard(self, phase: str) -> str:
        if phase == 'baseline':
            return os.path.join(self.root, 'tensorboard', self.name)
        return os.path.join(self.dir, 'tensorboard', 'retrain' if phase == 'masked_retrain' else phase)

    def result(self, method: str) -> str:
        """Stem of a trained model: the baseline, or the retrained model after `method` (admm:
        `{run}_{R}rhos`, the original's name; rew: `{run}_rew_retrained`; oneshot: `{run}_oneshot`)."""
        if method == 'baseline':
            return self.path(self.name)
        stem = {'admm': f"{self.name}_{self.rho_num}rhos", 'rew': f"{self.name}_rew_retrained",
                'oneshot': f"{self.name}_oneshot"}[method]
        return self.path(stem + ('_distill' if self.distill else ''))

    @staticmethod
    def result_files(stem: str) -> list:
        """Every file of a trained result: `{stem}.pt` (each epoch's model and resume point),
        `{stem}_best.pt` (renamed `{stem}_epoch-{E}_top1-{acc}.pt` at the end), the kept-group index,
        the per-epoch results and their plot."""
        named = [f"{stem}{suffix}" for suffix in ('.pt', '_best.pt', '_kept.npz', '_results.npz', '_results.pdf')]
        return [p for p in named if os.path.exists(p)] + finals(stem)

    def claim(self, stem: str, resume: bool) -> str:
        """The stem this run writes under. A new run never mixes its files with a result already
        there: it takes `{stem}_v2` (v3, ...) when any file of `stem` exists. --resume takes the
        newest stem with a resume point."""
        versions = [stem] + [f"{stem}_v{n}" for n in range(2, 10_000)]
        used = list(itertools.takewhile(self.result_files, versions))
        if resume:
            started = [s for s in used if os.path.isfile(s + '.pt')]
            return started[-1] if started else stem
        return versions[len(used)]

    def final(self, stem: str, epoch: int, top1: float) -> str:
        """`{stem}_epoch-{E}_top1-{acc}.pt`, or `{stem}_v2_epoch-...` (v3, ...) if that exists."""
        return first_free(lambda n: f"{stem}{f'_v{n}' if n > 1 else ''}_epoch-{epoch}_top1-{top1:.3f}.pt")

    def start(self, fresh: bool) -> None:
        """Take the lock, then (fresh pruning run) move an existing directory aside to
        `_v1`, `_v2`, ..., create the directory and remove what killed saves left."""
        def action():
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise UserError(f"--ckpt-root {self.root} is a file, not a folder: pass a folder (it is created if "
                                f"missing)")
            self.lock.acquire()
            if fresh and self.dir != self.root and os.path.isdir(self.dir):
                self.moved_to = first_free(lambda n: f"{self.dir}_v{n}")
                os.rename(self.dir, self.moved_to)
            os.makedirs(self.dir, exist_ok=True)
        self.moved_to = None
        on_main_first(action)
        if dist.is_initialized():
            dist.barrier()

    def tidy(self):
        if is_main():
            remove_stale_temporaries(self.dir)
            if self.moved_to:
                log.info(f"moved the previous run aside to {self.moved_to}")


def finals(stem: str) -> list:
    """The finished results `{stem}_epoch-{E}_top1-{acc}.pt` on disk."""
    return sorted(glob.glob(glob.escape(stem) + '_epoch-*_top1-*.pt'))


def find_baseline(ckpt_root: str, dataset: str, arch: str, data_location: str) -> str:
    """The original's baseline file if present, else the newest baseline this tool trained."""
    original = original_baseline(arch, dataset)
    if original and os.path.isfile(os.path.join(ckpt_root, original)):
        return os.path.join(ckpt_root, original)
    trained = f"{dataset}_{arch}_baseline_*epoch-*_top1-*.pt"
    pattern = os.path.join(ckpt_root, trained)
    ours = sorted(glob.glob(os.path.join(glob.escape(ckpt_root), trained)), key=os.path.getmtime)
    if ours:
        return ours[-1]
    looked = ([os.path.join(ckpt_root, original)] if original else []) + [pattern]
    raise UserError(
        f"no baseline checkpoint for {dataset} / {arch}: looked for {' and '.join(looked)}.\n"
        f"Download the original's baseline into {ckpt_root}/ (docs/models_and_data.md, 'The original's baseline "
        f"files'), pass --load-path PATH, or train one: python opt_main.py --baseline --arch {arch} "
        f"--dataset {dataset} --data_location {data_location}")
