"""
GPT-2 written out in plain PyTorch, with the few extras RLHF needs.

- `GPT`: the GPT-2 architecture (learned positions, pre-LayerNorm blocks, tanh GELU, tied embeddings). Its forward
  returns the final hidden states; `lm_head` turns them into logits and `heads` (small `nn.Linear`s named in the
  config: "value", "reward", vocab-sized Q heads ...) into anything else. Positions come from the attention mask,
  so a left-padded row gives the logits of the same row unpadded (up to rounding: other kernels run on it).
- `GPT.from_pretrained`: Hugging Face GPT-2 weights (gpt2 ... gpt2-xl, a hub id, or a local folder; hf_files.py
  finds and reads the files), `save_hf`: the reverse, a folder `transformers.GPT2LMHeadModel.from_pretrained` loads
  with identical logits.
- `generate`: batched sampling of left-padded prompts with a preallocated KV cache; returns the sampled tokens'
  logprobs (fp32, `log_softmax(logits / temperature)`) and a response mask that ends at each row's first EOS.

Everything here is plain PyTorch. On CPU, speedups.py swaps in faster versions of `attention`, `KVCache`,
`prepared_for_decoding` and `sample_token` (tests/test_speedups.py holds them to the results of the ones here).
"""

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import hf_files
from data import EOS  # generation stops at it


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length (HF: n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # RLHF wants dropout off (a ratio must be exactly 1 before the first update)
    heads: dict = field(default_factory=dict)  # extra linear heads on the final hidden state: name -> output size


# HF sizes; gpt2-xl is 1.5B parameters.
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class KVCache:
    """Preallocated keys/values for `max_len` positions, plus what masking needs: which cached slots are real tokens
    (left padding is not) and how many real tokens each row has seen (the next position id)."""

    def __init__(self, batch_size, max_len, device):
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far
        self.kv = {}  # layer index -> (k, v), each (B, nh, max_len, hs), allocated at first use

    def update(self, layer, k, v):
        """Write k, v (B, nh, T, hs) into the slots after the cached ones; return all keys and values so far."""
        if layer not in self.kv:
            shape = (*k.shape[:2], self.key_mask.shape[1], k.shape[3])
            self.kv[layer] = (k.new_empty(shape), v.new_empty(shape))
        k_buf, v_buf = self.kv[layer]
        L, T = self.length, k.shape[2]
        k_buf[:, :, L:L + T] = k
        v_buf[:, :, L:L + T] = v
        return k_buf[:, :, :L + T], v_buf[:, :, :L + T]  # (B, nh, L+T, hs)


def attention(q, k, v, attn_mask, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs)) v. q (B, nh, T, hs), k and v (B, nh, S, hs); attn_mask (B, 1, T, S) bool, True =
    may attend, or None = causal."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                          dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.layer = config.n_head, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, L+T, hs): the cached tokens, then these
        y = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's "gelu_new"


class Head(nn.Linear):
    """The linear layers that make the model's outputs: lm_head and the `heads`. With `fp32 = True` (fp32_heads) they
    compute in fp32 even under bf16 autocast, and without TF32 when it is on (dtype="tf32" on CUDA). Why: a bf16
    matmul rounds its output, and GPT-2's logits are large (about -50 to -150), where bf16's spacing is 0.25-1. Each
    token's log-prob is then off by up to half of that, and not smoothly: a tiny update moves a logit across a
    rounding step or not at all, so PPO's ratios and KL penalty jump, and a sampler on such logits samples another
    policy than the one trained. The price is speed: lm_head is the largest matrix of a small GPT-2."""
    fp32 = False

    def forward(self, x):
        if self.fp32 and (torch.is_autocast_enabled(x.device.type) or torch.backends.cuda.matmul.allow_tf32):
            with torch.autocast(x.device.type, enabled=False), no_tf32():
                return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return super().forward(x)


@contextmanager
def no_tf32():
    """CUDA matmuls in full fp32 inside the block (TF32 rounds their inputs to 10 mantissa bits)."""
    on = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = on


def fp32_heads(model, on=True):
    """Set `Head.fp32` on every output layer of `model` (lm_head and heads); returns the model."""
    for m in model.modules():
        if isinstance(m, Head):
            m.fp32 = on
    return model


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # Module names are HF's (without the "transformer." prefix) so the weight map is just a prefix and 4 transposes.
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.lm_head = Head(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        self.heads = nn.ModuleDict({name: Head(config.n_embd, size) for name, size in config.heads.items()})
        # recompute each block in backward: less activation memory for one more forward of the blocks
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        for head in self.heads.values():
            self.init_head(head)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @staticmethod
    def init_head(head):
        # Scalar heads start at std 1/sqrt(n_embd+1) as in OpenAI's lm-human-preferences; vocab-sized ones like lm_head.
        std = 1 / math.sqrt(head.in_features + 1) if head.out_features == 1 else 0.02
        nn.init.normal_(head.weight, std=std)
        nn.init.zeros_(head.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def forward(self, idx, mask=None, cache=None):
        """idx (B, T) token ids, mask (B, T) 1 = real token / 0 = padding (None = all real).
        With `cache`, idx are the next T tokens after what the cache holds. Returns final hidden states (B, T, C)."""
        B, T = idx.shape
        # Plain causal attention (SDPA's fastest kernel) only when the caller gives no mask, never because a batch
        # happens to hold no padding: a row must take the same kernel, hence the same rounding, in every batch it is
        # in (PPO's first ratio is exactly 1 only if its rollout and update forwards agree bit for bit).
        causal_only = mask is None and cache is None
        if mask is None:
            mask = torch.ones_like(idx)
        mask = mask.bool()
        if cache is None:
            L = 0
            n_real = torch.zeros(B, dtype=torch.long, device=idx.device)
        else:
            L, n_real = cache.length, cache.n_real
        # Position = number of real tokens before this one, so left padding shifts nothing (HF's forward instead
        # counts pads, unlike its generate: a classic source of PPO ratios != 1). Pads get position 0, unused.
        pos = (n_real[:, None] + mask.long().cumsum(-1) - 1).clamp(min=0)
        if T + L > self.config.block_size:  # positions never exceed the slot count, so this check suffices
            raise ValueError(f"sequence of {T + L} tokens is longer than the model's block_size "
                             f"{self.config.block_size}")
        if causal_only:
            attn_mask = None
        else:
            keys = mask if cache is None else cache.key_mask[:, :L + T]
            if cache is not None:
                cache.key_mask[:, L:L + T] = mask
            q_at = torch.arange(L, L + T, device=idx.device)
            k_at = torch.arange(L + T, device=idx.device)
            causal = k_at[None, :] <= q_at[:, None]  # (T, L+T)
            # A padding query would see no key at all, and an all-masked softmax is NaN, which then leaks through
            # 0-weighted values into real rows. Letting every query see itself keeps everything finite.
            attn_mask = (causal[None] & keys[:, None, :]) | (k_at[None, :] == q_at[:, None])[None]
            attn_mask = attn_mask[:, None]  # (B, 1, T, L+T)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            # checkpointing whenever gradients are on (not .training: PPO trains in eval mode), never with a cache
            if self.grad_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask, cache)
        if cache is not None:
            cache.length += T
            cache.n_real = n_real + mask.sum(-1)
        return self.ln_f(x)

    # ------------------------------------------------------------------ HF GPT-2 weights in and out
    @classmethod
    def from_pretrained(cls, name_or_path, heads=None, dropout=0.0):
        """GPT-2 from a local HF folder (config.json + model.safetensors or pytorch_model.bin) or a hub id."""
        folder, hf = hf_files.folder_and_config(name_or_path)
        cfg_path = os.path.join(folder, "config.json")
        if hf.get("model_type") != "gpt2":
            raise ValueError(f"{cfg_path}: model_type is {hf.get('model_type')!r}, expected 'gpt2'")
        variant = {k: hf.get(k, v) for k, v in GPT2_FIXED.items() if hf.get(k, v) != v}
        if variant:  # these would load without a shape error and silently compute other logits
            raise ValueError(f"{cfg_path}: GPT-2 variant not supported: {variant} (expected {GPT2_FIXED})")
        sizes = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")
        if missing := [k for k in sizes if not isinstance(hf.get(k), int)]:
            raise ValueError(f"{cfg_path}: no integer {', '.join(missing)}")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout, heads=dict(heads or {}))
        model = cls(config)
        sd = hf_files.load_weights(folder)
        # Two key layouts exist: hub `gpt2` has no prefix, save_pretrained adds "transformer.".
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        lm_head = sd.pop("lm_head.weight", None)
        if lm_head is not None and not torch.equal(lm_head, sd.get("wte.weight", lm_head)):
            raise ValueError(f"{folder}: lm_head.weight is not tied to wte.weight; GPT-2 ties them")
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers
        ours = {k: v for k, v in model.state_dict().items() if not k.startswith(("heads.", "lm_head."))}
        missing, unexpected = ours.keys() - sd.keys(), sd.keys() - ours.keys()
        if missing or unexpected:
            raise ValueError(f"{folder}: not a GPT-2 checkpoint; missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            for k, v in sd.items():
                if k.endswith(CONV1D):
                    v = v.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
                if v.shape != ours[k].shape:
                    raise ValueError(f"{folder}: {k} has shape {tuple(v.shape)}, expected {tuple(ours[k].shape)}")
                ours[k].copy_(v)
        return model

    def save_hf(self, folder):
        """Write config.json + model.safetensors that transformers.GPT2LMHeadModel loads (heads are not exported)."""
        from safetensors.torch import save_file
        c = self.config
        os.makedirs(folder, exist_ok=True)
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                  activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=c.dropout,
                  embd_pdrop=c.dropout, attn_pdrop=c.dropout, bos_token_id=EOS, eos_token_id=EOS,
                  tie_word_embeddings=True)
        sd = {}
        for k, v in self.state_dict().items():
            if k.startswith(("heads.", "lm_head.")):  # lm_head is tied to wte; HF re-ties it
                continue
            sd["transformer." + k] = (v.t() if k.endswith(CONV1D) else v).detach().float().cpu().contiguous()
        tmp = os.path.join(folder, "model.safetensors.tmp")
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)


# config.json settings that change GPT-2's computation without changing any weight shape
GPT2_FIXED = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
              "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# ---------------------------------------------------------------------- logprobs and sampling
def token_logprobs(logits, targets, temperature=1.0):
    """log p(targets) under softmax(logits / temperature), in fp32 whatever the autocast dtype.
    cross_entropy is a fused log-softmax + gather: no (B, T, V) fp32 log-prob tensor is kept around."""
    V = logits.shape[-1]
    logits = logits.float().reshape(-1, V)
    if temperature not in (0, 1):  # temperature 0 (greedy) scores under the plain logits, as generate records them
        logits = logits / temperature  # a (N, V) fp32 pass and its backward: skipped when it would change nothing
    lp = -F.cross_entropy(logits, targets.reshape(-1), reduction="none")
    return lp.view(targets.shape)


def filter_logits(logits, top_k=None, top_p=None):
    """Set logits outside the top-k / nucleus (top-p) set to -inf. Returns `logits` itself when neither is set."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p (as HF)...
        drop[..., 0] = False  # ...and at least one token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None, shard=None):
    """One token per row, and its logprob: log_softmax(logits / temperature) at that token, before top-k/top-p
    filtering (temperature 0, greedy: of the plain logits), i.e. what a training forward with that temperature
    scores. Returns tokens (B,) and logprobs (B,) fp32.
    Sampling inverts the CDF with one uniform number per row. shard=(i, n): these rows are rows i::n of a batch n
    times larger; the uniforms of that whole batch are drawn and rows i::n kept, so n ranks sharing one generator
    seed sample exactly what one process samples for the whole batch."""
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        logits = logits / temperature
        probs = filter_logits(logits, top_k, top_p).softmax(-1)  # 0 outside top-k / top-p
        cdf = probs.cumsum(-1)
        cdf = cdf / cdf[:, -1:]  # ends at exactly 1, and a token of probability 0 never comes first above u < 1
        i, n = shard or (0, 1)
        u = torch.rand(logits.shape[0] * n, 1, generator=generator, device=logits.device)[i::n].contiguous()
        # the first token whose cumulative probability exceeds u (NaN logits: clamped, generate names the problem)
        tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    return tok, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)


@contextmanager
def prepared_for_decoding(model, batch_size):
    """What generate holds while it decodes: nothing here. speedups.py puts the CPU's packed weights here."""
    yield


CHECK_DONE_EVERY = {"cpu": 1}  # generate's early stop looks every this many tokens (other devices: 16)


@torch.no_grad()  # not inference_mode: under it, autocast casts every weight again at every step
def generate(model, tokens, mask, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
             eos_id=EOS, logits_fn=None, shard=None):
    """Sample continuations of left-padded prompts `tokens`/`mask` (B, P).

    Returns (tokens (B, P+N), logprobs (B, N) fp32, response_mask (B, N)), N <= max_new_tokens (it stops once every
    row has produced EOS). The response mask is 1 up to and including each row's first EOS; later slots hold EOS.
    `logprobs` are log_softmax(logits / temperature) of the sampled tokens (temperature 0: of the plain logits),
    before top-k/top-p filtering, i.e. what a training forward with the same temperature computes.
    `logits_fn(hidden) -> logits` replaces the LM head (ILQL decoding uses it). `shard=(i, n)`: these rows are rows
    i::n of a larger batch (one DDP rank's share): see sample_token."""
    raw = getattr(model, "module", model)
    logits_fn = logits_fn or raw.lm_head
    B, P = tokens.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    # Reading `done` on the host waits for the GPU's queue to drain: off the CPU, only every few tokens
    check_every = CHECK_DONE_EVERY.get(tokens.device.type, 16)
    cache = KVCache(B, P + max_new_tokens, tokens.device)
    done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
    out, logprobs, resp_mask = [], [], []
    with prepared_for_decoding(raw, B):
        h = raw(tokens, mask, cache=cache)[:, -1]  # prefill: the whole prompt in one forward
        for _ in range(max_new_tokens):
            tok, lp = sample_token(logits_fn(h), temperature, top_k, top_p, generator, shard)
            tok = tok.masked_fill(done, eos_id)
            out.append(tok)
            logprobs.append(lp.masked_fill(done, 0.0))
            resp_mask.append(~done)
            done = done | (tok == eos_id)
            if len(out) == max_new_tokens or len(out) % check_every == 0 and bool(done.all()):
                break
            h = raw(tok[:, None], cache=cache)[:, -1]
    logprobs, resp_mask = torch.stack(logprobs, 1), torch.stack(resp_mask, 1)
    # one host sync per call: the finite check (NaN weights would otherwise sample garbage), and N = the steps until
    # every row was done (later steps, sampled before the loop looked, hold only EOS padding: dropped)
    finite, N = torch.stack([torch.isfinite(logprobs).all(), resp_mask.any(0).sum()]).tolist()
    if not finite:
        raise ValueError("generate: the model's logits are not finite (NaN/inf in the weights or activations, or a "
                         "temperature so small that logits / temperature overflows)")
    return torch.cat([tokens, torch.stack(out[:N], 1)], 1), logprobs[:, :N], resp_mask[:, :N].long()
