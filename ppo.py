"""
PPO for language models (RLHF stage 3): the SFT policy learns to earn a higher reward-model score while a KL penalty
keeps it near the frozen SFT model it started from (the reference).

Each iteration, on every rank:
  1. sample responses to a batch of prompts (KV-cache sampler, temperature T, plain sampling: no top-k/top-p)
  2. truncate each response after its first EOS; score it with the reward model or a Python `reward_fn`;
     a response with no EOS has its score replaced by a penalty
  3. forwards without grad, on the first epoch's micro-batches: policy logprobs and values, reference logprobs
  4. per-token rewards -beta * (logprobs - ref_logprobs), plus the score on the last token (the EOS)
  5. GAE (gamma 1, lambda 0.95); advantages whitened over the real response tokens
  6. ppo_epochs passes over shuffled minibatches: clipped-ratio loss + vf_coef * clipped value loss, grad-norm clip
  7. beta follows the adaptive KL controller of Ziegler et al. 2019 (or stays fixed with target_kl=0)

Choices where public implementations differ:
- Old logprobs come from one no-grad forward (3), not from the sampler: the KV-cache sampler runs other kernels on
  other shapes, so its logprobs differ from a full forward by rounding (more under bf16), and the first ratio would
  not be exactly 1. A matmul's rounding may depend on its shape, so that forward runs on the first epoch's own
  micro-batches (the row orders are drawn first): the first minibatch's ratio is then exactly 1. The old values come
  from the same step (the shared trunk's forward, or the separate critic's); the sampler/forward gap is logged as
  `lp_gap`, a live check of positions and padding.
- The LM head runs only at the positions that choose a real response token (response_logprobs), not at the padding
  after an early EOS: responses end long before the longest one of their batch, and the vocabulary-sized logits of
  the padding would cost as much as the rest of the forward. Values come from the one-wide value head everywhere.
- Under bf16 autocast the logits and values are computed in fp32 (fp32_heads, model.Head), in the sampler too: bf16
  would round GPT-2's large logits by up to 0.5 nats in steps, which ratios, the KL penalty and the sampled
  distribution would all see. TRL keeps bf16 logits.
- critic="separate" (default with a reward model): its own GPT, initialised from the reward model with the reward
  head copied into its value head, so values start on the score's scale (Stiennon et al. 2020, and the "N+
  implementation details of RLHF with PPO" reproduction of it). It costs one more forward and backward per
  minibatch. critic="shared": a value head on the policy trunk, one forward for both, initialised to zero as in
  OpenAI's lm-human-preferences; the default with a reward_fn (there is no reward model to start from) unless
  critic_init_from names a checkpoint.
- AdamW with betas (0.9, 0.999) and eps 1e-5, as lm-human-preferences and the N+ details.
- whiten_rewards (off by default, as in TRL): scale the per-token rewards to unit variance over the batch before GAE
  (lm-human-preferences' option; the mean is kept).
- Advantages are whitened with the mean and variance of the global batch (one all-reduce of 3 numbers), and losses
  are token means over the whole minibatch of all ranks: N ranks whiten and average as one process would over the
  same rollouts. Per-rank whitening would make the update depend on the number of GPUs (and be noisier).
- --compile=True compiles the policy+critic forward, which the rollout and the update share, so the first ratio is
  still exactly 1 (its LM head part, response_logprobs, runs eager: its row count varies with the responses' lengths);
  the reference stays eager, so the first KL is then rounding-sized, not exactly 0. frozen_bf16 holds the reference
  and reward model in bf16 (half their memory): their LayerNorms and biases round to bf16, so the first KL is no
  longer exactly 0 either.
- Dropout is off whatever the checkpoint says: every model stays in eval mode, also while training (the only thing
  train mode would change is dropout, and the first ratio must be exactly 1).
- clipfrac counts the tokens where the clipped branch of the loss is taken (TRL's pg_clipfrac), not every token
  outside [1 - clip, 1 + clip].
- Prompt order is a pure function of (seed, step) and each rollout is sampled with a torch.Generator seeded by
  (seed, step), so a resumed run continues exactly like an uninterrupted one. Under DDP every rank draws the noise
  of the global batch and keeps its rows rank::world_size: N ranks sample exactly the responses one process would.
  Minibatches are shuffled per rank (a global shuffle would need every rank to hold every rollout), so with several
  minibatches per epoch a DDP minibatch is a stratified draw of the same size: equal in distribution to one
  process's, and equal in fact with one minibatch per epoch.
- "Exactly" above (first ratio 1, first KL 0, resume, N ranks == 1 process) is bit for bit on CPU, where the tests
  check it; on GPUs it holds up to kernels whose order of additions varies between runs (some backward passes).

  python ppo.py config/ppo_tiny.py                                    # after sft.py / reward.py tiny presets
  python ppo.py config/ppo_tiny.py --reward_model= --reward_fn=tests.test_ppo:count_the
  torchrun --standalone --nproc_per_node=2 ppo.py config/ppo_tiny.py
  torchrun --standalone --nproc_per_node=8 ppo.py config/ppo_hh_gpt2.py
"""

import collections
import copy
import itertools
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn

from common import (ConfigError, Timer, all_reduce_mean, all_reduce_sum, batch_indices, begin_step, check_numbers,
                    cleanup, load_checkpoint, load_model, make_optimizer, mix_seed, optimizer_step, print0,
                    print_config, rank0_first, restore, run_main, save_checkpoint, setup, start_log, wrap_ddp)
from data import EOS, load_prompts
from model import GPTConfig, fp32_heads, token_logprobs
from scoring import make_scorer
from sample import sample_responses


@dataclass
class Config:
    # model
    init_from: str = "out-sft/ckpt.pt"  # policy + reference: SFT .pt, HF folder, hub id, "scratch", or "resume"
    n_layer: int = 12  # scratch only (default: GPT-2 124M's shape)
    n_head: int = 12  # scratch only
    n_embd: int = 768  # scratch only
    block_size: int = 1024  # scratch only
    reward_model: str = "out-rm/ckpt.pt"  # reward model checkpoint from reward.py ("" to use reward_fn)
    reward_fn: str = ""  # instead: "module:function", f(prompts, responses) -> list of floats (trlx style)
    critic: str = ""  # "separate" (own GPT from reward model) | "shared" (value head on policy); "" = see docstring
    critic_init_from: str = ""  # separate critic's initial trunk (default: the reward model, head included)
    fp32_heads: bool = True  # under bf16 autocast, run lm_head and the value head in fp32 (model.Head)
    # data
    data: str = "Anthropic/hh-rlhf"  # prompts: hub dataset or local file (data.load_prompts)
    data_subset: str = ""  # hub dataset config name ("" = none)
    data_split: str = "train"  # slices allowed: "train[:90%]"
    eval_split: str = "test"  # held-out prompts, e.g. "train[90%:]"
    skip_bad: bool = False  # drop malformed rows (counted) instead of stopping
    max_prompt_len: int = 32  # prompt tokens kept (the end of the prompt)
    max_new_tokens: int = 32  # response length limit
    # PPO
    batch_size: int = 16  # prompts per rank per iteration
    temperature: float = 1.0  # sampling temperature, used in every logprob
    penalize_missing_eos: bool = True  # replace the score of a response without EOS by missing_eos_penalty
    missing_eos_penalty: float = -1.0  # in reward-model units: -1 assumes scores of std 1 (reward.py normalize_std)
    ppo_epochs: int = 4  # passes over each batch
    minibatch_size: int = 4  # responses per optimizer step per rank
    cliprange: float = 0.2  # ratio clip
    cliprange_value: float = 0.2  # value clip, around the rollout values
    vf_coef: float = 0.1  # weight of the value loss
    gamma: float = 1.0  # discount (1: the score at the end counts fully for every token)
    lam: float = 0.95  # GAE lambda
    whiten_rewards: bool = False  # scale per-token rewards to unit variance over the batch before GAE
    init_kl_coef: float = 0.05  # beta at step 0
    target_kl: float = 6.0  # adaptive beta aims at this KL (nats per response); 0 = fixed beta
    kl_horizon: int = 10000  # in episodes (responses)
    # optimisation
    max_iters: int = 100  # iterations (rollout batches)
    grad_accum: int = 1  # micro-batches per minibatch (memory); also the chunking of no-grad forwards
    learning_rate: float = 1e-5  # AdamW, policy and critic alike
    warmup_iters: int = 0  # linear warmup iterations
    min_lr_ratio: float = 1.0  # cosine decay to this fraction of learning_rate at max_iters; 1 = constant
    lr_decay_iters: int = 0  # steps of the cosine schedule (0 = max_iters); keep it fixed to stop and resume a run
    weight_decay: float = 0.0  # AdamW, on matrices only
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.999  # AdamW betas
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    # evaluation, checkpoints, logging
    out_dir: str = "out-ppo"  # ckpt.pt (policy, critic, optimizer, KL controller), hf/ (final policy), log.jsonl
    eval_interval: int = 50  # evaluate held-out prompts and checkpoint every N iterations (and at the end)
    eval_size: int = 64  # held-out prompts (all ranks together); 0 = no evaluation
    eval_samples: int = 2  # sample texts printed per evaluation
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | tf32 (CUDA) | bfloat16 (autocast; logprob/KL/GAE math stays fp32)
    seed: int = 1337  # prompts and rollouts are seeded by (seed, step), minibatch shuffles by (seed, step, rank)
    compile: bool = False  # torch.compile the policy+critic forward (step 3, update; not sampling, not the reference)
    grad_checkpointing: bool = False  # policy and critic recompute blocks in backward: less memory, +1 forward
    frozen_bf16: bool = False  # hold reference + reward model in bf16: half their memory (needs dtype=bfloat16)


# ----------------------------------------------------------------------------- the algorithm, as pure functions
def truncate_after_eos(responses, eos_id=EOS):
    """2. (response_mask, has_eos) of sampled responses (B, N): mask 1 up to and including each row's first EOS."""
    is_eos = (responses == eos_id).long()
    after = is_eos.cumsum(1) - is_eos > 0  # strictly after the first EOS
    return (~after).long(), is_eos.bool().any(1)


def compute_rewards(scores, logprobs, ref_logprobs, mask, beta):
    """4. Per-token rewards (B, N): -beta * (logprobs - ref_logprobs) (the k1 KL estimate) on every response token,
    plus the score on the last real token (the EOS; responses are right-padded). Returns (rewards, kl)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = mask.sum(1) - 1  # (B,)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """5. Generalized advantage estimation over right-padded responses; the value after the last token is 0.
    Returns (advantages, returns), zero on padding; returns = advantages + values."""
    rewards, values = rewards * mask, values * mask  # zero on the padding after each response: nothing flows back
    N = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    lastgaelam = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(N)):
        nextvalues = values[:, t + 1] if t + 1 < N else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_mean_var(x, mask, s=None):
    """Mean and (population) variance of x over mask == 1, over all ranks when `s` is a DDP setup."""
    mask = mask.to(x.dtype)
    sums = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if s is not None:
        all_reduce_sum(sums, s)
    mean = sums[0] / sums[2]
    return mean.to(x.dtype), (sums[1] / sums[2] - mean * mean).clamp(min=0).to(x.dtype)


def whiten(x, mask, s=None, shift_mean=True, eps=1e-8):
    """Variance 1 (and mean 0 with shift_mean) over the real tokens (of all ranks with `s`); padding is set to 0."""
    mean, var = masked_mean_var(x, mask, s)
    white = (x - mean) * torch.rsqrt(var + eps)
    return (white if shift_mean else white + mean) * mask


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, cliprange=0.2,
               cliprange_value=0.2, n_tokens=None):
    """6. Clipped-ratio policy loss and clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), as sums over real
    tokens divided by n_tokens (default: mask.sum(); the trainer passes the token count of the whole minibatch).
    Returns (pg_loss, vf_loss, stats); stats: approx_kl (k3 estimator), clipfrac and vf_clipfrac (the fraction of
    tokens where the clipped branch is the larger loss, i.e. the one taken), ratio."""
    mask = mask.float()
    n = mask.sum() if n_tokens is None else n_tokens
    mean = lambda x: (x * mask).sum() / n
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses, pg_losses_clipped = -advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_loss = mean(torch.max(pg_losses, pg_losses_clipped))
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses, vf_losses_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    vf_loss = mean(0.5 * torch.max(vf_losses, vf_losses_clipped))
    with torch.no_grad():
        stats = dict(approx_kl=mean(ratio - 1 - log_ratio), clipfrac=mean((pg_losses_clipped > pg_losses).float()),
                     vf_clipfrac=mean((vf_losses_clipped > vf_losses).float()), ratio=mean(ratio))
    return pg_loss, vf_loss, stats


class AdaptiveKLController:
    """beta of the KL penalty (Ziegler et al. 2019): e = clip(KL / target - 1, -0.2, 0.2),
    beta *= 1 + e * n_steps / horizon, n_steps = responses in the batch. target 0 keeps beta fixed."""

    def __init__(self, beta, target, horizon):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl, n_steps):
        if self.target > 0:
            e = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + e * n_steps / self.horizon

    def state_dict(self):
        return {"beta": self.beta}

    def load_state_dict(self, state):
        self.beta = state["beta"]


def entropy_from_logits(logits, temperature):
    """Entropy of softmax(logits / T) per row. Logged only: no entropy bonus in the loss (as lm-human-preferences)."""
    logits = logits.float() / temperature
    return torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)


# ----------------------------------------------------------------------------- policy, critic, rollouts
def response_hidden(model, tokens, mask, P):
    """Final hidden states at the positions that choose the response tokens tokens[:, P:]: (B, N, C). Hidden state t
    chooses token t + 1, so these are positions P-1 ... T-2; response_logprobs runs the LM head at the real ones.
    A strided view: the LM head gets the copy h[sel], and the value head's weight requires grad in both the no-grad
    forward and the update, so both take the same matmul path (a frozen weight on a strided input may not)."""
    return model(tokens, mask)[:, P - 1:-1]


@torch.compiler.disable  # eager under --compile: n varies with the rows' lengths, and h[sel] would break the graph
def response_logprobs(lm_head, h, responses, response_mask, temperature):
    """The logprobs (B, N) fp32 of the response tokens `responses` (B, N), 0 on padding, and the logits (n, V) of the
    n real ones, from the hidden states h (B, N, C) that choose them (response_hidden). The LM head runs only where
    response_mask is 1, not on the padding after an early EOS: responses end long before the longest one of their
    batch, and the vocabulary-sized logits of the padding would cost as much as the rest of the forward."""
    sel = response_mask.bool()  # (B, N)
    logits = lm_head(h[sel])  # (n, V)
    logprobs = torch.zeros(sel.shape, device=h.device)
    logprobs[sel] = token_logprobs(logits, responses[sel], temperature)
    return logprobs, logits


def forward_logprobs(model, lm_head, tokens, mask, response_mask, P, temperature):
    """response_logprobs of `model`'s forward (response_hidden), for callers that need no hidden states."""
    h = response_hidden(model, tokens, mask, P)
    return response_logprobs(lm_head, h, tokens[:, P:], response_mask, temperature)


class ActorCritic(nn.Module):
    """Policy and value function as one module, so DDP, the optimizer and the checkpoint see one thing.
    critic None: the "value" head sits on the policy trunk and one forward gives both."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, tokens, mask, response_mask, P, temperature):
        """logprobs (B, N) fp32 of the response tokens tokens[:, P:] (0 on padding), values (B, N) fp32 of the states
        that choose them (padding included), and the logits (n, V) of the n real tokens (response_logprobs)."""
        h = response_hidden(self.policy, tokens, mask, P)
        logprobs, logits = response_logprobs(self.policy.lm_head, h, tokens[:, P:], response_mask, temperature)
        if self.critic is not None:
            h = response_hidden(self.critic, tokens, mask, P)
        values = (self.policy if self.critic is None else self.critic).heads["value"](h).squeeze(-1).float()
        return logprobs, values, logits


class PhaseTimer:
    """Wall time per phase of an iteration (CUDA-synchronised, so each phase is charged its own kernels)."""

    def __init__(self, device):
        self.device, self.times = torch.device(device), collections.Counter()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # this process's GPU, not the current one

    @contextmanager
    def __call__(self, name):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.times[name] += time.perf_counter() - t0


@torch.no_grad()
def rollout(policy, score_fn, prompts, cfg, generator, autocast=nullcontext, timer=None, shard=None):
    """Steps 1-2: sample responses to `prompts` (strings) and score them. Returns sample.sample_responses' dict
    (tokens, mask, P, response_mask, logprobs: the sampler's, texts) with the scores (B,) and has_eos (B,).
    shard=(rank, world_size): `prompts` is the global batch and this rank samples rows rank::world_size."""
    timer = timer or PhaseTimer("cpu")
    with timer("generate"), autocast():  # 1
        r = sample_responses(policy, prompts, cfg.max_prompt_len, cfg.max_new_tokens, cfg.temperature,
                             generator=generator, shard=shard)
    with timer("score"):  # 2
        # the sampler's response mask already stops at each row's first EOS (the same mask); has_eos is new
        r["response_mask"], has_eos = truncate_after_eos(r["tokens"][:, r["P"]:])
        rank, world_size = shard or (0, 1)
        scores = score_fn(prompts[rank::world_size], r["texts"], r["tokens"], r["mask"])
        if cfg.penalize_missing_eos:
            scores = torch.where(has_eos, scores, torch.full_like(scores, cfg.missing_eos_penalty))
    return {**r, "scores": scores, "has_eos": has_eos}


def minibatches(n, step, cfg, s):
    """The update's row indices, per epoch: a shuffle of the n rollout rows (seeded by seed, step, rank), cut into
    minibatches of minibatch_size rows (0: all n, grpo.py's default), each a tuple of its grad_accum micro-batches.
    Drawn before the no-grad forward (step 3), which runs on the first epoch's micro-batches."""
    shuffle = torch.Generator().manual_seed(mix_seed(cfg.seed, step, s.rank, 1))
    size = cfg.minibatch_size or n
    perms = [torch.randperm(n, generator=shuffle).to(s.device) for _ in range(cfg.ppo_epochs)]
    return [[mb.split(size // cfg.grad_accum) for mb in perm.split(size)] for perm in perms]


@torch.no_grad()
def forward_rollout(model, ref, r, temperature, epoch, autocast=nullcontext):
    """Step 3: logprobs, values and ref_logprobs (B, N) fp32 of the rollout `r` (logprobs 0 on padding), and the
    entropy summed over its response tokens, computed on the micro-batches of `epoch`, the first epoch's minibatches
    (minibatches), so each row's old logprobs and values come from exactly the computation its first training forward
    repeats (same rows, same shapes, same kernels): the first minibatch's ratio is exactly 1."""
    tokens, mask, response_mask, P = r["tokens"], r["mask"], r["response_mask"], r["P"]
    out = {k: torch.zeros(response_mask.shape, device=tokens.device) for k in ("logprobs", "values", "ref_logprobs")}
    out["entropy"] = 0.0  # a sum
    for idx in itertools.chain(*epoch):  # every micro-batch of every minibatch
        t, m, rm = tokens[idx], mask[idx], response_mask[idx]
        with autocast():
            out["logprobs"][idx], out["values"][idx], logits = model(t, m, rm, P, temperature)
            out["ref_logprobs"][idx] = forward_logprobs(ref, ref.lm_head, t, m, rm, P, temperature)[0]
        out["entropy"] = out["entropy"] + entropy_from_logits(logits, temperature).sum()
    return out


def ppo_update(model, optimizer, batch, P, cfg, s, epochs, step=0):
    """Step 6: one pass over the rollout batch per epoch of `epochs` (minibatches()), one optimizer step per minibatch.
    `model` is the ActorCritic (DDP-wrapped under torchrun); `batch` holds the rollout's old_logprobs and old_values.
    Returns one dict of stats per minibatch. The stats stay on the device until the end: the host reads the GPU once
    per optimizer step (optimizer_step), not per stat."""
    names = ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "vf_clipfrac", "ratio")  # the stats of a minibatch
    stats, grad_norms = [], []
    for epoch in epochs:
        for minibatch in epoch:
            n_tokens = all_reduce_sum(batch["response_mask"][torch.cat(minibatch)].sum().float(), s)  # of all ranks
            mb_loss, mb_stats = 0, 0
            for i, idx in enumerate(minibatch):
                mb = {k: v[idx] for k, v in batch.items()}
                with model.no_sync() if s.ddp and i < len(minibatch) - 1 else nullcontext():  # sync grads once
                    with s.autocast():
                        logprobs, values, _ = model(mb["tokens"], mb["mask"], mb["response_mask"], P,
                                                    cfg.temperature)
                    pg_loss, vf_loss, st = ppo_losses(logprobs, mb["old_logprobs"], mb["advantages"], values,
                                                      mb["old_values"], mb["returns"], mb["response_mask"],
                                                      cfg.cliprange, cfg.cliprange_value, n_tokens)
                    loss = (pg_loss + cfg.vf_coef * vf_loss) * s.world_size  # DDP averages grads over ranks
                    loss.backward()
                mb_loss = mb_loss + loss.detach()
                st.update(pg_loss=pg_loss, vf_loss=vf_loss)
                # x world_size: this rank's share of the global token mean -> ~its own mean (all_reduce_mean later)
                mb_stats = mb_stats + torch.stack([st[k] for k in names]).detach().double() * s.world_size
            # a NaN/inf loss stops the run here, before the weights see it
            grad_norms.append(optimizer_step(optimizer, model.parameters(), cfg.grad_clip, step, loss=mb_loss))
            stats.append(mb_stats)
    return [dict(zip(names, row), grad_norm=g) for row, g in zip(torch.stack(stats).tolist(), grad_norms)]


# ----------------------------------------------------------------------------- set-up, evaluation, checkpoints
def check_config(cfg, world_size=1):
    """The config's ranges and cross-field rules; returns the critic kind ("separate" or "shared")."""
    check_numbers(cfg, positive=("max_prompt_len", "max_new_tokens", "minibatch_size", "ppo_epochs", "temperature",
                                 "kl_horizon"),
                  non_negative=("cliprange", "cliprange_value", "vf_coef", "init_kl_coef", "target_kl", "eval_size",
                                "eval_samples"), fraction=("gamma", "lam"))
    if bool(cfg.reward_model) == bool(cfg.reward_fn):
        raise ConfigError("set exactly one of reward_model (a reward.py checkpoint) and reward_fn ('module:function')")
    critic = cfg.critic or ("separate" if cfg.reward_model or cfg.critic_init_from else "shared")
    if critic not in ("separate", "shared"):
        raise ConfigError(f"critic must be 'separate' or 'shared', not {cfg.critic!r}")
    if critic == "separate" and not (cfg.reward_model or cfg.critic_init_from):
        raise ConfigError("critic='separate' needs a reward_model or critic_init_from to initialise the critic")
    if critic == "shared" and cfg.critic_init_from:
        raise ConfigError("critic_init_from is the separate critic's start; critic='shared' has none (drop one)")
    if cfg.batch_size % cfg.minibatch_size or cfg.minibatch_size % cfg.grad_accum:
        raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of minibatch_size "
                          f"({cfg.minibatch_size}), itself a multiple of grad_accum ({cfg.grad_accum})")
    if cfg.target_kl and cfg.init_kl_coef == 0:
        raise ConfigError("target_kl adapts beta by multiplying it, so init_kl_coef 0 would stay 0: set init_kl_coef "
                          "> 0, or target_kl=0 for a fixed beta")
    if cfg.target_kl and cfg.kl_horizon <= 0.2 * cfg.batch_size * world_size:
        raise ConfigError(f"kl_horizon ({cfg.kl_horizon}) must exceed a fifth of the responses per iteration "
                          f"({cfg.batch_size * world_size}): beta's factor 1 + e * responses / kl_horizon, with e as "
                          f"low as -0.2, would turn it negative")
    if cfg.frozen_bf16 and cfg.dtype != "bfloat16":
        raise ConfigError("frozen_bf16 needs dtype='bfloat16' (fp32 activations would meet bf16 weights)")
    return critic


def build_models(cfg, s, init_from, critic_kind):
    """The four roles, on the device, in eval mode (dropout off): policy (with a zero-initialised value head if the
    critic is shared), critic (a separate GPT with a value head, or None), the frozen reference, and the scorer
    (score_fn over a reward model, or over a reward_fn)."""
    scratch = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    score_fn, reward_model = make_scorer(cfg.reward_model, cfg.reward_fn, s.device, s.autocast,
                                         cfg.minibatch_size // cfg.grad_accum)
    torch.manual_seed(cfg.seed)  # the same scratch weights on every rank and on resume
    policy, init_ckpt = load_model(init_from, heads={"value": 1} if critic_kind == "shared" else {},
                                   kind=("sft", "ppo"), scratch=scratch)
    ref, _ = load_model(init_from, kind=("sft", "ppo"), scratch=scratch)
    if init_from == "scratch":
        ref.load_state_dict(policy.state_dict(), strict=False)  # a random policy's reference is itself
    if critic_kind == "shared" and "heads.value.weight" not in (init_ckpt or {}).get("model", {}):
        nn.init.zeros_(policy.heads["value"].weight)  # as lm-human-preferences: values start at 0
    critic = None
    if critic_kind == "separate" and cfg.critic_init_from:
        critic, _ = load_model(cfg.critic_init_from, heads={"value": 1}, scratch=scratch)
    elif critic_kind == "separate":  # the reward model, its (normalised) reward head becoming the value head
        critic = copy.deepcopy(reward_model)
        critic.heads = nn.ModuleDict({"value": critic.heads["reward"]})
        critic.config.heads = {"value": 1}
        critic.requires_grad_(True)
    if cfg.frozen_bf16:  # after the critic was copied from the reward model: the critic trains in fp32
        for m in (ref, reward_model):
            if m is not None:
                m.to(torch.bfloat16)
    for m in (policy, critic):
        if m is not None:
            m.grad_checkpointing = cfg.grad_checkpointing
    for m in (policy, ref, critic, reward_model):
        if m is not None:
            fp32_heads(m, cfg.fp32_heads)
            if cfg.max_prompt_len + cfg.max_new_tokens > m.config.block_size:
                raise ConfigError(f"max_prompt_len + max_new_tokens = {cfg.max_prompt_len + cfg.max_new_tokens} "
                                  f"exceeds a model's block_size {m.config.block_size}")
            m.to(s.device).eval()
    ref.requires_grad_(False)
    print0(f"policy {policy.num_params() / 1e6:.2f}M params, critic {critic_kind}")
    return policy, critic, ref, score_fn


def load_data(cfg, s):
    """Training and held-out prompts (every rank holds all: batches are split rank::world_size)."""
    with rank0_first(s):
        prompts = load_prompts(cfg.data, cfg.data_split, cfg.data_subset, cfg.skip_bad)
        eval_prompts = []
        if cfg.eval_size:
            eval_prompts = load_prompts(cfg.data, cfg.eval_split, cfg.data_subset, cfg.skip_bad)[:cfg.eval_size]
    print0(f"{len(prompts)} prompts, {len(eval_prompts)} held-out")
    return prompts, eval_prompts


@torch.no_grad()
def evaluate(policy, ref, score_fn, prompts, cfg, s):
    """Mean score, KL to the reference (summed over response tokens) and response length on the held-out `prompts`,
    sampled like the rollouts: in global batches (batch_size per rank), each rank its rows rank::world_size, but
    each batch with a fixed seed, so evaluations differ only by the policy, and N ranks evaluate what one process
    with N times the batch_size does. Prints eval_samples samples. ref None (grpo.py with beta 0): no KL."""
    sums = torch.zeros(4, dtype=torch.float64, device=s.device)  # score, kl, response length, count
    shown, global_batch = [], cfg.batch_size * s.world_size
    for i in range(0, len(prompts), global_batch):
        batch = prompts[i:i + global_batch]
        if s.rank >= len(batch):  # a last batch smaller than world_size: no rows here (still joins the all-reduce)
            continue
        generator = torch.Generator(s.device).manual_seed(mix_seed(cfg.seed, -1, i))
        r = rollout(policy, score_fn, batch, cfg, generator, s.autocast, shard=(s.rank, s.world_size))
        tokens, mask, P, response_mask = r["tokens"], r["mask"], r["P"], r["response_mask"]
        kl = torch.zeros(len(tokens), device=s.device)
        if ref is not None:
            with s.autocast():
                logprobs = forward_logprobs(policy, policy.lm_head, tokens, mask, response_mask, P, cfg.temperature)[0]
                ref_logprobs = forward_logprobs(ref, ref.lm_head, tokens, mask, response_mask, P, cfg.temperature)[0]
            kl = (logprobs - ref_logprobs).sum(1)  # both 0 on padding
        sums += torch.tensor([r["scores"].sum(), kl.sum(), response_mask.sum(), len(kl)], device=s.device)
        mine = batch[s.rank::s.world_size]
        shown += list(zip(mine, r["texts"], r["scores"].tolist()))[:cfg.eval_samples - len(shown)]
    for prompt, text, score in shown:
        print0(f"--- sample (score {score:.3f})\n{prompt!r} -> {text!r}")
    score, kl, length, n = all_reduce_sum(sums, s).tolist()
    return dict(eval_score=score / n, **({"eval_kl": kl / n} if ref is not None else {}),
                eval_response_len=length / n)


def save(path, policy, critic, optimizer, kl_ctl, step, cfg, init_from):
    save_checkpoint(path, kind="ppo", model_config=asdict(policy.config), model=policy.state_dict(),
                    critic_config=asdict(critic.config) if critic else None,
                    critic=critic.state_dict() if critic else None, optimizer=optimizer.state_dict(),
                    kl_ctl=kl_ctl.state_dict(), step=step,
                    # the SFT model in init_from, also when this run was itself a resume: the next resume
                    # rebuilds the reference from it
                    config=asdict(replace(cfg, init_from=init_from)))


def token_stats(r, f, s):
    """Over the response tokens of all ranks: the mean entropy, the largest sampler/forward logprob gap, and the
    number of tokens (0-d tensors, the same on every rank)."""
    entropy, n_tokens = all_reduce_sum(torch.stack([f["entropy"], r["response_mask"].sum().float()]), s)
    lp_gap = ((r["logprobs"] - f["logprobs"]).abs() * r["response_mask"]).max()
    if s.ddp:
        dist.all_reduce(lp_gap, op=dist.ReduceOp.MAX)
    return entropy / n_tokens, lp_gap, n_tokens


def iteration_metrics(r, f, kl, returns, stats, s):
    """The diagnostics of one iteration, over all ranks: rollout scores and KL, the update's stats averaged over its
    minibatches, explained variance, response length, responses without EOS, and token_stats: entropy, lp_gap and
    the number of response tokens (n_tokens, which main turns into tok_per_s)."""
    response_mask = r["response_mask"]
    _, ret_var = masked_mean_var(returns, response_mask, s)
    _, err_var = masked_mean_var(returns - f["values"], response_mask, s)
    entropy, lp_gap, n_tokens = token_stats(r, f, s)
    batch = dict(score=r["scores"].mean(), kl=kl.sum(1).mean(), explained_var=1 - err_var / ret_var.clamp(min=1e-8),
                 entropy=entropy, response_len=response_mask.sum(1).float().mean(),
                 no_eos=1 - r["has_eos"].float().mean(), lp_gap=lp_gap, n_tokens=n_tokens)
    batch = dict(zip(batch, torch.stack([v.double() for v in batch.values()]).tolist()))  # one host sync
    update = {k: sum(st[k] for st in stats) / len(stats) for k in stats[0]}  # means over the minibatches
    return all_reduce_mean({**batch, **update}, s)


SHOWN = ("score", "kl", "beta", "approx_kl", "clipfrac", "vf_loss", "explained_var", "entropy", "response_len",
         "no_eos", "lp_gap", "tok_per_s", "t_generate", "t_score", "t_forward", "t_update")  # the printed line


# ----------------------------------------------------------------------------- training
def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed, cfg.out_dir)
    print_config(cfg)
    critic_kind = check_config(cfg, s.world_size)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, "ppo") if cfg.init_from == "resume" else None
    if ckpt and (ckpt["critic"] is not None) != (critic_kind == "separate"):
        raise ConfigError(f"{ckpt_path}: its critic is {'separate' if ckpt['critic'] is not None else 'shared'}, "
                          f"this run's {critic_kind}: resume with the critic settings it was trained with")
    init_from = ckpt["config"]["init_from"] if ckpt else cfg.init_from  # the SFT model: reference and start
    policy, critic, ref, score_fn = build_models(cfg, s, init_from, critic_kind)
    prompts, eval_prompts = load_data(cfg, s)
    model = ActorCritic(policy, critic)  # what trains: one module for DDP, the optimizer and the checkpoint
    optimizer = make_optimizer(model, cfg, eps=1e-5)  # eps 1e-5: lm-human-preferences, N+ details
    kl_ctl = AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
    start = 0
    if ckpt:
        policy.load_state_dict(ckpt["model"])
        if critic is not None:
            critic.load_state_dict(ckpt["critic"])
        kl_ctl.load_state_dict(ckpt["kl_ctl"])
        start = restore(ckpt, optimizer, cfg)
    resume = ckpt is not None
    ckpt = None  # free the CPU copy of the weights and optimizer state
    model = wrap_ddp(torch.compile(model) if cfg.compile else model, s)
    log = start_log(cfg.out_dir, resume, s)

    if start == 0 and eval_prompts:
        log(0, evaluate(policy, ref, score_fn, eval_prompts, cfg, s))
    timer_eta, metrics = Timer(cfg.max_iters, start), {}
    for step in range(start, cfg.max_iters):
        t0, timer = time.perf_counter(), PhaseTimer(s.device)
        lr = begin_step(optimizer, step, cfg, s)
        # the global batch's prompts and one generator seed on every rank; each rank samples its rows rank::world_size
        batch_prompts = [prompts[i] for i in batch_indices(step, cfg.batch_size * s.world_size, len(prompts), cfg.seed)]
        generator = torch.Generator(s.device).manual_seed(mix_seed(cfg.seed, step))
        # 1-2. sample, truncate after EOS, score (penalty without EOS)
        r = rollout(policy, score_fn, batch_prompts, cfg, generator, s.autocast, timer, shard=(s.rank, s.world_size))
        tokens, mask, P, response_mask = r["tokens"], r["mask"], r["P"], r["response_mask"]
        # step 6's minibatches, shuffled now: step 3 runs on the first epoch's micro-batches (see docstring)
        epochs = minibatches(len(tokens), step, cfg, s)
        with timer("forward"):
            # 3. logprobs and values of the rollout (old logprobs: see docstring), reference logprobs
            f = forward_rollout(model, ref, r, cfg.temperature, epochs[0], s.autocast)
            # 4. KL-penalised per-token rewards
            rewards, kl = compute_rewards(r["scores"], f["logprobs"], f["ref_logprobs"], response_mask, kl_ctl.beta)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, response_mask, s, shift_mean=False)
            # 5. advantages (whitened over the real tokens of all ranks) and returns
            advantages, returns = gae(rewards, f["values"], response_mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, response_mask, s)
        with timer("update"):
            # 6. K epochs of minibatch updates
            batch = dict(tokens=tokens, mask=mask, response_mask=response_mask, old_logprobs=f["logprobs"],
                         old_values=f["values"], advantages=advantages, returns=returns)
            stats = ppo_update(model, optimizer, batch, P, cfg, s, epochs, step)

        # metrics of all ranks (beta: the one this iteration used)
        metrics = iteration_metrics(r, f, kl, returns, stats, s)
        metrics.update(beta=kl_ctl.beta, lr=lr, tok_per_s=metrics.pop("n_tokens") / (time.perf_counter() - t0),
                       **{f"t_{k}": v for k, v in timer.times.items()})
        # 7. adapt beta to the KL target (Ziegler et al. 2019), from all ranks' KL: the same beta on every rank
        kl_ctl.update(metrics["kl"], cfg.batch_size * s.world_size)
        log(step, {**metrics, "eta": timer_eta.eta(step)}, shown=SHOWN + ("eta",))

        done = step + 1  # the next step to run: where a resume starts
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            if eval_prompts:
                ev = evaluate(policy, ref, score_fn, eval_prompts, cfg, s)
                log(done, ev)  # the policy after `done` iterations
                metrics.update(ev)
            if s.master:
                save(ckpt_path, policy, critic, optimizer, kl_ctl, done, cfg, init_from)

    if s.master:
        policy.save_hf(os.path.join(cfg.out_dir, "hf"))
    cleanup(s)
    return metrics


if __name__ == "__main__":
    run_main(main, Config)
