# ILQL on Anthropic HH from GPT-2 small (124M), trlx's recipe: every chosen response is a row with reward +1,
# every rejected one a row with reward -1 (z-scoring leaves +-1 as they are: mean 0, std 1).
#   python ilql.py config/ilql_hh_gpt2.py                                    # one GPU
#   torchrun --standalone --nproc_per_node=8 ilql.py config/ilql_hh_gpt2.py --grad_accum=1
#   add --reward_model=out-rm-hh/ckpt.pt to score the evaluation samples, --init_from=out-sft-hh/ckpt.pt to
#   start from our SFT model instead of plain gpt2.
init_from = "gpt2"
out_dir = "out-ilql-hh"
dtype = "bfloat16"

data = "Anthropic/hh-rlhf"
data_format = "preferences"  # 160,800 pairs -> 321,600 rows
eval_split = "test[:512]"  # 512 pairs -> 1,024 rows for the eval loss; their first 64 distinct prompts are sampled
max_prompt_len = 384  # the end of the dialogue is kept
max_len = 512

# 8 rows * 4 micro-batches * 1 GPU = 32 rows per step; 321,600 / 32 = 10,050 steps per epoch
batch_size = 8
grad_accum = 4
max_iters = 10000  # ~1 epoch
learning_rate = 2e-5
warmup_iters = 100
min_lr_ratio = 0.1

# ILQL: trlx's HH values (tau 0.6 there), except tau and alpha: ours moves the targets every step; trlx's GPT-J run used
# 1e-4 at lr 1e-6. 1 / alpha = 200 steps is the targets' time constant.
gamma = 0.99
tau = 0.7
alpha = 0.005
cql_scale = 0.1
awac_scale = 1.0

# Memory: the LM head and the two Q heads each output (8, response_len, 50257) per micro-batch, in fp32 (fp32_heads):
# with 300-token responses that is 8 * 300 * 50257 * 4 bytes = 482 MB each. Lower batch_size (and raise grad_accum)
# on a GPU under 40 GB.
eval_interval = 500
eval_size = 64
eval_betas = (0.0, 1.0, 4.0)
max_new_tokens = 128
temperature = 1.0
top_k = 20
