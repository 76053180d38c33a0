"""Tests for reward.py: the Bradley-Terry loss by hand; the score is read at the last real token whatever the padding;
a short run learns an easy preference; the stored normalisation gives mean 0 (std 1); resume is exact; every
preference format and init (SFT checkpoint, HF folder) works; bad data is named; a 2-process torchrun run equals 1
process on the same global batch; gradient checkpointing changes nothing but memory."""

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch

import model as model_module
import reward
from common import load_checkpoint, parse_config, save_checkpoint
from data import EOS, DataError, load_preferences, pad_left, pad_right, tokenize_example
from model import GPT, GPTConfig
from tests.helpers import assert_same_weights, spy_on_compile, torchrun, train_log, write_jsonl

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


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, heads={"reward": 1})).eval()


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
    r = reward.score_tokens(model, tokens, mask)
    assert r.dtype == torch.float32 and r.shape == (1,)
    # right padding with junk after the EOS, in a batch with a longer row
    tokens2 = torch.tensor([seq + [7, 8, 9, EOS, 5], list(range(100, 110))])
    mask2 = torch.tensor([[1] * 5 + [0] * 5, [1] * 10])
    assert torch.allclose(reward.score_tokens(model, tokens2, mask2)[0], r[0], atol=1e-5)
    # left padding
    tokens3, mask3 = pad_left([seq, list(range(100, 110))])
    assert torch.allclose(reward.score_tokens(model, tokens3, mask3)[0], r[0], atol=1e-5)
    # the score does depend on the last real token (these comparisons can fail)
    assert not torch.allclose(reward.score_tokens(model, torch.tensor([seq[:-1] + [45]]), mask), r, atol=1e-3)
    assert not torch.allclose(reward.score_tokens(model, tokens2, torch.ones_like(mask2))[0], r[0], atol=1e-3)


def test_score_api_tokenizes_with_eos_and_batches():
    model = tiny_model()
    prompts, responses = ["Hello", "A much longer prompt here", ""], [" world", " yes", "Only a response."]
    scores = reward.score(model, prompts, responses, batch_size=2, max_prompt_len=8, max_len=24)
    for p, r, sc in zip(prompts, responses, scores):
        ids = sum(tokenize_example(p, r, 8, 24), [])
        assert ids[-1] == EOS
        assert abs(reward.score_tokens(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
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


# ----------------------------------------------------------------------------- end to end
def test_short_run_learns_easy_preference_and_normalizes(tmp_path):
    data = marker_prefs(tmp_path / "marker.jsonl")
    cfg = tiny_cfg(tmp_path, data, max_iters=60, learning_rate=3e-3, warmup_iters=5, batch_size=16, grad_accum=1,
                   eval_interval=30, normalize_std=True)
    out = reward.main(cfg)
    assert out["eval_acc"] >= 0.9, out
    # (a random model may already rank one fixed marker word consistently: the loss shows what was learnt)
    assert out["eval_loss"] < 0.1 < out["eval_loss_start"], out
    # every consumer of the checkpoint gets normalised scores: the held-out chosen responses have mean 0, std 1
    model = reward.load_reward_model(str(Path(cfg.out_dir) / "ckpt.pt"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    held_out = load_preferences(data, cfg.eval_split)
    scores = torch.tensor(reward.score(model, [p.prompt for p in held_out], [p.chosen for p in held_out],
                                       max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len))
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std(correction=0).item() - 1) < 1e-4
    ckpt = load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"), "reward")
    assert abs(ckpt["reward_norm"]["mean"] - out["ref_mean"]) < 1e-9 and ckpt["reward_norm"]["scaled_by"] != 1.0
    rejected = reward.score(model, [p.prompt for p in held_out], [p.rejected for p in held_out],
                            max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len)
    assert sum(c > r for c, r in zip(scores.tolist(), rejected)) >= 0.9 * len(held_out)


def test_mean_only_normalization_on_a_custom_reference_set(tmp_path):
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"prompt": "Q:", "completion": f" answer {i}"} for i in range(7)])
    cfg = tiny_cfg(tmp_path, str(FIX / "prefs.jsonl"), data_split="train", eval_split="train", max_iters=2,
                   norm_data=ref)
    reward.main(cfg)
    model = reward.load_reward_model(str(Path(cfg.out_dir) / "ckpt.pt"))
    scores = torch.tensor(reward.score(model, ["Q:"] * 7, [f" answer {i}" for i in range(7)],
                                       max_prompt_len=cfg.max_prompt_len, max_len=cfg.max_len))
    assert abs(scores.mean().item()) < 1e-5
    assert load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))["reward_norm"]["scaled_by"] == 1.0


def test_resume_equals_uninterrupted_run(tmp_path):
    data = marker_prefs(tmp_path / "marker.jsonl", n=40)
    kw = dict(max_iters=6, lr_decay_iters=6, warmup_iters=2, normalize_std=True, eval_interval=2)
    reward.main(tiny_cfg(tmp_path / "a", data, **kw))
    reward.main(tiny_cfg(tmp_path / "b", data, **{**kw, "max_iters": 3}))
    reward.main(tiny_cfg(tmp_path / "b", data, **{**kw, "init_from": "resume"}))
    assert_same_weights(tmp_path / "a" / "out" / "ckpt.pt", tmp_path / "b" / "out" / "ckpt.pt", step=6)


@pytest.mark.parametrize("fixture", ["prefs.jsonl", "hh.jsonl", "tldr.jsonl"])
def test_every_preference_format(tmp_path, fixture):
    cfg = tiny_cfg(tmp_path, str(FIX / fixture), data_split="train", eval_split="train", max_iters=1, grad_accum=1)
    out = reward.main(cfg)
    assert math.isfinite(out["loss"]) and 0 <= out["eval_acc"] <= 1


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
        model = reward.load_reward_model(str(Path(cfg.out_dir) / "ckpt.pt"))
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
    """2 ranks x 2 pairs == 1 process x 2 micro-batches of 2 pairs: the same global batch gives the same loss,
    accuracy and gradient norm at every step, the same weights to 1e-5 (float32: the runs add the same numbers in
    another order) and the same normalised scores to 1e-4."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=20)
    common = [str(ROOT / "config" / "reward_tiny.py"), "--data=" + data, "--data_split=train[:80%]",
              "--eval_split=train[80%:]", "--max_iters=3", "--batch_size=2", "--eval_interval=1000",
              "--normalize_std=True"]
    torchrun("reward.py", [*common, f"--out_dir={tmp_path / 'ddp'}", "--grad_accum=1"], tmp_path)
    reward.main(parse_config(reward.Config, [*common, f"--out_dir={tmp_path / 'one'}", "--grad_accum=2"]))
    # Adam is blind to a gradient's scale: the logged gradient norm shows a wrong factor the weights would hide
    for x, y in zip(train_log(tmp_path / "ddp"), train_log(tmp_path / "one"), strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5 and x["acc"] == y["acc"], (x, y)
        assert abs(x["grad_norm"] / y["grad_norm"] - 1) < 1e-4, (x, y)
    a, b = (load_checkpoint(str(tmp_path / d / "ckpt.pt"), "reward") for d in ("ddp", "one"))
    assert a["step"] == b["step"] == 3 and abs(a["reward_norm"]["std"] - b["reward_norm"]["std"]) < 1e-5
    # The loss sees only r_chosen - r_rejected, so what shifts every score alike (the head's bias, ln_f's bias, the
    # attention key biases) has a gradient of exactly 0, i.e. float noise, which Adam turns into +-lr steps that
    # differ between the runs. Those parameters are left out here; the scores below show they change nothing.
    C = a["model_config"]["n_embd"]
    for k in a["model"]:
        if k in ("heads.reward.bias", "ln_f.bias"):
            continue
        x, y = a["model"][k], b["model"][k]
        if k.endswith("attn.c_attn.bias"):  # (q, k, v) biases: drop the key's
            x, y = torch.cat([x[:C], x[2 * C:]]), torch.cat([y[:C], y[2 * C:]])
        assert torch.allclose(x, y, atol=1e-5, rtol=0), k
    held_out = load_preferences(data, "train[80%:]")
    prompts, responses = [p.prompt for p in held_out] * 2, [p.chosen for p in held_out] + [p.rejected for p in held_out]
    scores = [reward.score(reward.load_reward_model(str(tmp_path / d / "ckpt.pt")), prompts, responses)
              for d in ("ddp", "one")]
    assert max(abs(x - y) for x, y in zip(*scores)) < 1e-4


def test_grad_checkpointing_trains_the_same_weights(tmp_path, monkeypatch):
    """grad_checkpointing=True reaches the model (model.checkpoint runs, once per block and micro-batch) and gives
    the weights of a plain run to 1e-6."""
    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kw = dict(data_split="train", eval_split="train", max_iters=2)
    reward.main(tiny_cfg(tmp_path / "plain", str(FIX / "prefs.jsonl"), **kw))
    assert calls == []
    reward.main(tiny_cfg(tmp_path / "ckpt", str(FIX / "prefs.jsonl"), grad_checkpointing=True, **kw))
    assert len(calls) == 2 * 2 * 2  # steps x micro-batches (grad_accum 2) x blocks (n_layer 2); eval is no_grad
    assert_same_weights(tmp_path / "plain" / "out" / "ckpt.pt", tmp_path / "ckpt" / "out" / "ckpt.pt", 2, atol=1e-6)


def test_compile_trains_like_eager(tmp_path, monkeypatch):
    """--compile=True (torch.compile of the model, inductor on CPU) trains to the same weights as eager, to rounding."""
    data = marker_prefs(tmp_path / "marker.jsonl", n=40)
    kw = dict(max_iters=3, lr_decay_iters=3, warmup_iters=1, eval_interval=3)
    reward.main(tiny_cfg(tmp_path / "eager", data, **kw))
    compiled = spy_on_compile(monkeypatch)
    reward.main(tiny_cfg(tmp_path / "compiled", data, compile=True, **kw))
    assert len(compiled) == 1
    a, b = (load_checkpoint(str(tmp_path / run / "out" / "ckpt.pt")) for run in ("eager", "compiled"))
    assert a["step"] == b["step"] == 3 and a["model"].keys() == b["model"].keys()
    # ln_f.bias and the head's bias shift chosen and rejected alike: their Bradley-Terry gradient is exactly 0, so
    # Adam turns rounding noise into steps of +-lr there (and the head bias also holds the score normalisation)
    for k in a["model"].keys() - {"ln_f.bias", "heads.reward.bias"}:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-4, rtol=0, msg=k)
