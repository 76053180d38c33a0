"""bench.py, the script behind the README's speed tables: a smoke test on its tiny shape (the numbers themselves are
machine-dependent and not checked here), and its one input check."""

import math

import pytest

import bench
from common import ConfigError


def test_quick_bench_fills_every_table():
    r = bench.main(bench.Config(quick=True, dtypes="float32", repeats=1))
    assert list(r) == ["bench_sampling", "bench_scaling", "bench_train", "bench_ppo"]
    sampling, train = r["bench_sampling"]["float32"], r["bench_train"]["float32"]
    assert sampling["speedup"] > 0 and math.isfinite(sampling["speedup"])
    assert 0 < train["ours_mfu"] and math.isfinite(train["speedup"])
    assert sorted(n for _, n in r["bench_scaling"]) == [4, 8, 16] and all(t > 0 for t in r["bench_scaling"].values())
    ppo = r["bench_ppo"]["float32"]
    assert ppo["generate"] > 0 and ppo["update"] > 0
    # the PPO run's own peak (a fresh process), not this test process's: a tiny PPO run stays far below 4 GiB
    assert 0.05 < ppo["peak_rss_gib"] < 4


def test_unknown_section_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown sections \\['foo'\\]"):
        bench.main(bench.Config(quick=True, sections="sampling,foo"))
