"""bench/bench_speedup.py: speedups are taken against the fastest dense runtime of the same run, the
runtimes are timed in turn, shares of the FMA peak are against the highest reading of the run (here and
in bench/bench_kgs_layers.py), and a small run prints both tables with PyTorch and onnxruntime."""
import os
import re
import sys

import pytest
import torch
import torch.nn as nn

import admm

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


def test_per_conv_shares_are_against_the_highest_peak_read_so_far_in_the_run():
    # A probe that reads low (the machine's other load) must not lower the peak the shares are taken against.
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, padding=1)).eval()
    pruned = bench_speedup.copy.deepcopy(dense)
    with torch.no_grad():
        pruned[2].weight.copy_(admm.project(pruned[2].weight, 0.5, 'blk-kgs', (8, 4)))
    pruned.block = (8, 4)
    readings = iter([5.0, 8.0, 40.0, 20.0])          # two rounds (warm-up and timed) per conv
    table, highest = bench_speedup.layer_table(dense, {'8x4': pruned}, None, torch.randn(1, 3, 4, 8, 8), 1,
                                               10.0, probe=lambda: next(readings))
    assert highest == 40.0
    assert next(readings, None) is None                 # probed in both convs' rounds
    rows = [line for line in table.splitlines() if line.startswith('| 0 ') or line.startswith('| 2 ')]
    assert len(rows) == 2 and 'dense' in rows[0] and 'x, kept' in rows[1]
    for row, peak in zip(rows, (10.0, 40.0)):        # conv 0: its readings 5 and 8 are below the start's 10
        for gmacs, share in re.findall(r'ms, ([\d.]+) \((\d+)%\)', row):
            assert abs(int(share) - 100 * float(gmacs) / peak) <= 1.5, (row, peak)


def test_bench_kgs_layers_keeps_the_highest_peak_per_thread_count_and_clock():
    bench_kgs_layers._highest.clear()
    assert bench_kgs_layers.highest_peak(2, 'wall', [50.0, 90.0]) == 90.0
    assert bench_kgs_layers.highest_peak(2, 'wall', [45.0]) == 90.0              # a low reading later
    assert bench_kgs_layers.highest_peak(1, 'wall', [46.0]) == 46.0              # per thread count
    assert bench_kgs_layers.highest_peak(2, 'cpu', [60.0]) == 60.0               # and clock
    assert bench_kgs_layers.highest_peak(2, 'wall', []) == 90.0
