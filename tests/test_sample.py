"""sample.py: greedy text equals transformers' greedy generate; FILE: prompts; ILQL-guided decoding (ilql_logits_fn)
against a naive reference; fp32 heads under bf16 autocast; the CLI."""

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

import sample as S
from common import ConfigError, save_checkpoint
from data import EOS, decode, encode
from ilql import ilql_heads
from model import GPT, GPTConfig, Head

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt(seed=0, heads=None):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, heads=heads or {}))
    with torch.no_grad():  # larger than the init so that the greedy path is not one token repeated
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    tiny_gpt().save_hf(folder)
    return str(folder)


def test_greedy_equals_transformers(hf_folder, capsys):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    prompt, n = "The quick brown fox", 12
    cfg = S.Config(init_from=hf_folder, start=prompt, num_samples=2, max_new_tokens=n, temperature=0.0, device="cpu")
    out = S.main(cfg)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    ids = torch.tensor([encode(prompt)])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=EOS, eos_token_id=EOS)[0, ids.shape[1]:].tolist()
    ref = ref[:ref.index(EOS)] if EOS in ref else ref
    assert out["completions"] == [[decode(ref)] * 2]
    assert len(ref) > 3 and len(set(ref)) > 1  # a real test: several distinct tokens
    printed = capsys.readouterr().out
    assert prompt + decode(ref) in printed


def test_file_prompts_and_sampling(hf_folder, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello there\n\nOnce upon a time\n", encoding="utf-8")
    cfg = S.Config(init_from=hf_folder, start=f"FILE:{path}", num_samples=3, max_new_tokens=8, temperature=1.0,
                   top_k=0, device="cpu")
    out = S.main(cfg)
    assert out["prompts"] == ["Hello there", "Once upon a time"]
    assert [len(c) for c in out["completions"]] == [3, 3]
    assert len(set(out["completions"][0])) > 1  # the samples of one prompt differ
    assert S.main(cfg) == out  # seeded: the same command prints the same text


def test_sample_matches_generate_per_prompt(hf_folder):
    """sample() is generate() on the prompt repeated num_samples times, decoded up to the first EOS."""
    from model import generate
    model = GPT.from_pretrained(hf_folder).eval()
    cfg = S.Config(num_samples=4, max_new_tokens=6, temperature=0.7, top_k=50, top_p=0.9, seed=5)
    texts = S.sample(model, ["a", "b c"], cfg)
    ids = torch.tensor([encode("b c")] * 4)
    out, _, mask = generate(model, ids, torch.ones_like(ids), 6, 0.7, 50, 0.9, torch.Generator().manual_seed(6))
    ref = [decode([t for t, m in zip(row, mr) if m and t != EOS]) for row, mr in
           zip(out[:, ids.shape[1]:].tolist(), mask.tolist())]
    assert texts[1] == ref


def ilql_checkpoint(path):
    """A random tiny model with ILQL's heads, saved as ilql.py saves it; returns the model."""
    model = tiny_gpt(seed=1, heads=ilql_heads(50257))
    save_checkpoint(str(path), kind="ilql", model_config=asdict(model.config), model=model.state_dict(), step=0)
    return model


def test_ilql_guided_decoding(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    model = ilql_checkpoint(path)
    beta, n, prompt = 3.0, 6, "Hi"
    out = S.main(S.Config(init_from=path, start=prompt, num_samples=1, max_new_tokens=n, temperature=0.0,
                          beta=beta, device="cpu"))
    # naive reference: full forward each step, argmax of log_softmax(logits) + beta * (min target Q - V)
    seq = encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            h = model(torch.tensor([seq]))[0, -1]
            heads = model.heads
            score = (torch.log_softmax(model.lm_head(h), -1)
                     + beta * (torch.minimum(heads["q1_target"](h), heads["q2_target"](h)) - heads["v"](h)))
            seq.append(int(score.argmax()))
            if seq[-1] == EOS:
                break
    guided = seq[len(encode(prompt)):]
    assert out["completions"] == [[decode([t for t in guided if t != EOS])]]
    plain = S.main(S.Config(init_from=path, start=prompt, num_samples=1, max_new_tokens=n, temperature=0.0,
                            device="cpu"))
    assert plain["completions"] != out["completions"]  # beta changes what is decoded


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_decodes_with_fp32_heads_under_bf16_autocast(tmp_path, beta):
    """--dtype=bfloat16: the trunk runs under bf16 autocast, but every output layer the sampler uses (lm_head; with
    --beta also ILQL's target Q heads and V) computes in fp32 from its input, as ppo.py and ilql.py train."""
    path = str(tmp_path / "ckpt.pt")
    ilql_checkpoint(path)
    calls = []  # every Head call: autocast on?, the module, its input, its output

    def record(module, args, output):
        if isinstance(module, Head):
            calls.append((torch.is_autocast_enabled("cpu"), module, args[0], output))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        S.main(S.Config(init_from=path, start="Hi", num_samples=2, max_new_tokens=4, temperature=1.0, beta=beta,
                        dtype="bfloat16", device="cpu"))
    finally:
        hook.remove()
    assert len({id(m) for _, m, _, _ in calls}) == (4 if beta else 1)  # lm_head (+ q1_target, q2_target, v)
    for autocast, m, x, y in calls:
        assert autocast and y.dtype == torch.float32
        fp32 = F.linear(x.float(), m.weight, m.bias)
        torch.testing.assert_close(y, fp32, atol=1e-5 * fp32.abs().max().item(), rtol=0)


def test_beta_needs_an_ilql_checkpoint(hf_folder):
    with pytest.raises(ConfigError, match="ilql"):
        S.main(S.Config(init_from=hf_folder, beta=1.0, device="cpu", max_new_tokens=2))


def test_a_reward_model_is_refused_as_the_policy(tmp_path):
    """A reward checkpoint holds no policy to sample from: one error naming the file and the kinds sample.py takes."""
    m = tiny_gpt(heads={"reward": 1})
    path = str(tmp_path / "rm.pt")
    save_checkpoint(path, kind="reward", model_config=asdict(m.config), model=m.state_dict(), step=0)
    with pytest.raises(ConfigError, match=r"rm\.pt: is a 'reward' checkpoint, expected 'sft' or 'ppo' or"):
        S.main(S.Config(init_from=path, device="cpu", max_new_tokens=2))


def _run(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_help():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    assert "--init_from" in r.stdout and "--temperature" in r.stdout


def test_cli_unknown_key():
    r = _run("--init_frm=gpt2")
    assert r.returncode == 2
    assert "error:" in r.stderr and "init_frm" in r.stderr and "init_from" in r.stderr  # names it, suggests the fix
    assert "Traceback" not in r.stderr


def response_length(prompts, responses):  # best-of-n's reward_fn in the tests: "tests.test_sample:response_length"
    return [float(len(r)) for r in responses]


def test_best_of_n_keeps_the_highest_scored_candidate(hf_folder, capsys):
    """--best_of=4: each completion is the highest-scored of the 4 candidates that best_of=1 with 4x the samples
    draws from the same generator (rejection sampling), and the analytic KL bound is printed."""
    base = dict(init_from=hf_folder, start="Once upon a time", max_new_tokens=6, temperature=1.0, top_k=0, seed=3,
                device="cpu")
    candidates = S.main(S.Config(**base, num_samples=8))["completions"][0]
    best = S.main(S.Config(**base, num_samples=2, best_of=4,
                           reward_fn="tests.test_sample:response_length"))["completions"][0]
    expected = [max(candidates[k:k + 4], key=len) for k in (0, 4)]  # max: the first of equal scores, as argmax
    assert best == expected and len(set(candidates)) > 2  # the candidates differ: the pick can be wrong
    assert "best-of-4: KL(best-of-4 || policy) <= log 4 - 3/4 = 0.636 nats" in capsys.readouterr().out


def test_best_of_n_needs_a_scorer(hf_folder):
    with pytest.raises(ConfigError, match="exactly one of reward_model"):
        S.main(S.Config(init_from=hf_folder, best_of=2, device="cpu"))
    with pytest.raises(ConfigError, match="best_of must be >= 1"):
        S.main(S.Config(init_from=hf_folder, best_of=0, device="cpu"))


# ---------------------------------------------------------------------------- context edge, best-of-n
LONG = " ".join(f"word{i}" for i in range(80))  # ~160 tokens: longer than every context here


def test_a_long_prompt_keeps_exactly_the_room_max_new_tokens_leaves(hf_folder, monkeypatch):
    """sample(): prompt + completion fit the 64-token context and the prompt keeps as much of its end as fits, the
    last block_size - max_new_tokens tokens."""
    seen = []
    real = S.sample_responses
    monkeypatch.setattr(S, "sample_responses", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    S.main(S.Config(init_from=hf_folder, start=LONG, num_samples=1, max_new_tokens=8, device="cpu"))
    r, = seen
    assert r["P"] == 64 - 8 and r["tokens"][0, :r["P"]].tolist() == encode(LONG)[-(64 - 8):]


def test_max_new_tokens_filling_the_context_is_a_config_error(hf_folder):
    with pytest.raises(ConfigError, match=r"max_new_tokens=64 leaves no room for a prompt in block_size 64"):
        S.main(S.Config(init_from=hf_folder, max_new_tokens=64, device="cpu"))


def test_file_prompts_keep_their_spaces(tmp_path):
    """One prompt per line, as written: only the line ending goes (a trailing space changes GPT-2's next token)."""
    path = tmp_path / "p.txt"
    path.write_bytes(b"  indented\r\nends with a space \n\n")
    assert S.read_prompts(f"FILE:{path}") == ["  indented", "ends with a space "]


def test_best_of_n_fits_a_reward_model_with_a_shorter_context(hf_folder, tmp_path):
    """A reward model of 32 tokens scoring a 64-token policy's candidates: prompts are cut to the reward model's
    context (32 - max_new_tokens), so every candidate is scored instead of overflowing it."""
    cfg = GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=32, heads={"reward": 1})
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "rm.pt"), kind="reward", model_config=asdict(cfg), model=GPT(cfg).state_dict(),
                    step=0, config={})
    out = S.main(S.Config(init_from=hf_folder, start=LONG, num_samples=2, best_of=2, max_new_tokens=6,
                          reward_model=str(tmp_path / "rm.pt"), temperature=1.0, top_k=0, device="cpu"))
    assert len(out["completions"][0]) == 2
