"""
Sample from a trained model (nanoGPT's sample.py, for every stage's checkpoint), and the sampling every other script
uses: `sample_responses` turns prompt strings into responses (tokens, masks, logprobs and texts), and
`ilql_logits_fn` decodes with ILQL's heads.

init_from: one of our policy checkpoints (sft, ppo, grpo, dpo or ilql ckpt.pt: the policy and its LM head), an
exported HF folder (out-sft/hf), or a hub id (gpt2, gpt2-medium, ...). ILQL checkpoints can decode with their Q and
V heads: --beta=B samples from log_softmax(logits) + B * (min target Q - V), then temperature and top-k/top-p. All
samples of one prompt come from one batched `generate` call; a completion ends at the first <|endoftext|>. Logits
(and ILQL's Q and V) are computed in fp32 also under bf16 autocast (model.fp32_heads), as the RL trainers train.
The defaults (temperature 0.8, top-k 200) are nanoGPT's; --temperature=1 --top_k=0 samples the distribution that
ppo.py and grpo.py optimise and eval.py measures.
Best-of-n (rejection sampling, the baseline RLHF must beat): --best_of=N draws N candidates per completion and keeps
the one a reward model (or a Python reward_fn) scores highest; its KL to the policy is at most log N - (N - 1) / N.

    python sample.py --init_from=gpt2 --start="The meaning of life is" --num_samples=3
    python sample.py --init_from=out-ppo/ckpt.pt --start=FILE:prompts.txt --temperature=0   # one prompt per line
    python sample.py --init_from=out-ilql/ckpt.pt --beta=4 --start="Human: hi" --dtype=bfloat16
    python sample.py --init_from=out-sft/ckpt.pt --best_of=16 --reward_model=out-rm/ckpt.pt --start="Human: hi"
"""

import math
import os
from dataclasses import dataclass

import torch

from common import ConfigError, check_numbers, load_model, print_config, run_main, setup
from data import decode_responses, pad_left, tokenize_prompt
from model import fp32_heads, generate
from scoring import make_scorer


POLICY_KINDS = ("sft", "ppo", "ilql", "dpo", "grpo")  # our checkpoints that hold a policy (not a reward model)


@dataclass
class Config:
    init_from: str = "gpt2"  # our policy .pt checkpoint, an HF folder, or a hub id such as gpt2-medium
    start: str = "\n"  # the prompt, or FILE:path with one prompt per line
    num_samples: int = 3  # completions per prompt
    max_new_tokens: int = 100  # tokens per completion (fewer if it ends with <|endoftext|>)
    temperature: float = 0.8  # 1.0 = the model's distribution, < 1 sharper, 0 = greedy
    top_k: int = 200  # sample from the k most likely tokens only (0 = all)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with this much mass (1.0 = off)
    beta: float = 0.0  # ILQL decoding: weight of (min Q - V) added to the logprobs, not a KL coefficient (0 = policy)
    best_of: int = 1  # best-of-n: draw this many candidates per completion, keep the highest-scored one
    reward_model: str = ""  # best_of > 1: score the candidates with this reward.py checkpoint ...
    reward_fn: str = ""  # ... or with this "module:function", f(prompts, responses) -> list of floats
    seed: int = 1337  # prompt i samples with a generator seeded seed + i
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    dtype: str = "float32"  # "float32" | "tf32" (CUDA) | "bfloat16" (autocast)


def read_prompts(start):
    if start.startswith("FILE:"):
        if not os.path.isfile(start[5:]):
            raise ConfigError(f"start={start!r}: no such file {start[5:]!r}")
        with open(start[5:], encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    return [start]


@torch.no_grad()
def sample_responses(model, prompts, max_prompt_len, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                     generator=None, logits_fn=None, shard=None):
    """One response per prompt string. Each prompt keeps its last max_prompt_len tokens, left-padded to a batch.
    Returns a dict: tokens (B, P+N) = prompt + response, mask (B, P+N), P, response_mask (B, N), logprobs (B, N)
    (the sampler's), texts (B strings, without the EOS).
    shard=(rank, world_size): `prompts` is a global batch and this rank samples rows rank::world_size. Every rank pads
    the whole batch, so its rows are exactly those rows of one process's; with the sampler's shard (see
    model.sample_token) the ranks together sample exactly what one process samples."""
    device = next(model.parameters()).device
    rank, world_size = shard or (0, 1)
    tokens, mask = pad_left([tokenize_prompt(p, max_prompt_len) for p in prompts])
    tokens, mask, P = tokens[rank::world_size].to(device), mask[rank::world_size].to(device), tokens.shape[1]
    tokens, logprobs, response_mask = generate(model, tokens, mask, max_new_tokens, temperature, top_k, top_p,
                                               generator, logits_fn=logits_fn, shard=shard)
    return dict(tokens=tokens, mask=torch.cat([mask, response_mask], 1), P=P, response_mask=response_mask,
                logprobs=logprobs, texts=decode_responses(tokens[:, P:], response_mask))


def ilql_logits_fn(model, beta):
    """ILQL's decoding logits for model.generate(..., logits_fn=...) (see ilql.py): hidden (B, C) ->
    log_softmax(logits) + beta * (min target Q - V), fp32. generate then applies temperature and top-k. beta = 0: the
    behaviour policy (the heads are then not even evaluated)."""
    raw = getattr(model, "module", model)

    def logits_fn(h):
        logprobs = torch.log_softmax(raw.lm_head(h).float(), dim=-1)  # (B, V)
        if beta == 0:
            return logprobs
        q = torch.minimum(raw.heads["q1_target"](h), raw.heads["q2_target"](h)).float()  # (B, V)
        return logprobs + beta * (q - raw.heads["v"](h).float())
    return logits_fn


def sample(model, prompts, cfg, logits_fn=None, score_fn=None, block_size=None):
    """num_samples completions (texts) for each prompt, prompt i sampled with a generator seeded seed + i. With
    best_of = n > 1, each completion is the highest-scored (score_fn) of n candidates, the candidates being the
    completions best_of=1 with num_samples * n would draw (rejection sampling). block_size: the context the prompt and
    completion must fit (default the model's; a reward model may have a shorter one)."""
    block_size = block_size or model.config.block_size
    if cfg.max_new_tokens >= block_size:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in block_size {block_size}")
    device = next(model.parameters()).device
    completions = []
    for i, prompt in enumerate(prompts):
        n = cfg.num_samples * cfg.best_of
        r = sample_responses(model, [prompt] * n, block_size - cfg.max_new_tokens, cfg.max_new_tokens, cfg.temperature,
                             cfg.top_k or None, cfg.top_p, torch.Generator(device).manual_seed(cfg.seed + i), logits_fn)
        if cfg.best_of == 1:
            completions.append(r["texts"])
            continue
        scores = score_fn([prompt] * n, r["texts"], r["tokens"], r["mask"]).view(cfg.num_samples, cfg.best_of)
        best = scores.argmax(1) + torch.arange(cfg.num_samples, device=scores.device) * cfg.best_of  # first if tied
        completions.append([r["texts"][j] for j in best.tolist()])
    return completions


def best_of_n_kl(n):
    """KL(best-of-n || policy) <= log n - (n - 1) / n nats: the formula of Stiennon et al. 2020, an upper bound (Beirami
    et al. 2024), exact when no two of the n samples can tie."""
    return math.log(n) - (n - 1) / n


def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed)
    print_config(cfg)
    check_numbers(cfg, positive=("num_samples", "max_new_tokens", "best_of"), non_negative=("temperature", "top_k"),
                  fraction=("top_p",))
    if not math.isfinite(cfg.beta):
        raise ConfigError(f"beta must be a finite number, not {cfg.beta}")
    model, ckpt = load_model(cfg.init_from, kind=POLICY_KINDS)
    logits_fn = None
    if cfg.beta != 0:
        if ckpt is None or ckpt["kind"] != "ilql":
            raise ConfigError(f"--beta={cfg.beta} decodes with ILQL's Q and V heads, but {cfg.init_from!r} is not an "
                              f"ilql checkpoint")
        logits_fn = ilql_logits_fn(model, cfg.beta)  # load_model kept the checkpoint's Q and V heads
    fp32_heads(model).to(s.device).eval()
    score_fn, block_size = None, model.config.block_size
    if cfg.best_of > 1:
        score_fn, rm = make_scorer(cfg.reward_model, cfg.reward_fn, s.device, s.autocast)
        block_size = min(block_size, rm.config.block_size) if rm is not None else block_size
        n = cfg.best_of  # the best of n samples is at most this far from the policy (Stiennon et al. 2020)
        print(f"best-of-{n}: KL(best-of-{n} || policy) <= log {n} - {n - 1}/{n} = {best_of_n_kl(n):.3f} nats")
    prompts = read_prompts(cfg.start)
    with s.autocast():
        completions = sample(model, prompts, cfg, logits_fn, score_fn, block_size)
    for prompt, texts in zip(prompts, completions):
        print(f"=== prompt: {prompt!r}")
        for text in texts:
            print(prompt + text)
            print("---------------")
    return {"prompts": prompts, "completions": completions}


if __name__ == "__main__":
    run_main(main, Config)
