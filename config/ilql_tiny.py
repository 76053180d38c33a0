# ILQL on a tiny scratch GPT-2 and the 3-row fixture: a smoke run for tests and the demo (seconds on a CPU).
# It evaluates on its own training rows (there is nothing to hold out), so "eval_loss" only shows it memorises.
# python ilql.py config/ilql_tiny.py
init_from = "scratch"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 64
out_dir = "out-ilql-tiny"

data = "tests/fixtures/data/offline.jsonl"  # prompt/response/reward rows
data_format = "offline"
data_split = "train"
eval_split = "train"  # a local file has only a "train" split
max_prompt_len = 16
max_len = 32

batch_size = 4  # 4 rows * 1 micro-batch * 1 process = 4 sequences per step
max_iters = 20
learning_rate = 1e-3
warmup_iters = 2
alpha = 0.05  # fast targets: a short run needs them to follow the online heads

eval_interval = 10
eval_size = 4
eval_betas = (0.0, 4.0)
max_new_tokens = 8
device = "cpu"
dtype = "float32"
