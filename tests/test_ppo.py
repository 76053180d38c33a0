"""PPO: the pure functions against naive references and known values, the rollout/training invariants (ratio == 1,
rollout logprobs == training logprobs, KL == 0 against itself, the LM head at the real tokens only == a full forward,
score at the EOS), learning with a reward_fn and with a reward model, reward_fn errors, exact resume, and one
2-process torchrun run."""

import collections
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, replace

import pytest
import torch

import model
import ppo
import scoring

from common import RunError, load_checkpoint, save_checkpoint
from data import EOS
from model import GPT, GPTConfig, fp32_heads
from ppo import (ActorCritic, AdaptiveKLController, Config, build_models, compute_rewards, forward_rollout, gae, main,
                 minibatches, ppo_losses, ppo_update, rollout, truncate_after_eos, whiten)
from scoring import check_scores, load_reward_fn, make_scorer
from tests.helpers import cpu_setup, eval_log, run_torchrun, spy_on_compile

THE = 262  # " the"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Tell me a joke.", "Hi", "What is the capital of France, and why is it there?", "Write a poem about",
           "Once upon a time", "Q: 2+2? A:", "The weather today is", "List three colors:"] * 4

pytestmark = pytest.mark.usefixtures("one_thread")


def count_the(prompts, responses):  # the reward_fn of the learning test: "tests.test_ppo:count_the"
    return [float(r.count(" the")) for r in responses]


def wrong_length(prompts, responses):
    return [0.0] * (len(responses) + 1)


def nan_score(prompts, responses):
    return [float("nan")] * len(responses)


def biased_gpt(token, logit, heads=None, seed=0, dropout=0.0, eos_logit=None):
    """A tiny random GPT that already says `token` often: its final LayerNorm bias u and the token's (tied)
    embedding w = u * logit / |u|^2 give that token a logit of about `logit`, every other one ~0; with eos_logit, EOS
    too (responses of mixed lengths)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, heads=heads or {}, dropout=dropout))
    with torch.no_grad():
        u = torch.randn(32)
        u = u / u.norm() * 4
        model.ln_f.bias.copy_(u)
        model.wte.weight[token] = u * logit / 16
        if eos_logit is not None:
            model.wte.weight[EOS] = u * eos_logit / 16
    return model


def save_sft(path, model):
    save_checkpoint(str(path), kind="sft", model_config=asdict(model.config), model=model.state_dict())
    return str(path)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return str(path)


def run_cfg(tmp_path, data, **kw):
    base = dict(init_from=save_sft(tmp_path / "sft.pt", biased_gpt(THE, 5.0)), reward_model="", data=data,
                eval_split="train", out_dir=str(tmp_path / "out"), device="cpu", max_prompt_len=16, max_new_tokens=8,
                batch_size=16, minibatch_size=8, ppo_epochs=2, learning_rate=1e-3, penalize_missing_eos=False,
                max_iters=6, eval_interval=1000, eval_size=0, target_kl=0.0, init_kl_coef=0.02)
    return Config(**{**base, **kw})


def read_log(out_dir):
    """The per-iteration rows of out_dir/log.jsonl (not the evaluation rows)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [row for row in map(json.loads, f) if "score" in row]


def zero_scores(prompts, texts, tokens, mask):
    return torch.zeros(len(texts))


# ----------------------------------------------------------------------------- pure functions
def test_truncate_after_eos():
    a, b = 11, 22
    responses = torch.tensor([[a, EOS, EOS, b], [a, b, a, b], [EOS, a, EOS, b], [a, a, b, EOS]])
    mask, has_eos = truncate_after_eos(responses)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, False, True, True]


def test_compute_rewards_score_on_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    logprobs, ref_logprobs = torch.randn(3, 5), torch.randn(3, 5)
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, beta=0.1)
    expected = -0.1 * (logprobs - ref_logprobs) * mask
    for row, last in enumerate([2, 4, 0]):
        expected[row, last] += scores[row]
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(kl, (logprobs - ref_logprobs) * mask)
    assert (rewards[mask == 0] == 0).all()


def naive_gae(rewards, values, length, gamma, lam):
    adv, last = [0.0] * length, 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_naive_loop_with_variable_lengths():
    torch.manual_seed(0)
    lengths = [5, 2, 7, 1]
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).long()
    rewards, values = torch.randn(4, 7), torch.randn(4, 7)  # garbage on padding: must be ignored
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        expected = naive_gae(rewards[i].tolist(), values[i].tolist(), n, 0.9, 0.8)
        torch.testing.assert_close(adv[i, :n], torch.tensor(expected))
        torch.testing.assert_close(ret[i, :n], torch.tensor(expected) + values[i, :n])
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_whiten_ignores_padding():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    x = torch.randn(3, 4) * 5 + 3
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert abs(real.mean().item()) < 1e-5
    assert abs(real.var(unbiased=False).item() - 1) < 1e-4
    y = x.clone()
    y[mask == 0] = 1000.0
    torch.testing.assert_close(whiten(y, mask), w)
    assert (w[mask == 0] == 0).all()
    # shift_mean=False (whiten_rewards): the same scaling, the mean kept
    x_real = x[mask.bool()].double()
    kept = whiten(x, mask, shift_mean=False)[mask.bool()].double()
    torch.testing.assert_close(kept, x_real / x_real.std(unbiased=False) + x_real.mean() * (1 - 1 / x_real.std(
        unbiased=False)), atol=1e-4, rtol=1e-4)
    assert abs(kept.mean() - x_real.mean()) < 1e-4 and abs(kept.var(unbiased=False) - 1) < 1e-3


def test_ppo_losses_known_values():
    # token 0: advantage 1, ratio 1.5 -> clipped to 1.2: loss max(-1.5, -1.2) = -1.2
    # token 1: advantage -1, ratio 0.5 -> clipped 0.8: loss max(0.5, 0.8) = 0.8;  token 2: padding
    # token 2: advantage -1, ratio 1.5 -> clipped 1.2: loss max(1.5, 1.2) = 1.5, the unclipped branch: not counted
    # in clipfrac although the ratio is outside the clip range;  token 3: padding
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.5, 7.0]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, -1.0, 5.0]])
    values, old_values = torch.tensor([[1.0, 0.1, 0.0, 9.0]]), torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    pg, vf, st = ppo_losses(logprobs, old, adv, values, old_values, returns, mask, 0.2, 0.2)
    assert pg.item() == pytest.approx((-1.2 + 0.8 + 1.5) / 3)
    # token 0: V 1 -> clipped 0.2, R 1: 0.5 * max(0, 0.64) (clipped taken); token 1: V 0.1 (inside the clip), R 0:
    # 0.5 * 0.01; token 2: V 0 = R 0
    assert vf.item() == pytest.approx((0.32 + 0.005 + 0.0) / 3)
    assert st["clipfrac"].item() == pytest.approx(2 / 3) and st["vf_clipfrac"].item() == pytest.approx(1 / 3)
    expected_kl = ((1.5 - 1 - math.log(1.5)) * 2 + (0.5 - 1 - math.log(0.5))) / 3
    assert st["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    # at ratio 1: pg_loss = -mean(advantages over the real tokens), nothing clipped, approx_kl exactly 0
    pg, _, st = ppo_losses(old, old, adv, values, old_values, returns, mask)
    assert pg.item() == pytest.approx(1 / 3) and st["approx_kl"].item() == 0.0 and st["ratio"].item() == 1.0
    assert st["clipfrac"].item() == 0.0


def test_adaptive_kl_controller():
    n, horizon = 256, 10000
    up = AdaptiveKLController(0.1, 6.0, horizon)
    up.update(9.0, n)  # KL/target - 1 = 0.5, clipped to 0.2
    assert up.beta == pytest.approx(0.1 * (1 + 0.2 * n / horizon))
    down = AdaptiveKLController(0.1, 6.0, horizon)
    down.update(1.0, n)  # -0.83 clipped to -0.2
    assert down.beta == pytest.approx(0.1 * (1 - 0.2 * n / horizon))
    small = AdaptiveKLController(0.1, 6.0, horizon)
    small.update(6.6, n)  # 0.1: inside the clip
    assert small.beta == pytest.approx(0.1 * (1 + 0.1 * n / horizon))
    fixed = AdaptiveKLController(0.1, 0.0, horizon)
    fixed.update(100.0, n)
    assert fixed.beta == 0.1
    restored = AdaptiveKLController(0.5, 6.0, horizon)
    restored.load_state_dict(up.state_dict())
    assert restored.beta == up.beta


# ----------------------------------------------------------------------------- rollout / training invariants
@pytest.mark.parametrize("dtype,compiled,fp32", [("float32", False, True), ("bfloat16", False, True),
                                                 ("bfloat16", False, False), ("float32", True, True)])
def test_first_minibatch_ratio_is_one_and_rollout_logprobs_match(dtype, compiled, fp32):
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else nullcontext
    s = cpu_setup(autocast=autocast)
    policy = fp32_heads(biased_gpt(THE, 4.0, heads={"value": 1}, eos_logit=6.5), fp32)  # as main with fp32_heads
    ac = ActorCritic(policy).eval()  # as in main: eval mode = dropout off
    ref = fp32_heads(biased_gpt(THE, 4.0), fp32)
    ref.load_state_dict(policy.state_dict(), strict=False)  # the same weights: KL must be exactly 0
    ref.requires_grad_(False)  # frozen, as in main (on CPU this once changed matmul's kernel choice)
    cfg = Config(temperature=0.7, ppo_epochs=2, minibatch_size=4, grad_accum=2, learning_rate=1e-3,
                 max_prompt_len=16, max_new_tokens=10)
    prompts = PROMPTS[:8]  # lengths 1..15 tokens: left padding
    r = rollout(policy, zero_scores, prompts, cfg, torch.Generator().manual_seed(0), autocast)
    assert r["mask"][:, :r["P"]].min() == 0  # some prompts really are left-padded
    assert len(set(r["response_mask"].sum(1).tolist())) > 2  # responses of several lengths
    fwd = torch.compile(ac) if compiled else ac  # as main does with --compile=True: one module for both forwards
    epochs = minibatches(8, 0, cfg, s)  # as main: drawn first, 2 minibatches of 2 micro-batches per epoch
    f = forward_rollout(fwd, ref, r, cfg.temperature, epochs[0], autocast)  # the first epoch's micro-batches
    rm = r["response_mask"].bool()
    # The sampler's logprobs (KV cache, temperature 0.7, left padding) equal a full forward's, up to kernel noise.
    # bf16: other kernels and shapes in the trunk; the fp32 heads take away the logits' own rounding
    # (test_model shows the GPT-2-sized case)
    tol = 1e-5 if dtype == "float32" else 1e-2 if fp32 else 0.1
    assert (r["logprobs"] - f["logprobs"])[rm].abs().max() < tol
    if compiled:  # the reference runs eager: policy == reference to rounding only
        torch.testing.assert_close(f["logprobs"][rm], f["ref_logprobs"][rm], atol=1e-5, rtol=0)
    else:
        assert torch.equal(f["logprobs"][rm], f["ref_logprobs"][rm])  # policy == reference: KL exactly 0
    torch.manual_seed(0)
    batch = dict(tokens=r["tokens"], mask=r["mask"], response_mask=r["response_mask"], old_logprobs=f["logprobs"],
                 old_values=f["values"], advantages=whiten(torch.randn_like(f["values"]), r["response_mask"]),
                 returns=torch.randn_like(f["values"]))
    opt = torch.optim.AdamW(ac.parameters(), lr=1e-3)
    stats = ppo_update(fwd, opt, batch, r["P"], cfg, s, epochs)
    assert len(stats) == 2 * 8 // 4
    # approx_kl sums ratio - 1 - log(ratio) over the tokens: exactly 0 only if every token's ratio is exactly 1. The
    # mean ratio adds the micro-batches' shares of the token count (e.g. 7/17 + 10/17), which fp32 rounds
    assert stats[0]["approx_kl"] == 0.0 and stats[0]["clipfrac"] == 0.0 and stats[0]["ratio"] == pytest.approx(1.0)
    assert stats[1]["approx_kl"] > 0  # after one optimizer step the policy has moved


def test_grad_checkpointing_in_eval_mode_same_grads(monkeypatch):
    """PPO trains in eval mode (dropout off): the flag must still recompute each block in backward (every MLP runs
    twice) and give the same gradients as a plain backward."""
    n, mlp_forward = [0], model.MLP.forward
    monkeypatch.setattr(model.MLP, "forward", lambda self, x: n.__setitem__(0, n[0] + 1) or mlp_forward(self, x))
    tokens = torch.randint(0, 50000, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :5] = 0
    response_mask = (torch.arange(8)[None] < torch.tensor([[8], [3], [1]])).long()
    grads, calls = [], []
    for flag in (False, True):
        policy = biased_gpt(THE, 4.0, heads={"value": 1})
        policy.grad_checkpointing = flag
        ac = ActorCritic(policy).eval()
        n[0] = 0
        logprobs, values, _ = ac(tokens, mask, response_mask, 12, 0.7)
        (logprobs.sum() + values.sum()).backward()
        grads.append({k: p.grad.clone() for k, p in ac.named_parameters()})
        calls.append(n[0])
    assert calls == [2, 4]  # 2 blocks, recomputed with the flag
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5), k


@pytest.mark.parametrize("n_response", [2, 9])
def test_kl_is_exactly_zero_when_policy_is_reference(n_response):
    # The reference is frozen (requires_grad False), the policy is not: the same weights must still give the same
    # logprobs bit for bit, responses of mixed lengths. (The reference must run the policy's code, response_logprobs:
    # e.g. its LM head on the whole strided (B, N, C) slice would make torch.matmul pick bmm, not mm, by
    # requires_grad, and with N = 2 those round differently.)
    policy = biased_gpt(THE, 4.0, heads={"value": 1})
    ref = biased_gpt(THE, 4.0)
    ref.load_state_dict(policy.state_dict(), strict=False)
    ref.requires_grad_(False)
    torch.manual_seed(0)
    tokens = torch.randint(0, 50000, (4, 32 + n_response))
    tokens[:, 32::2] = THE  # likely tokens: their own logit's rounding shows in their logprob
    mask = torch.ones_like(tokens)
    mask[1, :7] = 0
    response_mask = (torch.arange(n_response)[None] < torch.tensor([[n_response], [1], [2], [n_response]])).long()
    r = dict(tokens=tokens, mask=mask, response_mask=response_mask, P=32)
    f = forward_rollout(ActorCritic(policy), ref, r, 0.7, [torch.arange(4).split(4)])  # 1 minibatch, 1 micro-batch
    assert torch.equal(f["logprobs"], f["ref_logprobs"])


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_forward_runs_the_lm_head_only_at_real_tokens_and_equals_a_full_forward(critic):
    """forward_rollout, the LM head run only at the real response tokens (response_logprobs) of shuffled
    micro-batches, gives what a naive forward of the whole (B, N) batch in row order gives with the padding zeroed:
    the logprobs, the reference's, the entropy summed over the real tokens, and the values (at every position, as
    before: GAE masks them), to fp32 rounding. Responses of mixed lengths, one without EOS, one whose first token is
    EOS, garbage after each EOS; left-padded prompts. The LM head sees only the real tokens' rows."""
    torch.manual_seed(0)
    B, P, N, T = 6, 16, 8, 0.7
    policy = biased_gpt(THE, 4.0, heads={"value": 1} if critic == "shared" else None, eos_logit=6.5)
    values_from = policy if critic == "shared" else biased_gpt(THE, 1.0, heads={"value": 1}, seed=1)
    ref = biased_gpt(THE, 3.0, seed=2).requires_grad_(False)  # another model: its logprobs differ
    tokens = torch.randint(0, 50000, (B, P + N))  # no EOS but those placed below
    mask = torch.ones_like(tokens)
    mask[1, :5] = mask[4, :11] = 0
    for row, at in enumerate([None, 0, 3, 7, 1, 5]):  # each response's EOS: row 0 has none, row 1 says it first
        if at is not None:
            tokens[row, P + at] = EOS
    response_mask, _ = truncate_after_eos(tokens[:, P:])
    assert response_mask.sum(1).tolist() == [8, 1, 4, 8, 2, 6]
    with torch.no_grad():  # naive: every (B, N) position through the LM head, then the padding zeroed
        full = lambda m: m.lm_head(m(tokens, mask)[:, P - 1:-1]).float() / T  # (B, N, V)
        logits, ref_logits = full(policy), full(ref)
        pick = lambda lg: lg.log_softmax(-1).gather(-1, tokens[:, P:, None]).squeeze(-1) * response_mask
        entropy = (-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1) * response_mask).sum()
        values = values_from.heads["value"](values_from(tokens, mask)[:, P - 1:-1]).squeeze(-1)
    head_rows = []
    hook = policy.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(tuple(args[0].shape)))
    perm = torch.randperm(B)
    r = dict(tokens=tokens, mask=mask, response_mask=response_mask, P=P)
    f = forward_rollout(ActorCritic(policy, None if critic == "shared" else values_from), ref, r, T, [perm.split(2)])
    hook.remove()
    assert head_rows == [(int(response_mask[idx].sum()), 32) for idx in perm.split(2)]
    torch.testing.assert_close(f["logprobs"], pick(logits), atol=1e-5, rtol=0)
    torch.testing.assert_close(f["ref_logprobs"], pick(ref_logits), atol=1e-5, rtol=0)
    assert (f["logprobs"][response_mask == 0] == 0).all() and (f["ref_logprobs"][response_mask == 0] == 0).all()
    assert (f["logprobs"] - f["ref_logprobs"]).abs().max() > 0.1  # the two models are told apart
    torch.testing.assert_close(f["values"], values, atol=1e-5, rtol=0)
    assert values.abs().min() > 0  # a value head that is not 0: the comparison can fail
    assert f["entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)


def test_missing_eos_penalty_and_reward_fn_sees_text_without_eos():
    policy = biased_gpt(EOS, 9.5)  # says EOS about half the time
    seen = []

    def fn(prompts, responses):
        seen.extend(responses)
        return [5.0] * len(responses)

    scorer = lambda prompts, texts, tokens, mask: torch.tensor(fn(prompts, texts))
    cfg = Config(max_prompt_len=16, max_new_tokens=3, penalize_missing_eos=True, missing_eos_penalty=-1.0)
    r = rollout(policy, scorer, PROMPTS[:16], cfg, torch.Generator().manual_seed(0))
    has_eos = (r["tokens"][:, r["P"]:] == EOS).any(1)
    assert 0 < has_eos.sum() < 16  # both kinds present
    assert r["scores"].tolist() == [5.0 if e else -1.0 for e in has_eos.tolist()]
    assert all("<|endoftext|>" not in text for text in seen)
    no_penalty = rollout(policy, scorer, PROMPTS[:16], Config(max_prompt_len=16, max_new_tokens=3,
                                                              penalize_missing_eos=False),
                         torch.Generator().manual_seed(0))
    assert (no_penalty["scores"] == 5.0).all()


def test_reward_model_score_read_at_eos(tmp_path):
    torch.manual_seed(1)
    rm = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, heads={"reward": 1}))
    path = tmp_path / "rm.pt"
    save_checkpoint(str(path), kind="reward", model_config=asdict(rm.config), model=rm.state_dict())
    score_fn, rm = make_scorer(reward_model=str(path))
    policy = biased_gpt(EOS, 9.5)
    r = rollout(policy, score_fn, PROMPTS[:8], Config(max_prompt_len=16, max_new_tokens=6, penalize_missing_eos=False),
                torch.Generator().manual_seed(1))
    for i in range(8):
        real = r["tokens"][i][r["mask"][i].bool()]  # prompt + response up to and incl. its first EOS, unpadded
        with torch.no_grad():
            h = rm(real[None])[:, -1]
            expected = rm.heads["reward"](h).squeeze()
        torch.testing.assert_close(r["scores"][i], expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- reward_fn errors
def test_bad_reward_fn_outputs():
    with pytest.raises(ValueError, match=r"reward_fn 'f' returned 3 scores for 2 responses"):
        check_scores([1.0, 2.0, 3.0], 2, "f")
    with pytest.raises(ValueError, match=r"reward_fn 'f': score 1 is nan, not a finite number"):
        check_scores([1.0, float("nan")], 2, "f")
    with pytest.raises(ValueError, match=r"reward_fn 'f': score 0 is 'good' \(str\), not a number"):
        check_scores(["good", 1.0], 2, "f")
    with pytest.raises(ValueError, match=r"reward_fn 'f' returned a float; expected a list of 2 floats"):
        check_scores(1.0, 2, "f")
    with pytest.raises(ValueError, match=r"score 0 is True \(bool\), not a number"):
        check_scores([True, 1.0], 2, "f")
    assert check_scores(torch.tensor([1.0, 2.0]), 2, "f").tolist() == [1.0, 2.0]


def test_bad_reward_fn_paths():
    with pytest.raises(ValueError, match=r"reward_fn 'nomodule:f': cannot import module 'nomodule'"):
        load_reward_fn("nomodule:f")
    with pytest.raises(ValueError, match=r"reward_fn 'tests.test_ppo:missing': module 'tests.test_ppo' has no "):
        load_reward_fn("tests.test_ppo:missing")
    with pytest.raises(ValueError, match=r"reward_fn 'count_the': expected 'module:function'"):
        load_reward_fn("count_the")
    assert load_reward_fn("tests.test_ppo:count_the")([""], [" the the"]) == [2.0]


def test_bad_reward_fn_stops_training(tmp_path, prompts_file):
    with pytest.raises(RunError, match="step 0: reward_fn 'tests.test_ppo:nan_score': score 0 is nan"):
        main(run_cfg(tmp_path, prompts_file, reward_fn="tests.test_ppo:nan_score", max_iters=1))
    with pytest.raises(RunError, match="step 0: reward_fn 'tests.test_ppo:wrong_length' returned 17 scores for 16"):
        main(run_cfg(tmp_path, prompts_file, reward_fn="tests.test_ppo:wrong_length", max_iters=1))


# ----------------------------------------------------------------------------- learning, end to end
def test_learning_with_reward_fn(tmp_path, prompts_file):
    cfg = run_cfg(tmp_path, prompts_file, reward_fn="tests.test_ppo:count_the")
    out = main(cfg)
    log = read_log(cfg.out_dir)
    first, last = log[0]["score"], sum(row["score"] for row in log[-2:]) / 2
    assert last > first + 1.0, (first, last)  # " the" per response: clearly more
    assert 0 < out["kl"] < 15  # nats per 8-token response: it moved, within reason
    assert all(math.isfinite(row["vf_loss"]) and row["approx_kl"] < 0.5 for row in log)
    assert os.path.exists(os.path.join(cfg.out_dir, "hf", "model.safetensors"))
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), "ppo")
    assert "heads.value.weight" in ckpt["model"] and ckpt["critic"] is None  # shared critic with a reward_fn


def rigged_reward_model(path):
    """A random tiny reward model, except that a final " the" scores high, saved as reward.py would."""
    torch.manual_seed(2)
    rm = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, heads={"reward": 1}))
    with torch.no_grad():
        d = torch.randn(32)
        d = d / d.norm()
        rm.wte.weight[THE] += 3 * d
        rm.heads["reward"].weight.copy_(d[None])
    save_checkpoint(str(path), kind="reward", model_config=asdict(rm.config), model=rm.state_dict())
    return str(path)


def test_learning_with_reward_model(tmp_path, prompts_file):
    # PPO must raise the rigged reward model's score. Its reward is sparse (a final " the"): in 6 iterations at lr
    # 1e-3 a third of seeds found it too late, and another CPU's rounding samples as another seed would; at these
    # settings the gain over seeds 1-14 and 1337 was 2.0 to 5.6, four times this bound or more
    path = rigged_reward_model(tmp_path / "rm.pt")
    cfg = run_cfg(tmp_path, prompts_file, reward_model=str(path), eval_size=16, eval_interval=1000, max_iters=10,
                  learning_rate=2e-3)
    out = main(cfg)
    evals = eval_log(cfg.out_dir)
    assert [row["step"] for row in evals] == [0, 10]  # before training and after the last (10th) step
    assert evals[1]["eval_score"] > evals[0]["eval_score"] + 0.5, evals
    assert evals[0]["eval_kl"] == 0.0 and evals[1]["eval_kl"] < 15
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), "ppo")
    assert ckpt["critic"] is not None and "heads.value.weight" in ckpt["critic"]  # separate critic from the RM
    assert out["eval_score"] == evals[1]["eval_score"]


def test_resume_is_exact(tmp_path, prompts_file):
    # a cosine schedule over lr_decay_iters, which the stops at 2 and 3 must keep
    kw = dict(reward_fn="tests.test_ppo:count_the", batch_size=4, minibatch_size=2, max_new_tokens=6,
              target_kl=3.0, kl_horizon=100, min_lr_ratio=0.1, lr_decay_iters=4)
    full = run_cfg(tmp_path, prompts_file, max_iters=4, **kw)
    main(full)
    part = run_cfg(tmp_path, prompts_file, max_iters=2, out_dir=str(tmp_path / "part"), **kw)
    main(part)
    for stop in (3, 4):  # resumed twice: a resumed run's checkpoint must resume too
        main(run_cfg(tmp_path, prompts_file, max_iters=stop, out_dir=part.out_dir, **{**kw, "init_from": "resume"}))
    a = load_checkpoint(os.path.join(full.out_dir, "ckpt.pt"), "ppo")
    b = load_checkpoint(os.path.join(part.out_dir, "ckpt.pt"), "ppo")
    assert a["step"] == b["step"] == 4
    assert a["kl_ctl"]["beta"] == b["kl_ctl"]["beta"] != 0.02
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["score"] for r in read_log(full.out_dir)] == [r["score"] for r in read_log(part.out_dir)]


def test_torchrun_two_processes_equal_one_process(tmp_path, prompts_file):
    """2 ranks x 4 prompts == 1 process x 8 prompts: the same rollouts (the log's scores and KL are means over the
    global batch), the same adaptive beta and, after 3 iterations of 2 epochs, the same policy and critic weights.
    The reward model + separate critic path, so DDP wraps two GPTs; one minibatch per epoch (see ppo.py)."""
    rm = rigged_reward_model(tmp_path / "rm.pt")
    one = run_cfg(tmp_path, prompts_file, reward_model=rm, max_iters=3, batch_size=8, minibatch_size=8,
                  target_kl=1.0, kl_horizon=50, out_dir=str(tmp_path / "one"))
    args = [f"--{k}={getattr(one, k)}" for k in ("init_from", "reward_model", "data", "eval_split", "max_prompt_len",
                                                 "max_new_tokens", "ppo_epochs", "learning_rate", "max_iters",
                                                 "eval_size", "target_kl", "kl_horizon", "init_kl_coef",
                                                 "penalize_missing_eos")]
    args += [f"--out_dir={tmp_path / 'ddp'}", "--device=cpu", "--batch_size=4", "--minibatch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = run_torchrun(["--nproc_per_node=2", "ppo.py", *args], env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    main(one)
    logs = [read_log(tmp_path / d) for d in ("one", "ddp")]
    assert [row["step"] for row in logs[1]] == [0, 1, 2]
    for x, y in zip(*logs, strict=True):
        for k in ("score", "kl", "response_len", "beta", "vf_loss", "approx_kl", "entropy"):
            assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (k, x[k], y[k])
    assert logs[0][-1]["beta"] != 0.02  # the controller moved, identically
    a, b = (load_checkpoint(str(tmp_path / d / "ckpt.pt"), "ppo") for d in ("one", "ddp"))
    for part in ("model", "critic"):
        for k in a[part]:
            assert torch.allclose(a[part][k], b[part][k], atol=1e-5, rtol=0), (part, k)
    assert os.path.exists(tmp_path / "ddp" / "hf" / "config.json")


def test_frozen_bf16_reference_and_reward_model(tmp_path, prompts_file):
    """frozen_bf16: reference and reward model held in bf16 (half their memory) while the critic, copied from the
    reward model before the cast, trains in fp32; the first KL is then small but no longer exactly 0."""
    rm = rigged_reward_model(tmp_path / "rm.pt")
    with pytest.raises(ValueError, match="frozen_bf16 needs dtype='bfloat16'"):
        main(run_cfg(tmp_path, prompts_file, reward_model=rm, frozen_bf16=True, max_iters=1))
    cfg = run_cfg(tmp_path, prompts_file, reward_model=rm, frozen_bf16=True, dtype="bfloat16", max_iters=2)
    main(cfg)
    log = read_log(cfg.out_dir)
    assert 0 < abs(log[0]["kl"]) < 0.5 and all(math.isfinite(row["vf_loss"]) for row in log)
    ckpt = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), "ppo")
    assert all(v.dtype == torch.float32 for v in ckpt["critic"].values() if v.is_floating_point())


def test_compile_trains_like_eager(tmp_path, prompts_file, monkeypatch):
    """--compile=True reaches torch.compile (the policy+critic forward of the rollout and the update) and computes
    what eager computes: the same first rollout (the sampler stays eager), the first ratio exactly 1, the same losses
    and gradient norm to rounding. Not the weights after Adam steps: Adam turns rounding noise in a near-zero
    gradient into an lr-sized step, and compiled kernels round differently on different CPUs."""
    kw = dict(reward_fn="tests.test_ppo:count_the", batch_size=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=6,
              max_iters=1)
    eager = run_cfg(tmp_path, prompts_file, out_dir=str(tmp_path / "eager"), **kw)
    main(eager)
    compiled = spy_on_compile(monkeypatch)
    comp = run_cfg(tmp_path, prompts_file, out_dir=str(tmp_path / "compiled"), compile=True, **kw)
    main(comp)
    assert len(compiled) == 1 and isinstance(compiled[0], ActorCritic)
    (a,), (b,) = read_log(eager.out_dir), read_log(comp.out_dir)
    assert a["score"] == b["score"] and b["ratio"] == 1.0 and b["approx_kl"] == 0.0
    for k in ("pg_loss", "vf_loss", "grad_norm", "entropy"):
        assert abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])), (k, a[k], b[k])


@pytest.mark.parametrize("rows_interact", [False, True])
def test_main_first_ratio_is_one_kl_zero_and_dropout_off(tmp_path, prompts_file, monkeypatch, rows_interact):
    """Through main, from an SFT checkpoint trained with dropout 0.1, on responses of mixed lengths in 2 micro-batches:
    in the first minibatch every token's ratio is exactly 1 (old logprobs come from the same forward as the update's,
    not from the sampler, whose logprobs differ by rounding), and every token's KL to the reference is exactly 0
    (policy == reference). Dropout left on would break both. The logged means cannot show this (a ratio of 1 + 1e-6
    averages to 1.0 in fp32), so the test watches the per-token values ppo_losses and compute_rewards receive.
    rows_interact: every head adds to each row of its output a thousandth of the batch's mean row, so a row's result
    depends on the other rows of its batch, as a kernel's rounding may (CPU kernels happen not to; no kernel library
    promises it): the ratio is still exactly 1 only because the old logprobs come from the first epoch's own
    micro-batches, the same rows together."""
    seen = collections.defaultdict(list)
    real_losses, real_rewards, real_rollout = ppo.ppo_losses, ppo.compute_rewards, ppo.rollout

    def losses(logprobs, old_logprobs, *args, **kw):
        seen["log_ratio"].append((logprobs - old_logprobs).detach())
        return real_losses(logprobs, old_logprobs, *args, **kw)

    def rewards(scores, logprobs, ref_logprobs, mask, beta):
        seen["kl"].append(logprobs - ref_logprobs)
        return real_rewards(scores, logprobs, ref_logprobs, mask, beta)

    monkeypatch.setattr(ppo, "ppo_losses", losses)
    monkeypatch.setattr(ppo, "compute_rewards", rewards)
    monkeypatch.setattr(ppo, "rollout", lambda *a, **kw: seen["rollout"].append(real_rollout(*a, **kw)) or
                        seen["rollout"][-1])
    if rows_interact:
        head = model.Head.forward
        monkeypatch.setattr(model.Head, "forward", lambda self, x: (y := head(self, x)) + 1e-3 * y.detach().mean(0))
    start = biased_gpt(THE, 5.0, dropout=0.1, eos_logit=8.5)
    sft = save_sft(tmp_path / "dropout.pt", start)
    cfg = run_cfg(tmp_path, prompts_file, init_from=sft, reward_fn="tests.test_ppo:count_the", batch_size=8,
                  minibatch_size=8, grad_accum=2, ppo_epochs=1, max_iters=1)
    main(cfg)
    (r,) = seen["rollout"]
    assert len(set(r["response_mask"].sum(1).tolist())) > 2 and 0 < r["has_eos"].sum() < 8  # mixed lengths
    assert len(seen["log_ratio"]) == 2 and all(log_ratio.abs().max() == 0 for log_ratio in seen["log_ratio"])
    assert seen["kl"][0].abs().max() == 0
    (row,) = read_log(cfg.out_dir)
    assert row["approx_kl"] == 0.0 and row["clipfrac"] == 0.0 and row["kl"] == 0.0, row
    assert row["lp_gap"] > 0  # the sampler's logprobs are not the forward's, bit for bit: the test can fail
    if not rows_interact:  # the logged entropy: the mean over the real response tokens, from every position's logits
        with torch.no_grad():
            logits = start.eval().lm_head(start(r["tokens"], r["mask"])[:, r["P"] - 1:-1])  # temperature 1
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)[r["response_mask"].bool()]
        assert row["entropy"] == pytest.approx(entropy.mean().item(), rel=1e-5)


def test_shared_value_head_starts_at_zero(tmp_path):
    """A shared critic's new value head is zero-initialised (lm-human-preferences): every first value is 0. A value
    head the init checkpoint already has (e.g. a PPO checkpoint) keeps its weights."""
    s = cpu_setup()
    cfg = Config(reward_model="", reward_fn="tests.test_ppo:count_the", max_prompt_len=16, max_new_tokens=8)
    sft = save_sft(tmp_path / "sft.pt", biased_gpt(THE, 5.0))
    policy, critic, _, _ = build_models(cfg, s, sft, "shared")
    assert critic is None and policy.heads["value"].weight.abs().sum() == 0 and policy.heads["value"].bias.sum() == 0
    with_head = biased_gpt(THE, 5.0, heads={"value": 1})
    path = tmp_path / "ppo.pt"
    save_checkpoint(str(path), kind="ppo", model_config=asdict(with_head.config), model=with_head.state_dict())
    policy, _, _, _ = build_models(cfg, s, str(path), "shared")
    assert torch.equal(policy.heads["value"].weight, with_head.heads["value"].weight)


def test_evaluation_on_two_ranks_is_the_one_process_evaluation(monkeypatch):
    """The held-out evaluation in global batches with one seed each, every rank its rows of a batch: the sums two
    ranks with batch_size 2 add up (score, KL, response tokens, responses) are the ones one process with batch_size 4
    computes, also when the last batch has fewer prompts than ranks. (Each rank seeded apart, an evaluation changed
    with the number of ranks.)"""
    policy, ref = biased_gpt(THE, 5.0).eval(), biased_gpt(THE, 2.0).eval()
    score_fn, _ = ppo.make_scorer(reward_fn="tests.test_ppo:count_the")
    cfg = Config(max_prompt_len=16, max_new_tokens=6, eval_samples=0, penalize_missing_eos=False)
    prompts = PROMPTS[:9]  # global batches of 4, 4 and 1 prompts
    sums = []  # what each call would all-reduce
    monkeypatch.setattr(ppo, "all_reduce_sum", lambda x, s: sums.append(x.clone()) or x)
    for rank, world_size in ((0, 1), (0, 2), (1, 2)):
        cfg = replace(cfg, batch_size=4 // world_size)
        s = cpu_setup(rank, world_size)
        ppo.evaluate(policy, ref, score_fn, prompts, cfg, s)
    one, two = sums[0], sums[1] + sums[2]
    assert two[3] == one[3] == 9 and two[2] == one[2] and two[0] == one[0]  # responses, their tokens, " the" counts
    assert abs(two[1] - one[1]) <= 1e-4 * abs(one[1]) and one[1] > 0  # the KL: a sum of logprob differences


# ---------------------------------------------------------------------------- logged stats, critic, minibatches
def masked_var(x, mask):
    real = x[mask.bool()].double()
    return real.var(unbiased=False).item()


def test_logged_statistics_are_the_rollouts_and_the_controller_reads_them(tmp_path, prompts_file, monkeypatch):
    """Every logged number of an iteration, recomputed naively from what main handed the pure functions: score (after
    the missing-EOS penalty), KL (nats per response: the k1 sum over each response's tokens, averaged over responses),
    response length, the fraction without EOS, explained variance of the returns by the rollout values, entropy per
    real token, lp_gap (the largest sampler/forward gap over real tokens), the update's stats (means over its
    minibatches), and beta: the one that iteration's rewards used, which the controller then updates from the logged
    KL and the number of responses."""
    seen = collections.defaultdict(list)

    def spy(name, keep):
        real = getattr(ppo, name)

        def wrapper(*args, **kw):
            out = real(*args, **kw)
            seen[name].append(keep(args, out))
            return out
        monkeypatch.setattr(ppo, name, wrapper)

    spy("rollout", lambda a, out: out)
    spy("forward_rollout", lambda a, out: out)
    spy("compute_rewards", lambda a, out: dict(beta=a[4], kl=out[1]))
    spy("gae", lambda a, out: dict(values=a[1], returns=out[1]))
    spy("ppo_losses", lambda a, out: out[2])  # ppo_update adds pg_loss and vf_loss to this dict
    updates, real_update = [], ppo.AdaptiveKLController.update
    monkeypatch.setattr(ppo.AdaptiveKLController, "update",
                        lambda self, kl, n: updates.append((self.beta, kl, n)) or real_update(self, kl, n))
    sft = save_sft(tmp_path / "eos.pt", biased_gpt(THE, 9.0, eos_logit=9.0))  # mixed lengths, " the" often
    cfg = run_cfg(tmp_path, prompts_file, init_from=sft, reward_fn="tests.test_ppo:count_the", batch_size=8,
                  minibatch_size=4, ppo_epochs=2, max_iters=3, penalize_missing_eos=True, missing_eos_penalty=-1.0,
                  target_kl=1.0, kl_horizon=20, init_kl_coef=0.1)
    main(cfg)
    log = read_log(cfg.out_dir)
    assert len(log) == 3 and len(seen["ppo_losses"]) == 3 * 2 * 2  # 2 epochs x 2 minibatches x 1 micro-batch
    close = lambda a, b: a == pytest.approx(float(b), rel=1e-5, abs=1e-6)
    beta = cfg.init_kl_coef
    for i, row in enumerate(log):
        r, f, c, g = seen["rollout"][i], seen["forward_rollout"][i], seen["compute_rewards"][i], seen["gae"][i]
        rm = r["response_mask"]
        has_eos = (r["tokens"][:, r["P"]:] == EOS).any(1)
        assert r["scores"].tolist() == [s if e else -1.0 for s, e in
                                        zip(r["scores"].tolist(), has_eos.tolist())]
        assert close(row["score"], r["scores"].mean())
        assert close(row["kl"], c["kl"].sum(1).mean())  # nats per response
        assert close(row["response_len"], rm.sum() / len(rm))
        assert close(row["no_eos"], 1 - has_eos.float().mean())
        ret, val = g["returns"], g["values"]
        assert row["explained_var"] == pytest.approx(1 - masked_var(ret - val, rm) / masked_var(ret, rm), abs=1e-4)
        assert close(row["entropy"], f["entropy"] / rm.sum())
        assert close(row["lp_gap"], (r["logprobs"] - f["logprobs"]).abs()[rm.bool()].max())
        stats = seen["ppo_losses"][4 * i:4 * i + 4]
        for k in ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "vf_clipfrac", "ratio"):
            assert close(row[k], sum(float(st[k].detach()) for st in stats) / 4), k
        # beta: the one this iteration's rewards used, then updated by the controller from the logged KL
        assert row["beta"] == beta == c["beta"] == updates[i][0]
        assert updates[i][1] == row["kl"] and updates[i][2] == cfg.batch_size
        e = min(max(row["kl"] / cfg.target_kl - 1, -0.2), 0.2)
        beta = beta * (1 + e * cfg.batch_size / cfg.kl_horizon)
    assert len({row["beta"] for row in log}) == 3  # beta moved each time
    assert any(row["explained_var"] != 0 for row in log)  # the values (0 at first: shared critic) have moved


def test_separate_critic_starts_as_the_reward_model_and_trains(tmp_path, prompts_file):
    """critic="separate": a copy of the reward model (trunk and head, the head renamed "value"), so its first values
    are the reward model's scores at every response position; its weights require grad and change with training,
    while the reward model (and the reference) stay frozen."""
    path = rigged_reward_model(tmp_path / "rm.pt")
    s = cpu_setup()
    cfg = Config(reward_model=path, max_prompt_len=16, max_new_tokens=8)
    sft = save_sft(tmp_path / "sft.pt", biased_gpt(THE, 5.0, eos_logit=8.5))
    policy, critic, ref, _ = build_models(cfg, s, sft, "separate")
    rm = scoring.load_reward_model(path)
    r = rollout(policy, zero_scores, PROMPTS[:6], cfg, torch.Generator().manual_seed(0))
    tokens, mask, P, response_mask = r["tokens"], r["mask"], r["P"], r["response_mask"]
    with torch.no_grad():
        _, values, _ = ActorCritic(policy, critic)(tokens, mask, response_mask, P, 1.0)
        expected = rm.heads["reward"](rm(tokens, mask)[:, P - 1:-1]).squeeze(-1)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 0.1  # a non-zero head: a zeroed or fresh value head would differ
    assert all(p.requires_grad for p in critic.parameters()) and not any(p.requires_grad for p in ref.parameters())
    out = run_cfg(tmp_path, prompts_file, reward_model=path, max_iters=1, out_dir=str(tmp_path / "out"))
    main(out)
    trained = load_checkpoint(os.path.join(out.out_dir, "ckpt.pt"), "ppo")["critic"]
    start = {k.replace("heads.reward", "heads.value"): v for k, v in rm.state_dict().items()}
    assert trained.keys() == start.keys()
    moved = [k for k in trained if not torch.equal(trained[k], start[k])]
    assert "heads.value.weight" in moved and "wte.weight" in moved, moved


def test_resume_is_exact_with_a_separate_critic(tmp_path, prompts_file):
    """test_resume_is_exact with a reward model: the separate critic (and its optimizer state) must come back from the
    checkpoint too, not restart from the reward model. With held-out evaluation: a resumed run does not evaluate its
    starting step again (the run it resumes logged that evaluation), and its final evaluation is the uninterrupted
    run's."""
    path = rigged_reward_model(tmp_path / "rm.pt")
    kw = dict(reward_model=path, batch_size=4, minibatch_size=2, max_new_tokens=6, target_kl=3.0, kl_horizon=100,
              eval_size=4)
    full = run_cfg(tmp_path, prompts_file, max_iters=3, **kw)
    main(full)
    part = run_cfg(tmp_path, prompts_file, max_iters=2, out_dir=str(tmp_path / "part"), **kw)
    main(part)
    main(run_cfg(tmp_path, prompts_file, max_iters=3, out_dir=part.out_dir, **{**kw, "init_from": "resume"}))
    a = load_checkpoint(os.path.join(full.out_dir, "ckpt.pt"), "ppo")
    b = load_checkpoint(os.path.join(part.out_dir, "ckpt.pt"), "ppo")
    for part_name in ("model", "critic"):
        for k in a[part_name]:
            assert torch.equal(a[part_name][k], b[part_name][k]), (part_name, k)
    assert [r["vf_loss"] for r in read_log(full.out_dir)] == [r["vf_loss"] for r in read_log(part.out_dir)]
    evals = [eval_log(d) for d in (full.out_dir, part.out_dir)]
    assert [r["step"] for r in evals[0]] == [0, 3] and [r["step"] for r in evals[1]] == [0, 2, 3]
    assert evals[1][-1] == evals[0][-1]


@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_main_whitens_advantages_and_optionally_rewards(tmp_path, prompts_file, monkeypatch, whiten_rewards):
    """The advantages the update sees have mean 0 and variance 1 over the real response tokens (shift_mean=True);
    with whiten_rewards, GAE gets the rewards scaled to variance 1 with their mean kept (lm-human-preferences),
    without it the rewards exactly as compute_rewards made them."""
    seen = collections.defaultdict(list)
    real_rewards, real_gae, real_update = ppo.compute_rewards, ppo.gae, ppo.ppo_update
    monkeypatch.setattr(ppo, "compute_rewards", lambda *a: seen["raw"].append(real_rewards(*a)) or seen["raw"][-1])
    monkeypatch.setattr(ppo, "gae", lambda rewards, *a: seen["gae"].append(rewards) or real_gae(rewards, *a))
    monkeypatch.setattr(ppo, "ppo_update", lambda model, opt, batch, *a: seen["batch"].append(batch) or
                        real_update(model, opt, batch, *a))
    sft = save_sft(tmp_path / "the.pt", biased_gpt(THE, 9.0, eos_logit=9.0))  # " the" often: scores not all 0
    cfg = run_cfg(tmp_path, prompts_file, init_from=sft, reward_fn="tests.test_ppo:count_the", batch_size=8,
                  minibatch_size=8, ppo_epochs=1, max_iters=2, whiten_rewards=whiten_rewards)
    main(cfg)
    for (raw, _), given, batch in zip(seen["raw"], seen["gae"], seen["batch"], strict=True):
        rm = batch["response_mask"]
        adv = batch["advantages"][rm.bool()].double()
        assert abs(adv.mean().item()) < 1e-5 and abs(adv.var(unbiased=False).item() - 1) < 1e-3
        if not whiten_rewards:
            assert torch.equal(given, raw)
            continue
        real = raw[rm.bool()].double()
        expected = (raw.double() - real.mean()) / real.std(unbiased=False) + real.mean()
        torch.testing.assert_close(given.double(), expected * rm, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(given, raw)  # the scaling did something


def test_rollout_on_a_rank_scores_its_own_prompts():
    """shard=(rank, world_size): the rank samples rows rank::world_size of the global batch, and the reward_fn gets
    those rows' prompts with their responses: rank 1 of 2 sees exactly the (prompt, response) pairs of rows 1, 3, 5...
    of the global batch (whose responses test_evaluation_on_two_ranks_is_the_one_process_evaluation shows to be one
    process's)."""
    policy = biased_gpt(THE, 5.0, eos_logit=8.5).eval()
    cfg = Config(max_prompt_len=16, max_new_tokens=6, penalize_missing_eos=False)
    prompts = PROMPTS[:8]  # 8 distinct prompts
    pairs = {}

    def scorer(key):
        def score(ps, texts, tokens, mask):
            pairs[key] = list(zip(ps, texts))
            return torch.zeros(len(texts))
        return score

    r = rollout(policy, scorer("rank1"), prompts, cfg, torch.Generator().manual_seed(3), shard=(1, 2))
    assert pairs["rank1"] == list(zip(prompts[1::2], r["texts"]))
    rollout(policy, scorer("one"), prompts, cfg, torch.Generator().manual_seed(3))
    assert [p for p, _ in pairs["one"]] == prompts


def test_minibatches_are_fresh_permutations_per_epoch_and_step():
    """Each epoch is a permutation of the rollout rows (every row once: no reuse, none left out), cut into minibatches
    of minibatch_size rows, each into grad_accum micro-batches; the epochs of a step are shuffled apart, the shuffles
    of two steps differ, and the same (seed, step, rank) gives the same."""
    cfg = Config(ppo_epochs=3, minibatch_size=8, grad_accum=2)
    s = cpu_setup()
    epochs = minibatches(32, 5, cfg, s)
    assert len(epochs) == 3
    orders = []
    for epoch in epochs:
        assert len(epoch) == 4 and all(len(mb) == 2 and all(len(micro) == 4 for micro in mb) for mb in epoch)
        order = torch.cat([torch.cat(mb) for mb in epoch])
        assert sorted(order.tolist()) == list(range(32))
        orders.append(order.tolist())
    assert len({tuple(o) for o in orders}) == 3  # a new shuffle each epoch
    again = minibatches(32, 5, cfg, s)
    assert [torch.cat([torch.cat(mb) for mb in e]).tolist() for e in again] == orders
    other = minibatches(32, 6, cfg, s)
    assert torch.cat([torch.cat(mb) for mb in other[0]]).tolist() != orders[0]  # another step, another shuffle


def test_ppo_update_gradient_is_the_minibatch_token_mean_of_both_losses():
    """One minibatch of two micro-batches, one epoch: the gradient the optimizer steps with is that of
    pg_loss + vf_coef * vf_loss over the whole minibatch (token means over all its real tokens), computed naively in
    one forward. Catches a dropped or unweighted value loss, a wrong token count, a micro-batch used twice."""
    torch.manual_seed(0)
    policy = biased_gpt(THE, 4.0, heads={"value": 1})
    with torch.no_grad():
        policy.heads["value"].weight.normal_()
    ac = ActorCritic(policy).eval()
    B, P, N = 6, 8, 5
    tokens = torch.randint(0, 50000, (B, P + N))
    mask = torch.ones_like(tokens)
    mask[2, :3] = 0
    response_mask = (torch.arange(N)[None] < torch.tensor([5, 2, 4, 1, 5, 3])[:, None]).long()
    with torch.no_grad():
        old_logprobs, old_values, _ = ac(tokens, mask, response_mask, P, 0.7)
    batch = dict(tokens=tokens, mask=mask, response_mask=response_mask, old_logprobs=old_logprobs,
                 old_values=old_values, advantages=torch.randn(B, N) * response_mask,
                 returns=torch.randn(B, N) * response_mask)
    cfg = Config(ppo_epochs=1, minibatch_size=6, grad_accum=2, vf_coef=0.3, temperature=0.7, grad_clip=0.0)
    # naive: the whole minibatch in one forward
    logprobs, values, _ = ac(tokens, mask, response_mask, P, 0.7)
    pg, vf, _ = ppo.ppo_losses(logprobs, old_logprobs, batch["advantages"], values, old_values, batch["returns"],
                               response_mask, cfg.cliprange, cfg.cliprange_value)
    (pg + cfg.vf_coef * vf).backward()
    expected = {k: p.grad.clone() for k, p in ac.named_parameters()}
    ac.zero_grad(set_to_none=True)

    class Recorder:  # an optimizer that records the gradients it is asked to step with
        param_groups, got = [], None

        def step(self):
            Recorder.got = {k: p.grad.clone() for k, p in ac.named_parameters()}

        def zero_grad(self, set_to_none=True):
            ac.zero_grad(set_to_none=set_to_none)

    perm = torch.tensor([4, 1, 5, 0, 3, 2])  # shuffled rows, micro-batches of 3
    stats = ppo_update(ac, Recorder(), batch, P, cfg, cpu_setup(), [[perm.split(3)]])
    assert len(stats) == 1 and stats[0]["ratio"] == pytest.approx(1.0)
    assert stats[0]["vf_loss"] == pytest.approx(vf.item(), rel=1e-5)
    assert vf.item() > 0.1 and expected["policy.heads.value.weight"].abs().sum() > 0  # the value loss matters here
    for k in expected:  # to rounding: micro-batches of shuffled rows vs one forward (norms, not elementwise)
        assert (Recorder.got[k] - expected[k]).norm() <= 1e-4 * expected[k].norm() + 1e-7, k


def test_evaluation_kl_is_summed_over_each_response(monkeypatch):
    """eval_kl: per response, the sum over its real tokens of log pi - log ref (a full forward of each model, naive),
    averaged over responses; eval_score and eval_response_len are the rollout's means."""
    policy, ref = biased_gpt(THE, 9.0, eos_logit=8.5).eval(), biased_gpt(THE, 2.0, eos_logit=6.0).eval()
    score_fn, _ = ppo.make_scorer(reward_fn="tests.test_ppo:count_the")
    cfg = Config(max_prompt_len=16, max_new_tokens=6, eval_samples=0, penalize_missing_eos=False, batch_size=4,
                 temperature=0.8)
    rollouts, real_rollout = [], ppo.rollout
    monkeypatch.setattr(ppo, "rollout", lambda *a, **kw: rollouts.append(real_rollout(*a, **kw)) or rollouts[-1])
    ev = ppo.evaluate(policy, ref, score_fn, PROMPTS[:8], cfg, cpu_setup())
    kls, scores, lengths = [], [], []
    for r in rollouts:
        P, rm = r["P"], r["response_mask"]
        with torch.no_grad():
            lp = lambda m: (m.lm_head(m(r["tokens"], r["mask"])[:, P - 1:-1]) / 0.8).log_softmax(-1).gather(
                -1, r["tokens"][:, P:, None]).squeeze(-1)
            kls += ((lp(policy) - lp(ref)) * rm).sum(1).tolist()
        scores += r["scores"].tolist()
        lengths += rm.sum(1).tolist()
    assert len(kls) == 8 and len(set(lengths)) > 1 and sum(scores) > 0
    assert ev["eval_kl"] == pytest.approx(sum(kls) / 8, rel=1e-4) and abs(ev["eval_kl"]) > 0.01
    assert ev["eval_score"] == pytest.approx(sum(scores) / 8) and ev["eval_response_len"] == pytest.approx(
        sum(lengths) / 8)


def test_held_out_prompts_come_from_the_eval_split(tmp_path):
    """load_data: training prompts from data_split, the first eval_size held-out prompts from eval_split (a data
    folder's test.jsonl), never the training ones."""
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": f"train {i}"}) + "\n" for i in range(6)))
    (folder / "test.jsonl").write_text("".join(json.dumps({"prompt": f"test {i}"}) + "\n" for i in range(5)))
    cfg = Config(data=str(folder), reward_model="", reward_fn="tests.test_ppo:count_the", eval_size=3)
    prompts, eval_prompts = ppo.load_data(cfg, cpu_setup())
    assert sorted(prompts) == [f"train {i}" for i in range(6)]
    assert eval_prompts == ["test 0", "test 1", "test 2"]


def test_missing_eos_penalty_spares_an_eos_at_the_last_allowed_token(monkeypatch):
    """The penalty replaces the score of a response without EOS only: not of one whose EOS is its last allowed token
    (a full-length response that did end), nor of one that ended early. The sampler is replaced by a fixed batch so
    the three cases are certain: EOS at the last of N positions, EOS early (then padding), no EOS at all."""
    a, b = 11, 22
    responses = torch.tensor([[a, b, EOS], [a, EOS, EOS], [a, b, a]])
    fixed = dict(tokens=torch.cat([torch.full((3, 2), 5), responses], 1), mask=torch.ones(3, 5, dtype=torch.long), P=2,
                 response_mask=torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]]), logprobs=torch.zeros(3, 3),
                 texts=["x", "y", "z"])
    monkeypatch.setattr(ppo, "sample_responses", lambda *a, **kw: dict(fixed))
    cfg = Config(max_prompt_len=16, max_new_tokens=3, penalize_missing_eos=True, missing_eos_penalty=-7.0)
    r = rollout(None, lambda ps, texts, tokens, mask: torch.tensor([5.0, 6.0, 8.0]), ["p", "q", "s"], cfg,
                torch.Generator().manual_seed(0))
    assert r["has_eos"].tolist() == [True, True, False]
    assert r["scores"].tolist() == [5.0, 6.0, -7.0]
    assert r["response_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
