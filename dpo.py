"""
Direct Preference Optimization (DPO, Rafailov et al. 2023): learn from preference pairs with no reward model and no
sampling. The policy starts as the SFT model and a frozen copy of it is the reference.

The algorithm: for a pair (x, chosen y_w, rejected y_l) and the sequence log-probabilities log pi(y|x) of the policy
and of the reference, h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)] and
loss = -log sigmoid(beta * h). beta * (log pi(y) - log ref(y)) is the policy's "implicit reward" of y: DPO is the
Bradley-Terry loss of reward.py on that reward, whose maximiser is the KL-regularised optimum PPO aims for.

Our choices, where public implementations differ:
- log pi(y|x) is the sum of log p(token) over the response tokens only (incl. the EOS that ends the response), with
  the masks and truncation of sft.py and reward.py (data.tokenize_example), in fp32 (model.token_logprobs, and the LM
  head in fp32 under bf16 autocast: fp32_heads, model.Head); the LM head runs only at the positions that predict a
  response token. Chosen and rejected go through ONE forward, as in reward.py.
- The reference log-probs are computed on the fly: one no-grad forward of the reference per micro-batch, on the very
  batch the policy sees. Precomputing them once needs a pass over the data before step 0 and memory proportional to
  it, and saves nothing on a run of one epoch or less (the same forwards, done earlier; each further epoch costs one
  more no-grad reference forward per pair). On the fly, the reference runs the policy's kernels on the same shapes,
  so while policy == reference every log-ratio is exactly 0 (the first loss is exactly ln 2; IPO's 1 / (4 beta^2);
  not so under compile, see Config), and a resume needs nothing but the SFT model.
- Dropout is off: both models stay in eval mode, also while training (train mode would only change dropout, which
  adds noise to the log-ratios the loss is built on and breaks policy == reference at step 0).
- loss_type="sigmoid" with label_smoothing eps is conservative DPO (Mitchell 2023; TRL's label_smoothing): the
  preference is taken as flipped with probability eps, loss = (1 - eps) * -log sigmoid(beta h) + eps *
  -log sigmoid(-beta h). loss_type="ipo" is IPO (Azar et al. 2023, their Eq. 17): (h - 1 / (2 beta))^2, which pulls h
  to a finite target instead of pushing it to infinity. The IPO paper writes h with sequence probabilities pi(y|x),
  i.e. summed token log-probs; TRL averages the log-probs over the response tokens for IPO instead (TRL PR #1265,
  after the IPO authors' remark reported in Hugging Face's "Preference Tuning LLMs" blog post). We average for IPO,
  as TRL: with sums the target 1 / (2 beta) would be a margin for the whole response, so what beta means would
  change with response length, and long responses would dominate the squared loss. Under IPO every logged log-prob
  and reward is a per-token mean.
- Watch logp_chosen: it often goes DOWN during DPO, the rejected one faster. The loss only sees the margin between
  the two log-ratios, and lowering both (probability moving to responses in neither set) raises the margin as well
  as raising the chosen one would. A rising margin with a falling logp_chosen is expected, not a bug.
- Accuracy counts ties as wrong (reward.py's convention), so it is 0 at step 0, where every implicit reward is 0.
- The loss is the mean over the pairs of the whole global batch (all micro-batches, all ranks); the data order is a
  pure function of (seed, step) and each rank takes a contiguous block of it (common.rank_batch): a torchrun run
  computes what one process with world_size x grad_accum micro-batches does, and a resume ends where an
  uninterrupted run does (bit for bit on CPU; on GPUs, up to nondeterministic kernels).
- Reads every preference format of data.py: prompt/chosen/rejected, Anthropic HH dialogues, TL;DR comparisons.
Outputs in out_dir: ckpt.pt (the last step's policy, for resume), hf/ (the final policy as a Hugging Face folder),
log.jsonl.

    python dpo.py config/dpo_tiny.py                      # after python sft.py config/sft_tiny.py
    python dpo.py config/dpo_tiny.py --loss_type=ipo --beta=0.5
    torchrun --standalone --nproc_per_node=2 dpo.py config/dpo_tiny.py
    torchrun --standalone --nproc_per_node=8 dpo.py config/dpo_hh_gpt2.py
"""

import copy
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from common import (ConfigError, Timer, all_reduce_sum, begin_step, check_finite, check_numbers, cleanup,
                    load_checkpoint, load_model, make_optimizer, micro_batches, optimizer_step, print0, print_config,
                    rank0_first, restore, run_main, save_checkpoint, setup, start_log, wrap_ddp)
from data import EOS, DataError, collate_sft, load_preferences, tokenize_example
from model import GPTConfig, fp32_heads, token_logprobs


@dataclass
class Config:
    # model
    init_from: str = "out-sft/ckpt.pt"  # policy + reference: SFT .pt | HF folder | hub id | scratch | resume
    n_layer: int = 12  # scratch only (default: GPT-2 124M's shape)
    n_head: int = 12  # scratch only
    n_embd: int = 768  # scratch only
    block_size: int = 1024  # scratch only
    fp32_heads: bool = True  # under bf16 autocast, run lm_head in fp32 (model.Head)
    # data
    data: str = "Anthropic/hh-rlhf"  # preferences: prompt/chosen/rejected, HH chosen/rejected, TL;DR comparisons
    data_subset: str = ""  # hub dataset config name ("" = none)
    data_split: str = "train"  # training split (slices allowed: "train[:90%]")
    eval_split: str = "test"  # held-out split, e.g. "train[90%:]"
    skip_bad: bool = False  # drop (and count) bad rows instead of stopping at the first one
    max_prompt_len: int = 384  # prompts are left-truncated to this many tokens
    max_len: int = 512  # prompt + response (+ EOS) tokens; longer responses are cut (and lose their EOS)
    # DPO
    beta: float = 0.1  # strength of the pull to the reference (DPO's beta; IPO's tau)
    loss_type: str = "sigmoid"  # sigmoid: DPO | ipo: IPO (log-probs averaged over the response tokens)
    label_smoothing: float = 0.0  # sigmoid only: conservative DPO, preferences taken as flipped with this probability
    # optimisation
    batch_size: int = 8  # preference pairs per micro-batch, per rank (2 * batch_size sequences per forward)
    grad_accum: int = 1  # micro-batches per optimizer step, per rank
    max_iters: int = 1000  # optimizer steps
    learning_rate: float = 1e-6  # peak LR (the DPO paper's)
    warmup_iters: int = 50  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio * learning_rate (1 = constant)
    lr_decay_iters: int = 0  # steps of the cosine schedule (0 = max_iters); keep it fixed to stop and resume a run
    weight_decay: float = 0.0  # AdamW weight decay on matrices (not biases, LayerNorms)
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.999  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    # evaluation, checkpoints, logging
    out_dir: str = "out-dpo"  # ckpt.pt (last, for resume), hf/, log.jsonl
    eval_interval: int = 200  # evaluate and write the checkpoint every this many steps (and at the end)
    eval_batch_size: int = 8  # pairs per eval forward, per rank (2 * eval_batch_size sequences)
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | tf32 (CUDA) | bfloat16 (autocast; weights, optimizer, LM head, log-probs: fp32)
    seed: int = 1337  # seeds a scratch init and the data order
    compile: bool = False  # torch.compile the policy (the reference stays eager: first log-ratios ~rounding, not 0)
    grad_checkpointing: bool = False  # recompute blocks in backward: +1 forward, activations of 1 block not all


# ----------------------------------------------------------------------------- the algorithm
def sequence_logprobs(model, lm_head, tokens, mask, loss_mask, average=False):
    """log pi(response | prompt) of each row: the sum (average=True: the mean) of log p(token) over the tokens where
    loss_mask is 1, in fp32. tokens, mask, loss_mask (B, T), right- or left-padded -> (B,). The LM head runs only at
    the positions that predict a response token (h[:, t] predicts token t+1)."""
    h = model(tokens, mask)  # (B, T, C)
    sel = loss_mask[:, 1:].bool()  # (B, T-1)
    per_token = torch.zeros(sel.shape, device=h.device)  # (B, T-1) fp32, 0 off the response
    per_token[sel] = token_logprobs(lm_head(h[:, :-1][sel]), tokens[:, 1:][sel])
    return per_token.sum(-1) / sel.sum(-1) if average else per_token.sum(-1)


def dpo_loss(logprobs_chosen, logprobs_rejected, ref_logprobs_chosen, ref_logprobs_rejected, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """From the sequence log-probs (B,) of policy and reference: the per-pair losses (B,), and the implicit rewards
    beta * (logprobs - ref_logprobs) of chosen and of rejected, (B,) each, detached."""
    log_ratio_chosen = logprobs_chosen - ref_logprobs_chosen
    log_ratio_rejected = logprobs_rejected - ref_logprobs_rejected
    h = log_ratio_chosen - log_ratio_rejected
    if loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # label_smoothing 0: plain DPO
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * log_ratio_chosen.detach(), beta * log_ratio_rejected.detach()


# The per-step and held-out metrics, means over pairs (acc: ties count as wrong; margin: reward_chosen - rejected)
STATS = ("loss", "acc", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected")


def collate_pairs(pairs, device):
    """B pairs -> one right-padded batch of 2B rows on the device (collate_sft): all chosen rows, then all rejected."""
    return {k: v.to(device) for k, v in collate_sft([c for c, _ in pairs] + [r for _, r in pairs]).items()}


def dpo_forward(model, lm_head, ref, b, cfg, s):
    """The chosen and rejected rows of the pairs of `b` (collate_pairs) in one forward of the policy and one no-grad
    forward of the reference. Returns the per-pair losses (B,) and (fp64) the sums over the pairs of STATS, then the
    real tokens of the batch. Right-padded rows: the forwards need no mask (data.pad_right)."""
    n, ipo = len(b["tokens"]) // 2, cfg.loss_type == "ipo"
    tokens, loss_mask = b["tokens"], b["loss_mask"]
    with s.autocast():
        with torch.no_grad():
            ref_logprobs = sequence_logprobs(ref, ref.lm_head, tokens, None, loss_mask, ipo)  # (2B,): chosen, rejected
        logprobs = sequence_logprobs(model, lm_head, tokens, None, loss_mask, ipo)  # (2B,)
    losses, reward_chosen, reward_rejected = dpo_loss(  # reward_*: the implicit rewards
        logprobs[:n], logprobs[n:], ref_logprobs[:n], ref_logprobs[n:], cfg.beta, cfg.loss_type, cfg.label_smoothing)
    sums = [losses.sum(), (reward_chosen > reward_rejected).sum(), (reward_chosen - reward_rejected).sum(),
            reward_chosen.sum(), reward_rejected.sum(), logprobs[:n].sum(), logprobs[n:].sum(), b["mask"].sum()]
    return losses, torch.stack([x.detach().double() for x in sums])


def forward_backward(model, lm_head, ref, batches, cfg, s):
    """Accumulate into .grad the gradient of the mean DPO loss over the pairs of `batches` of every rank.
    Returns the means of STATS over those pairs, all ranks (identical on every rank), and their real tokens."""
    n_pairs = sum(map(len, batches)) * s.world_size  # every rank has as many
    total = torch.zeros(len(STATS) + 1, dtype=torch.float64, device=s.device)
    # on the device up front: a copy to the GPU inside the loop would wait for the kernels queued before it
    batches = [collate_pairs(pairs, s.device) for pairs in batches]
    for i, b in enumerate(batches):
        # DDP all-reduces gradients in backward; only the last micro-batch of the step needs to.
        with model.no_sync() if s.ddp and i < len(batches) - 1 else nullcontext():
            losses, sums = dpo_forward(model, lm_head, ref, b, cfg, s)
            # Every micro-batch holds batch_size pairs, so the mean over the rank's pairs is the sum of the
            # grad_accum micro-batch means / grad_accum; DDP averages the ranks: the mean over the global batch.
            (losses.mean() / len(batches)).backward()
        total += sums
    total = all_reduce_sum(total, s)
    return mean_stats(total[:-1], n_pairs), total[-1].item()


def mean_stats(sums, n_pairs, prefix=""):
    """Sums of STATS over n_pairs pairs -> their means, by name."""
    return {prefix + k: v / n_pairs for k, v in zip(STATS, sums.tolist())}


# ----------------------------------------------------------------------------- data, models, evaluation
def check_config(cfg):
    check_numbers(cfg, positive=("max_prompt_len", "max_len", "eval_batch_size", "beta"))
    if cfg.loss_type not in ("sigmoid", "ipo"):
        raise ConfigError(f"loss_type must be 'sigmoid' or 'ipo', not {cfg.loss_type!r}")
    if not 0 <= cfg.label_smoothing < 0.5 or (cfg.label_smoothing and cfg.loss_type != "sigmoid"):
        raise ConfigError("label_smoothing must be in [0, 0.5), and only with loss_type='sigmoid'")


def tokenize_prefs(prefs, cfg):
    """Preferences -> [((prompt_ids, chosen_ids), (prompt_ids, rejected_ids))], each response with its EOS, without
    the pairs identical once truncated (h would be 0 whatever the policy); and how many were dropped."""
    tok = lambda response, p: tokenize_example(p.prompt, response, cfg.max_prompt_len, cfg.max_len)
    pairs = [(tok(p.chosen, p), tok(p.rejected, p)) for p in prefs]
    kept = [(c, r) for c, r in pairs if c != r]
    return kept, len(pairs) - len(kept)


def load_data(cfg, s):
    """(train, held-out) lists of ((prompt_ids, chosen_ids), (prompt_ids, rejected_ids))."""
    with rank0_first(s):
        prefs = [load_preferences(cfg.data, split, cfg.data_subset, cfg.skip_bad)
                 for split in (cfg.data_split, cfg.eval_split)]
    (train, identical), (held_out, held_out_identical) = (tokenize_prefs(p, cfg) for p in prefs)
    cut = sum(c[-1] != EOS or r[-1] != EOS for (_, c), (_, r) in train)
    print0(f"data: {len(train)} train / {len(held_out)} eval pairs; dropped {identical + held_out_identical} "
           f"identical after truncation; {cut} train pairs have a response cut at max_len")
    if not train or not held_out:
        raise DataError(f"{cfg.data}: no usable preference pairs in {cfg.data_split!r} or {cfg.eval_split!r}")
    return train, held_out


def build_models(cfg, s, init_from, ckpt):
    """The policy and its frozen reference, on the device, in eval mode (dropout off), LM heads in fp32 unless
    fp32_heads is off. Both are init_from (the SFT model); a resumed policy then takes its checkpoint's weights."""
    scratch = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    torch.manual_seed(cfg.seed)  # scratch: the same weights on every rank and on resume
    ref, _ = load_model(init_from, heads={}, kind=("sft", "dpo"), scratch=scratch)
    if cfg.max_len > ref.config.block_size:
        raise ConfigError(f"max_len ({cfg.max_len}) exceeds the model's block_size ({ref.config.block_size})")
    policy = copy.deepcopy(ref)  # exactly the reference's weights (a deepcopy keeps lm_head tied to wte)
    if ckpt:
        policy.load_state_dict(ckpt["model"])
    ref.requires_grad_(False)
    policy.grad_checkpointing = cfg.grad_checkpointing
    print0(f"policy and reference: {policy.num_params() / 1e6:.2f}M parameters each, from {init_from}")
    return tuple(fp32_heads(m, cfg.fp32_heads).to(s.device).eval() for m in (policy, ref))


@torch.no_grad()
def evaluate(policy, ref, pairs, cfg, s):
    """STATS over the held-out pairs of all ranks, as eval_*."""
    total = torch.zeros(len(STATS) + 1, dtype=torch.float64, device=s.device)
    mine = pairs[s.rank::s.world_size]
    for j in range(0, len(mine), cfg.eval_batch_size):
        total += dpo_forward(policy, policy.lm_head, ref, collate_pairs(mine[j:j + cfg.eval_batch_size], s.device),
                             cfg, s)[1]
    return mean_stats(all_reduce_sum(total, s), len(pairs), "eval_")


def save(path, policy, optimizer, step, cfg, init_from):
    save_checkpoint(path, kind="dpo", model_config=asdict(policy.config), model=policy.state_dict(), step=step,
                    optimizer=optimizer.state_dict(),
                    # the SFT model, also when this run was itself a resume: the next resume rebuilds the reference
                    config=asdict(replace(cfg, init_from=init_from)))


# ----------------------------------------------------------------------------- training
def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed, cfg.out_dir)
    print_config(cfg)
    check_config(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path, "dpo") if cfg.init_from == "resume" else None
    init_from = ckpt["config"]["init_from"] if ckpt else cfg.init_from  # the SFT model: reference and start
    train_pairs, eval_pairs = load_data(cfg, s)
    raw_model, ref = build_models(cfg, s, init_from, ckpt)  # both in eval mode, also while training: dropout off
    optimizer = make_optimizer(raw_model, cfg)
    start = restore(ckpt, optimizer, cfg) if ckpt else 0
    resume = ckpt is not None
    ckpt = None  # free the CPU copy of the weights and optimizer state
    model = wrap_ddp(torch.compile(raw_model) if cfg.compile else raw_model, s)  # what trains: compiled, DDP
    log = start_log(cfg.out_dir, resume, s)

    ev_start = ev = {}
    if start == 0:
        ev_start = evaluate(raw_model, ref, eval_pairs, cfg, s)
        log(0, ev_start)
    timer, metrics = Timer(cfg.max_iters, start), {}
    for step in range(start, cfg.max_iters):
        t0 = time.time()
        lr = begin_step(optimizer, step, cfg, s)
        # 1. policy and reference log-probs of chosen and rejected, the DPO loss of this step's global batch, backward
        metrics, n_tokens = forward_backward(model, raw_model.lm_head, ref, micro_batches(train_pairs, step, cfg, s),
                                             cfg, s)
        check_finite(metrics["loss"], "loss", step)  # before the weights or any checkpoint see it
        # 2. clip, step
        grad_norm = optimizer_step(optimizer, raw_model.parameters(), cfg.grad_clip, step)
        metrics.update(lr=lr, grad_norm=grad_norm, tok_per_s=n_tokens / (time.time() - t0))
        log(step, {**metrics, "eta": timer.eta(step)})

        done = step + 1  # the next step to run: where a resume starts
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            ev = evaluate(raw_model, ref, eval_pairs, cfg, s)
            log(done, ev)  # the weights after `done` steps
            if s.master:
                save(ckpt_path, raw_model, optimizer, done, cfg, init_from)

    if s.master:
        raw_model.save_hf(os.path.join(cfg.out_dir, "hf"))
        print0(f"saved {ckpt_path} and {os.path.join(cfg.out_dir, 'hf')}")
    cleanup(s)
    return {**metrics, **ev, **{k + "_start": v for k, v in ev_start.items()}}


if __name__ == "__main__":
    run_main(main, Config)
