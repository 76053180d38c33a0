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
from common import ConfigError
from model import GPT, GPTConfig, Head
from tests.helpers import cpu_setup


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
    s = cpu_setup()
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


# ----------------------------------------------------------------------------- the pipeline's wiring
@pytest.mark.parametrize("response, expected", [
    (" not really good at all.", -1.0),                  # the negator two words before still flips "good"
    (" awful, terrible, boring, dull and weak.", -3.0),  # 5 negative words, clipped to -3
    (" a great film.", 1.0),                             # 3 words: not too short
    (" the adv was great.", 0.5),                        # "adv" is a template slot name, not a corpus word: unknown
])
def test_gold_score_more_documented_values(response, expected):
    assert reviews.gold_score("The acting in this film was", response) == pytest.approx(expected)


def test_write_corpus_eval_rows_are_another_seeds(tmp_path):
    """The SFT eval rows (test.jsonl) are drawn with another seed than the training rows: not the training corpus's
    first rows (make_corpus with one seed is a prefix-stable sequence, so the same seed would evaluate on training
    rows)."""
    cfg = demo.Config(n_train=200, n_eval=20, seed=3)
    path = lambda *parts: str(tmp_path.joinpath(*parts))
    demo.write_corpus(demo.load_task("reviews"), cfg, path)
    read = lambda split: [json.loads(x) for x in open(path("data", "corpus", f"{split}.jsonl"))]
    train, evals = read("train"), read("test")
    assert len(train) == 200 and len(evals) == 20
    assert evals != train[:20] and sum(r in train for r in evals) < 10


def test_sample_pairs_are_two_samples_of_each_prompt(monkeypatch):
    """sample_pairs samples each prompt twice (prompt order kept): a[i] and b[i] are both responses to prompts[i]."""
    seen = []

    def fake_sample_policy(model, prompts, seed, progress=False, **sampling):
        seen.append(list(prompts))
        return [f"{p} #{k}" for k, p in enumerate(prompts)], None
    monkeypatch.setattr(demo, "sample_policy", fake_sample_policy)
    prompts = ["This movie", "The remake", "This sequel"]
    a, b = demo.sample_pairs(None, prompts, 0, max_new_tokens=4, max_prompt_len=8)
    assert seen == [[p for p in prompts for _ in range(2)]]
    assert all(x.startswith(p + " #") and y.startswith(p + " #") and x != y for p, x, y in zip(prompts, a, b))


@pytest.mark.parametrize("task", ["reviews", "summarize"])
def test_write_labels_held_out_pairs_are_new_and_noiselessly_labeled(tmp_path, task):
    """write_labels: the held-out pairs (RM accuracy vs the gold) are other samples than the training pairs, on other
    prompts where the task has them (summarize: its posts are nearly all distinct; reviews has only 64 openings), and
    each is labeled by the noiseless gold: chosen scores strictly higher (under BT noise, the reviews case would keep
    all ~40 held-out pairs in gold order with a probability of about 1e-8)."""
    cfg = demo.Config(n_pref_prompts=32, n_heldout_prompts=64, seed=5, bt_temperature=1.0)
    s = cpu_setup()
    path = lambda *parts: str(tmp_path.joinpath(*parts))
    t = demo.load_task(task)
    demo.write_labels(t, tiny_gpt(0), cfg, s, path, dict(max_new_tokens=6, max_prompt_len=16))
    read = lambda split: [json.loads(x) for x in open(path("data", "prefs", f"{split}.jsonl"))]
    train, heldout = read("train"), read("test")
    assert len(train) > 16 and len(heldout) > 8
    pair = lambda r: (r["prompt"], frozenset((r["chosen"], r["rejected"])))
    assert not {pair(r) for r in heldout} & {pair(r) for r in train}
    if task == "summarize":
        assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    assert all(t.gold_score(r["prompt"], r["chosen"]) > t.gold_score(r["prompt"], r["rejected"]) for r in heldout)


def test_rm_accuracy_counts_ties_as_wrong(monkeypatch):
    scores = {" a": 1.0, " b": 0.0, " c": 0.5, " d": 0.5, " e": 0.0, " f": 2.0}
    monkeypatch.setattr(demo, "rm_scores", lambda rm, prompts, texts, max_len: [scores[t] for t in texts])
    rows = [{"prompt": "p", "chosen": c, "rejected": r} for c, r in ((" a", " b"), (" c", " d"), (" e", " f"))]
    assert demo.rm_accuracy(None, rows, 8) == pytest.approx(1 / 3)


def test_train_in_chunks_resumes_each_chunk_and_probes_between(tmp_path, monkeypatch):
    """iters 10 in chunks of 2: the first chunk starts from the SFT checkpoint, each later one resumes the last (not
    a retraining from SFT), to max_iters 2, 4, ..., 10; the SFT policy (step 0) and each chunk's policy are probed,
    and the curve is written."""
    calls, probed = [], []
    monkeypatch.setattr(demo, "load_policy", lambda ckpt, kind, cfg, s: ("trained", ckpt, kind))
    monkeypatch.setattr(demo, "probe", lambda model, ref, *a: probed.append(model) or dict(gold=0.0, rm=0.0, kl=0.0))
    path = lambda *parts: str(tmp_path.joinpath(*parts))
    cfg = demo.Config(n_probe_prompts=2)
    demo.train_in_chunks("PPO", lambda step, init_from: calls.append((step, init_from)), 10, "sft-policy", None,
                         demo.load_task("reviews"), cfg, None, path, {})
    assert calls == [(2, path("sft", "ckpt.pt")), (4, "resume"), (6, "resume"), (8, "resume"), (10, "resume")]
    assert probed == ["sft-policy"] + [("trained", path("ppo", "ckpt.pt"), "ppo")] * 5
    curve = [json.loads(x) for x in open(path("ppo", "curve.jsonl"))]
    assert [c["step"] for c in curve] == [0, 2, 4, 6, 8, 10]


def test_evaluate_methods_reports_each_methods_win_rate_against_sft(tmp_path, monkeypatch):
    """The report's win rate of a method is its row of the win-rate matrix against SFT ([name]["SFT"]), not SFT's
    against it; every method with a checkpoint is evaluated, ILQL once per beta."""
    path = lambda *parts: str(tmp_path.joinpath(*parts))
    for name in ("ppo", "grpo", "dpo", "ilql"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ckpt.pt").write_bytes(b"")
    monkeypatch.setattr(demo, "load_policy", lambda ckpt, kind, cfg, s, heads=None: kind)
    monkeypatch.setattr(demo, "ilql_logits_fn", lambda model, beta: beta)
    monkeypatch.setattr(demo, "best_of_n", lambda *a, **kw: (["x"], [0.0]))
    monkeypatch.setattr(demo, "write_results", lambda results, out_dir: None)
    got = {}

    def fake_evaluate(policies, prompts, judges, **kw):
        got.update(policies=policies, prompts=prompts, kw=kw)
        names = list(policies) + list(kw["extra"])
        rates = {a: {b: ((i + 1) / 10 + j / 100, 0, 1) for j, b in enumerate(names)} for i, a in enumerate(names)}
        return {"policies": {n: dict(score={"gold": 0.0, "RM": 0.0}, kl=0.0, texts=["t"], scores={"gold": [0.0]})
                             for n in names}, "win_rates": rates}
    monkeypatch.setattr(demo, "evaluate", fake_evaluate)
    cfg = demo.Config(out_dir=str(tmp_path), n_eval_prompts=3, ilql_betas=(4.0, 8.0), best_of_n=2)
    s = SimpleNamespace(autocast=nullcontext, device="cpu")
    policy = SimpleNamespace(config=SimpleNamespace(vocab_size=50257))
    methods = demo.evaluate_methods(demo.load_task("reviews"), cfg, s, policy, None, path, {})
    names = list(got["policies"]) + list(got["kw"]["extra"])
    assert names == ["SFT", "PPO", "GRPO", "DPO", "ILQL (beta 4)", "ILQL (beta 8)", "best-of-2 (SFT + RM)"]
    for i, name in enumerate(names):
        assert methods[name]["win_rate"] == pytest.approx((i + 1) / 10), name  # [name]["SFT"]: SFT is column 0
    assert got["kw"]["ref"] is policy and got["kw"]["win_rate_judge"] == "gold"
    # the evaluation's prompts are not those the labeled pairs (RM, DPO, ILQL training) were sampled on: on the
    # summarize task, whose posts are nearly all distinct, the two sets are disjoint
    task = demo.load_task("summarize")
    cfg = demo.Config(out_dir=str(tmp_path), n_eval_prompts=20, n_pref_prompts=50, ilql_betas=(4.0,), best_of_n=2)
    demo.evaluate_methods(task, cfg, s, policy, None, path, {})
    labeled = {r["prompt"] for r in task.make_corpus(cfg.n_pref_prompts, cfg.seed + 2)}
    assert len(got["prompts"]) == 20 and labeled.isdisjoint(got["prompts"])


def test_over_optimisation_plot_is_against_sqrt_kl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = {"PPO": [dict(kl=k, gold=0.1 * k, rm=0.2 * k) for k in (0.0, 1.0, 4.0, 9.0)]}
    fig = demo.plot_over_optimisation(plt, curves)
    gold, rm = fig.axes[0].lines
    assert list(gold.get_xdata()) == list(rm.get_xdata()) == [0.0, 1.0, 2.0, 3.0]
    assert list(gold.get_ydata()) == pytest.approx([0.0, 0.1, 0.4, 0.9]) and list(rm.get_ydata()) == pytest.approx(
        [0.0, 0.2, 0.8, 1.8])
    plt.close(fig)


@pytest.mark.parametrize("ppo_iters", [1, 2, 3, 60])
def test_the_demos_ppo_config_passes_ppos_checks_for_any_length(ppo_iters, monkeypatch):
    """--ppo_iters=2 once passed the demo's checks and then stopped at the PPO stage, minutes in: its kl_horizon (a
    tenth of the run's responses) was no more than a fifth of a step's, which ppo.py refuses."""
    import ppo
    configs = []
    monkeypatch.setattr(ppo, "main", lambda cfg: configs.append(cfg) or ppo.check_config(cfg))
    cfg = demo.Config(ppo_iters=ppo_iters)
    demo.check_config(cfg)
    demo.ppo_trainer(cfg, lambda *parts: "/".join(parts), dict(device="cpu", dtype="float32", seed=1))(1, "sft.pt")
    assert configs[0].kl_horizon == max(7, ppo_iters * 32 // 10)  # the demo's: a tenth of the run from 60 iterations
