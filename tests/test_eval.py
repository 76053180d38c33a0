"""eval.py: each statistic against a hand-computed value or an independent formula (distinct-n, standard error, win
rate and its interval, ROUGE, BLEU), the win-rate matrix's antisymmetry, KL against a naive per-sample loop (plain
and ILQL decoding), precomputed rows, the reference loader; then main() on tiny checkpoints (a policy against itself:
KL exactly 0, win rate exactly 0.5) and one-line errors for bad inputs."""

import json
import math
import shutil
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import eval as ev
import scoring
from common import run_main, save_checkpoint
from data import EOS
from ilql import ilql_heads
from model import GPT, GPTConfig
from sample import ilql_logits_fn
from tests.helpers import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"prompt": "The acting in this film was", "completion": " really great."},
        {"prompt": "This movie", "completion": " is not bad at all."},
        {"prompt": "I watched this movie with my family and", "completion": " we all loved it."},
        {"prompt": "Overall, this movie was", "completion": " dull."},
        {"prompt": "By the end of the movie,", "completion": " I was bored."},
        {"prompt": "The remake", "completion": " has a clever script."}]


def n_words(prompts, texts):  # the reward_fn judge of the main() tests: "tests.test_eval:n_words"
    return [float(len(t.split())) for t in texts]


def broken_judge(prompts, texts):  # a judge with a bug: eval.py ends with one line naming it
    return [1 / 0 for _ in texts]


def short_judge(prompts, texts):  # a judge that answers wrongly: one score for every text
    return [0.0]


def tiny_gpt(seed, eos_logit=9.5, heads=None):
    """A tiny random GPT that ends a response after ~5 tokens on average: its final LayerNorm bias u and the EOS
    (tied) embedding u * eos_logit / |u|^2 give EOS a logit of about eos_logit, every other token ~0."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, heads=heads or {}))
    with torch.no_grad():
        u = torch.randn(32)
        u = u / u.norm() * 4
        model.ln_f.bias.copy_(u)
        model.wte.weight[EOS] = u * eos_logit / 16
        for head in model.heads.values():  # ILQL heads big enough to change the decoding distribution
            head.weight.normal_(0, 0.05)
    return model.eval()


def save(path, model, kind):
    save_checkpoint(str(path), kind=kind, model_config=asdict(model.config), model=model.state_dict())
    return str(path)

# ----------------------------------------------------------------------------- statistics


def test_distinct_n_known_values():
    texts = ["the cat sat", "the cat ran", "", "one"]
    # unigrams: the cat sat the cat ran one = 7, distinct the cat sat ran one = 5
    assert ev.distinct_n(texts, 1) == 5 / 7
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) = 4, distinct 3; "" and "one" have none
    assert ev.distinct_n(texts, 2) == 3 / 4
    assert ev.distinct_n(["a b", "c"], 3) == 0.0


def test_std_err_known_value():
    # mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, sample variance 5 / 3, se sqrt(5 / 3) / 2
    assert ev.std_err([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12)


def test_win_rate_and_interval_known_values():
    # outcomes: tie 0.5, win 1, loss 0, win 1 -> 0.625; deviations .125 .375 .625 .375, squares sum 0.6875
    rate, low, high = ev.win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 4.0, -1.0])
    se = math.sqrt(0.6875 / 3) / 2
    assert rate == 0.625
    assert low == pytest.approx(0.625 - 1.959963984540054 * se, rel=1e-12)
    assert high == 1.0  # 0.625 + 0.469 clipped to 1
    assert ev.win_rate([1.0, 2.0], [1.0, 2.0]) == (0.5, 0.5, 0.5)  # all ties: a point


def test_win_rate_matrix_is_antisymmetric():
    g = torch.Generator().manual_seed(0)
    scores = {name: torch.randint(0, 3, (40,), generator=g).float().tolist() for name in "abcd"}  # many ties
    m = ev.win_rate_matrix(scores)
    assert list(m) == list("abcd") and all(list(row) == list("abcd") for row in m.values())
    for a in scores:
        assert m[a][a] == (0.5, 0.5, 0.5)
        for b in scores:
            assert m[a][b] == ev.win_rate(scores[a], scores[b])
            assert m[a][b][0] + m[b][a][0] == pytest.approx(1, abs=1e-12)
            assert m[a][b][1] == pytest.approx(1 - m[b][a][2], abs=1e-12)
    assert m["a"]["b"][0] != 0.5  # the fixture has a non-trivial pair


def test_rouge_known_values_with_stemming():
    texts, refs = ["the cat sat on the mat", "cats running"], ["the cat is on the mat today", "cat runs"]
    f1 = lambda matches, n_text, n_ref: 2 * matches / (n_text + n_ref)  # harmonic mean of matches/n_text, matches/n_ref
    # pair 1: unigrams 5 shared (the x2, cat, on, mat) of 6 and 7; bigrams 3 (the cat, on the, the mat) of 5 and 6;
    # longest common subsequence "the cat on the mat", 5 of 6 and 7
    # pair 2: Porter stemming makes cats -> cat, running and runs -> run: identical
    r = ev.rouge(texts, refs)
    assert r["rouge1"] == pytest.approx(100 * (f1(5, 6, 7) + 1) / 2)
    assert r["rouge2"] == pytest.approx(100 * (f1(3, 5, 6) + 1) / 2)
    assert r["rougeL"] == pytest.approx(100 * (f1(5, 6, 7) + 1) / 2)


def naive_corpus_bleu(texts, refs):
    """Papineni et al.: clipped n-gram matches summed over the corpus, n = 1..4, geometric mean, brevity penalty."""
    log_p = 0.0
    for n in range(1, 5):
        matches = total = 0
        for text, ref in zip(texts, refs):
            t, r = text.split(), ref.split()
            t_grams = [tuple(t[i:i + n]) for i in range(len(t) - n + 1)]
            r_grams = [tuple(r[i:i + n]) for i in range(len(r) - n + 1)]
            matches += sum(min(t_grams.count(g), r_grams.count(g)) for g in set(t_grams))
            total += len(t_grams)
        log_p += math.log(matches / total) / 4
    c, r = sum(len(t.split()) for t in texts), sum(len(x.split()) for x in refs)
    return 100 * min(1.0, math.exp(1 - r / c)) * math.exp(log_p)


def test_bleu_equals_the_corpus_formula():
    # no punctuation: sacrebleu's 13a tokenizer splits on whitespace; shorter candidates: the brevity penalty counts
    texts = ["the quick brown fox jumps over the dog", "a small cat sat on a warm mat"]
    refs = ["the quick brown fox jumps over the lazy dog", "a small cat sat on the warm mat today"]
    assert ev.bleu(texts, refs) == pytest.approx(naive_corpus_bleu(texts, refs), rel=1e-9)
    assert ev.bleu(refs, refs) == pytest.approx(100)

# ----------------------------------------------------------------------------- KL


@torch.no_grad()
def naive_kl(policy, ref, prompt_ids, response_ids, temperature, beta):
    """One sample, unpadded, fp64: sum over response tokens of log p - log q, p from the ILQL decoding formula
    written out (beta 0: the LM head)."""
    seq = torch.tensor([prompt_ids + response_ids])
    h_p, h_q = policy(seq)[0].double(), ref(seq)[0].double()  # (T, C)
    logits_p = F.log_softmax(h_p @ policy.lm_head.weight.double().T, -1)
    if beta:
        head = {k: (lambda h, m=m: h @ m.weight.double().T + m.bias.double()) for k, m in policy.heads.items()}
        logits_p = logits_p + beta * (torch.minimum(head["q1_target"](h_p), head["q2_target"](h_p)) - head["v"](h_p))
    lp_p = F.log_softmax(logits_p / temperature, -1)
    lp_q = F.log_softmax(h_q @ ref.lm_head.weight.double().T / temperature, -1)
    P = len(prompt_ids)
    return sum((lp_p[P - 1 + t, tok] - lp_q[P - 1 + t, tok]).item() for t, tok in enumerate(response_ids))


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_kl_to_ref_equals_a_naive_per_sample_loop(beta):
    policy, ref = tiny_gpt(0, eos_logit=6.7, heads=ilql_heads(50257)), tiny_gpt(1)  # at temperature 0.7: EOS ~20%
    logits_fn = ilql_logits_fn(policy, beta) if beta else None
    prompts = ["This movie", "The acting in this film was really", "I", "The remake"]  # left padding
    _, batches = ev.sample_policy(policy, prompts, 3, max_new_tokens=6, max_prompt_len=16, temperature=0.7,
                                  logits_fn=logits_fn, batch_size=2)
    kl = ev.kl_to_ref(policy, ref, batches, logits_fn, temperature=0.7)
    expected = []
    for b in batches:
        for row, mask, response_mask in zip(b["tokens"], b["mask"], b["response_mask"]):
            real, n_response = row[mask.bool()].tolist(), int(response_mask.sum())
            expected.append(naive_kl(policy, ref, real[:-n_response], real[-n_response:], 0.7, beta))
    lengths = [int(m.sum()) for b in batches for m in b["response_mask"]]
    assert len(set(lengths)) > 1  # responses of several lengths: the mask matters
    assert kl == pytest.approx(expected, abs=1e-4)
    assert all(abs(k) > 0.01 for k in kl)  # the tolerance is small against the values compared
    assert ev.kl_to_ref(policy, policy, batches, temperature=0.7) == [0.0] * 4


@pytest.mark.parametrize("n_response", [2, 9])
def test_kl_is_exactly_zero_against_a_frozen_copy(n_response):
    # As in ppo.py: a trainable policy and its frozen copy must give the same logprobs bit for bit (the demo passes
    # models that require grad); torch.matmul on a strided slice picks mm or bmm by requires_grad, which may round
    # differently, hence the contiguous slice.
    policy, ref = tiny_gpt(0, eos_logit=0.0), tiny_gpt(0, eos_logit=0.0).requires_grad_(False)
    prompts = ["This movie", "The acting in this film was really", "I", "The remake"]
    _, batches = ev.sample_policy(policy, prompts, 0, n_response, 16, batch_size=4)
    assert batches[0]["response_mask"].shape[1] == n_response
    assert ev.kl_to_ref(policy, ref, batches) == [0.0] * 4


def test_sample_policy_is_seeded():
    model = tiny_gpt(0)
    prompts = ["This movie", "The remake", "I watched this movie with my family and"]
    texts, _ = ev.sample_policy(model, prompts, 3, 6, 16, batch_size=2)
    assert texts == ev.sample_policy(model, prompts, 3, 6, 16, batch_size=2)[0]
    assert texts != ev.sample_policy(model, prompts, 4, 6, 16, batch_size=2)[0]

# ----------------------------------------------------------------------------- evaluate, report, data


def test_evaluate_precomputed_rows_and_markdown():
    prompts = ["p1", "p2", "p3"]
    extra = {"short": dict(texts=[" a", " a b", " a"], kl=1.5),
             "long": dict(texts=[" a b c", " a", " a zzyzx"], kl=None)}
    judges = {"words": n_words, "neg": lambda p, t: [-float(len(x)) for x in t]}
    results = ev.evaluate({}, prompts, judges, references=[" a", " a b", " c"], extra=extra)
    short, long = results["policies"]["short"], results["policies"]["long"]
    assert short["scores"]["words"] == [1.0, 2.0, 1.0] and long["scores"]["words"] == [3.0, 1.0, 2.0]
    assert short["score"]["words"] == pytest.approx(4 / 3)
    assert short["score_se"]["words"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))  # deviations -1/3 2/3 -1/3
    assert short["kl"] == 1.5 and long["kl"] is None
    assert short["length"] == pytest.approx(4 / 3) and long["length"] == pytest.approx(8 / 3)  # " zzyzx": 3 tokens
    assert short["distinct_1"] == 2 / 4 and long["distinct_2"] == 3 / 3
    assert short["rouge1"] == pytest.approx(100 * (1 + 1 + 0) / 3)
    assert results["win_rate_judge"] == "words"  # the first judge
    assert results["win_rates"]["short"]["long"][0] == pytest.approx((0 + 1 + 0) / 3)
    text = ev.markdown_report(results)
    assert "| policy | score (words) | score (neg) | KL to ref | length | distinct-1 | distinct-2 | ROUGE-1 |" in text
    assert "| short | 1.333 ± 0.333 | -2.667 ± 0.667 | 1.500 | 1.3 | 0.500 |" in text
    assert "| long | 2.000 ± 0.577 | -5.333 ± 1.764 | - | 2.7 |" in text
    assert "| short | 0.50 [0.50, 0.50] | 0.33 [0.00, 0.99] |" in text
    with pytest.raises(ValueError, match="2 references for 3 prompts"):
        ev.evaluate({}, prompts, judges, references=[" a", " b"], extra=extra)


def test_load_eval_data_formats(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", ROWS[:2])
    assert ev.load_eval_data(sft, "train") == ([r["prompt"] for r in ROWS[:2]], [r["completion"] for r in ROWS[:2]])
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello there",
                                             "rejected": "\n\nHuman: hi\n\nAssistant: go away"}])
    assert ev.load_eval_data(hh, "train") == (["\n\nHuman: hi\n\nAssistant:"], [" hello there"])
    plain = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert ev.load_eval_data(plain, "train") == (["a", "b"], None)

# ----------------------------------------------------------------------------- main


@pytest.fixture
def checkpoints(tmp_path):
    sft = save(tmp_path / "sft.pt", tiny_gpt(0), "sft")
    shutil.copy(sft, tmp_path / "copy.pt")  # the same weights in another file: loaded as another model
    ilql = tiny_gpt(0, heads=ilql_heads(50257))
    ilql.load_state_dict(tiny_gpt(0).state_dict(), strict=False)
    torch.manual_seed(3)
    rm = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32, heads={"reward": 1}))
    return dict(sft=sft, copy=str(tmp_path / "copy.pt"), ppo=save(tmp_path / "ppo.pt", tiny_gpt(1), "ppo"),
                ilql=save(tmp_path / "ilql.pt", ilql, "ilql"), rm=save(tmp_path / "rm.pt", rm, "reward"),
                data=write_jsonl(tmp_path / "data.jsonl", ROWS))


def eval_config(tmp_path, c, **kw):
    base = dict(policies=f"{c['sft']},{c['copy']},{c['ppo']},{c['ilql']}@beta=2", ref=c["sft"], data=c["data"],
                eval_split="train", n_prompts=5, max_prompt_len=16, max_new_tokens=6, reward_model=c["rm"],
                reward_fn="tests.test_eval:n_words", batch_size=2, out_dir=str(tmp_path / "eval"), device="cpu")
    return ev.Config(**{**base, **kw})


def test_main_policy_against_itself_and_the_report(tmp_path, checkpoints, capsys):
    c = checkpoints
    cfg = eval_config(tmp_path, c)
    results = ev.main(cfg)
    rows, m = results["policies"], results["win_rates"]
    sft, copy, ppo, ilql = c["sft"], c["copy"], c["ppo"], f"{c['ilql']}@beta=2"
    assert list(rows) == [sft, copy, ppo, ilql]
    # the reference against itself, and an identical model loaded from another file: paired samples, KL exactly 0
    assert rows[sft]["kl"] == 0.0 and rows[copy]["kl"] == 0.0 and rows[copy]["texts"] == rows[sft]["texts"]
    assert m[sft][copy] == (0.5, 0.5, 0.5)
    assert rows[ppo]["kl"] != 0.0 and rows[ilql]["kl"] != 0.0 and rows[ilql]["texts"] != rows[sft]["texts"]
    for a in rows:
        for b in rows:
            assert m[a][b][0] + m[b][a][0] == pytest.approx(1, abs=1e-12)
    # judges: reward_fn first (it judges the win rates), the reward model read as scoring.score reads it
    assert results["judges"] == [cfg.reward_fn, cfg.reward_model] and results["win_rate_judge"] == cfg.reward_fn
    prompts = [r["prompt"] for r in ROWS[:5]]
    assert results["prompts"] == prompts and results["references"] == [r["completion"] for r in ROWS[:5]]
    rm = scoring.load_reward_model(c["rm"])
    for row in rows.values():
        assert row["scores"][cfg.reward_fn] == n_words(prompts, row["texts"])
        assert row["scores"][cfg.reward_model] == pytest.approx(scoring.score(rm, prompts, row["texts"], 2, 16),
                                                                abs=1e-5)
        assert row["rouge1"] == ev.rouge(row["texts"], results["references"])["rouge1"]
    # the markdown printed and written, the JSON written
    text = (tmp_path / "eval" / "eval.md").read_text()
    assert text == ev.markdown_report(results) and text in capsys.readouterr().out
    assert f"| {copy} | " in text and "ROUGE-L | BLEU |" in text
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == json.loads(json.dumps(results))


@pytest.mark.parametrize("change, message", [
    (dict(policies="{tmp}/missing.pt"), "checkpoint '{tmp}/missing.pt' not found"),
    (dict(reward_fn="", reward_model=""), "no judge: set reward_model"),
    (dict(data="{tmp}/nope.jsonl"), "{tmp}/nope.jsonl: no such file or directory"),
    (dict(data="{tmp}/partial.jsonl"), "{tmp}/partial.jsonl: row 2: missing field 'completion'"),
    (dict(policies="{sft}@beta=4"), "is not an ilql checkpoint"),
    (dict(policies="{sft}@temperature=2"), "the only option is @beta=B"),
    (dict(policies="{rm}"), "is a 'reward' checkpoint, expected"),
    (dict(policies="{sft},{sft}"), "is listed twice"),
    (dict(n_prompts=-1), "n_prompts must be >= 0, not -1"),
    (dict(temperature=0.0), "temperature 0 (greedy decoding) gives no KL estimate"),
    (dict(reward_fn="tests.test_eval:broken_judge"), "judge 'tests.test_eval:broken_judge' raised ZeroDivisionError: "
                                                     "division by zero"),
    (dict(reward_fn="tests.test_eval:short_judge"), "reward_fn 'tests.test_eval:short_judge' returned 1 scores for "),
])
def test_bad_inputs_give_one_error_line(tmp_path, checkpoints, capsys, monkeypatch, change, message):
    write_jsonl(tmp_path / "partial.jsonl", [ROWS[0], {"prompt": "no reference here"}, ROWS[1]])
    subst = lambda s: s.format(tmp=tmp_path, **checkpoints)
    cfg = eval_config(tmp_path, checkpoints, **{k: subst(v) if isinstance(v, str) else v for k, v in change.items()})
    monkeypatch.setattr(sys, "argv", ["eval.py"] + [f"--{k}={v}" for k, v in asdict(cfg).items()])
    with pytest.raises(SystemExit) as exit_info:
        run_main(ev.main, ev.Config)
    err = capsys.readouterr().err  # (datasets' progress bars go to stderr too)
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: ") and subst(message) in err.strip().splitlines()[-1], err


def test_each_batch_samples_with_its_own_seed():
    """Batch i samples with a generator seeded mix_seed(seed, i), whatever the earlier batches drew: so the responses
    to the same prompts in batch i are the same when batch 0 holds other prompts (which stop at other lengths), and
    two policies stay paired however early one of them stopped a batch."""
    from common import mix_seed
    from sample import sample_responses
    model = tiny_gpt(0)
    tail = ["I watched this movie with my family and", "Overall, this movie was"]
    texts, _ = ev.sample_policy(model, ["This movie", "The remake", *tail], 3, 6, 16, batch_size=2)
    alone = sample_responses(model, tail, 16, 6, 1.0, generator=torch.Generator().manual_seed(mix_seed(3, 1)))
    assert texts[2:] == alone["texts"]
    for head in (["By the end of the movie,", "I"], ["The acting in this film was", "Hello there, a much longer one"]):
        assert ev.sample_policy(model, [*head, *tail], 3, 6, 16, batch_size=2)[0][2:] == texts[2:]
