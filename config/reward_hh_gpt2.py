# Reward model on Anthropic HH, from the SFT model of config/sft_hh_gpt2.py (run that first).
#   python reward.py config/reward_hh_gpt2.py  # 1 GPU
#   torchrun --standalone --nproc_per_node=4 reward.py config/reward_hh_gpt2.py --grad_accum=2   # same global batch
# From plain GPT-2 instead: --init_from=gpt2
init_from = "out-sft-hh/ckpt.pt"
data = "Anthropic/hh-rlhf"  # chosen/rejected dialogues; the prompt is their common prefix up to "\n\nAssistant:"
data_split = "train"  # 160,800 pairs
eval_split = "test[:4096]"  # of 8,552
skip_bad = True  # a few HH rows have chosen == rejected: count and drop them
max_prompt_len = 384
max_len = 512
normalize_std = True  # held-out chosen replies score mean 0, std 1: PPO's KL coefficient keeps its meaning
out_dir = "out-rm-hh"
batch_size = 8  # 8 pairs (16 sequences per forward) * 8 micro-batches * 1 GPU = 64 pairs per step
grad_accum = 8
max_iters = 2500  # 2,500 * 64 = 160,000 pairs: one epoch (more overfits)
learning_rate = 1e-5
warmup_iters = 100
eval_interval = 500  # 4,096 pairs = 8,192 sequences / 16 = 512 forwards
eval_batch_size = 16
dtype = "bfloat16"
