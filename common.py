"""
The plumbing every training script shares, written once: config parsing, device/DDP/bf16 setup, checkpoints,
model loading, the LR schedule and the optimizer. Nothing here knows about any RL algorithm.

Config: each script declares a dataclass; `parse_config` fills it from config files (`config/x.py`, plain Python
assignments, as in nanoGPT) and `--key=value` overrides, in that order. `--help` lists every field with its
default and the comment written beside it.
"""

import ast
import ctypes
import difflib
import importlib
import inspect
import json
import math
import numbers
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, fields

import torch
import torch.distributed as dist

from model import GPT, GPTConfig


# ---------------------------------------------------------------------------- config
class ConfigError(ValueError):
    pass


def _field_help(cls):
    """`name: type = default  # help` -> {name: help}, read from the dataclass source."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, re.M))


def _convert(key, value, default, where):
    """Parse a string from the command line into the type of the field's default."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if default is None:  # Optional field: number, literal, or plain string
            try:
                return ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return value
        return ast.literal_eval(value)  # dicts, lists, tuples
    except (ValueError, SyntaxError):
        raise ConfigError(f"{where}: --{key}={value!r} is not a valid {type(default).__name__}") from None


def _check_type(key, value, default, where):
    """A config file's value must have its field's type (an int may stand for a float, a list for a tuple): a string
    "3" for max_iters would otherwise fail deep inside the training loop, after the data and model have loaded."""
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, type(default)):
        raise ConfigError(f"{where}: {key} = {value!r} is a {type(value).__name__}, expected {type(default).__name__}")
    return value


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _check_key(cls, key, where):
    names = [f.name for f in fields(cls)]
    if key not in names:
        near = difflib.get_close_matches(key, names, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else f" (valid keys: {', '.join(names)})"
        raise ConfigError(f"{where}: unknown config key {key!r}{hint}")


def run_main(main, config_cls):
    """A script's command line: main(parse_config(config_cls)). A bad key, value, path or data row (ConfigError,
    data.DataError) prints one `error: ...` line naming it and exits with status 2, no traceback."""
    from data import DataError
    try:
        main(parse_config(config_cls))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank that has finished skips the interpreter's shutdown: there, after destroy_process_group,
        # torch 2.13's gloo threads now and then abort the process ("terminate called without an active exception",
        # exit -6). Measured on this machine with a bare init / all_reduce / DDP backward / barrier / destroy script
        # under torchrun: 5 of 40 runs aborted, 0 of 40 ending with os._exit(0). Checkpoints are fsynced by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def parse_config(cls, argv=None):
    """Build `cls` from [config_file.py ...] [--key=value ...]. Raises ConfigError with the offending key."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print_help(cls)
        sys.exit(0)
    values = {f.name: _default(f) for f in fields(cls)}
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"command line: {arg!r} must be written --key=value")
            key, value = arg[2:].split("=", 1)
            _check_key(cls, key, "command line")
            values[key] = _convert(key, value, values[key], "command line")
        else:
            if not os.path.exists(arg):
                raise ConfigError(f"config file {arg!r} not found")
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), scope)
            for key, value in scope.items():
                if key.startswith("_") or inspect.ismodule(value):
                    continue
                _check_key(cls, key, arg)
                values[key] = _check_type(key, value, values[key], arg)
    return cls(**values)


def print_help(cls):
    print((inspect.getdoc(sys.modules[cls.__module__]) or "").split("\n\n")[0])
    print("\nusage: [config/file.py ...] [--key=value ...]\n")
    helps = _field_help(cls)
    for f in fields(cls):
        default = _default(f)
        print(f"  {f'--{f.name}={default!r}':<36} {helps.get(f.name, '')}")


def print_config(cfg):
    print0("config: " + " ".join(f"{k}={v!r}" for k, v in asdict(cfg).items()))


# ---------------------------------------------------------------------------- device, DDP, precision
@dataclass
class Setup:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str
    master: bool
    autocast: object  # a context manager factory: `with s.autocast():`


_MASTER = True


def keep_freed_memory():
    """CPU only, Linux/glibc: freed memory stays in the process for the next tensor instead of going back to the OS.
    Why: glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free,
    so each (batch, tokens, 50257) logits tensor and its gradient (50 MB for 8 x 32 tokens) is page-faulted in, 4 KB
    at a time and zeroed by the kernel, every time one is made. Measured on this 2-core CPU: log-softmax forward +
    backward 5x faster, a tiny-model PPO iteration 1.8x faster in fp32 and 2.2x in bf16, for 17% more peak RSS
    (fragmentation: 0.88 -> 1.03 GB). mallopt(M_MMAP_MAX, 0): large blocks come from the heap too (glibc still falls
    back to mmap if the heap cannot grow); mallopt(M_TRIM_THRESHOLD, 2 GiB): free memory at the heap's top is kept.
    A no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def setup(device="auto", dtype="float32", seed=1337):
    """Single process or torchrun, CPU or CUDA, fp32 or bf16 autocast. Seeds torch with seed + rank."""
    global _MASTER
    ddp = "RANK" in os.environ
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        keep_freed_memory()
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    else:
        rank, local_rank, world_size = 0, 0, 1
    _MASTER = rank == 0
    torch.manual_seed(seed + rank)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    # Master weights stay fp32; autocast runs matmuls in bf16 (also fast on modern CPUs). No GradScaler: bf16 has
    # fp32's exponent range.
    def autocast():
        return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    return Setup(ddp, rank, local_rank, world_size, device, rank == 0, autocast)


def cleanup(s):
    if s.ddp:
        # All ranks leave together: a rank that tears gloo down while a peer is still busy (rank 0 writing the last
        # checkpoint) was seen to abort now and then ("terminate called without an active exception"); the rest of
        # those aborts happen at interpreter shutdown, which run_main skips under torchrun
        dist.barrier(device_ids=[s.local_rank] if s.device.startswith("cuda") else None)
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if _MASTER:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(metrics, s):
    """Average a dict of floats over ranks (one collective for all of them)."""
    if not s.ddp:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=s.device)
    dist.all_reduce(t)
    reduced = dict(zip(keys, t.tolist()))
    return {k: reduced[k] / s.world_size for k in metrics}  # the caller's key order, as in a single process


def all_reduce_sum(x, s):
    """Sum a tensor over ranks (in place, returned for chaining)."""
    if s.ddp:
        dist.all_reduce(x)
    return x


def log_line(step, metrics):
    """One |-separated line a person can read."""
    parts = [f"step {step}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
    print0(" | ".join(parts))


def check_finite(value, what, step):
    """Stop before a NaN/inf reaches the weights or a checkpoint; the last good checkpoint stays as it is."""
    if not math.isfinite(float(value)):
        raise RuntimeError(f"step {step}: {what} is {float(value)}; stopping before it corrupts the model "
                           f"(the last checkpoint written is untouched). Lower learning_rate or check the data.")


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, **obj):
    """Atomic write: a crash mid-write leaves the previous checkpoint as it was (temp file, fsync, rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: do not leave a GB-sized partial file behind to keep it full
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, kind=None):
    """Load one of our checkpoints; `kind` ("sft", "reward", "ppo", "ilql") or a tuple of kinds it must be."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "kind" not in ckpt:
        raise ConfigError(f"{path}: not a checkpoint written by this codebase")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and ckpt["kind"] not in kinds:
        raise ConfigError(f"{path}: is a {ckpt['kind']!r} checkpoint, expected {' or '.join(map(repr, kinds))}")
    return ckpt


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_checkpoint_path(init_from):
    return init_from.endswith(".pt") or os.path.isfile(init_from)


def load_model(init_from, heads=None, kind=None, scratch=None):
    """A GPT from `init_from`: "scratch" (with the GPTConfig `scratch`), one of our .pt checkpoints, a local HF
    folder, or a hub id such as "gpt2". `heads` (name -> size) replaces the checkpoint's heads: those of the same
    name and shape keep their weights, new ones are freshly initialised; None keeps the checkpoint's heads as they
    are. Returns (model, checkpoint dict or None)."""
    if init_from == "resume":  # the script resolves it to its own out_dir/ckpt.pt; reaching here is a bug
        raise ConfigError("init_from='resume' must be resolved to a checkpoint path before load_model")
    if init_from == "scratch":
        if scratch is None:
            raise ConfigError("init_from='scratch' needs a model size (n_layer, n_head, n_embd, block_size)")
        return GPT(GPTConfig(**{**asdict(scratch), "heads": dict(heads or {})})), None
    if is_checkpoint_path(init_from):
        ckpt = load_checkpoint(init_from, kind)
        heads = ckpt["model_config"].get("heads", {}) if heads is None else heads
        mc = GPTConfig(**{**ckpt["model_config"], "heads": dict(heads)})
        model = GPT(mc)
        sd = ckpt["model"]
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if not k.startswith("heads.") or (k in own and own[k].shape == v.shape)}
        missing = [k for k in model.load_state_dict(sd, strict=False).missing_keys if not k.startswith("heads.")]
        if missing:
            raise ConfigError(f"{init_from}: checkpoint lacks {missing[:5]}")
        return model, ckpt
    try:
        return GPT.from_pretrained(init_from, heads=dict(heads or {})), None
    except ValueError as e:  # not a GPT-2 folder, not on the hub, ...: a wrong setting (the message names it)
        raise ConfigError(str(e)) from e


# ---------------------------------------------------------------------------- optimisation
def make_optimizer(model, learning_rate, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8):
    """AdamW; weight decay on matrices only (not biases, LayerNorms). fused=True: ~10x faster steps on CPU too."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)


def lr_at(step, learning_rate, warmup_iters, max_iters, min_lr_ratio=0.1):
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate at max_iters."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    progress = min(1.0, (step - warmup_iters) / max(1, max_iters - warmup_iters))
    return learning_rate * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Timer:
    """ETA from the mean step time so far."""

    def __init__(self, total, start=0):
        self.t0, self.total, self.start = time.time(), total, start

    def eta(self, step):
        done = step + 1 - self.start
        left = (time.time() - self.t0) / max(1, done) * (self.total - step - 1)
        return f"{int(left // 60)}m{int(left % 60):02d}s"


# ---------------------------------------------------------------------------- data order, logs, reward functions
def batch_indices(step, batch_size, n, seed):
    """Indices of the `batch_size` examples of global batch `step`: consecutive slices of an endless stream of
    epochs, each a permutation of range(n) seeded by (seed, epoch). A pure function of (seed, step), so a resumed
    run reads exactly what an uninterrupted one does."""
    idx, g = [], step * batch_size
    while len(idx) < batch_size:
        epoch, i = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(n - i, batch_size - len(idx))
        idx += perm[i:i + take].tolist()
        g += take
    return idx


@contextmanager
def rank0_first(s):
    """Rank 0 runs the block first (datasets writes its cache), the other ranks after (they read it)."""
    if s.ddp and not s.master:
        dist.barrier()
    yield
    if s.ddp and s.master:
        dist.barrier()


def start_log(out_dir, resume):
    """out_dir/log.jsonl, for append_jsonl (rank 0 only). A fresh run starts a fresh log, or an earlier run's rows
    would mix into its curves; a resumed run appends to it."""
    path = os.path.join(out_dir, "log.jsonl")
    os.makedirs(out_dir, exist_ok=True)
    if not resume and os.path.exists(path):
        os.remove(path)
    return path


def append_jsonl(path, record):
    """Append one JSON line (metrics logs: rank 0 only)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def load_reward_fn(spec):
    """"module:function" -> the function; a ConfigError naming reward_fn and the problem otherwise."""
    module_name, sep, fn_name = spec.partition(":")
    if not sep or not module_name or not fn_name:
        raise ConfigError(f"reward_fn {spec!r}: expected 'module:function', e.g. 'my_rewards:score'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward_fn {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                          f"is it on PYTHONPATH?") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward_fn {spec!r}: module {module_name!r} has no function {fn_name!r}")
    return fn


def check_scores(scores, n, name):
    """What a reward_fn returned -> (n,) fp32 tensor, or a ValueError saying what is wrong with it."""
    if hasattr(scores, "tolist"):  # torch / numpy arrays
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise ValueError(f"reward_fn {name!r} returned a {type(scores).__name__}; expected a list of {n} floats")
    if len(scores) != n:
        raise ValueError(f"reward_fn {name!r} returned {len(scores)} scores for {n} responses")
    for i, x in enumerate(scores):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise ValueError(f"reward_fn {name!r}: score {i} is {x!r} ({type(x).__name__}), not a number")
        if not math.isfinite(x):
            raise ValueError(f"reward_fn {name!r}: score {i} is {x}, not a finite number")
    return torch.tensor(scores, dtype=torch.float32)
