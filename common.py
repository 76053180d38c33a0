"""
The plumbing every training script shares, written once: config parsing, device/DDP/bf16 setup, checkpoints,
model loading, the LR schedule and the optimizer step, the data order and the logs. Nothing here knows about any
RL algorithm.

Config: each script declares a dataclass; `parse_config` fills it from config files (`config/x.py`, plain Python
assignments, as in nanoGPT) and `--key=value` overrides, in that order. `--help` lists every field with its
default and the comment written beside it.
"""

import ast
import difflib
import inspect
import json
import math
import os
import pickle
import re
import sys
import time
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, fields

import torch
import torch.distributed as dist

import speedups
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
        return _check_type(key, ast.literal_eval(value), default, where)  # dicts, lists, tuples
    except ConfigError:
        raise
    except (ValueError, SyntaxError):
        raise ConfigError(f"{where}: --{key}={value!r} is not a valid {type(default).__name__}") from None


def _check_type(key, value, default, where):
    """A config file's value must have its field's type (an int may stand for a float, a list for a tuple): a string
    "3" for max_iters would otherwise fail deep inside the training loop, after the data and model have loaded."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(default, tuple) and default and isinstance(value, tuple):  # each element: the type of the default's
        return tuple(_check_type(f"{key}[{i}]", v, default[0], where) for i, v in enumerate(value))
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, type(default)):
        raise ConfigError(f"{where}: {key} = {value!r} is a {type(value).__name__}, expected {type(default).__name__}")
    return value


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _check_key(cls, key, where, helper_hint=False):
    names = [f.name for f in fields(cls)]
    if key not in names:
        near = difflib.get_close_matches(key, names, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else f" (valid keys: {', '.join(names)})"
        if helper_hint and not near:  # a config file's own variable: private by its name
            hint += f"; a helper variable of the file is named with a leading underscore, _{key}"
        raise ConfigError(f"{where}: unknown config key {key!r}{hint}")


def run_main(main, config_cls):
    """A script's command line: main(parse_config(config_cls)). A bad key, value, path or data row (ConfigError,
    data.DataError), or a run stopped before a bad value reached the weights (RunError), prints one `error: ...` line
    naming it and exits with status 2, no traceback."""
    from data import DataError
    try:
        main(parse_config(config_cls))
    except (ConfigError, DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank that has finished skips the interpreter's shutdown: there, after destroy_process_group,
        # torch 2.13's gloo threads now and then abort the process ("terminate called without an active exception",
        # exit -6), also in a bare script with no code of ours. Checkpoints are fsynced by now.
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
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"command line: {arg!r} must be written --key=value")
            key, value = arg[2:].split("=", 1)
            _check_key(cls, key, "command line")
            values[key] = _convert(key, value, values[key], "command line")
        else:
            if any(a.startswith("--") for a in argv[:i]):  # it would overwrite them: they would not override
                raise ConfigError(f"command line: config file {arg!r} after a --key=value: give config files first")
            if not os.path.exists(arg):
                raise ConfigError(f"config file {arg!r} not found")
            scope = {}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), scope)
            for key, value in scope.items():
                if key.startswith("_") or inspect.ismodule(value) or inspect.isroutine(value) or inspect.isclass(value):
                    continue  # private helpers, imports
                _check_key(cls, key, arg, helper_hint=True)
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
    """The run's settings on one line; the model-size fields ("scratch only") only when a model is built from scratch,
    as a checkpoint's or a pretrained model's own size overrides them."""
    scratch_only = [k for k, text in _field_help(type(cfg)).items() if text.startswith("scratch only")]
    used = getattr(cfg, "init_from", "scratch") == "scratch"
    print0("config: " + " ".join(f"{k}={v!r}" for k, v in asdict(cfg).items() if used or k not in scratch_only))


# The fields the trainers share (most of them read here: make_optimizer, begin_step, rank_batch) and their ranges,
# checked by check_numbers in every Config that has them
SHARED_NUMBERS = dict(positive=("batch_size", "grad_accum", "eval_interval", "learning_rate", "n_layer", "n_head",
                                "n_embd", "block_size"),
                      non_negative=("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip"),
                      fraction=("min_lr_ratio",), below_one=("beta1", "beta2", "dropout"))


def check_numbers(cfg, positive=(), non_negative=(), fraction=()):
    """A ConfigError naming the first field out of its range: `positive` fields must be > 0 (an int: >= 1),
    `non_negative` >= 0, `fraction` in [0, 1]; the SHARED_NUMBERS too, for every field cfg has; and max_len above
    max_prompt_len (room for a response) where cfg has both. NaN and inf are out of every range. Each script's
    check_config calls it first, so a bad size or rate stops the run before any work."""
    tests = {"> 0": lambda x: x > 0, ">= 0": lambda x: x >= 0, "in [0, 1]": lambda x: 0 <= x <= 1,
             "in [0, 1)": lambda x: 0 <= x < 1}
    names = {"> 0": positive + SHARED_NUMBERS["positive"], ">= 0": non_negative + SHARED_NUMBERS["non_negative"],
             "in [0, 1]": fraction + SHARED_NUMBERS["fraction"], "in [0, 1)": SHARED_NUMBERS["below_one"]}
    for rule, fields_ in names.items():
        for name in fields_:
            value = getattr(cfg, name, None)
            if value is not None and not (math.isfinite(value) and tests[rule](value)):
                rule = ">= 1" if rule == "> 0" and isinstance(value, int) else rule  # a count
                raise ConfigError(f"{name} must be {rule}, not {value!r}")
    if hasattr(cfg, "max_len") and hasattr(cfg, "max_prompt_len") and cfg.max_len <= cfg.max_prompt_len:
        raise ConfigError(f"max_len ({cfg.max_len}) must exceed max_prompt_len ({cfg.max_prompt_len})")


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


def setup(device="auto", dtype="float32", seed=1337, out_dir=None):
    """Single process or torchrun, CPU or CUDA, fp32, TF32 or bf16 autocast. Seeds torch with seed + rank. Under
    torchrun, `out_dir` (where rank 0 writes what every rank reads) must be shared by every rank: check_shared_dir."""
    global _MASTER
    _RUN.update(step=None, saved=None, log_bytes=None)
    if dtype not in ("float32", "tf32", "bfloat16"):
        raise ConfigError(f"dtype must be 'float32', 'tf32' or 'bfloat16', not {dtype!r}")
    ddp = "RANK" in os.environ
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        speedups.enable()  # CPU kernels (speedups.py): the results of the plain code in model.py, faster
    rank, local_rank, world_size = 0, 0, 1
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    _MASTER = rank == 0
    if device.startswith("cuda"):
        # every process on its own GPU, also a single one given cuda:1: CUDA calls without a device (synchronize,
        # barriers, new tensors) go to the current one, GPU 0 unless set
        device = f"cuda:{local_rank}" if ddp else "cuda:0" if device == "cuda" else device
        torch.cuda.set_device(device)
        # TF32 rounds matmul inputs to 10 mantissa bits: only when asked for (dtype="tf32"); model.Head turns it off
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
        if dtype == "bfloat16" and not native_bf16():
            print0(f"warning: {torch.cuda.get_device_name(device)} has no native bf16 (it is emulated, slowly): "
                   f"use dtype='float32' or 'tf32' on this GPU")
    if ddp:
        # device_id binds the process group to this rank's GPU (without it, some torch versions guess the GPU of
        # the first barrier as global rank % GPUs per node)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                device_id=torch.device(device) if device.startswith("cuda") else None)
    torch.manual_seed(seed + rank)
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    # Master weights stay fp32; autocast runs matmuls in bf16 (also fast on modern CPUs). No GradScaler: bf16 has
    # fp32's exponent range.
    def autocast():
        return torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    s = Setup(ddp, rank, local_rank, world_size, device, rank == 0, autocast)
    if out_dir is not None:
        check_shared_dir(out_dir, s)
    return s


ISA_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # AVX-512 BF16 and AMX: what makes a CPU's bf16 matmuls fast


def cpu_info():
    """The CPU, for every absolute number a run prints (machines differ: compare ratios within one run).
    "<model name> (avx512_bf16 yes, amx_bf16 no, amx_tile no)" from /proc/cpuinfo; n/a where it cannot be read."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())  # the first CPU's
    except OSError:  # not Linux
        pass
    flags = info["flags"].split() if "flags" in info else None
    isa = ", ".join(f"{flag} {'n/a' if flags is None else 'yes' if flag in flags else 'no'}" for flag in ISA_FLAGS)
    return f"{info.get('model name', 'n/a')} ({isa})"


def native_bf16():
    """Does the current GPU compute bf16 natively (Ampere and later)? Older ones emulate it, many times slower."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch versions without that argument
        return torch.cuda.get_device_capability()[0] >= 8


def check_shared_dir(out_dir, s):
    """Under torchrun: can every rank read what rank 0 writes in out_dir? Rank 0 alone writes the checkpoints and
    every rank reads them (resume), so on several nodes out_dir must be on a filesystem they share. Rank 0 writes a
    random token there and every rank reads it back; if any rank cannot, every rank raises the same ConfigError
    (a rank stopping alone would leave the others waiting in a collective until the timeout). Any run: a ConfigError
    if out_dir cannot be made (a file in the way, no permission)."""
    if s.master:  # say so before any data or model is loaded, and make nothing yet (a bad setting may follow)
        existing = os.path.abspath(out_dir)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ConfigError(f"out_dir {out_dir!r} cannot be made: {existing} is a file")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"out_dir {out_dir!r} cannot be made: no permission to write in {existing}")
    if not s.ddp:
        return
    path = os.path.join(out_dir, ".shared_check")
    token = torch.zeros(1, dtype=torch.int64, device=s.device)
    if s.master:
        token += int.from_bytes(os.urandom(7), "little")  # not the file an earlier run left on another node
        os.makedirs(out_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(str(token.item()))
    dist.broadcast(token, 0)  # after the write: every rank looks once the file is there
    try:
        with open(path) as f:
            unreadable = int(f.read() != str(token.item()))
    except OSError:
        unreadable = 1
    unreadable = all_reduce_sum(torch.tensor([unreadable], device=s.device), s).item()  # also: all have read it
    if s.master:
        os.remove(path)
    if unreadable:
        raise ConfigError(f"out_dir {out_dir!r}: {unreadable} of {s.world_size} ranks cannot read the file rank 0 "
                          f"wrote there; with several nodes out_dir must be on a filesystem every node shares "
                          f"(rank 0 writes the checkpoints, every rank reads them)")


def wrap_ddp(model, s):
    """DistributedDataParallel under torchrun, the model itself otherwise. DDP broadcasts rank 0's weights, so every
    rank starts identical whatever its seed, and averages gradients over ranks in backward."""
    if not s.ddp:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[s.local_rank] if "cuda" in s.device else None)


_KEEP_ALIVE = []  # torchrun: the process group, kept until run_main's os._exit (see cleanup)


def cleanup(s):
    if s.ddp:
        # All ranks leave together: a rank that tears gloo down while a peer is still busy (rank 0 writing the last
        # checkpoint) was seen to abort now and then ("terminate called without an active exception"); the rest of
        # those aborts happen at interpreter shutdown, which run_main skips under torchrun
        dist.barrier(device_ids=[s.local_rank] if s.device.startswith("cuda") else None)
        # Without this reference, the process group's C++ destructor would run when main returns and DDP drops the
        # last one: it joins gloo's worker thread while holding the GIL, and that thread may still be freeing the
        # barrier's tensors, which needs the GIL: a deadlock, seen now and then (the rank never exits). Kept, the
        # group is never destroyed: run_main ends a torchrun process with os._exit.
        _KEEP_ALIVE.append(dist.group.WORLD)
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


class RunError(RuntimeError):
    """A run stopped before a bad value reached the weights or a checkpoint: a NaN loss or gradient, a reward_fn that
    failed. run_main prints it as one `error:` line."""


# the step under way (begin_step), the step of the last checkpoint saved or resumed, and the size of the log when the
# resumed checkpoint was written (start_log cuts the log back to it)
_RUN = dict(step=None, saved=None, log_bytes=None)


def run_error(message, step=None):
    """RunError("step N: <message>; the last checkpoint, at step M, is intact"), from what this process knows (step:
    default, the one under way; the checkpoint: rank 0 wrote it or every rank resumed from it)."""
    step = _RUN["step"] if step is None else step
    where = "" if step is None else f"step {step}: "
    if _RUN["saved"] is not None:
        message += f"; the last checkpoint, at step {_RUN['saved']}, is intact"
    elif step is not None and _MASTER:
        message += "; no checkpoint was written yet"
    return RunError(where + message)


def check_finite(value, what, step):
    """Stop before a NaN/inf reaches the weights or a checkpoint; the last good checkpoint stays as it is."""
    if not math.isfinite(float(value)):
        raise run_error(f"{what} is {float(value)}, stopping before it reaches the weights (lower learning_rate or "
                        f"check the data)", step)


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, **obj):
    """Atomic write: a crash mid-write leaves the previous checkpoint as it was (temp file, fsync, rename). It records
    how long the run's log beside it is, for a resume from it to cut the log back to that (start_log)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    obj = {**obj, "world_size": _world_size()}  # a resume compares it
    log = os.path.join(os.path.dirname(path), "log.jsonl")
    if os.path.exists(log):
        obj = {**obj, "log_bytes": os.path.getsize(log)}
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
    _RUN["saved"] = obj.get("step")


def _world_size():
    """The number of processes of this run (1 without torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def load_checkpoint(path, kind=None):
    """Load one of our checkpoints; `kind` ("sft", "reward", "ppo", "grpo", "dpo", "ilql") or a tuple of kinds it
    must be."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path!r} not found")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path}: not a readable checkpoint (not the zip archive torch.save writes; cut short?)")
    try:
        ckpt = _load_one_file(path)
    except pickle.UnpicklingError as e:  # torch's message ends with advice to load it unsafely: not for us to give
        raise ConfigError(f"{path}: not a checkpoint of this codebase (it holds Python objects other than tensors "
                          f"and plain containers; not loaded, as that could run code from the file)") from e
    except Exception as e:
        raise ConfigError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first_line(e)})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "kind" not in ckpt:
        raise ConfigError(f"{path}: not a checkpoint written by this codebase")
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and ckpt["kind"] not in kinds:
        raise ConfigError(f"{path}: is a {ckpt['kind']!r} checkpoint, expected {' or '.join(map(repr, kinds))}")
    return ckpt


def _load_one_file(path):
    """torch.load with mmap: the tensors are read from the file as they are used, not copied into memory by every rank
    at once. torch opens the path twice (the index, then the tensors' bytes), so a save replacing the file in between
    would hand us one save's index over another's tensors. We hold the file open while loading: if the path still
    names the file we hold afterwards, it named it all along (a save never brings back a file it replaced), so both
    opens read it; if not, load again."""
    while True:
        with open(path, "rb") as held:
            unchanged = lambda: os.path.samestat(os.fstat(held.fileno()), os.stat(path))
            try:
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:
                if unchanged():
                    raise
                continue  # a save of another size got in between and broke the load: load the new file
            if unchanged():
                return ckpt


def restore(ckpt, optimizer, cfg):
    """A resumed run's optimizer state from its checkpoint; returns the step to continue from. (Random numbers need no
    state: begin_step seeds each step.) A resume is exact when it runs with the checkpoint's settings; any setting
    that differs (another batch size, number of processes, max_iters where the learning-rate schedule ends at it) is
    named in a note: from there the run does what those settings do. A longer max_iters under a schedule that does
    not depend on it (lr_decay_iters set, or a constant rate) only runs further, as an uninterrupted run would."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])  # the moments, and the checkpoint's settings with them...
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)  # ...which this run's Config replaces (weight_decay, betas; begin_step sets the lr)
    print0(f"resuming at step {ckpt['step']}")
    same_schedule = cfg.lr_decay_iters or cfg.min_lr_ratio == 1  # then max_iters only says where to stop
    ignored = ("init_from", "out_dir") + (("max_iters",) if same_schedule else ())
    changed = [f"{k} {v!r} (was {ckpt['config'][k]!r})" for k, v in asdict(cfg).items()
               if k not in ignored and k in ckpt["config"] and v != ckpt["config"][k]]
    world_size = _world_size()
    if world_size != ckpt.get("world_size", world_size):
        changed.append(f"world_size {world_size} (was {ckpt['world_size']})")
    if changed:
        print0(f"note: resuming with settings other than the checkpoint's run: {', '.join(changed)}")
    if ckpt["step"] >= cfg.max_iters:
        print0(f"note: the checkpoint is at step {ckpt['step']}, max_iters is {cfg.max_iters}: no step left to run")
    _RUN.update(saved=ckpt["step"], log_bytes=ckpt.get("log_bytes"))
    return ckpt["step"]


def first_line(e):
    """An exception's message, first line only (an `error:` line is one line)."""
    return (str(e).strip().splitlines() or [""])[0]


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
def make_optimizer(model, cfg, eps=1e-8):
    """AdamW with the Config's learning_rate, weight_decay, beta1 and beta2; weight decay on matrices only (not biases,
    LayerNorms). fused=True: one kernel for all parameters (per-parameter AdamW is slow on CPU too)."""
    learning_rate, weight_decay, betas = cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=True)


def begin_step(optimizer, step, cfg, s):
    """The start of optimizer step `step`: the Config's learning rate (lr_at over lr_decay_iters, default max_iters)
    on every group, and torch's random numbers (dropout) seeded from (seed, step, rank). Seeding every step makes a
    resumed run draw what an uninterrupted one draws, on any number of GPUs, with no RNG state in the checkpoint,
    and every rank draws its own (so a resume is bit-exact on CPU; on GPUs, up to nondeterministic kernels).
    Returns the learning rate."""
    torch.manual_seed(mix_seed(cfg.seed, step, s.rank))
    _RUN["step"] = step
    lr = lr_at(step, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters, cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def optimizer_step(optimizer, params, grad_clip, step, loss=None):
    """Clip the global gradient norm (grad_clip 0 = no clip), check it (and `loss`, a tensor, if given) is finite,
    step, zero the gradients. Returns the norm before clipping. A NaN/inf stops the run before it reaches the
    weights. Reads both numbers in one host sync (on a GPU, each read waits for the queued kernels)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if loss is not None:
        loss, norm = torch.stack([loss.detach().float(), norm.float()]).tolist()
        check_finite(loss, "loss", step)
    grad_norm = float(norm)
    check_finite(grad_norm, "grad_norm", step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def lr_at(step, learning_rate, warmup_iters, decay_iters, min_lr_ratio=0.1):
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate at decay_iters."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if step >= decay_iters:  # also when the warmup ends at or after decay_iters
        return learning_rate * min_lr_ratio
    progress = (step - warmup_iters) / (decay_iters - warmup_iters)  # warmup_iters <= step < decay_iters
    return learning_rate * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Timer:
    """ETA from the mean step time so far."""

    def __init__(self, total, start=0):
        self.t0, self.total, self.start = time.time(), total, start

    def eta(self, step):
        done = step + 1 - self.start
        left = (time.time() - self.t0) / max(1, done) * (self.total - step - 1)
        return f"{int(left // 60)}m{int(left % 60):02d}s"


# ---------------------------------------------------------------------------- data order, seeds, logs
def mix_seed(seed, *keys):
    """One 63-bit seed from a run's seed and integers such as (step, rank): distinct keys, distinct streams."""
    for k in keys:
        seed = (seed * 1_000_003 + k) % 2**63
    return seed


def batch_indices(step, batch_size, n, seed):
    """Indices of the `batch_size` examples of global batch `step`: consecutive slices of an endless stream of
    epochs, each a permutation of range(n) seeded by (seed, epoch). A pure function of (seed, step), so a resumed
    run reads exactly what an uninterrupted one does."""
    idx, g = [], step * batch_size
    while len(idx) < batch_size:
        epoch, i = divmod(g, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
        take = min(n - i, batch_size - len(idx))
        idx += perm[i:i + take].tolist()
        g += take
    return idx


def rank_batch(step, cfg, n, s):
    """The data of optimizer step `step` out of n examples: (this rank's indices, the whole global batch's). Each rank
    takes a contiguous block of batch_size * grad_accum, so rank r runs exactly the micro-batches r * grad_accum ...
    of one process with world_size times the grad_accum: a torchrun run computes what that process computes (bit for
    bit on CPU; on GPUs up to the rounding of kernels whose order of additions varies from run to run), with dropout
    off, our default: dropout draws from each rank's own seed (begin_step), not from its micro-batches' places."""
    per_rank = cfg.batch_size * cfg.grad_accum
    idx = batch_indices(step, per_rank * s.world_size, n, cfg.seed)
    return idx[s.rank * per_rank:(s.rank + 1) * per_rank], idx


def micro_batches(items, step, cfg, s):
    """This rank's grad_accum micro-batches (lists of batch_size items) of optimizer step `step` (rank_batch)."""
    mine, _ = rank_batch(step, cfg, len(items), s)
    return [[items[i] for i in mine[j:j + cfg.batch_size]] for j in range(0, len(mine), cfg.batch_size)]


@contextmanager
def rank0_first(s):
    """The first rank of each node (local rank 0) runs the block first (datasets writes its cache, one per node), the
    other ranks after (they read it)."""
    first = s.local_rank == 0
    if s.ddp and not first:
        dist.barrier()
    yield
    if s.ddp and first:
        dist.barrier()


def start_log(out_dir, resume, s):
    """log(step, metrics): one |-separated line on stdout and one JSON row in out_dir/log.jsonl, rank 0 only. A fresh
    run starts a fresh log, or an earlier run's rows would mix into its curves; a resumed run cuts the log back to
    where it was when its checkpoint was written (a crashed run logged steps after it, which the resume runs again),
    then appends to it."""
    path = os.path.join(out_dir, "log.jsonl")
    if s.master:
        os.makedirs(out_dir, exist_ok=True)
        if not resume and os.path.exists(path):
            os.remove(path)
        elif resume and _RUN["log_bytes"] is not None and os.path.exists(path):
            os.truncate(path, min(_RUN["log_bytes"], os.path.getsize(path)))

    def log(step, metrics, shown=None):
        """shown: the keys of the printed line (default: all); the JSON row always holds every metric."""
        log_line(step, {k: metrics[k] for k in shown} if shown else metrics)
        if s.master:
            append_jsonl(path, {"step": step, **metrics})
    return log


def append_jsonl(path, record):
    """Append one JSON line (metrics logs: rank 0 only)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
