"""
The whole RLHF pipeline, offline, on a built-in task: teach a small GPT-2 to write *positive* movie reviews.

No network and no human: the task, reviews.py, is a seeded generator of reviews of mixed sentiment and a documented
Python "gold labeler" (`reviews.gold_score`) that stands in for the human. The reward model and the policies never see
it; they only see preference pairs it labeled through Bradley-Terry noise, as a human would label them. Because the
gold is known, the report can say what RLHF optimizes for real (gold score) and what it only makes the reward model
believe.

    1 corpus   seeded review openings + completions (positive / negative / mixed) -> data/corpus/{train,test}.jsonl
    2 SFT      a small GPT-2 from scratch learns to write reviews of both sentiments, ending with EOS
    3 label    two SFT samples per prompt, labeled by the gold through BT noise -> data/prefs/train.jsonl
               (+ held-out pairs labeled by the noiseless gold -> data/prefs/test.jsonl: RM accuracy vs gold)
    4 reward   a reward model trained on the labeled pairs
    5 PPO      the SFT policy optimized against the reward model, KL-penalized to the SFT model
    6 GRPO     the same without a critic: each response's score relative to its group of samples of one prompt
    7 DPO      the labeled pairs straight into the policy: no reward model, no sampling
    8 ILQL     offline RL on the same labeled pairs (its Q targets: each response's return, n_step spanning it)
    9 eval     gold score, RM score, KL to SFT and gold win rate vs SFT per method, best-of-n; the
               over-optimisation curves (gold and RM vs sqrt(KL): best-of-n, PPO and GRPO along training);
               report.md + PNGs

PPO and GRPO train in five chunks, each resuming the last (exact), and the policy is probed between chunks.
--task=summarize runs the same pipeline on the second task, summarize.py: short posts and their summaries (the TL;DR
task of Stiennon et al. 2020 and the TRLx article, offline), with ROUGE against reference summaries in the report.

    python demo.py                       # make demo: the full run
    python demo.py --seed=1              # the same with other seeds everywhere (the README's spread over seeds)
    python demo.py --task=summarize      # the summarization task
    python demo.py --quick=True          # tiny sizes and budgets: a smoke test of the wiring
    python demo.py --only=ilql           # rerun ILQL and the evaluation on a finished run's SFT model, labels, RM
    python demo.py --fp32_heads=True     # the output heads in fp32, as the trainers default to (slower here)

To put a real human in the loop instead of the gold labeler, label.py writes the same prompt/chosen/rejected JSONL.
"""

import json
import math
import os
import random
import time
from dataclasses import dataclass, replace

import torch

import reviews
import scoring
from common import ConfigError, check_numbers, cpu_info, load_model, print0, print_config, run_main, setup
from model import fp32_heads
from eval import evaluate, kl_to_ref, sample_policy, write_results
from sample import best_of_n_kl, ilql_logits_fn

# ----------------------------------------------------------------------------- the tasks
@dataclass
class Task:
    """What the pipeline needs from a task: a corpus of prompts with completions SFT learns, and the hidden human."""
    title: str
    make_corpus: object  # (n, seed) -> rows {"prompt", "completion"}: SFT's data, and every later stage's prompts
    gold_score: object  # (prompt, response) -> float: labels the preference pairs, and judges the final policies
    sizes: dict  # the Config sizes this task needs (they replace the defaults, not what you set)
    quick: dict  # the same for --quick
    references: bool = False  # the corpus completions are references to score against (ROUGE, BLEU)


def load_task(name):
    if name == "reviews":
        return Task(reviews.TITLE, reviews.make_corpus, reviews.gold_score, {}, reviews.QUICK)  # its sizes: Config's
    if name == "summarize":
        import summarize  # the TL;DR task of the TRLx article, offline: generated posts, a gold labeler of summaries
        return Task(summarize.TITLE, summarize.make_corpus, summarize.gold_score, summarize.CONFIG, summarize.QUICK,
                    references=True)
    raise ConfigError(f"task must be 'reviews' or 'summarize', not {name!r}")

# ----------------------------------------------------------------------------- the pipeline's configuration
@dataclass
class Config:
    out_dir: str = "out/demo"  # everything goes here: data/, sft/, reward/, ppo/, grpo/, dpo/, ilql/, report.md
    task: str = "reviews"  # reviews: write positive movie reviews | summarize: summarize short posts (TL;DR)
    seed: int = 1337  # every seed of the run derives from it
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "bfloat16"  # "float32" | "bfloat16" (autocast: faster on CPU too; log-probs, KL, losses stay fp32)
    fp32_heads: bool = False  # the trainers' default is True (model.Head); off here: see load_policy
    quick: bool = False  # tiny sizes and budgets (tests, smoke runs) for the sizes you leave at their defaults
    only: str = ""  # ppo | grpo | dpo | ilql | eval: rerun that stage (+ eval) on the other stages' outputs in out_dir
    # sizes and budgets (a task replaces the defaults of those it names)
    n_train: int = 20000  # SFT corpus rows
    n_eval: int = 500  # corpus rows of another seed (SFT eval loss)
    n_pref_prompts: int = 2000  # prompts sampled twice by the SFT model and labeled: RM, DPO and ILQL training pairs
    n_heldout_prompts: int = 300  # prompts for pairs labeled by the noiseless gold: RM accuracy vs gold
    n_eval_prompts: int = 200  # prompts of the final evaluation
    n_probe_prompts: int = 64  # prompts of the over-optimisation curves (PPO/GRPO along training, best-of-n)
    bt_temperature: float = 1.0  # labeler noise: P(a preferred) = sigmoid((gold_a - gold_b) / bt_temperature)
    max_prompt_len: int = 32  # prompt tokens (longer prompts are left-truncated)
    max_new_tokens: int = 40  # response length budget (the longest corpus completion is ~20 tokens)
    n_layer: int = 4  # the SFT model, trained from scratch
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 96  # max_prompt_len + max_new_tokens, at least
    batch_size: int = 32  # sequences (SFT), pairs (RM, DPO, ILQL) or prompts (PPO, GRPO) per step
    sft_iters: int = 400  # steps of batch_size sequences (the defaults: 0.64 of an epoch of n_train)
    rm_iters: int = 400  # ~6 epochs of the ~2,000 pairs (fewer gave a worse RM: docs/results.md)
    ppo_iters: int = 60
    grpo_iters: int = 50  # longer over-optimised the RM (docs/results.md)
    dpo_iters: int = 120  # two epochs of the labeled pairs
    ilql_iters: int = 120
    target_kl: float = 6.0  # PPO's KL target (nats per response); the controller's horizon is a tenth of the run
    group_size: int = 4  # GRPO: samples per prompt
    ilql_betas: tuple = (4.0, 8.0)  # ILQL decoding: log_softmax(logits) + beta * (min target Q - V), each evaluated
    best_of_n: int = 8  # n of the best-of-n baseline
    curve_n: int = 64  # best-of-n in the over-optimisation plot: n = 1, 2, 4, ..., curve_n


STAGES = ("corpus", "SFT", "label", "reward model", "PPO", "GRPO", "DPO", "ILQL", "evaluation")


def with_sizes(cfg, sizes):
    """cfg with `sizes` in place of the fields still at their defaults. A value you set stays, unless it equals the
    reviews default: then the task's size replaces it (set it one off, or edit the task's sizes)."""
    defaults = Config()
    return replace(cfg, **{k: v for k, v in sizes.items() if getattr(cfg, k) == getattr(defaults, k)})


def check_config(cfg):
    if cfg.only not in ("", "ppo", "grpo", "dpo", "ilql", "eval"):
        raise ConfigError(f"only must be '', 'ppo', 'grpo', 'dpo', 'ilql' or 'eval', not {cfg.only!r}")
    check_numbers(cfg, positive=("n_train", "n_eval", "n_pref_prompts", "n_eval_prompts", "n_probe_prompts",
                                 "max_prompt_len", "max_new_tokens", "sft_iters", "rm_iters", "ppo_iters",
                                 "grpo_iters", "dpo_iters", "ilql_iters", "target_kl", "group_size", "best_of_n",
                                 "curve_n"), non_negative=("n_heldout_prompts", "bt_temperature"))
    if cfg.block_size < cfg.max_prompt_len + cfg.max_new_tokens:  # found here, not minutes later in PPO
        raise ConfigError(f"block_size {cfg.block_size} is shorter than max_prompt_len + max_new_tokens "
                          f"({cfg.max_prompt_len} + {cfg.max_new_tokens})")

# ----------------------------------------------------------------------------- 1 corpus
def write_corpus(task, cfg, path):
    train, evals = task.make_corpus(cfg.n_train, cfg.seed), task.make_corpus(cfg.n_eval, cfg.seed + 1)
    write_jsonl(path("data", "corpus", "train.jsonl"), train)
    write_jsonl(path("data", "corpus", "test.jsonl"), evals)
    print0(f"{len(train)} train / {len(evals)} test rows -> {path('data', 'corpus')}; mean gold score "
           f"{sum(task.gold_score(r['prompt'], r['completion']) for r in train) / len(train):.3f}")

# ----------------------------------------------------------------------------- 2 SFT
def train_sft(cfg, path, shared):
    import sft  # here, not at the top: the demo's own helpers import without the training scripts
    sft.main(sft.Config(init_from="scratch", n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                        block_size=cfg.block_size, data=path("data", "corpus"), out_dir=path("sft"),
                        max_iters=cfg.sft_iters, learning_rate=1e-3, warmup_iters=min(100, cfg.sft_iters // 10),
                        max_len=cfg.block_size, batch_size=cfg.batch_size, eval_interval=every(cfg.sft_iters),
                        max_new_tokens=cfg.max_new_tokens, **shared))


def load_policy(ckpt, kind, cfg, s, heads=None):
    """A trained policy for sampling and KL, its output heads in the precision the RL stages train them in
    (cfg.fp32_heads; SFT trains bf16 heads either way). The demo's default is bf16, unlike the trainers': fp32 heads
    are for GPT-2's large logits, which bf16 would round coarsely; the demo's small model keeps its logits in a range
    where bf16 moves a response's log-prob little, and fp32 heads cost about a quarter of the demo's time (both
    measured in docs/speed.md)."""
    return fp32_heads(load_model(ckpt, heads=heads, kind=kind)[0], cfg.fp32_heads).to(s.device)

# ----------------------------------------------------------------------------- 3 label
def write_labels(task, policy, cfg, s, path, sampling):
    """Two SFT samples per prompt, labeled by the gold through BT noise; held-out pairs labeled by the noiseless gold
    (reward.py's eval accuracy is then the accuracy vs the gold)."""
    prompts = [r["prompt"] for r in task.make_corpus(cfg.n_pref_prompts, cfg.seed + 2)]
    heldout = [r["prompt"] for r in task.make_corpus(cfg.n_heldout_prompts, cfg.seed + 3)]
    with s.autocast():
        a, b = sample_pairs(policy, prompts, seed=cfg.seed + 2, progress=True, **sampling)
        heldout_a, heldout_b = sample_pairs(policy, heldout, seed=cfg.seed + 3, **sampling)
    prefs = label_pairs(prompts, a, b, task.gold_score, cfg.seed, cfg.bt_temperature,
                        path("data", "prefs", "train.jsonl"))
    n_heldout = len(label_pairs(heldout, heldout_a, heldout_b, task.gold_score, cfg.seed, 0,
                                path("data", "prefs", "test.jsonl")))
    golds = [(task.gold_score(r["prompt"], r["chosen"]), task.gold_score(r["prompt"], r["rejected"])) for r in prefs]
    unequal = [(c, r) for c, r in golds if c != r]  # on a tie of gold scores any label is the gold's coin flip
    agree = sum(c > r for c, r in unequal) / max(1, len(unequal))
    ties = 1 - len(unequal) / max(1, len(prefs))
    print0(f"{len(prefs)} labeled pairs of {len(prompts)} prompts ({ties:.1%} tie on the gold score; {agree:.1%} of "
           f"the others labeled as the noiseless gold would), {n_heldout} held-out pairs")


def sample_pairs(model, prompts, seed, progress=False, **sampling):
    """Two independent completions per prompt -> (responses_a, responses_b)."""
    texts, _ = sample_policy(model, [p for p in prompts for _ in range(2)], seed, progress=progress, **sampling)
    return texts[0::2], texts[1::2]


def label_pairs(prompts, responses_a, responses_b, gold, seed, temperature=1.0, path=None):
    """Label (prompt, a, b) triples with the `gold` labeler through BT noise -> rows {"prompt", "chosen", "rejected"},
    the format reward.py reads (written to `path` as JSONL if given). Skipped: identical responses (no preference) and
    empty ones (data.load_preferences rejects them); with temperature 0, also pairs of equal gold score."""
    assert len(prompts) == len(responses_a) == len(responses_b)
    rng, rows = random.Random(seed), []
    for prompt, a, b in zip(prompts, responses_a, responses_b):
        gold_a, gold_b = gold(prompt, a), gold(prompt, b)
        if a == b or not a or not b or (temperature == 0 and gold_a == gold_b):
            continue
        chosen, rejected = (a, b) if bt_label(gold_a, gold_b, rng, temperature) else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if path:
        write_jsonl(path, rows)
    return rows


def bt_prob(score_a, score_b, temperature=1.0):
    """Bradley-Terry: P(a preferred over b) = sigmoid((score_a - score_b) / temperature). temperature 0 is the
    noiseless labeler: 1 or 0, and 0.5 on equal scores."""
    if temperature == 0:
        return 0.5 if score_a == score_b else float(score_a > score_b)
    x = (score_a - score_b) / temperature
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))  # no overflow either way


def bt_label(score_a, score_b, rng, temperature=1.0):
    """1 if a is preferred, 0 if b is: a draw with probability bt_prob. rng: a random.Random."""
    return int(rng.random() < bt_prob(score_a, score_b, temperature))

# ----------------------------------------------------------------------------- 4 reward model
def train_reward(cfg, path, shared):
    """From the SFT model, on the labeled pairs. Scores not std-normalised (normalize_std): on SFT samples their std
    is 1.2-1.4 (docs/results.md), near enough the 1 that PPO's missing-EOS penalty and beta are set for."""
    import reward
    reward.main(reward.Config(init_from=path("sft", "ckpt.pt"), data=path("data", "prefs"), out_dir=path("reward"),
                              max_iters=cfg.rm_iters, learning_rate=1e-4, warmup_iters=min(50, cfg.rm_iters // 10),
                              max_len=cfg.block_size, batch_size=cfg.batch_size, eval_interval=every(cfg.rm_iters),
                              **shared))


def rm_scores(rm, prompts, responses, max_prompt_len):
    """Reward-model scores of texts, tokenized as reward.py trains on them (prompt + response + EOS)."""
    return scoring.score(rm, prompts, responses, batch_size=64, max_prompt_len=max_prompt_len)


def rm_accuracy(rm, rows, max_prompt_len):
    """Fraction of pairs where the RM scores chosen above rejected (ties count as wrong)."""
    prompts = [r["prompt"] for r in rows]
    chosen = rm_scores(rm, prompts, [r["chosen"] for r in rows], max_prompt_len)
    rejected = rm_scores(rm, prompts, [r["rejected"] for r in rows], max_prompt_len)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)

# ----------------------------------------------------------------------------- 5 PPO and 6 GRPO: in chunks, probed
def ppo_trainer(cfg, path, shared):
    """train(max_iters, init_from) for train_in_chunks. eval_size 0: the probes between chunks are its evaluation.
    kl_horizon: a tenth of the run's episodes, so beta can follow the target (up to x(1 +- 2 / ppo_iters) a step);
    a horizon of 10,000 episodes (the usual default) would hold beta nearly fixed over the demo's ~2,000. At least
    what ppo.py accepts (more than a fifth of a step's responses), for runs of a few iterations.
    init_kl_coef 0.1 (the usual 0.05 doubled): beta falls while the KL is below the target, and from 0.05 it was too
    small to catch the KL once it passed the target (docs/results.md)."""
    import ppo
    return lambda step, init_from: ppo.main(ppo.Config(
        init_from=init_from, reward_model=path("reward", "ckpt.pt"), data=path("data", "corpus"), out_dir=path("ppo"),
        max_iters=step, batch_size=cfg.batch_size, minibatch_size=max(1, cfg.batch_size // 4), learning_rate=3e-5,
        min_lr_ratio=1.0, init_kl_coef=0.1, target_kl=cfg.target_kl, fp32_heads=cfg.fp32_heads,
        kl_horizon=max(cfg.batch_size // 5 + 1, cfg.ppo_iters * cfg.batch_size // 10),
        max_new_tokens=cfg.max_new_tokens, eval_interval=every(cfg.ppo_iters), eval_size=0, **shared))


def grpo_trainer(cfg, path, shared):
    """train(max_iters, init_from) for train_in_chunks: half PPO's prompts per step, each sampled group_size times, one
    pass in four optimizer steps, lr 1e-4, and the KL in the reward (kl_estimator "k1": each response's score minus beta
    0.1 times its summed log-ratio, RLOO's KL-regularised reward, then GRPO's group normalisation) rather than the GRPO
    paper's k3 term in the loss, which let the KL run away on one seed of three and held it less well on the summarize
    task (docs/results.md). beta is fixed: not PPO's adaptive coefficient, nor DPO's beta."""
    import grpo
    prompts = max(1, cfg.batch_size // 2)
    return lambda step, init_from: grpo.main(grpo.Config(
        init_from=init_from, reward_model=path("reward", "ckpt.pt"), data=path("data", "corpus"), out_dir=path("grpo"),
        max_iters=step, batch_size=prompts, group_size=cfg.group_size, ppo_epochs=1,
        minibatch_size=max(1, prompts * cfg.group_size // 4), learning_rate=1e-4, beta=0.1, kl_estimator="k1",
        fp32_heads=cfg.fp32_heads, max_new_tokens=cfg.max_new_tokens, eval_interval=every(cfg.grpo_iters), eval_size=0,
        **shared))


def train_in_chunks(name, train, iters, ref, rm, task, cfg, s, path, sampling):
    """Train in chunks of iters // 5 steps (and the remainder), each resuming the last (exact: a constant LR, and the
    checkpoint holds all other state); the policy before and after each chunk is probed (gold, RM, KL to SFT): the
    method's over-optimisation curve. train(max_iters, init_from) runs the trainer, which writes
    out_dir/<name>/ckpt.pt."""
    chunk, curve, ckpt = max(1, iters // 5), [], path(name.lower(), "ckpt.pt")
    prompts = [r["prompt"] for r in task.make_corpus(cfg.n_probe_prompts, cfg.seed + 6)]
    for step in sorted({0, *range(chunk, iters, chunk), iters}):
        if step:
            train(step, "resume" if curve[-1]["step"] else path("sft", "ckpt.pt"))
        model = load_policy(ckpt, name.lower(), cfg, s) if step else ref
        curve.append(dict(step=step, **probe(model, ref, rm, task, prompts, cfg.seed + 6, s, sampling)))
        print0(f"{name} step {step}: gold {curve[-1]['gold']:.3f} | RM {curve[-1]['rm']:.3f} | "
               f"KL {curve[-1]['kl']:.2f}")
    write_jsonl(path(name.lower(), "curve.jsonl"), curve)  # for the report of a later --only run


def probe(model, ref, rm, task, prompts, seed, s, sampling):
    """Gold score, RM score and KL to ref of a policy's samples: one point of an over-optimisation curve."""
    with s.autocast():
        texts, batches = sample_policy(model, prompts, seed, **sampling)
        rm_s, kl = rm_scores(rm, prompts, texts, sampling["max_prompt_len"]), kl_to_ref(model, ref, batches)
    gold = [task.gold_score(p, t) for p, t in zip(prompts, texts)]
    return dict(gold=sum(gold) / len(gold), rm=sum(rm_s) / len(rm_s), kl=sum(kl) / len(kl))

# ----------------------------------------------------------------------------- 7 DPO
def train_dpo(cfg, path, shared):
    """The RM's labeled pairs straight into the policy. lr 1e-4 at a constant rate for two epochs, beta 0.1 (DPO's
    beta: the weight of the implicit KL, no kin of PPO's or GRPO's), chosen on seed 1337 against one epoch and lr
    3e-4 (docs/results.md)."""
    import dpo
    dpo.main(dpo.Config(init_from=path("sft", "ckpt.pt"), data=path("data", "prefs"), out_dir=path("dpo"),
                        max_iters=cfg.dpo_iters, learning_rate=1e-4, beta=0.1, fp32_heads=cfg.fp32_heads,
                        warmup_iters=min(10, cfg.dpo_iters // 10), min_lr_ratio=1.0, max_len=cfg.block_size,
                        batch_size=cfg.batch_size, eval_interval=cfg.dpo_iters, **shared))

# ----------------------------------------------------------------------------- 8 ILQL
def train_ilql(cfg, path, shared):
    """n_step = block_size: every Q target is its row's discounted return. With one-step targets the reward, given
    at the EOS, does not reach the words that earned it within this budget (docs/results.md). alpha 0.05: the
    target heads trail the online ones by ~1 / alpha = 20 steps of a 120-step run. One ILQL evaluation, at the end:
    the demo's evaluation is the real one."""
    import ilql
    ilql.main(ilql.Config(init_from=path("sft", "ckpt.pt"), data=path("data", "prefs"), data_format="preferences",
                          eval_split="test", out_dir=path("ilql"), max_iters=cfg.ilql_iters, learning_rate=1e-3,
                          alpha=0.05, n_step=cfg.block_size, warmup_iters=min(10, cfg.ilql_iters // 10),
                          eval_interval=cfg.ilql_iters, max_new_tokens=cfg.max_new_tokens,
                          eval_betas=(0.0, *cfg.ilql_betas), max_len=cfg.block_size, batch_size=cfg.batch_size,
                          fp32_heads=cfg.fp32_heads, **shared))

# ----------------------------------------------------------------------------- 9 evaluation
# (eval.py samples, measures KL and win rates; these are the demo's own uses of it)
def best_of_n(model, rm, prompts, n, seed, **sampling):
    """Rejection sampling, the baseline every RLHF method must beat: per prompt, n samples, keep the RM's favourite.
    Returns (best texts, their RM scores). Its KL to the sampler is at most log n - (n - 1) / n."""
    texts, _ = sample_policy(model, [p for p in prompts for _ in range(n)], seed, **sampling)
    scores = rm_scores(rm, [p for p in prompts for _ in range(n)], texts, sampling["max_prompt_len"])
    best = best_in_groups(scores, n, n)
    return [texts[j] for j in best], [scores[j] for j in best]


def best_in_groups(scores, group, n):
    """Per group of `group` consecutive samples (one prompt's), the index of the best-scored of its first n."""
    return [max(range(i, i + n), key=scores.__getitem__) for i in range(0, len(scores), group)]


def best_of_n_curve(policy, rm, task, cfg, s, sampling):
    """Best-of-n for n = 1, 2, 4, ..., curve_n from one pool of curve_n samples per probe prompt (the first n of
    them), with the analytic KL bound: the over-optimisation curve of rejection sampling (Gao et al. 2022)."""
    prompts = [r["prompt"] for r in task.make_corpus(cfg.n_probe_prompts, cfg.seed + 6)]
    N, curve = cfg.curve_n, []
    with s.autocast():
        texts, _ = sample_policy(policy, [p for p in prompts for _ in range(N)], cfg.seed + 7, **sampling)
        scores = rm_scores(rm, [p for p in prompts for _ in range(N)], texts, cfg.max_prompt_len)
    n = 1
    while n <= N:
        best = best_in_groups(scores, N, n)
        gold = [task.gold_score(prompts[j // N], texts[j]) for j in best]
        curve.append(dict(n=n, kl=best_of_n_kl(n), gold=sum(gold) / len(gold),
                          rm=sum(scores[j] for j in best) / len(best)))
        n *= 2
    return curve


def evaluate_methods(task, cfg, s, policy, rm, path, sampling):
    """Every method's row, through eval.py: one sample per evaluation prompt, every policy with the same seed (paired
    samples: differences are the methods'), judged by the gold and by the RM, KL to SFT; best-of-n from its own samples
    (drawn apart from SFT's: not paired) with its analytic KL. Writes eval.md (scores with standard errors, length,
    diversity, the win-rate matrix) and eval.json; returns the report's rows {name: gold, rm, kl, win_rate (gold, vs
    SFT), samples}."""
    import ilql
    rows = task.make_corpus(cfg.n_eval_prompts, cfg.seed + 4)
    prompts = [r["prompt"] for r in rows]
    policies = {"SFT": (policy, None)}
    for name in ("PPO", "GRPO", "DPO"):
        if os.path.exists(path(name.lower(), "ckpt.pt")):  # (a --only run in an out_dir from before a method existed)
            policies[name] = (load_policy(path(name.lower(), "ckpt.pt"), name.lower(), cfg, s), None)
    ilql_model = load_policy(path("ilql", "ckpt.pt"), "ilql", cfg, s, heads=ilql.ilql_heads(policy.config.vocab_size))
    for beta in cfg.ilql_betas:
        policies[f"ILQL (beta {beta:g})"] = (ilql_model, ilql_logits_fn(ilql_model, beta))
    judges = {"gold": lambda ps, ts: [task.gold_score(p, t) for p, t in zip(ps, ts)],
              "RM": lambda ps, ts: rm_scores(rm, ps, ts, cfg.max_prompt_len)}
    n = cfg.best_of_n
    with s.autocast():
        best, _ = best_of_n(policy, rm, prompts, n, cfg.seed + 5, **sampling)
        results = evaluate(policies, prompts, judges, ref=policy, seed=cfg.seed + 4, win_rate_judge="gold", **sampling,
                           references=[r["completion"].strip() for r in rows] if task.references else None,
                           extra={f"best-of-{n} (SFT + RM)": dict(texts=best, kl=best_of_n_kl(n))})
    write_results(results, cfg.out_dir)
    return {name: dict(gold=r["score"]["gold"], rm=r["score"]["RM"], kl=r["kl"], win_rate=results["win_rates"][name]
                       ["SFT"][0], samples=list(zip(prompts, r["texts"]))[:4], gold_scores=r["scores"]["gold"],
                       **{k: r[k] for k in ("rouge1", "rouge2", "rougeL") if k in r})
            for name, r in results["policies"].items()}

# ----------------------------------------------------------------------------- the report
def write_report(out_dir, results, curves, ppo_log):
    """out_dir/report.md and two PNG plots.
    results: {"title", "methods": {name: {"gold", "rm", "kl", "win_rate", "samples": [(prompt, text), ...]}},
              "rm_accuracy": RM accuracy on held-out pairs labeled by the noiseless gold (or None),
              "target_kl": PPO's KL target, "run": run_record's line (times and machine)}
    curves:  {method: [{"kl", "gold", "rm", ...}, ...]}: the over-optimisation plot, gold and RM vs sqrt(KL)
    ppo_log: the rows of ppo's log.jsonl: the training plot of score, KL (and its target) and beta"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    rouge = all("rouge1" in m for m in results["methods"].values())  # ROUGE against the task's reference completions
    lines = [f"# {results.get('title', 'RLHF demo')}", "",
             "Gold score: the hidden labeler. RM score: the learned reward model. KL: to the SFT model, nats per "
             "response, estimated on the method's samples (best-of-n: the analytic bound log n - (n - 1) / n). "
             "Win rate: gold score vs SFT's sample on the same prompt, ties count half." + " ROUGE: F1 x 100 against "
             "the reference completions." * rouge, "",
             "| method | gold score | RM score | KL | gold win rate vs SFT |"
             + " ROUGE-1 | ROUGE-2 | ROUGE-L |" * rouge,
             "|---|---|---|---|---|" + "---|---|---|" * rouge]
    for name, m in results["methods"].items():
        lines.append(f"| {name} | {fmt(m.get('gold'))} | {fmt(m.get('rm'))} | {fmt(m.get('kl'))} | "
                     f"{fmt(m.get('win_rate'))} |" + "".join(f" {m[k]:.1f} |" for k in ("rouge1", "rouge2", "rougeL")
                                                             if rouge))
    lines += ["", "Scores with their standard errors, response lengths, diversity and the win-rate matrix with 95% "
              "intervals: [eval.md](eval.md)."]
    if results.get("rm_accuracy") is not None:
        lines += ["", f"Reward model accuracy vs the noiseless gold on held-out pairs: {results['rm_accuracy']:.3f}"]
    if results.get("run"):
        lines += ["", f"Run: {results['run']}."]
    figures = []
    rows = [r for r in ppo_log if "kl" in r and "beta" in r]
    if rows:
        figures.append(("ppo_training", plot_ppo_training(plt, rows, results.get("target_kl"))))
    if curves:
        figures.append(("over_optimisation", plot_over_optimisation(plt, curves)))
    os.makedirs(out_dir, exist_ok=True)
    for name, fig in figures:
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=100)
        plt.close(fig)
        lines += ["", f"![{name}]({name}.png)"]
    lines += ["", "## Samples"]
    for name, m in results["methods"].items():
        lines += ["", f"### {name}", ""] + [f"- *{p}*{t}".replace("\n", " ") for p, t in m.get("samples", [])]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

def plot_ppo_training(plt, rows, target_kl):
    """PPO's log rows: RM score of the rollouts, KL to SFT (with its target) and beta per iteration."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["score"] for r in rows])
    axes[1].plot(steps, [r["kl"] for r in rows], label="KL")
    if target_kl:
        axes[1].axhline(target_kl, color="gray", linestyle="--", label="target")
        axes[1].legend()
    axes[2].plot(steps, [r["beta"] for r in rows])
    titles = ("PPO: RM score of the rollouts (missing EOS: penalty)", "PPO: KL to SFT (nats)", "PPO: beta")
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="step")
    return fig


def plot_over_optimisation(plt, curves):
    """Gold (solid) and RM (dashed) score against sqrt(KL to SFT), a curve per method (Gao et al. 2022)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, curve) in enumerate(curves.items()):
        x = [math.sqrt(max(0.0, c["kl"])) for c in curve]
        ax.plot(x, [c["gold"] for c in curve], "o-", color=f"C{i}", label=f"{name}: gold")
        ax.plot(x, [c["rm"] for c in curve], "x--", color=f"C{i}", label=f"{name}: RM")
    ax.set(title="Over-optimisation: gold and RM score vs KL to SFT", xlabel="sqrt(KL)", ylabel="score")
    ax.legend(fontsize=7)
    return fig

# ----------------------------------------------------------------------------- utilities
def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def run_record(clock, s, cfg):
    """One line: the whole run's time, each stage's, and the machine they were measured on (they differ by machine)."""
    marks = clock + [("end", time.time())]
    stages = ", ".join(f"{name} {(t1 - t0) / 60:.1f}" for (name, t0), (_, t1) in zip(marks[1:], marks[2:]))
    device = (f"GPU {torch.cuda.get_device_name(s.device)}" if "cuda" in s.device else
              f"CPU {cpu_info()}, {torch.get_num_threads()} threads")
    return (f"done in {(marks[-1][1] - marks[0][1]) / 60:.1f} min (stages, min: {stages}) on {device}, "
            f"{cfg.dtype}, seed {cfg.seed}")


def every(iters):
    """eval_interval (and checkpoints) of a training stage: five per run."""
    return max(1, iters // 5)

# ----------------------------------------------------------------------------- main
def main(cfg):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo is offline by design: fail fast, never reach for a hub
    task = load_task(cfg.task)
    cfg = with_sizes(cfg, {**task.sizes, **task.quick} if cfg.quick else task.sizes)
    check_config(cfg)
    s = setup(cfg.device, cfg.dtype, cfg.seed)
    print_config(cfg)
    path = lambda *parts: os.path.join(cfg.out_dir, *parts)
    run = lambda name: cfg.only in ("", name)  # --only: the earlier stages' files in out_dir are reused as they are
    clock = [("start", time.time())]  # (stage, its start): the report's stage times

    def stage(name, what):
        clock.append((name, time.time()))
        print0(f"\n=== [{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {what} | "
               f"{(clock[-1][1] - clock[0][1]) / 60:.1f} min elapsed ===")
    sampling = dict(max_new_tokens=cfg.max_new_tokens, max_prompt_len=cfg.max_prompt_len)
    # Shared by the training scripts. Data folders hold train.jsonl and test.jsonl: `datasets` names the splits.
    # beta2 0.95 (nanoGPT's) rather than the scripts' 0.999: these are short runs at high learning rates
    shared = dict(device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, beta2=0.95, max_prompt_len=cfg.max_prompt_len)

    if not cfg.only:
        stage("corpus", f"prompts and completions for SFT: {task.title}")
        write_corpus(task, cfg, path)
        stage("SFT", "a GPT-2 from scratch learns the corpus")
        train_sft(cfg, path, shared)
    policy = load_policy(path("sft", "ckpt.pt"), "sft", cfg, s)
    if not cfg.only:
        stage("label", "sample pairs from the SFT model, label them with the gold labeler")
        write_labels(task, policy, cfg, s, path, sampling)
        stage("reward model", "Bradley-Terry on the labeled pairs")
        train_reward(cfg, path, shared)
    rm = scoring.load_reward_model(path("reward", "ckpt.pt"), s.device)
    probed = dict(ref=policy, rm=rm, task=task, cfg=cfg, s=s, path=path, sampling=sampling)
    if run("ppo"):
        stage("PPO", "the SFT policy against the reward model, KL-penalized to the SFT model")
        train_in_chunks("PPO", ppo_trainer(cfg, path, shared), cfg.ppo_iters, **probed)
    if run("grpo"):
        stage("GRPO", f"{cfg.group_size} samples per prompt, each scored against its group's mean; no critic")
        train_in_chunks("GRPO", grpo_trainer(cfg, path, shared), cfg.grpo_iters, **probed)
    if run("dpo"):
        stage("DPO", "the SFT policy on the labeled pairs directly: no reward model, no sampling")
        train_dpo(cfg, path, shared)
    if run("ilql"):
        stage("ILQL", "offline RL on the same labeled pairs")
        train_ilql(cfg, path, shared)

    stage("evaluation", "gold score, RM score, KL to SFT, gold win rate vs SFT; over-optimisation curves")
    methods = evaluate_methods(task, cfg, s, policy, rm, path, sampling)
    heldout = read_log(path("data", "prefs", "test.jsonl"))
    with s.autocast():
        rm_acc = rm_accuracy(rm, heldout, cfg.max_prompt_len) if heldout else None
    curves = {name: read_log(path(name.lower(), "curve.jsonl")) for name in ("PPO", "GRPO")
              if os.path.exists(path(name.lower(), "curve.jsonl"))}
    curves["best-of-n"] = best_of_n_curve(policy, rm, task, cfg, s, sampling)
    results = {"methods": methods, "rm_accuracy": rm_acc, "target_kl": cfg.target_kl, "title": task.title,
               "run": run_record(clock, s, cfg)}
    write_report(cfg.out_dir, results, curves, read_log(path("ppo", "log.jsonl")))
    for name, m in methods.items():
        print0(f"{name:>22} | gold {m['gold']:.3f} | RM {m['rm']:.3f} | KL {m['kl']:.2f} | "
               f"win rate {m['win_rate']:.2f}")
    print0(f"RM accuracy vs gold (held out): {rm_acc}\n{results['run']}\nreport: {path('report.md')}")
    return results


if __name__ == "__main__":
    run_main(main, Config)
