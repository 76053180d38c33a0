"""Tests for label.py, driven through stdin: answers map to chosen/rejected, ties and skips, invalid keys, resuming,
and active querying picks the pair with the smallest reward gap (checked by brute force over all pairs). The
completions expected are sampled here with model.generate, not with label.py's code."""

import io
import itertools
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import data
import label
import speedups
from common import ConfigError, parse_config, save_checkpoint
from model import EOS, GPT, GPTConfig, generate

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["This movie", "The acting in this film was", "I watched this movie with my family and", "This sequel",
           "The remake", "When the credits rolled,"]
MAX_NEW_TOKENS = 6


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


def tiny_config(**heads):
    return GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, heads=heads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label")
    torch.manual_seed(0)
    GPT(tiny_config()).save_hf(str(tmp / "policy"))
    cfg = tiny_config(reward=1)
    torch.manual_seed(1)
    save_checkpoint(str(tmp / "rm.pt"), kind="reward", model_config=asdict(cfg), model=GPT(cfg).state_dict(), step=0,
                    config={})
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return tmp


def args(files, out, *extra):
    return [f"--init_from={files / 'policy'}", f"--prompts={files / 'prompts.jsonl'}", f"--out={out}",
            f"--max_new_tokens={MAX_NEW_TOKENS}", "--device=cpu", *extra]


def run_main(argv, answers, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answers))
    counts = label.main(parse_config(label.Config, argv))
    return counts, capsys.readouterr().out


def read(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def candidates(files, prompt_id, n=2):
    """The n completions label.py should show for prompt `prompt_id`: model.generate on the prompt repeated n times
    with a generator seeded seed + prompt_id, each row up to its first EOS. With the CPU speed-ups on, as label.py's
    setup() runs: the same kernels, so the same draws (other kernels round differently, which can flip a draw)."""
    speedups.enable()
    model = GPT.from_pretrained(str(files / "policy")).eval()
    ids = torch.tensor([data.encode(PROMPTS[prompt_id])] * n)
    out, _, mask = generate(model, ids, torch.ones_like(ids), MAX_NEW_TOKENS, 1.0,
                            generator=torch.Generator().manual_seed(1337 + prompt_id))
    rows = out[:, ids.shape[1]:].tolist()
    texts = [data.decode([t for t, m in zip(row, m_row, strict=True) if m and t != EOS])
             for row, m_row in zip(rows, mask.tolist(), strict=True)]
    assert len(set(texts)) > 1  # distinct completions: showing them swapped would fail the tests
    return texts


def test_answers_through_a_pipe_then_resume(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "prefs.jsonl"
    # Session 1, a real process reading a pipe: 1, an invalid key (asked again), 2, tie, skip, quit.
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf_cache")}
    proc = subprocess.run([sys.executable, "label.py", *args(files, out)], input="1\nx\n2\nt\ns\nq\n", text=True,
                          capture_output=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'x' is not an answer" in proc.stdout
    assert "1 pairs written" not in proc.stdout and "2 pairs written" in proc.stdout and "1 ties" in proc.stdout
    rows = read(out)
    (a0, b0), (a1, b1) = candidates(files, 0), candidates(files, 1)
    assert rows == [{"prompt": PROMPTS[0], "chosen": a0, "rejected": b0, "prompt_id": 0},  # answer 1
                    {"prompt": PROMPTS[1], "chosen": b1, "rejected": a1, "prompt_id": 1}]  # answer 2
    ties = read(str(out) + ".ties.jsonl")
    assert [t["prompt_id"] for t in ties] == [2]
    assert [(p.prompt, p.chosen, p.rejected) for p in data.load_preferences(str(out))] == \
        [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]  # reward.py's reader takes the file as it is

    # Session 2, in-process: labeled and tied prompts are not asked again; the skipped prompt 3 comes first.
    # The answer "2", then end of input: a clean quit.
    counts, stdout = run_main(args(files, out), "2\n", monkeypatch, capsys)
    assert counts == dict(labeled=1, ties=0, skipped=0)
    assert "3 answered in earlier sessions, 3 to go" in stdout
    a3, b3 = candidates(files, 3)
    assert read(out)[2] == {"prompt": PROMPTS[3], "chosen": b3, "rejected": a3, "prompt_id": 3}


def test_no_stdin_at_all_quits_like_the_end_of_input(monkeypatch, capsys):
    """A closed stdin (input() raises RuntimeError: lost sys.stdin) quits cleanly, as the end of a pipe does."""
    monkeypatch.setattr(sys, "stdin", None)
    assert label.ask() == "q"


def test_active_needs_two_candidates(files, tmp_path, monkeypatch, capsys):
    """Active querying shows a pair of the n_candidates: one candidate would skip every prompt, silently."""
    with pytest.raises(ConfigError, match=r"n_candidates must be >= 2, not 1"):
        run_main(args(files, tmp_path / "prefs.jsonl", "--active=True", f"--reward_model={files / 'rm.pt'}",
                      "--n_candidates=1"), "q\n", monkeypatch, capsys)


def test_a_reward_model_context_too_short_is_named(files, tmp_path, monkeypatch, capsys):
    """Room for a 1-token prompt in the policy's 64 tokens, none in the reward model's once the EOS is added: the
    error names the reward model's block_size, not the policy's."""
    with pytest.raises(ConfigError, match=r"max_new_tokens 63 \+ the EOS leave no room for a prompt in the reward "
                                          r"model's block_size 64"):
        run_main(args(files, tmp_path / "prefs.jsonl", "--active=True", f"--reward_model={files / 'rm.pt'}",
                      "--max_new_tokens=63"), "q\n", monkeypatch, capsys)


def test_a_reward_model_is_refused_as_the_policy(files, tmp_path, monkeypatch, capsys):
    """The completions come from a policy: a reward checkpoint in init_from is one error naming it."""
    with pytest.raises(ConfigError, match=r"rm\.pt: is a 'reward' checkpoint, expected 'sft' or 'ppo' or"):
        run_main([f"--init_from={files / 'rm.pt'}", *args(files, tmp_path / "prefs.jsonl")[1:]], "q\n", monkeypatch,
                 capsys)


def test_resume_refuses_another_prompt_list(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "prefs.jsonl"
    out.write_text(json.dumps({"prompt": "something else", "chosen": "a", "rejected": "b", "prompt_id": 0}) + "\n")
    with pytest.raises(ValueError, match="does not match this prompt list"):
        run_main(args(files, out), "q\n", monkeypatch, capsys)


def test_active_shows_the_pair_with_the_smallest_reward_gap(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "prefs.jsonl"
    n = 5
    run_main(args(files, out, "--active=True", f"--reward_model={files / 'rm.pt'}", f"--n_candidates={n}"),
             "1\n2\nq\n", monkeypatch, capsys)
    rows = read(out)
    assert len(rows) == 2
    cfg = tiny_config(reward=1)
    torch.manual_seed(1)
    rm = GPT(cfg).eval()  # the same weights as rm.pt
    for i, row in enumerate(rows):
        texts = candidates(files, i, n)
        scores = []
        with torch.no_grad():
            for t in texts:  # one unpadded sequence at a time; the score is read at the appended EOS
                p, r = data.tokenize_example(PROMPTS[i], t, 64 - 6 - 1, 64)  # label.py's prompt truncation
                scores.append(rm.heads["reward"](rm(torch.tensor([p + r]))[0, -1]).item())
        pairs = [(x, y) for x, y in itertools.combinations(range(n), 2)
                 if texts[x] != texts[y] and texts[x] and texts[y]]
        x, y = min(pairs, key=lambda xy: abs(scores[xy[0]] - scores[xy[1]]))
        shown = (texts[x], texts[y]) if i == 0 else (texts[y], texts[x])  # answers: 1, then 2
        assert (row["chosen"], row["rejected"]) == shown
        gaps = sorted(abs(scores[u] - scores[v]) for u, v in pairs)
        assert gaps[0] < gaps[1] - 1e-6  # the minimum is unique: the check is meaningful


def test_start_prompts_like_sample_py(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "prefs.jsonl"
    (tmp_path / "p.txt").write_text("This movie\nThe remake\n")
    argv = [f"--init_from={files / 'policy'}", f"--out={out}", f"--start=FILE:{tmp_path / 'p.txt'}",
            "--num_samples=2", "--max_new_tokens=6", "--device=cpu"]
    counts, stdout = run_main(argv, "1\n1\n2\n", monkeypatch, capsys)
    assert counts == dict(labeled=3, ties=0, skipped=0) and "4 to go" in stdout
    rows = read(out)
    assert [(r["prompt"], r["prompt_id"]) for r in rows] == [("This movie", 0), ("This movie", 1), ("The remake", 2)]
    assert rows[0]["chosen"] != rows[1]["chosen"]  # seed + prompt_id: a new pair for the same prompt


def test_closest_pair_skips_identical_and_empty():
    assert label.closest_pair(["a", "a", "b"], [0.0, 0.1, 5.0]) == (0, 2)
    assert label.closest_pair(["a", "", "b", "c"], [0.0, 0.0, 2.0, 0.5]) == (0, 3)
    assert label.closest_pair(["c", "b", "a"], [3.0, 1.0, 1.5]) == (1, 2)
    assert label.closest_pair(["a", "a"], [0.0, 0.0]) is None


# ---------------------------------------------------------------------------- resuming, max_prompts, answers
def test_resume_refuses_a_prompt_id_past_the_prompt_list(files, tmp_path, monkeypatch, capsys):
    """A labels file from a longer prompt list: the id one past the end is named, not an IndexError."""
    out = tmp_path / "prefs.jsonl"
    out.write_text(json.dumps({"prompt": "x", "chosen": "a", "rejected": "b", "prompt_id": len(PROMPTS)}) + "\n")
    with pytest.raises(ConfigError, match=rf"line 1 \(prompt_id {len(PROMPTS)}\) does not match this prompt list"):
        run_main(args(files, out), "q\n", monkeypatch, capsys)


def test_max_prompts_labels_only_the_first_ones(files, tmp_path, monkeypatch, capsys):
    counts, stdout = run_main(args(files, tmp_path / "prefs.jsonl", "--max_prompts=2"), "q\n", monkeypatch, capsys)
    assert "2 prompts, 0 answered in earlier sessions, 2 to go" in stdout


@pytest.mark.parametrize("typed,answer", [("Q\n", "q"), (" T \n", "t"), ("S\n", "s")])
def test_answers_are_read_whatever_their_case(monkeypatch, typed, answer):
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    assert label.ask() == answer


def test_active_scores_each_candidate_after_the_prompt_it_was_sampled_from(files, tmp_path, monkeypatch, capsys):
    """A prompt longer than half the reward model's context (scoring.score's default prompt cut): the reward model
    reads the same prompt tokens the candidates were sampled after, not a shorter cut of it."""
    long_prompt = "I watched this movie with my family on a rainy Sunday afternoon, after a long week at work, " \
                  "with popcorn and blankets on the old sofa, and we all agreed that the second half was"
    (tmp_path / "long.jsonl").write_text(json.dumps({"prompt": long_prompt}) + "\n")
    assert len(data.encode(long_prompt)) > 64 // 2
    sampled, scored = [], []
    real_sample, real_score = label.sample_responses, label.score
    monkeypatch.setattr(label, "sample_responses", lambda m, p, max_prompt_len, *a, **kw:
                        sampled.append(max_prompt_len) or real_sample(m, p, max_prompt_len, *a, **kw))
    monkeypatch.setattr(label, "score", lambda m, p, r, b, max_prompt_len=None, **kw:
                        scored.append(max_prompt_len) or real_score(m, p, r, b, max_prompt_len, **kw))
    argv = [*args(files, tmp_path / "prefs.jsonl", "--active=True", f"--reward_model={files / 'rm.pt'}",
                  "--n_candidates=4")]
    argv = [f"--prompts={tmp_path / 'long.jsonl'}" if a.startswith("--prompts=") else a for a in argv]
    run_main(argv, "1\nq\n", monkeypatch, capsys)
    assert sampled == scored == [64 - MAX_NEW_TOKENS - 1]  # the reward model's room: prompt, response and its EOS
