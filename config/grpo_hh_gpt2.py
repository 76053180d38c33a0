# GRPO of GPT-2 (124M) on Anthropic HH prompts, from the SFT and reward models of config/sft_hh_gpt2.py and
# config/reward_hh_gpt2.py (run those first). No critic: each prompt is answered group_size times and a reply's
# advantage is its score against its group's.
#   torchrun --standalone --nproc_per_node=8 grpo.py config/grpo_hh_gpt2.py
#   python grpo.py config/grpo_hh_gpt2.py --batch_size=64 --minibatch_size=128 --grad_accum=16   # 1 GPU: the same
#   512 episodes and 4 optimizer steps of 128 per iteration, 8 sequences per forward
init_from = "out-sft-hh/ckpt.pt"
reward_model = "out-rm-hh/ckpt.pt"  # normalize_std=True there: held-out chosen replies score mean 0, std 1
data = "Anthropic/hh-rlhf"  # prompt = each dialogue of `chosen` up to its last "\n\nAssistant:"
data_split = "train"  # 160,800 prompts
eval_split = "test"
skip_bad = True
max_prompt_len = 384  # as in SFT/RM training: the reward model has seen contexts this long
max_new_tokens = 128  # 384 + 128 = 512 tokens, as in reward model training; Dr. GRPO's loss divisor
out_dir = "out-grpo-hh"
batch_size = 8  # 8 prompts * 8 replies * 8 GPUs = 512 episodes per iteration, PPO's config/ppo_hh_gpt2.py batch
group_size = 8
advantage = "grpo"
minibatch_size = 16  # 4 minibatches = 4 optimizer steps per iteration (the last three slightly off-policy: clipped)
grad_accum = 2  # 8 sequences per forward
ppo_epochs = 1
max_iters = 400  # 400 * 64 = 25,600 prompts
learning_rate = 1e-5
warmup_iters = 10
temperature = 0.7  # every logprob uses it
beta = 0.04  # the GRPO paper's KL coefficient
kl_estimator = "k3"
penalize_missing_eos = True  # a reply still going after 128 tokens scores -1 (std units of the RM)
missing_eos_penalty = -1.0
eval_interval = 25
eval_size = 512  # 64 per GPU
eval_samples = 2
dtype = "bfloat16"
