"""
Sample from a trained model (nanoGPT's sample.py, for every stage's checkpoint): print each prompt and its
completions. All samples of one prompt come from one batched `generate` call (the prompt repeated num_samples times),
and a completion ends at the first <|endoftext|>.

init_from: one of our checkpoints (out/sft/ckpt.pt, a PPO, reward or ILQL ckpt.pt: the policy/LM head is used), an
exported HF folder (out/sft/hf), or a hub id (gpt2, gpt2-medium, ...). ILQL checkpoints can decode with their Q and
V heads: --beta=B samples from log_softmax(logits) + B * (min target Q - V), then temperature and top-k/top-p.

    python sample.py --init_from=gpt2 --start="The meaning of life is" --num_samples=3
    python sample.py --init_from=out/ppo/ckpt.pt --start=FILE:prompts.txt --temperature=0   # one prompt per line
    python sample.py --init_from=out/ilql/ckpt.pt --beta=4 --start="Human: hi" --dtype=bfloat16
"""

import os
from dataclasses import dataclass

import torch

from common import ConfigError, load_model, print_config, run_main, setup
from data import EOS, decode, tokenize_prompt
from model import generate


@dataclass
class Config:
    init_from: str = "gpt2"  # our .pt checkpoint (any kind), an HF folder, or a hub id such as gpt2-medium
    start: str = "\n"  # the prompt, or FILE:path with one prompt per line
    num_samples: int = 3  # completions per prompt
    max_new_tokens: int = 100  # tokens per completion (fewer if it ends with <|endoftext|>)
    temperature: float = 0.8  # 1.0 = the model's distribution, < 1 sharper, 0 = greedy
    top_k: int = 200  # sample from the k most likely tokens only (0 = all)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with this much mass (1.0 = off)
    beta: float = 0.0  # ILQL checkpoints: weight of the advantage (min Q - V) added to the logprobs (0 = plain policy)
    seed: int = 1337  # prompt i samples with a generator seeded seed + i
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:1"
    dtype: str = "float32"  # "float32" | "bfloat16" (autocast)


def read_prompts(start):
    if start.startswith("FILE:"):
        if not os.path.isfile(start[5:]):
            raise ConfigError(f"start={start!r}: no such file {start[5:]!r}")
        with open(start[5:], encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    return [start]


def sample(model, prompts, cfg, logits_fn=None):
    """num_samples completions (text, without the prompt and the final <|endoftext|>) for each prompt."""
    block_size = model.config.block_size
    if cfg.max_new_tokens >= block_size:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in block_size {block_size}")
    device = next(model.parameters()).device
    completions = []
    for i, prompt in enumerate(prompts):
        ids = tokenize_prompt(prompt, block_size - cfg.max_new_tokens)  # keeps the end of a long prompt
        tokens = torch.tensor([ids] * cfg.num_samples, device=device)  # (num_samples, P)
        generator = torch.Generator(device).manual_seed(cfg.seed + i)
        out, _, mask = generate(model, tokens, torch.ones_like(tokens), cfg.max_new_tokens, cfg.temperature,
                                cfg.top_k or None, cfg.top_p, generator, eos_id=EOS, logits_fn=logits_fn)
        texts = []
        for row, m in zip(out[:, len(ids):].tolist(), mask.tolist()):
            row = row[:sum(m)]
            texts.append(decode(row[:-1] if row and row[-1] == EOS else row))
        completions.append(texts)
    return completions


def main(cfg):
    s = setup(cfg.device, cfg.dtype, cfg.seed)
    print_config(cfg)
    model, ckpt = load_model(cfg.init_from)
    logits_fn = None
    if cfg.beta != 0:
        if ckpt is None or ckpt["kind"] != "ilql":
            raise ConfigError(f"--beta={cfg.beta} decodes with ILQL's Q and V heads, but {cfg.init_from!r} is not an "
                              f"ilql checkpoint")
        from ilql import ilql_logits_fn  # only ILQL decoding needs it
        logits_fn = ilql_logits_fn(model, cfg.beta)  # load_model kept the checkpoint's Q and V heads
    model.to(s.device).eval()
    prompts = read_prompts(cfg.start)
    with s.autocast():
        completions = sample(model, prompts, cfg, logits_fn)
    for prompt, texts in zip(prompts, completions):
        print(f"=== prompt: {prompt!r}")
        for text in texts:
            print(prompt + text)
            print("---------------")
    return {"prompts": prompts, "completions": completions}


if __name__ == "__main__":
    run_main(main, Config)
