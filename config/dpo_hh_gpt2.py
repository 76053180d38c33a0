# DPO of GPT-2 (124M) on Anthropic HH, from the SFT model of config/sft_hh_gpt2.py (run that first): no reward model.
#   python dpo.py config/dpo_hh_gpt2.py  # 1 GPU
#   torchrun --standalone --nproc_per_node=4 dpo.py config/dpo_hh_gpt2.py --grad_accum=2   # same global batch
init_from = "out-sft-hh/ckpt.pt"  # the policy's start and its frozen reference
data = "Anthropic/hh-rlhf"  # chosen/rejected dialogues; the prompt is their common prefix up to "\n\nAssistant:"
data_split = "train"  # 160,800 pairs
eval_split = "test[:2048]"  # of 8,552
skip_bad = True  # a few HH rows have chosen == rejected: count and drop them
max_prompt_len = 384
max_len = 512
beta = 0.1  # the DPO paper's
out_dir = "out-dpo-hh"
batch_size = 8  # 8 pairs (16 sequences per forward) * 8 micro-batches * 1 GPU = 64 pairs per step (the paper's batch)
grad_accum = 8
max_iters = 2500  # 2,500 * 64 = 160,000 pairs: one epoch
learning_rate = 1e-6  # the DPO paper's (RMSprop there, AdamW here): warmed up over 150 steps, then constant
warmup_iters = 150
min_lr_ratio = 1.0
eval_interval = 250  # 2,048 pairs / 8 = 256 forwards of the policy and of the reference
eval_batch_size = 8
dtype = "bfloat16"
