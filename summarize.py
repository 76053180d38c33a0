"""
A second task for demo.py: summarize short posts, offline (`python demo.py --task=summarize`).

The task of the TRLx summarization article (CarperAI's "learning to summarize" with trlX, after Stiennon et al. 2020
on Reddit TL;DR), made small and self-contained. A seeded generator writes short posts, each with four key facts (who,
did what, to what, and what the writer wants) and a detail that does not matter (where it happened), and a reference
summary of each, written as people write them: most name the four facts, some also say where it happened, some leave
out the want. `gold_score` plays the human labeler, who prefers summaries that state the key facts, stay short and
invent nothing. demo.py runs its pipeline on it: SFT on post -> reference summary, pairs of SFT samples labeled by the
gold through Bradley-Terry noise, a reward model, PPO, GRPO, DPO and ILQL; evaluated by the gold (and its win rate
against the SFT model), KL to the SFT model, and ROUGE against the references.

The gold never reads the references: a summary that states every fact scores above a reference that leaves one out,
and a summary in fewer words above one in more. ROUGE only measures overlap with the references: Stiennon et al.
found at scale that RLHF raised human preference without raising ROUGE. The report gives both.

    python demo.py --task=summarize
    python demo.py --task=summarize --quick=True      # the wiring only
"""

import random
import re

TITLE = "RLHF demo: summarizing posts (TL;DR)"
CUE = "\nTL;DR:"  # ends every prompt: what follows is the summary

# ----------------------------------------------------------------------------- the task: posts and their summaries
# The four key facts of a post, one word from each list. No other sentence of a post uses these words.
WHO = "roommate boyfriend girlfriend sister brother boss friend neighbor coworker cousin mom dad".split()
VERBS = "broke took lost borrowed sold hid ruined stole".split()
OBJECTS = "phone car laptop bike keys camera guitar jacket watch books".split()
WANTS = {"apology": "an apology", "refund": "a refund", "advice": "some advice", "space": "some space",
         "truth": "the truth", "help": "some help", "break": "a break", "replacement": "a replacement"}
FACT_WORDS = set(WHO + VERBS + OBJECTS + list(WANTS))
# A post: the event, where it happened, the want. Slots: {who} {verb} {obj} {want} the facts, {when} {When} {where}
# what does not matter.
EVENT = ["My {who} {verb} my {obj} {when}.", "{When} my {who} {verb} my {obj}.", "So my {who} {verb} my {obj} {when}.",
         "My {who} just {verb} my {obj}."]
WHEN = ["yesterday", "last week", "last night", "this morning", "on Monday"]
WHERE = ["at the gym", "at the park", "at the mall", "at the beach", "at a party", "in the kitchen", "in the garden"]
DETAIL = ["It happened {where}.", "We were {where} at the time.", "I was {where} when it happened."]
ASK = ["I want {want}.", "All I want now is {want}.", "I just want {want}.", "Honestly, I want {want}."]
# The reference summaries, by style, and how often each style is written. FUNCTION: the words they add to the post's.
SUMMARY = {"facts": [" my {who} {verb} my {obj} and I want {want}.", " my {who} {verb} my {obj}, I want {want}.",
                     " {who} {verb} my {obj}, I want {want}.", " I want {want} because my {who} {verb} my {obj}."],
           "detail": [" my {who} {verb} my {obj} {where} and I want {want}.",
                      " {who} {verb} my {obj} {where}, I want {want}."],
           "no want": [" my {who} {verb} my {obj}.", " {who} {verb} my {obj}."]}
STYLES = {"facts": 0.5, "detail": 0.2, "no want": 0.3}
FUNCTION = set("a an the some my and i want because".split())


def make_corpus(n, seed):
    """n rows {"prompt": post + CUE, "completion": " reference summary."}, a pure function of seed. Completions start
    with a space (they continue the prompt) and end with "."; SFT appends the EOS."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        when = rng.choice(WHEN)
        want = rng.choice(list(WANTS))
        slots = dict(who=rng.choice(WHO), verb=rng.choice(VERBS), obj=rng.choice(OBJECTS), want=WANTS[want], when=when,
                     When=when[0].upper() + when[1:], where=rng.choice(WHERE))
        post = " ".join(rng.choice(t).format(**slots) for t in (EVENT, DETAIL, ASK))
        style = rng.choices(list(STYLES), weights=list(STYLES.values()))[0]
        rows.append({"prompt": post + CUE, "completion": rng.choice(SUMMARY[style]).format(**slots)})
    return rows

# ----------------------------------------------------------------------------- the gold labeler (stands in for a human)
WORD = re.compile(r"[a-z']+")


def gold_parts(prompt, response):
    """The terms of gold_score, for reports and tests."""
    post = set(WORD.findall(prompt.split(CUE)[0].lower()))
    words = WORD.findall(response.lower())
    return dict(facts=len(post & FACT_WORDS & set(words)), invented=sum(w not in post | FUNCTION for w in words),
                words=len(words), no_ending=not response.rstrip().endswith("."))


def gold_score(prompt, response):
    """The hidden human: how good a summary `response` is of the post in `prompt` (the text before CUE).

    words = lowercase [a-z']+ tokens. The post's key facts: its words from WHO, VERBS, OBJECTS and WANTS (one of each).
    score = 1.0 * facts      (the post's key facts the summary names, each counted once: 0..4)
            - 2.0 * invented (summary words, every occurrence, in neither the post nor FUNCTION: a fact the post
                              does not state, a detail from elsewhere, gibberish)
            - 0.1 * words    (shorter is better)
            - 1.0 * [the stripped summary does not end with "."]
    E.g. for "My roommate broke my phone last night. We were at the gym at the time. I want an apology.":
    " my roommate broke my phone and I want an apology." = 4 - 0.1*10 = 3.0; " roommate broke my phone, I want an
    apology." = 3.2 (the same facts in fewer words); " my roommate broke my phone." = 3 - 0.5 = 2.5 (a fact left
    out); " my sister broke my phone and I want an apology." = 3 - 2 - 1.0 = 0.0 (a fact invented: worse than one
    left out); the first with "at the gym" = 2.7 (longer), with "at the park" = 0.7 ("park" invented).
    A reference summary invents nothing and ends with ".": it scores (facts named) - 0.1 * (its words)."""
    p = gold_parts(prompt, response)
    return p["facts"] - 2.0 * p["invented"] - 0.1 * p["words"] - 1.0 * p["no_ending"]

# ----------------------------------------------------------------------------- demo.Config sizes for this task
# Prompts are at most 32 tokens, reference summaries at most 15 + the EOS. The policy must copy the facts from the
# post: a model of 2 layers and 8 heads learns to copy within the SFT budget (chosen over 4 layers and 4 heads while
# the task was built; that comparison was not kept). Labels at bt_temperature 0.5: two good summaries differ by a tenth of a point per word, which a noisier
# labeler barely tells apart. target_kl 1: the reward model learns what SFT samples differ in (a want left out, a
# detail added, length), not to tell an invented fact from a copied one, and a policy far from SFT invents facts.
CONFIG = dict(max_prompt_len=32, max_new_tokens=16, n_layer=2, n_head=8, block_size=48, n_eval=200, sft_iters=800,
              n_pref_prompts=3000, bt_temperature=0.5, rm_iters=250, target_kl=1.0, ppo_iters=24, grpo_iters=16,
              dpo_iters=30, ilql_iters=30, n_probe_prompts=32, curve_n=16)
QUICK = dict(n_train=200, n_eval=20, n_pref_prompts=16, n_heldout_prompts=16, n_eval_prompts=8, n_probe_prompts=4,
             max_new_tokens=12, n_layer=2, n_head=2, n_embd=32, block_size=44, batch_size=4, sft_iters=4, rm_iters=3,
             ppo_iters=2, grpo_iters=2, dpo_iters=2, ilql_iters=3, best_of_n=2, curve_n=4)
