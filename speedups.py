"""
CPU speed-ups. A reader may skip this file: model.py is the definition, and everything here computes what the plain
code there computes, only faster on a CPU (tests/test_speedups.py holds each piece to the plain path).

`enable()` (called by common.setup on CPU, the one place they are switched on) swaps four things into model.py:

- `attention`: for bf16 on CPU up to 512 tokens, two matmuls around an fp32 softmax (`matmul_attention`) instead of
  PyTorch's CPU flash-attention kernel, which is slow in bf16 at these lengths; cached decoding attends in fp32 (the
  bf16 kernel for a one-token query is far slower, and autocast would cast the whole cache every step).
- `KVCache`: keeps keys and values in fp32 on CPU, for that fp32 decoding attention (the cache is small next to the
  weights).
- `prepared_for_decoding`: during generate, every nn.Linear multiplies with its weight laid out once, up front, for
  oneDNN's GEMM (`packed_linears`), instead of the plain layout that F.linear hands to the BLAS at every call.
- `sample_token`: the same inverse-CDF draw, with the CDF's total reused as the softmax normaliser of the logprob
  (no second pass over the vocabulary when nothing is filtered).

And once per process, `keep_freed_memory`: glibc keeps freed memory for the next tensor instead of returning it to
the OS. What each of these buys, and what was tried and not kept, is measured in docs/speed.md.
"""

import ctypes
import functools
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import model

PLAIN = {name: getattr(model, name) for name in ("attention", "KVCache", "prepared_for_decoding", "sample_token")}


def enable(on=True):
    """Swap the CPU versions into model.py (on=False: back to the plain ones)."""
    if on:
        keep_freed_memory()
    fast = {"attention": attention, "KVCache": KVCache, "prepared_for_decoding": packed_linears,
            "sample_token": sample_token}
    for name, plain in PLAIN.items():
        setattr(model, name, fast[name] if on else plain)


def enabled():
    return model.attention is attention


@functools.cache
def keep_freed_memory():
    """Linux/glibc: freed memory stays in the process for the next tensor instead of going back to the OS. glibc
    serves every block above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on free, so each
    (batch, tokens, 50257) logits tensor and its gradient would be page-faulted in, 4 KB at a time and zeroed by the
    kernel, every time one is made. M_MMAP_MAX 0: large blocks come from the heap too (glibc falls back to mmap if
    the heap cannot grow); M_TRIM_THRESHOLD 2 GiB: free memory at the heap's top is kept. The price: a higher peak
    RSS (fragmentation). It cannot be undone for the process. A no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------- attention and the KV cache
def attention(q, k, v, attn_mask, dropout_p=0.0):
    """model.attention, choosing the fastest CPU kernel for the case."""
    if q.device.type == "cpu" and k.dtype == torch.float32 and q.dtype != torch.float32:
        # cached decoding under autocast (KVCache below keeps k, v in fp32): attend in fp32, outside autocast
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                                  dropout_p=dropout_p)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= 512:
        return matmul_attention(q, k, v, attn_mask, dropout_p)
    return PLAIN["attention"](q, k, v, attn_mask, dropout_p)


def matmul_attention(q, k, v, attn_mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs), masked) v as two matmuls around an fp32 softmax. The limit of 512 tokens is memory:
    this keeps the T x T weights for backward (6 bytes each, per head), at 512 tokens already more than the rest of
    a layer's activations. attn_mask: bool, True = may attend; None = causal. Under autocast the scores are bf16, as
    in HF's eager attention; the softmax is fp32."""
    T, S = q.shape[-2], k.shape[-2]
    if attn_mask is None:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    # the mask as an additive bias (its backward is free, masked_fill's is another T x T pass), the scale on q (T x hs
    # numbers, not T x T; exact for GPT-2's head size 64)
    bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, float("-inf"))
    att = ((q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1) + bias).softmax(-1, dtype=torch.float32)
    att = F.dropout(att, dropout_p) if dropout_p > 0 else att
    return att.to(v.dtype) @ v


class KVCache(model.KVCache):
    """model.KVCache with fp32 keys and values on CPU, whatever the autocast dtype (see `attention`)."""

    def update(self, layer, k, v):
        if layer not in self.kv and k.device.type == "cpu":
            shape = (*k.shape[:2], self.key_mask.shape[1], k.shape[3])
            self.kv[layer] = (k.new_empty(shape, dtype=torch.float32), v.new_empty(shape, dtype=torch.float32))
        return super().update(layer, k, v)


# ---------------------------------------------------------------------------- decoding
def onednn_bf16():
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 BF16, AMX, or their emulation on AVX-512 BW/VL/DQ)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


@contextmanager
def packed_linears(gpt, batch_size):
    """While active, every nn.Linear of `gpt` multiplies with its weight packed once for oneDNN (packing costs about
    one pass over the weights, made at a layer's first use: a layer decoding never calls costs nothing). Under
    autocast the packed weights are in the autocast dtype, except for a model.Head with fp32 set. The weights must
    not change while it is active. A no-op off CPU, without oneDNN, and for bf16 on a CPU whose oneDNN has no bf16
    kernels (no AVX-512): packing would raise there, while plain PyTorch computes bf16 all the same."""
    linears = [m for m in gpt.modules() if isinstance(m, nn.Linear)]
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else linears[0].weight.dtype if linears else None
    if (not linears or linears[0].weight.device.type != "cpu" or not torch.backends.mkldnn.is_available()
            or (dtype == torch.bfloat16 and not onednn_bf16())):
        yield
        return
    packed = {}  # module -> (weight, bias)

    def forward(m, as_dtype, x):
        if m not in packed:
            packed[m] = (torch.ops.mkldnn._reorder_linear_weight(m.weight.detach().to(as_dtype), batch_size),
                         None if m.bias is None else m.bias.detach().to(as_dtype))
        return torch.ops.mkldnn._linear_pointwise(x.to(as_dtype), *packed[m], "none", [], "")

    for m in linears:  # an instance attribute `forward` shadows nn.Linear.forward until deleted
        m.forward = functools.partial(forward, m, torch.float32 if autocast and getattr(m, "fp32", False) else dtype)
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, shard=None):
    """model.sample_token: the same uniforms and tokens. The CDF is left unnormalised (u is scaled to its total
    instead); the fp32 cumsum accumulates in fp64 on CPU, so that total is exact to fp32 rounding, and when nothing
    is filtered it is the softmax's normaliser: the logprob needs no logsumexp pass over the vocabulary."""
    logits = logits.float()
    if temperature == 0:
        return PLAIN["sample_token"](logits, 0.0)
    scaled = logits / temperature if temperature != 1 else logits
    filtered = model.filter_logits(scaled, top_k, top_p)
    top = filtered.amax(-1, keepdim=True)
    cdf = (filtered - top).exp_().cumsum_(-1)  # filtered tokens add 0
    total = cdf[:, -1:]
    i, n = shard or (0, 1)
    u = torch.rand(logits.shape[0] * n, 1, generator=generator, device=logits.device)[i::n].contiguous() * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(u)))  # u * total may round up to total
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    lse = (top + total.log()).squeeze(-1) if filtered is scaled else torch.logsumexp(scaled, -1)
    return tok, scaled.gather(-1, tok[:, None]).squeeze(-1) - lse
