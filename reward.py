"""
Reward model (RM): a scalar score for a response to a prompt, learned from human preferences (Bradley-Terry).

The algorithm: r(x, y) = a linear "reward" head on GPT-2's final hidden state at the last real token of
prompt + response (the EOS that ends the response; a response cut at max_len: its last kept token). For each pair,
loss = -log sigmoid(r(x, chosen) - r(x, rejected)).

Our choices, where public implementations differ:
- Chosen and rejected go through ONE forward (concatenated along the batch): one call of the model per micro-batch
  instead of two. Dropout is off: the loss sees no dropout noise in the difference it is built on.
- The score is read at the last position where mask == 1, never by looking for a pad/EOS token id (pad == EOS in
  GPT-2), so right- and left-padded rows, or rows with junk after their end, score the same. The head runs in fp32.
- Accuracy counts ties as wrong (a constant model gets none right, not half).
- The loss only sees differences, so the score's offset is arbitrary. After each evaluation we measure the scores of
  a normalisation set (norm_data; the held-out chosen responses by default) and fold "minus their mean" (and, with
  normalize_std, "divided by their std", as OpenAI did so a KL coefficient keeps its meaning) into the head's weight
  and bias of every checkpoint written. Every consumer of a checkpoint (ppo.py, evaluation, `score`) then gets
  normalised scores with no extra code; the numbers are recorded as ckpt["reward_norm"]. The un-normalised head,
  which training continues from, is kept as ckpt["train_head"] for init_from="resume".
- The data order is a pure function of (seed, step), as in sft.py: `init_from="resume"` ends with the weights of an
  uninterrupted run.
- Reads every preference format of data.py: prompt/chosen/rejected, Anthropic HH dialogues, TL;DR comparisons.
Outputs in out_dir: ckpt.pt (always the last step, for resume), best.pt (best held-out accuracy), log.jsonl.

The score r(x, y) is computed by scoring.score_tokens, one function for training here and for every consumer of a
reward model (ppo.py, grpo.py, eval.py, best-of-n sampling).

    python reward.py config/reward_tiny.py
    python reward.py config/reward_tiny.py --normalize_std=True --dtype=bfloat16
    torchrun --standalone --nproc_per_node=2 reward.py config/reward_tiny.py
    torchrun --standalone --nproc_per_node=8 reward.py config/reward_hh_gpt2.py
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from common import (ConfigError, Timer, all_reduce_sum, begin_step, check_finite, check_numbers, cleanup, load_model,
                    make_optimizer, micro_batches, optimizer_step, print0, print_config, rank0_first, restore,
                    run_main, save_checkpoint, setup, start_log, wrap_ddp)
from data import EOS, DataError, load_preferences, load_sft, pad_right, tokenize_example
from model import GPTConfig
from scoring import score_tokens


@dataclass
class Config:
    # model
    init_from: str = "out-sft/ckpt.pt"  # an SFT .pt | gpt2..gpt2-xl | HF folder | hub id | scratch | resume
    n_layer: int = 12  # scratch only (default: GPT-2 124M's shape)
    n_head: int = 12  # scratch only
    n_embd: int = 768  # scratch only
    block_size: int = 1024  # scratch only
    # data
    data: str = "Anthropic/hh-rlhf"  # preferences: prompt/chosen/rejected, HH chosen/rejected, TL;DR comparisons
    data_subset: str = ""  # hub dataset config name ("" = none)
    data_split: str = "train"  # training split (slices allowed: "train[:90%]")
    eval_split: str = "test"  # held-out split, e.g. "train[90%:]"
    skip_bad: bool = False  # drop (and count) bad rows instead of stopping at the first one
    max_prompt_len: int = 384  # prompts are left-truncated to this many tokens
    max_len: int = 512  # prompt + response (+ EOS) tokens; longer responses are cut (and lose their EOS)
    # Bradley-Terry: normalisation of the scores
    norm_data: str = ""  # normalisation set: "" = the held-out chosen responses, else SFT-format (prompt/completion)
    normalize_std: bool = False  # also scale the normalisation set's scores to std 1 (not only mean 0)
    # optimisation
    batch_size: int = 8  # preference pairs per micro-batch, per rank (2 * batch_size sequences per forward)
    grad_accum: int = 1  # micro-batches per optimizer step, per rank
    max_iters: int = 1000  # optimizer steps
    learning_rate: float = 1e-5  # peak LR
    warmup_iters: int = 50  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio * learning_rate (1 = constant)
    lr_decay_iters: int = 0  # steps of the cosine schedule (0 = max_iters); keep it fixed to stop and resume a run
    weight_decay: float = 0.0  # AdamW weight decay on matrices (not biases, LayerNorms)
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.999  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    # evaluation, checkpoints, logging
    out_dir: str = "out-rm"  # ckpt.pt (last, for resume), best.pt (best eval accuracy), log.jsonl
    eval_interval: int = 200  # evaluate, normalise and write checkpoints every this many steps (and at the end)
    eval_batch_size: int = 16  # sequences per eval forward, per rank
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | tf32 (CUDA) | bfloat16 (autocast; weights, optimizer, reward head, loss: fp32)
    seed: int = 1337  # seeds the init and the data order (torch gets seed + rank)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute blocks in backward: +1 forward, activations of 1 block not all


# ----------------------------------------------------------------------------- the algorithm
def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry: mean -log sigmoid(r_chosen - r_rejected) (fp32), and accuracy with ties counted as wrong."""
    margin = r_chosen.float() - r_rejected.float()
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def pairs_to_batch(pairs):
    """[(chosen_ids, rejected_ids)] -> right-padded (2B, T) tokens and mask: all chosen rows, then all rejected."""
    return pad_right([c for c, _ in pairs] + [r for _, r in pairs])


@torch.no_grad()
def fold_normalization(weight, bias, mean, std=1.0):
    """In place: a linear head (weight, bias) that gave r now gives (r - mean) / std."""
    weight.div_(std)
    bias.sub_(mean).div_(std)


def forward_backward(model, batches, s):
    """Accumulate into .grad the gradient of the mean Bradley-Terry loss over the pairs of `batches` of every rank.
    Returns (loss, accuracy, n_tokens) of those pairs: floats, identical on every rank."""
    total = torch.zeros(3, device=s.device)  # (summed loss, correct pairs, real tokens) of this rank
    # on the device up front: a copy to the GPU inside the loop would wait for the kernels queued before it
    collated = [tuple(t.to(s.device) for t in pairs_to_batch(pairs)) for pairs in batches]
    for i, (pairs, (tokens, mask)) in enumerate(zip(batches, collated)):
        # DDP all-reduces gradients in backward; only the last micro-batch of the step needs to.
        with model.no_sync() if s.ddp and i < len(batches) - 1 else nullcontext():
            with s.autocast():
                scores = score_tokens(model, tokens, mask, right_padded=True)  # (2B,): chosen rows, then rejected
            loss, acc = bt_loss(scores[:len(pairs)], scores[len(pairs):])
            # Every micro-batch holds batch_size pairs, so the step's mean is the sum of the grad_accum micro-batch
            # means / grad_accum. DDP then averages over ranks, which hold as many pairs each: the global mean.
            (loss / len(batches)).backward()
        total += torch.stack([loss.detach() * len(pairs), acc * len(pairs), mask.sum().float()])
    n_pairs = sum(len(pairs) for pairs in batches) * s.world_size
    loss_sum, correct, n_tokens = all_reduce_sum(total, s).tolist()
    return loss_sum / n_pairs, correct / n_pairs, n_tokens


# ----------------------------------------------------------------------------- data, model, evaluation
def check_config(cfg):
    check_numbers(cfg, positive=("max_prompt_len", "max_len", "eval_batch_size"))


def tokenize_pairs(prefs, cfg):
    """Preferences -> [(prompt + chosen + EOS, prompt + rejected + EOS)] token lists, without the pairs that are
    identical once truncated (no preference left to learn); and how many were dropped."""
    pairs = []
    for p in prefs:
        prompt_ids, c = tokenize_example(p.prompt, p.chosen, cfg.max_prompt_len, cfg.max_len)
        _, r = tokenize_example(p.prompt, p.rejected, cfg.max_prompt_len, cfg.max_len)
        if c != r:
            pairs.append((prompt_ids + c, prompt_ids + r))
    return pairs, len(prefs) - len(pairs)


def load_data(cfg, s):
    """(train, eval) pairs of token lists, and the normalisation set's token lists (None: the held-out chosen ones)."""
    with rank0_first(s):
        train_prefs = load_preferences(cfg.data, cfg.data_split, cfg.data_subset, cfg.skip_bad)
        eval_prefs = load_preferences(cfg.data, cfg.eval_split, cfg.data_subset, cfg.skip_bad)
        norm_rows = load_sft(cfg.norm_data, "train", "", cfg.skip_bad) if cfg.norm_data else None
    (train_pairs, identical), (eval_pairs, eval_identical) = (tokenize_pairs(p, cfg) for p in (train_prefs, eval_prefs))
    cut = sum(c[-1] != EOS or r[-1] != EOS for c, r in train_pairs)
    print0(f"data: {len(train_pairs)} train / {len(eval_pairs)} eval pairs; dropped {identical + eval_identical} pairs "
           f"identical after truncation; {cut} train pairs have a response cut at max_len")
    if not train_pairs or not eval_pairs:
        raise DataError(f"{cfg.data}: no usable preference pairs in {cfg.data_split!r} or {cfg.eval_split!r}")
    norm_seqs = None if norm_rows is None else [
        sum(tokenize_example(ex.prompt, ex.completion, cfg.max_prompt_len, cfg.max_len), []) for ex in norm_rows]
    return train_pairs, eval_pairs, norm_seqs


def build_model(cfg, s):
    """The GPT with a "reward" head to train, on the device, and the checkpoint it came from (a resume's, or None)."""
    resume = cfg.init_from == "resume"
    init = os.path.join(cfg.out_dir, "ckpt.pt") if resume else cfg.init_from
    scratch = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    # resume: out_dir/ckpt.pt must be this script's (another's has no train_head and other optimizer groups)
    model, ckpt = load_model(init, heads={"reward": 1}, kind="reward" if resume else None, scratch=scratch)
    if cfg.max_len > model.config.block_size:
        raise ConfigError(f"max_len ({cfg.max_len}) exceeds the model's block_size ({model.config.block_size})")
    if model.config.dropout != 0:
        raise ConfigError(f"{init}: dropout {model.config.dropout}; the reward model trains with dropout off")
    if resume:  # the checkpoint's head is normalised: continue from the head training left off with
        model.heads["reward"].load_state_dict(ckpt["train_head"])
    model.grad_checkpointing = cfg.grad_checkpointing
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters from {init}")
    return model.to(s.device), ckpt


@torch.no_grad()
def score_seqs(model, seqs, cfg, s):
    """Scores of token lists (B,) fp32, in right-padded batches of eval_batch_size."""
    out = [torch.zeros(0, device=s.device)]
    for j in range(0, len(seqs), cfg.eval_batch_size):
        tokens, mask = pad_right(seqs[j:j + cfg.eval_batch_size])
        with s.autocast():
            out.append(score_tokens(model, tokens.to(s.device), mask.to(s.device), right_padded=True))
    return torch.cat(out)


def mean_std(x, s):
    """Mean and (population) std of the values of x on all ranks, in fp64."""
    x = x.double()
    n, total, squares = all_reduce_sum(torch.stack([x.new_tensor(float(len(x))), x.sum(), (x * x).sum()]), s).tolist()
    mean = total / max(n, 1)
    return mean, math.sqrt(max(squares / max(n, 1) - mean * mean, 0.0))


@torch.no_grad()
def evaluate(model, eval_pairs, norm_seqs, cfg, s):
    """Held-out accuracy, loss and mean margin; mean/std of the held-out scores and of the normalisation set's scores
    (all ranks)."""
    model.eval()
    mine = eval_pairs[s.rank::s.world_size]
    r_chosen = score_seqs(model, [c for c, _ in mine], cfg, s)
    r_rejected = score_seqs(model, [r for _, r in mine], cfg, s)
    margin = (r_chosen - r_rejected).double()
    t = torch.stack([margin.new_tensor(float(len(mine))), -F.logsigmoid(margin).sum(), (margin > 0).double().sum(),
                     margin.sum()])
    n, loss, correct, margin_sum = all_reduce_sum(t, s).tolist()
    reward_mean, reward_std = mean_std(torch.cat([r_chosen, r_rejected]), s)
    norm_scores = r_chosen if norm_seqs is None else score_seqs(model, norm_seqs[s.rank::s.world_size], cfg, s)
    norm_mean, norm_std = mean_std(norm_scores, s)
    model.train()
    return {"eval_loss": loss / n, "eval_acc": correct / n, "eval_margin": margin_sum / n, "reward_mean": reward_mean,
            "reward_std": reward_std, "norm_mean": norm_mean, "norm_std": norm_std}


def score_scale(ev, cfg):
    """The std the saved head divides scores by: norm_std with normalize_std, else 1 (also when all scores equal)."""
    std = ev["norm_std"] if cfg.normalize_std else 1.0
    return std if std >= 1e-6 else 1.0


def save(path, model, optimizer, step, ev, best_eval_acc, cfg):
    """A checkpoint whose reward head gives normalised scores, (r - norm_mean) / std, folded into a copy of the head
    (std = norm_std with normalize_std, else 1). With the optimizer (ckpt.pt, for resume; it also keeps the head
    training continues from as train_head) or without (best.pt)."""
    std = score_scale(ev, cfg)
    if cfg.normalize_std and std != ev["norm_std"]:
        print0(f"the normalisation set's scores have std {ev['norm_std']:.3g}: not scaling them")
    head, sd = model.heads["reward"], model.state_dict()
    sd["heads.reward.weight"], sd["heads.reward.bias"] = head.weight.detach().clone(), head.bias.detach().clone()
    fold_normalization(sd["heads.reward.weight"], sd["heads.reward.bias"], ev["norm_mean"], std)
    extra = dict(optimizer=optimizer.state_dict(), train_head=head.state_dict()) if optimizer else {}
    save_checkpoint(path, kind="reward", model_config=asdict(model.config), model=sd, step=step, config=asdict(cfg),
                    best_eval_acc=best_eval_acc, reward_norm={"mean": ev["norm_mean"], "std": ev["norm_std"],
                                                              "scaled_by": std}, **extra)


# ----------------------------------------------------------------------------- training
def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed, cfg.out_dir)
    print_config(cfg)
    check_config(cfg)
    train_pairs, eval_pairs, norm_seqs = load_data(cfg, s)
    raw_model, ckpt = build_model(cfg, s)
    optimizer = make_optimizer(raw_model, cfg)
    resume = cfg.init_from == "resume"  # then build_model loaded out_dir/ckpt.pt
    start, best_eval_acc = (restore(ckpt, optimizer, cfg), ckpt["best_eval_acc"]) if resume else (0, -1.0)
    ckpt = None  # free the CPU copy of the weights and optimizer state
    model = wrap_ddp(torch.compile(raw_model) if cfg.compile else raw_model, s)  # what trains: compiled, DDP
    log = start_log(cfg.out_dir, resume, s)
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")

    ev_start = ev = {}
    if start == 0:
        ev_start = evaluate(raw_model, eval_pairs, norm_seqs, cfg, s)
        log(0, ev_start, shown=("eval_acc", "eval_loss"))
    timer, metrics = Timer(cfg.max_iters, start), {}
    model.train()
    for step in range(start, cfg.max_iters):
        t0 = time.time()
        lr = begin_step(optimizer, step, cfg, s)
        # 1. chosen and rejected in one forward, the Bradley-Terry loss of this step's global batch, backward
        loss, acc, n_tokens = forward_backward(model, micro_batches(train_pairs, step, cfg, s), s)
        check_finite(loss, "loss", step)  # before the weights or any checkpoint see it
        # 2. clip, step
        grad_norm = optimizer_step(optimizer, raw_model.parameters(), cfg.grad_clip, step)
        metrics = {"loss": loss, "acc": acc, "lr": lr, "grad_norm": grad_norm,
                   "tok_per_s": n_tokens / (time.time() - t0)}
        log(step, {**metrics, "eta": timer.eta(step)})

        done = step + 1  # the next step to run: where a resume starts
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            # held-out accuracy; the checkpoints fold the scores' normalisation into the reward head (save)
            ev = evaluate(raw_model, eval_pairs, norm_seqs, cfg, s)
            best_eval_acc, is_best = max(best_eval_acc, ev["eval_acc"]), ev["eval_acc"] > best_eval_acc
            log(done, {**ev, "best_eval_acc": best_eval_acc})  # the weights after `done` steps
            if s.master:  # best.pt first: a crash between the two leaves ckpt.pt behind, and its resume redoes both
                if is_best:
                    save(best_path, raw_model, None, done, ev, best_eval_acc, cfg)
                save(ckpt_path, raw_model, optimizer, done, ev, best_eval_acc, cfg)

    if s.master and ev:
        scale = score_scale(ev, cfg)
        print0(f"saved {ckpt_path} and {best_path}; scores shifted by {-ev['norm_mean']:.4g}"
               + (f" and scaled by 1/{scale:.4g}" if scale != 1.0 else ""))
    cleanup(s)
    return {**metrics, **ev, "eval_acc_start": ev_start.get("eval_acc"), "eval_loss_start": ev_start.get("eval_loss"),
            "best_eval_acc": best_eval_acc}


if __name__ == "__main__":
    run_main(main, Config)
