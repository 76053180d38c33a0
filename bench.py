"""
Benchmarks, printed as tables (nanoGPT's bench.py, but against a reference): our KV-cache `generate` against
`transformers.GPT2LMHeadModel.generate` on the same weights, in fp32 and bf16 autocast, and how our sampling time
grows with the number of new tokens (linearly, with a KV cache). Timings are the best of `repeats` after a warm-up.
On CPU, ours runs with the speed-ups of speedups.py switched on, as every script runs (common.setup). The header
line names the CPU and its bf16 matmul features: absolute numbers mean something only next to their machine.

The default is GPT-2 124M's shape with random weights (no download): batch 16, a 16-token prompt, 64 new tokens,
plain sampling (temperature 1, no top-k/top-p), every row the full length (no EOS stop).

    python bench.py                      # a few minutes on a 2-core CPU
    python bench.py --quick=True         # tiny model, seconds: a smoke test of this script
    python bench.py --dtypes=bfloat16 --batch_size=32 --profile=True
    python bench.py --sections=sampling,train  # some of the tables (sampling, scaling, train, ppo)

Each section is a function `bench_x(cfg, gpt) -> dict` that prints its own table; add one to SECTIONS to extend.
`transformers` is a benchmark/test dependency only, imported inside the functions that compare against it.
"""

import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

import speedups
from common import ConfigError, cpu_info, run_main
from model import CONV1D, EOS, GPT, GPTConfig, generate


@dataclass
class Config:
    n_layer: int = 12  # model shape; the default is GPT-2 124M's (random weights)
    n_head: int = 12  # attention heads
    n_embd: int = 768  # width
    vocab_size: int = 50257  # GPT-2's vocabulary
    block_size: int = 1024  # context length
    batch_size: int = 16  # prompts sampled together
    prompt_len: int = 16  # tokens per prompt
    max_new_tokens: int = 64  # tokens sampled per prompt in the ours-vs-HF table
    scaling: str = "32,64,128"  # new-token counts of the scaling table, comma-separated
    dtypes: str = "float32,bfloat16"  # comma-separated; bfloat16 = torch.autocast for ours and HF alike
    repeats: int = 3  # timings are the best of this many runs, after one warm-up run
    device: str = "cpu"  # "cpu" | "cuda"
    threads: int = 0  # torch.set_num_threads; 0 = torch's default. 1 is steadier on a machine shared with other jobs
    profile: bool = False  # also print torch.profiler's top ops of one of our generate calls per dtype
    quick: bool = False  # tiny model and few tokens: checks that this script runs, in seconds
    sections: str = "sampling,scaling,train,ppo"  # which tables, comma-separated
    seed: int = 1337  # weights, prompts and sampling


QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=128, batch_size=4, prompt_len=8, max_new_tokens=8,
             scaling="4,8,16", repeats=1)


def best_times(fns, repeats, faults=None):
    """Seconds of the fastest of `repeats` calls of each fn, after one untimed warm-up call each. The calls
    alternate (a, b, a, b, ...) so that a load change on a shared machine hits all of them alike.
    faults: a list that gets, per fn, the minor page faults of its fastest call (pages of fresh memory the kernel
    had to hand out; on this VM 400k of them, 1.6 GB, cost 1-2 s)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            f0 = minor_faults()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0, minor_faults() - f0))
    if faults is not None:
        faults.extend(min(ts)[1] for ts in times)
    return [min(ts)[0] for ts in times]


def minor_faults():
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:  # not Unix
        return 0


def autocast(cfg, dtype):
    return torch.autocast(cfg.device.split(":")[0], dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


def hf_copy(gpt):
    """transformers.GPT2LMHeadModel holding exactly our weights (the save_hf mapping, in memory)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = gpt.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0, bos_token_id=EOS, eos_token_id=EOS))
    sd = {"transformer." + k: v.t() if k.endswith(CONV1D) else v
          for k, v in gpt.state_dict().items() if not k.startswith(("lm_head.", "heads."))}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    return hf.to(gpt.wte.weight.device).eval()


def prompts(cfg):
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.prompt_len), generator=g).to(cfg.device)
    return tokens, torch.ones_like(tokens)


def ours_sampler(cfg, gpt, new_tokens):
    tokens, mask = prompts(cfg)

    def run():
        g = torch.Generator(cfg.device).manual_seed(cfg.seed)
        out, _, _ = generate(gpt, tokens, mask, new_tokens, temperature=1.0, top_k=None, top_p=None, generator=g,
                             eos_id=-1)
        assert out.shape == (cfg.batch_size, cfg.prompt_len + new_tokens)
    return run


# ---------------------------------------------------------------------------- sections
def bench_sampling(cfg, gpt):
    """Ours vs transformers, same weights, same work: batch x new tokens of plain sampling, no early stop."""
    hf = hf_copy(gpt)
    tokens, mask = prompts(cfg)
    N = cfg.max_new_tokens

    def hf_run():
        out = hf.generate(tokens, attention_mask=mask, max_new_tokens=N, do_sample=True, temperature=1.0,
                          top_k=0, top_p=1.0, pad_token_id=EOS, eos_token_id=None)
        assert out.shape == (cfg.batch_size, cfg.prompt_len + N)

    print(f"\n## sampling: batch {cfg.batch_size}, prompt {cfg.prompt_len}, {N} new tokens, "
          f"temperature 1 (tokens/s counts new tokens; best of {cfg.repeats})")
    print(f"{'dtype':<10} {'ours tok/s':>11} {'HF tok/s':>10} {'ours s':>8} {'HF s':>8} {'speedup':>8}")
    results = {}
    for dtype in cfg.dtypes.split(","):
        with torch.no_grad(), autocast(cfg, dtype):
            ours, ref = best_times([ours_sampler(cfg, gpt, N), hf_run], cfg.repeats)
        n = cfg.batch_size * N
        print(f"{dtype:<10} {n / ours:>11.1f} {n / ref:>10.1f} {ours:>8.3f} {ref:>8.3f} {ref / ours:>7.2f}x")
        results[dtype] = dict(ours_tok_s=n / ours, hf_tok_s=n / ref, speedup=ref / ours)
    return results


def bench_scaling(cfg, gpt):
    """Our generate for several numbers of new tokens: with a KV cache the time per token stays flat."""
    print(f"\n## ours, scaling with new tokens: batch {cfg.batch_size}, prompt {cfg.prompt_len}")
    print(f"{'new tokens':<11}" + "".join(f" {d + ' s':>12} {'ms/token':>9}" for d in cfg.dtypes.split(",")))
    results = {}
    for n in map(int, cfg.scaling.split(",")):
        row = f"{n:<11}"
        for dtype in cfg.dtypes.split(","):
            with torch.no_grad(), autocast(cfg, dtype):
                t, = best_times([ours_sampler(cfg, gpt, n)], cfg.repeats)
            row += f" {t:>12.3f} {1000 * t / n:>9.2f}"
            results[(dtype, n)] = t
        print(row)
    return results


def profile_ours(cfg, gpt):
    from torch.profiler import ProfilerActivity, profile
    for dtype in cfg.dtypes.split(","):
        run = ours_sampler(cfg, gpt, cfg.max_new_tokens)
        with torch.no_grad(), autocast(cfg, dtype):
            run()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
        print(f"\n## profile of our generate, {dtype}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def matmul_peak(cfg, dtype, n=2048):
    """FLOP/s of one large square matmul on this machine (best of `repeats`): the peak MFU is measured against."""
    a = torch.randn(n, n, device=cfg.device, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    t, = best_times([lambda: a @ a], max(cfg.repeats, 3))
    return 2 * n ** 3 / t


def sft_step_flops(config, block_params, B, T, n_targets):
    """FLOPs of one SFT training step (forward + backward = 3 x forward): 6 per block parameter per token, 6 per LM-head
    weight per target position, and causal attention's two matmuls, 2 x 2 x T^2 x n_embd per layer and sequence
    for full attention, half of it causal, x 3."""
    return (6 * block_params * B * T + 6 * config.vocab_size * config.n_embd * n_targets
            + 6 * config.n_layer * T * T * config.n_embd * B)


def bench_train(cfg, gpt):
    """One SFT training step (forward + backward + fused AdamW) of sft.py's model and loss vs
    transformers.GPT2LMHeadModel with labels, on the same weights and batch: batch_size sequences of 2 x prompt_len
    x 8 tokens whose second half is the completion (the loss), bf16 = autocast for both. MFU counts the task's FLOPs
    (6 x block params x tokens + the LM head at the target positions + causal attention), the same for both sides,
    against the matmul peak measured here at start."""
    import sft
    from common import make_optimizer
    hf = hf_copy(gpt).train()
    ours = GPT(gpt.config).to(cfg.device)
    ours.load_state_dict(gpt.state_dict())
    ours.train()
    B, T = cfg.batch_size, 16 * cfg.prompt_len
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g).to(cfg.device)
    loss_mask = torch.zeros_like(tokens)
    loss_mask[:, T // 2:] = 1
    labels = tokens.masked_fill(loss_mask == 0, -100)
    n_targets = int(loss_mask[:, 1:].sum())
    c = gpt.config
    block_params = sum(p.numel() for n, p in gpt.named_parameters() if n.startswith("h."))
    flops = sft_step_flops(c, block_params, B, T, n_targets)
    opts = [make_optimizer(m, sft.Config(learning_rate=1e-4)) for m in (ours, hf)]

    # autocast around the forward only, as sft.py: a context around whole steps would keep its cache of bf16 weight
    # copies across optimizer steps (stale weights, and casts not paid)
    def step_ours(dtype):
        with autocast(cfg, dtype):
            loss = sft.sft_loss(ours.lm_head, ours(tokens), tokens, loss_mask, n_targets)
        loss.backward()
        opts[0].step()
        opts[0].zero_grad(set_to_none=True)

    def step_hf(dtype):
        with autocast(cfg, dtype):
            loss = hf(tokens, labels=labels).loss
        loss.backward()
        opts[1].step()
        opts[1].zero_grad(set_to_none=True)

    print(f"\n## one SFT training step: batch {B} x {T} tokens, loss on the last {T // 2} (best of {cfg.repeats}); "
          "MFU vs the measured matmul peak")
    print(f"{'dtype':<10} {'peak TF/s':>9} {'ours s':>8} {'HF s':>8} {'ours tok/s':>11} {'HF tok/s':>9} "
          f"{'ours MFU':>9} {'HF MFU':>7} {'speedup':>8}")
    results = {}
    for dtype in cfg.dtypes.split(","):
        peak = matmul_peak(cfg, dtype)
        faults = []
        t_ours, t_hf = best_times([lambda: step_ours(dtype), lambda: step_hf(dtype)], cfg.repeats, faults)
        print(f"{dtype:<10} {peak / 1e12:>9.2f} {t_ours:>8.3f} {t_hf:>8.3f} {B * T / t_ours:>11.0f} "
              f"{B * T / t_hf:>9.0f} {flops / t_ours / peak:>8.1%} {flops / t_hf / peak:>7.1%} {t_hf / t_ours:>7.2f}x")
        for name, n in zip(("our", "HF's"), faults):
            if n > 10_000:  # a step that got fresh memory from the kernel is not the steady state: say so
                print(f"  ({name} best {dtype} step page-faulted {n:,} times: fresh memory from the kernel, not the "
                      f"steady state; more --repeats may find a faster step)")
        results[dtype] = dict(ours_s=t_ours, hf_s=t_hf, ours_mfu=flops / t_ours / peak, speedup=t_hf / t_ours)
    return results


def count_reward(prompts, responses):
    """bench_ppo's reward_fn: any cheap scorer does, the timing is PPO's."""
    return [float(len(r)) for r in responses]


def run_in_child(fn, *args):
    """fn(*args) in a fresh spawned process (its own allocator settings and peak RSS), for bench_ppo and bench_trl."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_ppo(ppo_cfg, threads):
    """ppo.main(ppo_cfg) -> (its last metrics, this process's peak RSS in GiB)."""
    import ppo
    if threads:
        torch.set_num_threads(threads)
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = ppo.main(ppo.Config(**ppo_cfg))
    return metrics, peak_rss_gib()


def peak_rss_gib():
    """This process's peak resident memory (host memory only, also with --device=cuda), GiB. VmHWM, not getrusage's
    ru_maxrss: a spawned child inherits its parent's ru_maxrss across fork + exec. NaN where /proc has no VmHWM."""
    try:
        with open("/proc/self/status") as f:
            kib = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), float("nan"))
    except OSError:  # not Linux
        kib = float("nan")
    return kib / 2**20


def bench_ppo(cfg, gpt):
    """One PPO iteration of ppo.py on this shape (scratch weights, a shared critic, a Python reward_fn), split into
    its phases: batch 8, 16-token prompts, 32 response tokens, 4 PPO epochs of 1 minibatch. The last of 3 iterations."""
    import tempfile
    print("\n## one PPO iteration of ppo.py: batch 8, prompt 16, 32 new tokens, 4 epochs x 1 minibatch (seconds)")
    print(f"{'dtype':<22}{'generate':>10}{'score':>8}{'forward':>9}{'update':>8}{'total':>8}{'tok/s':>8}  peak RSS")
    out = {}
    # bf16 also once with ppo.py's fp32_heads off: what the fp32 logits and values cost
    dtypes = cfg.dtypes.split(",")
    runs = [(d, True) for d in dtypes] + ([("bfloat16", False)] if "bfloat16" in dtypes else [])
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            f.writelines('{"prompt": "%s"}\n' % " ".join(["word"] * 16) for _ in range(64))
        for dtype, fp32_heads in runs:
            name = dtype if fp32_heads else "bfloat16, bf16 heads"
            ppo_cfg = dict(
                init_from="scratch", n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                block_size=cfg.block_size, reward_model="", reward_fn="bench:count_reward", data=prompts,
                eval_split="train", eval_size=0, out_dir=os.path.join(tmp, name), device=cfg.device, dtype=dtype,
                max_iters=3, batch_size=8, minibatch_size=8, ppo_epochs=4, max_prompt_len=16, max_new_tokens=32,
                penalize_missing_eos=False, eval_interval=1000, seed=cfg.seed, fp32_heads=fp32_heads)
            # a fresh process per run, so its peak RSS is PPO's own (not this process's, which holds the HF models)
            m, rss = run_in_child(run_ppo, ppo_cfg, cfg.threads)
            t = [m[f"t_{k}"] for k in ("generate", "score", "forward", "update")]
            tok_s = 8 * 32 / sum(t)  # response tokens of the iteration (every row runs the full 32: no EOS stop)
            print(f"{name:<22}" + "".join(f"{x:>{w}.2f}" for x, w in zip(t + [sum(t)], (10, 8, 9, 8, 8)))
                  + f"{tok_s:>8.1f}  {rss:.2f} GiB")
            out[name] = dict(zip(("generate", "score", "forward", "update"), t), peak_rss_gib=rss)
    return out


SECTIONS = [bench_sampling, bench_scaling, bench_train, bench_ppo]


def main(cfg):
    if cfg.quick:
        cfg = replace(cfg, **QUICK)
    names = {f.__name__.removeprefix("bench_"): f for f in SECTIONS}
    wanted = list(dict.fromkeys(x.strip() for x in cfg.sections.split(",")))  # in order, each once
    unknown = set(wanted) - set(names)
    if unknown:
        raise ConfigError(f"unknown sections {sorted(unknown)}; choose from {', '.join(names)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cpu":
        speedups.enable()  # as every script's setup does on CPU (its malloc setting serves transformers alike)
    torch.manual_seed(cfg.seed)
    gpt = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, n_embd=cfg.n_embd)).to(cfg.device).eval()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# bench: {gpt.num_params() / 1e6:.1f}M parameters (n_layer {cfg.n_layer}, n_head {cfg.n_head}, "
          f"n_embd {cfg.n_embd}), {cfg.device}, CPU {cpu_info()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, load average {load:.2f} at start")
    results = {f"bench_{n}": names[n](cfg, gpt) for n in wanted}
    if cfg.profile:
        profile_ours(cfg, gpt)
    return results


if __name__ == "__main__":
    run_main(main, Config)
