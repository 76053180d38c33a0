"""
The whole RLHF pipeline, offline, on a built-in task: teach a small GPT-2 to write *positive* movie reviews.

No network and no human: a seeded generator writes a review corpus of mixed sentiment, and a documented Python
"gold labeler" (`gold_score`) stands in for the human. The reward model and the policy never see it; they only see
preference pairs it labeled through Bradley-Terry noise, as a human would label them. Because the gold is known,
the report can say what RLHF optimizes for real (gold score) and what it only makes the reward model believe.

    1 corpus   seeded review openings + completions (positive / negative / mixed) -> data/corpus/{train,test}.jsonl
    2 SFT      a small GPT-2 from scratch learns to write reviews of both sentiments, ending with EOS
    3 label    two SFT samples per prompt, labeled by gold_score through BT noise -> data/prefs/train.jsonl
               (+ held-out pairs labeled by the noiseless gold -> data/prefs/test.jsonl: RM accuracy vs gold)
    4 reward   a reward model trained on the labeled pairs
    5 PPO      the SFT policy optimized against the reward model, KL-penalized to the SFT model
    6 ILQL     offline RL on the same labeled pairs (its Q targets: each response's return, n_step spanning it)
    7 eval     gold score, RM score, KL to SFT and gold win rate vs SFT per method, best-of-n; report.md + PNGs

    python demo.py                       # make demo: the full run
    python demo.py --quick=True          # tiny sizes and budgets: a smoke test of the wiring (~1 min on CPU)
    python demo.py --only=ilql           # rerun ILQL and the evaluation on a finished run's SFT model, labels, RM

To put a real human in the loop instead of gold_score, label.py writes the same prompt/chosen/rejected JSONL.
"""

import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, replace

import torch

import data
import scoring
from common import ConfigError, Timer, load_model, print0, print_config, run_main, setup
from model import fp32_heads, token_logprobs
from sample import ilql_logits_fn, sample_responses

# ----------------------------------------------------------------------------- the task: a review corpus
POSITIVE = "good great wonderful excellent brilliant beautiful moving funny clever charming fantastic nice".split()
NEGATIVE = "bad terrible awful boring dull weak poor silly messy painful predictable forgettable".split()
NEUTRAL = "long short simple quiet dark unusual".split()
NOUNS = "plot acting soundtrack ending dialogue cast story script pacing music".split()
COUNTABLE = "plot soundtrack ending cast story script".split()  # nouns that take "a"/"an"
ADVERBS = "really very quite truly rather".split()
ADJ = {1: POSITIVE, -1: NEGATIVE}
VERBS = {1: "loved enjoyed adored liked".split(), -1: "hated disliked".split()}
# Review openings, by what must follow them. Slots: {n} {n2} {n3} distinct nouns, {k2} {k3} distinct countable ones;
# {a} {b} distinct adjectives of the review's sentiment, {c} one of the opposite sentiment (negated: "not {c}", or
# the other half of a mixed review); {A} {B} {C} the same with "a"/"an"; {adv} an adverb, {z} a neutral adjective,
# {v} a verb of the sentiment.
PROMPTS = {
    "adj": ["The {n} in this film was", "The {n} of this movie is", "I have to say that the {n} was",
            "Overall, this movie was", "My first impression of this film was that it was", "To be honest, the {n} was",
            "Compared to the book, this movie is", "For a first film, the {n} was"],
    "clause": ["I watched this movie with my family and", "I went to see this film last night and",
               "After the first ten minutes,", "When the credits rolled,", "I saw this film with a friend and",
               "By the end of the movie,"],
    "verb": ["This movie", "This film", "The new film from this director", "This sequel", "The remake"],
}
SINGLE = {  # one sentiment throughout
    "adj": [" {a}.", " {adv} {a}.", " {adv} {a}, and the {n2} was {b}.", " not {c} at all.", " {a}. I {v} it.",
            " {adv} {a}, and the {n2} felt {z}.", " {a} from start to finish."],
    "clause": [" I thought it was {adv} {a}.", " we all {v} it.", " the {n2} was {a} and the {n3} was {b}.",
               " I found the {n2} {a}.", " it was not {c} at all.", " I {v} every minute of it."],
    "verb": [" is {adv} {a}.", " was {a} from start to finish.", " has {A} {k2} and {B} {k3}.",
             " is {a}, and I {v} every minute of it.", " was not {c}, and the {n2} was {a}.",
             " is {adv} {a}, even if the {n2} is {z}."],
}
MIXED = {  # one half each way
    "adj": [" {a}, but the {n2} was {c}.", " {adv} {a}, although the {n2} felt {c}."],
    "clause": [" the {n2} was {a} but the {n3} was {c}.", " I {v} the {n2} but the {n3} was {c}."],
    "verb": [" has {A} {k2} but {C} {k3}.", " is {a} in places, but the {n2} is {c}."],
}
ENDINGS = {1: [" I would recommend it to anyone!", " I would happily watch it again.", " Two thumbs up!"],
           -1: [" I would not recommend it.", " What a waste of time.", " I want my money back."]}


def make_corpus(n, seed):
    """n rows {"prompt", "completion", "sentiment"} (40% positive, 40% negative, 20% mixed), a pure function of seed.
    Completions start with a space (they continue the prompt) and end with "." or "!"; SFT appends the EOS."""
    rng = random.Random(seed)
    openings = [(kind, p) for kind, ps in PROMPTS.items() for p in ps]
    rows = []
    for _ in range(n):
        kind, opening = rng.choice(openings)
        mood = rng.choices(["positive", "negative", "mixed"], weights=[0.4, 0.4, 0.2])[0]
        s = {"positive": 1, "negative": -1}.get(mood) or rng.choice([1, -1])
        (a, b), c = rng.sample(ADJ[s], 2), rng.choice(ADJ[-s])
        (n1, n2, n3), (k2, k3) = rng.sample(NOUNS, 3), rng.sample(COUNTABLE, 2)
        slots = dict(n=n1, n2=n2, n3=n3, k2=k2, k3=k3, a=a, b=b, c=c, A=_article(a), B=_article(b), C=_article(c),
                     adv=rng.choice(ADVERBS), z=rng.choice(NEUTRAL), v=rng.choice(VERBS[s]))
        completion = rng.choice((MIXED if mood == "mixed" else SINGLE)[kind]).format(**slots)
        if rng.random() < 0.35:  # a closing sentence; a mixed review may close either way
            completion += rng.choice(ENDINGS[s if mood != "mixed" else rng.choice([1, -1])])
        rows.append({"prompt": opening.format(**slots), "completion": completion, "sentiment": mood})
    return rows


def _article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path

# ----------------------------------------------------------------------------- the gold labeler (stands in for a human)
WORD = re.compile(r"[a-z']+")
LEXICON = {**{w: 1 for w in POSITIVE + VERBS[1] + ["recommend"]}, **{w: -1 for w in NEGATIVE + VERBS[-1] + ["waste"]}}
NEGATORS = {"not", "never", "no", "hardly", "isn't", "wasn't", "didn't", "don't", "doesn't"}
STOPWORDS = set("a an the and but or was is it i this of to in with my we that not at all from by for if".split())
_TEXT = " ".join(["an", *POSITIVE, *NEGATIVE, *NEUTRAL, *NOUNS, *ADVERBS, *VERBS[1], *VERBS[-1]] +
                 [t for d in (PROMPTS, SINGLE, MIXED, ENDINGS) for ts in d.values() for t in ts])
VOCAB = set(WORD.findall(re.sub(r"\{\w+\}", " ", _TEXT).lower()))  # every word the corpus can contain


def gold_parts(response):
    """The terms of gold_score, for reports and tests."""
    words = WORD.findall(response.lower())
    sentiment = 0
    for i, w in enumerate(words):
        sign = LEXICON.get(w, 0)
        sentiment += -sign if NEGATORS & set(words[max(0, i - 2):i]) else sign
    content, bigrams = [w for w in words if w not in STOPWORDS], list(zip(words, words[1:]))
    return dict(sentiment=max(-3, min(3, sentiment)), repeated_words=len(content) - len(set(content)),
                repeated_bigrams=len(bigrams) - len(set(bigrams)), unknown_words=sum(w not in VOCAB for w in words),
                no_ending=not response.rstrip().endswith((".", "!")), too_short=len(words) < 3,
                extra_words=max(0, len(words) - 30))


def gold_score(prompt, response):
    """The hidden human: how good a review `response` is. Only the response is judged (the prompt is ours).

    words = lowercase [a-z']+ tokens of the response.
    sentiment = sum over words of +1 (positive word: the positive adjectives, loved/enjoyed/adored/liked,
                recommend) or -1 (negative adjectives, hated/disliked, waste), the sign flipped when one of the two
                words before it is a negator (not, never, no, hardly, isn't, wasn't, didn't, don't, doesn't),
                then clipped to [-3, 3].
    score = sentiment
            - 0.5 * repeated_words     (occurrences of a non-stopword beyond its first)
            - 0.5 * repeated_bigrams   (occurrences of a word bigram beyond its first)
            - 0.5 * unknown_words      (words the corpus never uses: gibberish, broken BPE pieces)
            - 1.0 * [the stripped response does not end with "." or "!"]
            - 1.0 * [fewer than 3 words]
            - 0.1 * max(0, words - 30)
    E.g. " really great, and the plot was clever." = 2.0; " not bad at all." = 1.0; " great great great great" =
    3 - 0.5*3 - 0.5*2 - 1 = -0.5. Every corpus completion has no repetition, no unknown word and an ending."""
    p = gold_parts(response)
    return (p["sentiment"] - 0.5 * (p["repeated_words"] + p["repeated_bigrams"] + p["unknown_words"])
            - 1.0 * p["no_ending"] - 1.0 * p["too_short"] - 0.1 * p["extra_words"])


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


def label_pairs(prompts, responses_a, responses_b, seed, temperature=1.0, path=None):
    """Label (prompt, a, b) triples with gold_score through BT noise -> rows {"prompt", "chosen", "rejected"}, the
    format reward.py reads (written to `path` as JSONL if given). Skipped: identical responses (no preference) and
    empty ones (data.load_preferences rejects them); with temperature 0, also pairs of equal gold score."""
    assert len(prompts) == len(responses_a) == len(responses_b)
    rng, rows = random.Random(seed), []
    for prompt, a, b in zip(prompts, responses_a, responses_b):
        gold_a, gold_b = gold_score(prompt, a), gold_score(prompt, b)
        if a == b or not a or not b or (temperature == 0 and gold_a == gold_b):
            continue
        chosen, rejected = (a, b) if bt_label(gold_a, gold_b, rng, temperature) else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if path:
        write_jsonl(path, rows)
    return rows

# ----------------------------------------------------------------------------- sampling and evaluation
@torch.no_grad()
def sample(model, prompts, max_new_tokens=40, temperature=1.0, seed=0, batch_size=64, max_prompt_len=32,
           logits_fn=None, progress=False):
    """One completion per prompt (repeat a prompt for more). Returns (texts without the EOS, batches): per batch
    (tokens (B, P+N), mask (B, P+N), response_mask (B, N)), what kl_to_ref needs. Seeded: same seed, same texts."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    texts, batches, timer = [], [], Timer(math.ceil(len(prompts) / batch_size))
    for step, i in enumerate(range(0, len(prompts), batch_size)):
        r = sample_responses(model, prompts[i:i + batch_size], max_prompt_len, max_new_tokens, temperature,
                             generator=g, logits_fn=logits_fn)
        texts += r["texts"]
        batches.append((r["tokens"], r["mask"], r["response_mask"]))
        if progress:
            print0(f"  sampled {len(texts)}/{len(prompts)} | ETA {timer.eta(step)}")
    return texts, batches


def sample_pairs(model, prompts, **kwargs):
    """Two independent completions per prompt -> (responses_a, responses_b)."""
    texts, _ = sample(model, [p for p in prompts for _ in range(2)], **kwargs)
    return texts[0::2], texts[1::2]


def rm_scores(rm, prompts, responses, max_prompt_len=32):
    """Reward-model scores of texts, tokenized as reward.py trains on them (prompt + response + EOS)."""
    return scoring.score(rm, prompts, responses, batch_size=64, max_prompt_len=max_prompt_len)


def rm_accuracy(rm, rows, **kwargs):
    """Fraction of pairs where the RM scores chosen above rejected (ties count as wrong)."""
    prompts = [r["prompt"] for r in rows]
    chosen = rm_scores(rm, prompts, [r["chosen"] for r in rows], **kwargs)
    rejected = rm_scores(rm, prompts, [r["rejected"] for r in rows], **kwargs)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


def best_of_n(model, rm, prompts, n, seed=0, **kwargs):
    """Rejection sampling, the baseline every RLHF method must beat: per prompt, n samples, keep the RM's favourite.
    Returns (best texts, their RM scores). Its KL to the sampler is at most log n - (n - 1) / n."""
    texts, _ = sample(model, [p for p in prompts for _ in range(n)], seed=seed, **kwargs)
    scores = rm_scores(rm, [p for p in prompts for _ in range(n)], texts, kwargs.get("max_prompt_len", 32))
    best = [max(range(i * n, i * n + n), key=scores.__getitem__) for i in range(len(prompts))]
    return [texts[j] for j in best], [scores[j] for j in best]


@torch.no_grad()
def kl_to_ref(policy, ref, tokens, mask, response_mask, temperature=1.0, logits_fn=None):
    """KL(policy || ref) estimated on the policy's own samples: per sample the sum over response tokens of
    logprobs - ref_logprobs (fp32), averaged over samples. tokens/mask (B, P+N) and response_mask (B, N) as
    returned by generate / sample. The hidden state at t predicts token t+1, hence the shift."""
    N = response_mask.shape[1]
    targets = tokens[:, -N:]

    def logprobs(model, head):
        h = model(tokens[:, :-1], mask[:, :-1])[:, -N:]  # (B, N, C): the positions that predict each response token
        return token_logprobs(head(h), targets, temperature)
    kl = (logprobs(policy, logits_fn or policy.lm_head) - logprobs(ref, ref.lm_head)) * response_mask
    return kl.sum(-1).mean().item()


def evaluate(policy, ref, rm, prompts, seed, temperature=1.0, logits_fn=None, n_shown=4, **sampling):
    """One method's row of the report: one sample per prompt, then its gold scores, mean RM score and KL to ref."""
    texts, batches = sample(policy, prompts, temperature=temperature, seed=seed, logits_fn=logits_fn, **sampling)
    gold = [gold_score(p, t) for p, t in zip(prompts, texts)]
    rm_s = rm_scores(rm, prompts, texts, sampling.get("max_prompt_len", 32))
    kl = sum(kl_to_ref(policy, ref, *b, temperature, logits_fn) * len(b[0]) for b in batches) / len(prompts)
    return dict(gold=sum(gold) / len(gold), rm=sum(rm_s) / len(rm_s), kl=kl, gold_scores=gold,
                samples=list(zip(prompts, texts))[:n_shown])


def gold_win_rate(gold_a, gold_b):
    """Fraction of prompts where a's gold score beats b's (same prompts, same order); ties count half."""
    assert len(gold_a) == len(gold_b) and gold_a
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold_a, gold_b)) / len(gold_a)

# ----------------------------------------------------------------------------- the report
def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_report(out_dir, results, curves):
    """out_dir/report.md and PNG plots.
    results: {"methods": {name: {"gold", "rm", "kl", "win_rate", "samples": [(prompt, text), ...]}},
              "rm_accuracy": RM accuracy on held-out pairs labeled by the noiseless gold (optional)}
    curves:  {"ppo": rows of ppo's log.jsonl (plotted: "score" and "kl" vs "step"),
              "gold_vs_rm": {"step": [...], "gold": [...], "rm": [...]}}   (each optional)"""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = ["# RLHF demo: positive movie reviews", "",
             "Gold score: the hidden labeler (demo.gold_score). RM score: the learned reward model. "
             "KL: to the SFT model, nats per response, estimated on the method's samples (best-of-n: the analytic "
             "bound log n - (n - 1) / n). Win rate: gold score vs SFT's sample on the same prompt.", "",
             "| method | gold score | RM score | KL | gold win rate vs SFT |", "|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        lines.append(f"| {name} | {fmt(m.get('gold'))} | {fmt(m.get('rm'))} | {fmt(m.get('kl'))} | "
                     f"{fmt(m.get('win_rate'))} |")
    if results.get("rm_accuracy") is not None:
        lines += ["", f"Reward model accuracy vs the noiseless gold on held-out pairs: {results['rm_accuracy']:.3f}"]
    figures = []
    ppo_rows = curves.get("ppo") or []
    keys = [k for k in ("score", "kl") if any(k in r for r in ppo_rows)]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, k in zip(axes[0], keys):
            rows = [r for r in ppo_rows if k in r]
            ax.plot([r["step"] for r in rows], [r[k] for r in rows])
            ax.set(title=f"PPO: {k}", xlabel="step")
        figures.append(("ppo_training", fig))
    if curves.get("gold_vs_rm"):
        c = curves["gold_vs_rm"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(c["step"], c["gold"], label="gold score")
        ax.plot(c["step"], c["rm"], label="RM score")
        ax.set(title="PPO: gold vs reward model", xlabel="step")
        ax.legend()
        figures.append(("gold_vs_rm", fig))
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

# ----------------------------------------------------------------------------- the pipeline
@dataclass
class Config:
    out_dir: str = "out/demo"  # everything goes here: data/, sft/, reward/, ppo/, ilql/, report.md
    seed: int = 1337  # every seed of the run derives from it
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    dtype: str = "bfloat16"  # "float32" | "bfloat16" (autocast: faster on CPU too; the numerics that matter stay fp32)
    quick: bool = False  # tiny sizes and budgets (tests, smoke runs): overrides the sizes below
    only: str = ""  # "ppo" | "ilql" | "eval": rerun that stage (+ eval) on the other stages' outputs in out_dir
    n_train: int = 20000  # SFT corpus rows
    n_eval: int = 500  # held-out corpus rows (SFT eval loss, PPO eval prompts)
    n_pref_prompts: int = 2000  # prompts sampled twice by the SFT model and labeled: RM and ILQL training pairs
    n_heldout_prompts: int = 300  # prompts for pairs labeled by the noiseless gold: RM accuracy vs gold
    n_eval_prompts: int = 200  # prompts of the final evaluation
    bt_temperature: float = 1.0  # labeler noise: P(a preferred) = sigmoid((gold_a - gold_b) / bt_temperature)
    max_new_tokens: int = 40  # response length budget (the longest corpus completion is ~20 tokens)
    n_layer: int = 4  # the SFT model, trained from scratch
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 96  # prompt (<= 32 tokens) + response (<= max_new_tokens)
    batch_size: int = 32  # sequences (SFT), pairs (RM, ILQL) or prompts (PPO) per step
    sft_iters: int = 400  # the stage times of a run are in the README's results
    rm_iters: int = 400
    ppo_iters: int = 60
    ilql_iters: int = 120
    ilql_betas: tuple = (4.0, 8.0)  # ILQL decoding: log_softmax(logits) + beta * (Q - V), each one evaluated
    best_of_n: int = 8  # n of the best-of-n baseline


QUICK = dict(n_train=200, n_eval=20, n_pref_prompts=16, n_heldout_prompts=16, n_eval_prompts=8, max_new_tokens=12,
             n_layer=2, n_head=2, n_embd=32, block_size=48, batch_size=4, sft_iters=4, rm_iters=3, ppo_iters=2,
             ilql_iters=3, best_of_n=2)


def main(cfg):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo is offline by design: fail fast, never reach for a hub
    cfg = replace(cfg, **QUICK) if cfg.quick else cfg
    if cfg.only not in ("", "ppo", "ilql", "eval"):
        raise ConfigError(f"only must be '', 'ppo', 'ilql' or 'eval', not {cfg.only!r}")
    run = lambda name: cfg.only in ("", name)  # --only: the earlier stages' files in out_dir are reused as they are
    s = setup(cfg.device, cfg.dtype, cfg.seed)
    print_config(cfg)
    path = lambda *parts: os.path.join(cfg.out_dir, *parts)
    t0 = time.time()
    stage = lambda i, name: print0(f"\n=== [{i}/7] {name} | {(time.time() - t0) / 60:.1f} min elapsed "
                                   f"(the training stages print their own ETA) ===")
    sampling = dict(max_new_tokens=cfg.max_new_tokens, max_prompt_len=32)
    # Shared by the training scripts. Data folders hold train.jsonl and test.jsonl: `datasets` names the splits.
    # beta2 0.95 (nanoGPT's) rather than the scripts' 0.999: these are short runs at high learning rates
    common = dict(device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, batch_size=cfg.batch_size, beta2=0.95)
    lengths = dict(max_prompt_len=32, max_len=cfg.block_size)
    every = lambda iters: max(1, iters // 5)  # eval_interval: five evaluations per run

    sft_ckpt, rm_ckpt = path("sft", "ckpt.pt"), path("reward", "ckpt.pt")
    if not cfg.only:
        stage(1, "corpus")
        train, evals = make_corpus(cfg.n_train, cfg.seed), make_corpus(cfg.n_eval, cfg.seed + 1)
        write_jsonl(path("data", "corpus", "train.jsonl"), train)
        write_jsonl(path("data", "corpus", "test.jsonl"), evals)
        print0(f"{len(train)} train / {len(evals)} test rows -> {path('data', 'corpus')}; mean gold score "
               f"{sum(gold_score(r['prompt'], r['completion']) for r in train) / len(train):.3f}")

        stage(2, "SFT: a GPT-2 from scratch learns to write reviews")
        import sft  # here, not at the top: the demo's own helpers import without the training scripts
        sft.main(sft.Config(init_from="scratch", n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                            block_size=cfg.block_size, data=path("data", "corpus"), out_dir=path("sft"),
                            max_iters=cfg.sft_iters, learning_rate=1e-3, warmup_iters=min(100, cfg.sft_iters // 10),
                            eval_interval=every(cfg.sft_iters), sample_tokens=cfg.max_new_tokens, **lengths,
                            **common))
    # every model the demo samples from or measures KL with has fp32 logits, as ppo.py's policy (model.Head)
    policy = fp32_heads(load_model(sft_ckpt, kind="sft")[0]).to(s.device)
    import reward

    if not cfg.only:
        stage(3, "sample pairs from the SFT model, label them with the gold labeler")
        prompts = [r["prompt"] for r in make_corpus(cfg.n_pref_prompts, cfg.seed + 2)]
        heldout = [r["prompt"] for r in make_corpus(cfg.n_heldout_prompts, cfg.seed + 3)]
        with s.autocast():
            a, b = sample_pairs(policy, prompts, seed=cfg.seed + 2, progress=True, **sampling)
            heldout_a, heldout_b = sample_pairs(policy, heldout, seed=cfg.seed + 3, **sampling)
        prefs = label_pairs(prompts, a, b, cfg.seed, cfg.bt_temperature, path=path("data", "prefs", "train.jsonl"))
        # held-out pairs labeled by the noiseless gold: reward.py's eval accuracy is then the accuracy vs the gold
        prefs_heldout = label_pairs(heldout, heldout_a, heldout_b, cfg.seed, 0,
                                    path=path("data", "prefs", "test.jsonl"))
        agree = sum(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in prefs)
        print0(f"{len(prefs)} labeled pairs of {len(prompts)} prompts ({agree / max(1, len(prefs)):.1%} agree with "
               f"the noiseless gold), {len(prefs_heldout)} held-out pairs")

        stage(4, "reward model on the labeled pairs")
        reward.main(reward.Config(init_from=sft_ckpt, data=path("data", "prefs"), out_dir=path("reward"),
                                  max_iters=cfg.rm_iters, learning_rate=1e-4, warmup_iters=min(50, cfg.rm_iters // 10),
                                  eval_interval=every(cfg.rm_iters), **lengths, **common))
    rm = scoring.load_reward_model(rm_ckpt, s.device)

    if run("ppo"):
        stage(5, "PPO against the reward model")
        import ppo
        # PPO runs in chunks, each resuming the last (exact: constant LR, and the checkpoint holds all other state);
        # between chunks the gold labeler scores the policy's samples, to compare with what the RM believes.
        probe = [r["prompt"] for r in make_corpus(64, cfg.seed + 6)]
        gold_vs_rm = {"step": [], "gold": [], "rm": []}
        chunk = every(cfg.ppo_iters)
        for step in range(0, cfg.ppo_iters + chunk, chunk):
            step = min(step, cfg.ppo_iters)
            if step > 0:
                ppo.main(ppo.Config(init_from=sft_ckpt if step == chunk else "resume", reward_model=rm_ckpt,
                                    data=path("data", "corpus"), out_dir=path("ppo"), max_iters=step,
                                    minibatch_size=max(1, cfg.batch_size // 4), learning_rate=3e-5, min_lr_ratio=1.0,
                                    max_new_tokens=cfg.max_new_tokens, eval_interval=chunk, max_prompt_len=32,
                                    **common))
            model = fp32_heads(load_model(path("ppo", "ckpt.pt"), kind="ppo")[0]).to(s.device) if step else policy
            with s.autocast():
                texts, _ = sample(model, probe, seed=cfg.seed + 6, **sampling)
                rm_s = rm_scores(rm, probe, texts)
            gold_vs_rm["step"].append(step)
            gold_vs_rm["gold"].append(sum(gold_score(p, t) for p, t in zip(probe, texts)) / len(probe))
            gold_vs_rm["rm"].append(sum(rm_s) / len(rm_s))
            print0(f"PPO step {step}: gold {gold_vs_rm['gold'][-1]:.3f} | RM {gold_vs_rm['rm'][-1]:.3f}")
        write_jsonl(path("ppo", "gold_vs_rm.jsonl"), [gold_vs_rm])  # for the report of a later --only run

    import ilql
    if run("ilql"):
        stage(6, "ILQL on the same labeled pairs")
        # n_step = block_size: every Q target is its row's discounted return. With one-step targets the reward,
        # given at the EOS, does not reach the words that earned it within this budget (docs/results.md).
        # alpha 0.05: the target heads trail the online ones by ~1 / alpha = 20 steps of a 120-step run. One ILQL
        # evaluation, at the end: stage 7 is the real one.
        ilql.main(ilql.Config(init_from=sft_ckpt, data=path("data", "prefs"), data_format="preferences",
                              eval_split="test", out_dir=path("ilql"), max_iters=cfg.ilql_iters, learning_rate=1e-3,
                              alpha=0.05, n_step=cfg.block_size, warmup_iters=min(10, cfg.ilql_iters // 10),
                              eval_interval=cfg.ilql_iters, max_new_tokens=cfg.max_new_tokens,
                              eval_betas=(0.0, *cfg.ilql_betas), **lengths, **common))

    stage(7, "evaluate: gold score, RM score, KL to SFT, gold win rate vs SFT")
    prompts = [r["prompt"] for r in make_corpus(cfg.n_eval_prompts, cfg.seed + 4)]
    ppo_policy, _ = load_model(path("ppo", "ckpt.pt"), kind="ppo")
    ilql_model, _ = load_model(path("ilql", "ckpt.pt"), heads=ilql.ilql_heads(policy.config.vocab_size), kind="ilql")
    fp32_heads(ppo_policy).to(s.device), fp32_heads(ilql_model).to(s.device)
    n, methods = cfg.best_of_n, {}
    with s.autocast():  # every method samples with the same seed: paired samples, so differences are the methods'
        methods["SFT"] = evaluate(policy, policy, rm, prompts, cfg.seed + 4, **sampling)
        texts, scores = best_of_n(policy, rm, prompts, n, seed=cfg.seed + 5, **sampling)
        gold = [gold_score(p, t) for p, t in zip(prompts, texts)]
        methods[f"best-of-{n} (SFT + RM)"] = dict(gold=sum(gold) / len(gold), rm=sum(scores) / len(scores),
                                                  kl=math.log(n) - (n - 1) / n,  # the analytic upper bound
                                                  gold_scores=gold, samples=list(zip(prompts, texts))[:4])
        methods["PPO"] = evaluate(ppo_policy, policy, rm, prompts, cfg.seed + 4, **sampling)
        for beta in cfg.ilql_betas:
            methods[f"ILQL (beta {beta:g})"] = evaluate(ilql_model, policy, rm, prompts, cfg.seed + 4,
                                                       logits_fn=ilql_logits_fn(ilql_model, beta), **sampling)
        prefs_heldout = read_log(path("data", "prefs", "test.jsonl"))
        rm_acc = rm_accuracy(rm, prefs_heldout) if prefs_heldout else None
    for m in methods.values():
        m["win_rate"] = gold_win_rate(m["gold_scores"], methods["SFT"]["gold_scores"])
    results = {"methods": methods, "rm_accuracy": rm_acc}
    curve_file = path("ppo", "gold_vs_rm.jsonl")
    gold_vs_rm = read_log(curve_file)[0] if os.path.exists(curve_file) else None  # (runs older than the file)
    write_report(cfg.out_dir, results, {"ppo": read_log(path("ppo", "log.jsonl")), "gold_vs_rm": gold_vs_rm})
    for name, m in methods.items():
        print0(f"{name:>22} | gold {m['gold']:.3f} | RM {m['rm']:.3f} | KL {m['kl']:.2f} | "
               f"win rate {m['win_rate']:.2f}")
    print0(f"RM accuracy vs gold (held out): {rm_acc} | done in {(time.time() - t0) / 60:.1f} min: {path('report.md')}")
    return results


if __name__ == "__main__":
    run_main(main, Config)
