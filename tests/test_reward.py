"""Tests for reward.py: the Bradley-Terry loss by hand; the score is read at the last real token whatever the
padding; the first step's loss and gradient equal a naive full-batch computation; a short run learns an easy
preference; the stored normalisation gives mean 0 (std 1); the evaluation equals a recomputation from the checkpoint,
in every preference format; resume is bit-exact; init from an SFT checkpoint or HF folder; bad data is named; a
2-process torchrun run equals 1 process bit for bit; gradient checkpointing and torch.compile compute what the plain
model does."""

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model as model_module
import reward
import scoring
from common import load_checkpoint, parse_config, save_checkpoint
from data import EOS, DataError, PrefExample, load_preferences, pad_left, pad_right, tokenize_example
from model import GPT, GPTConfig
from tests.helpers import (assert_same_weights, eval_log, file_digest, spy_on_compile, torchrun, train_log,
                           write_jsonl)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "data"
WORDS = "apple river stone cloud green tiger piano seven orange window silver music forest candle yellow".split()

pytestmark = pytest.mark.usefixtures("one_thread")


def marker_prefs(path, n=300, seed=0):
    """An easy preference: the chosen response contains the word " wonderful" somewhere, the rejected one has an
    ordinary word in its place (same length, same other words)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        at = rng.randint(0, len(words))
        chosen = words[:at] + ["wonderful"] + words[at:]
        rejected = words[:at] + [rng.choice(WORDS)] + words[at:]
        rows.append({"prompt": f"Describe the {rng.choice(WORDS)}:", "chosen": " " + " ".join(chosen),
                     "rejected": " " + " ".join(rejected)})
    return write_jsonl(path, rows)


def tiny_cfg(tmp_path, data, **overrides):
    """The tiny preset the demo uses, pointed at `data` with a held-out 20%."""
    cfg = parse_config(reward.Config, [str(ROOT / "config" / "reward_tiny.py")])
    base = dict(data=data, data_split="train[:80%]", eval_split="train[80%:]", out_dir=str(tmp_path / "out"),
                eval_interval=1000)
    return dataclasses.replace(cfg, **{**base, **overrides})


def tiny_model(seed=0, block_size=32):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, n_layer=2, n_head=2, n_embd=32, heads={"reward": 1})).eval()


def save_as_init(model, path):
    """`model` as a checkpoint main can start from (init_from=path), reward head included."""
    save_checkpoint(str(path), kind="sft", model_config=dataclasses.asdict(model.config), model=model.state_dict(),
                    step=0)
    return str(path)


# ----------------------------------------------------------------------------- pure functions
def test_bt_loss_matches_hand_formula_and_ties_are_wrong():
    a, b = [2.0, 0.5, -1.0, 3.0], [1.0, 0.5, 0.5, -4.0]
    loss, acc = reward.bt_loss(torch.tensor(a), torch.tensor(b))
    by_hand = sum(-math.log(1 / (1 + math.exp(-(x - y)))) for x, y in zip(a, b)) / len(a)
    assert abs(loss.item() - by_hand) < 1e-6
    assert acc.item() == 0.5  # pairs 1 and 4 right; the tie (pair 2) and pair 3 wrong
    # numerically safe where the naive formula overflows
    loss, _ = reward.bt_loss(torch.tensor([-200.0]), torch.tensor([0.0]))
    assert abs(loss.item() - 200.0) < 1e-4


def test_score_ignores_padding_and_tokens_after_the_eos():
    model = tiny_model()
    seq = [11, 22, 33, 44, EOS]
    tokens, mask = pad_right([seq])
    r = scoring.score_tokens(model, tokens, mask)
    assert r.dtype == torch.float32 and r.shape == (1,)
    # right padding with junk after the EOS, in a batch with a longer row
    tokens2 = torch.tensor([seq + [7, 8, 9, EOS, 5], list(range(100, 110))])
    mask2 = torch.tensor([[1] * 5 + [0] * 5, [1] * 10])
    assert torch.allclose(scoring.score_tokens(model, tokens2, mask2)[0], r[0], atol=1e-5)
    # left padding
    tokens3, mask3 = pad_left([seq, list(range(100, 110))])
    assert torch.allclose(scoring.score_tokens(model, tokens3, mask3)[0], r[0], atol=1e-5)
    # the score does depend on the last real token (these comparisons can fail)
    assert not torch.allclose(scoring.score_tokens(model, torch.tensor([seq[:-1] + [45]]), mask), r, atol=1e-3)
    assert not torch.allclose(scoring.score_tokens(model, tokens2, torch.ones_like(mask2))[0], r[0], atol=1e-3)


def test_score_api_tokenizes_with_eos_and_batches():
    model = tiny_model()
    prompts, responses = ["Hello", "A much longer prompt here", ""], [" world", " yes", "Only a response."]
    scores = scoring.score(model, prompts, responses, batch_size=2, max_prompt_len=8, max_len=24)
    for p, r, sc in zip(prompts, responses, scores):
        ids = sum(tokenize_example(p, r, 8, 24), [])
        assert ids[-1] == EOS
        assert abs(scoring.score_tokens(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
                   - sc) < 1e-5
    assert isinstance(scores[0], float)


def test_fold_normalization():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 1)
    h = torch.randn(100, 8) * 3 + 1
    r = head(h).squeeze(-1).detach()
    mean, std = r.mean().item(), r.std(correction=0).item()
    with torch.no_grad():
        reward.fold_normalization(head.weight, head.bias, mean, std)
    r2 = head(h).squeeze(-1).detach()
    assert abs(r2.mean().item()) < 1e-5 and abs(r2.std(correction=0).item() - 1) < 1e-5


def test_score_scale_is_one_unless_normalize_std_and_the_scores_vary():
    """The std the saved head divides by (and the one the final message names): 1 without normalize_std, and 1 when
    the normalisation set's scores are all equal (dividing by ~0 would blow the scores up)."""
    ev = lambda std: {"norm_mean": 0.5, "norm_std": std}
    assert reward.score_scale(ev(2.5), reward.Config(normalize_std=True)) == 2.5
    assert reward.score_scale(ev(2.5), reward.Config(normalize_std=False)) == 1.0
    assert reward.score_scale(ev(1e-9), reward.Config(normalize_std=True)) == 1.0


# ----------------------------------------------------------------------------- end to end
def test_first_step_equals_a_naive_full_batch_computation(tmp_path):
    """main's first step, as logged: its loss, accuracy and gradient norm are those of the mean Bradley-Terry loss
    over the global batch computed naively, one unpadded sequence at a time with the score read at its final token.
    8 pairs = batch_size 2 x grad_accum 4, so step 0 sees each pair once (in some order) and the reference needs no
    data order. The gradient norm checks the gradient's scale, which Adam hides from the weights."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=8)
    start = tiny_model(block_size=64)
    cfg = tiny_cfg(tmp_path, data, init_from=save_as_init(start, tmp_path / "start.pt"), data_split="train",
                   eval_split="train", batch_size=2, grad_accum=4, max_iters=1)
    reward.main(cfg)
    (logged,) = train_log(cfg.out_dir)

    def r(prompt, response):  # the score of one unpadded sequence: the head on the last token's hidden state
        ids = sum(tokenize_example(prompt, response, cfg.max_prompt_len, cfg.max_len), [])
        return start.heads["reward"](start(torch.tensor([ids]))[0, -1]).squeeze()

    prefs = load_preferences(data, "train")
    margins = torch.stack([r(p.prompt, p.chosen) - r(p.prompt, p.rejected) for p in prefs])  # (8,)
    loss = -F.logsigmoid(margins).mean()
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in start.parameters() if p.grad is not None]).norm().item()
    assert logged["loss"] == pytest.approx(loss.item(), abs=1e-5)
    assert logged["acc"] == (margins > 0).float().mean().item()
    assert logged["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


def test_evaluation_counts_ties_as_wrong(tmp_path):
    """A reward head with weight 0 scores every response alike: every held-out pair is a tie, which main's evaluation
    counts as wrong (accuracy 0, not 0.5), with the loss of a margin of 0, log 2."""
    start = tiny_model(block_size=64)
    torch.nn.init.zeros_(start.heads["reward"].weight)
    cfg = tiny_cfg(tmp_path, str(FIX / "prefs.jsonl"), init_from=save_as_init(start, tmp_path / "start.pt"),
                   data_split="train", eval_split="train", max_iters=1)
    out = reward.main(cfg)
    assert out["eval_acc_start"] == 0.0 and out["eval_loss_start"] == pytest.approx(math.log(2), abs=1e-6)


def test_short_run_learns_easy_preference_and_normalizes(tmp_path):
    data = marker_prefs(tmp_path / "marker.jsonl")
    cfg = tiny_cfg(tmp_path, data, max_iters=60, learning_rate=3e-3, warmup_iters=5, batch_size=16, grad_accum=1,
                   eval_interval=30, normalize_std=True)
    out = reward.main(cfg)
    assert out["eval_acc"] >= 0.9, out
    # (a random model may already rank one fixed marker word consistently: the loss shows what was learnt)
    assert out["eval_loss"] < 0.1 < out["eval_loss_start"], out
    # every consumer of the checkpoint gets normalised scores: the held-out chosen responses have mean 0, std 1
    model = scoring.load_reward_model(str(Path(cfg.out_dir) / "ckpt.pt"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    held_out = load_preferences(data, cfg.eval_split)
    scores = torch.tensor(scoring.score(model, [p.prompt for p in held_out], [p.chosen for p in held_out],
                                       max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len))
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std(correction=0).item() - 1) < 1e-4
    ckpt = load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"), "reward")
    assert abs(ckpt["reward_norm"]["mean"] - out["norm_mean"]) < 1e-9 and ckpt["reward_norm"]["scaled_by"] != 1.0
    rejected = scoring.score(model, [p.prompt for p in held_out], [p.rejected for p in held_out],
                            max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len)
    assert sum(c > r for c, r in zip(scores.tolist(), rejected, strict=True)) >= 0.9 * len(held_out)


def test_mean_only_normalization_on_a_custom_reference_set(tmp_path):
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"prompt": "Q:", "completion": f" answer {i}"} for i in range(7)])
    cfg = tiny_cfg(tmp_path, str(FIX / "prefs.jsonl"), data_split="train", eval_split="train", max_iters=2,
                   norm_data=ref)
    reward.main(cfg)
    model = scoring.load_reward_model(str(Path(cfg.out_dir) / "ckpt.pt"))
    scores = torch.tensor(scoring.score(model, ["Q:"] * 7, [f" answer {i}" for i in range(7)],
                                       max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len))
    assert abs(scores.mean().item()) < 1e-5
    assert load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))["reward_norm"]["scaled_by"] == 1.0


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopped after 3 steps and resumed (init_from="resume", which continues from ckpt["train_head"], not from the
    normalised head): every step logs what the uninterrupted run logs and the weights end equal, bit for bit."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=40)
    kw = dict(max_iters=6, lr_decay_iters=6, warmup_iters=2, normalize_std=True, eval_interval=2)
    reward.main(tiny_cfg(tmp_path / "a", data, **kw))
    reward.main(tiny_cfg(tmp_path / "b", data, **{**kw, "max_iters": 3}))
    reward.main(tiny_cfg(tmp_path / "b", data, **{**kw, "init_from": "resume"}))
    assert_same_weights(tmp_path / "a" / "out" / "ckpt.pt", tmp_path / "b" / "out" / "ckpt.pt", step=6, atol=0)
    a, b = (load_checkpoint(str(tmp_path / d / "out" / "ckpt.pt")) for d in ("a", "b"))
    assert all(torch.equal(a["train_head"][k], b["train_head"][k]) for k in ("weight", "bias"))
    rows = list(zip(train_log(tmp_path / "a" / "out"), train_log(tmp_path / "b" / "out"), strict=True))
    assert [x["step"] for x, _ in rows] == list(range(6))
    for x, y in rows:
        assert all(x[k] == y[k] for k in ("step", "loss", "acc", "lr", "grad_norm")), (x, y)


@pytest.mark.parametrize("fixture", ["prefs.jsonl", "hh.jsonl", "tldr.jsonl"])
def test_every_preference_format(tmp_path, fixture):
    """Each format trains, and the evaluation main reports (accuracy with ties wrong, loss, margin) is what the
    written checkpoint gives when its held-out pairs are scored one by one through the public `score`."""
    cfg = tiny_cfg(tmp_path, str(FIX / fixture), data_split="train", eval_split="train", max_iters=2, grad_accum=1)
    out = reward.main(cfg)
    prefs = load_preferences(cfg.data, cfg.eval_split)
    n = len(prefs)
    assert n >= 2 and all(p.chosen != p.rejected for p in prefs)  # no pair dropped as a tie
    model = scoring.load_reward_model(str(Path(cfg.out_dir) / "ckpt.pt"))  # normalised: a shift, margins unchanged
    lengths = dict(batch_size=1, max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len)
    chosen = scoring.score(model, [p.prompt for p in prefs], [p.chosen for p in prefs], **lengths)
    rejected = scoring.score(model, [p.prompt for p in prefs], [p.rejected for p in prefs], **lengths)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    assert out["eval_acc"] == sum(m > 0 for m in margins) / n
    assert out["eval_loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / n, abs=1e-5)
    assert out["eval_margin"] == pytest.approx(sum(margins) / n, abs=1e-5)
    assert out["norm_mean"] == pytest.approx(out["reward_mean"] + out["eval_margin"] / 2, abs=1e-5)  # norm set = chosen


def test_init_from_sft_checkpoint_and_hf_folder(tmp_path):
    torch.manual_seed(0)
    sft_model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    save_checkpoint(str(tmp_path / "sft.pt"), kind="sft", model_config=dataclasses.asdict(sft_model.config),
                    model=sft_model.state_dict(), step=0)
    sft_model.save_hf(str(tmp_path / "hf"))
    for init in (str(tmp_path / "sft.pt"), str(tmp_path / "hf")):
        cfg = tiny_cfg(tmp_path / ("from_" + Path(init).name), str(FIX / "prefs.jsonl"), init_from=init,
                       data_split="train", eval_split="train", max_iters=1, grad_accum=1)
        reward.main(cfg)
        model = scoring.load_reward_model(str(Path(cfg.out_dir) / "ckpt.pt"))
        assert model.config.n_layer == 1 and "reward" in model.heads


def test_bad_row_names_file_row_and_field(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"},
                                                 {"prompt": "d", "chosen": " e", "rejected": None}])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: missing field 'rejected'"):
        reward.main(tiny_cfg(tmp_path, data, data_split="train", eval_split="train"))


def test_nonfinite_loss_stops_before_writing(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, str(FIX / "prefs.jsonl"), data_split="train", eval_split="train", max_iters=1,
                   eval_interval=1, grad_accum=1)
    monkeypatch.setattr(reward, "bt_loss", lambda a, b: (a.sum() * 0 + float("inf"), (a > b).float().mean()))
    with pytest.raises(RuntimeError, match=r"step 0: loss is inf"):
        reward.main(cfg)
    assert not (Path(cfg.out_dir) / "ckpt.pt").exists()


def test_torchrun_two_processes_equal_one_process(tmp_path):
    """2 ranks x 1 micro-batch of 2 pairs == 1 process x 2 micro-batches of 2 pairs, bit for bit. Rank r runs the
    forward and backward of the single process's micro-batch r (same pairs, same shapes, same kernels); DDP's average
    and the single process's loss / grad_accum both scale by 1/2, exact in floating point; a sum of two gradients
    does not depend on their order. So every step's loss, accuracy and gradient norm (which Adam would hide: a wrong
    gradient scale leaves Adam's steps almost unchanged) and the trained weights are equal exactly. Only the
    normalisation folded into the saved head rounds differently: the held-out set is scored in other batches."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=20)
    common = [str(ROOT / "config" / "reward_tiny.py"), "--data=" + data, "--data_split=train[:80%]",
              "--eval_split=train[80%:]", "--max_iters=3", "--batch_size=2", "--eval_interval=1000",
              "--normalize_std=True"]
    torchrun("reward.py", [*common, f"--out_dir={tmp_path / 'ddp'}", "--grad_accum=1"], tmp_path)
    reward.main(parse_config(reward.Config, [*common, f"--out_dir={tmp_path / 'one'}", "--grad_accum=2"]))
    rows = list(zip(train_log(tmp_path / "ddp"), train_log(tmp_path / "one"), strict=True))
    assert len(rows) == 3
    for x, y in rows:
        assert all(x[k] == y[k] for k in ("step", "loss", "acc", "lr", "grad_norm")), (x, y)
    evals = [eval_log(tmp_path / d) for d in ("ddp", "one")]  # held-out means over every rank's pairs
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [0, 3]
    for x, y in zip(*evals):
        assert x["eval_acc"] == y["eval_acc"], (x, y)
        for k in ("eval_loss", "eval_margin"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), (k, x, y)
    a, b = (load_checkpoint(str(tmp_path / d / "ckpt.pt"), "reward") for d in ("ddp", "one"))
    assert a["step"] == b["step"] == 3 and a["model"].keys() == b["model"].keys()
    for k in a["model"].keys() - {"heads.reward.weight", "heads.reward.bias"}:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert all(torch.equal(a["train_head"][k], b["train_head"][k]) for k in ("weight", "bias"))
    for k in ("mean", "std"):  # fp32 scores summed in fp64, in other batches: a few fp32 roundings apart
        assert abs(a["reward_norm"][k] - b["reward_norm"][k]) < 1e-5, k
    held_out = load_preferences(data, "train[80%:]")
    prompts = [p.prompt for p in held_out] * 2
    responses = [p.chosen for p in held_out] + [p.rejected for p in held_out]
    scores = [scoring.score(scoring.load_reward_model(str(tmp_path / d / "ckpt.pt")), prompts, responses)
              for d in ("ddp", "one")]
    assert max(abs(x - y) for x, y in zip(*scores, strict=True)) < 1e-4


def test_grad_checkpointing_trains_the_same_weights(tmp_path, monkeypatch):
    """grad_checkpointing=True reaches the model (model.checkpoint runs, once per block and micro-batch) and gives
    the weights of a plain run bit for bit: the recompute repeats the forward's kernels on the same shapes."""
    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kw = dict(data_split="train", eval_split="train", max_iters=2)
    reward.main(tiny_cfg(tmp_path / "plain", str(FIX / "prefs.jsonl"), **kw))
    assert calls == []
    reward.main(tiny_cfg(tmp_path / "ckpt", str(FIX / "prefs.jsonl"), grad_checkpointing=True, **kw))
    assert len(calls) == 2 * 2 * 2  # steps x micro-batches (grad_accum 2) x blocks (n_layer 2); eval is no_grad
    assert_same_weights(tmp_path / "plain" / "out" / "ckpt.pt", tmp_path / "ckpt" / "out" / "ckpt.pt", 2, atol=0)


def test_compile_computes_what_eager_computes(tmp_path, monkeypatch):
    """--compile=True reaches torch.compile, and the compiled model computes what eager does: at step 0 (same weights,
    same batch) the same loss, accuracy and gradient norm; at step 1, after one update, the same loss and gradient
    norm. Compiled kernels add in another order, so these agree to fp32 rounding, not bit for bit: the loss (~0.7)
    to 1e-5 (~100 units of 2^-24 at 0.7), the norms to rel 1e-4.
    Why not the weights after several Adam steps: they differ by more than rounding on some CPUs. Adam moves every
    weight by ~lr whatever its gradient's size, so where a gradient is ~0 and rounding noise decides its sign (the
    biases that shift every score alike; a few entries of mlp.c_fc.weight) the runs step opposite ways and the
    weights part by up to 2 lr per step. Such a weight moves the step-1 loss by at most 2 lr x its step-1 gradient:
    with lr 1e-4 that is far below 1e-5, while the update itself moves the step-1 loss by about lr x sum |gradient|,
    orders of magnitude more."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=40)
    kw = dict(max_iters=2, learning_rate=1e-4, warmup_iters=0, eval_interval=1000)
    reward.main(tiny_cfg(tmp_path / "eager", data, **kw))
    compiled = spy_on_compile(monkeypatch)
    reward.main(tiny_cfg(tmp_path / "compiled", data, compile=True, **kw))
    assert len(compiled) == 1 and isinstance(compiled[0], GPT)
    rows = list(zip(train_log(tmp_path / "eager" / "out"), train_log(tmp_path / "compiled" / "out"), strict=True))
    assert [x["step"] for x, _ in rows] == [0, 1]
    for x, y in rows:
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
        assert abs(x["grad_norm"] / y["grad_norm"] - 1) < 1e-4, (x, y)
    assert rows[0][0]["acc"] == rows[0][1]["acc"]


def test_score_head_runs_in_fp32_under_bf16_autocast():
    """Under bf16 autocast (--dtype=bfloat16 in ppo, grpo, eval) the trunk runs in bf16 but the reward head in fp32
    from the trunk's last hidden state: the score is that fp32 linear, not a bf16-rounded one (8 bits of mantissa)."""
    model = tiny_model()
    tokens, mask = pad_right([[11, 22, 33, 44, EOS], [5, 6, EOS], [7, 8, 9, 10, 12, 13, EOS]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        r = scoring.score_tokens(model, tokens, mask)
        h = model(tokens, mask)
    last = mask.sum(1) - 1
    head = model.heads["reward"]
    expected = F.linear(h[torch.arange(3), last].float(), head.weight, head.bias).squeeze(-1)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- best.pt, pairs cut to identical
def test_best_pt_is_the_best_evaluation_normalised_and_kept_across_a_resume(tmp_path):
    """best.pt holds the weights of the evaluation with the highest held-out accuracy (the first of equals), with the
    normalisation of that evaluation folded into its head as in ckpt.pt (a consumer such as ppo.py reads either);
    the best accuracy so far travels in ckpt.pt, so a resume from a checkpoint whose best cannot be beaten leaves
    best.pt alone."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=40)
    cfg = tiny_cfg(tmp_path, data, max_iters=4, eval_interval=2, normalize_std=True, learning_rate=3e-3,
                   warmup_iters=0)
    reward.main(cfg)
    out = Path(cfg.out_dir)
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "best_eval_acc" in r]
    first_best = max(evals, key=lambda r: (r["eval_acc"], -r["step"]))
    best = load_checkpoint(str(out / "best.pt"), "reward")
    assert best["step"] == first_best["step"] and best["best_eval_acc"] == first_best["eval_acc"]
    model = scoring.load_reward_model(str(out / "best.pt"))
    held_out = load_preferences(data, cfg.eval_split)
    scores = torch.tensor(scoring.score(model, [p.prompt for p in held_out], [p.chosen for p in held_out],
                                       max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len))
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std(correction=0).item() - 1) < 1e-4
    ckpt = load_checkpoint(str(out / "ckpt.pt"), "reward")
    save_checkpoint(str(out / "ckpt.pt"), **{**ckpt, "best_eval_acc": 2.0})  # above any accuracy
    digest = file_digest(out / "best.pt")
    res = reward.main(dataclasses.replace(cfg, init_from="resume", max_iters=6))
    assert res["best_eval_acc"] == 2.0 and file_digest(out / "best.pt") == digest


def test_pairs_identical_after_truncation_are_dropped():
    """A pair whose responses differ only past max_len carries no preference once cut: it is dropped and counted (kept,
    it would be a sure tie: a zero gradient diluting the mean, and an accuracy of 0 on it)."""
    cfg = reward.Config(max_prompt_len=4, max_len=8)
    prefs = [PrefExample("Say it:", " one two three four five six", " one two three four five seven"),
             PrefExample("Say it:", " yes", " no")]
    pairs, dropped = reward.tokenize_pairs(prefs, cfg)
    p, c = tokenize_example("Say it:", " yes", 4, 8)
    _, r = tokenize_example("Say it:", " no", 4, 8)
    assert dropped == 1 and pairs == [(p + c, p + r)]
