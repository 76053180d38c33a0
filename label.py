"""
Human feedback in the terminal: show a prompt and two completions sampled from a checkpoint, record which is better.

Answers: 1 or 2 (that one is better), t (tie), s (skip), q (quit; end of input quits too). Each answer is written
at once, so stopping at any moment loses nothing:
- 1 / 2 append {"prompt", "chosen", "rejected", "prompt_id"} to `out`, the prompt/chosen/rejected JSONL reward.py
  reads (data.load_preferences ignores the extra prompt_id);
- t: a tie carries no Bradley-Terry preference, so it is NOT written to `out`; it is counted, and appended to
  `<out>.ties.jsonl` so that the prompt is not asked again;
- s: nothing is written: a skipped prompt comes back in the next session.
A new session resumes where the last one stopped: prompts whose prompt_id is in `out` or in the ties file are
skipped. Candidates are sampled with seed + prompt_id, so a prompt shows the same pair in every session.

Active querying (Christiano et al. 2017): with --active=True, n_candidates completions are sampled per prompt, the
current reward model scores them, and the pair it is least sure about (the smallest score gap) is shown: the
labels the reward model learns most from.

    python label.py --init_from=out/demo/sft/ckpt.pt --prompts=out/demo/data/corpus/test.jsonl --out=human.jsonl
    python label.py --init_from=out/demo/sft/ckpt.pt --start="This movie" --num_samples=20 --out=...
    python label.py ... --active=True --reward_model=out/demo/reward/ckpt.pt --n_candidates=8
    python reward.py --data=out/human/prefs.jsonl ...          # then train a reward model on your labels
"""

import json
import os
import sys
from dataclasses import dataclass

import torch

import data
from common import ConfigError, check_numbers, load_model, print_config, run_main, setup
from model import fp32_heads
from scoring import load_reward_model, score
from sample import POLICY_KINDS, read_prompts, sample_responses


@dataclass
class Config:
    init_from: str = "out/demo/sft/ckpt.pt"  # the policy that writes the completions: our policy .pt, HF folder, hub id
    out: str = "out/human/prefs.jsonl"  # preference JSONL to append to (what reward.py reads)
    prompts: str = ""  # prompt source for data.load_prompts (.jsonl/.json/.parquet/.csv or hub dataset)
    data_split: str = "train"  # split of `prompts`
    data_subset: str = ""  # hub dataset configuration of `prompts`
    prompt_field: str = ""  # column holding the prompt ("": prompt, or HH / TL;DR detection)
    max_prompts: int = 0  # label at most this many prompts of the file (0: all)
    start: str = ""  # instead of a prompt file: the prompt, or FILE:path with one prompt per line (as sample.py)
    num_samples: int = 10  # with start: pairs to label per prompt
    active: bool = False  # show the pair the reward model is least sure about (needs reward_model)
    reward_model: str = ""  # reward model checkpoint (.pt, kind "reward") for active querying
    n_candidates: int = 4  # active: completions sampled per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # sample from the k most likely tokens only (0 = all)
    max_prompt_len: int = 256  # prompts are left-truncated to this many tokens
    seed: int = 1337
    device: str = "auto"
    dtype: str = "float32"


KEYS = "1 / 2 / t (tie) / s (skip) / q (quit)"


def load_prompt_list(cfg):
    if cfg.start:  # as sample.py: one prompt, or FILE:path with one per line; each num_samples times
        return [p for p in read_prompts(cfg.start) for _ in range(cfg.num_samples)]
    if not cfg.prompts:
        raise ConfigError("give --prompts=<file or dataset> or --start=<prompt>")
    prompts = data.load_prompts(cfg.prompts, cfg.data_split, cfg.data_subset, field=cfg.prompt_field)
    return prompts[:cfg.max_prompts] if cfg.max_prompts else prompts


def answered(paths, prompts):
    """prompt_ids already answered (labeled or tied) in earlier sessions. A stored prompt that is not the prompt
    of that id means the files belong to another prompt list: stop rather than mix them up."""
    done = set()
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:  # a session killed mid-write may leave a cut line
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: line {line_no} is not valid JSON ({e.msg}); remove it") from e
                i = row.get("prompt_id")
                if not isinstance(i, int) or i >= len(prompts) or prompts[i] != row.get("prompt"):
                    raise ConfigError(f"{path}: line {line_no} (prompt_id {i!r}) does not match this prompt list; "
                                      f"use another --out or the prompts it was labeled from")
                done.add(i)
    return done


def sample_candidates(model, prompt, n, seed, max_new_tokens=64, temperature=1.0, top_k=0, max_prompt_len=256):
    """n completions of one prompt (texts, EOS removed); a pure function of (model, prompt, seed)."""
    max_prompt_len = min(max_prompt_len, model.config.block_size - max_new_tokens)
    if max_prompt_len < 1:
        raise ConfigError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in block_size "
                          f"{model.config.block_size}")
    g = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    return sample_responses(model, [prompt] * n, max_prompt_len, max_new_tokens, temperature, top_k or None,
                            generator=g)["texts"]


def closest_pair(responses, scores):
    """(i, j), i < j: the two distinct non-empty responses whose scores are closest (None if there are not two).
    Sorted by score, the closest two are neighbours. Empty responses cannot be stored (load_preferences rejects
    them), identical ones carry no preference."""
    first = {}
    for i, r in enumerate(responses):
        if r:
            first.setdefault(r, i)  # identical texts: keep one
    idx = sorted(first.values(), key=lambda i: float(scores[i]))
    if len(idx) < 2:
        return None
    k = min(range(len(idx) - 1), key=lambda k: float(scores[idx[k + 1]]) - float(scores[idx[k]]))
    return tuple(sorted((idx[k], idx[k + 1])))


def ask():
    """One valid answer from stdin; end of input counts as quit."""
    while True:
        try:
            answer = input(f"Which is better? {KEYS}: ").strip().lower()
        except (EOFError, RuntimeError):  # end of input; RuntimeError: no stdin at all (closed, or a daemon's)
            print()
            return "q"
        if not sys.stdin.isatty():
            print(answer)  # echo piped answers, so a log of the session reads like the terminal did
        if answer in ("1", "2", "t", "s", "q"):
            return answer
        print(f"  {answer!r} is not an answer: type {KEYS}")


def append_jsonl(path, row):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed)
    print_config(cfg)
    check_numbers(cfg, positive=("num_samples", "n_candidates", "max_new_tokens", "max_prompt_len"),
                  non_negative=("max_prompts", "temperature", "top_k"))
    if cfg.active and not cfg.reward_model:
        raise ConfigError("active=True needs --reward_model=<reward checkpoint>")
    if cfg.active and cfg.n_candidates < 2:
        raise ConfigError(f"active=True shows a pair of n_candidates: n_candidates must be >= 2, not "
                          f"{cfg.n_candidates}")
    prompts = load_prompt_list(cfg)
    ties_path = cfg.out + ".ties.jsonl"
    done = answered([cfg.out, ties_path], prompts)
    todo = [i for i in range(len(prompts)) if i not in done]
    print(f"{len(prompts)} prompts, {len(done)} answered in earlier sessions, {len(todo)} to go -> {cfg.out}")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)

    model, _ = load_model(cfg.init_from, kind=POLICY_KINDS)
    fp32_heads(model).to(s.device).eval()  # logits in fp32 under bf16 autocast, as sample.py samples
    rm = None
    if cfg.active:
        rm = load_reward_model(cfg.reward_model, s.device)

    # Prompts are left-truncated so that prompt + response fits the policy's and the reward model's context.
    max_prompt_len = min(cfg.max_prompt_len, model.config.block_size - cfg.max_new_tokens,
                         rm.config.block_size - cfg.max_new_tokens - 1 if rm else cfg.max_prompt_len)
    if rm and max_prompt_len < 1:  # the reward model's context is the short one (sample_candidates names the policy's)
        raise ConfigError(f"max_new_tokens {cfg.max_new_tokens} + the EOS leave no room for a prompt in the reward "
                          f"model's block_size {rm.config.block_size}")
    counts = dict(labeled=0, ties=0, skipped=0)
    for n, i in enumerate(todo):
        prompt = prompts[i]
        k = cfg.n_candidates if cfg.active else 2
        with s.autocast():
            candidates = sample_candidates(model, prompt, k, cfg.seed + i, cfg.max_new_tokens, cfg.temperature,
                                           cfg.top_k, max_prompt_len)
            # the reward head at the appended EOS, as reward.py reads it; any shift or scale keeps the closest pair
            scores = score(rm, [prompt] * k, candidates, k, max_prompt_len) if rm else [0.0] * k
        pair = closest_pair(candidates, scores)  # not active: the two samples, unless identical or empty
        if pair is None:
            print(f"\n(prompt {i}: no two distinct non-empty completions to compare; skipped)")
            counts["skipped"] += 1
            continue
        a, b = candidates[pair[0]], candidates[pair[1]]
        print(f"\n=== prompt {i} ({n + 1} of {len(todo)} | this session: {counts['labeled']} labeled, "
              f"{counts['ties']} ties, {counts['skipped']} skipped) ===")
        print(f"PROMPT:\n{prompt}\n\n--- [1] ---\n{a}\n\n--- [2] ---\n{b}\n")
        answer = ask()
        if answer == "q":
            break
        if answer == "s":
            counts["skipped"] += 1
        elif answer == "t":
            counts["ties"] += 1
            append_jsonl(ties_path, {"prompt": prompt, "response_1": a, "response_2": b, "prompt_id": i})
        else:
            chosen, rejected = (a, b) if answer == "1" else (b, a)
            append_jsonl(cfg.out, {"prompt": prompt, "chosen": chosen, "rejected": rejected, "prompt_id": i})
            counts["labeled"] += 1
    print(f"\nthis session: {counts['labeled']} pairs written to {cfg.out}, {counts['ties']} ties (not written: "
          f"no preference; recorded in {ties_path}), {counts['skipped']} skipped (asked again next time)")
    return counts


if __name__ == "__main__":
    run_main(main, Config)
