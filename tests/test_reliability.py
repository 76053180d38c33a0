"""Reliability, across the scripts:
- crash safety: a checkpoint write that fails in torch.save, fsync or the rename, or is SIGKILLed half-way, leaves
  the previous checkpoint loadable byte for byte, and no partial file ever sits at the final path;
- a non-finite loss or gradient stops ppo.py and ilql.py (and sft.py, reward.py on the gradient) before the
  optimizer or a checkpoint sees it;
- determinism: the same seed gives bit-identical weights, logs and samples (PPO: identical rollouts) on CPU;
- bad input: every entry point answers a broken data row, model folder, checkpoint (also a pickle holding other
  objects than tensors, without torch's advice to load it unsafely), config key or value (sizes, counts and rates out
  of range included), or reward_fn path with a ConfigError/DataError naming the culprit (the scripts print it as one
  `error:` line and exit 2, no traceback) and leaves no checkpoint behind; a reward_fn that raises or returns NaN, too
  few scores or strings stops the run the same way, naming the function and the step, the checkpoint intact.
Every run uses a 1-layer, 32-wide scratch GPT and 1-3 steps."""

import errno
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from fractions import Fraction

import data
import dpo
import grpo
import ilql
import label
import ppo
import reward
import sample
import scoring
import sft
from common import (ConfigError, RunError, check_numbers, load_checkpoint, lr_at, make_optimizer, parse_config,
                    print_config, restore, save_checkpoint)
from data import DataError, load_prompts
from model import GPT, GPTConfig
from tests.helpers import ROOT, assert_same_weights, file_digest, train_log, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPTS = {"sft": sft, "reward": reward, "ppo": ppo, "ilql": ilql, "sample": sample}
TRAINERS = ("sft", "reward", "ppo", "ilql")
TINY = dict(init_from="scratch", n_layer=1, n_head=2, n_embd=32, block_size=64, device="cpu", dtype="float32")
LONG_PROMPT = "Tell me about " + "the river and the stone, " * 400  # ~2,400 tokens: far past block_size 64
WORDS = ["apple", "river", "stone"]
GOOD_ROWS = {  # three ordinary rows and one whose prompt is longer than the context, for each trainer's loader
    "sft": [{"prompt": f"Say {w}:", "completion": f" {w}."} for w in WORDS] + [
        {"prompt": LONG_PROMPT, "completion": " a river."}],
    "reward": [{"prompt": f"Say {w}:", "chosen": f" {w}.", "rejected": f" no {w}"} for w in WORDS] + [
        {"prompt": LONG_PROMPT, "chosen": " a river.", "rejected": " no"}],
    "ppo": [{"prompt": f"Say {w}:"} for w in WORDS] + [{"prompt": LONG_PROMPT}],
    "ilql": [{"prompt": f"Say {w}:", "response": f" {w}.", "reward": float(i)} for i, w in enumerate(WORDS)] + [
        {"prompt": LONG_PROMPT, "response": " a river.", "reward": 1.0}],
}


def length_reward(prompts, responses):  # the PPO runs' reward_fn: "tests.test_reliability:length_reward"
    return [len(r) / 10 for r in responses]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """Files the cases point at: an SFT and a reward checkpoint, a truncated checkpoint, a Llama HF folder, a
    config file with a wrongly typed value."""
    d = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    for name, kind, heads, block_size in (("sft", "sft", {}, 64), ("reward", "reward", {"reward": 1}, 64),
                                          ("reward_short", "reward", {"reward": 1}, 16)):
        m = GPT(GPTConfig(block_size=block_size, n_layer=1, n_head=2, n_embd=32, heads=heads))
        save_checkpoint(str(d / f"{name}.pt"), kind=kind, model_config=asdict(m.config), model=m.state_dict(), step=1)
    (d / "broken.pt").write_bytes((d / "sft.pt").read_bytes()[:20_000])  # a copy cut short
    torch.save({"kind": "sft", "model": {}, "note": Fraction(1, 3)}, d / "objects.pt")  # unpickling runs its code
    (d / "llama").mkdir()
    (d / "llama" / "config.json").write_text('{"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1}')
    (d / "badtype.py").write_text('max_iters = "3"  # a string where an int belongs\n')
    (d / "none.py").write_text("max_iters = None  # no number at all\n")
    (d / "helper.py").write_text("from math import sqrt\nbase_lr = 1e-3\nlearning_rate = base_lr * sqrt(4)\n")
    return {"sft_ckpt": str(d / "sft.pt"), "rm_ckpt": str(d / "reward.pt"), "rm_short": str(d / "reward_short.pt"), "broken_ckpt": str(d / "broken.pt"),
            "objects_ckpt": str(d / "objects.pt"),
            "llama": str(d / "llama"), "badtype": str(d / "badtype.py"), "nonefile": str(d / "none.py"), "helperfile": str(d / "helper.py"), "missing": str(d / "nosuchfile.jsonl"),
            "missing_txt": str(d / "nosuchfile.txt")}


def write_base(script, tmp_path, art):
    """A config file (what `python script.py FILE` reads) of a tiny run of `script` that takes about a second, on
    GOOD_ROWS, writing to tmp_path/out. Returns its path."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = str(tmp_path / "out")
    data = write_jsonl(tmp_path / f"{script}.jsonl", GOOD_ROWS[script]) if script in GOOD_ROWS else None
    train = dict(TINY, data=data, out_dir=out, max_iters=1, learning_rate=1e-3, eval_interval=1000)
    settings = {
        "sft": dict(train, data_split="train", eval_split="train", max_prompt_len=32, max_len=64, batch_size=2,
                    grad_accum=1, warmup_iters=0, eval_batch_size=4, eval_samples=0),
        "reward": dict(train, data_split="train", eval_split="train", max_prompt_len=32, max_len=64, batch_size=2,
                       grad_accum=1, warmup_iters=0, eval_batch_size=4),
        "ppo": dict(train, reward_model="", reward_fn="tests.test_reliability:length_reward", eval_split="train",
                    eval_size=0, max_prompt_len=16, max_new_tokens=4, batch_size=2, minibatch_size=2, ppo_epochs=1),
        "ilql": dict(train, data_format="offline", eval_split="train", max_prompt_len=16, max_len=32, batch_size=2,
                     grad_accum=1, warmup_iters=0, eval_size=1, eval_betas=(0.0,), max_new_tokens=2, top_k=0),
        "sample": dict(init_from=art["sft_ckpt"], start="Hello", num_samples=1, max_new_tokens=2, device="cpu"),
    }[script]
    path = tmp_path / f"{script}_base.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return str(path)


def run(script, argv):
    """`python script.py argv...`, in this process."""
    mod = SCRIPTS[script]
    return mod.main(parse_config(mod.Config, argv))


def checkpoint_files(out_dir):
    """name -> digest of every checkpoint or temp checkpoint file (ckpt.pt, best.pt, ckpt.pt.tmp123) in out_dir."""
    return {p.name: file_digest(p) for p in Path(out_dir).glob("*.pt*")}


def timeless(metrics):
    """Metrics without the wall-clock ones (tok/s, eta, per-phase times), which no two runs share."""
    return {k: v for k, v in metrics.items() if not (k.startswith("t_") or "tok" in k or k == "eta")}


# ============================================================================ crash safety
def checkpoint_of(step, n_tensors=1, size=1000):
    """A checkpoint whose every tensor holds `step`: any mix of two writes shows."""
    return dict(kind="sft", step=step, model={f"w{i}": torch.full((size,), float(step)) for i in range(n_tensors)})


def load_whole(path):
    """Load `path` and check every tensor holds its step; returns the step."""
    ckpt = load_checkpoint(str(path))
    assert all(torch.equal(w, torch.full_like(w, ckpt["step"])) for w in ckpt["model"].values()), "a torn checkpoint"
    return ckpt["step"]


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fail_in", ["torch.save", "os.fsync", "os.replace"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_in):
    """A save that fails half-way through torch.save (the disk fills after half the bytes), in fsync or in the rename
    raises the error, leaves the previous checkpoint as it was, byte for byte, and removes its temp file."""
    path = tmp_path / "out" / "ckpt.pt"
    save_checkpoint(str(path), **checkpoint_of(1))
    digest = file_digest(path)
    if fail_in == "torch.save":
        real_save = torch.save

        def half_then_disk_full(obj, f):
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            disk_full()
        monkeypatch.setattr(torch, "save", half_then_disk_full)
    else:
        monkeypatch.setattr(os, fail_in.split(".")[1], disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(str(path), **checkpoint_of(2))
    monkeypatch.undo()
    assert file_digest(path) == digest and load_whole(path) == 1
    assert os.listdir(path.parent) == ["ckpt.pt"]  # a full disk must not stay full of our partial file


@pytest.mark.parametrize("size", [1000, 10], ids=["same-layout", "smaller"])
def test_a_save_between_the_two_opens_of_a_load_is_not_mixed_in(tmp_path, monkeypatch, size):
    """torch.load with mmap reads a checkpoint's index and its tensors through two opens of the path. A save that
    replaces the file between them (another job reading a running job's ckpt.pt) must not give step 1's index over
    step 2's tensors, nor fail the load when step 2's file is smaller: the load returns one whole checkpoint."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), **checkpoint_of(1, n_tensors=4))
    real_from_file, saved = torch.UntypedStorage.from_file, []

    def save_then_open(*args, **kwargs):  # the second open, by name: a save gets in just before it, once
        if not saved:
            save_checkpoint(str(path), **checkpoint_of(2, n_tensors=4, size=size))
            saved.append(2)
        return real_from_file(*args, **kwargs)
    monkeypatch.setattr(torch.UntypedStorage, "from_file", save_then_open)
    assert load_whole(path) == 2 and saved == [2]


WRITER = """
import sys, torch
from common import save_checkpoint
step = 0
while True:  # 32 tensors of 512 KiB: torch.save writes them one by one, so the temp file grows in steps
    step += 1
    save_checkpoint(sys.argv[1], kind="sft", step=step,
                    model={f"w{i}": torch.full((1 << 17,), float(step)) for i in range(32)})
"""


def file_size(path):
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed away between two looks
        return None


def test_sigkill_mid_write_leaves_the_last_whole_checkpoint(tmp_path):
    """A process rewriting a 16 MB checkpoint in a loop: every read of the final path while it writes is a whole
    checkpoint; SIGKILLed with its temp file less than half written, it leaves that partial temp file and the last
    whole checkpoint at the final path; the leftover temp file does not stop the next save."""
    path = tmp_path / "ckpt.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT, env=env)
    tmp = Path(f"{path}.tmp{proc.pid}")
    deadline = time.time() + 120
    try:
        steps = []
        while len(set(steps)) < 3:  # 1. read it while it is being replaced, again and again
            assert proc.poll() is None and time.time() < deadline, "the writer died or stalled"
            if path.exists():
                steps.append(load_whole(path))
        assert steps == sorted(steps)
        size = path.stat().st_size
        while True:  # 2. freeze the writer inside a write, check that it is less than half way, kill it there
            assert proc.poll() is None and time.time() < deadline, "never caught the writer mid-write"
            if 0 < (file_size(tmp) or 0) < size // 2:
                os.kill(proc.pid, signal.SIGSTOP)
                os.waitpid(proc.pid, os.WUNTRACED)  # returns once it has stopped: the file no longer changes
                if 0 < (file_size(tmp) or 0) < size // 2:
                    break
                os.kill(proc.pid, signal.SIGCONT)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert 0 < tmp.stat().st_size < size // 2  # it died half-way through a write...
    last = load_whole(path)  # ...and the final path holds the last whole checkpoint
    assert last >= steps[-1]
    # 3. the leftover temp file (another pid's) is no obstacle to the next save
    save_checkpoint(str(path), **checkpoint_of(last + 1, n_tensors=32, size=1 << 17))
    assert load_whole(path) == last + 1 and tmp.exists()


def test_a_resume_with_another_critic_is_named(tmp_path, art):
    """A PPO run with a shared critic (a reward_fn) resumed with a reward model (a separate critic): one error naming
    both, not a state_dict error about a value head, and the checkpoint as it was."""
    base = write_base("ppo", tmp_path, art)
    run("ppo", [base])
    digest = file_digest(tmp_path / "out" / "ckpt.pt")
    with pytest.raises(ConfigError, match=r"ckpt\.pt: its critic is shared, this run's separate: resume with the "
                                          r"critic settings it was trained with"):
        run("ppo", [base, "--init_from=resume", "--max_iters=2", "--reward_fn=", f"--reward_model={art['rm_ckpt']}"])
    assert file_digest(tmp_path / "out" / "ckpt.pt") == digest


def test_leftover_temp_files_break_nothing(tmp_path, art):
    """A killed run leaves ckpt.pt.tmp<pid> files behind, one perhaps with the pid this process has now: training,
    checkpointing and resuming go on; the same-named one is overwritten and renamed (not appended to), another pid's
    is left alone (its writer may still be running)."""
    base = write_base("sft", tmp_path, art)
    out = tmp_path / "out"
    out.mkdir()
    ours, theirs = out / f"ckpt.pt.tmp{os.getpid()}", out / "ckpt.pt.tmp999999999"
    for junk in (ours, theirs):
        junk.write_bytes(b"junk" * 10_000)
    run("sft", [base, "--max_iters=2", "--eval_interval=1"])
    run("sft", [base, "--max_iters=3", "--init_from=resume"])
    assert load_checkpoint(str(out / "ckpt.pt"), "sft")["step"] == 3
    assert not ours.exists() and theirs.read_bytes() == b"junk" * 10_000


# ============================================================================ non-finite losses and gradients
LOSS_FN = {"sft": "sft_loss", "reward": "bt_loss", "ppo": "ppo_losses", "ilql": "ilql_loss"}


def poisoned(fn, kind, clean_calls):
    """`fn`, a loss function returning a loss or a (loss, ...) tuple, whose training calls (grad enabled) after the
    first `clean_calls` return a NaN loss (kind="loss") or a finite loss with a NaN gradient (kind="grad": sqrt(0 * x)
    is 0, its derivative 0 * inf)."""
    calls = []

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if not torch.is_grad_enabled():  # evaluation
            return out
        calls.append(1)
        if len(calls) <= clean_calls:
            return out
        loss = out[0] if isinstance(out, tuple) else out
        loss = loss * float("nan") if kind == "loss" else loss + (loss * 0).sqrt()
        return (loss, *out[1:]) if isinstance(out, tuple) else loss
    return wrapped


@pytest.mark.parametrize("script,kind", [("ppo", "loss"), ("ppo", "grad"), ("ilql", "loss"), ("ilql", "grad"),
                                         ("sft", "grad"), ("reward", "grad")])
def test_nonfinite_step_stops_before_the_checkpoint(tmp_path, monkeypatch, art, script, kind):
    """Resumed from a step-1 checkpoint, step 1 trains normally and step 2 gets a NaN loss, or a finite loss with a NaN
    gradient: the run stops with "step 2: loss/grad_norm is nan" before the weights or a checkpoint see it, and
    ckpt.pt keeps its bytes. (sft/reward's NaN loss: see their own test modules.)"""
    base = write_base(script, tmp_path, art)
    run(script, [base])  # one step, one loss call per step: ckpt.pt at step 1
    path = tmp_path / "out" / "ckpt.pt"
    digest = file_digest(path)
    mod = SCRIPTS[script]
    monkeypatch.setattr(mod, LOSS_FN[script], poisoned(getattr(mod, LOSS_FN[script]), kind, clean_calls=1))
    with pytest.raises(RuntimeError, match=rf"step 2: {'loss' if kind == 'loss' else 'grad_norm'} is nan"):
        run(script, [base, "--init_from=resume", "--max_iters=3"])
    assert file_digest(path) == digest


# ============================================================================ determinism
DETERMINISM_ARGS = {  # a few steps, with what draws random numbers switched on: dropout, samples, rollouts
    "sft": ["--max_iters=3", "--dropout=0.1", "--eval_samples=1", "--max_new_tokens=4"],
    "reward": ["--max_iters=3"],
    "ilql": ["--max_iters=3", "--eval_size=2", "--eval_betas=(0.0, 2.0)", "--max_new_tokens=3"],
    "ppo": ["--max_iters=2", "--eval_size=2", "--eval_interval=1", "--eval_samples=1", "--batch_size=4"],
}


@pytest.mark.parametrize("script", ["sft", "reward", "ilql", "ppo"])
def test_same_seed_same_run(tmp_path, monkeypatch, capsys, art, script):
    """Two runs with the same seed end with bit-identical weights (PPO: the policy and its value head) and log the
    same metrics and samples; PPO's rollouts (every sampled token, training and evaluation) are identical too, and
    another seed changes them (the comparison can fail)."""
    rollouts = []  # PPO: the tokens of every rollout, one list per run
    real_rollout = ppo.rollout

    def recording_rollout(*args, **kwargs):
        r = real_rollout(*args, **kwargs)
        rollouts[-1].append(r["tokens"].clone())
        return r
    if script == "ppo":
        monkeypatch.setattr(ppo, "rollout", recording_rollout)

    def one_run(name, *extra):
        rollouts.append([])
        base = write_base(script, tmp_path / name, art)
        capsys.readouterr()
        out = run(script, [base, *DETERMINISM_ARGS[script], *extra])
        samples = [line for line in capsys.readouterr().out.splitlines() if " -> " in line]
        log = [timeless(json.loads(line)) for line in (tmp_path / name / "out" / "log.jsonl").read_text().splitlines()]
        return timeless(out), log, samples

    a, b = one_run("a"), one_run("b")
    assert a == b
    assert a[2] or script == "reward"  # samples were printed and compared (reward.py prints none)
    step = 2 if script == "ppo" else 3
    assert_same_weights(tmp_path / "a" / "out" / "ckpt.pt", tmp_path / "b" / "out" / "ckpt.pt", step, atol=0)
    if script == "ppo":
        assert len(rollouts[0]) == 2 + 3  # 2 training batches, 3 evaluations (steps 0, 1, 2)
        assert all(torch.equal(x, y) for x, y in zip(rollouts[0], rollouts[1], strict=True))
        one_run("other_seed", "--seed=7")
        assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(rollouts[0], rollouts[2]))


@pytest.mark.parametrize("script", TRAINERS)
def test_fresh_run_starts_a_fresh_log_and_resume_appends(tmp_path, art, script):
    """A second fresh run into the same out_dir replaces log.jsonl (the first run's rows would otherwise mix into the
    second's curves); a resumed run keeps the rows before its checkpoint and appends its own steps."""
    base = write_base(script, tmp_path, art)
    log = tmp_path / "out" / "log.jsonl"

    def rows():
        return [timeless(json.loads(line)) for line in log.read_text().splitlines()]
    run(script, [base])
    first = rows()
    assert first and any(r.get("step") == 0 for r in first)
    run(script, [base])
    assert rows() == first  # replaced, not appended to (same seed: the same rows)
    run(script, [base, "--init_from=resume", "--max_iters=2"])
    resumed = rows()
    assert resumed[:len(first)] == first and len(resumed) > len(first)
    assert all(r["step"] >= 1 for r in resumed[len(first):]), resumed[len(first):]


@pytest.mark.parametrize("script", TRAINERS)
def test_a_resume_after_a_crash_logs_each_step_once(tmp_path, monkeypatch, art, script):
    """A run checkpointed at step 2 that dies in step 3, having logged step 2, then resumed from that checkpoint to
    the end: its log.jsonl holds what an uninterrupted run's holds, every step once (the resume cuts the rows logged
    after its checkpoint, then logs those steps again)."""
    def rows(name):
        return [timeless(json.loads(line)) for line in (tmp_path / name / "out" / "log.jsonl").read_text().splitlines()]
    args = ["--max_iters=4", "--eval_interval=2"]
    run(script, [write_base(script, tmp_path / "whole", art), *args])
    base = write_base(script, tmp_path / "crashed", art)
    real_begin_step = SCRIPTS[script].begin_step

    def dies_in_step_3(optimizer, step, *rest):
        if step == 3:
            raise KeyboardInterrupt
        return real_begin_step(optimizer, step, *rest)
    monkeypatch.setattr(SCRIPTS[script], "begin_step", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(script, [base, *args])
    monkeypatch.undo()
    assert rows("crashed")[-1]["step"] == 2  # step 2's training row, logged after the checkpoint
    run(script, [base, *args, "--init_from=resume"])
    assert rows("crashed") == rows("whole")


def test_a_crash_between_the_two_checkpoints_keeps_best_pt_the_best(tmp_path, monkeypatch, art):
    """sft writes best.pt and ckpt.pt after an evaluation that improved; killed between the two writes and resumed,
    the run ends with the best.pt of an uninterrupted run (with ckpt.pt written first, a resume from it believed
    the new best was saved while best.pt held older weights, and never wrote it)."""
    args = ["--max_iters=4", "--eval_interval=2", "--learning_rate=1e-2"]
    run("sft", [write_base("sft", tmp_path / "whole", art), *args])
    whole = load_checkpoint(str(tmp_path / "whole" / "out" / "best.pt"))
    assert whole["step"] == 4  # the last evaluation is the best: the case a crash at its writes can spoil
    base = write_base("sft", tmp_path / "crashed", art)
    real_save, writes = sft.save, []

    def dies_between_the_writes_of_step_4(path, model, optimizer, step, *rest):
        writes.append(step)
        if writes.count(4) == 2:
            raise KeyboardInterrupt
        real_save(path, model, optimizer, step, *rest)
    monkeypatch.setattr(sft, "save", dies_between_the_writes_of_step_4)
    with pytest.raises(KeyboardInterrupt):
        run("sft", [base, *args])
    monkeypatch.undo()
    run("sft", [base, *args, "--init_from=resume"])
    crashed = load_checkpoint(str(tmp_path / "crashed" / "out" / "best.pt"))
    assert crashed["step"] == 4 and crashed["best_eval_loss"] == whole["best_eval_loss"]
    assert all(torch.equal(crashed["model"][k], v) for k, v in whole["model"].items())


@pytest.mark.parametrize("script", TRAINERS)
def test_a_resume_names_the_settings_it_changes(tmp_path, capsys, art, script):
    """A resume is exact only with the checkpoint's settings: one with the same settings prints no note, one with
    another seed, learning rate or number of processes names each of them with the checkpoint's value, and max_iters
    where the schedule ends at it (not PPO's constant rate: there a longer run only runs further); a checkpoint
    already at max_iters says that no step is left."""
    base = write_base(script, tmp_path, art)
    run(script, [base])  # max_iters 1: a checkpoint at step 1
    capsys.readouterr()
    run(script, [base, "--init_from=resume"])
    out = capsys.readouterr().out
    assert "note: resuming with settings" not in out
    assert "note: the checkpoint is at step 1, max_iters is 1: no step left to run" in out
    ckpt_path = tmp_path / "out" / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["world_size"] == 1
    torch.save({**ckpt, "world_size": 2}, ckpt_path)  # as if written by a 2-process torchrun
    run(script, [base, "--init_from=resume", "--seed=7", "--max_iters=2", "--learning_rate=0.002"])
    out = capsys.readouterr().out
    note = re.search(r"note: resuming with settings other than the checkpoint's run: (.*)", out).group(1)
    schedule_ends_at_max_iters = script != "ppo"  # ppo's default min_lr_ratio is 1: a constant rate
    assert sorted(note.split(", ")) == ["learning_rate 0.002 (was 0.001)", *(["max_iters 2 (was 1)"] *
                                        schedule_ends_at_max_iters), "seed 7 (was 1337)", "world_size 1 (was 2)"]
    assert "no step left" not in out


# ============================================================================ bad input
FAULT_FIELD = {"sft": "completion", "reward": "rejected", "ppo": "prompt", "ilql": "response"}
DATA_FAULTS = {  # fault -> ((good row, field) -> broken row, the message after "file: ")
    "truncated_line": (None, r"row 5 \(line 5\): not valid JSON"),
    "wrong_type": (lambda row, f: {**row, f: 3}, r"row 2: field '{f}' is int, not str"),
    "missing_field": (lambda row, f: {k: v for k, v in row.items() if k != f}, r"row 2: missing field '{f}'"),
    "empty_string": (lambda row, f: {**row, f: ""}, r"row 2: empty (response in )?field '{f}'"),
}


@pytest.mark.parametrize("fault", DATA_FAULTS)
@pytest.mark.parametrize("script", TRAINERS)
def test_bad_data_row_names_file_row_and_field(tmp_path, art, script, fault):
    """A broken row in the training data: a line cut short, a number for a string, a missing field, an empty one.
    The error names the file, the row and the field; no checkpoint is written."""
    base = write_base(script, tmp_path, art)
    field, (change, message) = FAULT_FIELD[script], DATA_FAULTS[fault]
    bad = tmp_path / f"{script}-{fault}.jsonl"
    if change is None:  # the file ends in the middle of a row, as after a crash or a cut download
        write_jsonl(bad, GOOD_ROWS[script])
        bad.write_text(bad.read_text() + '{"prompt": "Say')
    else:
        write_jsonl(bad, [change(row, field) if i == 1 else row for i, row in enumerate(GOOD_ROWS[script])])
    with pytest.raises(DataError, match=re.escape(bad.name) + ": " + message.format(f=field)):
        run(script, [base, f"--data={bad}"])
    assert checkpoint_files(tmp_path / "out") == {}


CASES = {  # id -> (script, arguments after the base config file, what the error must say, out_dir files to plant)
    # config keys and values
    **{f"{s}-unknown-key": (s, ["--lerning_rate=1"], r"command line: unknown config key 'lerning_rate'", {})
       for s in SCRIPTS},
    "sft-value-of-wrong-type": ("sft", ["--max_iters=three"], r"--max_iters='three' is not a valid int", {}),
    "sft-batch-size-zero": ("sft", ["--batch_size=0"], r"^batch_size must be >= 1, not 0$", {}),
    "sft-max-iters-negative": ("sft", ["--max_iters=-1"], r"^max_iters must be >= 0, not -1$", {}),
    "reward-config-file-value-of-wrong-type": ("reward", ["{badtype}"], r"badtype\.py: max_iters = '3' is a str, "
                                               r"expected int", {}),
    "ilql-tuple-element-of-wrong-type": ("ilql", ["--eval_betas=[1.0, 'a']"], r"command line: eval_betas\[1\] = 'a' "
                                         r"is a str, expected float", {}),
    "sft-config-file-value-none": ("sft", ["{nonefile}"], r"none\.py: max_iters = None is a NoneType, expected int",
                                   {}),
    "sft-config-file-helper-variable": ("sft", ["{helperfile}"], r"helper\.py: unknown config key 'base_lr' .*; a "
                                        r"helper variable of the file is named with a leading underscore, _base_lr$",
                                        {}),
    "sft-config-file-after-an-override": ("sft", ["--max_iters=2", "{badtype}"], r"command line: config file "
                                          r"'.*badtype\.py' after a --key=value: give config files first", {}),
    "sft-out-dir-under-a-file": ("sft", ["--out_dir={sft_ckpt}/out"], r"out_dir '.*sft\.pt/out' cannot be made: .*sft\.pt is "
                                 r"a file$", {}),
    "sft-missing-data-file": ("sft", ["--data={missing}"], r"nosuchfile\.jsonl: no such file", {}),
    "sft-empty-data-string": ("sft", ["--data="], r"(?i)\bdata\b.*\b(empty|none given|no source)\b", {}),
    "sample-empty-init-from": ("sample", ["--init_from="], r"'' is not a local folder", {}),
    "sample-missing-prompt-file": ("sample", ["--start=FILE:{missing_txt}"], r"nosuchfile\.txt", {}),
    # contexts too short for the lengths asked for
    "sft-max-len-past-block-size": ("sft", ["--max_len=100"], r"max_len \(100\) exceeds the model's block_size "
                                    r"\(64\)", {}),
    "reward-max-len-past-block-size": ("reward", ["--max_len=100"], r"max_len \(100\) exceeds the model's "
                                       r"block_size \(64\)", {}),
    "ppo-prompt-past-block-size": ("ppo", ["--max_prompt_len=100"], r"max_prompt_len \+ max_new_tokens = 104 "
                                   r"exceeds a model's block_size 64", {}),
    "ilql-max-len-past-block-size": ("ilql", ["--max_len=100"], r"max_len \(100\) .* must fit block_size 64", {}),
    "ilql-n-step-zero": ("ilql", ["--n_step=0"], r"n_step must be >= 1", {}),
    # models that are not GPT-2
    **{f"{s}-llama-folder": (s, ["--init_from={llama}"], r"config\.json: model_type is 'llama', expected 'gpt2'",
                             {}) for s in SCRIPTS},
    "sft-truncated-checkpoint": ("sft", ["--init_from={broken_ckpt}"], r"broken\.pt: not a readable checkpoint", {}),
    "sample-truncated-checkpoint": ("sample", ["--init_from={broken_ckpt}"], r"broken\.pt: not a readable "
                                    r"checkpoint", {}),
    "sample-pickle-with-other-objects": ("sample", ["--init_from={objects_ckpt}"], r"objects\.pt: not a checkpoint "
                                         r"of this codebase \(it holds Python objects other than tensors", {}),
    # one script's checkpoint where another's belongs
    "ppo-sft-checkpoint-as-reward-model": ("ppo", ["--reward_fn=", "--reward_model={sft_ckpt}"],
                                           r"sft\.pt: is a 'sft' checkpoint, expected 'reward'", {}),
    "ppo-reward-checkpoint-as-policy": ("ppo", ["--init_from={rm_ckpt}"],
                                        r"reward\.pt: is a 'reward' checkpoint, expected 'sft' or 'ppo'", {}),
    "ilql-reward-checkpoint-as-policy": ("ilql", ["--init_from={rm_ckpt}"],
                                         r"reward\.pt: is a 'reward' checkpoint, expected 'sft' or 'ilql'", {}),
    "ilql-reward-model-shorter-than-its-samples": ("ilql", ["--reward_model={rm_short}", "--max_new_tokens=8"],
                                                   r"max_prompt_len \+ max_new_tokens = 24 exceeds the reward "
                                                   r"model's block_size 16", {}),
    "ilql-sft-checkpoint-as-reward-model": ("ilql", ["--reward_model={sft_ckpt}"],
                                            r"sft\.pt: is a 'sft' checkpoint, expected 'reward'", {}),
    "sft-resume-from-a-reward-checkpoint": ("sft", ["--init_from=resume"],
                                            r"ckpt\.pt: is a 'reward' checkpoint, expected 'sft'",
                                            {"ckpt.pt": "rm_ckpt"}),
    "reward-resume-from-an-sft-checkpoint": ("reward", ["--init_from=resume"],
                                             r"ckpt\.pt: is a 'sft' checkpoint, expected 'reward'",
                                             {"ckpt.pt": "sft_ckpt"}),
    "ppo-init-kl-coef-zero-with-a-target": ("ppo", ["--init_kl_coef=0", "--target_kl=6"], r"init_kl_coef 0 would "
                                            r"stay 0", {}),
    "ppo-kl-horizon-too-short": ("ppo", ["--target_kl=6", "--batch_size=10", "--minibatch_size=2", "--kl_horizon=2"],
                                 r"kl_horizon \(2\) must exceed a fifth of the responses per iteration \(10\)", {}),
    "ppo-resume-without-checkpoint": ("ppo", ["--init_from=resume"], r"checkpoint '.*ckpt\.pt' not found", {}),
    "ppo-shared-critic-with-critic-init": ("ppo", ["--critic=shared", "--critic_init_from={sft_ckpt}"],
                                           r"critic_init_from is the separate critic's start", {}),
    "sample-ilql-beta-on-an-sft-checkpoint": ("sample", ["--beta=1"], r"is not an ilql checkpoint", {}),
    "sample-beta-not-finite": ("sample", ["--beta=nan"], r"^beta must be a finite number, not nan$", {}),
    # reward functions that cannot be found
    **{f"{s}-reward-fn-{what}": (s, [f"--reward_fn={spec}"], message, {})
       for s in ("ppo", "ilql") for what, spec, message in (
           ("no-module", "nosuchmodule:fn", r"reward_fn 'nosuchmodule:fn': cannot import module 'nosuchmodule'"),
           ("no-function", "ppo:nosuchfn", r"reward_fn 'ppo:nosuchfn': module 'ppo' has no function 'nosuchfn'"))},
}
CLI_CASES = ["sft-unknown-key", "sft-out-dir-under-a-file", "reward-config-file-value-of-wrong-type", "ppo-reward-fn-no-module",
             "ilql-llama-folder", "sample-truncated-checkpoint", "sft-batch-size-zero", "sft-max-iters-negative",
             "sample-pickle-with-other-objects"]


def prepare(case, tmp_path, art):
    """The case's command line (after its base config file) and out_dir, with its planted files in place."""
    script, args, message, plant = CASES[case]
    base = write_base(script, tmp_path, art)
    out = tmp_path / "out"
    out.mkdir()
    for name, key in plant.items():
        shutil.copy(art[key], out / name)
    return script, [base, *(a.format(**art) for a in args)], message, out


def test_a_config_file_may_import_and_compute(tmp_path):
    """A config file is Python: imported functions and modules, functions of its own and _private helpers are not
    settings, and what it computes from them is."""
    path = tmp_path / "cfg.py"
    path.write_text("import math\nfrom math import sqrt\n_base = 1e-3\n\n\ndef _double(x):\n    return 2 * x\n\n\n"
                    "def helper():\n    pass\n\n\nlearning_rate = _double(_base) * sqrt(4) * math.e\n")
    assert parse_config(sft.Config, [str(path)]).learning_rate == 4e-3 * math.e


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_named(tmp_path, art, case):
    """main() raises a ConfigError or DataError (what the scripts print as one `error:` line) naming the key, value,
    file or checkpoint kind at fault, before it writes or changes any checkpoint."""
    script, argv, message, out = prepare(case, tmp_path, art)
    before = checkpoint_files(out)
    with pytest.raises((ConfigError, DataError), match=message):
        run(script, argv)
    assert checkpoint_files(out) == before


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_input_on_the_command_line_is_one_error_line(tmp_path, art, case):
    """`python script.py ...` with bad input exits with status 2 and a last stderr line `error: <message>`, no
    traceback (nor torch's advice to load a file with weights_only=False), and writes or changes no checkpoint: one
    case per entry point."""
    script, argv, message, out = prepare(case, tmp_path, art)
    before = checkpoint_files(out)
    r = run_cli(script, argv, tmp_path)
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 2 and "Traceback" not in r.stderr and "weights_only" not in r.stderr, r.stderr[-3000:]
    assert last.startswith("error: ") and re.search(message, last.removeprefix("error: ")), last
    assert checkpoint_files(out) == before


def run_cli(script, argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    return subprocess.run([sys.executable, f"{script}.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


RANGES = [  # script, field, value, the rule the error states: every script checks its sizes, counts and rates first
    ("sft", "batch_size", 0, ">= 1"), ("sft", "eval_batch_size", 0, ">= 1"), ("sft", "max_iters", -1, ">= 0"),
    ("reward", "learning_rate", 0.0, "> 0"), ("reward", "grad_accum", 0, ">= 1"), ("reward", "beta2", 1.0, "in [0, 1)"),
    ("ppo", "minibatch_size", 0, ">= 1"), ("ppo", "temperature", 0.0, "> 0"), ("ppo", "gamma", 1.5, "in [0, 1]"),
    ("ilql", "eval_interval", 0, ">= 1"), ("ilql", "learning_rate", float("nan"), "> 0"), ("ilql", "top_k", -1, ">= 0"),
    ("dpo", "batch_size", 0, ">= 1"), ("dpo", "grad_clip", -1.0, ">= 0"), ("dpo", "min_lr_ratio", 2.0, "in [0, 1]"),
    ("sample", "num_samples", 0, ">= 1"), ("sample", "temperature", -1.0, ">= 0"), ("sample", "top_p", 1.5, "in [0, 1]"),
    ("label", "n_candidates", 0, ">= 1"), ("label", "max_new_tokens", 0, ">= 1"), ("label", "max_prompts", -1, ">= 0")]


@pytest.mark.parametrize("script,field,value,rule", RANGES)
def test_sizes_counts_and_rates_out_of_range_are_named(tmp_path, script, field, value, rule):
    """main() with a size, count or rate out of range raises a ConfigError "<field> must be <rule>, not <value>"
    before it loads any data or model (the defaults point at files that do not exist here)."""
    mod = {**SCRIPTS, "dpo": dpo, "label": label}[script]
    cfg = mod.Config(**{field: value, "device": "cpu"})
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{field} must be {rule}, not {value!r}')}$"):
        mod.main(cfg)


@pytest.mark.parametrize("script", ["sft", "reward", "dpo", "ilql"])
def test_max_len_must_leave_room_for_a_response(script):
    """Every trainer with a max_len (prompt + response) refuses one that leaves no token after max_prompt_len, before
    it loads anything (a traceback from the tokenizer before, for sft and reward)."""
    mod = {**SCRIPTS, "dpo": dpo}[script]
    with pytest.raises(ConfigError, match=r"^max_len \(32\) must exceed max_prompt_len \(32\)$"):
        mod.main(mod.Config(max_len=32, max_prompt_len=32, device="cpu"))


def test_sft_samples_must_leave_room_for_a_prompt(tmp_path, art):
    """max_new_tokens filling the whole context is refused at start-up, naming it (it crashed at the first evaluation,
    after training, naming max_prompt_len); with eval_samples 0 nothing is sampled and it does not matter."""
    base = write_base("sft", tmp_path, art)
    with pytest.raises(ConfigError, match=r"^max_new_tokens \(64\) leaves no room for a prompt in the model's "
                                          r"block_size \(64\)$"):
        run("sft", [base, "--eval_samples=1", "--max_new_tokens=64"])
    assert not (tmp_path / "out" / "ckpt.pt").exists()
    run("sft", [base, "--eval_samples=0", "--max_new_tokens=64"])


def test_a_resume_trains_with_its_own_optimizer_settings():
    """restore takes the checkpoint's AdamW moments but keeps this run's weight_decay and betas (load_state_dict
    brings back the saved ones, and begin_step resets only the learning rate)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    old = make_optimizer(net, sft.Config(weight_decay=0.0, beta1=0.9, beta2=0.999))
    net(torch.randn(4, 3)).sum().backward()
    old.step()
    cfg = sft.Config(weight_decay=0.5, beta1=0.8, beta2=0.95, max_iters=10)
    ckpt = dict(optimizer=old.state_dict(), step=1, config=asdict(sft.Config()))
    new = make_optimizer(net, cfg)
    restore(ckpt, new, cfg)
    assert [(g["weight_decay"], g["betas"]) for g in new.param_groups] == [(0.5, (0.8, 0.95)), (0.0, (0.8, 0.95))]
    for p in net.parameters():
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])


@pytest.mark.parametrize("script", ["sft", "reward", "ppo", "grpo", "dpo", "ilql"])
def test_the_config_line_shows_model_sizes_only_for_a_model_from_scratch(capsys, script):
    """A run that loads its model takes the loaded model's sizes, so its config line leaves out the "scratch only"
    fields (n_layer, n_head, n_embd, block_size; SFT's dropout) instead of printing GPT-2 124M's defaults for them."""
    mod = {**SCRIPTS, "dpo": dpo, "grpo": grpo}[script]
    for init_from, shown in (("scratch", True), ("out/sft/ckpt.pt", False)):
        print_config(mod.Config(init_from=init_from))
        line = capsys.readouterr().out
        assert line.startswith(f"config: init_from={init_from!r} ") and " learning_rate=" in line
        assert (" n_layer=12 n_head=12 n_embd=768 block_size=1024 " in line) is shown
        assert (" dropout=" in line) is (shown and script == "sft")


@pytest.mark.parametrize("source, error", [("def f(prompts, responses):\n    return [0.0] * len(responses\n",
                                            "SyntaxError: "), ("X = 1 / 0\n", "ZeroDivisionError: division by zero")],
                         ids=["syntax-error", "raises-at-import"])
def test_a_reward_fn_module_that_fails_as_it_is_imported_is_named(tmp_path, monkeypatch, source, error):
    """A reward_fn whose module cannot even be imported is one error naming it and the error (every script that
    takes --reward_fn: scoring.load_reward_fn), not a traceback."""
    (tmp_path / "failing_rewards.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(f"reward_fn 'failing_rewards:f': importing module "
                                                    f"'failing_rewards' failed ({error}")):
        scoring.load_reward_fn("failing_rewards:f")


def test_a_score_too_large_for_fp32_is_refused():
    """A reward_fn's 1e39 is finite in Python but inf in the fp32 tensor the trainers use: refused like inf."""
    with pytest.raises(ValueError, match=r"reward_fn 'f': score 0 is 1e\+39, beyond fp32's range"):
        scoring.check_scores([1e39, 0.0], 2, "f")
    assert scoring.check_scores([3.0e38, -1], 2, "f").tolist() == [pytest.approx(3.0e38, rel=1e-6), -1.0]


def nan_reward(prompts, responses):  # the failing reward_fns: "tests.test_reliability:<name>"
    return [float("nan")] * len(responses)


def too_few_rewards(prompts, responses):
    return [1.0] * (len(responses) - 1)


def text_rewards(prompts, responses):
    return ["good"] * len(responses)


def broken_reward(prompts, responses):
    raise KeyError("score")


REWARD_FN_FAULTS = {  # reward_fn -> what the error says after its name
    "nan_reward": r": score 0 is nan, not a finite number",
    "too_few_rewards": r" returned 1 scores for 2 responses",
    "text_rewards": r": score 0 is 'good' \(str\), not a number",
    "broken_reward": r" raised KeyError: 'score'",
}


@pytest.mark.parametrize("fn", REWARD_FN_FAULTS)
def test_failing_reward_fn_names_itself_and_the_step_and_keeps_the_checkpoint(tmp_path, art, fn):
    """A PPO run resumed from its step-1 checkpoint with a reward_fn that returns NaN, too few scores or strings, or
    raises: one RunError naming the function, what went wrong and the step, and saying the step-1 checkpoint is
    intact, which it is, byte for byte. (`python ppo.py` prints it as one error line: the next test.)"""
    base = write_base("ppo", tmp_path, art)
    run("ppo", [base])
    path = tmp_path / "out" / "ckpt.pt"
    digest = file_digest(path)
    message = (rf"^step 1: reward_fn 'tests\.test_reliability:{fn}'{REWARD_FN_FAULTS[fn]}; the last checkpoint, at "
               rf"step 1, is intact$")
    with pytest.raises(RunError, match=message):
        run("ppo", [base, "--init_from=resume", "--max_iters=3", f"--reward_fn=tests.test_reliability:{fn}"])
    assert file_digest(path) == digest


def test_failing_reward_fn_on_the_command_line_is_one_error_line(tmp_path, art):
    """`python ppo.py ... --reward_fn=<one that raises>` resuming from a checkpoint: exit 2, the last stderr line
    `error: step 1: reward_fn ... raised KeyError: 'score'; the last checkpoint, at step 1, is intact`, no
    traceback, the checkpoint byte for byte as it was."""
    base = write_base("ppo", tmp_path, art)
    run("ppo", [base])
    path = tmp_path / "out" / "ckpt.pt"
    digest = file_digest(path)
    r = run_cli("ppo", [base, "--init_from=resume", "--max_iters=3",
                        "--reward_fn=tests.test_reliability:broken_reward"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == ("error: step 1: reward_fn 'tests.test_reliability:broken_reward' "
                                                 "raised KeyError: 'score'; the last checkpoint, at step 1, is intact")
    assert file_digest(path) == digest


@pytest.mark.parametrize("script,arg,message", [("demo", "--nope=1", r"unknown config key 'nope'"),
                                                 ("demo", "--block_size=50", r"block_size 50 is shorter than "
                                                  r"max_prompt_len \+ max_new_tokens \(32 \+ 40\)"),
                                                 ("label", "--temperature=abc", r"'abc' is not a valid float")])
def test_bad_value_for_demo_and_label_is_one_error_line(tmp_path, script, arg, message):
    """The two entry points that are not trainers end the same way: status 2, one `error:` line, no traceback."""
    out = [f"--out_dir={tmp_path}"] if script == "demo" else []  # a check that let the run start writes nothing here
    r = subprocess.run([sys.executable, f"{script}.py", arg, *out], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert re.search("^error: .*" + message, r.stderr.strip().splitlines()[-1]), r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_prompt_longer_than_the_context_is_cut_not_fatal(tmp_path, monkeypatch, art, script):
    """A ~2,400-token prompt with a 64-token context: every entry point tokenizes it to its last tokens (the part a
    response follows) and runs (this also shows the base configs of the cases above are valid, so those fail for the
    reason they name). The tokenizing functions are watched wherever a script imported them."""
    cut = []  # the prompt ids each entry point made of LONG_PROMPT

    def watch(fn, prompt_part):
        def spy(prompt, *args, **kw):
            out = fn(prompt, *args, **kw)
            if prompt == LONG_PROMPT:
                cut.append(prompt_part(out))
            return out
        return spy

    for module in (data, sft, reward, ppo, ilql, sample):
        for name, part in (("tokenize_prompt", lambda ids: ids), ("tokenize_example", lambda out: out[0])):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, watch(getattr(data, name), part))
    base = write_base(script, tmp_path, art)
    if script == "sample":
        out = run(script, [base, f"--start={LONG_PROMPT}"])
        assert len(out["completions"][0]) == 1
    else:
        whole_batch = ["--batch_size=4", "--minibatch_size=4"] if script == "ppo" else []  # every prompt in step 0
        run(script, [base, *whole_batch])
        assert load_checkpoint(str(tmp_path / "out" / "ckpt.pt"), script)["step"] == 1
    full = data.encode(LONG_PROMPT)
    assert cut and all(0 < len(ids) < 64 and ids == full[-len(ids):] for ids in cut), [len(ids) for ids in cut]


# ---------------------------------------------------------------------------- config values
@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("false", False),
                                        ("0", False), ("FALSE", False)])
def test_a_bool_on_the_command_line(text, value):
    assert parse_config(label.Config, [f"--active={text}"]).active is value


def test_a_bool_that_is_no_bool_is_refused():
    with pytest.raises(ConfigError, match=r"--active='yes' is not a valid bool"):
        parse_config(label.Config, ["--active=yes"])


def test_an_override_value_may_hold_an_equals_sign():
    assert parse_config(sample.Config, ["--start=x = 1 + 1 ="]).start == "x = 1 + 1 ="


def test_a_text_field_keeps_a_value_that_reads_as_a_number(tmp_path):
    """label.py --prompt_field=2024 names the column "2024" (it was once read as the int 2024: "missing field")."""
    (tmp_path / "p.csv").write_text("id,2024\n1,Hello there\n", encoding="utf-8")
    cfg = parse_config(label.Config, ["--prompt_field=2024"])
    assert cfg.prompt_field == "2024"
    assert load_prompts(str(tmp_path / "p.csv"), field=cfg.prompt_field) == ["Hello there"]


@pytest.mark.parametrize("field,value,rule", [("learning_rate", float("inf"), "> 0"),
                                              ("grad_clip", float("inf"), ">= 0"),
                                              ("min_lr_ratio", float("-inf"), "in [0, 1]")])
def test_infinite_sizes_and_rates_are_out_of_every_range(field, value, rule):
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{field} must be {rule}, not {value!r}')}$"):
        check_numbers(sft.Config(**{field: value}))


def test_a_config_file_bool_for_an_int_field_is_refused(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("max_iters = True\n")
    with pytest.raises(ConfigError, match=r"cfg\.py: max_iters = True is a bool, expected int"):
        parse_config(sft.Config, [str(path)])


# ---------------------------------------------------------------------------- schedules, dropout, data formats
@pytest.mark.parametrize("script", ["sft", "reward", "ilql"])
def test_each_step_trains_at_the_schedules_learning_rate(tmp_path, art, script):
    """Step t trains (and logs) at lr_at(t): the warmup's first step at a 1/warmup_iters of the peak, the cosine
    reaching the minimum at lr_decay_iters."""
    base = write_base(script, tmp_path, art)
    run(script, [base, "--max_iters=5", "--warmup_iters=2", "--lr_decay_iters=4", "--min_lr_ratio=0.1",
                 "--learning_rate=1e-3"])
    assert [r["lr"] for r in train_log(tmp_path / "out")] == [lr_at(t, 1e-3, 2, 4, 0.1) for t in range(5)]


@pytest.mark.parametrize("script,who", [("reward", "the reward model"), ("ilql", "ILQL")])
def test_a_start_with_dropout_is_refused(tmp_path, art, script, who):
    """reward.py and ilql.py train with dropout off (noise in the margin, in V(s') and the Q targets): a start whose
    config has dropout is one error naming it, before anything is written."""
    model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.1))
    path = tmp_path / "dropout.pt"
    save_checkpoint(str(path), kind="sft", model_config=asdict(model.config), model=model.state_dict(), step=0)
    base = write_base(script, tmp_path, art)
    with pytest.raises(ConfigError, match=rf"dropout\.pt: dropout 0\.1; {who} trains with dropout off"):
        run(script, [base, f"--init_from={path}"])
    assert checkpoint_files(tmp_path / "out") == {}


@pytest.mark.parametrize("script,fmt,message", [
    ("sft", "preferences", r"data_format must be 'sft' or 'chosen', not 'preferences'"),
    ("ilql", "chosen", r"data_format must be 'offline' or 'preferences', not 'chosen'")])
def test_an_unknown_data_format_is_named(tmp_path, art, script, fmt, message):
    """Another script's data_format (sft's "chosen" in ilql, ilql's "preferences" in sft) is refused by name, not
    read as the script's other format."""
    base = write_base(script, tmp_path, art)
    with pytest.raises(ConfigError, match=message):
        run(script, [base, f"--data_format={fmt}"])
    assert checkpoint_files(tmp_path / "out") == {}
