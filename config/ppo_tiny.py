# PPO on the tiny SFT and reward models of config/sft_tiny.py and config/reward_tiny.py (run those first), with the
# 3 HH-format prompts of the fixture: a smoke run that takes seconds on a CPU. The tiny reward model has memorised 3
# pairs of other prompts and scores these responses about -6 (raw units), so the -1 penalty for not ending pays:
# expect the score to rise through longer responses. tests/test_ppo.py shows PPO learning on rewards that mean it.
#   python sft.py config/sft_tiny.py && python reward.py config/reward_tiny.py
#   python ppo.py config/ppo_tiny.py
#   torchrun --standalone --nproc_per_node=2 ppo.py config/ppo_tiny.py
init_from = "out-sft-tiny/ckpt.pt"
reward_model = "out-rm-tiny/ckpt.pt"  # critic="separate" by default: initialised from it
data = "tests/fixtures/data/hh.jsonl"  # prompt = each dialogue up to its last "\n\nAssistant:"
eval_split = "train"  # nothing to hold out: evaluation reuses the 3 prompts
max_prompt_len = 32
max_new_tokens = 16  # 32 + 16 <= block_size 64
out_dir = "out-ppo-tiny"
batch_size = 8  # 8 rollouts * 1 process per iteration
minibatch_size = 4  # 2 minibatches * 4 epochs = 8 optimizer steps per iteration
max_iters = 10
learning_rate = 1e-4
init_kl_coef = 0.05
eval_interval = 5
eval_size = 3
eval_samples = 1
device = "cpu"
dtype = "float32"
