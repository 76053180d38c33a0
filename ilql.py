"""
ILQL: Implicit Language Q-Learning (Snell et al. 2022), offline RL on (prompt, response, reward) rows, as trlx
implements it, on our GPT-2.

One GPT-2 trunk carries five outputs read at every state: the LM head (the behaviour policy, trained by behaviour
cloning), a V head, two vocab-sized Q heads and frozen target copies of the Q heads. Per response token (action)
a_t chosen in state s_t, with Qhat = min(target Q1, target Q2)(s_t, a_t):

    L_Q    = sum_k mean (Q_k(s_t, a_t) - (r_t + gamma * (1 - done_{t+1}) * V(s_{t+1})))^2     V(s_{t+1}) detached
    L_V    = mean |tau - 1[Qhat < V(s_t)]| * (Qhat - V(s_t))^2                              expectile regression
    L_CQL  = sum_k mean CE(Q_k(s_t, :), a_t)                                                 pushes unseen actions down
    L_AWAC = mean exp(beta_awac * (Qhat - V(s_t))) * -log pi(a_t | s_t)                      beta_awac = 0: plain BC
    loss   = L_Q + L_V + cql_scale * L_CQL + awac_scale * L_AWAC

all means over the real action tokens of the whole (accumulated, all-rank) batch (n_step > 1: an n-step Q target,
see below). After every optimizer step the targets move towards the online heads: target = (1 - alpha) * target +
alpha * online. Decoding perturbs the behaviour policy by the advantage: `log_softmax(logits) + beta * (Qhat(s, .) -
V(s))`, then temperature and top-k (beta = 0 is the behaviour policy); `ilql_logits_fn` plugs it into
model.generate.

Our choices, where public implementations differ:
- Targets are Polyak-averaged after *every* optimizer step (trlx since mid-2023 syncs them once per data pass).
- Rewards are z-scored over the training set (mean/std stored in the checkpoint) and sit on the last response token.
  Every response ends its episode, also one truncated at max_len: its reward was given for the text as stored.
- Heads are single nn.Linear layers (trlx: 2-layer MLPs), so the heads are plain `GPTConfig.heads`. The
  vocab-sized heads run only on the real action states (no padding); the target Q values at the taken actions
  are computed from the gathered weight rows, not from a vocab-sized matmul.
- `n_step` > 1 replaces the one-step target by an n-step one (as in n-step DQN; not in the ILQL paper or trlx):
  Q(s_t, a_t) -> sum_{k<m} gamma^k r_{t+k} + gamma^m * (1 - done) * V(s_{t+m}), m = min(n_step, actions left).
  With one reward per response, a one-step target moves the reward back one token per round of Q -> target Q ->
  V learning; a short run never gets it from the EOS to the words that earned it. Measured on demo.py's data
  (120 steps, gold win rate vs SFT at beta 4): 0.44-0.53 with n_step 1 (alpha 0.01-0.2), 0.60 with 3, 0.69
  with 8, 0.72-0.77 with the whole return. n_step >= max_len makes every target the Monte-Carlo return of its
  row (V then only serves as the advantage baseline); n_step = 1 (default) is ILQL.
- AWAC weights are clamped at 100, as in IQL (exp of an advantage overflows easily).
- The Q target uses the online V (as IQL and trlx): V has no target copy.
- The Hugging Face export (out_dir/hf) is the trunk + LM head only, i.e. the beta = 0 behaviour policy; ILQL
  decoding needs the heads in out_dir/ckpt.pt (sample.py --beta=...).

Memory: each Q head is as large as the embedding (n_embd * 50257 = 38.6M parameters for gpt2); the four vocab-sized
heads add 154M parameters to the 124M trunk. Trainable: trunk + q1 + q2 + v ~ 201M -> ~3.2 GB of fp32 weights,
grads and AdamW moments, plus 0.3 GB of targets. Activations: the LM and the two Q heads each produce an
(actions, 50257) tensor (e.g. 8 x 128 actions x 50257 x 2 bytes = 100 MB in bf16, more for their fp32 losses).

    python ilql.py config/ilql_tiny.py
    python ilql.py config/ilql_hh_gpt2.py --reward_model=out-reward-hh/ckpt.pt
    torchrun --standalone --nproc_per_node=2 ilql.py config/ilql_hh_gpt2.py
    python ilql.py config/ilql_tiny.py --init_from=resume      # continue exactly from out_dir/ckpt.pt
"""

import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
from common import (ConfigError, Timer, all_reduce_mean, all_reduce_sum, append_jsonl, batch_indices, check_finite,
                    check_scores, cleanup, load_model, load_reward_fn, log_line, lr_at, make_optimizer, print0,
                    print_config, rank0_first, rng_state, run_main, save_checkpoint, set_rng_state, setup, start_log)
from model import GPTConfig, generate


@dataclass
class Config:
    # model
    init_from: str = "gpt2"  # "scratch" | "resume" (out_dir/ckpt.pt) | an sft/ilql .pt | HF folder | hub id
    out_dir: str = "out-ilql"  # checkpoint, log.jsonl and the HF export go here
    n_layer: int = 2  # model size, used only with init_from="scratch"
    n_head: int = 2  # scratch only
    n_embd: int = 64  # scratch only
    block_size: int = 128  # scratch only
    # data
    data: str = "Anthropic/hh-rlhf"  # a local file/folder or hub dataset, in the format data_format names
    data_format: str = "preferences"  # "offline": prompt/response/reward rows; "preferences": chosen +1, rejected -1
    data_subset: str = ""  # hub dataset config name ("" = none)
    data_split: str = "train"  # training split, slicing allowed: "train[:90%]"
    eval_split: str = ""  # held-out split for eval loss and sample prompts ("" = none: prompts from training data)
    skip_bad: bool = False  # drop (and count) bad rows instead of stopping at the first
    max_prompt_len: int = 64  # prompts are left-truncated to this many tokens
    max_len: int = 128  # prompt + response tokens; responses are right-truncated to fit
    # ILQL
    gamma: float = 0.99  # discount
    n_step: int = 1  # Q targets bootstrap from V this many actions ahead (1 = ILQL; >= max_len: Monte-Carlo returns)
    tau: float = 0.7  # expectile of the V loss (0.5 = mean; -> 1 = max over the data's actions)
    alpha: float = 0.005  # Polyak rate of the target Q heads, applied after every optimizer step
    cql_scale: float = 0.1  # weight of the CQL term
    awac_scale: float = 1.0  # weight of the AWAC / behaviour-cloning term
    beta_awac: float = 0.0  # AWAC temperature: weights exp(beta_awac * advantage); 0 = plain behaviour cloning
    # optimisation
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 100  # optimizer steps
    learning_rate: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay to min_lr_ratio * learning_rate (1.0 = constant)
    lr_decay_iters: int = 0  # steps of the cosine schedule (0 = max_iters); keep it fixed to stop and resume a run
    warmup_iters: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    grad_checkpointing: bool = False  # recompute blocks in backward: less memory, +1 forward
    # evaluation
    eval_interval: int = 50  # evaluate and write the checkpoint every this many steps (and at the end)
    eval_prompts: int = 16  # held-out prompts sampled at each evaluation
    eval_betas: tuple = (0.0, 1.0, 4.0)  # decoding betas compared at each evaluation (0 = behaviour policy)
    max_new_tokens: int = 32  # response length of evaluation samples
    temperature: float = 1.0  # sampling temperature of evaluation samples
    top_k: int = 20  # top-k of evaluation samples (0 = off)
    reward_model: str = ""  # our reward checkpoint to score evaluation samples ("" = none)
    reward_fn: str = ""  # or "module:function", f(prompts, responses) -> list of floats
    # system
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    dtype: str = "float32"  # "float32" | "bfloat16" (autocast; master weights stay fp32)
    compile: bool = False  # torch.compile the trunk
    seed: int = 1337  # torch seed (+ rank) and data order


# ---------------------------------------------------------------------------- pure functions
def ilql_heads(vocab_size):
    """The heads ILQL puts on the trunk (GPTConfig.heads)."""
    return {"v": 1, "q1": vocab_size, "q2": vocab_size, "q1_target": vocab_size, "q2_target": vocab_size}


TARGETS = {"q1_target": "q1", "q2_target": "q2"}


def ilql_indices(prompt_lens, response_lens):
    """Where to read Q, V and the policy in a right-padded batch of prompt + response rows.

    The hidden state at position i chooses token i + 1. The actions are the response tokens, so the action at
    position P + t (P = prompt length) is chosen at state position P + t - 1; the states are those positions plus
    the final one P + R - 1 (after the last action), which is terminal. Example, prompt [A B], response [c d EOS]:

        position        0  1  2  3  4
        token           A  B  c  d  EOS
        actions_ixs        1  2  3          (hidden 1 chooses c, 2 chooses d, 3 chooses EOS)
        states_ixs         1  2  3  4
        dones              0  0  0  1       (1 = terminal: V(s_4) does not count)

    so action t has state states_ixs[t] and next state states_ixs[t + 1] (done: dones[t + 1]).
    Returns actions_ixs (B, A), states_ixs (B, A + 1), dones (B, A + 1) and action_mask (B, A), A = max R.
    Padding slots hold index 0, dones 1 and action_mask 0."""
    A = int(response_lens.max())
    t = torch.arange(A + 1, device=prompt_lens.device)  # (A+1,) state number
    valid = t[None, :] <= response_lens[:, None]  # (B, A+1): states 0..R are real
    states_ixs = torch.where(valid, prompt_lens[:, None] - 1 + t[None, :], 0)
    dones = (t[None, :] >= response_lens[:, None]).long()
    action_mask = (t[None, :A] < response_lens[:, None]).long()
    actions_ixs = states_ixs[:, :A] * action_mask  # the last state chooses no action
    return actions_ixs, states_ixs, dones, action_mask


def nstep_targets(rewards, response_lens, gamma, n_step):
    """The n-step TD target of every action, as pieces: action t bootstraps from state t + m, m = min(n_step, R - t),

        target_t = returns_t + discounts_t * (1 - done at state t + m) * V(s_{t+m}),
        returns_t = sum_{k < m} gamma^k r_{t+k},   discounts_t = gamma^m.

    n_step = 1 is ILQL's target r_t + gamma * V(s_{t+1}); n_step >= R makes every target the Monte-Carlo return
    (the episode ends first, so V(s_R) never counts). rewards (B, A), zero past each row's R actions; response_lens
    (B,). Returns returns (B, A), discounts (B, A) and boot_ixs (B, A), the state index t + m (padding slots: t + 1)."""
    if n_step < 1:
        raise ValueError(f"n_step must be >= 1, got {n_step}")
    B, A = rewards.shape
    t = torch.arange(A)[None, :]  # (1, A)
    m = torch.minimum(torch.full_like(t, n_step), response_lens[:, None] - t).clamp(min=1)  # (B, A)
    returns = torch.zeros(B, A)
    for k in range(min(n_step, A)):  # rewards past an episode's end are 0, so summing to n_step sums to m
        returns[:, :A - k] += gamma ** k * rewards[:, k:]
    return returns, gamma ** m.float(), t + m


def collate_offline(items, gamma=0.99, n_step=1):
    """(prompt_ids, response_ids, reward) triples -> a right-padded batch with everything the losses index."""
    tokens, mask = data.pad_right([p + r for p, r, _ in items])  # (B, T)
    prompt_lens = torch.tensor([len(p) for p, _, _ in items])
    response_lens = torch.tensor([len(r) for _, r, _ in items])
    actions_ixs, states_ixs, dones, action_mask = ilql_indices(prompt_lens, response_lens)
    actions = tokens.gather(1, actions_ixs + 1)  # (B, A) the token each action state chose
    rewards = torch.zeros(actions.shape)  # (B, A): the reward sits on the last action
    rewards[torch.arange(len(items)), response_lens - 1] = torch.tensor([float(r) for _, _, r in items])
    returns, discounts, boot_ixs = nstep_targets(rewards, response_lens, gamma, n_step)
    real_ixs = action_mask.flatten().nonzero().squeeze(1)  # (N,) the real actions in a flattened (B, A) layout
    return dict(tokens=tokens, mask=mask, actions_ixs=actions_ixs, states_ixs=states_ixs, dones=dones,
                action_mask=action_mask, actions=actions, rewards=rewards, returns=returns, discounts=discounts,
                boot_ixs=boot_ixs, real_ixs=real_ixs)


def head_at(head, h, actions):
    """head(h)[..., actions] without the (..., vocab) output: only the chosen rows of the weight are used."""
    return (h * head.weight[actions]).sum(-1) + head.bias[actions]


def ilql_outputs(raw, h, batch):
    """Trunk hidden states h (B, T, C) -> everything ilql_loss takes, flat over the batch's N real actions. The
    vocab-sized heads run on (N, C): never on prompt positions nor on the padding of a (B, A) layout (a third to
    a half of the slots with the demo's mixed response lengths)."""
    C = h.shape[-1]
    hs = h.gather(1, batch["states_ixs"][..., None].expand(-1, -1, C))  # (B, A+1, C)
    vs = raw.heads["v"](hs).squeeze(-1)  # (B, A+1)
    # (B, A, ...) -> (N, ...) at the real actions, through an index collate made on the CPU (a boolean mask would
    # cost a device sync per use on GPU)
    real = lambda x: x.flatten(0, 1).index_select(0, batch["real_ixs"])
    ha, a = real(hs[:, :-1]), real(batch["actions"])  # (N, C) the states that choose the actions, (N,)
    target_q = torch.minimum(head_at(raw.heads["q1_target"], ha, a), head_at(raw.heads["q2_target"], ha, a))
    boot = batch["boot_ixs"]  # (B, A) the state each action's target bootstraps from (t + 1 for one-step TD)
    return dict(logits=raw.lm_head(ha), qs=(raw.heads["q1"](ha), raw.heads["q2"](ha)), target_q=target_q,
                v=real(vs[:, :-1]), v_next=real(vs.gather(1, boot)), actions=a, returns=real(batch["returns"]),
                discounts=real(batch["discounts"]), next_dones=real(batch["dones"].gather(1, boot)))


STATS = ("loss_q", "loss_v", "loss_cql", "loss_awac", "q", "v", "advantage")  # what ilql_loss reports


def ilql_loss(logits, qs, target_q, v, v_next, actions, returns, discounts, next_dones, tau, cql_scale,
              awac_scale, beta_awac=0.0, n=None):
    """The four ILQL terms as means over actions (fp32), every input flat over N actions (see ilql_outputs):
    logits (N, V) policy logits at the action states; qs: online Q heads, each (N, V); target_q (N,) min of the
    target heads at the taken actions; v (N,) V of each action's state; actions (N,); the TD target pieces
    (nstep_targets): returns, discounts, v_next (V of the state the target bootstraps from), next_dones (N,); for
    one-step TD simply r_t, gamma, V(s_{t+1}), done_{t+1}. n: the denominator (default N; the trainer passes the
    global batch's action count, so micro-batches and ranks add up to one mean). Returns (loss, dict of stats)."""
    n = max(len(actions), 1) if n is None else n
    mean = lambda x: x.sum() / n
    v, v_next, target_q = v.float(), v_next.float().detach(), target_q.float().detach()
    td_target = returns + discounts * (1 - next_dones.float()) * v_next  # of Q(s_t, a_t)
    q_taken = [q.gather(-1, actions[:, None]).squeeze(-1).float() for q in qs]
    loss_q = sum(mean((q - td_target) ** 2) for q in q_taken)
    adv = target_q - v
    loss_v = mean((tau - (adv < 0).float()).abs() * adv ** 2)  # adv < 0 <=> Qhat < V
    ce = lambda x: F.cross_entropy(x.float(), actions, reduction="none")  # -log softmax(x)[a_t], (N,)
    loss_cql = sum(mean(ce(q)) for q in qs)
    weights = torch.exp(beta_awac * adv.detach()).clamp(max=100.0)
    loss_awac = mean(weights * ce(logits))
    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    stats = dict(loss_q=loss_q, loss_v=loss_v, loss_cql=loss_cql, loss_awac=loss_awac, q=mean(q_taken[0]),
                 v=mean(v.detach()), advantage=mean(adv.detach()))
    return loss, stats


@torch.no_grad()
def init_targets(raw):
    for target, online in TARGETS.items():
        raw.heads[target].load_state_dict(raw.heads[online].state_dict())


def freeze_targets(raw):
    """Targets are never trained: no grads, not in the optimizer, and ignored by DDP."""
    for target in TARGETS:
        raw.heads[target].requires_grad_(False)


@torch.no_grad()
def polyak_update(raw, alpha):
    """target = (1 - alpha) * target + alpha * online, for every target head parameter."""
    for target, online in TARGETS.items():
        for pt, po in zip(raw.heads[target].parameters(), raw.heads[online].parameters()):
            pt.lerp_(po, alpha)


def ilql_logits_fn(model, beta):
    """Decoding logits for model.generate(..., logits_fn=...): hidden (B, C) -> log_softmax(logits) +
    beta * (min target Q - V), fp32. generate then applies temperature and top-k. beta = 0: the behaviour policy
    (the heads are then not even evaluated)."""
    raw = getattr(model, "module", model)

    def logits_fn(h):
        logprobs = torch.log_softmax(raw.lm_head(h).float(), dim=-1)  # (B, V)
        if beta == 0:
            return logprobs
        q = torch.minimum(raw.heads["q1_target"](h), raw.heads["q2_target"](h)).float()  # (B, V)
        return logprobs + beta * (q - raw.heads["v"](h).float())
    return logits_fn


# ---------------------------------------------------------------------------- data and evaluation helpers
def load_examples(cfg, split):
    if cfg.data_format == "offline":
        return data.load_offline(cfg.data, split, cfg.data_subset or None, cfg.skip_bad)
    if cfg.data_format == "preferences":
        return data.preferences_to_offline(data.load_preferences(cfg.data, split, cfg.data_subset or None,
                                                                 cfg.skip_bad))
    raise ConfigError(f"data_format must be 'offline' or 'preferences', not {cfg.data_format!r}")


def tokenize(examples, cfg, reward_mean, reward_std):
    return [(*data.tokenize_example(e.prompt, e.response, cfg.max_prompt_len, cfg.max_len),
             (e.reward - reward_mean) / reward_std) for e in examples]


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def eval_loss(model, raw, items, cfg, s):
    """ILQL loss terms on held-out data (this rank's shard), averaged over all its actions on all ranks."""
    sums = torch.zeros(len(STATS) + 2, dtype=torch.float64, device=s.device)  # loss, STATS..., action count
    for i in range(0, len(items), cfg.batch_size):
        batch = to_device(collate_offline(items[i:i + cfg.batch_size], cfg.gamma, cfg.n_step), s.device)
        with s.autocast():
            out = ilql_outputs(raw, model(batch["tokens"], batch["mask"]), batch)
            loss, stats = ilql_loss(**out, tau=cfg.tau, cql_scale=cfg.cql_scale,
                                    awac_scale=cfg.awac_scale, beta_awac=cfg.beta_awac, n=1.0)  # sums, divided below
        sums += torch.stack([loss, *(stats[k] for k in STATS), batch["action_mask"].sum().float()]).double()
    total = all_reduce_sum(sums, s).tolist()
    return {f"eval_{k}": v / max(total[-1], 1) for k, v in zip(("loss",) + STATS, total[:-1])}


@torch.no_grad()
def eval_samples(raw, prompts, cfg, s, step, scorer):
    """Sample this rank's prompts at each eval beta; mean score (all ranks) when a scorer is configured, and the
    first sample of each beta printed so a person can read them."""
    metrics, shown = {}, {}
    for beta in cfg.eval_betas:
        logits_fn = ilql_logits_fn(raw, beta)
        gen = torch.Generator(s.device).manual_seed(cfg.seed + 1000 * s.rank + step)  # same for every beta
        total = torch.zeros(3, dtype=torch.float64, device=s.device)  # score sum, count, response tokens
        for i in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[i:i + cfg.batch_size]
            p_tokens, p_mask = data.pad_left([data.tokenize_prompt(p, cfg.max_prompt_len) for p in chunk])
            p_tokens, p_mask = p_tokens.to(s.device), p_mask.to(s.device)
            with s.autocast():
                tokens, _, resp_mask = generate(raw, p_tokens, p_mask, cfg.max_new_tokens, cfg.temperature,
                                                cfg.top_k or None, generator=gen, logits_fn=logits_fn)
            resp = tokens[:, p_tokens.shape[1]:]
            texts = [data.decode([t for t, m in zip(r.tolist(), rm.tolist()) if m and t != data.EOS])
                     for r, rm in zip(resp, resp_mask)]
            shown.setdefault(beta, (chunk[0], texts[0]))
            total[1] += len(chunk)
            total[2] += resp_mask.sum()
            if scorer is not None:
                scores = scorer(chunk, texts, tokens, torch.cat([p_mask, resp_mask], 1))
                total[0] += float(sum(scores))
        total = all_reduce_sum(total, s)
        b = f"{beta:g}"
        metrics[f"len_beta{b}"] = float(total[2] / total[1].clamp(min=1))
        if scorer is not None:
            metrics[f"score_beta{b}"] = float(total[0] / total[1].clamp(min=1))
    for beta, (prompt, text) in shown.items():
        print0(f"sample beta={beta:g}: {prompt[-200:]!r} -> {text[:300]!r}")
    return metrics


# ---------------------------------------------------------------------------- main
def main(cfg):
    # --- setup
    s = setup(cfg.device, cfg.dtype, cfg.seed)
    print_config(cfg)
    if cfg.max_len <= cfg.max_prompt_len:
        raise ConfigError(f"max_len ({cfg.max_len}) must exceed max_prompt_len ({cfg.max_prompt_len})")
    if cfg.data_format not in ("offline", "preferences"):
        raise ConfigError(f"data_format must be 'offline' or 'preferences', not {cfg.data_format!r}")
    if cfg.n_step < 1:
        raise ConfigError(f"n_step must be >= 1 (1 = ILQL's one-step target), not {cfg.n_step}")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    # --- model: one trunk, LM head + V + Q1/Q2 + their targets
    resume = cfg.init_from == "resume"
    scratch = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    heads = ilql_heads(scratch.vocab_size)
    raw, ckpt = load_model(ckpt_path if resume else cfg.init_from, heads, kind="ilql" if resume else ("sft", "ilql"),
                           scratch=scratch)
    if raw.config.vocab_size != scratch.vocab_size:
        raise ConfigError(f"{cfg.init_from}: vocab_size {raw.config.vocab_size}, expected GPT-2's {scratch.vocab_size}")
    if ckpt is None or "heads.q1_target.weight" not in ckpt["model"]:
        init_targets(raw)  # new heads: targets start equal to the online Q heads
    freeze_targets(raw)
    if cfg.max_len > raw.config.block_size or cfg.max_prompt_len + cfg.max_new_tokens > raw.config.block_size:
        raise ConfigError(f"max_len ({cfg.max_len}) and max_prompt_len + max_new_tokens "
                          f"({cfg.max_prompt_len + cfg.max_new_tokens}) must fit block_size {raw.config.block_size}")
    raw.grad_checkpointing = cfg.grad_checkpointing
    raw.to(s.device)
    print0(f"model: {raw.num_params() / 1e6:.1f}M parameters "
           f"({sum(p.numel() for p in raw.heads.parameters()) / 1e6:.1f}M in the heads)")

    # --- data: z-scored rewards, tokenized once
    with rank0_first(s):
        train_examples = load_examples(cfg, cfg.data_split)
        eval_examples = load_examples(cfg, cfg.eval_split) if cfg.eval_split else []
    if resume:
        reward_mean, reward_std = ckpt["reward_mean"], ckpt["reward_std"]
    else:
        rewards = [e.reward for e in train_examples]
        reward_mean, reward_std = statistics.fmean(rewards), statistics.pstdev(rewards)
        if reward_std == 0:
            print0("warning: every reward is the same; nothing to learn beyond behaviour cloning")
            reward_std = 1.0
    train_items = tokenize(train_examples, cfg, reward_mean, reward_std)
    eval_items = tokenize(eval_examples, cfg, reward_mean, reward_std)[s.rank::s.world_size]
    prompts = list(dict.fromkeys(e.prompt for e in (eval_examples or train_examples)))[:cfg.eval_prompts]
    prompts = prompts[s.rank::s.world_size]
    print0(f"data: {len(train_items)} training rows, {len(eval_examples)} held-out rows, rewards z-scored with "
           f"mean {reward_mean:.4g} std {reward_std:.4g}")

    scorer = None
    if cfg.reward_model:
        import reward
        rm = reward.load_reward_model(cfg.reward_model, s.device)

        def scorer(prompts, responses, tokens, mask):
            with s.autocast():
                return reward.score_tokens(rm, tokens, mask).tolist()
    elif cfg.reward_fn:
        fn = load_reward_fn(cfg.reward_fn)

        def scorer(prompts, responses, tokens, mask):
            return check_scores(fn(list(prompts), responses), len(prompts), cfg.reward_fn).tolist()

    # --- optimizer and DDP
    opt = make_optimizer(raw, cfg.learning_rate, cfg.weight_decay)
    start_step = 0
    if resume:
        opt.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        set_rng_state(ckpt["rng"])
        print0(f"resumed from {ckpt_path} at step {start_step}")
    ckpt = None  # free the CPU copy of the weights
    model = torch.compile(raw) if cfg.compile else raw
    if s.ddp:
        # find_unused_parameters=False: every trainable parameter gets a gradient every step (V from L_V, Q from
        # L_Q/L_CQL, LM head from L_AWAC, all terms always in the graph); the frozen targets are ignored by DDP.
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[s.local_rank] if s.device.startswith("cuda") else None)

    log_path = start_log(cfg.out_dir, resume) if s.master else None

    # --- loop
    global_batch = cfg.batch_size * cfg.grad_accum * s.world_size
    timer = Timer(cfg.max_iters, start_step)
    metrics = {}
    for step in range(start_step, cfg.max_iters):
        t0 = time.time()
        lr = lr_at(step, cfg.learning_rate, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = batch_indices(step, global_batch, len(train_items), cfg.seed)
        # every rank knows the whole global batch, so the loss is one mean over all its actions; DDP averages
        # gradients over ranks, hence the denominator divided by world_size
        n = sum(len(train_items[i][1]) for i in idx) / s.world_size
        mine = [train_items[i] for i in idx[s.rank::s.world_size]]
        stats_sum, n_tokens = {}, 0
        for micro in range(cfg.grad_accum):
            batch = mine[micro * cfg.batch_size:(micro + 1) * cfg.batch_size]
            batch = to_device(collate_offline(batch, cfg.gamma, cfg.n_step), s.device)
            sync = nullcontext() if not s.ddp or micro == cfg.grad_accum - 1 else model.no_sync()
            with sync:
                with s.autocast():
                    out = ilql_outputs(raw, model(batch["tokens"], batch["mask"]), batch)
                    loss, stats = ilql_loss(**out, tau=cfg.tau, cql_scale=cfg.cql_scale,
                                            awac_scale=cfg.awac_scale, beta_awac=cfg.beta_awac, n=n)
                loss.backward()
            for k, v in dict(loss=loss, **stats).items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v.detach())
            n_tokens += int(batch["mask"].sum())
        check_finite(stats_sum["loss"], "loss", step)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip or float("inf"))
        check_finite(grad_norm.item(), "grad_norm", step)  # a NaN gradient must not reach the weights or a checkpoint
        opt.step()
        opt.zero_grad(set_to_none=True)
        polyak_update(raw, cfg.alpha)

        # --- logging
        dt = time.time() - t0
        metrics = all_reduce_mean({**stats_sum, "grad_norm": grad_norm.item()}, s)
        metrics.update(lr=lr, tok_per_s=n_tokens * s.world_size / dt)
        log_line(step, {**metrics, "eta": timer.eta(step)})
        if s.master:
            append_jsonl(log_path, {"step": step, **metrics})

        # --- evaluation and checkpoint
        done = step + 1
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            raw.eval()
            ev = eval_loss(model, raw, eval_items, cfg, s) if eval_examples else {}
            ev.update(eval_samples(raw, prompts, cfg, s, done, scorer))
            raw.train()
            log_line(f"{done} (eval)", ev)
            metrics.update(ev)
            if s.master:
                append_jsonl(log_path, {"step": done, **ev})
                save_checkpoint(ckpt_path, kind="ilql", model_config=asdict(raw.config), model=raw.state_dict(),
                                optimizer=opt.state_dict(), step=done, config=asdict(cfg), rng=rng_state(),
                                reward_mean=reward_mean, reward_std=reward_std)

    if s.master:
        raw.save_hf(os.path.join(cfg.out_dir, "hf"))  # the behaviour policy (trunk + LM head)
    cleanup(s)
    return metrics


if __name__ == "__main__":
    run_main(main, Config)
