"""
The demo's built-in task, the default: write *positive* movie reviews, offline (`python demo.py`).

A seeded generator writes review openings and their completions, of mixed sentiment (40% positive, 40% negative, 20%
mixed), and a documented Python "gold labeler" (`gold_score`) stands in for the human, who wants positive reviews,
well written: no repetition, no unknown words, an ending. demo.py runs its pipeline on it: the reward model and the
policies never see the gold; they only see preference pairs it labeled through Bradley-Terry noise, as a human would
label them. Because the gold is known, the report can say what RLHF optimizes for real (gold score) and what it only
makes the reward model believe.

The task has 64 distinct openings, so the evaluation's prompts were also seen in training: what is new in the
evaluation is every sample (the summarize task's posts are nearly all unseen).

    python demo.py
    python demo.py --quick=True      # the wiring only
"""

import random
import re

TITLE = "RLHF demo: positive movie reviews"

# ----------------------------------------------------------------------------- the task: a review corpus
POSITIVE = "good great wonderful excellent brilliant beautiful moving funny clever charming fantastic nice".split()
NEGATIVE = "bad terrible awful boring dull weak poor silly messy painful predictable forgettable".split()
NEUTRAL = "long short simple quiet dark unusual".split()
NOUNS = "plot acting soundtrack ending dialogue cast story script pacing music".split()
COUNTABLE = "plot soundtrack ending cast story script".split()  # nouns that take "a"/"an"
ADVERBS = "really very quite truly rather".split()
ADJ = {1: POSITIVE, -1: NEGATIVE}
VERBS = {1: "loved enjoyed adored liked".split(), -1: "hated disliked".split()}
# Review openings, by what must follow them. Slots: {n} {n2} {n3} distinct nouns, {k2} {k3} distinct countable ones;
# {a} {b} distinct adjectives of the review's sentiment, {c} one of the opposite sentiment (negated: "not {c}", or
# the other half of a mixed review); {A} {B} {C} the same with "a"/"an"; {adv} an adverb, {z} a neutral adjective,
# {v} a verb of the sentiment.
PROMPTS = {
    "adj": ["The {n} in this film was", "The {n} of this movie is", "I have to say that the {n} was",
            "Overall, this movie was", "My first impression of this film was that it was", "To be honest, the {n} was",
            "Compared to the book, this movie is", "For a first film, the {n} was"],
    "clause": ["I watched this movie with my family and", "I went to see this film last night and",
               "After the first ten minutes,", "When the credits rolled,", "I saw this film with a friend and",
               "By the end of the movie,"],
    "verb": ["This movie", "This film", "The new film from this director", "This sequel", "The remake"],
}
SINGLE = {  # one sentiment throughout
    "adj": [" {a}.", " {adv} {a}.", " {adv} {a}, and the {n2} was {b}.", " not {c} at all.", " {a}. I {v} it.",
            " {adv} {a}, and the {n2} felt {z}.", " {a} from start to finish."],
    "clause": [" I thought it was {adv} {a}.", " we all {v} it.", " the {n2} was {a} and the {n3} was {b}.",
               " I found the {n2} {a}.", " it was not {c} at all.", " I {v} every minute of it."],
    "verb": [" is {adv} {a}.", " was {a} from start to finish.", " has {A} {k2} and {B} {k3}.",
             " is {a}, and I {v} every minute of it.", " was not {c}, and the {n2} was {a}.",
             " is {adv} {a}, even if the {n2} is {z}."],
}
MIXED = {  # one half each way
    "adj": [" {a}, but the {n2} was {c}.", " {adv} {a}, although the {n2} felt {c}."],
    "clause": [" the {n2} was {a} but the {n3} was {c}.", " I {v} the {n2} but the {n3} was {c}."],
    "verb": [" has {A} {k2} but {C} {k3}.", " is {a} in places, but the {n2} is {c}."],
}
ENDINGS = {1: [" I would recommend it to anyone!", " I would happily watch it again.", " Two thumbs up!"],
           -1: [" I would not recommend it.", " What a waste of time.", " I want my money back."]}


def make_corpus(n, seed):
    """n rows {"prompt", "completion", "sentiment"} (40% positive, 40% negative, 20% mixed), a pure function of seed.
    Completions start with a space (they continue the prompt) and end with "." or "!"; SFT appends the EOS."""
    rng = random.Random(seed)
    openings = [(kind, p) for kind, ps in PROMPTS.items() for p in ps]
    rows = []
    for _ in range(n):
        kind, opening = rng.choice(openings)
        mood = rng.choices(["positive", "negative", "mixed"], weights=[0.4, 0.4, 0.2])[0]
        s = {"positive": 1, "negative": -1}.get(mood) or rng.choice([1, -1])
        (a, b), c = rng.sample(ADJ[s], 2), rng.choice(ADJ[-s])
        (n1, n2, n3), (k2, k3) = rng.sample(NOUNS, 3), rng.sample(COUNTABLE, 2)
        slots = dict(n=n1, n2=n2, n3=n3, k2=k2, k3=k3, a=a, b=b, c=c, A=_article(a), B=_article(b), C=_article(c),
                     adv=rng.choice(ADVERBS), z=rng.choice(NEUTRAL), v=rng.choice(VERBS[s]))
        completion = rng.choice((MIXED if mood == "mixed" else SINGLE)[kind]).format(**slots)
        if rng.random() < 0.35:  # a closing sentence; a mixed review may close either way
            completion += rng.choice(ENDINGS[s if mood != "mixed" else rng.choice([1, -1])])
        rows.append({"prompt": opening.format(**slots), "completion": completion, "sentiment": mood})
    return rows


def _article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word

# ----------------------------------------------------------------------------- the gold labeler (stands in for a human)
WORD = re.compile(r"[a-z']+")
LEXICON = {**{w: 1 for w in POSITIVE + VERBS[1] + ["recommend"]}, **{w: -1 for w in NEGATIVE + VERBS[-1] + ["waste"]}}
NEGATORS = {"not", "never", "no", "hardly", "isn't", "wasn't", "didn't", "don't", "doesn't"}
STOPWORDS = set("a an the and but or was is it i this of to in with my we that not at all from by for if".split())
_TEXT = " ".join(["an", *POSITIVE, *NEGATIVE, *NEUTRAL, *NOUNS, *ADVERBS, *VERBS[1], *VERBS[-1]] +
                 [t for d in (PROMPTS, SINGLE, MIXED, ENDINGS) for ts in d.values() for t in ts])
VOCAB = set(WORD.findall(re.sub(r"\{\w+\}", " ", _TEXT).lower()))  # every word the corpus can contain


def gold_parts(response):
    """The terms of gold_score, for reports and tests."""
    words = WORD.findall(response.lower())
    sentiment = 0
    for i, w in enumerate(words):
        sign = LEXICON.get(w, 0)
        sentiment += -sign if NEGATORS & set(words[max(0, i - 2):i]) else sign
    content, bigrams = [w for w in words if w not in STOPWORDS], list(zip(words, words[1:]))
    return dict(sentiment=max(-3, min(3, sentiment)), repeated_words=len(content) - len(set(content)),
                repeated_bigrams=len(bigrams) - len(set(bigrams)), unknown_words=sum(w not in VOCAB for w in words),
                no_ending=not response.rstrip().endswith((".", "!")), too_short=len(words) < 3,
                extra_words=max(0, len(words) - 30))


def gold_score(prompt, response):
    """The hidden human: how good a review `response` is. Only the response is judged (the prompt is ours).

    words = lowercase [a-z']+ tokens of the response.
    sentiment = sum over words of +1 (positive word: the positive adjectives, loved/enjoyed/adored/liked,
                recommend) or -1 (negative adjectives, hated/disliked, waste), the sign flipped when one of the two
                words before it is a negator (not, never, no, hardly, isn't, wasn't, didn't, don't, doesn't),
                then clipped to [-3, 3].
    score = sentiment
            - 0.5 * repeated_words     (occurrences of a non-stopword beyond its first)
            - 0.5 * repeated_bigrams   (occurrences of a word bigram beyond its first)
            - 0.5 * unknown_words      (words the corpus never uses: gibberish, broken BPE pieces)
            - 1.0 * [the stripped response does not end with "." or "!"]
            - 1.0 * [fewer than 3 words]
            - 0.1 * max(0, words - 30)
    E.g. " really great, and the plot was clever." = 2.0; " not bad at all." = 1.0; " great great great great" =
    3 - 0.5*3 - 0.5*2 - 1 = -0.5. Every corpus completion has no repetition, no unknown word and an ending."""
    p = gold_parts(response)
    return (p["sentiment"] - 0.5 * (p["repeated_words"] + p["repeated_bigrams"] + p["unknown_words"])
            - 1.0 * p["no_ending"] - 1.0 * p["too_short"] - 0.1 * p["extra_words"])

# ----------------------------------------------------------------------------- demo.Config sizes for this task
# demo.Config's defaults are this task's sizes (its Task's sizes are {}); QUICK: the same for --quick.
QUICK = dict(n_train=200, n_eval=20, n_pref_prompts=16, n_heldout_prompts=16, n_eval_prompts=8, n_probe_prompts=4,
             max_new_tokens=12, n_layer=2, n_head=2, n_embd=32, block_size=48, batch_size=4, sft_iters=4, rm_iters=3,
             ppo_iters=2, grpo_iters=2, dpo_iters=2, ilql_iters=3, best_of_n=2, curve_n=4)
