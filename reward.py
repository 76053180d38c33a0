"""
Reward model (RM): a scalar score for a response to a prompt, learned from human preferences (Bradley-Terry).

The algorithm: r(x, y) = a linear "reward" head on GPT-2's final hidden state at the last real token of
prompt + response (the EOS that ends the response). For each pair, loss = -log sigmoid(r(x, chosen) - r(x, rejected)).

Our choices, where public implementations differ:
- Chosen and rejected go through ONE forward (concatenated along the batch), dropout off: both see the same weights
  and normalisation, and the loss sees no dropout noise in the difference it is built on.
- The score is read at the last position where mask == 1, never by looking for a pad/EOS token id (pad == EOS in
  GPT-2), so right- and left-padded rows, or rows with junk after their end, score the same. The head runs in fp32.
- Accuracy counts ties as wrong (a constant model gets 0%, not 50%).
- The loss only sees differences, so the score's offset is arbitrary. After each evaluation we measure the scores of
  a reference set (the held-out chosen responses by default) and fold "minus their mean" (and, with
  normalize_std, "divided by their std", as OpenAI did so a KL coefficient keeps its meaning) into the head's weight
  and bias of every checkpoint written. Every consumer of a checkpoint (ppo.py, evaluation, `score`) then gets
  normalised scores with no extra code; the numbers are recorded as ckpt["reward_norm"]. The un-normalised head,
  which training continues from, is kept as ckpt["train_head"] for init_from="resume".
- Reads every preference format of data.py: prompt/chosen/rejected, Anthropic HH dialogues, TL;DR comparisons.

Public API for other scripts: score_tokens, load_reward_model, score, bt_loss.

    python reward.py config/reward_tiny.py
    python reward.py config/reward_tiny.py --normalize_std=True --dtype=bfloat16
    torchrun --standalone --nproc_per_node=2 reward.py config/reward_tiny.py
    torchrun --standalone --nproc_per_node=8 reward.py config/reward_hh_gpt2.py
"""

import importlib
import math
import numbers
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from common import (ConfigError, Timer, all_reduce_sum, append_jsonl, batch_indices, check_finite, cleanup, load_model,
                    log_line, lr_at, make_optimizer, print0, print_config, rank0_first, rng_state, run_main,
                    save_checkpoint, set_rng_state, setup, start_log)
from data import EOS, DataError, load_preferences, load_sft, pad_right, tokenize_example
from model import GPTConfig


@dataclass
class Config:
    # model
    init_from: str = "out-sft-hh/ckpt.pt"  # an SFT .pt | gpt2..gpt2-xl | HF folder | scratch | resume
    n_layer: int = 12  # scratch only
    n_head: int = 12  # scratch only
    n_embd: int = 768  # scratch only
    block_size: int = 1024  # scratch only
    # data
    data: str = "Anthropic/hh-rlhf"  # preferences: prompt/chosen/rejected, HH chosen/rejected, TL;DR comparisons
    data_subset: str = None  # hub dataset config name, if any
    data_split: str = "train"  # training split (slices allowed: "train[:90%]")
    eval_split: str = "test"  # held-out split, e.g. "train[90%:]"
    skip_bad: bool = False  # drop (and count) bad rows instead of stopping at the first one
    max_prompt_len: int = 384  # prompts are left-truncated to this many tokens
    max_len: int = 512  # prompt + response (+ EOS) tokens; longer responses are cut (and lose their EOS)
    # normalisation of the scores
    norm_data: str = ""  # reference set: "" = held-out chosen responses, or an SFT-format source (prompt/completion)
    normalize_std: bool = False  # also scale the reference scores to std 1 (not only mean 0)
    # training
    out_dir: str = "out-rm"  # ckpt.pt (last, for resume), best.pt (best eval accuracy), log.jsonl
    batch_size: int = 8  # preference pairs per micro-batch, per rank (2 * batch_size sequences per forward)
    grad_accum: int = 1  # micro-batches per optimizer step, per rank
    max_iters: int = 1000  # optimizer steps
    learning_rate: float = 1e-5  # peak LR
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio * learning_rate
    warmup_iters: int = 50  # linear warmup steps
    lr_decay_iters: int = 0  # steps of the cosine schedule (0 = max_iters); keep it fixed to stop and resume a run
    weight_decay: float = 0.0  # AdamW weight decay on matrices (not biases, LayerNorms)
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.95  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    # evaluation
    eval_interval: int = 200  # evaluate, normalise and write checkpoints every this many steps (and at the end)
    eval_batch_size: int = 16  # sequences per eval forward, per rank
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "bfloat16"  # float32 | bfloat16 (autocast; the reward head and the loss run in fp32)
    seed: int = 1337  # seeds the init, the data order and the samples (torch gets seed + rank)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute blocks in backward: +1 forward, activations of 1 block not all


# ----------------------------------------------------------------------------- public API
def score_tokens(model, tokens, mask):
    """The "reward" head at the last real token of each row (the last position where mask == 1, so right- and
    left-padded rows alike), in fp32. tokens, mask (B, T) -> (B,) fp32. Gradients flow (training uses it too)."""
    raw = getattr(model, "module", model)
    h = model(tokens, mask)  # (B, T, C)
    last = (torch.arange(tokens.shape[1], device=tokens.device) * mask).argmax(-1)  # (B,) index of last 1
    h_last = h[torch.arange(tokens.shape[0], device=tokens.device), last].float()  # (B, C)
    head = raw.heads["reward"]
    with torch.autocast(tokens.device.type, enabled=False):  # autocast would run the Linear in bf16
        return F.linear(h_last, head.weight.float(), head.bias.float()).squeeze(-1)


def load_reward_model(path, device="cpu"):
    """A kind="reward" checkpoint as a frozen GPT in eval mode (its head already gives normalised scores)."""
    model, _ = load_model(path, heads={"reward": 1}, kind="reward")
    model.to(device).eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def score(model, prompts, responses, batch_size=16, max_prompt_len=None, max_len=None):
    """Scores of (prompt, response) pairs: tokenized with data.tokenize_example (EOS appended), right-padded in
    batches, read by score_tokens. max_len defaults to the model's block_size, max_prompt_len to half of max_len.
    Runs under the caller's autocast, if any; the model should be in eval mode (load_reward_model's is)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or model.config.block_size
    max_prompt_len = max_prompt_len or max_len // 2
    device = next(model.parameters()).device
    seqs = [sum(tokenize_example(p, r, max_prompt_len, max_len), []) for p, r in zip(prompts, responses)]
    scores = []
    for i in range(0, len(seqs), batch_size):
        tokens, mask = pad_right(seqs[i:i + batch_size])
        scores += score_tokens(model, tokens.to(device), mask.to(device)).tolist()
    return scores


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


def make_scorer(reward_model="", reward_fn="", device="cpu", autocast=nullcontext, batch_size=None):
    """The score of sampled responses, for RL: score_fn(prompts, texts, tokens, mask) -> (B,) fp32 scores, from
    exactly one of a reward model checkpoint (read at each row's last real token of tokens/mask = prompt + response,
    in batches of batch_size rows) or a Python reward_fn "module:function", f(prompts, responses) -> list of floats
    (trlx style). Returns (score_fn, the reward model or None)."""
    if bool(reward_model) == bool(reward_fn):
        raise ConfigError("set exactly one of reward_model (a reward.py checkpoint) and reward_fn ('module:function')")
    if reward_fn:
        fn = load_reward_fn(reward_fn)

        def score_fn(prompts, texts, tokens, mask):
            return check_scores(fn(list(prompts), list(texts)), len(texts), reward_fn).to(tokens.device)
        return score_fn, None
    rm = load_reward_model(reward_model, device)

    @torch.no_grad()
    def score_fn(prompts, texts, tokens, mask):
        size = batch_size or len(tokens)
        with autocast():
            return torch.cat([score_tokens(rm, t, m).float() for t, m in zip(tokens.split(size), mask.split(size))])
    return score_fn, rm


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry: mean -log sigmoid(r_chosen - r_rejected) (fp32), and accuracy with ties counted as wrong."""
    margin = r_chosen.float() - r_rejected.float()
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


# ----------------------------------------------------------------------------- normalisation
@torch.no_grad()
def fold_normalization(weight, bias, mean, std=1.0):
    """In place: a linear head (weight, bias) that gave r now gives (r - mean) / std."""
    weight.div_(std)
    bias.sub_(mean).div_(std)


def pairs_to_batch(pairs):
    """[(chosen_ids, rejected_ids)] -> right-padded (2B, T) tokens and mask: all chosen rows, then all rejected."""
    return pad_right([c for c, _ in pairs] + [r for _, r in pairs])


def main(cfg):
    # ------------------------------------------------------------------------- setup
    s = setup(cfg.device, cfg.dtype, cfg.seed)
    print_config(cfg)
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")

    # ------------------------------------------------------------------------- data
    def tokenize(prefs):
        pairs, ties = [], 0
        for p in prefs:
            prompt_ids, c = tokenize_example(p.prompt, p.chosen, cfg.max_prompt_len, cfg.max_len)
            _, r = tokenize_example(p.prompt, p.rejected, cfg.max_prompt_len, cfg.max_len)
            if c == r:  # identical once truncated: no preference left to learn
                ties += 1
                continue
            pairs.append((prompt_ids + c, prompt_ids + r))
        return pairs, ties

    with rank0_first(s):
        train_prefs = load_preferences(cfg.data, cfg.data_split, cfg.data_subset, cfg.skip_bad)
        eval_prefs = load_preferences(cfg.data, cfg.eval_split, cfg.data_subset, cfg.skip_bad)
        norm_rows = load_sft(cfg.norm_data, "train", None, cfg.skip_bad) if cfg.norm_data else None
    (train_pairs, t1), (eval_pairs, t2) = tokenize(train_prefs), tokenize(eval_prefs)
    cut = sum(c[-1] != EOS or r[-1] != EOS for c, r in train_pairs)
    print0(f"data: {len(train_pairs)} train / {len(eval_pairs)} eval pairs; dropped {t1 + t2} pairs identical "
           f"after truncation; {cut} train pairs have a response cut at max_len")
    if not train_pairs or not eval_pairs:
        raise DataError(f"{cfg.data}: no usable preference pairs in {cfg.data_split!r} or {cfg.eval_split!r}")
    if norm_rows is None:  # default reference set: the held-out chosen responses
        norm_seqs = [c for c, _ in eval_pairs]
    else:
        norm_seqs = [sum(tokenize_example(ex.prompt, ex.completion, cfg.max_prompt_len, cfg.max_len), [])
                     for ex in norm_rows]

    # ------------------------------------------------------------------------- model
    init = ckpt_path if cfg.init_from == "resume" else cfg.init_from
    scratch = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    # resume: out_dir/ckpt.pt must be this script's (another's has no train_head and other optimizer groups)
    raw, ckpt = load_model(init, heads={"reward": 1}, kind="reward" if cfg.init_from == "resume" else None,
                           scratch=scratch)
    if cfg.max_len > raw.config.block_size:
        raise ConfigError(f"max_len ({cfg.max_len}) exceeds the model's block_size ({raw.config.block_size})")
    if raw.config.dropout != 0:
        raise ConfigError(f"{init}: dropout {raw.config.dropout}; the reward model trains with dropout off")
    raw.grad_checkpointing = cfg.grad_checkpointing
    raw.to(s.device)
    head = raw.heads["reward"]
    print0(f"model: {raw.num_params() / 1e6:.2f}M parameters from {init}")
    model = torch.compile(raw) if cfg.compile else raw
    if s.ddp:  # DDP broadcasts rank 0's weights: every rank starts identical whatever its seed
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[s.local_rank] if s.device.startswith("cuda") else None)

    # ------------------------------------------------------------------------- optimizer
    opt = make_optimizer(raw, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    start_step, best_eval_acc = 0, -1.0
    if cfg.init_from == "resume":
        with torch.no_grad():  # continue from the un-normalised head training left off with
            head.weight.copy_(ckpt["train_head"]["weight"])
            head.bias.copy_(ckpt["train_head"]["bias"])
        opt.load_state_dict(ckpt["optimizer"])
        start_step, best_eval_acc = ckpt["step"], ckpt.get("best_eval_acc", -1.0)
        set_rng_state(ckpt["rng"])
        print0(f"resuming from {ckpt_path} at step {start_step}")
    ckpt = None  # free the CPU copy of the weights and optimizer state
    decay_iters = cfg.lr_decay_iters or cfg.max_iters

    # ------------------------------------------------------------------------- eval, normalisation, checkpoints
    @torch.no_grad()
    def score_all(seqs):
        """Scores of this rank's shard of `seqs` (fp32, in order)."""
        out = []
        for j in range(0, len(seqs), cfg.eval_batch_size):
            tokens, mask = pad_right(seqs[j:j + cfg.eval_batch_size])
            with s.autocast():
                out.append(score_tokens(raw, tokens.to(s.device), mask.to(s.device)))
        return torch.cat(out) if out else torch.zeros(0, device=s.device)

    def sums(x):  # (n, sum, sum of squares) in fp64, for a mean and std over all ranks
        x = x.double()
        return torch.stack([torch.tensor(float(len(x)), dtype=torch.float64, device=x.device), x.sum(), (x * x).sum()])

    def mean_std(t):
        n, s1, s2 = t.tolist()
        mean = s1 / max(n, 1)
        return mean, math.sqrt(max(s2 / max(n, 1) - mean * mean, 0.0))

    def evaluate():
        """Held-out accuracy, loss, margin, reward mean/std, and the reference set's mean/std (all ranks)."""
        raw.eval()
        mine = eval_pairs[s.rank::s.world_size]
        rc, rr = score_all([c for c, _ in mine]), score_all([r for _, r in mine])
        margin = (rc - rr).double()
        t = torch.stack([torch.tensor(float(len(mine)), dtype=torch.float64, device=s.device),
                         -F.logsigmoid(margin).sum(), (margin > 0).double().sum(), margin.sum()])
        t, rewards = all_reduce_sum(t, s), all_reduce_sum(sums(torch.cat([rc, rr])), s)
        ref = sums(rc) if norm_rows is None else sums(score_all(norm_seqs[s.rank::s.world_size]))
        ref_mean, ref_std = mean_std(all_reduce_sum(ref, s))
        raw.train()
        n = t[0].item()
        r_mean, r_std = mean_std(rewards)
        return {"eval_loss": t[1].item() / n, "eval_acc": t[2].item() / n, "eval_margin": t[3].item() / n,
                "reward_mean": r_mean, "reward_std": r_std, "ref_mean": ref_mean, "ref_std": ref_std}

    def save(path, step, ev, full):
        # Fold the normalisation into a copy of the weights: every consumer of the checkpoint gets normalised scores.
        std = ev["ref_std"] if cfg.normalize_std else 1.0
        if std < 1e-6:
            print0(f"reference scores have std {std:.3g}: not scaling them")
            std = 1.0
        sd = raw.state_dict()
        sd["heads.reward.weight"], sd["heads.reward.bias"] = head.weight.detach().clone(), head.bias.detach().clone()
        fold_normalization(sd["heads.reward.weight"], sd["heads.reward.bias"], ev["ref_mean"], std)
        extra = {}
        if full:  # ckpt.pt: what an exact resume needs
            extra = dict(optimizer=opt.state_dict(), rng=rng_state(),
                         train_head={"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()})
        save_checkpoint(path, kind="reward", model_config=asdict(raw.config), model=sd, step=step,
                        config=asdict(cfg), best_eval_acc=best_eval_acc,
                        reward_norm={"mean": ev["ref_mean"], "std": ev["ref_std"], "scaled_by": std}, **extra)

    log_path = start_log(cfg.out_dir, resume=cfg.init_from == "resume") if s.master else None

    def log(metrics):
        if s.master:
            append_jsonl(log_path, metrics)

    # ------------------------------------------------------------------------- training loop
    timer, metrics, ev = Timer(cfg.max_iters, start_step), {}, {}
    ev_start = evaluate() if start_step == 0 else {}
    if ev_start:
        log_line(0, {"eval_acc": ev_start["eval_acc"], "eval_loss": ev_start["eval_loss"]})
    model.train()
    global_pairs = cfg.batch_size * cfg.grad_accum * s.world_size
    for step in range(start_step, cfg.max_iters):
        t0 = time.time()
        lr = lr_at(step, cfg.learning_rate, cfg.warmup_iters, decay_iters, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        mine = [train_pairs[i] for i in batch_indices(step, global_pairs, len(train_pairs), cfg.seed)]
        mine = mine[s.rank::s.world_size]
        total = torch.zeros(3, device=s.device)  # (summed loss, correct pairs, real tokens) of this rank
        for k in range(cfg.grad_accum):
            chunk = mine[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            tokens, mask = (t.to(s.device) for t in pairs_to_batch(chunk))
            with nullcontext() if not s.ddp or k == cfg.grad_accum - 1 else model.no_sync():
                with s.autocast():
                    rewards = score_tokens(model, tokens, mask)  # (2B,): chosen rows, then rejected rows
                loss, acc = bt_loss(rewards[:len(chunk)], rewards[len(chunk):])
                # Every micro-batch holds batch_size pairs, so the mean over the step is the sum of the micro-batch
                # means / grad_accum. DDP then averages over ranks: the gradient is that of the global mean.
                (loss / cfg.grad_accum).backward()
            total += torch.stack([loss.detach() * len(chunk), acc * len(chunk), mask.sum().float()])
        total = all_reduce_sum(total, s)
        loss_mean = total[0].item() / global_pairs
        check_finite(loss_mean, "loss", step)  # before the weights or any checkpoint see it
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
        check_finite(grad_norm.item(), "grad_norm", step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        metrics = {"loss": loss_mean, "acc": total[1].item() / global_pairs, "lr": lr, "grad_norm": grad_norm.item(),
                   "tok/s": int(total[2].item() / (time.time() - t0)), "eta": timer.eta(step)}
        log_line(step, metrics)
        log({"step": step, **metrics})
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters:
            ev = evaluate()
            best = ev["eval_acc"] > best_eval_acc
            best_eval_acc = max(best_eval_acc, ev["eval_acc"])
            log_line(step, ev)
            log({"step": step, **ev})
            if s.master:
                save(ckpt_path, step + 1, ev, full=True)  # step + 1: the next step to run, where a resume starts
                if best:
                    save(best_path, step + 1, ev, full=False)

    # ------------------------------------------------------------------------- the end: normalised scores
    if s.master and ev:
        print0(f"saved {ckpt_path} and {best_path}; scores shifted by {-ev['ref_mean']:.4g}"
               + (f" and scaled by 1/{ev['ref_std']:.4g}" if cfg.normalize_std else ""))
    cleanup(s)
    return {**metrics, **ev, "eval_acc_start": ev_start.get("eval_acc"),
            "eval_loss_start": ev_start.get("eval_loss"), "best_eval_acc": best_eval_acc}


if __name__ == "__main__":
    run_main(main, Config)
