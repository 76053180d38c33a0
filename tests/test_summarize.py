"""Tests for summarize.py, demo.py's summarization task: the post generator and the gold labeler, against values
computed by hand from the formula in gold_score's docstring."""

import pytest

import data
import summarize as S

POST = "My roommate broke my phone last night. We were at the gym at the time. I want an apology." + S.CUE

# ----------------------------------------------------------------------------- corpus


def test_corpus_deterministic_per_seed():
    assert S.make_corpus(300, 7) == S.make_corpus(300, 7)
    assert S.make_corpus(300, 7) != S.make_corpus(300, 8)


def test_every_post_has_four_facts_and_its_reference_scores_the_formula():
    rows = S.make_corpus(1000, 0)
    assert len({r["prompt"] for r in rows}) > 990  # variety
    lists, styles = (S.WHO, S.VERBS, S.OBJECTS, list(S.WANTS)), {"facts": 0, "detail": 0, "no want": 0}
    for r in rows:
        prompt, ref = r["prompt"], r["completion"]
        assert prompt.endswith(S.CUE) and ref.startswith(" ") and ref.endswith("."), r
        post = S.WORD.findall(prompt[:-len(S.CUE)].lower())
        assert [sum(w in words for w in post) for words in lists] == [1, 1, 1, 1], prompt  # one of each, once
        # a reference invents nothing and ends: it scores (facts it names) - 0.1 * (its words)
        parts, n_words = S.gold_parts(prompt, ref), len(S.WORD.findall(ref.lower()))
        assert parts == dict(facts=parts["facts"], invented=0, words=n_words, no_ending=False), r
        assert S.gold_score(prompt, ref) == pytest.approx(parts["facts"] - 0.1 * n_words)
        style = "no want" if parts["facts"] == 3 else "detail" if any(w in ref for w in S.WHERE) else "facts"
        assert parts["facts"] == 4 or style == "no want", r  # only the "no want" style leaves a fact out
        styles[style] += 1
        # the lengths the task's settings assume: a prompt fits max_prompt_len, a summary and its EOS max_new_tokens
        assert len(data.encode(prompt)) <= S.CONFIG["max_prompt_len"], prompt
        assert len(data.encode(ref)) + 1 <= S.CONFIG["max_new_tokens"], ref
    for style, p in S.STYLES.items():
        assert abs(styles[style] / len(rows) - p) < 0.05, styles

# ----------------------------------------------------------------------------- gold labeler


@pytest.mark.parametrize("response, expected", [
    (" my roommate broke my phone and I want an apology.", 4 - 0.1 * 10),  # a reference: every fact
    (" roommate broke my phone, I want an apology.", 4 - 0.1 * 8),          # the same facts in fewer words
    (" roommate broke phone, apology.", 4 - 0.1 * 4),                       # the shortest with every fact
    (" my roommate broke my phone.", 3 - 0.1 * 5),                          # the want missing
    (" my phone.", 1 - 0.1 * 2),                                            # three facts missing
    (".", 0.0),                                                             # nothing said
    ("", -1.0),                                                             # nothing, and no ending
    (" my sister broke my phone and I want an apology.", 3 - 2 - 0.1 * 10),  # who invented (sister: not in the post)
    (" my roommate broke my xyzzy and I want an apology.", 3 - 2 - 0.1 * 10),  # gibberish is invented
    (" my sister, sister broke my phone.", 2 - 2 * 2 - 0.1 * 6),             # an invented word costs each time
    (" my roommate broke my phone at the gym, I want an apology.", 4 - 0.1 * 12),  # the post's detail: only longer
    (" my roommate broke my phone at the park, I want an apology.", 4 - 2 - 0.1 * 12),  # "park": not in the post
    (" my roommate broke my phone and I want an apology", 4 - 0.1 * 10 - 1),  # no final "."
    (" roommate roommate broke my phone, I want an apology.", 4 - 0.1 * 9),   # a fact counts once, words each time
    (" My Roommate broke my PHONE, I want an apology.", 4 - 0.1 * 9),         # case does not matter
    (" roommate broke my phone, didn't apologize.", 3 - 2 * 2 - 0.1 * 6),   # "didn't": one word (apostrophes kept)
    (" my roommate broke my phone and I want an apology.\n", 4 - 0.1 * 10),  # the STRIPPED summary ends with "."
    (" my roommate broke my phone and I want an apology!", 4 - 0.1 * 10 - 1),  # only "." is an ending
    (" we were at the gym.", 0 - 0.1 * 5),                                  # "We" starts a sentence of the post
])
def test_gold_score_hand_computed(response, expected):
    assert S.gold_score(POST, response) == pytest.approx(expected)


def test_an_invented_fact_costs_more_than_a_missing_one():
    missing = S.gold_score(POST, " my roommate broke my phone and I want.")  # the want left out
    invented = S.gold_score(POST, " my roommate broke my phone and I want a refund.")  # the want made up
    assert (missing, invented) == pytest.approx((3 - 0.1 * 8, 3 - 2 - 0.1 * 10))
    assert invented < missing


def test_gold_reads_the_facts_of_the_post_before_the_cue():
    other = "My boss sold my car yesterday. I want a refund." + S.CUE
    ref = " my roommate broke my phone and I want an apology."
    assert S.gold_parts(other, ref) == dict(facts=0, invented=4, words=10, no_ending=False)
    # the cue's words are not the post's: "tl dr" in a summary is invented
    assert S.gold_parts(POST, " tl dr roommate broke my phone.")["invented"] == 2
