"""
Critic-free online RL for language models: GRPO (Shao et al. 2024, DeepSeekMath), Dr. GRPO (Liu et al. 2025) and RLOO
(Ahmadian et al. 2024). PPO's clipped-ratio update without a value function: each prompt is sampled group_size times
and a response's advantage is its reward compared with the other responses to the same prompt. Steps 1-3 and the
evaluation are ppo.py's (rollout, minibatches, forward_logprobs, evaluate): read ppo.py first.

Each iteration, on every rank:
  1. sample group_size responses to each of batch_size prompts (plain sampling at temperature T, as ppo.py)
  2. truncate each response after its first EOS; score it with the reward model or a Python `reward_fn`;
     a response with no EOS has its score replaced by a penalty (ppo.rollout)
  3. forwards without grad: the policy's logprobs ("old" logprobs) and the reference's
  4. one reward per response (kl_estimator="k1": the score minus beta * the response's summed KL), and its advantage
     from its group's rewards:
       advantage="grpo":    (r - mean) / (std + 1e-4)                  (std with Bessel's correction, as TRL)
       advantage="dr_grpo": r - mean                                    (no std: no per-prompt difficulty weighting)
       advantage="rloo":    r - mean of the group's OTHER rewards       (the leave-one-out baseline)
  5. ppo_epochs passes over shuffled minibatches: PPO's clipped-ratio loss per token with the response's advantage,
     plus beta * k3 KL per token with kl_estimator="k3"; grad-norm clip. No critic, no GAE.

Our choices, where public implementations differ:
- Loss aggregation follows each paper. "grpo": the mean over a response's tokens, then the mean over responses (the
  GRPO paper's Eq. 3). "dr_grpo" and "rloo": the SUM over a response's tokens divided by the constant max_new_tokens,
  then the mean over responses (Dr. GRPO; RLOO treats the whole response as one action, whose log-probability is the
  token sum). A per-response token mean favours short responses when the advantage is positive and long ones when it
  is negative; Dr. GRPO's constant removes that bias. TRL's default instead divides by the number of response tokens
  in the batch (its "dapo"/"bnpo" loss types), which makes a response's weight depend on the lengths of the others
  in its batch; ours gives every response a loss of its own, so micro-batches and ranks split the batch with no
  change to the gradient and no all-reduce.
- RLOO's advantage is exactly G / (G - 1) times Dr. GRPO's (r - mean(others) = G / (G - 1) * (r - mean)): with the
  same aggregation the two differ only in the scale of the policy-gradient term against the KL term and grad_clip.
- The KL to the frozen SFT model (the reference), per Schulman's "Approximating KL divergence":
  kl_estimator="k1" puts it in the reward, as ppo.py does, but summed over the response: the reward of response i is
  score_i - beta * sum_t (logprobs - ref_logprobs), group-normalised like a score (RLOO's KL-regularised reward; with
  one advantage per response there is no per-token credit to assign). kl_estimator="k3" adds
  beta * (exp(ref - lp) - (ref - lp) - 1) per token to the loss, unclipped, as GRPO does: never negative, and an
  unbiased estimate of KL(policy || ref) as a value (on-policy); as a loss on fixed samples its gradient is in
  expectation that of KL(ref || policy), the other direction, which also pulls towards the reference. beta=0: no KL
  at all, and the reference is not even loaded (then no `kl` is logged).
- Old logprobs come from one no-grad forward (3), not from the sampler, run on the very micro-batches of the first
  epoch, and the LM head runs only at the real response tokens, both as in ppo.py (see there). With ppo_epochs=1 and
  one minibatch per batch (minibatch_size=0, the default) every update is on-policy, the ratio stays 1 and the loss
  is the plain policy gradient; the clip acts once a batch is reused (several minibatches or epochs).
- DDP: a group never spans two ranks, and advantages need no communication. Rows are laid out sample-major: row
  k * B + j of the global batch is sample k of prompt j (B = batch_size * world_size), and rank r samples the rows
  r::world_size (ppo.rollout's shard), i.e. all group_size samples of prompts r, r + world_size, ... With each rank's
  loss a mean over its own responses and DDP's average over ranks, N ranks compute what one process does with the
  same global batch: the same rollouts (one sampler seed per step), the same advantages, the same update.
- AdamW with torch's default eps 1e-8, as TRL's GRPO (ppo.py's 1e-5 follows lm-human-preferences).
- bf16, dropout, seeds and resume as ppo.py: logits in fp32 (fp32_heads), logprobs, KL and advantages in fp32; every
  model in eval mode (dropout off); prompts and rollouts seeded by (seed, step); minibatch shuffles by
  (seed, step, rank); a resumed run continues exactly like an uninterrupted one.
Outputs in out_dir: ckpt.pt (kind "grpo": the policy, for load_model and resume), hf/ (the final policy), log.jsonl.

    python grpo.py config/grpo_tiny.py                                  # after sft.py / reward.py tiny presets
    python grpo.py config/grpo_tiny.py --advantage=dr_grpo --kl_estimator=k1
    python grpo.py config/grpo_tiny.py --reward_model= --reward_fn=tests.test_grpo:count_the --beta=0
    torchrun --standalone --nproc_per_node=2 grpo.py config/grpo_tiny.py
    torchrun --standalone --nproc_per_node=8 grpo.py config/grpo_hh_gpt2.py
"""

import copy
import itertools
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch

from common import (ConfigError, Timer, all_reduce_mean, batch_indices, begin_step, check_numbers, cleanup,
                    load_checkpoint, load_model, make_optimizer, mix_seed, optimizer_step, print0, print_config,
                    restore, run_main, save_checkpoint, setup, start_log, wrap_ddp)
from model import GPTConfig, fp32_heads
from ppo import (PhaseTimer, entropy_from_logits, evaluate, forward_logprobs, load_data, minibatches, rollout,
                 token_stats)
from scoring import make_scorer


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
    fp32_heads: bool = True  # under bf16 autocast, run lm_head in fp32 (model.Head)
    # data
    data: str = "Anthropic/hh-rlhf"  # prompts: hub dataset or local file (data.load_prompts)
    data_subset: str = ""  # hub dataset config name ("" = none)
    data_split: str = "train"  # slices allowed: "train[:90%]"
    eval_split: str = "test"  # held-out prompts, e.g. "train[90%:]"
    skip_bad: bool = False  # drop malformed rows (counted) instead of stopping
    max_prompt_len: int = 32  # prompt tokens kept (the end of the prompt)
    max_new_tokens: int = 32  # response length limit; also Dr. GRPO's and RLOO's loss divisor
    # GRPO
    batch_size: int = 16  # prompts per rank per iteration, each sampled group_size times
    group_size: int = 8  # responses per prompt (G); advantages compare a response with its group
    temperature: float = 1.0  # sampling temperature, used in every logprob
    advantage: str = "grpo"  # grpo: (r - mean) / std | dr_grpo: r - mean | rloo: r - mean of the others
    penalize_missing_eos: bool = True  # replace the score of a response without EOS by missing_eos_penalty
    missing_eos_penalty: float = -1.0  # in reward-model units: -1 assumes scores of std 1 (reward.py normalize_std)
    ppo_epochs: int = 1  # passes over each batch (GRPO's mu)
    minibatch_size: int = 0  # responses per optimizer step per rank (0 = all batch_size * group_size: one step)
    cliprange: float = 0.2  # ratio clip
    beta: float = 0.04  # KL coefficient, fixed (ppo.py's init_kl_coef without a controller); 0 = no KL, no reference
    kl_estimator: str = "k3"  # k3: beta * k3 per token in the loss (GRPO) | k1: score - beta * summed KL (reward)
    # optimisation
    max_iters: int = 100  # iterations (rollout batches)
    grad_accum: int = 1  # micro-batches per minibatch (memory); also the chunking of no-grad forwards
    learning_rate: float = 1e-5  # AdamW
    warmup_iters: int = 0  # linear warmup iterations
    min_lr_ratio: float = 1.0  # cosine decay to this fraction of learning_rate at max_iters; 1 = constant
    lr_decay_iters: int = 0  # steps of the cosine schedule (0 = max_iters); keep it fixed to stop and resume a run
    weight_decay: float = 0.0  # AdamW, on matrices only
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.999  # AdamW betas
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    # evaluation, checkpoints, logging
    out_dir: str = "out-grpo"  # ckpt.pt (policy, optimizer), hf/ (final policy), log.jsonl
    eval_interval: int = 50  # evaluate held-out prompts and checkpoint every N iterations (and at the end)
    eval_size: int = 64  # held-out prompts (all ranks together), one response each; 0 = no evaluation
    eval_samples: int = 2  # sample texts printed per evaluation
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | tf32 (CUDA) | bfloat16 (autocast; logprob/KL/advantage math stays fp32)
    seed: int = 1337  # prompts and rollouts are seeded by (seed, step), minibatch shuffles by (seed, step, rank)
    compile: bool = False  # torch.compile the policy's trunk (step 3 and the update; not sampling, not the reference)
    grad_checkpointing: bool = False  # the policy recomputes blocks in backward: less memory, +1 forward


# ----------------------------------------------------------------------------- the algorithm, as pure functions
def sequence_rewards(scores, logprobs, ref_logprobs, mask, beta, kl_estimator):
    """4. The reward of each response (B,) that advantages are computed from, and its KL to the reference (B,): the
    sum over its tokens of logprobs - ref_logprobs (k1), None without a reference. kl_estimator "k1": the reward is
    score - beta * KL; "k3": the score (the KL is then in the loss)."""
    if ref_logprobs is None:
        return scores, None
    kl = ((logprobs - ref_logprobs) * mask).sum(1)
    return (scores - beta * kl if kl_estimator == "k1" else scores), kl


def group_advantages(rewards, advantage, eps=1e-4):
    """4. Advantages (G, B) from rewards (G, B): column j holds the G rewards of prompt j's responses. A group whose
    rewards are all equal gets advantage 0 (no signal), never NaN."""
    G, mean = rewards.shape[0], rewards.mean(0)
    if advantage == "grpo":
        return (rewards - mean) / (rewards.std(0) + eps)  # std with Bessel's correction (G - 1), as TRL
    if advantage == "dr_grpo":
        return rewards - mean
    return rewards - (rewards.sum(0) - rewards) / (G - 1)  # rloo: each response's baseline is its group's others


def loss_weights(response_mask, advantage, max_new_tokens):
    """5. Each token's weight in its response's loss (B, N), 0 on padding: 1 / the response's length for "grpo" (a
    per-response token mean), 1 / max_new_tokens for "dr_grpo" and "rloo" (a token sum over a constant)."""
    mask = response_mask.float()
    return mask / (mask.sum(1, keepdim=True) if advantage == "grpo" else max_new_tokens)


def k3(logprobs, ref_logprobs):
    """The k3 estimate of KL(policy || reference) per token (Schulman): with d = ref_logprobs - logprobs,
    exp(d) - d - 1 >= 0; its expectation under the policy is the KL."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


def grpo_loss(logprobs, old_logprobs, advantages, weights, n_responses, cliprange=0.2, ref_logprobs=None, beta=0.0):
    """5. The clipped-ratio loss, plus beta * k3 per token when beta and ref_logprobs are given: for each response i,
    sum_t weights_it * (max(-A_i * ratio_it, -A_i * clip(ratio_it, 1 - clip, 1 + clip)) + beta * k3_it), summed over
    the responses and divided by n_responses (the trainer passes the minibatch's count). logprobs, old_logprobs,
    ref_logprobs, weights (B, N); advantages (B,). Returns (loss, stats): pg_loss, kl_loss (the k3 term, unscaled by
    beta), and approx_kl (k3 of the ratio), clipfrac (tokens where the clipped branch is taken) and ratio, each a mean
    over a response's tokens, summed over the responses and divided by n_responses as the loss is (so they add up
    over micro-batches as the loss does; ranks are averaged, as DDP averages their gradients)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    A = advantages[:, None]
    pg_losses, pg_losses_clipped = -A * ratio, -A * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_loss = (torch.max(pg_losses, pg_losses_clipped) * weights).sum() / n_responses
    kl_loss = torch.zeros_like(pg_loss)
    if beta and ref_logprobs is not None:
        kl_loss = (k3(logprobs, ref_logprobs) * weights).sum() / n_responses
    with torch.no_grad():
        mask = (weights > 0).float()
        mean = lambda x: ((x * mask).sum(1) / mask.sum(1)).sum() / n_responses
        stats = dict(pg_loss=pg_loss, kl_loss=kl_loss, approx_kl=mean(ratio - 1 - log_ratio),
                     clipfrac=mean((pg_losses_clipped > pg_losses).float()), ratio=mean(ratio))
    return pg_loss + beta * kl_loss, stats


# ----------------------------------------------------------------------------- forwards and the update
@torch.no_grad()
def forward_rollout(model, lm_head, ref, r, temperature, epoch, autocast=nullcontext):
    """Step 3: logprobs and ref_logprobs (None without a reference) (B, N) fp32, 0 on padding, and the entropy summed
    over the response tokens of the rollout `r`, computed on the micro-batches of `epoch`, the first epoch's
    minibatches (ppo.minibatches), so each row's old logprobs come from exactly the computation its first training
    forward repeats (same rows, same shapes, same kernels): the first minibatch's ratio is exactly 1. `model` may be
    DDP-wrapped or compiled (its forward gives hidden states); `lm_head` is the raw policy's."""
    P, zeros = r["P"], lambda: torch.zeros(r["response_mask"].shape, device=r["tokens"].device)
    out = dict(logprobs=zeros(), ref_logprobs=None if ref is None else zeros(), entropy=0.0)  # entropy: a sum
    for idx in itertools.chain(*epoch):  # every micro-batch of every minibatch
        tokens, mask, response_mask = (r[k][idx] for k in ("tokens", "mask", "response_mask"))
        with autocast():
            out["logprobs"][idx], logits = forward_logprobs(model, lm_head, tokens, mask, response_mask, P,
                                                            temperature)
            if ref is not None:
                out["ref_logprobs"][idx] = forward_logprobs(ref, ref.lm_head, tokens, mask, response_mask, P,
                                                            temperature)[0]
        out["entropy"] = out["entropy"] + entropy_from_logits(logits, temperature).sum()
    return out


def grpo_update(model, lm_head, optimizer, batch, P, cfg, s, epochs, step=0):
    """Step 5: one pass over the rollout batch per epoch of `epochs` (ppo.minibatches), one optimizer step per
    minibatch; `batch` holds the rollout's old_logprobs. Every rank's loss is the mean over its minibatch's responses;
    DDP averages over ranks. Returns one dict of stats per minibatch. The stats stay on the device until the end: the
    host reads the GPU once per optimizer step (optimizer_step), not per stat."""
    names = ("pg_loss", "kl_loss", "approx_kl", "clipfrac", "ratio")  # grpo_loss's stats
    k3_beta = cfg.beta if cfg.kl_estimator == "k3" else 0.0
    stats, grad_norms = [], []
    for epoch in epochs:
        for minibatch in epoch:
            n_responses, mb_loss, mb_stats = sum(len(idx) for idx in minibatch), 0, 0
            for i, idx in enumerate(minibatch):
                mb = {k: v[idx] for k, v in batch.items() if v is not None}
                with model.no_sync() if s.ddp and i < len(minibatch) - 1 else nullcontext():  # sync grads once
                    with s.autocast():
                        logprobs, _ = forward_logprobs(model, lm_head, mb["tokens"], mb["mask"], mb["response_mask"],
                                                       P, cfg.temperature)
                    loss, st = grpo_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["weights"], n_responses,
                                         cfg.cliprange, mb.get("ref_logprobs"), k3_beta)
                    loss.backward()
                mb_loss = mb_loss + loss.detach()
                # each micro-batch's share of the minibatch's means
                mb_stats = mb_stats + torch.stack([st[k] for k in names]).detach().double()
            # a NaN/inf loss stops the run here, before the weights see it
            grad_norms.append(optimizer_step(optimizer, model.parameters(), cfg.grad_clip, step, loss=mb_loss))
            stats.append(mb_stats)
    return [dict(zip(names, row), grad_norm=g) for row, g in zip(torch.stack(stats).tolist(), grad_norms)]


# ----------------------------------------------------------------------------- set-up, evaluation, checkpoints
def check_config(cfg):
    """The config's ranges and cross-field rules."""
    check_numbers(cfg, positive=("max_prompt_len", "max_new_tokens", "group_size", "ppo_epochs", "temperature"),
                  non_negative=("minibatch_size", "cliprange", "beta", "eval_size", "eval_samples"))
    if bool(cfg.reward_model) == bool(cfg.reward_fn):
        raise ConfigError("set exactly one of reward_model (a reward.py checkpoint) and reward_fn ('module:function')")
    if cfg.advantage not in ("grpo", "dr_grpo", "rloo"):
        raise ConfigError(f"advantage must be 'grpo', 'dr_grpo' or 'rloo', not {cfg.advantage!r}")
    if cfg.kl_estimator not in ("k1", "k3"):
        raise ConfigError(f"kl_estimator must be 'k1' or 'k3', not {cfg.kl_estimator!r}")
    if cfg.group_size < 2:
        raise ConfigError(f"group_size must be >= 2 (an advantage compares a response with its group), not "
                          f"{cfg.group_size}")
    size = cfg.minibatch_size or cfg.batch_size * cfg.group_size
    if (cfg.batch_size * cfg.group_size) % size or size % cfg.grad_accum:
        raise ConfigError(f"batch_size * group_size ({cfg.batch_size * cfg.group_size}) must be a multiple of "
                          f"minibatch_size ({size}), itself a multiple of grad_accum ({cfg.grad_accum})")


def build_models(cfg, s, init_from, ckpt=None):
    """The policy (a resumed run's weights from `ckpt`), its frozen reference (None when beta is 0) and the scorer,
    on the device, in eval mode (dropout off), heads in fp32 under bf16."""
    scratch = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    score_fn, _ = make_scorer(cfg.reward_model, cfg.reward_fn, s.device, s.autocast,
                              (cfg.minibatch_size or cfg.batch_size * cfg.group_size) // cfg.grad_accum,
                              max_len=cfg.max_prompt_len + cfg.max_new_tokens)
    torch.manual_seed(cfg.seed)  # the same scratch weights on every rank and on resume
    policy, _ = load_model(init_from, heads={}, kind=("sft", "grpo"), scratch=scratch)
    if cfg.max_prompt_len + cfg.max_new_tokens > policy.config.block_size:
        raise ConfigError(f"max_prompt_len + max_new_tokens = {cfg.max_prompt_len + cfg.max_new_tokens} exceeds the "
                          f"policy's block_size {policy.config.block_size}")
    ref = None
    if cfg.beta:  # a deepcopy: exactly the policy's weights, lm_head still tied to wte
        ref = fp32_heads(copy.deepcopy(policy), cfg.fp32_heads).to(s.device).eval().requires_grad_(False)
    if ckpt:
        policy.load_state_dict(ckpt["model"])
    policy.grad_checkpointing = cfg.grad_checkpointing
    print0(f"policy {policy.num_params() / 1e6:.2f}M params from {init_from}, reference "
           f"{'a frozen copy' if ref is not None else 'none (beta = 0)'}")
    return fp32_heads(policy, cfg.fp32_heads).to(s.device).eval(), ref, score_fn


def save(path, policy, optimizer, step, cfg, init_from):
    save_checkpoint(path, kind="grpo", model_config=asdict(policy.config), model=policy.state_dict(),
                    optimizer=optimizer.state_dict(), step=step,
                    # the SFT model, also when this run was itself a resume: the next resume rebuilds the reference
                    config=asdict(replace(cfg, init_from=init_from)))


def iteration_metrics(r, f, rewards, kl, stats, s):
    """The diagnostics of one iteration, over all ranks: scores, KL (summed over the response), zero_adv (the fraction
    of groups whose rewards are all equal: advantage 0, no signal; with the k1 KL in the rewards, next to never),
    response length, responses without EOS, the update's stats averaged over its minibatches, and ppo.token_stats:
    entropy, lp_gap and the number of response tokens (n_tokens, which main turns into tok_per_s)."""
    response_mask = r["response_mask"]
    entropy, lp_gap, n_tokens = token_stats(r, f, s)
    batch = dict(score=r["scores"].mean(), **({"kl": kl.mean()} if kl is not None else {}),
                 zero_adv=(rewards == rewards[0]).all(0).float().mean(), entropy=entropy,
                 response_len=response_mask.sum(1).float().mean(), no_eos=1 - r["has_eos"].float().mean().double(),
                 lp_gap=lp_gap, n_tokens=n_tokens)
    batch = dict(zip(batch, torch.stack([v.double() for v in batch.values()]).tolist()))  # one host sync
    update = {k: sum(st[k] for st in stats) / len(stats) for k in stats[0]}  # means over the minibatches
    return all_reduce_mean({**batch, **update}, s)


SHOWN = ("score", "kl", "zero_adv", "approx_kl", "clipfrac", "kl_loss", "entropy", "response_len", "no_eos",
         "tok_per_s", "t_generate", "t_score", "t_forward", "t_update")  # the printed line (those present)


# ----------------------------------------------------------------------------- training
def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed, cfg.out_dir)
    print_config(cfg)
    check_config(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, "grpo") if cfg.init_from == "resume" else None
    init_from = ckpt["config"]["init_from"] if ckpt else cfg.init_from  # the SFT model: reference and start
    policy, ref, score_fn = build_models(cfg, s, init_from, ckpt)
    prompts, eval_prompts = load_data(cfg, s)
    optimizer = make_optimizer(policy, cfg)
    start = restore(ckpt, optimizer, cfg) if ckpt else 0
    resume = ckpt is not None
    ckpt = None  # free the CPU copy of the weights and optimizer state
    model = wrap_ddp(torch.compile(policy) if cfg.compile else policy, s)  # what trains: compiled, DDP
    log = start_log(cfg.out_dir, resume, s)
    G = cfg.group_size

    if start == 0 and eval_prompts:
        log(0, evaluate(policy, ref, score_fn, eval_prompts, cfg, s))
    timer_eta, metrics = Timer(cfg.max_iters, start), {}
    for step in range(start, cfg.max_iters):
        t0, timer = time.perf_counter(), PhaseTimer(s.device)
        lr = begin_step(optimizer, step, cfg, s)
        # the global batch's prompts, repeated G times sample-major: this rank's rows rank::world_size are all G
        # samples of its prompts rank::world_size (a group never spans two ranks); one sampler seed on every rank
        batch_prompts = [prompts[i] for i in batch_indices(step, cfg.batch_size * s.world_size, len(prompts), cfg.seed)]
        generator = torch.Generator(s.device).manual_seed(mix_seed(cfg.seed, step))
        # 1-2. sample G responses per prompt, truncate after EOS, score (penalty without EOS)
        r = rollout(policy, score_fn, batch_prompts * G, cfg, generator, s.autocast, timer, (s.rank, s.world_size))
        # step 5's minibatches, shuffled now: step 3 runs on the first epoch's micro-batches (see docstring)
        epochs = minibatches(len(r["texts"]), step, cfg, s)
        with timer("forward"):
            # 3. old logprobs (a forward, not the sampler's: see docstring) and reference logprobs
            f = forward_rollout(model, policy.lm_head, ref, r, cfg.temperature, epochs[0], s.autocast)
            # 4. one reward per response (k1: minus beta * its KL), its advantage within its group (G, B / rank)
            rewards, kl = sequence_rewards(r["scores"], f["logprobs"], f["ref_logprobs"], r["response_mask"],
                                           cfg.beta, cfg.kl_estimator)
            rewards = rewards.view(G, -1)  # column j: the G responses to this rank's prompt j
            advantages = group_advantages(rewards, cfg.advantage).view(-1)
        with timer("update"):
            # 5. K epochs of clipped-ratio minibatch updates (+ beta * k3 per token with kl_estimator="k3")
            batch = dict(tokens=r["tokens"], mask=r["mask"], response_mask=r["response_mask"], advantages=advantages,
                         weights=loss_weights(r["response_mask"], cfg.advantage, cfg.max_new_tokens),
                         old_logprobs=f["logprobs"], ref_logprobs=f["ref_logprobs"])
            stats = grpo_update(model, policy.lm_head, optimizer, batch, r["P"], cfg, s, epochs, step)

        # metrics of all ranks, then the log
        metrics = iteration_metrics(r, f, rewards, kl, stats, s)
        metrics.update(lr=lr, tok_per_s=metrics.pop("n_tokens") / (time.perf_counter() - t0),
                       **{f"t_{k}": v for k, v in timer.times.items()})
        log(step, {**metrics, "eta": timer_eta.eta(step)}, shown=[k for k in SHOWN if k in metrics] + ["eta"])

        done = step + 1  # the next step to run: where a resume starts
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            if eval_prompts:
                ev = evaluate(policy, ref, score_fn, eval_prompts, cfg, s)
                log(done, ev)  # the policy after `done` iterations
                metrics.update(ev)
            if s.master:
                save(ckpt_path, policy, optimizer, done, cfg, init_from)

    if s.master:
        policy.save_hf(os.path.join(cfg.out_dir, "hf"))
    cleanup(s)
    return metrics


if __name__ == "__main__":
    run_main(main, Config)
