"""bench.py, the script behind docs' speed tables. Its numbers are machine-dependent and not checked here; what is
checked holds on any machine: the tables have the rows and keys asked for, every printed ratio and rate is the one
its printed times give, the header names the CPU, best_times keeps each function's fastest call (and its page
faults), and the PPO table's peak RSS is the child process's own."""

import sys
from types import SimpleNamespace

import pytest

import bench
import speedups
from common import ConfigError
from model import GPT, GPTConfig


def table(out, title):
    """The rows of the printed table whose "## " title starts with `title`: lists of whitespace-separated cells, the
    column header row and any note lines left out."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## " + title))
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        if not line.startswith(" "):  # "  (...)" lines are notes
            rows.append(line.split())
    return rows


def close(printed, value, decimals):
    """A number printed with `decimals` decimals is `value`, rounded."""
    return abs(float(printed.rstrip("x%")) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-9)


def cpu_from_proc():
    """The model name and the AVX-512 BF16 / AMX flags of /proc/cpuinfo's first CPU, read here independently."""
    with open("/proc/cpuinfo") as f:
        lines = f.read().split("\n\n")[0].splitlines()
    value = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return value["model name"], {flag: flag in value["flags"].split() for flag in ("avx512_bf16", "amx_bf16",
                                                                                    "amx_tile")}


def test_quick_bench_tables(capsys):
    r = bench.main(bench.Config(quick=True, dtypes="float32", repeats=1))
    out = capsys.readouterr().out
    assert list(r) == ["bench_sampling", "bench_scaling", "bench_train", "bench_ppo"]
    q = bench.QUICK

    # header: the model shape, and the CPU with its bf16 features
    header = out.splitlines()[0]
    assert header.startswith("# bench: ") and f"n_layer {q['n_layer']}, n_head {q['n_head']}" in header
    if sys.platform == "linux":
        name, flags = cpu_from_proc()
        assert f"CPU {name} (" in header
        for flag, has in flags.items():
            assert f"{flag} {'yes' if has else 'no'}" in header, flag

    # sampling: one row per dtype; tok/s = batch x new tokens / s; speedup = HF s / ours s
    (row,) = table(out, "sampling")
    s = r["bench_sampling"]["float32"]
    assert row[0] == "float32" and set(s) == {"ours_tok_s", "hf_tok_s", "speedup"}
    n = q["batch_size"] * q["max_new_tokens"]
    assert close(row[1], s["ours_tok_s"], 1) and close(row[2], s["hf_tok_s"], 1)
    assert close(row[3], n / s["ours_tok_s"], 3) and close(row[4], n / s["hf_tok_s"], 3)
    assert close(row[5], s["speedup"], 2) and s["speedup"] == pytest.approx(s["ours_tok_s"] / s["hf_tok_s"])

    # scaling: one row per new-token count; ms/token = 1000 x s / new tokens
    rows = table(out, "ours, scaling")
    counts = [int(c) for c in q["scaling"].split(",")]
    assert [int(row[0]) for row in rows] == counts and set(r["bench_scaling"]) == {("float32", c) for c in counts}
    for row, c in zip(rows, counts, strict=True):
        t = r["bench_scaling"]["float32", c]
        assert close(row[1], t, 3) and close(row[2], 1000 * t / c, 2)

    # train: tok/s = batch x tokens / s; speedup = HF s / ours s
    (row,) = table(out, "one SFT training step")
    t = r["bench_train"]["float32"]
    assert row[0] == "float32" and set(t) == {"ours_s", "hf_s", "ours_mfu", "speedup"}
    tokens = q["batch_size"] * 16 * q["prompt_len"]
    assert close(row[2], t["ours_s"], 3) and close(row[3], t["hf_s"], 3)
    assert close(row[4], tokens / t["ours_s"], 0) and close(row[5], tokens / t["hf_s"], 0)
    assert close(row[8], t["hf_s"] / t["ours_s"], 2) and t["speedup"] == pytest.approx(t["hf_s"] / t["ours_s"])
    # MFU = sft_step_flops of this shape / time / the printed peak (within the rounding of its 2 printed decimals)
    B, T = q["batch_size"], 16 * q["prompt_len"]
    block_params = sum(p.numel() for n, p in GPT(GPTConfig(**{k: q[k] for k in ("n_layer", "n_head", "n_embd",
                                                                             "block_size")})).named_parameters()
                       if n.startswith("h."))
    flops = bench.sft_step_flops(SimpleNamespace(n_layer=q["n_layer"], n_embd=q["n_embd"], vocab_size=50257),
                                 block_params, B, T, B * (T - T // 2))
    peaks = [(float(row[1]) + d) * 1e12 for d in (0.005, -0.005)]
    assert flops / t["ours_s"] / peaks[0] - 5e-4 <= t["ours_mfu"] <= flops / t["ours_s"] / peaks[1] + 5e-4
    assert close(row[6], 100 * t["ours_mfu"], 1)

    # ppo: the phases add up to the total; tok/s = 8 x 32 response tokens / total
    (row,) = table(out, "one PPO iteration")
    p = r["bench_ppo"]["float32"]
    assert row[0] == "float32" and set(p) == {"generate", "score", "forward", "update", "peak_rss_gib"}
    phases = [p[k] for k in ("generate", "score", "forward", "update")]
    assert all(close(cell, x, 2) for cell, x in zip(row[1:5], phases, strict=True))
    assert close(row[5], sum(phases), 2) and close(row[6], 8 * 32 / sum(phases), 1)
    assert close(row[7], p["peak_rss_gib"], 2) and row[8] == "GiB"


def test_scaling_table_has_the_rows_and_columns_asked_for(capsys):
    """Also: ours is timed with the CPU speed-ups on, as the scripts run it."""
    assert not speedups.enabled()
    cfg = bench.Config(n_layer=1, n_head=1, n_embd=16, vocab_size=64, block_size=32, batch_size=2, prompt_len=4,
                       scaling="2,5,3", dtypes="float32,bfloat16", repeats=1, sections="scaling")
    r = bench.main(cfg)
    assert speedups.enabled() and list(r) == ["bench_scaling"]
    assert set(r["bench_scaling"]) == {(d, n) for d in ("float32", "bfloat16") for n in (2, 5, 3)}
    rows = table(capsys.readouterr().out, "ours, scaling")
    assert [row[0] for row in rows] == ["2", "5", "3"] and all(len(row) == 5 for row in rows)
    for row in rows:  # new tokens, then seconds and ms/token for each dtype
        n = int(row[0])
        for i, dtype in ((1, "float32"), (3, "bfloat16")):
            t = r["bench_scaling"][dtype, n]
            assert close(row[i], t, 3) and close(row[i + 1], 1000 * t / n, 2), dtype


def test_sections_are_checked_before_any_work(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the sections were checked")
    monkeypatch.setattr(bench, "GPT", no_model)
    with pytest.raises(ConfigError, match=r"unknown sections \['foo'\]"):
        bench.main(bench.Config(quick=True, sections="sampling, foo"))


def test_best_times_keeps_each_fastest_call_and_its_page_faults(monkeypatch):
    """A fake clock and page-fault counter: each fn's time is the fastest of its timed calls (not the warm-up), its
    faults those of that call, and the calls alternate (a, b, a, b, ...)."""
    clock, faults, order = [0.0], [0], []

    def fn(name, seconds, new_faults):  # the warm-up call first, then the timed ones
        calls = iter(zip(seconds, new_faults, strict=True))

        def call():
            dt, df = next(calls)
            clock[0] += dt
            faults[0] += df
            order.append(name)
        return call

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(bench, "minor_faults", lambda: faults[0])
    a = fn("a", [0.5, 3.0, 2.0, 5.0], [1, 30, 20, 50])
    b = fn("b", [9.0, 4.0, 6.0, 7.0], [2, 40, 60, 70])
    best_faults = []
    assert bench.best_times([a, b], 3, best_faults) == [2.0, 4.0]
    assert best_faults == [20, 40]
    assert order == ["a", "b"] * 4


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_peak_rss_is_the_child_process_own():
    """The PPO rows run in a spawned child; a child inherits its parent's getrusage peak across fork + exec, so the
    table reads VmHWM. Here the parent touches 1 GiB first: the child's peak must not include it."""
    big = bytearray(2**30)
    big[::4096] = b"x" * len(big[::4096])  # touch every page: resident, not just reserved
    parent = bench.peak_rss_gib()
    del big
    child = bench.run_in_child(bench.peak_rss_gib)
    assert child < parent - 0.9, (child, parent)  # the child imports no more than this process did before the 1 GiB


def test_sft_step_flops_by_hand():
    """6 FLOPs per block parameter per token (forward 2, backward 4), 6 per LM-head weight per target position, and
    causal attention: QK^T and AV are 2 x T x T x n_embd FLOPs each per layer and sequence in full, half of that
    causal, x 3 with the backward. At T = 4: 6*10*4 + 6*3*2*1 + 6*4*4*2 = 240 + 36 + 192 (the attention term once
    lacked a factor of T: 48)."""
    config = SimpleNamespace(n_layer=1, n_embd=2, vocab_size=3)
    assert bench.sft_step_flops(config, block_params=10, B=1, T=4, n_targets=1) == 240 + 36 + 192
    config = SimpleNamespace(n_layer=12, n_embd=768, vocab_size=50257)  # attention grows as T^2, the rest as T
    small, large = (bench.sft_step_flops(config, 0, 1, T, 0) for T in (128, 256))
    assert large == 4 * small
