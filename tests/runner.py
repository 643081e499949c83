"""Running opt_main.py as a user does, on a tiny generated dataset at 16x16x16 (see conftest.py)."""
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = 'ucf101_c3d_blk-kgs-r8c4'
GEOMETRY = ['--arch', 'c3d', '--num-classes', '5', '--crop-size', '16', '--scale-size', '18', '--batch-size', '4',
            '--workers', '0', '--seed', '3', '--log-interval', '1']


def run(*args, check=True, env=None, timeout=600):
    """`python opt_main.py ARGS`; with check, assert it succeeded (showing its output if not)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'opt_main.py'), *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def kill_when_logged(*args, log, marker='epoch 2 batch 1/', timeout=300):
    """Start `python opt_main.py ARGS` and kill it (SIGKILL, no chance to save) as soon as `log` holds
    `marker`; by default, when the second epoch has started."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'opt_main.py'), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and marker in open(log).read():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def fails_cleanly(out, *expected, code=1):
    """The run stopped with one `error:` line (no traceback) holding every expected text."""
    text = out.stdout + out.stderr
    assert out.returncode == code, text[-3000:]
    assert 'Traceback' not in text, text[-3000:]
    assert 'error:' in text, text[-3000:]
    for e in expected:
        assert e in text, (e, text[-3000:])
    return text


def make_data(root):
    """Five classes of 2 training and 1 test videos, through the real extraction and LMDB tools."""
    from dataset.make_synthetic import make_dataset
    make_dataset(root, preset='motion', videos_per_class=2, test_per_class=1, frames=20, height=24, width=32)
    tools = os.path.join(ROOT, 'dataset')
    for cmd in (['extract_videos.py', '-d', 'ucf101', '--root', str(root), '--short-side', '0', '-j', '2'],
                ['create_lmdb.py', '-d', str(root / 'ucf101_frame'), '-s', 'train'],
                ['create_lmdb.py', '-d', str(root / 'ucf101_frame'), '-s', 'val']):
        subprocess.run([sys.executable, os.path.join(tools, cmd[0]), *cmd[1:]], check=True, capture_output=True)
    return str(root)
