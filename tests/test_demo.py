"""Tests for demo.py's own parts and its review task (reviews.py): the corpus generator, the gold labeler,
Bradley-Terry noise, pair labeling, sampling, KL to the reference (against a per-sample naive computation),
best-of-n, win rate and the report; then the whole pipeline end to end, and an --only=ilql rerun on its outputs."""

import json
import math
import random
import sys
from contextlib import nullcontext
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest
import torch

import common
import data
import demo
import reviews
from common import ConfigError, Setup
from model import GPT, GPTConfig, Head


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def tiny_gpt(seed, heads=None):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, heads=heads or {})).eval()

# ----------------------------------------------------------------------------- corpus


def test_corpus_deterministic_per_seed():
    assert reviews.make_corpus(300, 7) == reviews.make_corpus(300, 7)
    assert reviews.make_corpus(300, 7) != reviews.make_corpus(300, 8)


def test_corpus_has_both_sentiments_and_is_clean_under_gold():
    rows = reviews.make_corpus(3000, 0)
    moods = {r["sentiment"] for r in rows}
    assert moods == {"positive", "negative", "mixed"}
    frac = {m: sum(r["sentiment"] == m for r in rows) / len(rows) for m in moods}
    assert abs(frac["positive"] - 0.4) < 0.04 and abs(frac["negative"] - 0.4) < 0.04
    assert len({r["prompt"] + r["completion"] for r in rows}) > 2000  # variety
    for r in rows:
        c = r["completion"]
        assert c.startswith(" ") and c.rstrip()[-1] in ".!", c
        parts = reviews.gold_parts(c)
        # the corpus is what a good writer writes: no repetition, no unknown word, always an ending
        assert parts["repeated_words"] == parts["repeated_bigrams"] == parts["unknown_words"] == 0, (c, parts)
        assert not parts["no_ending"] and parts["extra_words"] == 0, c
        # and the gold agrees with the generator's sentiment, negations included ("not bad at all")
        if r["sentiment"] == "positive":
            assert parts["sentiment"] > 0, c
        elif r["sentiment"] == "negative":
            assert parts["sentiment"] < 0, c
        else:
            assert abs(parts["sentiment"]) <= 1, c

# ----------------------------------------------------------------------------- gold labeler


@pytest.mark.parametrize("response, expected", [
    (" really great, and the plot was clever.", 2.0),             # 2 positive words
    (" really awful, and the plot was dull.", -2.0),              # 2 negative words
    (" not bad at all.", 1.0),                                    # negated negative
    (" I would not recommend it.", -1.0),                         # negated positive
    (" great, wonderful, brilliant, excellent and moving.", 3.0),  # 5 positive words, clipped to 3
    (" great great great great", -0.5),  # 3 (clipped 4) - 0.5*3 repeated words - 0.5*2 repeated bigrams - 1 no end
    (" the plot was good", 0.0),                                  # 1 - 1 (no final "." or "!")
    (" good.", 0.0),                                              # 1 - 1 (fewer than 3 words)
    ("", -2.0),                                                   # no ending, too short
    (" the plot was xyzzy and great.", 0.5),                      # 1 - 0.5 (unknown word)
    (" the plot was great and the plot was great.", -0.5),        # 2 - 0.5*(2 words + 3 bigrams repeated)
    # 34 words: 1 - 0.5*(9 repeated "cast" + 26 repeated bigrams: "and the" 9, "the cast" 9, "cast and" 8) - 0.1*4
    (" the plot was good" + " and the cast" * 10 + ".", -16.9),
])
def test_gold_score_documented_values(response, expected):
    assert reviews.gold_score("The acting in this film was", response) == pytest.approx(expected)


def test_gold_positive_beats_negative_and_degenerate():
    g = lambda r: reviews.gold_score("This movie", r)
    assert g(" is great. I would recommend it to anyone!") > g(" is awful. I would not recommend it.")
    assert g(" is great.") > g(" is great")                    # ending
    assert g(" is great and clever.") > g(" is great great.")   # repetition

# ----------------------------------------------------------------------------- Bradley-Terry noise and labeling


def test_bt_prob_values():
    assert demo.bt_prob(1.0, 1.0) == 0.5
    assert demo.bt_prob(2.0, 0.5, 0.5) == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert demo.bt_prob(0.0, 1000.0) == pytest.approx(0.0) and demo.bt_prob(1000.0, 0.0) == 1.0  # no overflow
    assert (demo.bt_prob(1, 0, 0), demo.bt_prob(0, 1, 0), demo.bt_prob(1, 1, 0)) == (1.0, 0.0, 0.5)


@pytest.mark.parametrize("a, b, T", [(1.0, 0.3, 0.5), (-1.0, 0.0, 1.0), (2.0, 2.0, 1.0)])
def test_bt_label_frequency_matches_probability(a, b, T):
    rng = random.Random(0)
    freq = sum(demo.bt_label(a, b, rng, T) for _ in range(20000)) / 20000
    assert abs(freq - 1 / (1 + math.exp(-(a - b) / T))) < 0.01


def test_label_pairs_roundtrip_through_load_preferences(tmp_path):
    prompts = ["This movie", "This film", "The remake", "This sequel", "This movie"]
    a = [" is great.", " is awful.", " is fine.", "", " is dull, really."]
    b = [" is awful.", " is great and clever.", " is fine.", " is good.", " is nice"]
    path = str(tmp_path / "prefs.jsonl")
    rows = demo.label_pairs(prompts, a, b, reviews.gold_score, seed=0, temperature=1.0, path=path)
    assert len(rows) == 3  # the identical pair and the pair with an empty response are skipped
    assert [r["prompt"] for r in rows] == ["This movie", "This film", "This movie"]
    assert all({r["chosen"], r["rejected"]} == {x, y} for r, x, y in zip(rows, [a[0], a[1], a[4]], [b[0], b[1], b[4]]))
    loaded = data.load_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded] == [tuple(r.values()) for r in rows]
    assert all(list(r) == ["prompt", "chosen", "rejected"] for r in rows)
    assert demo.label_pairs(prompts, a, b, reviews.gold_score, seed=0) == rows  # seeded
    # the noiseless labeler always prefers the higher gold score
    for r in demo.label_pairs(prompts, a, b, reviews.gold_score, seed=1, temperature=0):
        assert reviews.gold_score(r["prompt"], r["chosen"]) > reviews.gold_score(r["prompt"], r["rejected"])


# ----------------------------------------------------------------------------- sampling, best-of-n, curves, report
# (sampling, KL and win rates themselves are eval.py's: tests/test_eval.py)


def test_sample_pairs_seeded():
    model = tiny_gpt(0)
    prompts = ["The acting in this film was", "This movie", "I watched this movie with my family and"]
    sampling = dict(max_new_tokens=6, max_prompt_len=32, batch_size=2)
    a, b = demo.sample_pairs(model, prompts, 3, **sampling)
    assert len(a) == len(b) == 3 and a != b
    assert (a, b) == demo.sample_pairs(model, prompts, 3, **sampling)
    assert (a, b) != demo.sample_pairs(model, prompts, 4, **sampling)


def test_best_of_n_picks_the_reward_models_favourite(monkeypatch):
    # scoring.score with a stand-in head: the number of real tokens (longer = better), so the pick is checkable.
    import scoring
    monkeypatch.setattr(scoring, "score_tokens", lambda model, tokens, mask: mask.sum(-1).float())
    model = tiny_gpt(0)
    prompts, n = ["This movie", "The remake"], 4
    best, scores = demo.best_of_n(model, model, prompts, n, 5, max_new_tokens=8, max_prompt_len=32)
    texts, _ = demo.sample_policy(model, [p for p in prompts for _ in range(n)], 5, max_new_tokens=8, max_prompt_len=32)
    for i, p in enumerate(prompts):
        lengths = [len(data.encode(p)) + len(data.encode(t)) + 1 for t in texts[i * n:(i + 1) * n]]  # + EOS
        assert scores[i] == max(lengths)
        assert best[i] == texts[i * n + lengths.index(max(lengths))]


def test_best_of_n_curve_is_best_of_n_over_one_pool(monkeypatch):
    """The curve's point n is best-of-n on the first n samples of each prompt's pool (RM: the response's length), with
    the analytic KL log n - (n - 1) / n; the gold is of the picked texts."""
    import scoring
    monkeypatch.setattr(scoring, "score_tokens", lambda model, tokens, mask: mask.sum(-1).float())
    model = tiny_gpt(0)
    cfg = demo.Config(n_probe_prompts=3, curve_n=4, seed=0)
    task = demo.load_task("reviews")
    sampling = dict(max_new_tokens=8, max_prompt_len=32)
    s = Setup(ddp=False, rank=0, local_rank=0, world_size=1, device="cpu", master=True, autocast=nullcontext)
    curve = demo.best_of_n_curve(model, model, task, cfg, s, sampling)
    prompts = [r["prompt"] for r in task.make_corpus(3, cfg.seed + 6)]
    texts, _ = demo.sample_policy(model, [p for p in prompts for _ in range(4)], cfg.seed + 7, **sampling)
    assert [c["n"] for c in curve] == [1, 2, 4]
    for c in curve:
        n = c["n"]
        picked = [max(texts[i * 4:i * 4 + n], key=lambda t, p=p: len(data.encode(p + t)))
                  for i, p in enumerate(prompts)]
        assert c["gold"] == pytest.approx(sum(reviews.gold_score(p, t) for p, t in zip(prompts, picked)) / 3)
        assert c["kl"] == pytest.approx(math.log(n) - (n - 1) / n)
    assert curve[0]["rm"] <= curve[1]["rm"] <= curve[2]["rm"]  # best of more is never worse by the RM


def test_with_sizes_keeps_what_was_set():
    cfg = demo.with_sizes(demo.Config(ppo_iters=7), dict(ppo_iters=2, sft_iters=3))
    assert (cfg.ppo_iters, cfg.sft_iters) == (7, 3)


def test_write_report(tmp_path):
    results = {"methods": {"SFT": dict(gold=0.1, rm=0.0, kl=0.0, win_rate=0.5, samples=[("This movie", " is ok.")]),
                           "PPO": dict(gold=1.5, rm=2.0, kl=3.2, win_rate=0.8, samples=[("This film", " is great!")])},
               "rm_accuracy": 0.85, "target_kl": 6.0, "title": "RLHF demo: positive movie reviews"}
    ppo_log = [{"step": s, "score": 0.1 * s, "kl": 0.05 * s, "beta": 0.05} for s in range(5)]
    curves = {"PPO": [dict(step=s, kl=s, gold=0.1 * s, rm=0.2 * s) for s in range(3)],
              "best-of-n": [dict(n=n, kl=math.log(n) - (n - 1) / n, gold=0.1, rm=0.2) for n in (1, 2, 4)]}
    demo.write_report(str(tmp_path), results, curves, ppo_log)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# RLHF demo: positive movie reviews\n")
    assert "| method | gold score | RM score | KL | gold win rate vs SFT |" in report
    assert "| PPO | 1.500 | 2.000 | 3.200 | 0.800 |" in report and "0.850" in report and "is great!" in report
    for png in ("ppo_training.png", "over_optimisation.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in report


def test_run_record_stage_times_and_machine(monkeypatch):
    """Each stage's time is from its start to the next stage's (the last one's to the end), with the CPU named."""
    monkeypatch.setattr(demo.time, "time", lambda: 150.0)
    clock = [("start", 0.0), ("corpus", 0.0), ("SFT", 6.0), ("label", 36.0)]
    s = SimpleNamespace(device="cpu")
    line = demo.run_record(clock, s, demo.Config(seed=7))
    assert line.startswith("done in 2.5 min (stages, min: corpus 0.1, SFT 0.5, label 1.9) on CPU "), line
    assert line.endswith(f"{torch.get_num_threads()} threads, bfloat16, seed 7")
    if sys.platform == "linux":
        assert common.cpu_info() in line and common.cpu_info().split(" (")[0] in open("/proc/cpuinfo").read()


@pytest.mark.parametrize("on", [False, True])
def test_every_stage_runs_the_demos_head_precision(tmp_path, monkeypatch, on):
    """fp32_heads reaches the four trainers that have it and every policy the demo loads to sample or measure KL:
    a stage left at the trainers' default (fp32) would sample another policy than the one the demo evaluates."""
    import dpo, grpo, ilql, ppo
    seen, configs = {}, {}
    for module in (ppo, grpo, dpo, ilql):
        monkeypatch.setattr(module, "main", lambda c, name=module.__name__: configs.setdefault(name, c)
                            and seen.setdefault(name, c.fp32_heads))
    cfg, path = demo.Config(fp32_heads=on), lambda *parts: str(tmp_path.joinpath(*parts))
    shared = dict(device="cpu", dtype="bfloat16", seed=1, beta2=0.95, max_prompt_len=cfg.max_prompt_len)
    demo.ppo_trainer(cfg, path, shared)(1, "init")
    demo.grpo_trainer(cfg, path, shared)(1, "init")
    demo.train_dpo(cfg, path, shared)
    demo.train_ilql(cfg, path, shared)
    assert seen == {"ppo": on, "grpo": on, "dpo": on, "ilql": on}
    assert configs["grpo"].kl_estimator == "k1"  # the demo's GRPO: its KL in the reward (docs/results.md)
    gpt = tiny_gpt(0, heads={"v": 1})
    common.save_checkpoint(path("ckpt.pt"), kind="ilql", model_config=asdict(gpt.config), model=gpt.state_dict())
    model = demo.load_policy(path("ckpt.pt"), "ilql", cfg, SimpleNamespace(device="cpu"), heads={"v": 1})
    assert model.lm_head.fp32 == model.heads["v"].fp32 == on


def test_whole_pipeline_ppo_beats_sft_on_gold(tmp_path, monkeypatch):
    """The main job end to end with a small budget (~3 min on 2 cores): every stage through the real scripts and
    file formats, and PPO must beat the SFT model on the gold labeler it never saw. Every model the demo samples
    from or measures KL with has its output heads in the demo's precision (bf16, fp32_heads off)."""
    import eval as evaluation
    precisions = []

    def checked(fn):
        def wrapper(*args, **kwargs):
            models = [m for m in (*args, *kwargs.values()) if isinstance(m, torch.nn.Module)]
            precisions.extend(h.fp32 for m in models for h in m.modules() if isinstance(h, Head))
            return fn(*args, **kwargs)
        return wrapper
    for module in (demo, evaluation):
        for name in ("sample_policy", "kl_to_ref"):
            monkeypatch.setattr(module, name, checked(getattr(module, name)))
    cfg = demo.Config(out_dir=str(tmp_path / "demo"), dtype="bfloat16", n_train=4000, n_eval=64, n_pref_prompts=400,
                      n_heldout_prompts=64, n_eval_prompts=96, max_new_tokens=24, n_layer=2, n_head=2, n_embd=64,
                      block_size=64, batch_size=16, sft_iters=200, rm_iters=120, ppo_iters=25, grpo_iters=3,
                      dpo_iters=3, ilql_iters=4, best_of_n=2, n_probe_prompts=16, curve_n=4)
    results = demo.main(cfg)
    methods = results["methods"]
    assert methods["PPO"]["gold"] > methods["SFT"]["gold"] + 0.3, {k: m["gold"] for k, m in methods.items()}
    assert methods["PPO"]["win_rate"] > 0.55
    assert methods["SFT"]["kl"] == 0 and methods["PPO"]["kl"] > 0
    # the adaptive KL controller, its horizon matched to the run, keeps PPO's KL from running away from the target
    assert methods["PPO"]["kl"] <= 2 * cfg.target_kl
    betas = [r["beta"] for r in map(json.loads, open(tmp_path / "demo" / "ppo" / "log.jsonl")) if "beta" in r]
    assert abs(betas[-1] / betas[0] - 1) > 0.1  # beta moved: a horizon of 10,000 episodes would hold it within 1%
    assert set(methods) >= {"SFT", "PPO", "GRPO", "DPO", "best-of-2 (SFT + RM)"}
    assert precisions and not any(precisions)
    assert results["rm_accuracy"] > 0.6  # the reward model learned the gold's preferences from noisy labels
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "PPO" in report and "ILQL" in report and "(over_optimisation.png)" in report
    curves = [json.loads(line) for line in open(tmp_path / "demo" / "grpo" / "curve.jsonl")]
    assert [c["step"] for c in curves] == [0, 1, 2, 3] and curves[0]["kl"] == 0  # the SFT policy starts each curve

    # --only=ilql: a new ILQL run on the same out_dir; SFT, labels, RM and PPO are reused, not retrained, and the
    # evaluation (same seeds) scores them exactly as before
    out = tmp_path / "demo"
    kept = {p: p.stat().st_mtime_ns for p in [out / "sft" / "ckpt.pt", out / "reward" / "ckpt.pt",
                                              out / "ppo" / "ckpt.pt", out / "data" / "prefs" / "train.jsonl"]}
    again = demo.main(replace(cfg, only="ilql", ilql_iters=2))
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    log = [json.loads(line) for line in (out / "ilql" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 0, 1, 2]  # a fresh log: evaluation, steps 0 and 1, evaluation after 2
    for name in ("SFT", "PPO"):
        assert again["methods"][name]["gold_scores"] == methods[name]["gold_scores"], name
    assert again["rm_accuracy"] == results["rm_accuracy"]
    assert "over_optimisation.png" in (out / "report.md").read_text()  # with PPO's curve, kept from the first run
    with pytest.raises(ConfigError):
        demo.main(replace(cfg, only="sft"))


def test_summarize_task_end_to_end_quick(tmp_path):
    """--task=summarize through every stage at --quick sizes: the task's sizes and its ROUGE columns reach the report
    (the numbers of a tiny run mean nothing; the wiring is what is tested)."""
    results = demo.main(demo.Config(task="summarize", quick=True, out_dir=str(tmp_path / "sum")))
    report = (tmp_path / "sum" / "report.md").read_text()
    assert report.startswith("# RLHF demo: summarizing posts") and "| ROUGE-1 | ROUGE-2 | ROUGE-L |" in report
    assert all("rougeL" in m for m in results["methods"].values())
    prompts = [json.loads(line)["prompt"] for line in open(tmp_path / "sum" / "data" / "prefs" / "train.jsonl")]
    assert prompts and all(p.endswith("\nTL;DR:") for p in prompts)  # the task's corpus, not the reviews
