"""ilql.py: hand-checked indexing, every loss term against a naive per-token loop, Q targets read from the target
heads, Polyak targets, ILQL decoding (fp32 heads under bf16), learning a one-token preference, exact resume, reward
plumbing, and one 2-process torchrun run."""

import json
import math
import os
import statistics
import sys
import types
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import data
import ilql
import scoring
from common import load_checkpoint, load_model, make_optimizer, parse_config, save_checkpoint
from model import EOS, GPT, GPTConfig, generate
from sample import ilql_logits_fn
from tests.helpers import assert_same_weights, eval_log, spy_on_compile, torchrun, train_log, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "data"
V = 50257
TINY = dict(init_from="scratch", n_layer=2, n_head=2, n_embd=32, block_size=32, max_prompt_len=16, max_len=24,
            data_format="offline", eval_split="", device="cpu", warmup_iters=0, top_k=0)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0, n_embd=32):
    """A scratch GPT with ILQL's heads whose targets differ from the online Q heads (as after training), so a value
    read from the wrong heads shows."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=n_embd, heads=ilql.ilql_heads(V)))
    ilql.init_targets(model)
    with torch.no_grad():
        for name in ilql.TARGETS:
            for p in model.heads[name].parameters():
                p.add_(torch.randn_like(p) * 0.02)
    ilql.freeze_targets(model)
    return model.eval()


# ---------------------------------------------------------------------------- indexing
def test_indices_and_batch_by_hand():
    # row 0: prompt [10 11], response [12 13 EOS]; row 1: prompt [20 21 22 24], response [23 EOS]
    items = [([10, 11], [12, 13, EOS], 2.0), ([20, 21, 22, 24], [23, EOS], -1.0)]
    b = ilql.collate_offline(items)
    assert b["tokens"].tolist() == [[10, 11, 12, 13, EOS, EOS], [20, 21, 22, 24, 23, EOS]]
    # the hidden state at i chooses token i+1: row 0's actions 12, 13, EOS sit at positions 2, 3, 4 -> read at 1, 2, 3
    assert b["actions_ixs"].tolist() == [[1, 2, 3], [3, 4, 0]]
    assert b["action_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert (b["actions"] * b["action_mask"]).tolist() == [[12, 13, EOS], [23, EOS, 0]]
    assert b["states_ixs"].tolist() == [[1, 2, 3, 4], [3, 4, 5, 0]]  # action states + the final position
    assert b["states_ixs"][:, 1:].tolist() == [[2, 3, 4], [4, 5, 0]]  # next states
    assert b["dones"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]]  # terminal after the last action (and padding)
    assert b["dones"][:, 1:].tolist() == [[0, 0, 1], [0, 1, 1]]  # done flag of each action's next state
    assert b["rewards"].tolist() == [[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]  # on the last action
    # the pure function alone
    a, s, d, m = ilql.ilql_indices(torch.tensor([2, 4]), torch.tensor([3, 2]))
    assert a.tolist() == [[1, 2, 3], [3, 4, 0]] and s.tolist() == [[1, 2, 3, 4], [3, 4, 5, 0]]
    assert d.tolist() == [[0, 0, 0, 1], [0, 0, 1, 1]] and m.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_outputs_read_at_the_state_positions():
    model = tiny_model()
    b = ilql.collate_offline([([10, 11], [12, 13, EOS], 1.0), ([20, 21, 22, 24], [23, EOS], -1.0)])
    with torch.no_grad():
        h = model(b["tokens"], b["mask"])
        out = ilql.ilql_outputs(model, h, b)
        # flat over the 5 real actions: row 0's three (12, 13, EOS), then row 1's two (23, EOS)
        assert out["actions"].tolist() == [12, 13, EOS, 23, EOS]
        assert out["reward_sums"].tolist() == [0.0, 0.0, 1.0, 0.0, -1.0]
        assert out["next_dones"].tolist() == [0, 0, 1, 0, 1]
        assert out["discounts"].tolist() == pytest.approx([0.99] * 5)  # one-step TD by default
        # row 0, action 1 (token 13 at position 3) is chosen by hidden 2; its next state is hidden 3
        assert torch.allclose(out["qs"][0][1], model.heads["q1"](h[0, 2]), atol=1e-6)
        assert torch.allclose(out["logits"][1], model.lm_head(h[0, 2]), atol=1e-6)
        assert torch.allclose(out["v"][1], model.heads["v"](h[0, 2])[0], atol=1e-6)
        assert torch.allclose(out["v_next"][1], model.heads["v"](h[0, 3])[0], atol=1e-6)
        assert torch.allclose(out["v_next"][2], model.heads["v"](h[0, 4])[0], atol=1e-6)  # the terminal state
        # Qhat = min of the *target* heads (tiny_model's differ from the online ones) at each taken action
        for i, (row, pos, a) in enumerate([(0, 1, 12), (0, 2, 13), (0, 3, EOS), (1, 3, 23), (1, 4, EOS)]):
            t1, t2 = model.heads["q1_target"](h[row, pos]), model.heads["q2_target"](h[row, pos])
            assert torch.allclose(out["target_q"][i], torch.minimum(t1, t2)[a], atol=1e-6), i
        # n_step = 2: row 0's action 0 bootstraps from state 2 (hidden 3); action 1 reaches the end (a return only)
        b2 = ilql.collate_offline([([10, 11], [12, 13, EOS], 1.0)], 0.5, n_step=2)
        h2 = model(b2["tokens"], b2["mask"])
        out = ilql.ilql_outputs(model, h2, b2)
        assert torch.allclose(out["v_next"][0], model.heads["v"](h2[0, 3])[0], atol=1e-6)
        assert out["reward_sums"].tolist() == [0.0, 0.5, 1.0] and out["next_dones"].tolist() == [0, 1, 1]
        assert out["discounts"].tolist() == [0.25, 0.25, 0.5]
    with pytest.raises(ValueError, match="n_step must be >= 1"):  # 0 would silently drop every reward
        ilql.nstep_targets(torch.ones(1, 2), torch.tensor([2]), 0.9, 0)


# ---------------------------------------------------------------------------- losses
def naive_losses(logits, qs, target_q, vs, actions, rewards, dones, mask, gamma, tau, beta_awac):
    def log_softmax(row, a):
        m = max(row)
        return row[a] - (m + math.log(sum(math.exp(x - m) for x in row)))

    B, A = len(actions), len(actions[0])
    lq = lv = lcql = lawac = 0.0
    n = 0
    for b in range(B):
        for t in range(A):
            if not mask[b][t]:
                continue
            n += 1
            a = actions[b][t]
            td = rewards[b][t] + gamma * (1 - dones[b][t + 1]) * vs[b][t + 1]
            for q in qs:
                lq += (q[b][t][a] - td) ** 2
                lcql += -log_softmax(q[b][t], a)
            adv = target_q[b][t] - vs[b][t]
            lv += (tau if adv >= 0 else 1 - tau) * adv ** 2
            lawac += min(math.exp(beta_awac * adv), 100.0) * -log_softmax(logits[b][t], a)
    return lq / n, lv / n, lcql / n, lawac / n


@pytest.mark.parametrize("beta_awac", [0.0, 2.0])
def test_losses_match_naive_loop(beta_awac):
    g = torch.Generator().manual_seed(0)
    B, A, Vs = 3, 4, 7
    logits = torch.randn(B, A, Vs, generator=g)
    qs = (torch.randn(B, A, Vs, generator=g), torch.randn(B, A, Vs, generator=g))
    target_q, vs = torch.randn(B, A, generator=g), torch.randn(B, A + 1, generator=g)
    actions = torch.randint(0, Vs, (B, A), generator=g)
    _, _, dones, mask = ilql.ilql_indices(torch.tensor([2, 3, 1]), torch.tensor([4, 2, 1]))
    rewards = torch.randn(B, A, generator=g) * mask
    gamma, tau, cql_scale, awac_scale = 0.9, 0.7, 0.3, 0.5
    real = mask.bool()  # the loss takes real actions flat, as ilql_outputs returns them; one-step TD targets
    flat = dict(logits=logits[real], qs=tuple(q[real] for q in qs), target_q=target_q[real], v=vs[:, :-1][real],
                v_next=vs[:, 1:][real], actions=actions[real], reward_sums=rewards[real],
                discounts=torch.full((int(mask.sum()),), gamma), next_dones=dones[:, 1:][real])
    loss, st = ilql.ilql_loss(**flat, tau=tau, cql_scale=cql_scale, awac_scale=awac_scale, beta_awac=beta_awac)
    ref = naive_losses(logits.tolist(), [q.tolist() for q in qs], target_q.tolist(), vs.tolist(), actions.tolist(),
                       rewards.tolist(), dones.tolist(), mask.tolist(), gamma, tau, beta_awac)
    got = [st[k].item() for k in ("loss_q", "loss_v", "loss_cql", "loss_awac")]
    assert got == pytest.approx(ref, rel=1e-5)
    assert loss.item() == pytest.approx(ref[0] + ref[1] + cql_scale * ref[2] + awac_scale * ref[3], rel=1e-5)
    # n: an explicit denominator (the trainer's global action count) scales every term
    loss2, _ = ilql.ilql_loss(**flat, tau=tau, cql_scale=cql_scale, awac_scale=awac_scale, beta_awac=beta_awac,
                              n=2 * mask.sum())
    assert loss2.item() == pytest.approx(loss.item() / 2, rel=1e-6)


@pytest.mark.parametrize("n_step", [1, 2, 3, 100])
def test_nstep_targets_match_naive_sum(n_step):
    # Q(s_t, a_t) -> sum_{k < m} gamma^k r_{t+k} + gamma^m * V(s_{t+m}), m = min(n, R - t); V(s_R) (terminal) is 0
    g = torch.Generator().manual_seed(1)
    response_lens, A, gamma = torch.tensor([4, 2, 1, 3]), 4, 0.8
    _, _, dones, mask = ilql.ilql_indices(torch.tensor([2, 1, 3, 1]), response_lens)
    rewards = torch.randn(4, A, generator=g) * mask  # rewards anywhere in the episode, not only at its end
    vs = torch.randn(4, A + 1, generator=g)
    reward_sums, discounts, boot_ixs = ilql.nstep_targets(rewards, response_lens, gamma, n_step)
    got = reward_sums + discounts * (1 - dones.gather(1, boot_ixs)) * vs.gather(1, boot_ixs)
    for b, R in enumerate(response_lens.tolist()):
        for t in range(R):
            m = min(n_step, R - t)
            want = sum(gamma ** k * rewards[b, t + k].item() for k in range(m))
            want += gamma ** m * vs[b, t + m].item() if t + m < R else 0.0
            assert got[b, t].item() == pytest.approx(want, abs=1e-6), (b, t)
    if n_step == 1:  # ILQL's own target
        assert torch.equal(boot_ixs, torch.arange(1, A + 1).expand(4, -1)) and torch.equal(reward_sums, rewards)
    if n_step >= A:  # Monte-Carlo: the discounted return of the row, never a V
        assert bool(dones.gather(1, boot_ixs)[mask.bool()].all())


def test_every_trainable_parameter_gets_a_gradient_and_targets_none():
    # DDP runs with find_unused_parameters=False: every trainable parameter must get a gradient every step
    model = tiny_model().train()
    b = ilql.collate_offline([([10, 11], [12, 13, EOS], 1.0), ([20], [23, EOS], -1.0)])
    out = ilql.ilql_outputs(model, model(b["tokens"], b["mask"]), b)
    loss, _ = ilql.ilql_loss(**out, tau=0.7, cql_scale=0.1, awac_scale=1.0)
    loss.backward()
    for name, p in model.named_parameters():
        if "_target" in name:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None, name
    opt_params = {id(p) for g in make_optimizer(model, ilql.Config()).param_groups for p in g["params"]}
    assert not any(id(p) in opt_params for p in model.heads["q1_target"].parameters())


def test_polyak_update_after_one_step(tmp_path):
    # start from an ILQL checkpoint whose targets differ from the online heads, take one optimizer step
    model = tiny_model(seed=3)
    with torch.no_grad():
        for p in list(model.heads["q1_target"].parameters()) + list(model.heads["q2_target"].parameters()):
            p.normal_(0, 0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init = str(tmp_path / "init.pt")
    save_checkpoint(init, kind="ilql", model_config=asdict(model.config), model=model.state_dict(), step=0)
    alpha = 0.3
    cfg = ilql.Config(**{**TINY, "init_from": init}, data=str(FIX / "offline.jsonl"), out_dir=str(tmp_path / "out"),
                      max_iters=1, batch_size=3, learning_rate=1e-2, alpha=alpha, eval_size=1, eval_betas=(1.0,),
                      max_new_tokens=2)
    m = ilql.main(cfg)
    assert "eval_loss" not in m and "len_beta1" in m  # eval_split="": no held-out loss, training prompts sampled
    after = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"), "ilql")["model"]
    for t, o in (("q1_target", "q1"), ("q2_target", "q2")):
        for p in ("weight", "bias"):
            target_before, target_after = before[f"heads.{t}.{p}"], after[f"heads.{t}.{p}"]
            online_before, online_after = before[f"heads.{o}.{p}"], after[f"heads.{o}.{p}"]
            assert not torch.equal(online_after, online_before)  # the online head was trained
            assert torch.allclose(target_after, (1 - alpha) * target_before + alpha * online_after, atol=1e-7)


# ---------------------------------------------------------------------------- decoding
def prompts_batch():
    return data.pad_left([data.encode("Hello there, how"), data.encode("A")])  # left padding


def test_beta_zero_decodes_like_plain_generate():
    model = tiny_model(seed=1)
    tokens, mask = prompts_batch()
    kw = dict(max_new_tokens=8, temperature=0.7, top_k=100)
    a, lp_a, m_a = generate(model, tokens, mask, generator=torch.Generator().manual_seed(5), **kw)
    b, lp_b, m_b = generate(model, tokens, mask, generator=torch.Generator().manual_seed(5),
                            logits_fn=ilql_logits_fn(model, 0.0), **kw)
    assert torch.equal(a, b) and torch.equal(m_a, m_b)
    assert torch.allclose(lp_a, lp_b, atol=1e-5)


def test_large_beta_picks_the_highest_advantage_token():
    model = tiny_model(seed=2)
    good, trap = 1234, 777
    with torch.no_grad():
        for name in ("v", "q1_target", "q2_target"):
            model.heads[name].weight.zero_()
            model.heads[name].bias.zero_()
        model.heads["v"].bias.fill_(0.3)
        model.heads["q1_target"].bias[good], model.heads["q2_target"].bias[good] = 5.0, 3.0  # min 3: advantage 2.7
        model.heads["q1_target"].bias[trap] = 50.0  # only one head likes it: min is 0, so it is not chosen
        model.heads["q1"].bias.fill_(100.0)  # the online heads play no part in decoding
    tokens, mask = prompts_batch()
    out, _, _ = generate(model, tokens, mask, 6, temperature=1.0, generator=torch.Generator().manual_seed(0),
                         logits_fn=ilql_logits_fn(model, 20.0))
    assert (out[:, tokens.shape[1]:] == good).all()
    plain, _, _ = generate(model, tokens, mask, 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert not (plain[:, tokens.shape[1]:] == good).all()
    # and the formula itself, on random heads
    model = tiny_model(seed=4)
    with torch.no_grad():
        model.heads["q2_target"].weight.normal_(0, 0.05)
        h = torch.randn(3, 32)
        want = (torch.log_softmax(model.lm_head(h), -1) + 1.5 * (torch.minimum(
            model.heads["q1_target"](h), model.heads["q2_target"](h)) - model.heads["v"](h)))
        assert torch.allclose(ilql_logits_fn(model, 1.5)(h), want, atol=1e-5)


# ---------------------------------------------------------------------------- learning
SUBJECTS = ["The movie was", "The food was", "The hotel was", "The book was"]


def good_bad_data(path):
    # 64 rows: every prompt followed half the time by " good" (+1), half by " bad" (-1)
    rows = [{"prompt": SUBJECTS[(i // 2) % 4], "response": [" good", " bad"][i % 2], "reward": [1.0, -1.0][i % 2]}
            for i in range(64)]
    return write_jsonl(path, rows)


def first_token_rates(model, beta, n=128):
    tokens, mask = data.pad_left([data.encode("The food was")] * n)
    out, _, _ = generate(model, tokens, mask, 1, 1.0, generator=torch.Generator().manual_seed(0),
                         logits_fn=ilql_logits_fn(model, beta))
    first = out[:, -1]
    return [(first == data.encode(w)[0]).float().mean().item() for w in (" good", " bad")]


def test_learns_the_rewarded_token(tmp_path):
    cfg = ilql.Config(**TINY, data=good_bad_data(tmp_path / "gb.jsonl"), out_dir=str(tmp_path / "out"),
                      batch_size=8, max_iters=80, learning_rate=5e-3, min_lr_ratio=1.0, alpha=0.2, cql_scale=0.5,
                      eval_interval=1000, eval_size=1, eval_betas=(0.0,), max_new_tokens=1)
    # (tuned on 16 seeds: beta = 0 gives 0.33-0.53 " good", beta = 4 gives >= 0.99; ~4 s on one thread)
    ilql.main(cfg)
    model, ckpt = load_model(str(tmp_path / "out" / "ckpt.pt"), ilql.ilql_heads(V), kind="ilql")
    model.eval()
    assert (ckpt["reward_mean"], ckpt["reward_std"]) == (0.0, 1.0)
    good0, bad0 = first_token_rates(model, 0.0)
    good4, bad4 = first_token_rates(model, 4.0)
    # beta = 0 is behaviour cloning of 50/50 data; beta = 4 follows the advantage
    assert 0.25 <= good0 <= 0.75 and 0.25 <= bad0 <= 0.75, (good0, bad0)
    assert good4 >= 0.9 and bad4 <= 0.05, (good4, bad4)


# ---------------------------------------------------------------------------- end to end: resume, preferences, scoring
def run_cfg(tmp_path, name, **kw):
    return ilql.Config(**{**TINY, "data": str(FIX / "prefs.jsonl"), "data_format": "preferences",
                          "eval_split": "train[:1]", "out_dir": str(tmp_path / name), "batch_size": 2,
                          "grad_accum": 2, "max_iters": 4, "eval_interval": 2, "learning_rate": 1e-3,
                          "warmup_iters": 1, "min_lr_ratio": 1.0, "eval_size": 2, "eval_betas": (0.0, 2.0),
                          "max_new_tokens": 3, **kw})


def test_resume_matches_uninterrupted_run(tmp_path):
    # a cosine schedule over lr_decay_iters: stopping at step 3 and resuming keeps it (max_iters alone would not)
    kw = dict(min_lr_ratio=0.1, lr_decay_iters=4)
    full = ilql.main(run_cfg(tmp_path, "full", **kw))
    ilql.main(run_cfg(tmp_path, "part", max_iters=3, **kw))
    part = ilql.main(run_cfg(tmp_path, "part", init_from="resume", **kw))
    assert_same_weights(tmp_path / "full" / "ckpt.pt", tmp_path / "part" / "ckpt.pt", step=4, atol=0)
    keys = ("loss", *ilql.STATS, "lr", "grad_norm")
    for x, y in zip(train_log(tmp_path / "full"), train_log(tmp_path / "part"), strict=True):
        assert [x[k] for k in ("step", *keys)] == [y[k] for k in ("step", *keys)], (x, y)
    evals = ("eval_loss", *(f"eval_{k}" for k in ilql.STATS), "len_beta0", "len_beta2")
    assert [full[k] for k in evals] == [part[k] for k in evals]
    a = load_checkpoint(str(tmp_path / "full" / "ckpt.pt"), "ilql")
    # what the checkpoint carries: preference pairs became +1/-1 rows, z-scored with mean 0 and std 1
    assert (a["reward_mean"], a["reward_std"]) == (0.0, 1.0)
    assert a["model_config"]["heads"] == ilql.ilql_heads(V)
    assert os.path.exists(tmp_path / "full" / "hf" / "model.safetensors")
    assert math.isfinite(full["eval_loss"]) and full["len_beta0"] > 0


def test_scores_from_reward_fn_and_reward_model(tmp_path, monkeypatch):
    calls = []
    module = types.ModuleType("ilql_test_rewards")
    module.count = lambda prompts, responses: calls.append((prompts, responses)) or [1.0 + len(r) for r in responses]
    monkeypatch.setitem(sys.modules, "ilql_test_rewards", module)
    m = ilql.main(run_cfg(tmp_path, "fn", max_iters=1, grad_accum=1, reward_fn="ilql_test_rewards:count"))
    held_out = data.load_preferences(str(FIX / "prefs.jsonl"), "train[:1]")[0].prompt
    # one prompt, two betas, at the evaluation before training and after the last step
    assert [c[0] for c in calls] == [[held_out]] * 4
    assert m["score_beta0"] == 1.0 + len(calls[2][1][0]) and m["score_beta2"] == 1.0 + len(calls[3][1][0])

    # a reward model is read through scoring.load_reward_model / score_tokens on prompt + response tokens and mask
    fake_rm = types.SimpleNamespace(config=types.SimpleNamespace(block_size=64))  # as long as the policy's context
    monkeypatch.setattr(scoring, "load_reward_model", lambda path, device: fake_rm)
    monkeypatch.setattr(scoring, "score_tokens", lambda rm, tokens, mask: mask.sum(1).float())  # prompt + response
    m = ilql.main(run_cfg(tmp_path, "rm", max_iters=1, grad_accum=1, reward_model="rm.pt", eval_size=3,
                          eval_split="train"))
    prompts = [p.prompt for p in data.load_preferences(str(FIX / "prefs.jsonl"))]
    prompt_len = sum(len(data.tokenize_prompt(p, 16)) for p in prompts) / 3
    for beta in ("0", "2"):
        assert m[f"score_beta{beta}"] == pytest.approx(prompt_len + m[f"len_beta{beta}"])


def test_torchrun_two_processes_equal_one(tmp_path, monkeypatch):
    """2 ranks x 2 rows == 1 process x 2 micro-batches of 2 rows: the same global batch in the same pieces gives the
    same weights bit for bit, and the same logged loss and gradient norm per step, and held-out loss."""
    args = ["config/ilql_tiny.py", "--max_iters=2", "--eval_interval=2", "--eval_size=2", "--max_new_tokens=2",
            "--grad_accum=1", "--learning_rate=1e-3"]
    torchrun("ilql.py", [*args, "--batch_size=2", f"--out_dir={tmp_path / 'two'}"], tmp_path)
    monkeypatch.chdir(ROOT)  # the tiny config's data path is relative to the repository
    one = ilql.main(parse_config(ilql.Config, args + ["--batch_size=2", "--grad_accum=2",
                                                      f"--out_dir={tmp_path / 'one'}"]))
    assert_same_weights(tmp_path / "one" / "ckpt.pt", tmp_path / "two" / "ckpt.pt", step=2, atol=0)
    # Adam is blind to a gradient's scale, so compare the logged loss and gradient norm too (a missing world_size
    # factor halves the norm and leaves the weights alone)
    for x, y in zip(train_log(tmp_path / "one"), train_log(tmp_path / "two"), strict=True):
        assert abs(x["loss"] / y["loss"] - 1) < 1e-5 and abs(x["grad_norm"] / y["grad_norm"] - 1) < 1e-4, (x, y)
    two_eval = eval_log(tmp_path / "two")
    assert [r["step"] for r in two_eval] == [0, 2] and abs(two_eval[-1]["eval_loss"] / one["eval_loss"] - 1) < 1e-5
    # the ranks sample what one process samples, so each beta's mean response length is one number: a mean over all
    # ranks' responses, each counted once
    for k in ("len_beta0", "len_beta4"):
        assert two_eval[-1][k] == one[k], k


def test_compile_trains_like_eager(tmp_path, monkeypatch):
    """--compile=True (torch.compile of the trunk, inductor on CPU) computes what eager computes: the same losses and
    gradient norms, step by step, to fp32 rounding. Not the weights after Adam steps: Adam turns rounding noise in a
    near-zero gradient into an lr-sized step, and compiled kernels round differently on different CPUs."""
    ilql.main(run_cfg(tmp_path, "eager", max_iters=2))
    compiled = spy_on_compile(monkeypatch)
    ilql.main(run_cfg(tmp_path, "compiled", max_iters=2, compile=True))
    assert len(compiled) == 1
    for x, y in zip(train_log(tmp_path / "eager"), train_log(tmp_path / "compiled"), strict=True):
        for k in ("loss", "loss_q", "loss_v", "loss_cql", "loss_awac", "grad_norm"):
            assert abs(x[k] - y[k]) <= 1e-4 * max(1.0, abs(x[k])), (k, x[k], y[k])


def test_bf16_decodes_from_fp32_heads(tmp_path, monkeypatch):
    """Under bf16 autocast the evaluation samples decode from fp32 heads, as sample.py does (it always sets them): the
    decoding logits of ILQL's evaluation equal the formula computed in fp32 on the same hidden states."""
    seen = []  # (hidden, decoding logits) of every decoding step

    def recording_logits_fn(model, beta):
        fn = ilql_logits_fn(model, beta)
        return lambda h: seen.append((h.detach().clone(), fn(h))) or seen[-1][1]
    monkeypatch.setattr(ilql, "ilql_logits_fn", recording_logits_fn)
    real_evaluate = ilql.evaluate  # keep only the last evaluation's steps: the checkpoint's weights made them
    monkeypatch.setattr(ilql, "evaluate", lambda *a, **kw: seen.clear() or real_evaluate(*a, **kw))
    ilql.main(ilql.Config(**{**TINY, "dtype": "bfloat16"}, data=str(FIX / "offline.jsonl"),
                          out_dir=str(tmp_path / "out"), max_iters=1, batch_size=3, eval_size=1,
                          eval_betas=(2.0,), max_new_tokens=3))
    model, _ = load_model(str(tmp_path / "out" / "ckpt.pt"), kind="ilql")
    assert len(seen) >= 1
    for h, logits in seen:
        with torch.no_grad():
            want = ilql_logits_fn(model, 2.0)(h.float())  # no autocast: fp32 throughout
        torch.testing.assert_close(logits, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=0)  # fp32 rounding


def test_eval_size_0_evaluates_the_held_out_loss_only(tmp_path):
    """eval_size 0 samples nothing, so the evaluation logs the held-out loss terms and no sample lengths or scores
    (it logged a length of 0 for every beta)."""
    ilql.main(run_cfg(tmp_path, "out", max_iters=2, eval_size=0))
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert not any(k.startswith(("len_beta", "score_beta")) for r in rows for k in r)


# ---------------------------------------------------------------------------- gradients, logged stats, held-out loss
@pytest.mark.parametrize("beta_awac", [0.0, 2.0])
def test_loss_gradients_and_stats_match_naive_loop(beta_awac):
    """ILQL's gradient against a naive fp64 loop in which the TD target r + gamma V(s') and the AWAC weight
    exp(beta_awac * (Qhat - V(s))) are numbers, not graph: V learns only from L_V, the Q heads only from L_Q and L_CQL,
    the policy only from L_AWAC. And the logged q, v and advantage are the means over the actions of Q1(s, a), V(s)
    and Qhat - V(s)."""
    g = torch.Generator().manual_seed(0)
    B, A, Vs = 3, 4, 7
    logits = torch.randn(B, A, Vs, generator=g).requires_grad_()
    qs = tuple(torch.randn(B, A, Vs, generator=g).requires_grad_() for _ in range(2))
    target_q, vs = torch.randn(B, A, generator=g), torch.randn(B, A + 1, generator=g).requires_grad_()
    actions = torch.randint(0, Vs, (B, A), generator=g)
    _, _, dones, mask = ilql.ilql_indices(torch.tensor([2, 3, 1]), torch.tensor([4, 2, 1]))
    rewards = torch.randn(B, A, generator=g) * mask
    gamma, tau, cql_scale, awac_scale = 0.9, 0.7, 0.3, 0.5
    real, n = mask.bool(), int(mask.sum())
    loss, st = ilql.ilql_loss(logits[real], tuple(q[real] for q in qs), target_q[real], vs[:, :-1][real],
                              vs[:, 1:][real], actions[real], rewards[real], torch.full((n,), gamma),
                              dones[:, 1:][real], tau=tau, cql_scale=cql_scale, awac_scale=awac_scale,
                              beta_awac=beta_awac)
    got = torch.autograd.grad(loss, [logits, *qs, vs])
    ref = 0.0
    for b, t in real.nonzero().tolist():
        a = actions[b, t]
        td = rewards[b, t].item() + gamma * (1 - dones[b, t + 1].item()) * vs[b, t + 1].item()  # a number
        for q in qs:
            ref = ref + (q[b, t, a].double() - td) ** 2 - cql_scale * torch.log_softmax(q[b, t].double(), -1)[a]
        adv = target_q[b, t].item() - vs[b, t].double()
        ref = ref + (tau if adv.item() >= 0 else 1 - tau) * adv ** 2
        weight = min(math.exp(beta_awac * adv.item()), 100.0)  # a number
        ref = ref - awac_scale * weight * torch.log_softmax(logits[b, t].double(), -1)[a]
    want = torch.autograd.grad(ref / n, [logits, *qs, vs])
    for name, x, y in zip(("logits", "q1", "q2", "v"), got, want):
        torch.testing.assert_close(x, y.float(), atol=1e-6, rtol=1e-5, msg=name)
    taken = [(b, t, actions[b, t].item()) for b, t in real.nonzero().tolist()]
    assert st["q"].item() == pytest.approx(sum(qs[0][b, t, a].item() for b, t, a in taken) / n, rel=1e-5)
    assert st["v"].item() == pytest.approx(sum(vs[b, t].item() for b, t, _ in taken) / n, rel=1e-5)
    assert st["advantage"].item() == pytest.approx(
        sum(target_q[b, t].item() - vs[b, t].item() for b, t, _ in taken) / n, rel=1e-5)


def test_held_out_loss_is_the_mean_over_its_actions_with_the_training_z_scores(tmp_path):
    """main's evaluation at step 0: every eval_* term is ilql_loss over all the held-out actions at once (a mean over
    actions: not over tokens, not over rows), of the held-out rows only, with the rewards z-scored by the training
    rows' mean and population std (rewards here have mean 4.5 and std 3.0, so a missed shift or scale shows)."""
    words = ["apple", "river", "stone", "cloud", "green", "tiger", "piano"]
    rewards = [1.5, 7.5, 7.5, 1.5, 7.0, -4.0, 2.0]  # training rows: the first four
    rows = [{"prompt": f"Say {w}:", "response": f" {w}" * (1 + i % 3) + ".", "reward": r}
            for i, (w, r) in enumerate(zip(words, rewards))]
    model = tiny_model()
    init = str(tmp_path / "init.pt")
    save_checkpoint(init, kind="ilql", model_config=asdict(model.config), model=model.state_dict(), step=0)
    cfg = ilql.Config(**{**TINY, "init_from": init, "eval_split": "train[4:]"}, data_split="train[:4]",
                      data=write_jsonl(tmp_path / "d.jsonl", rows), out_dir=str(tmp_path / "out"), max_iters=0,
                      batch_size=2, eval_size=0, max_new_tokens=4, gamma=0.9, beta_awac=1.0)
    ilql.main(cfg)
    (logged,) = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    mean, std = statistics.fmean(rewards[:4]), statistics.pstdev(rewards[:4])
    assert (mean, std) == (4.5, 3.0)
    items = [(*data.tokenize_example(r["prompt"], r["response"], cfg.max_prompt_len, cfg.max_len),
              (r["reward"] - mean) / std) for r in rows[4:]]
    b = ilql.collate_offline(items, cfg.gamma, cfg.n_step)
    with torch.no_grad():
        loss, st = ilql.ilql_loss(**ilql.ilql_outputs(model, model(b["tokens"]), b), tau=cfg.tau,
                                  cql_scale=cfg.cql_scale, awac_scale=cfg.awac_scale, beta_awac=cfg.beta_awac)
    assert logged["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)
    for k in ilql.STATS:
        assert logged[f"eval_{k}"] == pytest.approx(st[k].item(), rel=1e-5, abs=1e-6), k
