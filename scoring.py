"""
Scores of sampled responses, for RL and evaluation: a reward model trained by reward.py, or a Python reward_fn.

- `score_tokens`: a reward model's score of token rows: its "reward" head at each row's last real token (the EOS
  that ends the response), in fp32. reward.py trains exactly this.
- `load_reward_model` and `score`: a reward.py checkpoint, and the scores of (prompt, response) strings.
- `make_scorer`: one interface over both kinds, score_fn(prompts, texts, tokens, mask) -> (B,) scores, for ppo.py,
  grpo.py, ilql.py's evaluation and sample.py's best-of-n. It scores the sampled tokens as they are; `score`
  tokenizes (prompt, response) strings with an EOS appended, as reward.py trained, for eval.py and demo.py, which
  judge texts (so a response with no EOS is scored at an EOS it never sampled).
"""

import importlib
import math
import numbers
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from common import ConfigError, first_line, load_model, run_error
from data import pad_right, tokenize_example


def score_tokens(model, tokens, mask, right_padded=False):
    """The "reward" head at the last real token of each row (the last position where mask == 1, so right- and
    left-padded rows alike), in fp32. tokens, mask (B, T) -> (B,) fp32. Gradients flow (training uses it too).
    right_padded=True: the rows are right-padded, so plain causal attention (no mask: SDPA's fastest kernels) gives
    every real position the same values, up to rounding; the padding's outputs are never read."""
    raw = getattr(model, "module", model)
    h = model(tokens, None if right_padded else mask)  # (B, T, C)
    last = (torch.arange(tokens.shape[1], device=tokens.device) * mask).argmax(-1)  # (B,) index of last 1
    h_last = h[torch.arange(tokens.shape[0], device=tokens.device), last].float()  # (B, C)
    head = raw.heads["reward"]
    with torch.autocast(tokens.device.type, enabled=False):  # autocast would run the Linear in bf16
        return F.linear(h_last, head.weight.float(), head.bias.float()).squeeze(-1)


def load_reward_model(path, device="cpu"):
    """A kind="reward" checkpoint as a frozen GPT in eval mode (its head already gives normalised scores)."""
    model, _ = load_model(path, heads={"reward": 1}, kind="reward")
    model.to(device).eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def score(model, prompts, responses, batch_size=16, max_prompt_len=None, max_len=None):
    """Scores of (prompt, response) pairs: tokenized with data.tokenize_example (EOS appended), right-padded in
    batches, read by score_tokens. max_len defaults to the model's block_size, max_prompt_len to half of max_len.
    Runs under the caller's autocast, if any; the model should be in eval mode (load_reward_model's is)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    max_len = max_len or model.config.block_size
    max_prompt_len = max_prompt_len or max_len // 2
    device = next(model.parameters()).device
    seqs = [sum(tokenize_example(p, r, max_prompt_len, max_len), []) for p, r in zip(prompts, responses)]
    scores = []
    for i in range(0, len(seqs), batch_size):
        tokens, mask = pad_right(seqs[i:i + batch_size])
        scores += score_tokens(model, tokens.to(device), mask.to(device)).tolist()
    return scores


def load_reward_fn(spec):
    """"module:function" -> the function; a ConfigError naming reward_fn and the problem otherwise."""
    module_name, sep, fn_name = spec.partition(":")
    if not sep or not module_name or not fn_name:
        raise ConfigError(f"reward_fn {spec!r}: expected 'module:function', e.g. 'my_rewards:score'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward_fn {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                          f"is it on PYTHONPATH?") from e
    except Exception as e:  # the module itself fails as it is imported: a SyntaxError, an error at its top level
        raise ConfigError(f"reward_fn {spec!r}: importing module {module_name!r} failed "
                          f"({type(e).__name__}: {first_line(e)})") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward_fn {spec!r}: module {module_name!r} has no function {fn_name!r}")
    return fn


def check_scores(scores, n, name):
    """What a reward_fn returned -> (n,) fp32 tensor, or a ValueError saying what is wrong with it."""
    if hasattr(scores, "tolist"):  # torch / numpy arrays
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise ValueError(f"reward_fn {name!r} returned a {type(scores).__name__}; expected a list of {n} floats")
    if len(scores) != n:
        raise ValueError(f"reward_fn {name!r} returned {len(scores)} scores for {n} responses")
    for i, x in enumerate(scores):
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            raise ValueError(f"reward_fn {name!r}: score {i} is {x!r} ({type(x).__name__}), not a number")
        if not math.isfinite(x):
            raise ValueError(f"reward_fn {name!r}: score {i} is {x}, not a finite number")
        if abs(x) > torch.finfo(torch.float32).max:  # inf in the fp32 tensor the trainers use
            raise ValueError(f"reward_fn {name!r}: score {i} is {x}, beyond fp32's range")
    return torch.tensor(scores, dtype=torch.float32)


def make_scorer(reward_model="", reward_fn="", device="cpu", autocast=nullcontext, batch_size=None, max_len=None):
    """The score of sampled responses, for RL: score_fn(prompts, texts, tokens, mask) -> (B,) fp32 scores, from
    exactly one of a reward model checkpoint (read at each row's last real token of tokens/mask = prompt + response,
    in batches of batch_size rows) or a Python reward_fn "module:function", f(prompts, responses) -> list of floats
    (trlx style). max_len: max_prompt_len + max_new_tokens, which the reward model's context must hold (a
    ConfigError now, not a ValueError once a long response is scored). Returns (score_fn, the reward model or None)."""
    if bool(reward_model) == bool(reward_fn):
        raise ConfigError("set exactly one of reward_model (a reward.py checkpoint) and reward_fn ('module:function')")
    if reward_fn:
        fn = load_reward_fn(reward_fn)

        def score_fn(prompts, texts, tokens, mask):
            # the user's code failing, or returning a wrong answer, ends the run with one line naming it and the step
            try:
                scores = fn(list(prompts), list(texts))
            except Exception as e:
                raise run_error(f"reward_fn {reward_fn!r} raised {type(e).__name__}: {first_line(e)}") from e
            try:
                return check_scores(scores, len(texts), reward_fn).to(tokens.device)
            except ValueError as e:
                raise run_error(str(e)) from e
        return score_fn, None
    rm = load_reward_model(reward_model, device)
    if max_len and max_len > rm.config.block_size:
        raise ConfigError(f"max_prompt_len + max_new_tokens = {max_len} exceeds the reward model's block_size "
                          f"{rm.config.block_size}")

    @torch.no_grad()
    def score_fn(prompts, texts, tokens, mask):
        size = batch_size or len(tokens)
        with autocast():
            return torch.cat([score_tokens(rm, t, m) for t, m in zip(tokens.split(size), mask.split(size))])
    return score_fn, rm
