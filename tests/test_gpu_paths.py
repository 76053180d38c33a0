"""What the CPU can show of the GPU and multi-node code paths, and of loading Hugging Face folders:
- torchrun: out_dir must be shared by every rank (a rank that cannot read rank 0's file stops every rank with one
  error line); per-node caches are filled by each node's first rank; each rank is bound to its GPU
  (init_process_group's device_id, set_device), also a single process given cuda:1 (whose timers then wait for
  that GPU);
- precision: TF32 only with dtype="tf32", never inside an fp32 Head; bf16 on a GPU without native bf16 warns;
- right-padded batches (SFT, reward, ILQL, DPO) are forwarded without a mask (SDPA's fastest kernels), which gives
  the real positions the masked forward's values;
- generate reads `done` every few tokens off the CPU and still returns what checking every token returns;
- HF folders: pytorch_model.bin only (also on the hub), sharded safetensors and .bin, pickles with code refused;
  checkpoints are memory-mapped, not copied;
- ppo.py with grad_clip=0 (no clipping) still trains.
CUDA itself is faked with monkeypatched torch.cuda / torch.distributed functions; everything runs on CPU."""

import fnmatch
import json
import os
import shutil
from contextlib import nullcontext
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import common
import dpo
import hf_files
import ilql
import model
import ppo
import reward
import sft
from common import Setup, load_checkpoint, rank0_first, save_checkpoint, setup
from data import EOS, collate_sft, pad_right
from model import GPT, GPTConfig, Head, generate
from tests.helpers import ROOT, cpu_setup, run_torchrun, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = cpu_setup()


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, **kw))


# ============================================================================ torchrun: shared out_dir, nodes, GPUs
SHARED_CHECK = """
import os, sys
from dataclasses import dataclass
os.chdir(os.path.join(sys.argv[1], "node" + os.environ["LOCAL_RANK"]))  # each rank its own disk, as two nodes
sys.argv = sys.argv[1:]
from common import check_shared_dir, run_main, setup

@dataclass
class Config:
    shared: str = ""
    out_dir: str = "out"

def main(cfg):
    s = setup("cpu", "float32", 0, cfg.shared)  # an absolute path: one folder for both ranks
    print(f"rank {s.rank} can read {os.path.basename(cfg.shared)}", flush=True)
    check_shared_dir(cfg.out_dir, s)  # a relative path: each rank's own folder
    print(f"rank {s.rank} can read {cfg.out_dir}", flush=True)

run_main(main, Config)
"""


def test_out_dir_that_ranks_do_not_share_stops_every_rank(tmp_path):
    """Two ranks, each in its own directory as on two nodes with local disks. An absolute out_dir, one folder for
    both, passes the start-up check; a relative one is two folders, and both ranks stop with the same one-line error
    (exit 2), instead of rank 1 failing alone at its first read and rank 0 waiting in a collective. Rank 0's token
    file is removed either way."""
    script = tmp_path / "shared_check.py"
    script.write_text(SHARED_CHECK)
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # torchrun stops the other ranks once one has failed, looking every 0.1 s by default: a rank still on its way to
    # its own error (descheduled on a busy machine) would be stopped before it printed it. Look every 5 s.
    r = run_torchrun(["--nproc_per_node=2", "--monitor-interval=5", str(script), str(tmp_path),
                      f"--shared={tmp_path / 'shared'}"], env)
    assert r.returncode != 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("rank 0 can read shared") == r.stdout.count("rank 1 can read shared") == 1, r.stdout
    assert "can read out" not in r.stdout, r.stdout
    error = ("error: out_dir 'out': 1 of 2 ranks cannot read the file rank 0 wrote there; with several nodes out_dir "
             "must be on a filesystem every node shares (rank 0 writes the checkpoints, every rank reads them)")
    # counted, not split into lines: the two ranks write to one pipe at the same time and may interleave
    assert r.stderr.count(error) == 2, r.stderr[-3000:]
    assert os.listdir(tmp_path / "shared") == [] and os.listdir(tmp_path / "node0" / "out") == []


@pytest.mark.parametrize("rank,local_rank,first", [(0, 0, True), (1, 1, False), (2, 0, True), (3, 1, False)])
def test_each_nodes_first_rank_fills_the_cache_first(monkeypatch, rank, local_rank, first):
    """rank0_first on 2 nodes x 2 GPUs: local rank 0 of every node (global ranks 0 and 2) runs the block (datasets
    writes its per-node cache) before the barrier, the others after it. Global rank 0 alone would leave node 2's
    ranks writing their cache all at once."""
    events = []
    monkeypatch.setattr(common.dist, "barrier", lambda *a, **kw: events.append("barrier"))
    s = Setup(ddp=True, rank=rank, local_rank=local_rank, world_size=4, device="cpu", master=rank == 0,
              autocast=nullcontext)
    with rank0_first(s):
        events.append("block")
    assert events == (["block", "barrier"] if first else ["barrier", "block"])


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda / torch.distributed as a machine with GPUs would answer; returns the calls made. Restores the
    TF32 flags and common's rank-0 flag that setup() changes."""
    calls = {"set_device": [], "init_process_group": [], "synchronize": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(str(d)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls["synchronize"].append(d))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(common.dist, "init_process_group", lambda **kw: calls["init_process_group"].append(kw))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul.allow_tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(common, "_MASTER", True)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    return calls


def test_torchrun_binds_each_rank_to_its_gpu(fake_cuda, monkeypatch):
    """Rank 3 of 4, local rank 1: its device is cuda:1, set as the current device, and the NCCL process group is
    bound to it (device_id), so no barrier guesses the GPU from the global rank. On CPU, gloo and no device_id."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    s = setup("auto")
    assert (s.device, s.rank, s.local_rank, s.master) == ("cuda:1", 3, 1, False)
    assert fake_cuda["set_device"] == ["cuda:1"]
    assert fake_cuda["init_process_group"] == [dict(backend="nccl", device_id=torch.device("cuda:1"))]
    setup("cpu")
    assert fake_cuda["init_process_group"][1] == dict(backend="gloo", device_id=None)


def test_single_process_on_cuda_1_uses_that_gpu(fake_cuda):
    """--device=cuda:1 without torchrun: cuda:1 becomes the current device (before, only torchrun ranks set one, and
    every call without a device went to GPU 0), and PPO's phase timers wait for that GPU. "cuda" means cuda:0."""
    s = setup("cuda:1")
    assert s.device == "cuda:1" and fake_cuda["set_device"] == ["cuda:1"]
    timer = ppo.PhaseTimer(s.device)
    with timer("generate"):
        pass
    assert fake_cuda["synchronize"] == [torch.device("cuda:1")] * 2 and timer.times["generate"] >= 0
    assert setup("cuda").device == "cuda:0" and fake_cuda["set_device"][-1] == "cuda:0"


@pytest.mark.parametrize("dtype,tf32", [("float32", False), ("bfloat16", False), ("tf32", True)])
def test_tf32_only_when_asked_for(fake_cuda, monkeypatch, dtype, tf32):
    """dtype="float32" on a GPU is fp32 (TF32 off, whatever it was before); dtype="tf32" switches it on."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", not tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not tf32)
    setup("cuda", dtype)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32


def test_fp32_head_computes_without_tf32(monkeypatch):
    """With TF32 on (dtype="tf32"), a Head with fp32 set runs its matmul with TF32 off, and turns it back on after;
    a plain Head (and the rest of the model) keeps TF32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    seen, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda *a: seen.append(torch.backends.cuda.matmul.allow_tf32) or linear(*a))
    head, x = Head(8, 3), torch.randn(2, 8)
    head.fp32 = True
    assert torch.equal(head(x), linear(x, head.weight, head.bias))
    head.fp32 = False
    head(x)
    assert seen == [False, True] and torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_gpu_without_native_bf16_warns(fake_cuda, monkeypatch, capsys, native):
    """bf16 autocast on a pre-Ampere GPU (emulated bf16, many times slower) prints a warning naming the GPU."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
    setup("cuda", "bfloat16")
    out = capsys.readouterr().out
    assert ("warning: Tesla V100 has no native bf16" in out) is not native, out


# ============================================================================ right padding without a mask
def test_right_padded_rows_need_no_mask():
    """A right-padded batch forwarded with plain causal attention (no mask) gives every real position the hidden
    states of the masked forward; only the padding's differ (they see each other), and no trainer reads those."""
    gpt = tiny_gpt().eval()
    tokens, mask = pad_right([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]])
    with torch.no_grad():
        plain, masked = gpt(tokens), gpt(tokens, mask)
    real = mask.bool()
    torch.testing.assert_close(plain[real], masked[real], atol=1e-5, rtol=0)
    assert (plain[~real] - masked[~real]).abs().max() > 1e-3  # the comparison above can fail


def trainer_forwards(script):
    """One forward_backward of `script` on a right-padded batch of rows of different lengths."""
    pairs = [([1, 2, 3], [4, 5, EOS]), ([6], [7, EOS]), ([8, 9], [10, 11, 12, 13, EOS])]
    if script == "sft":
        gpt = tiny_gpt()
        sft.forward_backward(gpt, gpt.lm_head, [collate_sft(pairs)], CPU)
    elif script == "reward":
        reward.forward_backward(tiny_gpt(heads={"reward": 1}), [[(p + c, p + c[:1]) for p, c in pairs]], CPU)
    elif script == "ilql":
        gpt = tiny_gpt(heads=ilql.ilql_heads(50257))
        cfg = ilql.Config()
        ilql.forward_backward(gpt, gpt, [ilql.collate_offline([(p, r, 1.0) for p, r in pairs])], 9, cfg, CPU)
    else:
        gpt = tiny_gpt()
        dpo.forward_backward(gpt, gpt.lm_head, tiny_gpt(), [[(pair, (pair[0], [EOS])) for pair in pairs]],
                             dpo.Config(), CPU)


@pytest.mark.parametrize("script", ["sft", "reward", "ilql", "dpo"])
def test_trainers_forward_right_padded_batches_without_a_mask(monkeypatch, script):
    """Every attention call of the training forward (and DPO's reference forward) gets no mask: SDPA may then take
    its flash kernel on a GPU. That this computes what the masked forward computes is the test above; each trainer's
    loss is also held to a naive masked reference in its own test module."""
    masks, attention = [], model.attention
    monkeypatch.setattr(model, "attention", lambda q, k, v, m, *a: masks.append(m) or attention(q, k, v, m, *a))
    trainer_forwards(script)
    assert masks and all(m is None for m in masks)


# ============================================================================ generate's early stop
def test_generate_that_looks_at_done_every_4_tokens_returns_the_same(monkeypatch):
    """Off the CPU, generate reads `done` (a host sync) only every few tokens. Its result must be what looking at
    every token gives: the same tokens, logprobs and mask, cut where the last row ended (not at the next look).
    The logits are fixed with P(EOS) = 1/4, so rows end at different steps, all before max_new_tokens."""
    gpt = tiny_gpt().eval()
    logits = torch.zeros(50257)
    logits[EOS] = torch.tensor(50256 / 3).log()  # P(EOS) = 1/4
    logits_fn = lambda h: logits.expand(h.shape[0], -1)  # noqa: E731
    tokens, mask = torch.tensor([[1, 2, 3]] * 6), torch.ones(6, 3, dtype=torch.long)
    runs = []
    for every in (1, 4):
        monkeypatch.setattr(model, "CHECK_DONE_EVERY", {"cpu": every})
        runs.append(generate(gpt, tokens, mask, 40, generator=torch.Generator().manual_seed(2), logits_fn=logits_fn))
    (out, lp, rmask), (out4, lp4, rmask4) = runs
    N = out.shape[1] - 3
    assert N < 40 and N % 4 != 0 and rmask[:, -1].any()  # stopped early, between two looks of the every-4 run
    assert torch.equal(out4, out) and torch.equal(lp4, lp) and torch.equal(rmask4, rmask)


# ============================================================================ Hugging Face folders and checkpoints
def hf_gpt2(seed=0):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_positions=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    return transformers.GPT2LMHeadModel(config).eval()


def logits(gpt, idx):
    with torch.no_grad():
        return gpt.lm_head(gpt(idx))


def save_bin_folder(hf, folder, shards=1):
    """An HF folder with PyTorch pickles only, as older hub repositories are: config.json and pytorch_model.bin, or
    `shards` pytorch_model-0000i-of-0000n.bin files and their pytorch_model.bin.index.json."""
    hf.config.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if shards == 1:
        torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
        return
    keys, weight_map = sorted(sd), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: sd[k] for k in keys[i::shards]}, os.path.join(folder, name))
        weight_map.update({k: name for k in keys[i::shards]})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def fake_hub(repo, tmp_path, monkeypatch):
    """huggingface_hub.snapshot_download serving `repo`'s files that match the patterns asked for, each download into
    tmp_path/cache/<n>; returns the list of pattern lists asked, in order."""
    import huggingface_hub
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append(allow_patterns)
        cache = tmp_path / "cache" / str(len(asked))
        cache.mkdir(parents=True)
        for f in os.listdir(repo):
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                shutil.copy(repo / f, cache / f)
        return str(cache)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return asked


def test_hub_repository_with_only_pytorch_model_bin(tmp_path, monkeypatch):
    """A hub repository that ships config.json and pytorch_model.bin only: the download asks for safetensors
    first, finds none, fetches the .bin and loads it (it used to fetch config.json only and report no weights)."""
    hf = hf_gpt2()
    repo = tmp_path / "repo"
    save_bin_folder(hf, repo)
    (repo / "tf_model.h5").write_bytes(b"not for us")
    asked = fake_hub(repo, tmp_path, monkeypatch)
    ours = GPT.from_pretrained("someone/old-gpt2").eval()
    assert len(asked) == 2 and not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in asked[0])
    assert sorted(os.listdir(tmp_path / "cache" / "2")) == ["config.json", "pytorch_model.bin"]
    idx = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_folders_load(tmp_path, kind):
    """A folder whose weights are split into shards listed by an .index.json (save_pretrained with a small
    max_shard_size; or .bin shards): loads with HF's logits. A missing shard is an error naming it."""
    hf = hf_gpt2(seed=1)
    if kind == "safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="1MB")
    else:
        save_bin_folder(hf, tmp_path, shards=3)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(("safetensors", ".bin")))
    assert len(shards) > 1 and not {"model.safetensors", "pytorch_model.bin"} & set(shards), shards
    idx = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(logits(GPT.from_pretrained(str(tmp_path)).eval(), idx), hf(idx).logits,
                                   atol=1e-4, rtol=0)
    os.remove(tmp_path / shards[-1])
    with pytest.raises(ValueError, match=rf"{shards[-1]}: cannot read weights"):
        GPT.from_pretrained(str(tmp_path))


def test_pytorch_model_bin_with_python_objects_is_refused_without_unsafe_advice(tmp_path):
    """A pytorch_model.bin that holds other Python objects than tensors is not unpickled (that could run code), and
    the error does not pass on torch's advice to retry with weights_only=False."""
    hf_gpt2().config.save_pretrained(tmp_path)
    torch.save({"transformer.wte.weight": Fraction(1, 3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        GPT.from_pretrained(str(tmp_path))
    assert "holds Python objects other than tensors" in str(err.value) and "weights_only" not in str(err.value)


@pytest.mark.parametrize("content", [{"transformer.wte.weight": 3}, [1, 2], torch.zeros(3)],
                         ids=["an-int-among-the-weights", "a-list", "a-tensor"])
def test_pytorch_model_bin_that_is_no_state_dict_is_named(tmp_path, content):
    """weights_only=True lets ints, lists and bare tensors through: a .bin of those is one ValueError naming it."""
    hf_gpt2().config.save_pretrained(tmp_path)
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a state dict \(a dict of names -> tensors\)$"):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("index", ["{not json", "{}", "[]"], ids=["not-json", "no-weight-map", "not-an-object"])
def test_a_broken_shard_index_is_named(tmp_path, index):
    hf_gpt2().config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not a shard index"):
        GPT.from_pretrained(str(tmp_path))


def test_checkpoints_and_bin_files_are_memory_mapped(tmp_path):
    """load_checkpoint and a pytorch_model.bin map the file (its tensors are read as used: every rank of a node
    loading a multi-GB checkpoint does not copy it into memory), rather than reading it whole."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs Linux's /proc/self/maps")
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, kind="sft", model={"w": torch.ones(1 << 16)}, step=1)
    ckpt = load_checkpoint(path)
    assert path in open("/proc/self/maps").read()
    save_bin_folder(hf_gpt2(), tmp_path / "bin")
    sd = hf_files.load_weights(str(tmp_path / "bin"))
    assert str(tmp_path / "bin" / "pytorch_model.bin") in open("/proc/self/maps").read()
    assert ckpt["model"]["w"].sum() == 1 << 16 and len(sd) > 0


# ============================================================================ grad_clip = 0
def length_reward(prompts, responses):  # "tests.test_gpu_paths:length_reward"
    return [len(r) / 10 for r in responses]


def test_ppo_with_grad_clip_zero_still_learns(tmp_path, monkeypatch):
    """grad_clip=0 means no clipping (as in every trainer): ppo.main's one step changes the policy's weights, with
    the full gradient norm logged. Clipping to a norm of 0 would zero every gradient, and AdamW would then leave
    every weight as it was."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {w}:"} for w in ("a", "b", "c", "d")])
    start = {}
    make_optimizer = ppo.make_optimizer
    monkeypatch.setattr(ppo, "make_optimizer", lambda m, *a, **kw: start.update(
        {k: v.clone() for k, v in m.state_dict().items()}) or make_optimizer(m, *a, **kw))
    cfg = ppo.Config(init_from="scratch", n_layer=1, n_head=2, n_embd=32, block_size=64, reward_model="",
                     reward_fn="tests.test_gpu_paths:length_reward", data=str(data), eval_size=0, max_prompt_len=16,
                     max_new_tokens=4, batch_size=4, minibatch_size=4, ppo_epochs=1, max_iters=1, learning_rate=1e-3,
                     grad_clip=0.0, out_dir=str(tmp_path / "out"), device="cpu")
    metrics = ppo.main(cfg)
    end = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"), "ppo")["model"]
    assert metrics["grad_norm"] > 0
    changed = [k for k in end if not torch.equal(end[k], start[f"policy.{k}"])]
    assert "wte.weight" in changed and "h.0.attn.c_attn.weight" in changed, changed


def test_hub_repository_with_sharded_safetensors(tmp_path, monkeypatch):
    """A hub repository whose safetensors weights are sharded (model-00001-of-0000n.safetensors and
    model.safetensors.index.json, as save_pretrained writes models over its max_shard_size): the first download asks
    for the shards too, accepts that folder by its index (no .bin download), and the shards load with HF's logits."""
    hf = hf_gpt2(seed=2)
    repo = tmp_path / "repo"
    hf.save_pretrained(repo, max_shard_size="1MB")
    torch.save({}, repo / "pytorch_model.bin")  # a decoy: must not be fetched or read
    shards = sorted(f for f in os.listdir(repo) if f.endswith(".safetensors"))
    assert len(shards) > 1 and (repo / "model.safetensors.index.json").exists()
    asked = fake_hub(repo, tmp_path, monkeypatch)
    ours = GPT.from_pretrained("someone/sharded-gpt2").eval()
    assert len(asked) == 1
    assert sorted(os.listdir(tmp_path / "cache" / "1")) == sorted(["config.json", "model.safetensors.index.json",
                                                                   *shards])
    idx = torch.randint(0, 50257, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, idx), hf(idx).logits, atol=1e-4, rtol=0)
