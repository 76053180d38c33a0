# GRPO on the tiny SFT and reward models of config/sft_tiny.py and config/reward_tiny.py (run those first), with the
# 3 HH-format prompts of the fixture: a smoke run that takes seconds on a CPU. The tiny reward model has memorised 3
# pairs of other prompts, so expect little more than the wiring to run; tests/test_grpo.py shows GRPO learning on
# rewards that mean it.
#   python sft.py config/sft_tiny.py && python reward.py config/reward_tiny.py
#   python grpo.py config/grpo_tiny.py
#   torchrun --standalone --nproc_per_node=2 grpo.py config/grpo_tiny.py
init_from = "out-sft-tiny/ckpt.pt"
reward_model = "out-rm-tiny/ckpt.pt"
data = "tests/fixtures/data/hh.jsonl"  # prompt = each dialogue up to its last "\n\nAssistant:"
eval_split = "train"  # nothing to hold out: evaluation reuses the 3 prompts
max_prompt_len = 32
max_new_tokens = 16  # 32 + 16 <= block_size 64
out_dir = "out-grpo-tiny"
batch_size = 2  # 2 prompts * 4 responses = 8 rollouts per iteration and process
group_size = 4
minibatch_size = 4  # 2 minibatches per iteration: the second one's ratio is no longer 1 (the clip can act)
advantage = "grpo"
beta = 0.04
kl_estimator = "k3"
max_iters = 10
learning_rate = 1e-4
eval_interval = 5
eval_size = 3
eval_samples = 1
device = "cpu"
dtype = "float32"
