# A tiny reward model trained from scratch on the 3-row preference fixture: a smoke test / demo in seconds on a CPU.
# It evaluates on its own training rows (there is nothing to hold out), so eval_acc only shows it memorises.
#   python reward.py config/reward_tiny.py
#   torchrun --standalone --nproc_per_node=2 reward.py config/reward_tiny.py
init_from = "scratch"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 64
data = "tests/fixtures/data/prefs.jsonl"
data_split = "train"
eval_split = "train"
max_prompt_len = 32
max_len = 64
out_dir = "out-rm-tiny"
batch_size = 4  # 4 pairs (8 sequences per forward) * 2 micro-batches * 1 process = 8 pairs per step
grad_accum = 2
max_iters = 30
learning_rate = 3e-3
warmup_iters = 5
eval_interval = 10
eval_batch_size = 16
device = "cpu"
dtype = "float32"
