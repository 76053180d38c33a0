"""Tests for dpo.py: the losses by hand; the loss and its gradient equal a naive fp64 computation, one unpadded
sequence at a time, for DPO, conservative DPO and IPO; log-probs ignore left or right padding; through main, the
first loss is exactly ln 2 while policy == reference (dropout off); a short run learns an easy preference; a resume
ends bit for bit where an uninterrupted run does; a 2-process torchrun run equals 1 process bit for bit."""

import copy
import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch

import dpo
from common import ConfigError, load_checkpoint, load_model, parse_config, save_checkpoint
from data import EOS, PrefExample, collate_sft, load_preferences, pad_left, tokenize_example
from model import GPT, GPTConfig
from tests.helpers import assert_same_weights, cpu_setup, torchrun, train_log
from tests.test_reward import marker_prefs

ROOT = Path(__file__).resolve().parent.parent
LN2 = torch.tensor(math.log(2)).item()  # -logsigmoid(0) in fp32: what a loss of h == 0 gives, exactly

CPU = cpu_setup()
# Pairs of several lengths: an empty prompt (its own BOS), a prompt cut to max_prompt_len, a response cut at max_len.
PREFS = [PrefExample("Describe the river:", " green stone", " green window"),
         PrefExample("", "Yes.", "No, never."),
         PrefExample("A long prompt that will be cut to its last eight tokens, as every script does:", " 4", " 5"),
         PrefExample("Q:", " apple tiger piano seven orange window silver music forest candle yellow" * 2, " apple"),
         PrefExample("Name a colour.", " yellow", " the colour of the sky on a clear day"),
         PrefExample("Count:", " one two three", " one two four")]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(tmp_path, data, **overrides):
    """The tiny preset, pointed at `data` with a held-out 20% and a start checkpoint in tmp_path."""
    cfg = parse_config(dpo.Config, [str(ROOT / "config" / "dpo_tiny.py")])
    base = dict(data=data, data_split="train[:80%]", eval_split="train[80%:]", out_dir=str(tmp_path / "out"),
                eval_interval=1000, init_from=save_start(tmp_path / "start.pt"))
    return dataclasses.replace(cfg, **{**base, **overrides})


def tiny_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def save_start(path, dropout=0.0):
    """A small scratch model saved as the SFT checkpoint DPO starts from (policy and reference)."""
    model = tiny_model(dropout=dropout)
    save_checkpoint(str(path), kind="sft", model_config=dataclasses.asdict(model.config), model=model.state_dict(),
                    step=0)
    return str(path)


def naive_logp(model, prompt_ids, response_ids, average):
    """log p(response | prompt) from a full forward of the unpadded sequence, one target at a time."""
    seq = prompt_ids + response_ids
    logp = torch.log_softmax(model.lm_head(model(torch.tensor([seq])))[0], -1)  # (T, V)
    terms = [logp[t - 1, seq[t]] for t in range(len(prompt_ids), len(seq))]
    return sum(terms) / len(terms) if average else sum(terms)


# ----------------------------------------------------------------------------- pure functions
def test_losses_by_hand():
    """h = (-1 - -2) - (-3 - -2) = 2 with beta 0.5: DPO -log sigmoid(1); 10% smoothing adds 0.1 of the flipped
    preference's -log sigmoid(-1); IPO (2 - 1/(2 * 0.5))^2 = 1. The rewards are beta * (policy - reference)."""
    args = [torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0)]
    loss, r_chosen, r_rejected = dpo.dpo_loss(*args, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert (r_chosen.item(), r_rejected.item()) == (0.5, -0.5)
    loss, _, _ = dpo.dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)), abs=1e-6)
    loss, _, _ = dpo.dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_loss_and_gradient_equal_a_naive_fp64_computation(loss_type, label_smoothing):
    """forward_backward over 2 micro-batches of 3 pairs (right-padded, chosen and rejected in one forward, the LM
    head at the response positions only) against a plain loop over the pairs in fp64: every sequence unpadded and
    whole, its log-prob summed (IPO: averaged) over the response tokens, the loss written from its formula. Policy
    and reference differ, so the log-ratios are not 0. One response is cut at max_len (no EOS)."""
    cfg = dpo.Config(max_prompt_len=8, max_len=20, beta=0.5, loss_type=loss_type, label_smoothing=label_smoothing)
    pairs, dropped = dpo.tokenize_prefs(PREFS, cfg)
    (long_prompt, _), _ = pairs[2]
    (prompt, cut), _ = pairs[3]
    assert dropped == 0 and len(long_prompt) == cfg.max_prompt_len
    assert len(prompt) + len(cut) == cfg.max_len and cut[-1] != EOS
    policy, ref = tiny_model(0).eval(), tiny_model(1).eval()
    out, _ = dpo.forward_backward(policy, policy.lm_head, ref, [pairs[:3], pairs[3:]], cfg, CPU)

    policy64, ref64 = copy.deepcopy(policy).double(), ref.double()
    ipo, beta, eps = loss_type == "ipo", cfg.beta, label_smoothing
    losses, rows = [], []  # rows: (reward_chosen, reward_rejected, logp_chosen, logp_rejected) per pair
    for (p, c), (_, r) in pairs:
        with torch.no_grad():
            ref_c, ref_r = naive_logp(ref64, p, c, ipo), naive_logp(ref64, p, r, ipo)
        pi_c, pi_r = naive_logp(policy64, p, c, ipo), naive_logp(policy64, p, r, ipo)
        h = (pi_c - ref_c) - (pi_r - ref_r)
        if ipo:
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(-(1 - eps) * torch.log(torch.sigmoid(beta * h)) - eps * torch.log(torch.sigmoid(-beta * h)))
        rows.append([beta * (pi_c - ref_c).item(), beta * (pi_r - ref_r).item(), pi_c.item(), pi_r.item()])
    loss = torch.stack(losses).mean()
    loss.backward()

    # fp32 against fp64: the loss and the gradient agree to ~1e-6 (relative), the tolerances leave 10x room
    assert out["loss"] == pytest.approx(loss.item(), abs=1e-5)
    means = torch.tensor(rows, dtype=torch.float64).mean(0).tolist()
    for k, v in zip(("reward_chosen", "reward_rejected"), means[:2]):
        assert out[k] == pytest.approx(v, abs=1e-5), k
    for k, v in zip(("logp_chosen", "logp_rejected"), means[2:]):
        assert out[k] == pytest.approx(v, rel=1e-5), k
    assert out["acc"] == sum(rc > rr for rc, rr, _, _ in rows) / len(rows)
    assert out["margin"] == pytest.approx(means[0] - means[1], abs=1e-5)
    g = torch.cat([p.grad.flatten() for p in policy.parameters()])
    g64 = torch.cat([p.grad.flatten() for p in policy64.parameters()])
    assert ((g.double() - g64).norm() / g64.norm()).item() < 1e-5


def test_log_probs_ignore_left_and_right_padding():
    """sequence_logprobs of a left-padded and of a right-padded batch (rows of different lengths) both give each
    row's log-prob computed alone, unpadded, in fp64."""
    cfg = dpo.Config(max_prompt_len=8, max_len=20)
    pairs, _ = dpo.tokenize_prefs(PREFS, cfg)
    rows = [c for c, _ in pairs] + [r for _, r in pairs]
    model = tiny_model(0).eval()
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        naive = torch.stack([naive_logp(model64, p, r, False) for p, r in rows])  # fp64
        b = collate_sft(rows)
        right = dpo.sequence_logprobs(model, model.lm_head, b["tokens"], b["mask"], b["loss_mask"])
        tokens, mask = pad_left([p + r for p, r in rows])
        loss_mask, _ = pad_left([[0] * len(p) + [1] * len(r) for p, r in rows], pad_id=0)
        left = dpo.sequence_logprobs(model, model.lm_head, tokens, mask, loss_mask)
    assert b["mask"].sum(-1).min() < b["mask"].shape[1]  # some rows are padded
    # fp32 sums of up to 20 log-probs of about -10 each: a few units of 2^-24 x 200 apart from fp64
    assert torch.allclose(right.double(), naive, atol=1e-4, rtol=0), (right, naive)
    assert torch.allclose(left.double(), naive, atol=1e-4, rtol=0), (left, naive)


# ----------------------------------------------------------------------------- end to end, through main
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_loss_is_ln2_while_policy_is_reference_and_dropout_is_off(tmp_path, dtype):
    """The reference is a copy of the policy, both run in eval mode and the same kernels on the same shapes (bf16:
    both LM heads in fp32), so until the first update every log-ratio is exactly 0: the held-out loss at the start
    and the first step's loss are -log sigmoid(0) = ln 2 to the last bit, every implicit reward 0, and the accuracy
    0 (ties count as wrong). The start checkpoint has dropout 0.1: in train mode the policy's log-probs would be
    noisy and none of this would hold."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=20)
    cfg = tiny_cfg(tmp_path, data, init_from=save_start(tmp_path / "start_dropout.pt", dropout=0.1), max_iters=1,
                   batch_size=4, grad_accum=2, dtype=dtype)
    out = dpo.main(cfg)
    (first,) = train_log(cfg.out_dir)
    assert first["loss"] == LN2 and out["eval_loss_start"] == LN2
    for k in ("acc", "margin", "reward_chosen", "reward_rejected"):
        assert first[k] == 0 and out[f"eval_{k}_start"] == 0, k
    assert first["logp_chosen"] < -1  # real log-probs: the ratios are 0 because policy == reference, not because
    assert first["grad_norm"] > 1e-3  # the log-probs or their gradient vanish


def test_short_run_learns_an_easy_preference(tmp_path):
    """Chosen responses contain " wonderful" where rejected ones have an ordinary word: from a random start, a short
    run ranks the held-out pairs by their implicit rewards (ties wrong) and drives the held-out loss from ln 2 down."""
    data = marker_prefs(tmp_path / "marker.jsonl")
    cfg = tiny_cfg(tmp_path, data, max_iters=40, batch_size=16, grad_accum=1, learning_rate=3e-3, warmup_iters=5,
                   beta=0.5, eval_interval=20)
    out = dpo.main(cfg)
    assert out["eval_loss_start"] == LN2 and out["eval_acc_start"] == 0
    assert out["eval_acc"] >= 0.9 and out["eval_loss"] < 0.2, out
    assert out["eval_margin"] > 3, out
    # and checked outside dpo.py: the trained policy's log-ratio to the start model is higher on the chosen response
    # of each held-out pair than on the rejected one (the logged metrics could not see chosen and rejected swapped)
    policy, _ = load_model(os.path.join(cfg.out_dir, "ckpt.pt"), kind="dpo")
    start, _ = load_model(cfg.init_from)
    wins = []
    with torch.no_grad():
        for p in load_preferences(data, "train[80%:]"):
            ratio = lambda y: sum(naive_logp(m, *tokenize_example(p.prompt, y, cfg.max_prompt_len, cfg.max_len),
                                             False) * sign for m, sign in ((policy, 1), (start, -1)))
            wins.append(ratio(p.chosen) > ratio(p.rejected))
    assert sum(wins) >= 0.9 * len(wins), wins


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopped after 3 steps and resumed: the reference is rebuilt from the SFT checkpoint (not from the resumed
    policy), so every step logs what the uninterrupted run logs and the weights end equal, bit for bit."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=40)
    kw = dict(max_iters=6, lr_decay_iters=6, warmup_iters=2, eval_interval=2)
    dpo.main(tiny_cfg(tmp_path / "a", data, **kw))
    dpo.main(tiny_cfg(tmp_path / "b", data, **{**kw, "max_iters": 3}))
    dpo.main(dataclasses.replace(tiny_cfg(tmp_path / "b", data, **kw), init_from="resume"))
    assert_same_weights(tmp_path / "a" / "out" / "ckpt.pt", tmp_path / "b" / "out" / "ckpt.pt", step=6, atol=0)
    rows = list(zip(train_log(tmp_path / "a" / "out"), train_log(tmp_path / "b" / "out"), strict=True))
    assert [x["step"] for x, _ in rows] == list(range(6))
    for x, y in rows:
        assert all(x[k] == y[k] for k in (*dpo.STATS, "lr", "grad_norm")), (x, y)
    assert load_checkpoint(str(tmp_path / "b" / "out" / "ckpt.pt"), "dpo")["config"]["init_from"].endswith("start.pt")


def test_torchrun_two_processes_equal_one_process(tmp_path):
    """2 ranks x 1 micro-batch of 2 pairs == 1 process x 2 micro-batches of 2 pairs, bit for bit: rank r runs the
    forwards and backward of the single process's micro-batch r (common.rank_batch: contiguous blocks), DDP's average
    and loss / grad_accum both scale by 1/2, exact in floating point, and the metric sums add the same two numbers.
    So every step's metrics and gradient norm, and the trained weights, are equal exactly."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=20)
    common = [str(ROOT / "config" / "dpo_tiny.py"), "--data=" + data, "--data_split=train[:80%]",
              "--eval_split=train[80%:]", "--max_iters=3", "--batch_size=2", "--eval_interval=1000",
              "--init_from=" + save_start(tmp_path / "start.pt")]
    torchrun("dpo.py", [*common, f"--out_dir={tmp_path / 'ddp'}", "--grad_accum=1"], tmp_path)
    dpo.main(parse_config(dpo.Config, [*common, f"--out_dir={tmp_path / 'one'}", "--grad_accum=2"]))
    rows = list(zip(train_log(tmp_path / "ddp"), train_log(tmp_path / "one"), strict=True))
    assert len(rows) == 3
    for x, y in rows:
        assert all(x[k] == y[k] for k in ("step", *dpo.STATS, "lr", "grad_norm")), (x, y)
    assert_same_weights(tmp_path / "ddp" / "ckpt.pt", tmp_path / "one" / "ckpt.pt", step=3, atol=0)


def test_a_reward_checkpoint_is_refused_as_the_start(tmp_path):
    """A reward model's checkpoint where the SFT model belongs is named, not trained from: its trunk would load as
    policy and reference and the run would look normal."""
    model = tiny_model()
    rm = tmp_path / "rm.pt"
    save_checkpoint(str(rm), kind="reward", model_config=dataclasses.asdict(model.config), model=model.state_dict(),
                    step=0)
    data = marker_prefs(tmp_path / "prefs.jsonl", n=20)
    with pytest.raises(ConfigError, match=r"rm\.pt: is a 'reward' checkpoint, expected 'sft' or 'dpo'"):
        dpo.main(tiny_cfg(tmp_path, data, init_from=str(rm)))


def test_pairs_identical_after_truncation_are_dropped():
    """A pair whose chosen and rejected are equal once tokenized and cut to max_len has h = 0 whatever the policy: it
    would add ln 2 to the loss with no gradient (diluting every other pair's) and a 'wrong' to the accuracy."""
    cfg = dpo.Config(max_prompt_len=8, max_len=20)
    same = PrefExample("Q:", " same answer", " same answer")
    cut = PrefExample("Q:", " apple" * 30 + " yes", " apple" * 30 + " no")  # differ only past max_len
    pairs, dropped = dpo.tokenize_prefs([*PREFS, same, cut], cfg)
    assert dropped == 2 and len(pairs) == len(PREFS)
    assert all(c != r for c, r in pairs)


def test_evaluate_is_the_mean_over_all_pairs_of_all_ranks(monkeypatch):
    """evaluate on 2 ranks (simulated: each rank's sums, then their all-reduced sum) gives what 1 process gives: the
    means over all held-out pairs, not over one rank's share."""
    cfg = dpo.Config(max_prompt_len=8, max_len=20, eval_batch_size=2, beta=0.5)
    pairs, _ = dpo.tokenize_prefs(PREFS, cfg)
    policy, ref = tiny_model(0).eval(), tiny_model(1).eval()
    one = dpo.evaluate(policy, ref, pairs, cfg, CPU)
    ranks = [dataclasses.replace(CPU, rank=r, world_size=2, master=r == 0) for r in (0, 1)]
    local = {}
    monkeypatch.setattr(dpo, "all_reduce_sum", lambda t, s: local.setdefault(s.rank, t.clone()))
    for s in ranks:
        dpo.evaluate(policy, ref, pairs, cfg, s)
    monkeypatch.setattr(dpo, "all_reduce_sum", lambda t, s: local[0] + local[1])
    for s in ranks:
        two = dpo.evaluate(policy, ref, pairs, cfg, s)
        assert two.keys() == one.keys()
        for k in one:
            assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-5), k  # other batch shapes: fp32 rounding
    assert one["eval_loss"] > 0.1  # a real loss, not 0 = 0
