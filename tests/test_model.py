"""
model.py against references: `transformers.GPT2LMHeadModel` (logits through the HF folder both ways and both key
layouts, greedy generate, top-k/top-p warpers), a naive sampler (a full forward per token, no cache; the inverse CDF
in fp64) for the KV-cache `generate`, softmax (the sampler's distribution) and itself (padded == unpadded, gradient
checkpointing). Tiny random-weight models on CPU, fp32, on the plain code of model.py (conftest switches
speedups.py off; tests/test_speedups.py holds the CPU versions to these results). The tests that compare with
transformers skip without it; the others need only torch.

Weights are randomised well beyond GPT-2's init (LayerNorm gains and every bias included): at the init the biases
are 0 and the gains 1, so a missing bias or a LayerNorm mix-up would still pass.
"""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import speedups
from model import EOS, GPT, GPTConfig, Head, KVCache, filter_logits, fp32_heads, generate, sample_token, token_logprobs

V, C, L, NH, BLOCK = 50257, 32, 2, 2, 64


def tiny_config(**kw):
    return GPTConfig(**{**dict(block_size=BLOCK, vocab_size=V, n_layer=L, n_head=NH, n_embd=C), **kw})


def needs_transformers():
    """transformers (quiet), or skip the test that asks for it."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def hf_config():
    return needs_transformers().GPT2Config(n_positions=BLOCK, vocab_size=V, n_layer=L, n_head=NH, n_embd=C,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@torch.no_grad()
def randomize_(module, seed, std=0.2):
    """Every parameter random (tied ones once): LayerNorm gains 1 + noise, everything else noise."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        p.copy_(1 + noise if p.dim() == 1 and ".ln_" in f".{name}" and name.endswith("weight") else noise)
    return module


def random_gpt(seed=0, **kw):
    return randomize_(GPT(tiny_config(**kw)), seed).eval()


def random_hf(seed=0):
    torch.manual_seed(seed)
    return randomize_(needs_transformers().GPT2LMHeadModel(hf_config()), seed).eval()


@pytest.fixture(scope="module")
def gpt():
    return random_gpt(seed=0)


# Two samplers that round differently (fp32 vs fp64, or other kernels) draw different tokens when u falls within
# rounding (~1e-7) of one of the V boundaries of the CDF: with GPT-2's 50257 tokens that is about one draw in a
# thousand, on some machine or other. Tests that compare the tokens of two samplers use a small vocabulary instead.
SMALL_V = 101


@pytest.fixture(scope="module")
def small_gpt():
    return random_gpt(seed=0, vocab_size=SMALL_V)


def small_prompts(*lengths):
    """Left-padded random prompts for small_gpt (padded with token 0: EOS is not in its vocabulary)."""
    return left_pad([rand_tokens(n, seed=10 + i, vocab_size=SMALL_V).tolist() for i, n in enumerate(lengths)], pad=0)


def logits_of(model, idx, mask=None):
    with torch.no_grad():
        return model.lm_head(model(idx, mask))


def hf_logits(hf, idx, mask=None):
    with torch.no_grad():
        if mask is None:
            return hf(idx).logits
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return hf(idx, attention_mask=mask, position_ids=pos).logits


def left_pad(seqs, pad=EOS):
    T = max(map(len, seqs))
    tokens = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            tokens[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return tokens, mask


def rand_tokens(*shape, seed=0, vocab_size=V):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def hf_state_dict(hf):
    return {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}


def write_config(folder, **overrides):
    """config.json of the tiny GPT-2 (what from_pretrained reads), with overrides."""
    os.makedirs(folder, exist_ok=True)
    cfg = dict(model_type="gpt2", vocab_size=V, n_positions=BLOCK, n_ctx=BLOCK, n_embd=C, n_layer=L, n_head=NH,
               activation_function="gelu_new", layer_norm_epsilon=1e-5)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**cfg, **overrides}, f)


def assert_close(a, b, tol, what=""):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol}"


# ---------------------------------------------------------------------------- parity with transformers
def test_ours_to_hf_folder(gpt, tmp_path):
    """(a) our random model -> save_hf -> GPT2LMHeadModel.from_pretrained: same logits, also left padded."""
    gpt.save_hf(tmp_path)
    hf = needs_transformers().GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = rand_tokens(3, 20)
    ours = logits_of(gpt, idx)
    assert ours.abs().max() > 1.0  # the weights are random enough for the comparison to mean something
    assert_close(ours, hf_logits(hf, idx), 1e-4, "logits")
    # Left padding: HF counts pads in its default positions, so give it ours explicitly; compare real tokens.
    tokens, mask = left_pad([rand_tokens(12, seed=1).tolist(), rand_tokens(5, seed=2).tolist(),
                             rand_tokens(1, seed=3).tolist()])
    real = mask.bool()
    assert_close(logits_of(gpt, tokens, mask)[real], hf_logits(hf, tokens, mask)[real], 1e-4, "left-padded logits")
    # and the folder loads back into ours unchanged
    back = GPT.from_pretrained(str(tmp_path)).eval()
    assert_close(logits_of(back, idx), ours, 0.0, "round trip")


def test_hf_folder_to_ours(tmp_path):
    """(b) a random GPT2LMHeadModel -> save_pretrained -> GPT.from_pretrained: same logits."""
    hf = random_hf(seed=1)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    idx = rand_tokens(2, 24, seed=4)
    assert_close(logits_of(ours, idx), hf_logits(hf, idx), 1e-4, "logits")
    tokens, mask = left_pad([rand_tokens(9, seed=5).tolist(), rand_tokens(3, seed=6).tolist()])
    real = mask.bool()
    assert_close(logits_of(ours, tokens, mask)[real], hf_logits(hf, tokens, mask)[real], 1e-4, "left-padded")


def test_hub_layout_and_pytorch_bin(tmp_path):
    """(c) the hub `gpt2` key layout (no "transformer." prefix, h.N.attn.bias buffers, no lm_head.weight) in a
    model.safetensors, and the save_pretrained layout in a pytorch_model.bin."""
    hf = random_hf(seed=2)
    sd = hf_state_dict(hf)
    hub = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    for i in range(L):
        hub[f"h.{i}.attn.bias"] = torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK)
        hub[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(k.startswith("transformer.") for k in hub)
    write_config(tmp_path / "hub")
    save_file(hub, str(tmp_path / "hub" / "model.safetensors"))
    write_config(tmp_path / "bin")
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    idx = rand_tokens(2, 16, seed=7)
    ref = hf_logits(hf, idx)
    for sub in ("hub", "bin"):
        ours = GPT.from_pretrained(str(tmp_path / sub)).eval()
        assert_close(logits_of(ours, idx), ref, 1e-4, sub)


def test_heads_survive_loading(tmp_path):
    """Extra heads are created fresh on top of HF weights; save_hf leaves them out and HF still loads the folder."""
    gpt = random_gpt(seed=3, heads={"value": 1})
    gpt.save_hf(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path), heads={"value": 1, "q": V}).eval()
    assert ours.heads["value"].out_features == 1 and ours.heads["q"].out_features == V
    idx = rand_tokens(1, 8, seed=8)
    assert_close(logits_of(ours, idx), logits_of(gpt, idx), 0.0, "logits with heads")


# ---------------------------------------------------------------------------- loader errors
def _expect_folder_error(folder, *words):
    with pytest.raises(ValueError) as err:
        GPT.from_pretrained(str(folder))
    msg = str(err.value)
    assert str(folder) in msg, msg
    for w in words:
        assert w in msg, msg


def gpt2_folder(folder, seed=0, **config_overrides):
    """A random tiny GPT-2 as an HF folder (save_hf), its config.json rewritten with config_overrides."""
    random_gpt(seed).save_hf(folder)
    write_config(folder, **config_overrides)
    return folder


def test_rejects_non_gpt2_folders(tmp_path):
    # a llama config over GPT-2 weights
    _expect_folder_error(gpt2_folder(tmp_path / "llama", model_type="llama"), "llama")
    # config but no weights
    write_config(tmp_path / "noweights")
    _expect_folder_error(tmp_path / "noweights", "model.safetensors")
    # no config at all
    os.makedirs(tmp_path / "empty")
    _expect_folder_error(tmp_path / "empty", "config.json")
    # config says n_embd 64, weights are n_embd 32
    _expect_folder_error(gpt2_folder(tmp_path / "shape", n_embd=64), "shape")
    # a size missing from config.json (a hand-edited folder)
    _expect_folder_error(gpt2_folder(tmp_path / "nopos", n_positions=None), "no integer n_positions")
    # weights of another architecture (keys that are not GPT-2's)
    write_config(tmp_path / "keys")
    save_file({"model.embed_tokens.weight": torch.zeros(V, C)}, str(tmp_path / "keys" / "model.safetensors"))
    _expect_folder_error(tmp_path / "keys", "missing")


@pytest.mark.parametrize("override", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False),
                                      dict(activation_function="gelu"), dict(layer_norm_epsilon=1e-6)])
def test_refuses_gpt2_variants_that_compute_otherwise(tmp_path, override):
    """A GPT-2 config.json whose attention scaling, activation or LayerNorm epsilon differ has weights of the same
    shapes, so it would load without complaint and compute other logits than HF does: the loader refuses it and
    names the setting."""
    _expect_folder_error(gpt2_folder(tmp_path, seed=5, **override), *override)


def test_unknown_hub_id_is_a_clear_error():
    with pytest.raises(ValueError, match="no-such-user/no-such-model"):
        GPT.from_pretrained("no-such-user/no-such-model")


# ---------------------------------------------------------------------------- padding
def test_padded_equals_unpadded(gpt):
    rows = [rand_tokens(10, seed=10), rand_tokens(4, seed=11)]
    alone = [logits_of(gpt, r[None])[0] for r in rows]
    # left padded
    tokens, mask = left_pad([r.tolist() for r in rows])
    out = logits_of(gpt, tokens, mask)
    assert torch.isfinite(out).all()
    for i, r in enumerate(rows):
        assert_close(out[i, -len(r):], alone[i], 1e-5, f"left-padded row {i}")
    # right padded, with a fully padded row too
    T = 12
    tokens = torch.full((3, T), EOS)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = r, 1
    out = logits_of(gpt, tokens, mask)
    assert torch.isfinite(out).all()
    for i, r in enumerate(rows):
        assert_close(out[i, :len(r)], alone[i], 1e-5, f"right-padded row {i}")


# ---------------------------------------------------------------------------- the sampler
def test_sample_token_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n, T = 20000, 0.7
    g = torch.Generator().manual_seed(0)
    draws, _ = sample_token(logits.expand(n, -1), T, generator=g)
    freq = torch.bincount(draws, minlength=6).double() / n
    p = torch.softmax(logits.double() / T, -1)
    std = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * std + 1e-4).all(), (freq, p)
    # top_k=2: only the top two, in proportion
    draws, _ = sample_token(logits.expand(n, -1), T, top_k=2, generator=g)
    assert set(draws.unique().tolist()) == {0, 1}
    p2 = torch.softmax(logits[:2].double() / T, -1)[0]
    assert abs((draws == 0).double().mean() - p2) <= 4 * (p2 * (1 - p2) / n).sqrt()
    # temperature 0 is argmax, row by row, and consumes no randomness
    rows = torch.randn(64, 100, generator=g)
    assert torch.equal(sample_token(rows, 0.0)[0], rows.argmax(-1))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, None), (1.0, 5, None),
                                                     (1.3, None, 0.5), (0.0, None, None)])
def test_sample_token_logprobs_are_log_softmax_before_filtering(temperature, top_k, top_p):
    # fp64 log_softmax(logits / temperature) at the drawn token, whatever was filtered (temperature 0: plain logits)
    logits = torch.randn(32, 50257, generator=torch.Generator().manual_seed(3)) * 4
    tok, lp = sample_token(logits, temperature, top_k, top_p, torch.Generator().manual_seed(4))
    ref = torch.log_softmax(logits.double() / (temperature or 1.0), -1).gather(-1, tok[:, None]).squeeze(-1)
    assert lp.dtype == torch.float32 and lp.shape == (32,)
    assert (lp.double() - ref).abs().max() < 2e-5, (lp.double() - ref).abs().max()


def test_top_p_keeps_exactly_the_nucleus():
    # probabilities 0.5, 0.25, 0.15, 0.1 (shuffled): the nucleus is the smallest prefix whose mass reaches top_p
    probs = torch.tensor([0.15, 0.5, 0.1, 0.25])
    logits = probs.log()
    cases = {0.4: {1}, 0.6: {1, 3}, 0.8: {1, 3, 0}, 0.95: {1, 3, 0, 2}, 1.0: {0, 1, 2, 3}}
    for top_p, nucleus in cases.items():
        kept = set(torch.isfinite(filter_logits(logits, top_p=top_p)).nonzero().flatten().tolist())
        assert kept == nucleus, (top_p, kept)
        g = torch.Generator().manual_seed(1)
        drawn = set(sample_token(logits.expand(4000, -1), 1.0, top_p=top_p, generator=g)[0].unique().tolist())
        assert drawn == nucleus, (top_p, drawn)
    # a prefix whose mass is exactly top_p is the nucleus: no token past it (equal logits: exact quarters and halves)
    for n, top_p, n_kept in ((4, 0.5, 2), (4, 0.75, 3), (2, 0.5, 1), (4, 0.0, 1)):
        assert torch.isfinite(filter_logits(torch.zeros(1, n), top_p=top_p)).sum() == n_kept, (n, top_p)
    # top_k and top_p together: top_k first, then the nucleus of what is left, renormalised (2/3, 1/3)
    for top_p, nucleus in {0.6: {1}, 0.7: {1, 3}}.items():
        assert set(torch.isfinite(filter_logits(logits, top_k=2, top_p=top_p)).nonzero().flatten().tolist()) == nucleus


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.3), (None, 0.9), (50, 0.8)])
def test_filter_logits_equals_transformers_warpers(top_k, top_p):
    logits_process = needs_transformers().generation.logits_process
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(5)) * 3
    ref = logits.clone()
    if top_k:
        ref = logits_process.TopKLogitsWarper(top_k)(None, ref)
    if top_p:
        ref = logits_process.TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isfinite(filter_logits(logits, top_k, top_p)), torch.isfinite(ref))


def naive_sample(logits, temperature, top_k, top_p, generator):
    """The sampler written out in fp64, sharing no code with model.py: softmax; top-k and the nucleus from the
    tokens sorted by probability; the kept probabilities renormalised; then, in vocabulary order, the first token
    whose cumulative probability exceeds u, one uniform per row drawn as model.sample_token draws it."""
    B = logits.shape[0]
    logits = logits.double()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    p_sorted, order = probs.sort(-1, descending=True)
    keep = torch.ones_like(p_sorted, dtype=torch.bool)
    if top_k:
        keep[:, top_k:] = False
    if top_p is not None and top_p < 1.0:
        p_kept = p_sorted * keep / (p_sorted * keep).sum(-1, keepdim=True)
        keep &= p_kept.cumsum(-1) - p_kept < top_p  # the mass of the more likely tokens has not reached top_p yet
    probs = probs * torch.zeros_like(keep).scatter(-1, order, keep)  # back to vocabulary order
    cdf = (probs / probs.sum(-1, keepdim=True)).cumsum(-1)
    u = torch.rand(B, 1, generator=generator).double()
    return (cdf <= u).sum(-1)  # how many cumulative probabilities are <= u = the index of the first one above it


def naive_generate(model, tokens, mask, max_new_tokens, temperature, top_k, top_p, generator, eos_id):
    """The reference sampler: a full forward over the whole sequence for every new token (no cache), naive_sample,
    and the logprob as fp64 log_softmax(logits / temperature) at the token."""
    B = tokens.shape[0]
    done = torch.zeros(B, dtype=torch.bool)
    new, logprobs, resp_mask = [], [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model.lm_head(model(tokens, mask))[:, -1]  # (B, V)
            tok = naive_sample(logits, temperature, top_k, top_p, generator)
            lp = torch.log_softmax(logits.double() / (temperature or 1.0), -1)[torch.arange(B), tok]
            tok = torch.where(done, torch.full_like(tok, eos_id), tok)
            new.append(tok)
            logprobs.append(torch.where(done, torch.zeros_like(lp), lp))
            resp_mask.append((~done).long())
            done = done | (tok == eos_id)
            tokens = torch.cat([tokens, tok[:, None]], 1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            if done.all():
                break
    return tokens, torch.stack(logprobs, 1), torch.stack(resp_mask, 1)


def test_generate_with_nan_weights_names_the_problem(gpt):
    """NaN logits give a NaN CDF, where searchsorted answers an out-of-range token id; generate says what is wrong
    instead of failing in an index error (or sampling garbage)."""
    bad = copy.deepcopy(gpt)
    with torch.no_grad():
        bad.lm_head.weight[0, 0] = float("nan")
    tokens, mask = left_pad([rand_tokens(4, seed=3).tolist()])
    for temperature in (1.0, 0.0):
        with pytest.raises(ValueError, match="logits are not finite"):
            generate(bad, tokens, mask, 3, temperature, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, None, None), (0.7, 40, 0.9), (1.0, None, 0.5),
                                                     (0.0, None, None)])
def test_generate_equals_naive_sampler(small_gpt, temperature, top_k, top_p):
    """KV cache == full forwards: same tokens, same logprobs; EOS ends a row; logprobs == a training forward."""
    gpt, N = small_gpt, 10
    tokens, mask = small_prompts(7, 2, 5)
    P = tokens.shape[1]
    run = lambda fn, eos: fn(gpt, tokens, mask, N, temperature, top_k, top_p, torch.Generator().manual_seed(42), eos)
    free, _, _ = run(generate, -1)
    # EOS = a token that a row samples 4th or later and another row never samples: one row stops early, one runs on
    eos = next(t for t in free[:, P + 3:].flatten().tolist() if (free[:, P:] != t).all(1).any())
    out, lp, rmask = run(generate, eos)
    ref_out, ref_lp, ref_mask = run(naive_generate, eos)
    assert torch.equal(out, ref_out)
    assert torch.equal(rmask, ref_mask)
    assert_close(lp, ref_lp, 1e-5, "logprobs vs naive")
    assert out.shape == (3, P + N) and lp.dtype == torch.float32
    # response_mask: 1 up to and including the first EOS, 0 after; later tokens are EOS; prompts untouched
    assert torch.equal(out[:, :P], tokens)
    resp = out[:, P:]
    stopped = 0
    for i in range(3):
        hits = (resp[i] == eos).nonzero().flatten().tolist()
        end = hits[0] + 1 if hits else N
        assert rmask[i].tolist() == [1] * end + [0] * (N - end), i
        assert (resp[i, end:] == eos).all() and (lp[i, end:] == 0).all()
        stopped += end < N
    assert stopped >= 1 and rmask.all(1).any()
    # the PPO invariant: rollout logprobs == a training forward's log_softmax(logits / T) on the full sequence
    full_mask = torch.cat([mask, rmask], 1)
    logits = logits_of(gpt, out, full_mask)
    train_lp = token_logprobs(logits[:, P - 1:-1], out[:, P:], temperature)
    real = rmask.bool()
    assert_close(lp[real], train_lp[real], 1e-5, "rollout vs training logprobs")


def gpt2_sized_logits_head():
    """A Head whose logits sit around -100 +- 3, as GPT-2's do (a shared offset from one hidden unit), and its input."""
    g = torch.Generator().manual_seed(0)
    head = Head(64, 1000, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1000, 64, generator=g) * 0.05)
        head.weight[:, 0] = -10.0
    h = torch.randn(32, 64, generator=g)
    h[:, 0] = 10.0
    return head, h


def test_fp32_head_keeps_large_logits_exact_under_bf16_autocast():
    """Under bf16 autocast a plain head rounds logits near -100 to bf16's 0.5 spacing: log-probs off by up to 0.25
    nats. With fp32 set, the head computes in fp32: the same numbers as without autocast."""
    head, h = gpt2_sized_logits_head()
    targets = torch.arange(32) * 31
    exact = torch.log_softmax(h.double() @ head.weight.double().t(), -1)[torch.arange(32), targets]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = token_logprobs(head(h), targets)
        head.fp32 = True
        logits = head(h)
        precise = token_logprobs(logits, targets)
    assert logits.dtype == torch.float32 and torch.equal(logits, F.linear(h, head.weight))
    assert (rounded.double() - exact).abs().max() > 0.05  # what fp32 heads are for: this test can fail
    assert (precise.double() - exact).abs().max() < 1e-4


def test_fp32_heads_sets_every_output_layer_and_only_those():
    m = random_gpt(seed=3, heads={"value": 1, "q": 7})
    heads = [m.lm_head, *m.heads.values()]
    assert fp32_heads(m) is m and all(h.fp32 for h in heads)
    assert not any(getattr(x, "fp32", False) for x in m.h.modules())  # the blocks stay under autocast
    fp32_heads(m, on=False)
    assert not any(h.fp32 for h in heads)


@pytest.mark.parametrize("on", [True, False])
def test_every_trainer_builds_its_models_with_its_fp32_heads_setting(on):
    """PPO (policy, value head, reference, separate critic), GRPO (policy, reference), DPO (policy, reference) and
    ILQL (LM head, V, Q and target Q heads) all take the setting: fp32 is their default, the demo turns it off."""
    import dpo, grpo, ilql, ppo
    from common import setup
    tiny = dict(init_from="scratch", n_layer=1, n_head=1, n_embd=8, block_size=32, max_prompt_len=8,
                fp32_heads=on)
    s = setup("cpu", "bfloat16", 0)
    rl = dict(tiny, reward_model="", reward_fn="tests.test_grpo:count_the", max_new_tokens=8)
    models = [*ppo.build_models(ppo.Config(**rl, critic="shared", critic_init_from=""), s, "scratch", "shared")[::2]]
    models += ppo.build_models(ppo.Config(**rl, critic_init_from="scratch"), s, "scratch", "separate")[1:3]
    models += grpo.build_models(grpo.Config(**rl), s, "scratch")[:2]
    models += dpo.build_models(dpo.Config(**tiny, max_len=16), s, "scratch", None)
    models.append(ilql.build_model(ilql.Config(**tiny, max_len=16, max_new_tokens=8), s)[0])
    heads = [h for m in models for h in m.modules() if isinstance(h, Head)]
    # PPO: policy (LM + value), reference; critic (LM + value), reference. GRPO, DPO: two LM heads each. ILQL: 1 + 5
    assert len(models) == 9 and len(heads) == 3 + 3 + 2 + 2 + 6
    assert all(h.fp32 == on for h in heads)


def test_sharded_generate_equals_one_batch(small_gpt):
    """DDP rollouts: 2 ranks, each sampling rows rank::2 of a batch with the same generator seed and shard=(rank, 2),
    produce exactly the rows one process samples for the whole batch (the union of the ranks' samples is equal)."""
    gpt = small_gpt
    tokens, mask = small_prompts(3, 6, 2, 5)
    run = lambda t, m, shard: generate(gpt, t, m, 8, 1.0, None, None, torch.Generator().manual_seed(7), -1,
                                       shard=shard)
    whole, whole_lp, _ = run(tokens, mask, None)
    for rank in (0, 1):
        part, part_lp, _ = run(tokens[rank::2], mask[rank::2], (rank, 2))
        assert torch.equal(part, whole[rank::2]), rank
        assert_close(part_lp, whole_lp[rank::2], 1e-5, f"logprobs of rank {rank}")
    # and the shard really matters: without it, rank 1 would replay rank 0's noise
    assert not torch.equal(run(tokens[1::2], mask[1::2], None)[0], whole[1::2])


def test_generate_stops_when_every_row_is_done(gpt):
    tokens = rand_tokens(1, 4, seed=15)
    mask = torch.ones_like(tokens)
    free, _, _ = generate(gpt, tokens, mask, 8, 0.7, generator=torch.Generator().manual_seed(3), eos_id=-1)
    eos = int(free[0, 4 + 2])
    out, lp, rmask = generate(gpt, tokens, mask, 8, 0.7, generator=torch.Generator().manual_seed(3), eos_id=eos)
    end = (free[0, 4:] == eos).nonzero()[0].item() + 1
    assert out.shape[1] == 4 + end and rmask.tolist() == [[1] * end]
    assert torch.equal(out, free[:, :4 + end])


# ---------------------------------------------------------------------------- greedy against transformers
def test_greedy_generate_equals_transformers(gpt, tmp_path):
    gpt.save_hf(tmp_path)
    hf = needs_transformers().GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    N = 12
    for prompts in (rand_tokens(1, 6, seed=16), rand_tokens(3, 6, seed=17)):
        mask = torch.ones_like(prompts)
        ours, lp, rmask = generate(gpt, prompts, mask, N, temperature=0.0, eos_id=-1)
        with torch.no_grad():
            ref = hf.generate(prompts, attention_mask=mask, max_new_tokens=N, do_sample=False,
                              pad_token_id=EOS, eos_token_id=None)
        assert ref.shape == ours.shape == (prompts.shape[0], 6 + N)
        assert torch.equal(ours, ref), (ours[:, 6:], ref[:, 6:])
        # temperature 0 logprobs are those of the plain logits
        train_lp = token_logprobs(logits_of(gpt, ours)[:, 5:-1], ours[:, 6:])
        assert_close(lp, train_lp, 1e-5, "greedy logprobs")


# ---------------------------------------------------------------------------- training
def test_grad_checkpointing_same_gradients():
    model = random_gpt(seed=6, heads={"value": 1}).train()
    tokens, mask = left_pad([rand_tokens(9, seed=18).tolist(), rand_tokens(5, seed=19).tolist()])

    def grads(ckpt):
        model.zero_grad(set_to_none=True)
        model.grad_checkpointing = ckpt
        h = model(tokens, mask)
        loss = -token_logprobs(model.lm_head(h)[:, :-1], tokens[:, 1:]).mul(mask[:, 1:]).sum()
        (loss + model.heads["value"](h).square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert_close(plain[n], ckpt[n], 1e-5, n)
    model.grad_checkpointing = False


def test_grad_checkpointing_leaves_cached_decoding_alone():
    """With grad_checkpointing on and gradients enabled, a forward with a KV cache still fills the cache (a
    checkpointed block was called without it): prefill then one step equal the plain forward of both."""
    model = random_gpt(seed=6)
    model.grad_checkpointing = True
    tokens = rand_tokens(6, seed=20)[None]
    mask = torch.ones_like(tokens)
    cache = KVCache(1, 6, tokens.device)
    model(tokens[:, :5], mask[:, :5], cache=cache)
    step = model(tokens[:, 5:], mask[:, 5:], cache=cache)
    assert_close(step[:, -1], model(tokens, mask)[:, -1], 1e-5, "cached step")


# ---------------------------------------------------------------------------- context edge, HF folders, init
@torch.no_grad()
def test_the_whole_context_is_usable_and_one_token_more_is_refused(gpt):
    """block_size tokens fit (a batch of max_len = block_size, or a cache filled to its last slot); one more is a
    ValueError naming block_size."""
    full = rand_tokens(1, BLOCK, seed=30)
    h = gpt(full)
    assert h.shape == (1, BLOCK, C)
    assert_close(gpt(full, torch.ones_like(full))[:, -1], h[:, -1], 1e-5, "masked forward of block_size tokens")
    cache = KVCache(1, BLOCK, full.device)
    gpt(full[:, :-1], torch.ones_like(full[:, :-1]), cache=cache)
    assert_close(gpt(full[:, -1:], cache=cache)[:, -1], h[:, -1], 1e-5, "the cache's last slot")
    with pytest.raises(ValueError, match=f"sequence of {BLOCK + 1} tokens is longer than the model's block_size"):
        gpt(rand_tokens(1, BLOCK + 1, seed=31))


def test_an_hf_folder_whose_lm_head_is_not_tied_is_refused(gpt, tmp_path):
    """GPT-2 ties lm_head to wte; a folder with another lm_head.weight (a fine-tune that untied them) would load with
    wte's logits, silently: refused, naming the folder. A tied copy of it loads."""
    gpt.save_hf(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    wte = sd["transformer.wte.weight"]
    save_file({**sd, "lm_head.weight": wte.clone()}, str(tmp_path / "model.safetensors"))
    GPT.from_pretrained(str(tmp_path))  # tied: fine
    save_file({**sd, "lm_head.weight": wte + 0.01}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lm_head\.weight is not tied to wte\.weight"):
        GPT.from_pretrained(str(tmp_path))


def test_the_exported_folder_names_gpt2s_special_tokens(gpt, tmp_path):
    """<|endoftext|> (50256) is GPT-2's BOS and EOS: HF's generate stops at eos_token_id from the exported config."""
    gpt.save_hf(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == EOS == 50256
    hf = needs_transformers().GPT2LMHeadModel.from_pretrained(tmp_path)
    assert hf.config.eos_token_id == hf.generation_config.eos_token_id == EOS


@pytest.mark.parametrize("fast", [False, True])
def test_top_k_larger_than_the_vocabulary_keeps_every_token(fast):
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filter_logits(logits, top_k=50), logits)
    sampler = speedups.sample_token if fast else sample_token
    tok, lp = sampler(logits, 1.0, 50, None, torch.Generator().manual_seed(1))
    assert torch.allclose(lp, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1), atol=1e-6)


def test_init_scales_of_gpt2_and_of_the_heads():
    """GPT-2's init: N(0, 0.02) weights, the residual projections scaled by 1/sqrt(2 n_layer); scalar heads (reward,
    value) at std 1/sqrt(n_embd + 1) as in lm-human-preferences, vocabulary-sized heads as lm_head; biases 0."""
    torch.manual_seed(0)
    n_layer, n_embd = 4, 256
    m = GPT(GPTConfig(block_size=16, vocab_size=1000, n_layer=n_layer, n_head=4, n_embd=n_embd,
                      heads={"reward": 1, "q": 1000}))
    expected = {"h.0.attn.c_attn.weight": 0.02, "h.0.mlp.c_fc.weight": 0.02, "wte.weight": 0.02,
                "h.0.attn.c_proj.weight": 0.02 / math.sqrt(2 * n_layer),
                "h.3.mlp.c_proj.weight": 0.02 / math.sqrt(2 * n_layer),
                "heads.reward.weight": 1 / math.sqrt(n_embd + 1), "heads.q.weight": 0.02}
    params = dict(m.named_parameters())
    for name, std in expected.items():
        assert abs(params[name].std().item() / std - 1) < 0.15, (name, params[name].std().item(), std)
    assert all(float(p.detach().abs().max()) == 0 for n, p in params.items() if n.endswith(".bias") and "ln_" not in n)
