"""bench.py, the script behind the README's speed tables: a smoke test on its tiny shape (the numbers themselves are
machine-dependent and not checked here), its input check, and the peak-RSS reading of its PPO table."""

import math
import sys

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
    assert ppo["generate"] > 0 and ppo["update"] > 0 and 0 < ppo["peak_rss_gib"] < 4


def test_sections_are_checked_before_any_work(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the sections were checked")
    monkeypatch.setattr(bench, "GPT", no_model)
    with pytest.raises(ConfigError, match=r"unknown sections \['foo'\]"):
        bench.main(bench.Config(quick=True, sections="sampling, foo"))


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_peak_rss_is_the_child_process_own():
    """The PPO rows run in a spawned child; a child inherits its parent's getrusage peak across fork + exec, so the
    table reads VmHWM. Here the parent touches 1 GiB first: the child must not report it."""
    big = bytearray(2**30)
    big[::4096] = b"x" * len(big[::4096])  # touch every page: resident, not just reserved
    assert bench.peak_rss_gib() > 1.0
    child = bench.run_in_child(bench.peak_rss_gib)
    assert 0 < child < 0.5, child
    del big


def test_best_times_reports_the_page_faults_of_each_best_call():
    """A call that touches 16 MB of fresh pages (an anonymous mmap: the kernel hands out every page at first touch,
    whatever malloc is told) shows ~4k minor faults; one that touches nothing shows ~0."""
    import mmap
    pytest.importorskip("resource")

    def fresh_pages(n=16 << 20):
        m = mmap.mmap(-1, n)
        for i in range(0, n, mmap.PAGESIZE):
            m[i] = 1
        m.close()

    faults = []
    bench.best_times([fresh_pages, lambda: None], 2, faults)
    assert faults[0] >= (16 << 20) // mmap.PAGESIZE * 0.9 and faults[1] < 100, faults
