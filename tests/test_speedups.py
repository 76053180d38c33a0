"""
speedups.py against the plain code of model.py it replaces: `enable()` swaps the CPU versions in and `enable(False)`
puts the plain ones back; with them, `generate` in fp32 samples the same tokens with the same logprobs (top-k/top-p
and sharded too), and under bf16 autocast the hidden states and logits agree with the plain path's to bf16 precision;
the sampler, matmul attention and packed linears each compute what the plain code computes; cached decoding attends
in fp32; fp32 heads stay fp32 in the packed sampler.

bf16 tolerances are derived from bf16's precision, not from what one machine shows (CPUs with and without AMX round
bf16 matmuls differently): see bf16_tol.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import model
import speedups
from model import GPT, GPTConfig, fp32_heads, generate
from test_model import SMALL_V, left_pad, rand_tokens, random_gpt, small_prompts

SWAPPED = {"attention": speedups.attention, "KVCache": speedups.KVCache,
           "prepared_for_decoding": speedups.packed_linears, "sample_token": speedups.sample_token}


@pytest.fixture(scope="module")
def gpt():
    return random_gpt(seed=0)


@pytest.fixture(scope="module")
def small_gpt():  # for comparing sampled tokens: see test_model.SMALL_V
    return random_gpt(seed=0, vocab_size=SMALL_V)


def bf16_tol(ref, n_matmuls, computations=2):
    """How far a bf16-autocast computation of `ref` may lie from another one (computations=2) or from the exact value
    (computations=1). bf16 keeps 8 significant bits: a rounding moves a number by at most 2^-9 of its size. A matmul
    rounds its two inputs and its output: 3 roundings per matmul on the path, each counted at the scale of the
    result (to first order, rounding errors add)."""
    return computations * n_matmuls * 3 * 2.0 ** -9 * ref.abs().max().item()


def n_matmuls(gpt):
    """Matmuls from embeddings to logits: c_attn, the attention's two, c_proj, c_fc, c_proj per layer; lm_head."""
    return 6 * gpt.config.n_layer + 1


def prompts():
    return left_pad([rand_tokens(9, seed=21).tolist(), rand_tokens(6, seed=22).tolist(),
                     rand_tokens(12, seed=23).tolist(), rand_tokens(1, seed=24).tolist()])


# ---------------------------------------------------------------------------- switching
def test_enable_swaps_the_cpu_versions_in_and_back():
    plain = {name: getattr(model, name) for name in SWAPPED}
    assert all(f.__module__ == "model" for f in plain.values()) and not speedups.enabled()  # conftest's doing
    speedups.enable()
    assert {name: getattr(model, name) for name in SWAPPED} == SWAPPED and speedups.enabled()
    speedups.enable(False)
    assert {name: getattr(model, name) for name in SWAPPED} == plain and not speedups.enabled()


# ---------------------------------------------------------------------------- generate: speed-ups on == off
@pytest.mark.parametrize("temperature,top_k,top_p,shard", [(1.0, None, None, None), (0.7, 40, 0.9, None),
                                                           (1.0, None, 0.5, (1, 2)), (0.0, None, None, None)])
def test_fp32_generate_equals_the_plain_one(small_gpt, temperature, top_k, top_p, shard):
    """In fp32 the speed-ups change rounding only: the same tokens, the same logprobs (to fp32 rounding)."""
    gpt = small_gpt
    tokens, mask = small_prompts(9, 6, 12, 1)
    if shard:
        tokens, mask = tokens[shard[0]::shard[1]], mask[shard[0]::shard[1]]

    def run():
        return generate(gpt, tokens, mask, 12, temperature, top_k, top_p, torch.Generator().manual_seed(42), -1,
                        shard=shard)

    plain_out, plain_lp, plain_mask = run()
    speedups.enable()
    packed = []  # at each lm_head call: is its packed forward (packed_linears) swapped in?
    hook = gpt.lm_head.register_forward_pre_hook(lambda m, args: packed.append("forward" in vars(m)))
    try:
        out, lp, rmask = run()
    finally:
        hook.remove()
    assert packed == [True] * 12  # generate really ran the speed-ups
    assert torch.equal(out, plain_out) and torch.equal(rmask, plain_mask)
    torch.testing.assert_close(lp, plain_lp, atol=1e-5, rtol=0)


def test_bf16_forward_and_cached_decoding_agree_with_the_plain_path(gpt):
    """Under bf16 autocast (where sampled tokens may differ: bf16 rounding decides near-ties) the hidden states and
    logits of a training forward (matmul_attention) and of cached decoding (fp32 KV cache and attention, packed
    linears) agree with the plain code's to bf16 precision, at every real token."""
    tokens, mask = prompts()
    B, T = tokens.shape
    real = mask.bool()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain_h = gpt(tokens, mask)
        plain = gpt.lm_head(plain_h).float()
        speedups.enable()
        fast_h = gpt(tokens, mask)
        fast = gpt.lm_head(fast_h).float()
        cache = model.KVCache(B, T, tokens.device)
        with model.prepared_for_decoding(gpt, B):  # as generate decodes: a prefill, then one token at a time
            hs = [gpt(tokens[:, :4], mask[:, :4], cache=cache)]
            hs += [gpt(tokens[:, i:i + 1], mask[:, i:i + 1], cache=cache) for i in range(4, T)]
            cached_h = torch.cat(hs, 1)
            cached = gpt.lm_head(cached_h).float()
    n = n_matmuls(gpt)
    for what, h, logits in [("training forward", fast_h, fast), ("cached decoding", cached_h, cached)]:
        assert (h - plain_h)[real].abs().max() <= bf16_tol(plain_h[real], n - 1), what
        assert (logits - plain)[real].abs().max() <= bf16_tol(plain[real], n), what


# ---------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("temperature,top_k,top_p,shard", [(1.0, None, None, None), (0.7, None, None, None),
                                                           (1.0, 5, None, None), (1.3, None, 0.5, None),
                                                           (0.8, 50, 0.9, (1, 3)), (0.0, None, None, None)])
def test_sample_token_equals_the_plain_one(temperature, top_k, top_p, shard):
    """The same tokens from the same generator (which ends in the same state), logprobs to fp32 rounding; logits
    around -100, as GPT-2's are. A small vocabulary for the tokens (see test_model.SMALL_V); GPT-2's for the
    logprobs, whose normaliser is where the fast sampler could lose precision."""
    for V in (SMALL_V, 50257):
        logits = torch.randn(256, V, generator=torch.Generator().manual_seed(3)) * 4 - 100
        results = []
        for sample_token in (model.sample_token, speedups.sample_token):
            g = torch.Generator().manual_seed(4)
            results.append((*sample_token(logits, temperature, top_k, top_p, g, shard), g.get_state()))
        (tok, lp, state), (fast_tok, fast_lp, fast_state) = results
        assert torch.equal(fast_state, state)
        if V == SMALL_V:
            assert torch.equal(fast_tok, tok) and (tok != tok[0]).any()
            torch.testing.assert_close(fast_lp, lp, atol=1e-5, rtol=0)
        else:
            ref = torch.log_softmax(logits.double() / (temperature or 1.0), -1).gather(-1, fast_tok[:, None])
            torch.testing.assert_close(fast_lp.double(), ref.squeeze(-1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("masked", [False, True])
def test_matmul_attention_equals_sdpa(masked):
    """The bf16-on-CPU attention computes what SDPA computes: in fp32 the same values and gradients to rounding; in
    bf16 the fp64 result to bf16 precision (two bf16 matmuls around an fp32 softmax)."""
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 3, 2, 7, 8
    q, k, v, dy = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(4))
    mask = None
    if masked:  # causal + left padding of 0, 2 and 5 tokens, each query seeing itself (as GPT.forward builds it)
        pad = torch.arange(T)[None, :] >= torch.tensor([0, 2, 5])[:, None]
        mask = ((torch.ones(T, T, dtype=torch.bool).tril() & pad[:, None, :]) | torch.eye(T, dtype=torch.bool))[:, None]
    # fp32: values and gradients of SDPA on the same inputs
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    y = speedups.matmul_attention(*leaves, mask)
    y.backward(dy.float())
    ys = [t.detach().clone().requires_grad_() for t in leaves]
    y_sdpa = F.scaled_dot_product_attention(*ys, attn_mask=mask, is_causal=mask is None)
    y_sdpa.backward(dy.float())
    torch.testing.assert_close(y, y_sdpa, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, ys, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    # bf16: the fp64 result to bf16 precision
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    y = speedups.matmul_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() <= bf16_tol(ref, 2, computations=1)


def test_bf16_cpu_forward_uses_matmul_attention_up_to_512_tokens(monkeypatch):
    """Which attention runs where: bf16 on CPU up to 512 tokens -> matmul_attention; fp32, or longer -> SDPA."""
    calls = []
    matmul_attention = speedups.matmul_attention
    monkeypatch.setattr(speedups, "matmul_attention", lambda *a: calls.append(a[0].shape[-2]) or matmul_attention(*a))
    speedups.enable()
    m = GPT(GPTConfig(block_size=600, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    for T, dtype, expect in [(512, torch.bfloat16, [512]), (513, torch.bfloat16, []), (512, torch.float32, [])]:
        calls.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            m(torch.zeros(1, T, dtype=torch.long))
        assert calls == expect, (T, dtype)


def test_cached_decoding_under_bf16_autocast_attends_in_fp32(gpt, monkeypatch):
    """The KV cache is fp32 and cached attention runs outside autocast (under it, SDPA would cast the whole cache to
    bf16 at every step and use a much slower kernel); the uncached bf16 forward uses matmul_attention, under
    autocast as in training. (The results: test_bf16_forward_and_cached_decoding_agree_with_the_plain_path.)"""
    seen = []  # at each attention call: which one, is autocast on?
    sdpa, matmul_attention = F.scaled_dot_product_attention, speedups.matmul_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(("sdpa", torch.is_autocast_enabled("cpu"))) or sdpa(*a, **kw))
    monkeypatch.setattr(speedups, "matmul_attention",
                        lambda *a: seen.append(("matmul", torch.is_autocast_enabled("cpu"))) or matmul_attention(*a))
    speedups.enable()
    tokens, mask = prompts()
    B, T = tokens.shape
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        gpt(tokens, mask)
        n_full = len(seen)
        cache = model.KVCache(B, T, tokens.device)
        gpt(tokens[:, :4], mask[:, :4], cache=cache)
        for i in range(4, T):
            gpt(tokens[:, i:i + 1], mask[:, i:i + 1], cache=cache)
    n_layer = gpt.config.n_layer
    assert seen[:n_full] == [("matmul", True)] * n_layer
    assert seen[n_full:] == [("sdpa", False)] * n_layer * (T - 3)  # every cached call (prefill, steps): fp32
    assert all(k.dtype == v.dtype == torch.float32 for k, v in cache.kv.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_linears_compute_the_same_and_restore(gpt, dtype):
    """generate's oneDNN-packed weights: the same hidden states and logits as plain nn.Linear (fp32 to rounding,
    bf16 to bf16 precision), and every Linear back to its own forward afterwards, also after an error."""
    tokens, mask = prompts()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.no_grad(), autocast:
        plain = gpt.lm_head(gpt(tokens, mask)).float()
        with speedups.packed_linears(gpt, tokens.shape[0]):
            assert all("forward" in vars(m) for m in gpt.modules() if isinstance(m, torch.nn.Linear))  # swapped in
            packed = gpt.lm_head(gpt(tokens, mask)).float()
    tol = 1e-4 if dtype == "float32" else bf16_tol(plain, n_matmuls(gpt))
    assert (packed - plain).abs().max() <= tol
    with pytest.raises(RuntimeError, match="boom"), speedups.packed_linears(gpt, 2):
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in gpt.modules())


def test_bf16_without_onednn_bf16_kernels_samples_on_the_plain_path(gpt, monkeypatch):
    """On a CPU whose oneDNN has no bf16 kernels (weight packing raises there), packed_linears leaves every Linear
    as it is: the same logits as the plain path, and bf16 generate with the speed-ups on samples instead of failing."""
    def no_bf16_kernels(*args):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw")
    monkeypatch.setattr(speedups, "onednn_bf16", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", no_bf16_kernels)
    tokens, mask = prompts()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = gpt.lm_head(gpt(tokens, mask))
        with speedups.packed_linears(gpt, tokens.shape[0]):
            assert not any("forward" in vars(m) for m in gpt.modules())
            assert torch.equal(gpt.lm_head(gpt(tokens, mask)), plain)
        speedups.enable()
        try:
            out, logprobs, _ = model.generate(gpt, tokens, mask, max_new_tokens=3)  # would raise if it packed
        finally:
            speedups.enable(False)
    assert out.shape[1] > tokens.shape[1] and torch.isfinite(logprobs).all()


def test_fp32_heads_stay_fp32_in_the_packed_sampler(gpt):
    """fp32_heads(model) under bf16 autocast: lm_head packed for generate computes in fp32 too (the sampler samples
    the policy that is trained), while the blocks stay bf16."""
    m = fp32_heads(copy.deepcopy(gpt))
    tokens, mask = prompts()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = m(tokens, mask)
        plain = m.lm_head(h)
        with speedups.packed_linears(m, tokens.shape[0]):
            packed, qkv = m.lm_head(h), m.h[0].attn.c_attn(h)
    assert plain.dtype == packed.dtype == torch.float32 and qkv.dtype == torch.bfloat16
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- attention dropout
def test_matmul_attention_applies_dropout_to_the_attention_weights():
    """SFT with dropout > 0 under bf16 on CPU trains through matmul_attention: its dropout_p must drop attention
    weights (and scale the rest by 1 / (1 - p)), as SDPA's does. Reference: the masked softmax written out, then
    F.dropout from the same seed."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g) for _ in range(3))
    torch.manual_seed(5)
    y = speedups.matmul_attention(q, k, v, None, 0.5)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)
    att = scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    torch.manual_seed(5)
    ref = F.dropout(att, 0.5) @ v
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, att @ v, atol=1e-3)  # the dropout really dropped something
