# SFT of GPT-2 (124M) on Anthropic HH: the chosen reply of each dialogue, the dialogue before it as the prompt.
#   python sft.py config/sft_hh_gpt2.py  # 1 GPU
#   torchrun --standalone --nproc_per_node=4 sft.py config/sft_hh_gpt2.py --grad_accum=1   # same global batch
# then: python reward.py config/reward_hh_gpt2.py
init_from = "gpt2"
data = "Anthropic/hh-rlhf"
data_format = "chosen"  # prompt/completion split by data.load_preferences (prompt ends with "\n\nAssistant:")
data_split = "train"  # 160,800 dialogues
eval_split = "test[:2048]"  # of 8,552
skip_bad = True  # a few HH rows have chosen == rejected: count and drop them
max_prompt_len = 384  # long dialogues keep their last 384 tokens
max_len = 512
out_dir = "out-sft-hh"
batch_size = 16  # 16 sequences * 4 micro-batches * 1 GPU = 64 sequences per step
grad_accum = 4
max_iters = 2500  # 2,500 * 64 = 160,000 sequences: one epoch
learning_rate = 2e-5
warmup_iters = 100
weight_decay = 0.0
eval_interval = 250  # 2,048 eval dialogues / 16 = 128 forwards
eval_batch_size = 16
eval_samples = 2
max_new_tokens = 64
dtype = "bfloat16"
