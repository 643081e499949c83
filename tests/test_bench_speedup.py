"""bench/bench_speedup.py: speedups are taken against the fastest dense runtime of the same run, the
runtimes are timed in turn, and a small run prints both tables with PyTorch and onnxruntime."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bench'))
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
