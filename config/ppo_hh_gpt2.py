# PPO of GPT-2 (124M) on Anthropic HH prompts, from the SFT and reward models of config/sft_hh_gpt2.py and
# config/reward_hh_gpt2.py (run those first). The critic is a copy of the reward model (critic="separate").
#   torchrun --standalone --nproc_per_node=8 ppo.py config/ppo_hh_gpt2.py
#   python ppo.py config/ppo_hh_gpt2.py --batch_size=64 --grad_accum=8   # 1 GPU: 1/8 of the episodes per step
init_from = "out-sft-hh/ckpt.pt"
reward_model = "out-rm-hh/ckpt.pt"  # normalize_std=True there: held-out chosen replies score mean 0, std 1
data = "Anthropic/hh-rlhf"  # prompt = each dialogue of `chosen` up to its last "\n\nAssistant:"
data_split = "train"  # 160,800 prompts
eval_split = "test"
skip_bad = True
max_prompt_len = 384  # as in SFT/RM training: the reward model has seen contexts this long
max_new_tokens = 128  # 384 + 128 = 512 tokens, as in reward model training
out_dir = "out-ppo-hh"
batch_size = 64  # 64 rollouts * 8 GPUs = 512 episodes per iteration (the N+ details' batch)
minibatch_size = 16  # 4 minibatches * 4 epochs = 16 optimizer steps per iteration, 128 sequences each (8 GPUs)
grad_accum = 2  # 8 sequences per forward
ppo_epochs = 4
max_iters = 400  # 400 * 512 = 204,800 episodes, ~1.3 passes over the prompts
learning_rate = 1e-5
warmup_iters = 10
temperature = 0.7  # the N+ details' sampling temperature; every logprob uses it
init_kl_coef = 0.05
target_kl = 6.0  # nats per response (OpenAI's lm-human-preferences)
kl_horizon = 10000
penalize_missing_eos = True  # a reply still going after 128 tokens scores -1 (std units of the RM)
missing_eos_penalty = -1.0
eval_interval = 25
eval_size = 512  # 64 per GPU
eval_samples = 2
dtype = "bfloat16"
