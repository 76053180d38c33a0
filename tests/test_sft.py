"""Tests for sft.py: the masked, globally normalised loss against a naive reference; gradient accumulation equals
one big batch; a short run learns; resume is exact; a non-finite loss stops cleanly; bad data is named; a 2-process
torchrun run equals 1 process on the same global batch; gradient checkpointing changes nothing but memory."""

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

import model as model_module
import sft
from common import (batch_indices, begin_step, load_checkpoint, load_model, lr_at, make_optimizer, parse_config,
                    save_checkpoint)
from data import EOS, DataError, collate_sft, load_sft, tokenize_example
from model import GPT, GPTConfig
from tests.helpers import (assert_same_weights, cpu_setup, eval_log, file_digest, spy_on_compile, torchrun, train_log,
                           write_jsonl)

ROOT = Path(__file__).resolve().parent.parent
WORDS = "apple river stone cloud green tiger piano seven orange window silver music forest candle yellow".split()


pytestmark = pytest.mark.usefixtures("one_thread")




def copy_task(path, n=60, seed=0):
    """A learnable fixture: the completion repeats the prompt's words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": f"Repeat: {words}\n", "completion": f" {words}"})
    return write_jsonl(path, rows)


def tiny_cfg(tmp_path, data, **overrides):
    """The tiny preset the demo uses, pointed at `data` with a held-out 20%."""
    cfg = parse_config(sft.Config, [str(ROOT / "config" / "sft_tiny.py")])
    base = dict(data=data, data_split="train[:80%]", eval_split="train[80%:]", out_dir=str(tmp_path / "out"),
                eval_samples=0, eval_interval=1000)
    return dataclasses.replace(cfg, **{**base, **overrides})


ID = torch.nn.Identity()  # sft_loss's lm_head, for tests that hand it logits directly


def naive_sft_loss(logits, tokens, loss_mask):
    """Mean -log softmax over target tokens, one token at a time."""
    total, n = 0.0, 0
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if loss_mask[b, t]:
                total -= torch.log_softmax(logits[b, t - 1].double(), -1)[tokens[b, t]].item()
                n += 1
    return total / n


# ----------------------------------------------------------------------------- the loss
def test_sft_loss_matches_naive_and_ignores_prompt_labels():
    torch.manual_seed(0)
    pairs = [([5, 6, 7], [8, 9, EOS]), ([11], [12, 13, 14, 15, EOS]), ([1, 2, 3, 4], [EOS])]
    b = collate_sft(pairs)
    tokens, loss_mask = b["tokens"], b["loss_mask"]
    logits = torch.randn(*tokens.shape, 50257)
    n = loss_mask[:, 1:].sum()
    loss = sft.sft_loss(ID, logits, tokens, loss_mask, n)
    assert abs(loss.item() - naive_sft_loss(logits, tokens, loss_mask)) < 1e-5
    # Change every prompt token (and padding): as targets they are masked, and the logits are given.
    changed = torch.where(loss_mask.bool(), tokens, torch.randint(0, 50257, tokens.shape))
    assert not torch.equal(changed, tokens)
    assert sft.sft_loss(ID, logits, changed, loss_mask, n).item() == loss.item()
    # ... whereas changing one completion token does change it (the test can fail).
    changed = tokens.clone()
    changed[1, 3] = 999
    assert sft.sft_loss(ID, logits, changed, loss_mask, n).item() != loss.item()


def test_sft_loss_counts_the_final_eos():
    prompt_ids, response_ids = tokenize_example("Q: capital of Japan?\nA:", " Tokyo", 16, 32)
    assert response_ids[-1] == EOS
    b = collate_sft([(prompt_ids, response_ids)])
    assert b["loss_mask"].sum() == len(response_ids)  # the EOS is a target
    eos_at = len(prompt_ids) + len(response_ids) - 1
    assert b["tokens"][0, eos_at] == EOS and b["loss_mask"][0, eos_at] == 1
    logits = torch.zeros(1, eos_at + 1, 50257)
    base = sft.sft_loss(ID, logits, b["tokens"], b["loss_mask"], 1.0)
    logits[0, eos_at - 1, EOS] = 10.0  # the model now predicts the EOS: only that target's loss drops
    assert sft.sft_loss(ID, logits, b["tokens"], b["loss_mask"], 1.0) < base - 5


def test_grad_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    # completions of very different lengths: a mean of micro-batch means would weight them differently
    pairs = [([1, 2, 3], [4, EOS]), ([5, 6], [7, 8, 9, 10, 11, 12, 13, EOS]), ([14], [15, EOS]),
             ([16, 17, 18, 19], [20, 21, 22, 23, 24, 25, EOS])]

    def grads(batches):
        model.zero_grad()
        loss, n_tokens = sft.forward_backward(model, model.lm_head, batches, cpu_setup())
        return loss, [p.grad.clone() for p in model.parameters()]

    loss1, g1 = grads([collate_sft(pairs)])
    loss2, g2 = grads([collate_sft(pairs[:1]), collate_sft(pairs[1:3]), collate_sft(pairs[3:])])
    assert abs(loss1 - loss2) <= 1e-5
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    # a naive mean of micro-batch means differs: the test above can fail
    with torch.no_grad():
        means = [sft.sft_loss(model.lm_head, model(b["tokens"], b["mask"]), b["tokens"], b["loss_mask"],
                              b["loss_mask"][:, 1:].sum()).item()
                 for b in (collate_sft(pairs[:1]), collate_sft(pairs[1:3]), collate_sft(pairs[3:]))]
    assert abs(sum(means) / 3 - loss1) > 1e-3


def test_batch_indices_are_epochs_of_permutations():
    idx = [i for step in range(5) for i in batch_indices(step, 4, 10, seed=3)]
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    assert idx[:10] != list(range(10))  # shuffled
    assert batch_indices(3, 4, 10, seed=3) == idx[12:16]  # a pure function of (seed, step)


# ----------------------------------------------------------------------------- end to end
def test_short_run_lowers_heldout_loss(tmp_path):
    cfg = tiny_cfg(tmp_path, copy_task(tmp_path / "copy.jsonl"), max_iters=30, learning_rate=1e-2, eval_interval=15,
                   eval_samples=1, max_new_tokens=4)
    out = sft.main(cfg)
    assert out["eval_loss"] < out["eval_loss_start"] - 2.0, out
    out_dir = Path(cfg.out_dir)
    assert (out_dir / "ckpt.pt").exists() and (out_dir / "best.pt").exists()
    assert load_checkpoint(str(out_dir / "ckpt.pt"), "sft")["step"] == 30
    assert abs(load_checkpoint(str(out_dir / "best.pt"), "sft")["best_eval_loss"] - out["best_eval_loss"]) < 1e-9
    hf, _ = load_model(str(out_dir / "hf"))  # the exported HF folder loads back with the same weights
    ours, _ = load_model(str(out_dir / "ckpt.pt"))
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), ours.state_dict().values()))
    lines = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    # one row per step, one per evaluation: before training, at step 15 and at the end
    assert [x["step"] for x in lines if "loss" in x] == list(range(30))
    assert [x["step"] for x in lines if "eval_loss" in x] == [0, 15, 30]


def test_chosen_responses_of_hh_dialogues(tmp_path):
    # data_format="chosen": SFT on a preference set's chosen responses, prompt split off by load_preferences
    cfg = tiny_cfg(tmp_path, str(ROOT / "tests" / "fixtures" / "data" / "hh.jsonl"), data_format="chosen",
                   data_split="train", eval_split="train", max_iters=2, grad_accum=1)
    out = sft.main(cfg)
    assert out["eval_loss"] < out["eval_loss_start"]


def test_resume_equals_uninterrupted_run(tmp_path):
    data = copy_task(tmp_path / "copy.jsonl", n=20)
    # dropout on: the resumed run must also restore the RNG state
    kw = dict(max_iters=6, lr_decay_iters=6, warmup_iters=2, learning_rate=1e-2, dropout=0.1)
    sft.main(tiny_cfg(tmp_path / "a", data, **kw))
    sft.main(tiny_cfg(tmp_path / "b", data, **{**kw, "max_iters": 3}))
    sft.main(tiny_cfg(tmp_path / "b", data, **{**kw, "init_from": "resume"}))
    assert_same_weights(tmp_path / "a" / "out" / "ckpt.pt", tmp_path / "b" / "out" / "ckpt.pt", step=6, atol=0)


def test_nonfinite_loss_stops_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, copy_task(tmp_path / "copy.jsonl", n=20), max_iters=2, grad_accum=1)
    sft.main(cfg)
    path = Path(cfg.out_dir) / "ckpt.pt"
    digest = file_digest(path)
    real_loss, calls = sft.sft_loss, []

    def nan_on_second_step(*args):  # a NaN in the training loss of the 2nd step after resuming (step 3)
        loss = real_loss(*args)
        if torch.is_grad_enabled():  # training, not eval
            calls.append(1)
            if len(calls) == 2:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(sft, "sft_loss", nan_on_second_step)
    with pytest.raises(RuntimeError, match=r"step 3: loss is nan"):
        sft.main(dataclasses.replace(cfg, init_from="resume", max_iters=6))
    # step 2 updated the weights in memory only; the failure at step 3 wrote nothing: ckpt.pt is the step-2 file
    assert file_digest(path) == digest
    ckpt = load_checkpoint(str(path), "sft")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bad_row_names_file_row_and_field(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 3}])
    with pytest.raises(DataError, match=r"bad\.jsonl: row 2: field 'completion'"):
        sft.main(tiny_cfg(tmp_path, data, data_split="train", eval_split="train"))


def test_torchrun_two_processes_equal_one_process(tmp_path):
    """2 ranks x 2 sequences == 1 process x 2 micro-batches of 2: rank r runs the process's micro-batch r
    (common.rank_batch), so the loss, the gradient norm and the weights are the same, bit for bit."""
    data = copy_task(tmp_path / "copy.jsonl", n=20)
    common = ["config/sft_tiny.py", "--data=" + data, "--data_split=train[:80%]", "--eval_split=train[80%:]",
              "--max_iters=3", "--batch_size=2", "--eval_interval=1000", "--eval_samples=0", "--learning_rate=1e-2"]
    r = torchrun("sft.py", [*common, f"--out_dir={tmp_path / 'ddp'}", "--grad_accum=1"], tmp_path)
    assert "step 2 | loss" in r.stdout
    sft.main(parse_config(sft.Config, [*common, f"--out_dir={tmp_path / 'one'}", "--grad_accum=2"]))
    assert_same_weights(tmp_path / "ddp" / "ckpt.pt", tmp_path / "one" / "ckpt.pt", step=3, atol=0)
    # Adam is blind to a gradient's scale, so compare the logged loss and gradient norm too (a missing world_size
    # factor halves the norm and leaves the weights alone)
    for x, y in zip(train_log(tmp_path / "ddp"), train_log(tmp_path / "one"), strict=True):
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"], (x, y)
    # the held-out loss is the mean over every rank's targets (the same weights, other eval batches: rounding)
    evals = [eval_log(tmp_path / d) for d in ("ddp", "one")]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [0, 3]
    for x, y in zip(*evals):
        assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-5), (x, y)


def test_grad_checkpointing_trains_the_same_weights(tmp_path, monkeypatch):
    """grad_checkpointing=True recomputes every block in backward (model.checkpoint really runs, once per block and
    micro-batch) and ends with the weights of a plain run bit for bit, dropout included: the recompute replays the
    forward's dropout masks."""
    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    data = copy_task(tmp_path / "copy.jsonl", n=20)
    kw = dict(max_iters=3, learning_rate=1e-2, dropout=0.1)
    sft.main(tiny_cfg(tmp_path / "plain", data, **kw))
    assert calls == []
    sft.main(tiny_cfg(tmp_path / "ckpt", data, grad_checkpointing=True, **kw))
    assert len(calls) == 3 * 2 * 2  # steps x micro-batches (grad_accum 2) x blocks (n_layer 2); eval is no_grad
    assert_same_weights(tmp_path / "plain" / "out" / "ckpt.pt", tmp_path / "ckpt" / "out" / "ckpt.pt", 3, atol=0)


def test_compile_trains_like_eager(tmp_path, monkeypatch):
    """--compile=True (torch.compile of the model, inductor on CPU) computes what eager computes: the same loss and
    gradient norm at every step, to fp32 rounding. Not the weights after Adam: Adam turns rounding noise in a
    near-zero gradient into a full learning-rate step, so weights may differ by ~lr wherever kernels round
    differently (they do between CPU kinds), while the losses, smooth in the weights, stay equal to rounding."""
    data = copy_task(tmp_path / "copy.jsonl", n=20)
    kw = dict(max_iters=3, lr_decay_iters=3, warmup_iters=1, learning_rate=1e-2)
    sft.main(tiny_cfg(tmp_path / "eager", data, **kw))
    compiled = spy_on_compile(monkeypatch)
    sft.main(tiny_cfg(tmp_path / "compiled", data, compile=True, **kw))
    assert len(compiled) == 1
    for x, y in zip(train_log(tmp_path / "eager" / "out"), train_log(tmp_path / "compiled" / "out"), strict=True):
        assert abs(x["loss"] / y["loss"] - 1) < 1e-4 and abs(x["grad_norm"] / y["grad_norm"] - 1) < 1e-3, (x, y)


def test_learning_rate_schedule_by_hand():
    """lr_at: linear warmup to the peak over warmup_iters, cosine to min_lr_ratio * peak at decay_iters, flat after;
    a warmup that ends at or after decay_iters goes straight to the minimum (not one step back at the peak)."""
    lr = lambda step, warmup, decay: lr_at(step, 1.0, warmup, decay, min_lr_ratio=0.1)
    assert [lr(t, 4, 12) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4, 4, 12) == 1.0  # the cosine's start
    assert lr(8, 4, 12) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi / 2) = 0
    assert lr(10, 4, 12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr(12, 4, 12) == lr(50, 4, 12) == pytest.approx(0.1)
    assert [lr(t, 5, 5) for t in range(7)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 0.1, 0.1])
    assert [lr(t, 0, 0) for t in range(2)] == pytest.approx([0.1, 0.1])


# ---------------------------------------------------------------------------- seeds, batches, optimizer
def test_each_step_and_rank_draws_its_own_random_numbers():
    """begin_step seeds from (seed, step, rank): every (step, rank) its own dropout stream (ranks do not repeat each
    other's masks, nor a neighbouring step's), and the same stream again for the same (step, rank) (resume)."""
    cfg = sft.Config(seed=3)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def draw(step, rank):
        s = cpu_setup(rank, 4)
        begin_step(opt, step, cfg, s)
        return tuple(torch.rand(4).tolist())

    draws = {(step, rank): draw(step, rank) for step in range(4) for rank in range(4)}
    assert len(set(draws.values())) == len(draws)
    assert draw(2, 1) == draws[(2, 1)]


def test_every_epoch_is_a_new_permutation():
    epochs = [batch_indices(e, 10, 10, seed=3) for e in range(4)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4


def test_weight_decay_on_matrices_and_embeddings_only():
    """AdamW decays the weight matrices and embeddings (the tied wte / lm_head once), not biases or LayerNorms."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=4, heads={"value": 1}))
    decay, no_decay = make_optimizer(m, sft.Config(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in m.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        ["wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight",
         "h.0.mlp.c_proj.weight", "heads.value.weight"])
    assert all(names[id(p)].endswith(".bias") or ".ln_" in f".{names[id(p)]}" for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_load_model_starts_a_head_of_another_shape_fresh(tmp_path):
    """load_model(heads=...): a checkpoint head of the same name and shape keeps its weights, one of another shape is
    initialised fresh (not a size-mismatch error)."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=4, heads={"value": 3, "v": 1})
    m = GPT(cfg)
    from dataclasses import asdict
    save_checkpoint(str(tmp_path / "c.pt"), kind="sft", model_config=asdict(cfg), model=m.state_dict(), step=0)
    loaded, _ = load_model(str(tmp_path / "c.pt"), heads={"value": 1, "v": 1})
    assert loaded.heads["value"].weight.shape == (1, 4)
    assert torch.equal(loaded.heads["v"].weight, m.heads["v"].weight)


# ---------------------------------------------------------------------------- held-out loss, best.pt
def test_evaluation_is_the_mean_loss_over_the_held_out_targets(tmp_path):
    """main's held-out loss at step 0 is the mean -log p over the completion tokens (EOS included) of the eval split's
    rows only, in eval mode (the start has dropout 0.1), whatever the eval batches: a naive loop over the rows, one
    unpadded sequence at a time."""
    data = copy_task(tmp_path / "copy.jsonl", n=20)
    torch.manual_seed(0)
    start = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    init = str(tmp_path / "start.pt")
    save_checkpoint(init, kind="sft", model_config=dataclasses.asdict(start.config), model=start.state_dict(), step=0)
    cfg = tiny_cfg(tmp_path, data, init_from=init, max_iters=0, eval_batch_size=3)
    out = sft.main(cfg)
    start.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in load_sft(data, cfg.eval_split):
            p, r = tokenize_example(ex.prompt, ex.completion, cfg.max_prompt_len, cfg.max_len)
            logprobs = torch.log_softmax(start.lm_head(start(torch.tensor([p + r]))).double(), -1)[0]
            total -= sum(logprobs[len(p) - 1 + i, tok].item() for i, tok in enumerate(r))
            n += len(r)
    assert out["eval_loss_start"] == pytest.approx(total / n, rel=1e-5)


def test_best_pt_is_rewritten_only_by_a_better_evaluation_also_after_a_resume(tmp_path):
    """The best held-out loss so far travels in ckpt.pt: a run resumed from a checkpoint whose best no evaluation can
    beat (0) leaves best.pt as it was and ends with that best."""
    cfg = tiny_cfg(tmp_path, copy_task(tmp_path / "copy.jsonl", n=20), max_iters=2, eval_interval=1, grad_accum=1)
    sft.main(cfg)
    out = Path(cfg.out_dir)
    best = load_checkpoint(str(out / "best.pt"), "sft")
    evals = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "best_eval_loss" in r]
    assert best["best_eval_loss"] == min(r["eval_loss"] for r in evals)
    ckpt = load_checkpoint(str(out / "ckpt.pt"), "sft")
    save_checkpoint(str(out / "ckpt.pt"), **{**ckpt, "best_eval_loss": 0.0})
    digest = file_digest(out / "best.pt")
    res = sft.main(dataclasses.replace(cfg, init_from="resume", max_iters=4))
    assert res["best_eval_loss"] == 0.0 and file_digest(out / "best.pt") == digest
