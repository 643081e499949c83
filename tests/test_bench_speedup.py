"""bench/bench_speedup.py: speedups are taken against the fastest dense runtime of the same run, the
runtimes are timed in turn, shares of the FMA peak are against the highest reading of the run (here and
in bench/bench_kgs_layers.py), and a small run prints both tables with PyTorch and onnxruntime."""
import functools
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import admm
from models import kgs_cpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
import bench_kgs_layers  # noqa: E402
import bench_speedup  # noqa: E402


def test_every_ratio_is_against_the_fastest_dense_runtime():
    times = {('dense', 'torch'): 0.900, ('dense', 'onnxruntime'): 0.500, ('dense', 'openvino'): 0.400,
             ('KGS all', 'torch'): 0.500, ('KGS all', 'openvino'): 0.300, ('slim filter', 'torch'): 0.200}
    reductions = {'dense': 1.0, 'KGS all': 3.5, 'slim filter': 3.4}
    table, lines = bench_speedup.whole_table(times, reductions, {}, ['torch', 'onnxruntime', 'openvino'])
    rows = {line.split(' | ')[0].strip('| '): line.split(' | ') for line in table.splitlines()[2:]}
    assert rows['dense'][2:5] == ['900 (0.44x)', '500 (0.80x)', '**400 (1.00x)**']      # 0.4 / 0.9, 0.4 / 0.5
    assert rows['KGS all'][2:5] == ['500 (0.80x)', '', '300 (1.33x)']
    assert lines[0] == 'fastest dense runtime: OpenVINO, 400 ms'
    assert 'KGS all: fast form vs fastest dense runtime: 0.80x' in lines[1]
    assert 'slim filter: fast form vs fastest dense runtime: 2.00x' in lines[2]
    assert lines[3] == ('fastest pruned model: slim filter (fast form) in PyTorch, 200 ms: '
                        '2.00x the fastest dense runtime')


def test_runtimes_are_timed_in_turn_and_the_warm_up_round_is_not_counted():
    calls = []
    given = {'a': iter([9.0, 1.0, 3.0, 2.0]), 'b': iter([9.0, 5.0, 4.0, 6.0])}

    def timer(name):
        return lambda: calls.append(name) or next(given[name])

    medians = bench_speedup.round_robin({'a': timer('a'), 'b': timer('b')}, reps=3, pause=0)
    assert calls == ['a', 'b'] * 4
    assert medians == {'a': 2.0, 'b': 5.0}


def test_the_default_profile_is_the_all_convs_one_where_it_exists(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_speedup.admm, 'PROFILE_DIR', str(tmp_path))
    assert bench_speedup.default_profile('c3d_3.57x') == 'c3d_3.57x'
    (tmp_path / 'c3d_3.57x_all-convs.yaml').write_text('prune_ratios: {}\n')
    assert bench_speedup.default_profile('c3d_3.57x') == 'c3d_3.57x_all-convs'


@pytest.mark.e2e
def test_a_small_run_prints_both_tables_with_pytorch_and_onnxruntime(tmp_path):
    out = tmp_path / 'speed.md'
    bench_speedup.main(['--arch', 'c3d', '--crop', '16', '--block-sizes', 'all', '--runtimes', 'torch', 'onnxruntime',
                        '--reps', '1', '--pause', '0', '--threads', '1', '--out', str(out)])
    text = out.read_text()
    assert '| conv2 | (64, 16, 8, 8) |' in text                       # per conv, C3D's second conv at 16x16
    assert 'GMAC/s' in text and 'thread(s)' in text
    header = next(line for line in text.splitlines() if line.startswith('| model |'))
    assert 'onnxruntime ms' in header and 'OpenVINO' not in header and 'DeepSparse' not in header
    assert 'KGS all: fast form vs fastest dense runtime: ' in text
    assert 'slim filter: fast form vs fastest dense runtime: ' in text
    assert '**WARNING**' not in text                                  # onnxruntime's outputs match PyTorch's


def test_per_conv_shares_are_against_the_highest_peak_read_so_far_in_the_run(monkeypatch):
    # A probe that reads low (the machine's other load) must not lower the peak the shares are taken against.
    # The probe's readings go where fma_peak_gmacs puts its own (test below): kgs_cpu.highest_fma_peak.
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1)).eval()
    pruned = bench_speedup.copy.deepcopy(dense)
    with torch.no_grad():
        pruned[2].weight.copy_(admm.project(pruned[2].weight, 0.5, 'blk-kgs', (8, 4)))
    pruned.block = (8, 4)
    threads = 1001                                    # a thread count no other test reads the peak of
    readings = iter([5.0, 8.0, 40.0, 20.0])          # two rounds (warm-up and timed) per conv
    monkeypatch.setattr(kgs_cpu, '_highest', {})
    kgs_cpu.highest_fma_peak(threads, [10.0])        # the run's first reading
    table, highest = bench_speedup.layer_table(dense, {'8x4': pruned}, None, torch.randn(1, 3, 4, 8, 8), 1,
                                               functools.partial(kgs_cpu.highest_fma_peak, threads),
                                               probe=lambda: kgs_cpu.highest_fma_peak(threads, [next(readings)]))
    assert highest == 40.0
    assert next(readings, None) is None                 # probed in both convs' rounds
    rows = [line for line in table.splitlines() if line.startswith('| 0 ') or line.startswith('| 2 ')]
    assert len(rows) == 2 and 'dense' in rows[0] and 'x, kept' in rows[1]
    for row, peak in zip(rows, (10.0, 40.0)):        # conv 0: its readings 5 and 8 are below the start's 10
        for gmacs, share in re.findall(r'ms, ([\d.]+) \((\d+)%\)', row):
            assert abs(int(share) - 100 * float(gmacs) / peak) <= 1.5, (row, peak)


def test_the_highest_peak_is_kept_per_thread_count_and_clock(monkeypatch):
    monkeypatch.setattr(kgs_cpu, '_highest', {})
    assert kgs_cpu.highest_fma_peak(2) == 0.0                                   # nothing read yet
    assert kgs_cpu.highest_fma_peak(2, [50.0, 90.0]) == 90.0
    assert kgs_cpu.highest_fma_peak(2, [45.0]) == 90.0              # a low reading later
    assert kgs_cpu.highest_fma_peak(1, [46.0]) == 46.0              # per thread count
    assert kgs_cpu.highest_fma_peak(2, [60.0], 'cpu') == 60.0       # and clock
    assert kgs_cpu.highest_fma_peak(2) == 90.0
    # every reading of fma_peak_gmacs counts, cached or not (its compiled loop replaced by fixed readings)
    readings = iter([120.0, 70.0])
    monkeypatch.setitem(kgs_cpu._state, 'module', SimpleNamespace(fma_peak_gmacs=lambda t, runs: next(readings)))
    monkeypatch.setattr(kgs_cpu, '_peaks', {})
    assert kgs_cpu.fma_peak_gmacs(2, cached=False) == 120.0
    assert kgs_cpu.fma_peak_gmacs(3) == 70.0
    assert kgs_cpu.highest_fma_peak(2) == 120.0 and kgs_cpu.highest_fma_peak(3) == 70.0
    # bench_kgs_layers' rounds give the highest of the run, not of their own probes
    monkeypatch.setattr(bench_kgs_layers.kgs_cpu, 'fma_peak_gmacs', lambda t, cached=True: 30.0)
    times, peak = bench_kgs_layers.timed_rounds([lambda: None], 1, 2)
    assert peak == 120.0 and len(times) == 1


def test_the_share_of_kept_macs_on_t_padding_is_counted_by_output_plane():
    weight = torch.zeros(2, 1, 3, 1, 1)
    weight[0, 0, 0] = weight[1, 0, 0] = weight[0, 0, 1] = 1.0     # 2 weights on kernel plane 0, 1 on plane 1
    # 2 frames, padding 1: 2 output planes; plane 0 of the kernel reads the padding at output plane 0 only
    assert bench_kgs_layers.t_padding_share(weight, 2, (1, 1, 1), (1, 1, 1), (1, 1, 1)) == 2 * 1 / (3 * 2)
    # 4 frames, stride 2: output planes 0 and 1 read frames -1, 0, 1 and 1, 2, 3
    ones = torch.ones(1, 1, 3, 1, 1)
    assert bench_kgs_layers.t_padding_share(ones, 4, (2, 1, 1), (1, 0, 0), (1, 1, 1)) == 1 / 6
    assert bench_kgs_layers.t_padding_share(ones, 4, (1, 1, 1), (0, 0, 0), (1, 1, 1)) == 0
