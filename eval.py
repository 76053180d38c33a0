"""
Judge checkpoints side by side: every policy answers the same prompts, one or more judges score the answers.

Per policy: the mean judge score with its standard error, the KL to a reference policy, the mean response length,
distinct-1/2 (diversity), ROUGE-1/2/L and BLEU against the data set's reference responses when it has them, and the
pairwise win-rate matrix by one judge. A markdown table (printed, and out_dir/eval.md) and out_dir/eval.json (the
numbers, and every prompt, response and score).

Our choices:
- Paired samples (common random numbers): every policy samples with the same seeds (batch i from mix_seed(seed, i)),
  so on each prompt the policies draw the same uniform numbers: identical policies give identical responses (KL 0,
  win rate exactly 0.5), and differences of mean scores carry less noise than independent samples would give them.
  A win rate compares the two responses to the same prompt, so it is the win rate of responses coupled this way; it
  can differ from that of independently drawn responses (the usual definition) when the two policies' distributions
  overlap; by how much, and in which direction, depends on the two distributions.
- KL(policy || ref) per response is the sum over its tokens of logprob - ref_logprob (fp32) on the policy's own
  samples, averaged over prompts: an unbiased estimate of the sequence KL. Plain sampling only (temperature, no
  top-k/top-p), so the samples come from the distribution whose logprobs are scored. An ILQL policy's logprobs are
  those of its decoding logits (sample.ilql_logits_fn); the reference uses its LM head.
- Win rate of a over b: the mean over prompts of the paired outcome (1 if a's score is higher, 0.5 if equal, 0 if
  lower), with a 95% normal-approximation interval, mean +- 1.96 standard errors of those outcomes, clipped to
  [0, 1]. Ties shrink the variance, which a binomial (Wilson) interval would ignore; like any normal interval, it
  is too narrow for few prompts or rates near 0 or 1 (all outcomes equal: a single point).
- Standard errors: the sample standard deviation over prompts (divisor n - 1) / sqrt(n).
- Length: GPT-2 tokens of the response text, without the EOS. Distinct-n: distinct word n-grams / all word n-grams
  of all responses (words split on whitespace), the common reading of Li et al. 2016, who divide by the number of
  generated words (the two agree for n = 1).
- ROUGE: rouge-score's F1 with Porter stemming (as the TL;DR papers), x 100, mean over prompts. BLEU: sacrebleu's
  corpus BLEU (13a tokenizer, exp smoothing). References: SFT rows' `completion`, preference rows' `chosen` (HH with
  the prompt split off as data.load_preferences does, TL;DR comparisons).
- Judges: a reward model checkpoint (reward.py; read at the EOS appended to prompt + response, as it was trained),
  a Python reward_fn "module:function", f(prompts, responses) -> list of floats, or both (two judges; win rates by
  reward_fn, the programmatic one).
One process (no torchrun): evaluation is sampling and forwards without gradients, cheap next to training.

    python eval.py --policies=out-sft/ckpt.pt,out-ppo/ckpt.pt,out-ilql/ckpt.pt@beta=4 --ref=out-sft/ckpt.pt \\
        --data=Anthropic/hh-rlhf --n_prompts=200 --reward_model=out-rm/ckpt.pt
    python eval.py --policies=out-sft/ckpt.pt,out-dpo/ckpt.pt --reward_fn=my_rewards:score --data=prompts.jsonl
"""

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass

import torch

import data
import scoring
from common import (ConfigError, RunError, Timer, check_numbers, first_line, load_model, mix_seed, print0,
                    print_config, run_main, setup)
from model import fp32_heads, token_logprobs
from sample import POLICY_KINDS, ilql_logits_fn, sample_responses

Z95 = statistics.NormalDist().inv_cdf(0.975)  # 1.96: a 95% two-sided normal interval


@dataclass
class Config:
    # policies
    policies: str = "out-sft/ckpt.pt"  # comma-separated: .pt | HF folder | hub id; "path@beta=B": ILQL decoding
    ref: str = ""  # reference policy of the KL column ("" = no KL), e.g. the SFT checkpoint
    # data
    data: str = "Anthropic/hh-rlhf"  # prompts (data.load_prompts' formats); SFT/HH/TL;DR rows bring references
    data_subset: str = ""  # hub dataset config name ("" = none)
    eval_split: str = "test"  # the split the prompts come from (slices allowed: "train[90%:]")
    skip_bad: bool = False  # drop (and count) bad rows instead of stopping at the first one
    n_prompts: int = 200  # the first n prompts of the split (0 = all)
    max_prompt_len: int = 32  # prompt tokens kept (the end of the prompt)
    # judges
    reward_model: str = ""  # a reward.py checkpoint ...
    reward_fn: str = ""  # and/or "module:function", f(prompts, responses) -> floats (both: win rates by reward_fn)
    # sampling
    max_new_tokens: int = 32  # response length limit
    temperature: float = 1.0  # sampling temperature, also that of every logprob of the KL
    batch_size: int = 64  # prompts per sampling batch
    # output
    out_dir: str = "out-eval"  # eval.md, eval.json
    # system
    seed: int = 1337  # every policy samples with this seed: paired samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | tf32 (CUDA) | bfloat16 (autocast; logits, logprobs and KL stay fp32)

# ----------------------------------------------------------------------------- statistics


def std_err(xs):
    """Standard error of the mean: sample standard deviation / sqrt(n). Needs n >= 2."""
    return statistics.stdev(xs) / math.sqrt(len(xs))


def win_rate(a_scores, b_scores):
    """How often a beats b on the same prompts, ties counted half -> (rate, ci_low, ci_high): the mean of the paired
    outcomes in {0, 0.5, 1} and its 95% normal-approximation interval (see the module docstring)."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(a_scores, b_scores, strict=True)]
    rate, half_width = statistics.fmean(outcomes), Z95 * std_err(outcomes)
    return rate, max(0.0, rate - half_width), min(1.0, rate + half_width)


def win_rate_matrix(scores_by_name):
    """{name: per-prompt scores} -> m[a][b] = win_rate(a's scores, b's scores), for every pair (a == b: 0.5)."""
    return {a: {b: win_rate(sa, sb) for b, sb in scores_by_name.items()} for a, sa in scores_by_name.items()}


def distinct_n(texts, n):
    """Distinct word n-grams / all word n-grams over all texts (0 if there are none)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def rouge(texts, refs):
    """Mean ROUGE-1/2/L F1 x 100 of texts against refs (pairwise), with Porter stemming -> dict rouge1, rouge2,
    rougeL."""
    from rouge_score import rouge_scorer  # imported here: only runs with references need it
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_pair = [scorer.score(ref, text) for text, ref in zip(texts, refs, strict=True)]
    return {k: 100 * statistics.fmean(s[k].fmeasure for s in per_pair) for k in ("rouge1", "rouge2", "rougeL")}


def bleu(texts, refs):
    """sacrebleu's corpus BLEU (0-100) of texts against one reference each."""
    import sacrebleu
    if len(texts) != len(refs):
        raise ValueError(f"{len(texts)} texts but {len(refs)} references")
    return sacrebleu.corpus_bleu(texts, [refs]).score

# ----------------------------------------------------------------------------- sampling and KL


@torch.no_grad()
def sample_policy(model, prompts, seed, max_new_tokens, max_prompt_len, temperature=1.0, logits_fn=None,
                  batch_size=64, progress=False):
    """One response per prompt (repeat a prompt for more) -> (texts without the EOS, batches): sample.sample_responses'
    dict of each batch (tokens, mask, P, response_mask, logprobs, texts), what kl_to_ref reads. Batch i samples with a
    generator seeded mix_seed(seed, i): the same seed gives the same texts, and two policies the same random numbers
    on the same prompt (paired samples), however early another batch stopped."""
    model.eval()  # dropout off
    device = next(model.parameters()).device
    texts, batches, timer = [], [], Timer(math.ceil(len(prompts) / batch_size))
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        generator = torch.Generator(device).manual_seed(mix_seed(seed, i))
        batch = sample_responses(model, prompts[start:start + batch_size], max_prompt_len, max_new_tokens, temperature,
                                 generator=generator, logits_fn=logits_fn)
        texts += batch["texts"]
        batches.append(batch)
        if progress:
            print0(f"  sampled {len(texts)}/{len(prompts)} | ETA {timer.eta(i)}")
    return texts, batches


def response_logprobs(model, head, batch, temperature):
    """log p of each response token (B, N), fp32. Hidden state t chooses token t + 1: the states P-1 ... T-2.
    Contiguous: on a strided slice torch.matmul picks mm or bmm depending on whether the weight requires grad, and
    those may round differently; contiguous, a frozen copy of a model gives its logprobs bit for bit."""
    tokens, P = batch["tokens"], batch["P"]
    h = model(tokens, batch["mask"])[:, P - 1:-1].contiguous()  # (B, N, C)
    return token_logprobs(head(h), tokens[:, P:], temperature)


@torch.no_grad()
def kl_to_ref(policy, ref, batches, logits_fn=None, temperature=1.0):
    """KL(policy || ref) of each of the policy's samples (sample_policy's batches): the sum over its response tokens
    of logprob - ref_logprob, fp32, at the sampling temperature. logits_fn: the policy's decoding head if not its LM
    head (ILQL). Returns a list of floats, one per sample."""
    policy.eval()  # dropout off
    ref.eval()
    kl = []
    for b in batches:
        logprobs = response_logprobs(policy, logits_fn or policy.lm_head, b, temperature)
        ref_logprobs = response_logprobs(ref, ref.lm_head, b, temperature)
        kl += ((logprobs - ref_logprobs) * b["response_mask"]).sum(1).tolist()
    return kl

# ----------------------------------------------------------------------------- one evaluation


def judge_texts(prompts, texts, judges, references=None):
    """Everything measured on one policy's texts -> dict: scores {judge: per-prompt list}, score {judge: mean},
    score_se {judge: standard error}, length, distinct_1, distinct_2 and, with references, rouge1, rouge2, rougeL,
    bleu."""
    scores = {}
    for name, fn in judges.items():
        # a judge that fails or answers wrongly (a user's reward_fn) ends the run with one line naming it
        try:
            out = fn(list(prompts), list(texts))
        except Exception as e:
            raise RunError(f"judge {name!r} raised {type(e).__name__}: {first_line(e)}") from e
        try:
            scoring.check_scores(out, len(texts), name)
        except ValueError as e:
            raise RunError(str(e)) from e
        scores[name] = [float(x) for x in (out.tolist() if hasattr(out, "tolist") else out)]  # not rounded to fp32
    row = dict(scores=scores, score={k: statistics.fmean(v) for k, v in scores.items()},
               score_se={k: std_err(v) for k, v in scores.items()},
               length=statistics.fmean(len(data.encode(t)) for t in texts),
               distinct_1=distinct_n(texts, 1), distinct_2=distinct_n(texts, 2))
    if references is not None:
        row.update(rouge(texts, references), bleu=bleu(texts, references))
    return row


def evaluate(policies, prompts, judges, ref=None, references=None, extra=None, seed=0, win_rate_judge=None,
             max_new_tokens=32, max_prompt_len=32, temperature=1.0, batch_size=64):
    """Sample every policy on `prompts` with the same seed, and judge every row the same way.

    policies: {name: (model, logits_fn or None)}; judges: {name: fn(prompts, texts) -> list of floats}, the win
    rates by win_rate_judge (default: the first); ref: the reference model of the KL (None: kl is None);
    references: one reference response per prompt (ROUGE, BLEU), or None; extra: rows of precomputed texts,
    {name: dict(texts=[one per prompt], kl=float or None)}, e.g. best-of-n with its analytic KL.
    Returns dict(settings, judges, win_rate_judge, prompts, references, policies={name: dict(texts, kl, and
    judge_texts' keys)}, win_rates=win_rate_matrix of the win-rate judge's scores: [a][b] = (rate, low, high))."""
    if len(prompts) < 2:
        raise ValueError(f"{len(prompts)} prompt(s): standard errors and win-rate intervals need at least 2")
    if not judges:
        raise ValueError("no judge")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
    if set(policies) & set(extra or {}):
        raise ValueError(f"names both in policies and extra: {sorted(set(policies) & set(extra))}")
    rows = {}
    for name, (model, logits_fn) in policies.items():
        print0(f"sampling {name} on {len(prompts)} prompts")
        texts, batches = sample_policy(model, prompts, seed, max_new_tokens, max_prompt_len, temperature, logits_fn,
                                       batch_size)
        kl = statistics.fmean(kl_to_ref(model, ref, batches, logits_fn, temperature)) if ref is not None else None
        rows[name] = dict(texts=texts, kl=kl)
    for name, row in (extra or {}).items():
        if len(row["texts"]) != len(prompts):
            raise ValueError(f"extra {name!r}: {len(row['texts'])} texts for {len(prompts)} prompts")
        rows[name] = dict(texts=list(row["texts"]), kl=row.get("kl"))
    for row in rows.values():
        row.update(judge_texts(prompts, row["texts"], judges, references))
    win_rate_judge = win_rate_judge or next(iter(judges))
    settings = dict(seed=seed, max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len, temperature=temperature)
    return dict(settings=settings, judges=list(judges), win_rate_judge=win_rate_judge, prompts=list(prompts),
                references=references, policies=rows,
                win_rates=win_rate_matrix({name: row["scores"][win_rate_judge] for name, row in rows.items()}))

# ----------------------------------------------------------------------------- the report


def markdown_report(results):
    """The results as markdown: a table of the policies, then the win-rate matrix."""
    judges, rows, st = results["judges"], results["policies"], results["settings"]
    overlap = ["rouge1", "rouge2", "rougeL", "bleu"] if results["references"] is not None else []
    cols = [f"score ({j})" for j in judges] + ["KL to ref", "length", "distinct-1", "distinct-2"]
    cols += [{"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu": "BLEU"}[k] for k in overlap]
    notes = (f"One response per prompt and policy (seed {st['seed']}, temperature {st['temperature']}, at most "
             f"{st['max_new_tokens']} new tokens), the same seed for every policy. Score: mean ± standard error over "
             "prompts. KL: nats per response, on the policy's own samples. Length: tokens, without the EOS. "
             "Distinct-n: distinct word n-grams / all.")
    if overlap:
        notes += " ROUGE: F1 x 100 with stemming; BLEU: sacrebleu corpus BLEU; both against the data's references."
    lines = [f"# Evaluation on {len(results['prompts'])} prompts", "", notes, "",
             "| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r['score'][j]:.3f} ± {r['score_se'][j]:.3f}" for j in judges]
        cells += ["-" if r["kl"] is None else f"{r['kl']:.3f}", f"{r['length']:.1f}", f"{r['distinct_1']:.3f}",
                  f"{r['distinct_2']:.3f}"] + [f"{r[k]:.2f}" for k in overlap]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    names = list(rows)
    lines += ["", f"Win rate of the row's policy over the column's, judged by {results['win_rate_judge']} (ties count "
              "half), with a 95% interval (normal approximation on the paired per-prompt outcomes).", "",
              "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        cells = [f"{rate:.2f} [{low:.2f}, {high:.2f}]" for rate, low, high in results["win_rates"][a].values()]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results, out_dir):
    """out_dir/eval.md (markdown_report) and out_dir/eval.json (results); returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    text = markdown_report(results)
    with open(os.path.join(out_dir, "eval.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=1)
    return text

# ----------------------------------------------------------------------------- the command line


def check_config(cfg):
    check_numbers(cfg, positive=("max_prompt_len", "max_new_tokens"), non_negative=("n_prompts", "temperature"))
    if cfg.ref and cfg.temperature == 0:  # greedy responses are not draws from the distribution the KL averages over
        raise ConfigError("temperature 0 (greedy decoding) gives no KL estimate: use temperature > 0 with --ref, or no "
                          "--ref")


def parse_policies(spec):
    """"a.pt,b.pt@beta=4" -> [(name, path, beta)]: the name is the spec itself."""
    policies = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        path, _, option = item.partition("@")
        key, _, value = option.partition("=")
        if option and (key != "beta" or not value):
            raise ConfigError(f"policies: {item!r}: the only option is @beta=B (ILQL decoding), e.g. ckpt.pt@beta=4")
        try:
            beta = float(value) if option else 0.0
        except ValueError:
            raise ConfigError(f"policies: {item!r}: beta {value!r} is not a number") from None
        if any(name == item for name, _, _ in policies):
            raise ConfigError(f"policies: {item!r} is listed twice")
        policies.append((item, path, beta))
    if not policies:
        raise ConfigError("policies is empty: give one or more checkpoints, comma-separated")
    return policies


def load_policy(path, beta, cfg, s, loaded):
    """(model, logits_fn) of one policy. loaded: {path: (model, checkpoint kind)}, so a checkpoint listed twice (ILQL
    at two betas, the reference) loads once."""
    if path not in loaded:
        model, ckpt = load_model(path, kind=POLICY_KINDS)
        if cfg.max_prompt_len + cfg.max_new_tokens > model.config.block_size:
            raise ConfigError(f"{path}: max_prompt_len + max_new_tokens = {cfg.max_prompt_len + cfg.max_new_tokens} "
                              f"exceeds its block_size {model.config.block_size}")
        loaded[path] = fp32_heads(model).to(s.device).eval().requires_grad_(False), ckpt and ckpt["kind"]
    model, kind = loaded[path]
    if beta != 0 and kind != "ilql":
        raise ConfigError(f"{path}@beta={beta:g} decodes with ILQL's Q and V heads, but {path!r} is not an ilql "
                          f"checkpoint")
    return model, ilql_logits_fn(model, beta) if beta != 0 else None


def load_judges(cfg, s):
    """{name: fn(prompts, texts) -> scores} from reward_fn and/or reward_model; reward_fn first (it judges the win
    rates: a programmatic judge is usually the gold one)."""
    judges = {}
    if cfg.reward_fn:
        judges[cfg.reward_fn] = scoring.load_reward_fn(cfg.reward_fn)
    if cfg.reward_model:
        rm = scoring.load_reward_model(cfg.reward_model, s.device)
        if cfg.max_prompt_len >= rm.config.block_size:
            raise ConfigError(f"max_prompt_len {cfg.max_prompt_len} leaves no room for a response in the reward "
                              f"model's block_size {rm.config.block_size}")
        judges[cfg.reward_model] = lambda prompts, texts: scoring.score(rm, prompts, texts, cfg.batch_size,
                                                                        cfg.max_prompt_len)
    if not judges:
        raise ConfigError("no judge: set reward_model (a reward.py checkpoint) and/or reward_fn ('module:function')")
    return judges


def load_eval_data(source, split, subset="", skip_bad=False):
    """(prompts, references or None): rows with a reference response (SFT `completion`, preference `chosen`, TL;DR
    comparisons) give both, read as sft.py and reward.py read them; other rows only prompts (data.load_prompts)."""
    keys = set(next(iter(data.load_rows(source, split, subset)), {}))
    if "completion" in keys:
        examples = data.load_sft(source, split, subset, skip_bad)
        return [e.prompt for e in examples], [e.completion for e in examples]
    if "chosen" in keys or "summaries" in keys:
        examples = data.load_preferences(source, split, subset, skip_bad)
        return [e.prompt for e in examples], [e.chosen for e in examples]
    return data.load_prompts(source, split, subset, skip_bad), None


def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed)
    print_config(cfg)
    check_config(cfg)
    specs = parse_policies(cfg.policies)
    judges = load_judges(cfg, s)  # before the policies: a bad judge fails in a second
    prompts, references = load_eval_data(cfg.data, cfg.eval_split, cfg.data_subset, cfg.skip_bad)
    n = cfg.n_prompts or len(prompts)
    prompts, references = prompts[:n], None if references is None else references[:n]
    if len(prompts) < 2:
        raise ConfigError(f"{cfg.data}: {len(prompts)} prompt(s); standard errors and win rates need at least 2")
    loaded = {}
    policies = {name: load_policy(path, beta, cfg, s, loaded) for name, path, beta in specs}
    ref = load_policy(cfg.ref, 0, cfg, s, loaded)[0] if cfg.ref else None
    with s.autocast():
        results = evaluate(policies, prompts, judges, ref, references, seed=cfg.seed, batch_size=cfg.batch_size,
                           max_new_tokens=cfg.max_new_tokens, max_prompt_len=cfg.max_prompt_len,
                           temperature=cfg.temperature)
    results["config"] = asdict(cfg)
    print0(write_results(results, cfg.out_dir))
    print0(f"-> {os.path.join(cfg.out_dir, 'eval.md')}, {os.path.join(cfg.out_dir, 'eval.json')}")
    return results


if __name__ == "__main__":
    run_main(main, Config)
