"""
Mutation check of the central claims listed in tests/README.md: each mutation breaks one claim in a temporary copy
of the repository, then runs the tests that claim it; the mutation must make them fail ("caught"). Not part of the
test suite (it runs the suite's slow parts many times); run it after changing code or tests:

    python tests/mutate.py                 # every mutation (a few minutes on 2 CPU cores)
    python tests/mutate.py gae resume      # only the mutations whose names contain one of these words
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name, file, the exact text to replace (must occur once), its replacement, the tests that must fail
MUTATIONS = [
    ("gelu-exact-not-tanh", "model.py", 'approximate="tanh"', 'approximate="none"',
     "tests/test_model.py -k ours_to_hf"),
    ("positions-count-padding", "model.py", "pos = (n_real[:, None] + mask.long().cumsum(-1) - 1).clamp(min=0)",
     "pos = (n_real[:, None] + torch.arange(T, device=idx.device)[None]).clamp(min=0)",
     "tests/test_model.py -k padded_equals_unpadded"),
    ("cache-counts-pads-as-real", "model.py", "cache.n_real = n_real + mask.sum(-1)", "cache.n_real = n_real + T",
     "tests/test_model.py -k generate_equals_naive"),
    ("logprob-after-filtering", "model.py",
     "return tok, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)",
     "return tok, filter_logits(logits, top_k, top_p).log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)",
     "tests/test_model.py -k logprobs_are_log_softmax_before_filtering"),
    ("fast-sampler-normaliser-when-filtered", "speedups.py",
     "lse = (top + total.log()).squeeze(-1) if filtered is scaled else torch.logsumexp(scaled, -1)",
     "lse = (top + total.log()).squeeze(-1)", "tests/test_speedups.py"),
    ("sft-loss-per-rank-not-global", "sft.py", "(loss * s.world_size).backward()", "loss.backward()",
     "tests/test_sft.py -k torchrun"),
    ("sft-mean-of-micro-batch-means", "sft.py",
     'loss = sft_loss(lm_head, h, b["tokens"], b["loss_mask"], n_targets)',
     'loss = sft_loss(lm_head, h, b["tokens"], b["loss_mask"], b["loss_mask"][:, 1:].sum() * len(batches))',
     "tests/test_sft.py -k grad_accumulation"),
    ("steps-not-seeded", "common.py", "    torch.manual_seed(mix_seed(cfg.seed, step, s.rank))\n", "",
     "tests/test_sft.py -k resume"),
    ("rm-score-one-token-early", "scoring.py", "last = (torch.arange(tokens.shape[1], device=tokens.device) * mask)"
     ".argmax(-1)", "last = (torch.arange(tokens.shape[1], device=tokens.device) * mask).argmax(-1) - 1",
     "tests/test_reward.py"),
    ("gae-without-lambda", "ppo.py", "lastgaelam = delta + gamma * lam * lastgaelam",
     "lastgaelam = delta + gamma * lastgaelam", "tests/test_ppo.py -k gae"),
    ("ppo-old-logprobs-from-sampler", "ppo.py", 'old_logprobs=f["logprobs"],', 'old_logprobs=r["logprobs"],',
     "tests/test_ppo.py -k main_first"),
    ("ppo-dropout-on", "ppo.py", "model = ActorCritic(policy, critic)  #",
     "model = ActorCritic(policy, critic).train()  #", "tests/test_ppo.py -k main_first"),
    ("ppo-old-logprobs-fixed-row-order", "ppo.py", "cfg.temperature, epochs[0], s.autocast)",
     "cfg.temperature, [torch.arange(len(tokens), device=s.device).split(cfg.minibatch_size // cfg.grad_accum)], "
     "s.autocast)", "tests/test_ppo.py -k main_first"),
    ("ppo-lm-head-mask-shifted", "ppo.py", "    sel = response_mask.bool()  # (B, N)\n",
     "    sel = response_mask.roll(1, 1).bool()  # (B, N)\n", "tests/test_ppo.py -k full_forward"),
    ("ppo-reference-full-head", "ppo.py",
     'out["ref_logprobs"][idx] = forward_logprobs(ref, ref.lm_head, t, m, rm, P, temperature)[0]',
     'out["ref_logprobs"][idx] = token_logprobs(ref.lm_head(response_hidden(ref, t, m, P)), t[:, P:], temperature)'
     ' * rm',
     "tests/test_ppo.py -k kl_is_exactly_zero"),
    ("ppo-whiten-per-rank", "ppo.py", "advantages = whiten(advantages, response_mask, s)",
     "advantages = whiten(advantages, response_mask)", "tests/test_ppo.py -k torchrun"),
    ("ppo-value-head-random", "ppo.py", 'nn.init.zeros_(policy.heads["value"].weight)', "pass",
     "tests/test_ppo.py -k shared_value"),
    ("ppo-clipfrac-outside-range", "ppo.py", "clipfrac=mean((pg_losses_clipped > pg_losses).float())",
     "clipfrac=mean(((ratio - 1).abs() > cliprange).float())", "tests/test_ppo.py -k known_values"),
    ("rm-normalisation-not-folded", "reward.py",
     'fold_normalization(sd["heads.reward.weight"], sd["heads.reward.bias"], ev["norm_mean"], std)', "pass",
     "tests/test_reward.py"),
    ("ilql-targets-from-online-heads", "ilql.py",
     'target_q = torch.minimum(head_at(heads["q1_target"], ha, a), head_at(heads["q2_target"], ha, a))',
     'target_q = torch.minimum(head_at(heads["q1"], ha, a), head_at(heads["q2"], ha, a))', "tests/test_ilql.py"),
    ("ilql-gradient-halved-under-ddp", "ilql.py", "(loss * s.world_size).backward()", "loss.backward()",
     "tests/test_ilql.py -k torchrun"),
    ("dpo-chosen-rejected-swapped", "dpo.py", "logprobs[:n], logprobs[n:], ref_logprobs[:n], ref_logprobs[n:], cfg",
     "logprobs[n:], logprobs[:n], ref_logprobs[n:], ref_logprobs[:n], cfg", "tests/test_dpo.py -k learns"),
    ("dpo-reference-is-the-policy", "dpo.py", "ref_logprobs = sequence_logprobs(ref, ref.lm_head,",
     "ref_logprobs = sequence_logprobs(model, lm_head,", "tests/test_dpo.py -k learns"),
    ("grpo-rloo-baseline-includes-self", "grpo.py", "rewards - (rewards.sum(0) - rewards) / (G - 1)",
     "rewards - mean", "tests/test_grpo.py -k group_advantages"),
    ("grpo-old-logprobs-from-sampler", "grpo.py", 'old_logprobs=f["logprobs"], ref_logprobs=',
     'old_logprobs=r["logprobs"], ref_logprobs=', "tests/test_grpo.py -k main_first"),
    ("grpo-groups-split-across-ranks", "grpo.py", "batch_prompts * G, cfg,",
     "[p for p in batch_prompts for _ in range(G)], cfg,", "tests/test_grpo.py -k torchrun"),
    ("grpo-k3-sign", "grpo.py", "    d = ref_logprobs - logprobs\n", "    d = logprobs - ref_logprobs\n",
     "tests/test_grpo.py -k k3"),
    ("grpo-entropy-mean-of-rank-means", "ppo.py",
     'entropy, n_tokens = all_reduce_sum(torch.stack([f["entropy"], r["response_mask"].sum().float()]), s)',
     'entropy, n_tokens = torch.stack([f["entropy"], r["response_mask"].sum().float()])',
     "tests/test_grpo.py -k torchrun"),
    ("eval-ties-count-as-losses", "eval.py", "1.0 if a > b else 0.5 if a == b else 0.0", "1.0 if a > b else 0.0",
     "tests/test_eval.py"),
    ("eval-kl-ignores-ilql-logits", "eval.py",
     "response_logprobs(policy, logits_fn or policy.lm_head, b, temperature)",
     "response_logprobs(policy, policy.lm_head, b, temperature)", "tests/test_eval.py"),
    ("demo-kl-horizon-10000", "demo.py",
     "kl_horizon=max(cfg.batch_size // 5 + 1, cfg.ppo_iters * cfg.batch_size // 10)", "kl_horizon=10000",
     "tests/test_demo.py -k whole_pipeline"),
    ("demo-ilql-at-the-trainers-heads", "demo.py", "fp32_heads=cfg.fp32_heads, **shared))", "**shared))",
     "tests/test_demo.py -k head_precision"),
    ("demo-policies-loaded-with-fp32-heads", "demo.py", "[0], cfg.fp32_heads).to(s.device)", "[0]).to(s.device)",
     "tests/test_demo.py -k head_precision"),
    ("demo-evaluates-other-heads", "demo.py",
     'policies[name] = (load_policy(path(name.lower(), "ckpt.pt"), name.lower(), cfg, s), None)',
     'policies[name] = (fp32_heads(load_policy(path(name.lower(), "ckpt.pt"), name.lower(), cfg, s)), None)',
     "tests/test_demo.py -k whole_pipeline"),
    ("dpo-heads-always-fp32", "dpo.py", "fp32_heads(m, cfg.fp32_heads)", "fp32_heads(m)",
     "tests/test_model.py -k every_trainer_builds"),
    ("ilql-heads-always-fp32", "ilql.py", "fp32_heads(model, cfg.fp32_heads)", "fp32_heads(model)",
     "tests/test_model.py -k every_trainer_builds"),
    ("ppo-heads-always-fp32", "ppo.py", "fp32_heads(m, cfg.fp32_heads)", "fp32_heads(m)",
     "tests/test_model.py -k every_trainer_builds"),
    ("grpo-reference-heads-always-fp32", "grpo.py", "fp32_heads(copy.deepcopy(policy), cfg.fp32_heads)",
     "fp32_heads(copy.deepcopy(policy))", "tests/test_model.py -k every_trainer_builds"),
    ("summarize-facts-counted-per-occurrence", "summarize.py", "facts=len(post & FACT_WORDS & set(words))",
     "facts=sum(w in post & FACT_WORDS for w in words)", "tests/test_summarize.py"),
    ("summarize-function-words-invented", "summarize.py", "invented=sum(w not in post | FUNCTION for w in words)",
     "invented=sum(w not in post for w in words)", "tests/test_summarize.py"),
    ("summarize-gold-reads-past-the-cue", "summarize.py", "post = set(WORD.findall(prompt.split(CUE)[0].lower()))",
     "post = set(WORD.findall(prompt.lower()))", "tests/test_summarize.py"),
    ("checkpoint-written-in-place", "common.py", "    tmp = f\"{path}.tmp{os.getpid()}\"", "    tmp = path",
     "tests/test_reliability.py -k failed_save"),
    ("checkpoint-load-not-checked-for-a-save", "common.py",
     "unchanged = lambda: os.path.samestat(os.fstat(held.fileno()), os.stat(path))", "unchanged = lambda: True",
     "tests/test_reliability.py -k two_opens"),
    ("resume-log-not-cut", "common.py", '        elif resume and _RUN["log_bytes"] is not None and os.path.exists(path):\n',
     "        elif False:\n", "tests/test_reliability.py -k logs_each_step_once"),
    ("resume-keeps-the-checkpoints-optimizer-settings", "common.py", "        group.update(own)  #", "        pass  #",
     "tests/test_reliability.py -k own_optimizer_settings"),
    ("best-pt-written-after-ckpt-pt", "sft.py",
     "                if is_best:\n                    save(best_path, raw_model, None, done, best_eval_loss, cfg)\n"
     "                save(ckpt_path, raw_model, optimizer, done, best_eval_loss, cfg)",
     "                save(ckpt_path, raw_model, optimizer, done, best_eval_loss, cfg)\n"
     "                if is_best:\n                    save(best_path, raw_model, None, done, best_eval_loss, cfg)",
     "tests/test_reliability.py -k keeps_best_pt"),
    ("prompt-keeps-its-start", "data.py", "    return ids[-max_prompt_len:]", "    return ids[:max_prompt_len]",
     "tests/test_reliability.py -k prompt_longer"),
    ("out-dir-not-checked", "common.py",
     "unreadable = all_reduce_sum(torch.tensor([unreadable], device=s.device), s).item()", "unreadable = 0",
     "tests/test_gpu_paths.py -k out_dir"),
    ("grad-clip-zero-clips-everything", "common.py", "clip_grad_norm_(params, grad_clip or float(\"inf\"))",
     "clip_grad_norm_(params, grad_clip)", "tests/test_gpu_paths.py -k grad_clip_zero"),
    ("run-error-is-a-traceback", "common.py", "except (ConfigError, DataError, RunError) as e:",
     "except (ConfigError, DataError) as e:", "tests/test_reliability.py -k reward_fn_on_the_command_line"),
    ("grpo-any-checkpoint-as-policy", "grpo.py", 'heads={}, kind=("sft", "grpo"), ', "heads={}, ",
     "tests/test_grpo.py -k refused"),
    ("dpo-any-checkpoint-as-start", "dpo.py", 'heads={}, kind=("sft", "dpo"), ', "heads={}, ",
     "tests/test_dpo.py -k refused"),
]


def run(name, file, old, new, tests):
    with tempfile.TemporaryDirectory() as tmp:
        # the working tree as it is: tracked files and new ones not yet committed (not the ignored ones)
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
        for f in (f for f in files.split() if os.path.exists(ROOT / f)):
            os.makedirs(os.path.join(tmp, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(ROOT / f, os.path.join(tmp, f))
        path = Path(tmp) / file
        text = path.read_text()
        if text.count(old) != 1:
            return "stale (the text to mutate is not in the code once: update this list)"
        path.write_text(text.replace(old, new))
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests.split()],
                           cwd=tmp, capture_output=True, text=True)
        return "caught" if r.returncode == 1 else "SURVIVED" if r.returncode == 0 else f"error (pytest {r.returncode})"


def main(words):
    chosen = [m for m in MUTATIONS if not words or any(w in m[0] for w in words)]
    results = []
    for m in chosen:
        t0 = time.time()
        results.append((m[0], run(*m)))
        print(f"{m[0]:<40} {results[-1][1]:<12} {time.time() - t0:5.0f} s   {m[4]}", flush=True)
    survived = [n for n, r in results if r != "caught"]
    print(f"{len(results) - len(survived)} of {len(results)} caught"
          + (f"; not caught: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
