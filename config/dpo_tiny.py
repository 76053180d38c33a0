# A tiny DPO run on the 3-row preference fixture, from the tiny SFT model: a smoke test / demo in seconds on a CPU.
# It evaluates on its own training rows (there is nothing to hold out), so eval_acc only shows it memorises.
#   python sft.py config/sft_tiny.py  # first: its out-sft-tiny/ckpt.pt is where DPO starts
#   python dpo.py config/dpo_tiny.py
#   torchrun --standalone --nproc_per_node=2 dpo.py config/dpo_tiny.py
init_from = "out-sft-tiny/ckpt.pt"
data = "tests/fixtures/data/prefs.jsonl"
data_split = "train"
eval_split = "train"
max_prompt_len = 32
max_len = 64
beta = 0.1
out_dir = "out-dpo-tiny"
batch_size = 4  # 4 pairs (8 sequences per forward) * 2 micro-batches * 1 process = 8 pairs per step
grad_accum = 2
max_iters = 30
learning_rate = 1e-3
warmup_iters = 5
eval_interval = 10
eval_batch_size = 8
device = "cpu"
dtype = "float32"
