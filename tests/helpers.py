"""Small helpers shared by the test modules."""
import hashlib
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from common import Setup, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(path, rows):
    """Rows as a JSON Lines fixture file; returns the path as a string (what --data takes)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def assert_same_weights(path_a, path_b, step, atol=1e-6):
    """Two checkpoints (e.g. an uninterrupted run and a stopped-and-resumed one) end at `step` with the same weights.
    atol=0: bit for bit."""
    a, b = load_checkpoint(str(path_a)), load_checkpoint(str(path_b))
    assert a["step"] == b["step"] == step
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=atol, rtol=0), k


def file_digest(path):
    """sha256 of a file's bytes: "this checkpoint was not rewritten" in one comparison."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_log(out_dir):
    """The per-step training rows of out_dir/log.jsonl (not the evaluation rows)."""
    rows = [json.loads(x) for x in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def eval_log(out_dir):
    """The evaluation rows of out_dir/log.jsonl (those with eval_* keys)."""
    rows = [json.loads(x) for x in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if any(k.startswith("eval_") for k in r)]


def cpu_setup(rank=0, world_size=1, autocast=nullcontext):
    """common.Setup of one CPU process, or of rank `rank` of `world_size` (as DDP would set it up)."""
    return Setup(ddp=world_size > 1, rank=rank, local_rank=rank, world_size=world_size, device="cpu",
                 master=rank == 0, autocast=autocast)


def torchrun(script, args, tmp_path, nproc=2):
    """`script` under torchrun with `nproc` CPU processes (gloo), one thread each, from the repository root; fails the
    test with the end of its output unless every rank exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    r = run_torchrun([f"--nproc_per_node={nproc}", script, *args], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def run_torchrun(args, env, timeout=300):
    """`python -m torch.distributed.run --standalone ARGS` from the repository root -> CompletedProcess. A run still
    going after `timeout` seconds fails the test with its output, and its ranks are stopped: each runs in a session
    of its own, so killing the launcher alone (subprocess.run's timeout) would leave them running."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", *args], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()  # SIGTERM: the launcher stops its ranks, then exits
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        raise AssertionError(f"torchrun still running after {timeout} s, stopped:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def spy_on_compile(monkeypatch):
    """A list of every module torch.compile is given from now on (it still compiles them): a --compile test must see
    the flag reach torch.compile, as an ignored flag would also "train like eager"."""
    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled.append(m) or real_compile(m, **kw))
    return compiled
