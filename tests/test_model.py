"""
model.py against references: `transformers.GPT2LMHeadModel` (logits through the HF folder both ways and both key
layouts, greedy generate), a naive no-cache sampler (the KV-cache `generate`), softmax (the sampler's distribution)
and itself (padded == unpadded, gradient checkpointing). Tiny random-weight models on CPU, fp32.

Weights are randomised well beyond GPT-2's init (LayerNorm gains and every bias included): at the init the biases
are 0 and the gains 1, so a missing bias or a LayerNorm mix-up would still pass.
"""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from model import (EOS, GPT, GPTConfig, Head, KVCache, cpu_packed_linears, filter_logits, fp32_heads, generate,
                   sample_token,
                   token_logprobs)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

V, C, L, NH, BLOCK = 50257, 32, 2, 2, 64


def tiny_config(**kw):
    return GPTConfig(**{**dict(block_size=BLOCK, vocab_size=V, n_layer=L, n_head=NH, n_embd=C), **kw})


def hf_config():
    return GPT2Config(n_positions=BLOCK, vocab_size=V, n_layer=L, n_head=NH, n_embd=C,
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
    return randomize_(GPT2LMHeadModel(hf_config()), seed).eval()


@pytest.fixture(scope="module")
def gpt():
    return random_gpt(seed=0)


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


def rand_tokens(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def hf_state_dict(hf):
    return {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}


def write_config(folder, **overrides):
    os.makedirs(folder, exist_ok=True)
    cfg = hf_config().to_dict()
    cfg.update(overrides)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)


def assert_close(a, b, tol, what=""):
    diff = (a.float() - b.float()).abs().max().item()
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol}"


# ---------------------------------------------------------------------------- parity with transformers
def test_ours_to_hf_folder(gpt, tmp_path):
    """(a) our random model -> save_hf -> GPT2LMHeadModel.from_pretrained: same logits, also left padded."""
    gpt.save_hf(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
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


def test_rejects_non_gpt2_folders(tmp_path):
    hf = random_hf(seed=4)
    sd = hf_state_dict(hf)
    # a llama config
    write_config(tmp_path / "llama", model_type="llama")
    save_file(sd, str(tmp_path / "llama" / "model.safetensors"))
    _expect_folder_error(tmp_path / "llama", "llama")
    # config but no weights
    write_config(tmp_path / "noweights")
    _expect_folder_error(tmp_path / "noweights", "model.safetensors")
    # no config at all
    os.makedirs(tmp_path / "empty")
    _expect_folder_error(tmp_path / "empty", "config.json")
    # config says n_embd 64, weights are n_embd 32
    write_config(tmp_path / "shape", n_embd=64)
    save_file(sd, str(tmp_path / "shape" / "model.safetensors"))
    _expect_folder_error(tmp_path / "shape", "shape")
    # weights of another architecture (keys that are not GPT-2's)
    write_config(tmp_path / "keys")
    save_file({"model.embed_tokens.weight": torch.zeros(V, C)}, str(tmp_path / "keys" / "model.safetensors"))
    _expect_folder_error(tmp_path / "keys", "missing")


@pytest.mark.parametrize("override", [dict(scale_attn_by_inverse_layer_idx=True), dict(scale_attn_weights=False)])
def test_rejects_gpt2_variants_with_other_attention(tmp_path, override):
    """A GPT-2 config whose attention is scaled differently loads into HF with different logits than ours would
    compute: the loader must refuse it rather than silently give other logits."""
    hf = random_hf(seed=5)
    write_config(tmp_path, **override)
    save_file(hf_state_dict(hf), str(tmp_path / "model.safetensors"))
    ref = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    try:
        ours = GPT.from_pretrained(str(tmp_path)).eval()
    except ValueError as e:
        assert str(tmp_path) in str(e)
        return
    idx = rand_tokens(1, 12, seed=9)
    assert_close(logits_of(ours, idx), hf_logits(ref, idx), 1e-4, f"loaded {override} without complaint")


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
    # the unfiltered case takes the normaliser from the sampling CDF's total, the others from logsumexp: both must
    # be fp64 log_softmax(logits / temperature) at the drawn token (temperature 0: of the plain logits)
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
    # top_k and top_p together: top_k first, then the nucleus of what is left, renormalised (2/3, 1/3)
    for top_p, nucleus in {0.6: {1}, 0.7: {1, 3}}.items():
        assert set(torch.isfinite(filter_logits(logits, top_k=2, top_p=top_p)).nonzero().flatten().tolist()) == nucleus


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.3), (None, 0.9), (50, 0.8)])
def test_filter_logits_equals_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(5)) * 3
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p:
        ref = TopPLogitsWarper(top_p)(None, ref)
    assert torch.equal(torch.isfinite(filter_logits(logits, top_k, top_p)), torch.isfinite(ref))


def naive_generate(model, tokens, mask, max_new_tokens, temperature, top_k, top_p, generator, eos_id):
    """The reference sampler: a full forward over the whole sequence for every new token, no cache."""
    B = tokens.shape[0]
    done = torch.zeros(B, dtype=torch.bool)
    new, logprobs, resp_mask = [], [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model.lm_head(model(tokens, mask))[:, -1].float()  # (B, V)
            tok, _ = sample_token(logits, temperature, top_k, top_p, generator)
            lp = torch.log_softmax(logits / (temperature or 1.0), -1)[torch.arange(B), tok]
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


def test_cached_decoding_under_bf16_autocast_attends_in_fp32(gpt, monkeypatch):
    """On CPU the KV cache is fp32 and cached attention runs outside autocast (under it, SDPA would cast the whole
    cache to bf16 at every step and use a much slower kernel); the matmuls stay bf16, and the logits match a full
    forward under the same autocast to bf16 precision. The uncached bf16 forward uses matmul_attention instead."""
    import model as model_module
    seen = []  # at each attention call: which one, is autocast on?
    sdpa, matmul_attention = model_module.F.scaled_dot_product_attention, model_module.matmul_attention
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(("sdpa", torch.is_autocast_enabled("cpu"))) or sdpa(*a, **kw))
    monkeypatch.setattr(model_module, "matmul_attention",
                        lambda *a: seen.append(("matmul", torch.is_autocast_enabled("cpu"))) or matmul_attention(*a))
    tokens, mask = left_pad([rand_tokens(9, seed=21).tolist(), rand_tokens(6, seed=22).tolist()])
    B, T = tokens.shape
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = gpt.lm_head(gpt(tokens, mask)).float()
        n_full = len(seen)
        cache = KVCache(B, T, tokens.device)
        hs = [gpt(tokens[:, :4], mask[:, :4], cache=cache)] + [gpt(tokens[:, i:i + 1], mask[:, i:i + 1], cache=cache)
                                                               for i in range(4, T)]
        cached = gpt.lm_head(torch.cat(hs, 1)).float()
    n_layer = gpt.config.n_layer
    assert seen[:n_full] == [("matmul", True)] * n_layer  # the uncached forward: under autocast, as in training
    assert seen[n_full:] == [("sdpa", False)] * n_layer * (T - 3)  # every cached call (prefill, steps): fp32
    assert all(k.dtype == v.dtype == torch.float32 for k, v in cache.kv.values())
    real = mask.bool()
    assert (cached[real] - full[real]).abs().max() < 0.1  # bf16 matmuls: ~3 significant digits


@pytest.mark.parametrize("masked", [False, True])
def test_matmul_attention_equals_sdpa(masked):
    """The bf16-on-CPU attention computes what SDPA computes: in fp32 the same values and gradients to rounding; in
    bf16 as close to an fp64 reference as SDPA's own bf16 result (both are bf16 matmuls around an fp32 softmax)."""
    from model import matmul_attention
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 3, 2, 7, 8
    q, k, v, dy = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(4))
    mask = None
    if masked:  # causal + left padding of 0, 2 and 5 tokens, each query seeing itself (as GPT.forward builds it)
        pad = torch.arange(T)[None, :] >= torch.tensor([0, 2, 5])[:, None]
        mask = ((torch.ones(T, T, dtype=torch.bool).tril() & pad[:, None, :]) | torch.eye(T, dtype=torch.bool))[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, None)]:
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        y = matmul_attention(*leaves, mask)
        y.backward(dy.to(dtype))
        ys = [t.detach().clone().requires_grad_() for t in leaves]
        y_sdpa = F.scaled_dot_product_attention(*ys, attn_mask=mask, is_causal=mask is None)
        y_sdpa.backward(dy.to(dtype))
        assert y.dtype == dtype
        if tol:
            torch.testing.assert_close(y, y_sdpa, atol=tol, rtol=tol)
            for a, b in zip(leaves, ys):
                torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=tol)
        else:
            err, err_sdpa = ((t.double() - ref).abs().max().item() for t in (y, y_sdpa))
            assert err < 2 * err_sdpa + 1e-3, (err, err_sdpa)
            assert err < 0.05


def test_bf16_cpu_forward_uses_matmul_attention_up_to_512_tokens(monkeypatch):
    """Which attention runs where: bf16 on CPU up to 512 tokens -> matmul_attention; fp32, or longer -> SDPA."""
    import model as model_module
    calls = []
    matmul_attention = model_module.matmul_attention
    monkeypatch.setattr(model_module, "matmul_attention",
                        lambda *a: calls.append(a[0].shape[-2]) or matmul_attention(*a))
    m = GPT(GPTConfig(block_size=600, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    for T, dtype, expect in [(512, torch.bfloat16, [512]), (513, torch.bfloat16, []), (512, torch.float32, [])]:
        calls.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            m(torch.zeros(1, T, dtype=torch.long))
        assert calls == expect, (T, dtype)


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


@pytest.mark.parametrize("top_k,top_p", [(None, None), (40, 0.9)])
def test_generate_equals_naive_sampler(gpt, top_k, top_p):
    """KV cache == full forwards: same tokens, same logprobs; EOS ends a row; logprobs == a training forward."""
    T, N = 0.7, 10
    tokens, mask = left_pad([rand_tokens(7, seed=12).tolist(), rand_tokens(2, seed=13).tolist(),
                             rand_tokens(5, seed=14).tolist()])
    P = tokens.shape[1]
    run = lambda fn, eos: fn(gpt, tokens, mask, N, T, top_k, top_p, torch.Generator().manual_seed(42), eos)
    free, _, _ = run(generate, -1)
    # EOS = the token row 0 sampled 4th, so row 0 stops early while the others (most likely) run on
    eos = int(free[0, P + 3])
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
    assert rmask[0].sum() <= 4 and stopped >= 1
    # the PPO invariant: rollout logprobs == a training forward's log_softmax(logits / T) on the full sequence
    full_mask = torch.cat([mask, rmask], 1)
    logits = logits_of(gpt, out, full_mask)
    train_lp = token_logprobs(logits[:, P - 1:-1], out[:, P:], T)
    real = rmask.bool()
    assert_close(lp[real], train_lp[real], 1e-5, "rollout vs training logprobs")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_packed_linears_compute_the_same_and_restore(gpt, dtype):
    """generate's oneDNN-packed weights: the same hidden states and logits as plain nn.Linear (fp32 to rounding,
    bf16 to bf16 rounding), and every Linear back to its own forward afterwards, also after an error."""
    tokens, mask = left_pad([rand_tokens(6, seed=30).tolist(), rand_tokens(3, seed=31).tolist()])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.no_grad(), autocast:
        plain = gpt.lm_head(gpt(tokens, mask)).float()
        with cpu_packed_linears(gpt, 2):
            assert "forward" in vars(gpt.lm_head)  # really swapped in
            packed = gpt.lm_head(gpt(tokens, mask)).float()
    tol = 1e-4 if dtype == "float32" else 0.15 * plain.abs().max().item() / 8  # bf16: ~3 significant digits
    assert (packed - plain).abs().max() < tol
    with pytest.raises(RuntimeError, match="boom"), cpu_packed_linears(gpt, 2):
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in gpt.modules())


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


def test_fp32_heads_stay_fp32_in_the_packed_sampler(gpt):
    """fp32_heads(model) under bf16 autocast: lm_head packed for generate computes in fp32 too (the sampler samples
    the policy that is trained), while the blocks stay bf16."""
    model = copy.deepcopy(gpt)
    fp32_heads(model)
    assert model.lm_head.fp32 and all(not getattr(m, "fp32", False) for m in model.h.modules())
    tokens, mask = left_pad([rand_tokens(6, seed=30).tolist(), rand_tokens(3, seed=31).tolist()])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(tokens, mask)
        plain = model.lm_head(h)
        with cpu_packed_linears(model, 2):
            packed, qkv = model.lm_head(h), model.h[0].attn.c_attn(h)
    assert plain.dtype == packed.dtype == torch.float32 and qkv.dtype == torch.bfloat16
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=1e-5)
    assert not fp32_heads(model, on=False).lm_head.fp32  # and off again


def test_sharded_generate_equals_one_batch(gpt):
    """DDP rollouts: 2 ranks, each sampling rows rank::2 of a batch with the same generator seed and shard=(rank, 2),
    produce exactly the rows one process samples for the whole batch (the union of the ranks' samples is equal)."""
    tokens, mask = left_pad([rand_tokens(n, seed=20 + n).tolist() for n in (3, 6, 2, 5)])
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
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
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
