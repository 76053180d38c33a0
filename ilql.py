"""
ILQL: Implicit Language Q-Learning (Snell et al. 2022), offline RL on (prompt, response, reward) rows, as trlx
implements it, on our GPT-2.

The algorithm: one GPT-2 trunk carries six heads: the LM head (the behaviour policy, trained by behaviour cloning), a
V head, two vocab-sized Q heads and frozen target copies of the two Q heads. Per response token
(action) a_t chosen in state s_t, with Qhat = min(target Q1, target Q2)(s_t, a_t):

    L_Q    = sum_k mean (Q_k(s_t, a_t) - (r_t + gamma * (1 - done_{t+1}) * V(s_{t+1})))^2     V(s_{t+1}) detached
    L_V    = mean |tau - 1[Qhat < V(s_t)]| * (Qhat - V(s_t))^2                              expectile regression
    L_CQL  = sum_k mean CE(Q_k(s_t, :), a_t)                                                 pushes unseen actions down
    L_AWAC = mean exp(beta_awac * (Qhat - V(s_t))) * -log pi(a_t | s_t)                      beta_awac = 0: plain BC
    loss   = L_Q + L_V + cql_scale * L_CQL + awac_scale * L_AWAC

all means over the real action tokens of the whole (accumulated, all-rank) batch (n_step > 1: an n-step Q target,
see below). After every optimizer step the targets move towards the online heads: target = (1 - alpha) * target +
alpha * online. Decoding perturbs the behaviour policy by the advantage: `log_softmax(logits) + beta * (Qhat(s, .) -
V(s))`, then temperature and top-k (beta = 0 is the behaviour policy); sample.ilql_logits_fn plugs it into
model.generate.

Our choices, where public implementations differ:
- Targets are Polyak-averaged after *every* optimizer step (trlx's trainer calls its sync once per pass over the
  data, after the loop over batches, and only when the step count is a multiple of steps_for_target_q_sync).
- Rewards are z-scored over the training set (mean/std stored in the checkpoint) and sit on the last response token.
  Every response ends its episode, also one truncated at max_len: its reward was given for the text as stored.
- Heads are single nn.Linear layers (trlx: 2-layer MLPs), so the heads are plain `GPTConfig.heads`. The
  vocab-sized heads run only on the real action states (no padding); the target Q values at the taken actions
  are computed from the gathered weight rows, not from a vocab-sized matmul. Each of the four vocab-sized heads is
  as large as the token embedding: together they more than double GPT-2 small's parameters.
- `n_step` > 1 replaces the one-step target by an n-step one (as in n-step DQN; not in the ILQL paper or trlx):
  Q(s_t, a_t) -> sum_{k<m} gamma^k r_{t+k} + gamma^m * (1 - done) * V(s_{t+m}), m = min(n_step, actions left).
  With one reward per response, a one-step target moves the reward back one token per round of Q -> target Q ->
  V learning; a short run never gets it from the EOS to the words that earned it (measured: docs/results.md).
  n_step >= max_len makes every target the Monte-Carlo return of its row (V then only serves as the advantage
  baseline); n_step = 1 (default) is ILQL.
- AWAC weights are clamped at 100, as in IQL (exp of an advantage overflows easily).
- The Q target uses the online V (as IQL and trlx): V has no target copy.
- Under bf16 autocast the LM head, V and the Q heads compute in fp32 (fp32_heads, model.Head), in training, in the
  evaluation samples and in sample.py alike: bf16 rounds the large logits, and the advantage added to them.
- The Hugging Face export (out_dir/hf) is the trunk + LM head only, i.e. the beta = 0 behaviour policy; ILQL
  decoding needs the heads in out_dir/ckpt.pt (sample.py --beta=...).
Outputs in out_dir: ckpt.pt (the last step, for resume and ILQL decoding), hf/, log.jsonl.

    python ilql.py config/ilql_tiny.py
    python ilql.py config/ilql_hh_gpt2.py --reward_model=out-rm-hh/ckpt.pt
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
from common import (ConfigError, Timer, all_reduce_sum, begin_step, check_finite, check_numbers, cleanup, load_model,
                    make_optimizer, mix_seed, optimizer_step, print0, print_config, rank0_first, rank_batch, restore,
                    run_main, save_checkpoint, setup, start_log, wrap_ddp)
from model import GPTConfig, fp32_heads
from scoring import make_scorer
from sample import ilql_logits_fn, sample_responses


@dataclass
class Config:
    # model
    init_from: str = "gpt2"  # gpt2..gpt2-xl | HF folder | hub id | an sft/ilql .pt | scratch | resume
    n_layer: int = 12  # scratch only (default: GPT-2 124M's shape)
    n_head: int = 12  # scratch only
    n_embd: int = 768  # scratch only
    block_size: int = 1024  # scratch only
    fp32_heads: bool = True  # under bf16 autocast lm_head, V and the Q heads compute in fp32 (model.Head)
    # data
    data: str = "Anthropic/hh-rlhf"  # a local file/folder or hub dataset, in the format data_format names
    data_format: str = "preferences"  # offline: prompt/response/reward rows | preferences: chosen +1, rejected -1
    data_subset: str = ""  # hub dataset config name ("" = none)
    data_split: str = "train"  # training split (slices allowed: "train[:90%]")
    eval_split: str = "test"  # held-out split for the eval loss and sample prompts ("" = none: training prompts)
    skip_bad: bool = False  # drop (and count) bad rows instead of stopping at the first one
    max_prompt_len: int = 64  # prompts are left-truncated to this many tokens
    max_len: int = 128  # prompt + response (+ EOS) tokens; longer responses are cut (and lose their EOS)
    # ILQL
    gamma: float = 0.99  # discount
    n_step: int = 1  # Q targets bootstrap from V this many actions ahead (1 = ILQL; >= max_len: Monte-Carlo returns)
    tau: float = 0.7  # expectile of the V loss (0.5 = mean; -> 1 = max over the data's actions)
    alpha: float = 0.005  # Polyak rate of the target Q heads, applied after every optimizer step
    cql_scale: float = 0.1  # weight of the CQL term
    awac_scale: float = 1.0  # weight of the AWAC / behaviour-cloning term
    beta_awac: float = 0.0  # AWAC temperature: weights exp(beta_awac * advantage); 0 = plain behaviour cloning
    # optimisation
    batch_size: int = 8  # rows per micro-batch, per rank
    grad_accum: int = 1  # micro-batches per optimizer step, per rank
    max_iters: int = 100  # optimizer steps
    learning_rate: float = 1e-4  # peak LR
    warmup_iters: int = 10  # linear warmup steps
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio * learning_rate (1 = constant)
    lr_decay_iters: int = 0  # steps of the cosine schedule (0 = max_iters); keep it fixed to stop and resume a run
    weight_decay: float = 0.0  # AdamW weight decay on matrices (not biases, LayerNorms)
    beta1: float = 0.9  # AdamW betas
    beta2: float = 0.999  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    # evaluation, checkpoints, logging
    out_dir: str = "out-ilql"  # ckpt.pt (last, for resume and ILQL decoding), hf/, log.jsonl
    eval_interval: int = 50  # evaluate and write the checkpoint every this many steps (and at the end)
    eval_size: int = 16  # distinct held-out prompts sampled at each evaluation (0 = only the held-out loss)
    eval_betas: tuple = (0.0, 1.0, 4.0)  # decoding betas compared at each evaluation (0 = behaviour policy)
    max_new_tokens: int = 32  # response length of evaluation samples
    temperature: float = 1.0  # sampling temperature of evaluation samples
    top_k: int = 20  # top-k of evaluation samples (0 = off)
    reward_model: str = ""  # our reward checkpoint to score evaluation samples ("" = none)
    reward_fn: str = ""  # or "module:function", f(prompts, responses) -> list of floats
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | tf32 (CUDA) | bfloat16 (autocast; weights, optimizer, loss math stay fp32)
    seed: int = 1337  # seeds the init, the data order and the samples (torch gets seed + rank)
    compile: bool = False  # torch.compile the trunk
    grad_checkpointing: bool = False  # recompute blocks in backward: +1 forward, activations of 1 block not all


# ----------------------------------------------------------------------------- the algorithm
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

        target_t = reward_sums_t + discounts_t * (1 - done at state t + m) * V(s_{t+m}),
        reward_sums_t = sum_{k < m} gamma^k r_{t+k},   discounts_t = gamma^m.

    (reward_sums, not "returns": they stop at the bootstrap, and PPO's returns are its value targets.)
    n_step = 1 is ILQL's target r_t + gamma * V(s_{t+1}); n_step >= R makes every target the Monte-Carlo return
    (the episode ends first, so V(s_R) never counts). rewards (B, A), zero past each row's R actions; response_lens
    (B,). Returns reward_sums (B, A), discounts (B, A) and boot_ixs (B, A), the state index t + m (padding slots:
    t + 1)."""
    if n_step < 1:
        raise ValueError(f"n_step must be >= 1, got {n_step}")
    B, A = rewards.shape
    t = torch.arange(A)[None, :]  # (1, A)
    m = torch.minimum(torch.full_like(t, n_step), response_lens[:, None] - t).clamp(min=1)  # (B, A)
    reward_sums = torch.zeros(B, A)
    for k in range(min(n_step, A)):  # rewards past an episode's end are 0, so summing to n_step sums to m
        reward_sums[:, :A - k] += gamma ** k * rewards[:, k:]
    return reward_sums, gamma ** m.float(), t + m


def collate_offline(items, gamma=0.99, n_step=1):
    """(prompt_ids, response_ids, reward) triples -> a right-padded batch with everything the losses index."""
    tokens, mask = data.pad_right([p + r for p, r, _ in items])  # (B, T)
    prompt_lens = torch.tensor([len(p) for p, _, _ in items])
    response_lens = torch.tensor([len(r) for _, r, _ in items])
    actions_ixs, states_ixs, dones, action_mask = ilql_indices(prompt_lens, response_lens)
    actions = tokens.gather(1, actions_ixs + 1)  # (B, A) the token each action state chose
    rewards = torch.zeros(actions.shape)  # (B, A): the reward sits on the last action
    rewards[torch.arange(len(items)), response_lens - 1] = torch.tensor([float(r) for _, _, r in items])
    reward_sums, discounts, boot_ixs = nstep_targets(rewards, response_lens, gamma, n_step)
    real_ixs = action_mask.flatten().nonzero().squeeze(1)  # (N,) the real actions in a flattened (B, A) layout
    return dict(tokens=tokens, mask=mask, actions_ixs=actions_ixs, states_ixs=states_ixs, dones=dones,
                action_mask=action_mask, actions=actions, rewards=rewards, reward_sums=reward_sums, discounts=discounts,
                boot_ixs=boot_ixs, real_ixs=real_ixs)


def head_at(head, h, actions):
    """head(h)[..., actions] without the (..., vocab) output: only the chosen rows of the weight are used."""
    return (h * head.weight[actions]).sum(-1) + head.bias[actions]


def ilql_outputs(raw_model, h, batch):
    """Trunk hidden states h (B, T, C) -> everything ilql_loss takes, flat over the batch's N real actions. The
    vocab-sized heads run on (N, C): never on prompt positions nor on the padding of a (B, A) layout (a large share
    of the slots when response lengths vary)."""
    C, heads = h.shape[-1], raw_model.heads
    hs = h.gather(1, batch["states_ixs"][..., None].expand(-1, -1, C))  # (B, A+1, C)
    vs = heads["v"](hs).squeeze(-1)  # (B, A+1)
    # (B, A, ...) -> (N, ...) at the real actions, through an index collate made on the CPU (a boolean mask would
    # cost a device sync per use on GPU)
    real = lambda x: x.flatten(0, 1).index_select(0, batch["real_ixs"])
    ha, a = real(hs[:, :-1]), real(batch["actions"])  # (N, C) the states that choose the actions, (N,)
    with torch.no_grad():  # a target (ilql_loss detaches it too): no graph through ha kept in memory
        target_q = torch.minimum(head_at(heads["q1_target"], ha, a), head_at(heads["q2_target"], ha, a))
    boot = batch["boot_ixs"]  # (B, A) the state each action's target bootstraps from (t + 1 for one-step TD)
    return dict(logits=raw_model.lm_head(ha), qs=(heads["q1"](ha), heads["q2"](ha)), target_q=target_q,
                v=real(vs[:, :-1]), v_next=real(vs.gather(1, boot)), actions=a, reward_sums=real(batch["reward_sums"]),
                discounts=real(batch["discounts"]), next_dones=real(batch["dones"].gather(1, boot)))


STATS = ("loss_q", "loss_v", "loss_cql", "loss_awac", "q", "v", "advantage")  # what ilql_loss reports


def ilql_loss(logits, qs, target_q, v, v_next, actions, reward_sums, discounts, next_dones, tau, cql_scale,
              awac_scale, beta_awac=0.0, n=None):
    """The four ILQL terms as means over actions (fp32), every input flat over N actions (see ilql_outputs):
    logits (N, V) policy logits at the action states; qs: online Q heads, each (N, V); target_q (N,) min of the
    target heads at the taken actions; v (N,) V of each action's state; actions (N,); the TD target pieces
    (nstep_targets): reward_sums, discounts, v_next (V of the state the target bootstraps from), next_dones (N,); for
    one-step TD simply r_t, gamma, V(s_{t+1}), done_{t+1}. n: the denominator (default N; the trainer passes the
    global batch's action count, so micro-batches and ranks add up to one mean). Returns (loss, dict of stats)."""
    n = max(len(actions), 1) if n is None else n
    mean = lambda x: x.sum() / n
    v, v_next, target_q = v.float(), v_next.float().detach(), target_q.float().detach()
    td_target = reward_sums + discounts * (1 - next_dones.float()) * v_next  # of Q(s_t, a_t)
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
def init_targets(raw_model):
    for target, online in TARGETS.items():
        raw_model.heads[target].load_state_dict(raw_model.heads[online].state_dict())


def freeze_targets(raw_model):
    """Targets are never trained: no grads, not in the optimizer, and ignored by DDP."""
    for target in TARGETS:
        raw_model.heads[target].requires_grad_(False)


@torch.no_grad()
def polyak_update(raw_model, alpha):
    """target = (1 - alpha) * target + alpha * online, for every target head parameter."""
    for target, online in TARGETS.items():
        for pt, po in zip(raw_model.heads[target].parameters(), raw_model.heads[online].parameters()):
            pt.lerp_(po, alpha)


def batch_loss(model, raw_model, b, n, cfg):
    """ILQL's loss and stats on one collated batch (on the device): the trunk through `model` (compiled, DDP), the
    heads of `raw_model`; every term divided by n."""
    out = ilql_outputs(raw_model, model(b["tokens"]), b)  # right-padded: no mask needed (data.pad_right)
    return ilql_loss(**out, tau=cfg.tau, cql_scale=cfg.cql_scale, awac_scale=cfg.awac_scale,
                     beta_awac=cfg.beta_awac, n=n)


def collated_micro_batches(items, step, cfg, s):
    """This rank's micro-batches of optimizer step `step` (common.rank_batch), and the action count of the whole
    global batch: the loss is one mean over it."""
    mine, idx = rank_batch(step, cfg, len(items), s)
    mine = [items[i] for i in mine]
    batches = [collate_offline(mine[j:j + cfg.batch_size], cfg.gamma, cfg.n_step)
               for j in range(0, len(mine), cfg.batch_size)]
    return batches, sum(len(items[i][1]) for i in idx)


def forward_backward(model, raw_model, batches, n_actions, cfg, s):
    """Accumulate into .grad the gradient of ILQL's loss over `batches` of every rank, divided by n_actions (the global
    batch's). Returns (loss and STATS as floats, identical on every rank; real tokens processed by all ranks)."""
    total = torch.zeros(len(STATS) + 2, dtype=torch.float64, device=s.device)  # loss, STATS..., real tokens
    # on the device up front: a copy to the GPU inside the loop would wait for the kernels queued before it
    batches = [{k: v.to(s.device) for k, v in b.items()} for b in batches]
    for i, b in enumerate(batches):
        # DDP all-reduces gradients in backward; only the last micro-batch of the step needs to.
        with model.no_sync() if s.ddp and i < len(batches) - 1 else nullcontext():
            with s.autocast():
                loss, stats = batch_loss(model, raw_model, b, n_actions, cfg)
            # DDP AVERAGES gradients over ranks; each rank's loss is already its share of the global mean, so
            # multiply by world_size to get their sum
            (loss * s.world_size).backward()
        total += torch.stack([loss, *(stats[k] for k in STATS), b["mask"].sum().float()]).detach().double()
    total = all_reduce_sum(total, s).tolist()
    return dict(zip(("loss",) + STATS, total[:-1])), total[-1]


# ----------------------------------------------------------------------------- data, model, evaluation
def check_config(cfg):
    check_numbers(cfg, positive=("max_prompt_len", "max_len", "n_step", "max_new_tokens"),
                  non_negative=("cql_scale", "awac_scale", "beta_awac", "eval_size", "temperature", "top_k"),
                  fraction=("gamma", "tau", "alpha"))
    if cfg.data_format not in ("offline", "preferences"):
        raise ConfigError(f"data_format must be 'offline' or 'preferences', not {cfg.data_format!r}")
    if cfg.reward_model and cfg.reward_fn:
        raise ConfigError("set at most one of reward_model and reward_fn (they score the evaluation samples)")


def load_examples(cfg, split):
    if cfg.data_format == "offline":
        return data.load_offline(cfg.data, split, cfg.data_subset, cfg.skip_bad)
    return data.preferences_to_offline(data.load_preferences(cfg.data, split, cfg.data_subset, cfg.skip_bad))


def load_data(cfg, s):
    """(prompt_ids, response_ids, z-scored reward) triples for training and held-out rows, the distinct prompts the
    evaluation samples (held-out ones, or training ones without an eval_split), and the rewards' (mean, std)."""
    with rank0_first(s):
        train_data = load_examples(cfg, cfg.data_split)
        eval_data = load_examples(cfg, cfg.eval_split) if cfg.eval_split else []
    # a pure function of the training set, which a resumed run reads again: it gets the same mean and std
    rewards = [e.reward for e in train_data]
    mean, std = statistics.fmean(rewards), statistics.pstdev(rewards)
    if std == 0:
        print0("warning: every reward is the same; nothing to learn beyond behaviour cloning")
        std = 1.0
    tok = lambda e: (*data.tokenize_example(e.prompt, e.response, cfg.max_prompt_len, cfg.max_len),
                     (e.reward - mean) / std)
    train_items, eval_items = [tok(e) for e in train_data], [tok(e) for e in eval_data]
    prompts = list(dict.fromkeys(e.prompt for e in (eval_data or train_data)))[:cfg.eval_size]
    print0(f"data: {len(train_items)} training rows, {len(eval_items)} held-out rows, rewards z-scored with "
           f"mean {mean:.4g} std {std:.4g}")
    return train_items, eval_items, prompts, (mean, std)


def build_model(cfg, s):
    """One trunk with the LM head, V, Q1/Q2 and their targets, on the device, and the checkpoint it came from (a
    resume's or an ILQL init's, or None)."""
    resume = cfg.init_from == "resume"
    init = os.path.join(cfg.out_dir, "ckpt.pt") if resume else cfg.init_from
    scratch = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    model, ckpt = load_model(init, ilql_heads(scratch.vocab_size), kind="ilql" if resume else ("sft", "ilql"),
                             scratch=scratch)
    if model.config.vocab_size != scratch.vocab_size:
        raise ConfigError(f"{init}: vocab_size {model.config.vocab_size}, expected GPT-2's {scratch.vocab_size}")
    if model.config.dropout != 0:  # dropout would put noise into V(s') and the Q targets
        raise ConfigError(f"{init}: dropout {model.config.dropout}; ILQL trains with dropout off")
    block_size = model.config.block_size
    if cfg.max_len > block_size or cfg.max_prompt_len + cfg.max_new_tokens > block_size:
        raise ConfigError(f"max_len ({cfg.max_len}) and max_prompt_len + max_new_tokens "
                          f"({cfg.max_prompt_len + cfg.max_new_tokens}) must fit block_size {block_size}")
    if ckpt is None or "heads.q1_target.weight" not in ckpt["model"]:
        init_targets(model)  # new heads: the targets start equal to the online Q heads
    freeze_targets(model)
    fp32_heads(model, cfg.fp32_heads)
    model.grad_checkpointing = cfg.grad_checkpointing
    print0(f"model: {model.num_params() / 1e6:.2f}M parameters from {init} "
           f"({sum(p.numel() for p in model.heads.parameters()) / 1e6:.1f}M in the heads)")
    return model.to(s.device), ckpt


@torch.no_grad()
def eval_loss(raw_model, eval_items, cfg, s):
    """The ILQL loss terms on the held-out rows, each a mean over all their actions (all ranks)."""
    total = torch.zeros(len(STATS) + 2, dtype=torch.float64, device=s.device)  # loss, STATS..., actions
    mine = eval_items[s.rank::s.world_size]
    for j in range(0, len(mine), cfg.batch_size):
        b = collate_offline(mine[j:j + cfg.batch_size], cfg.gamma, cfg.n_step)
        b = {k: v.to(s.device) for k, v in b.items()}
        with s.autocast():
            loss, stats = batch_loss(raw_model, raw_model, b, 1.0, cfg)  # sums, divided by the actions below
        total += torch.stack([loss, *(stats[k] for k in STATS), b["action_mask"].sum().float()]).double()
    *sums, n = all_reduce_sum(total, s).tolist()
    return {f"eval_{k}": x / max(n, 1) for k, x in zip(("loss",) + STATS, sums)}


@torch.no_grad()
def eval_samples(raw_model, prompts, score_fn, cfg, s):
    """The prompts sampled at each eval beta: mean response length and, with a score_fn, mean score (all ranks).
    Rank 0 prints the first sample of each beta."""
    metrics, chunk_size = {}, cfg.batch_size * s.world_size
    if not prompts:
        return metrics
    for beta in cfg.eval_betas:
        total = torch.zeros(3, dtype=torch.float64, device=s.device)  # scores, responses, response tokens
        for j in range(0, len(prompts), chunk_size):
            # a chunk is one global batch; this rank samples its rows rank::world_size with the sampler's shard
            chunk = prompts[j:j + chunk_size]
            if s.rank >= len(chunk):  # a last chunk smaller than world_size: nothing for this rank
                continue
            gen = torch.Generator(s.device).manual_seed(mix_seed(cfg.seed, -1, j))  # the same draws for every eval
            with s.autocast():
                r = sample_responses(raw_model, chunk, cfg.max_prompt_len, cfg.max_new_tokens, cfg.temperature,
                                     cfg.top_k or None, generator=gen, logits_fn=ilql_logits_fn(raw_model, beta),
                                     shard=(s.rank, s.world_size))
            mine = chunk[s.rank::s.world_size]
            score = float(score_fn(mine, r["texts"], r["tokens"], r["mask"]).sum()) if score_fn else 0.0
            total += torch.tensor([score, len(mine), float(r["response_mask"].sum())], dtype=torch.float64,
                                  device=s.device)
            if j == 0:
                print0(f"sample beta={beta:g}: {chunk[0][-200:]!r} -> {r['texts'][0][:300]!r}")
        score, n, n_tokens = all_reduce_sum(total, s).tolist()
        metrics[f"len_beta{beta:g}"] = n_tokens / max(n, 1)
        if score_fn:
            metrics[f"score_beta{beta:g}"] = score / max(n, 1)
    return metrics


def evaluate(raw_model, eval_items, prompts, score_fn, cfg, s):
    """Held-out loss terms (with an eval_split) and the samples of each eval beta."""
    raw_model.eval()
    metrics = {**(eval_loss(raw_model, eval_items, cfg, s) if eval_items else {}),
               **eval_samples(raw_model, prompts, score_fn, cfg, s)}
    raw_model.train()
    return metrics


def save(path, model, optimizer, step, reward_stats, cfg):
    save_checkpoint(path, kind="ilql", model_config=asdict(model.config), model=model.state_dict(),
                    optimizer=optimizer.state_dict(), step=step, config=asdict(cfg),
                    reward_mean=reward_stats[0], reward_std=reward_stats[1])


# ----------------------------------------------------------------------------- training
def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed, cfg.out_dir)
    print_config(cfg)
    check_config(cfg)
    train_items, eval_items, prompts, reward_stats = load_data(cfg, s)
    raw_model, ckpt = build_model(cfg, s)
    score_fn = None
    if cfg.reward_model or cfg.reward_fn:
        score_fn, _ = make_scorer(cfg.reward_model, cfg.reward_fn, s.device, s.autocast, cfg.batch_size,
                                  max_len=cfg.max_prompt_len + cfg.max_new_tokens)  # it scores the eval samples
    optimizer = make_optimizer(raw_model, cfg)  # the frozen targets are not in it
    resume = cfg.init_from == "resume"
    start = restore(ckpt, optimizer, cfg) if resume else 0
    ckpt = None  # free the CPU copy of the weights and optimizer state
    # DDP's find_unused_parameters stays off: every trainable parameter gets a gradient every step (V from L_V, Q from
    # L_Q and L_CQL, the LM head from L_AWAC); the frozen targets are ignored
    model = wrap_ddp(torch.compile(raw_model) if cfg.compile else raw_model, s)  # what trains: compiled, DDP
    log = start_log(cfg.out_dir, resume, s)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")

    if start == 0:
        log(0, evaluate(raw_model, eval_items, prompts, score_fn, cfg, s))
    timer, metrics = Timer(cfg.max_iters, start), {}
    model.train()
    for step in range(start, cfg.max_iters):
        t0 = time.time()
        lr = begin_step(optimizer, step, cfg, s)
        # 1. this rank's micro-batches: states, actions, the reward on each response's last action, n-step TD target
        # pieces (collate_offline); forward and backward of L_Q + L_V + cql_scale * L_CQL + awac_scale * L_AWAC, one
        # mean over the actions of this step's global batch
        batches, n_actions = collated_micro_batches(train_items, step, cfg, s)
        stats, n_tokens = forward_backward(model, raw_model, batches, n_actions, cfg, s)
        check_finite(stats["loss"], "loss", step)  # before the weights or any checkpoint see it
        # 2. clip, step
        grad_norm = optimizer_step(optimizer, raw_model.parameters(), cfg.grad_clip, step)
        # 3. the target Q heads follow the online ones: target = (1 - alpha) * target + alpha * online
        polyak_update(raw_model, cfg.alpha)
        metrics = {**stats, "lr": lr, "grad_norm": grad_norm, "tok_per_s": n_tokens / (time.time() - t0)}
        log(step, {**metrics, "eta": timer.eta(step)})

        done = step + 1  # the next step to run: where a resume starts
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            ev = evaluate(raw_model, eval_items, prompts, score_fn, cfg, s)
            log(done, ev)  # the weights after `done` steps
            metrics.update(ev)
            if s.master:
                save(ckpt_path, raw_model, optimizer, done, reward_stats, cfg)

    if s.master:
        raw_model.save_hf(os.path.join(cfg.out_dir, "hf"))  # the behaviour policy (trunk + LM head)
        print0(f"saved {ckpt_path} and {os.path.join(cfg.out_dir, 'hf')}")
    cleanup(s)
    return metrics


if __name__ == "__main__":
    run_main(main, Config)
