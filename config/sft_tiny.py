# A tiny GPT-2 trained from scratch on the 3-row fixture: a smoke test / demo that runs in seconds on a CPU.
# It evaluates on its own training rows (there is nothing to hold out), so "eval_loss" only shows it memorises.
#   python sft.py config/sft_tiny.py
#   torchrun --standalone --nproc_per_node=2 sft.py config/sft_tiny.py
init_from = "scratch"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 64
data = "tests/fixtures/data/sft.jsonl"
data_split = "train"
eval_split = "train"
max_prompt_len = 32
max_len = 64
out_dir = "out-sft-tiny"
batch_size = 4  # 4 sequences * 2 micro-batches * 1 process = 8 sequences per step
grad_accum = 2
max_iters = 40
learning_rate = 1e-2
warmup_iters = 5
eval_interval = 20
eval_batch_size = 8
eval_samples = 1
max_new_tokens = 16
device = "cpu"
dtype = "float32"
