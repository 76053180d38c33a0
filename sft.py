"""
Supervised fine-tuning (SFT): teach GPT-2 to continue a prompt with a demonstration.

The algorithm: next-token cross-entropy on (prompt, completion) pairs, with the loss on the completion tokens only.

Our choices, where public implementations differ:
- Prompt and completion are tokenized separately and concatenated (data.tokenize_example), so the mask boundary is
  exact; the EOS that ends the completion is a target (a model that never learns to stop is a classic SFT bug).
- The loss is the mean over the target tokens of the whole optimizer step (all micro-batches, all ranks), not a
  mean of per-micro-batch means, which overweights short completions and makes the result depend on how a batch is
  split. Gradient accumulation and DDP therefore give the gradient of one big batch.
- The data order is a pure function of (seed, step): `init_from="resume"` ends with the weights of an
  uninterrupted run (bit for bit on CPU; on GPUs, up to nondeterministic kernels). The LR schedule decays over
  `lr_decay_iters` (default max_iters), nanoGPT style, so a run can be stopped early and resumed with the same
  schedule.
- A preference set (Anthropic HH, prompt/chosen/rejected, TL;DR) is SFT data too: data_format="chosen" trains on
  its chosen responses, with the prompt split off by data.load_preferences.
- Under bf16 autocast the LM head runs in bf16 too, unlike the RL trainers' fp32 heads (model.Head): its rounding
  of the logits adds noise to a cross-entropy, but no ratio or KL of two models to be misread.
Outputs in out_dir: ckpt.pt (always the last step, for resume), best.pt (best held-out loss), hf/ (the final
model as a Hugging Face folder), log.jsonl.

    python sft.py config/sft_tiny.py
    python sft.py config/sft_tiny.py --max_iters=50 --dtype=bfloat16
    torchrun --standalone --nproc_per_node=2 sft.py config/sft_tiny.py
    torchrun --standalone --nproc_per_node=8 sft.py config/sft_hh_gpt2.py
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from common import (ConfigError, Timer, all_reduce_sum, begin_step, check_finite, check_numbers, cleanup, load_model,
                    make_optimizer, micro_batches, optimizer_step, print0, print_config, rank0_first, restore,
                    run_main, save_checkpoint, setup, start_log, wrap_ddp)
from data import EOS, SFTExample, collate_sft, load_preferences, load_sft, tokenize_example
from model import GPTConfig, token_logprobs
from sample import sample_responses


@dataclass
class Config:
    # model
    init_from: str = "gpt2"  # gpt2..gpt2-xl | HF folder | hub id | one of our .pt files | scratch | resume
    n_layer: int = 12  # scratch only (default: GPT-2 124M's shape)
    n_head: int = 12  # scratch only
    n_embd: int = 768  # scratch only
    block_size: int = 1024  # scratch only
    dropout: float = 0.0  # scratch only (pretrained models load with dropout off)
    # data
    data: str = "Anthropic/hh-rlhf"  # a local .jsonl/.json/.parquet/.csv file or folder, or a hub dataset
    data_format: str = "sft"  # sft: prompt/completion or text rows | chosen: a preference set's chosen responses
    data_subset: str = ""  # hub dataset config name ("" = none)
    data_split: str = "train"  # training split (slices allowed: "train[:90%]")
    eval_split: str = "test"  # held-out split, e.g. "train[90%:]"
    skip_bad: bool = False  # drop (and count) bad rows instead of stopping at the first one
    max_prompt_len: int = 384  # prompts are left-truncated to this many tokens
    max_len: int = 512  # prompt + completion (+ EOS) tokens; longer completions are cut (and lose their EOS)
    # optimisation
    batch_size: int = 8  # sequences per micro-batch, per rank
    grad_accum: int = 1  # micro-batches per optimizer step, per rank
    max_iters: int = 1000  # optimizer steps
    learning_rate: float = 2e-5  # peak LR
    warmup_iters: int = 50  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio * learning_rate (1 = constant)
    lr_decay_iters: int = 0  # steps of the cosine schedule (0 = max_iters); keep it fixed to stop and resume a run
    weight_decay: float = 0.0  # AdamW weight decay on matrices (not biases, LayerNorms)
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.999  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    # evaluation, checkpoints, logging
    out_dir: str = "out-sft"  # ckpt.pt (last, for resume), best.pt (best eval loss), hf/, log.jsonl
    eval_interval: int = 200  # evaluate, print samples and write checkpoints every this many steps (and at the end)
    eval_batch_size: int = 16  # sequences per eval forward, per rank
    eval_samples: int = 2  # sample texts printed per evaluation (the first held-out prompts, temperature 0.7)
    max_new_tokens: int = 48  # new tokens per printed sample
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | tf32 (CUDA) | bfloat16 (autocast; weights, optimizer, log-softmax stay fp32)
    seed: int = 1337  # seeds the init, the data order and the samples (torch gets seed + rank)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute blocks in backward: +1 forward, activations of 1 block not all


# ----------------------------------------------------------------------------- the algorithm
def sft_loss(lm_head, h, tokens, loss_mask, n_targets):
    """Summed -log p(target) over the target tokens, divided by n_targets.

    h (B, T, C): final hidden states; h[:, t] predicts token t+1. tokens, loss_mask (B, T): loss_mask is 1 on the
    target tokens (completion incl. its EOS), 0 on prompt and padding. The LM head runs only at the positions that
    predict a target: prompt and padding positions never pay for the vocabulary-sized projection and softmax.
    n_targets: the number of targets of the whole optimizer step (all micro-batches, all ranks), so the micro-batch
    losses add up to the batch mean."""
    sel = loss_mask[:, 1:].bool()  # (B, T-1): position t predicts target t+1
    logprobs = token_logprobs(lm_head(h[:, :-1][sel]), tokens[:, 1:][sel])  # (n,) fp32
    return -logprobs.sum() / n_targets


def collated_micro_batches(examples, step, cfg, s):
    """This rank's grad_accum micro-batches of optimizer step `step` (common.micro_batches), collated. Any split of
    the same global batch gives the same gradient."""
    return [collate_sft(b) for b in micro_batches(examples, step, cfg, s)]


def forward_backward(model, lm_head, batches, s):
    """Accumulate into .grad the gradient of the mean target-token loss over `batches` of every rank.
    Returns (loss: that mean, n_tokens: real tokens processed, all ranks), floats identical on every rank."""
    # Count the targets of the whole step first, over all micro-batches and all ranks.
    n_targets = all_reduce_sum(torch.tensor(float(sum(b["loss_mask"][:, 1:].sum() for b in batches)),
                                            device=s.device), s)
    # on the device up front: a copy to the GPU inside the loop would wait for the kernels queued before it
    batches = [{k: v.to(s.device) for k, v in b.items()} for b in batches]
    total = torch.zeros(2, device=s.device)  # (summed loss of this rank, real tokens of this rank)
    for i, b in enumerate(batches):
        # DDP all-reduces gradients in backward; only the last micro-batch of the step needs to.
        with model.no_sync() if s.ddp and i < len(batches) - 1 else nullcontext():
            with s.autocast():
                h = model(b["tokens"])  # (B, T, C); right-padded: no mask needed (data.pad_right)
                loss = sft_loss(lm_head, h, b["tokens"], b["loss_mask"], n_targets)  # this micro-batch's share
            # DDP AVERAGES gradients over ranks, i.e. divides their sum by world_size. Every rank's loss is already
            # its part of the global sum / n_targets, so we want the plain sum: multiply by world_size to undo it.
            (loss * s.world_size).backward()
        total += torch.stack([loss.detach(), b["mask"].sum().float()])
    loss, n_tokens = all_reduce_sum(total, s).tolist()
    return loss, n_tokens


# ----------------------------------------------------------------------------- data, model, evaluation
def check_config(cfg):
    check_numbers(cfg, positive=("max_prompt_len", "max_len", "eval_batch_size", "max_new_tokens"),
                  non_negative=("eval_samples",))
    if cfg.data_format not in ("sft", "chosen"):
        raise ConfigError(f"data_format must be 'sft' or 'chosen', not {cfg.data_format!r}")


def load_examples(cfg, split):
    if cfg.data_format == "sft":
        return load_sft(cfg.data, split, cfg.data_subset, cfg.skip_bad)
    return [SFTExample(p.prompt, p.chosen) for p in load_preferences(cfg.data, split, cfg.data_subset, cfg.skip_bad)]


def load_data(cfg, s):
    """(train, eval) as (prompt_ids, completion_ids) pairs, and the held-out examples (for their prompts)."""
    with rank0_first(s):
        train_data, eval_data = load_examples(cfg, cfg.data_split), load_examples(cfg, cfg.eval_split)
    tok = lambda ex: tokenize_example(ex.prompt, ex.completion, cfg.max_prompt_len, cfg.max_len)
    train_ids, eval_ids = [tok(ex) for ex in train_data], [tok(ex) for ex in eval_data]
    cut = sum(r[-1:] != [EOS] for _, r in train_ids)
    print0(f"data: {len(train_ids)} train / {len(eval_ids)} eval examples; {cut} train completions cut at max_len")
    return train_ids, eval_ids, eval_data


def build_model(cfg, s):
    """The GPT to train, on the device, and the checkpoint it came from (a resume's, or None)."""
    resume = cfg.init_from == "resume"
    init = os.path.join(cfg.out_dir, "ckpt.pt") if resume else cfg.init_from
    scratch = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                        dropout=cfg.dropout)
    # resume: out_dir/ckpt.pt must be this script's (another's has other heads, hence other optimizer groups)
    model, ckpt = load_model(init, heads={}, kind="sft" if resume else None, scratch=scratch)
    if cfg.max_len > model.config.block_size:
        raise ConfigError(f"max_len ({cfg.max_len}) exceeds the model's block_size ({model.config.block_size})")
    if cfg.eval_samples and cfg.max_new_tokens >= model.config.block_size:
        raise ConfigError(f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt in the model's "
                          f"block_size ({model.config.block_size})")
    model.grad_checkpointing = cfg.grad_checkpointing
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters from {init}")
    return model.to(s.device), ckpt


@torch.no_grad()
def evaluate(model, eval_ids, cfg, s):
    """Mean loss over the target tokens of the held-out set (all ranks)."""
    model.eval()
    total = torch.zeros(2, device=s.device)  # (summed loss, targets)
    mine = eval_ids[s.rank::s.world_size]
    for j in range(0, len(mine), cfg.eval_batch_size):
        b = {k: v.to(s.device) for k, v in collate_sft(mine[j:j + cfg.eval_batch_size]).items()}
        with s.autocast():
            loss = sft_loss(model.lm_head, model(b["tokens"]), b["tokens"], b["loss_mask"], 1.0)  # right-padded
        total += torch.stack([loss, b["loss_mask"][:, 1:].sum()])
    all_reduce_sum(total, s)
    model.train()
    return (total[0] / total[1]).item()


@torch.no_grad()
def print_samples(model, eval_data, cfg, s):
    """Rank 0 prints samples (temperature 0.7) for the first eval_samples held-out prompts."""
    n = min(cfg.eval_samples, len(eval_data))
    if n == 0 or not s.master:
        return
    model.eval()
    prompts = [ex.prompt for ex in eval_data[:n]]
    room = min(cfg.max_prompt_len, model.config.block_size - cfg.max_new_tokens)
    gen = torch.Generator(s.device).manual_seed(cfg.seed)  # its own generator: the training RNG is untouched
    with s.autocast():
        texts = sample_responses(model, prompts, room, cfg.max_new_tokens, 0.7, generator=gen)["texts"]
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        print0(f"--- sample {i}: {prompt[-200:]!r} -> {text!r}")
    model.train()


def save(path, model, optimizer, step, best_eval_loss, cfg):
    """A checkpoint; with the optimizer (ckpt.pt, for resume) or without (best.pt, weights only)."""
    extra = dict(optimizer=optimizer.state_dict()) if optimizer else {}
    save_checkpoint(path, kind="sft", model_config=asdict(model.config), model=model.state_dict(), step=step,
                    config=asdict(cfg), best_eval_loss=best_eval_loss, **extra)


# ----------------------------------------------------------------------------- training
def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed, cfg.out_dir)
    print_config(cfg)
    check_config(cfg)
    train_ids, eval_ids, eval_data = load_data(cfg, s)
    raw_model, ckpt = build_model(cfg, s)
    optimizer = make_optimizer(raw_model, cfg)
    resume = cfg.init_from == "resume"  # then build_model loaded out_dir/ckpt.pt
    start, best_eval_loss = (restore(ckpt, optimizer, cfg), ckpt["best_eval_loss"]) if resume else (0, math.inf)
    ckpt = None  # free the CPU copy of the weights and optimizer state
    model = wrap_ddp(torch.compile(raw_model) if cfg.compile else raw_model, s)  # what trains: compiled, DDP
    log = start_log(cfg.out_dir, resume, s)
    ckpt_path, best_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "best.pt")

    eval_loss_start = eval_loss = None
    if start == 0:
        eval_loss_start = evaluate(raw_model, eval_ids, cfg, s)
        log(0, {"eval_loss": eval_loss_start})
    timer, metrics = Timer(cfg.max_iters, start), {}
    model.train()
    for step in range(start, cfg.max_iters):
        t0 = time.time()
        lr = begin_step(optimizer, step, cfg, s)
        # 1. forward and backward: the mean loss over the target tokens of this step's global batch
        loss, n_tokens = forward_backward(model, raw_model.lm_head, collated_micro_batches(train_ids, step, cfg, s), s)
        check_finite(loss, "loss", step)  # before the weights or any checkpoint see it
        # 2. clip, step
        grad_norm = optimizer_step(optimizer, raw_model.parameters(), cfg.grad_clip, step)
        metrics = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tok_per_s": n_tokens / (time.time() - t0)}
        log(step, {**metrics, "eta": timer.eta(step)})

        done = step + 1  # the next step to run: where a resume starts
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            eval_loss = evaluate(raw_model, eval_ids, cfg, s)
            best_eval_loss, is_best = min(best_eval_loss, eval_loss), eval_loss < best_eval_loss
            log(done, {"eval_loss": eval_loss, "best_eval_loss": best_eval_loss})  # the weights after `done` steps
            print_samples(raw_model, eval_data, cfg, s)
            if s.master:  # best.pt first: a crash between the two leaves ckpt.pt behind, and its resume redoes both
                if is_best:
                    save(best_path, raw_model, None, done, best_eval_loss, cfg)
                save(ckpt_path, raw_model, optimizer, done, best_eval_loss, cfg)

    if s.master:
        raw_model.save_hf(os.path.join(cfg.out_dir, "hf"))
        print0(f"saved {ckpt_path}, {best_path} and {os.path.join(cfg.out_dir, 'hf')}")
    cleanup(s)
    return {**metrics, "eval_loss_start": eval_loss_start, "best_eval_loss": best_eval_loss, "eval_loss": eval_loss}


if __name__ == "__main__":
    run_main(main, Config)
