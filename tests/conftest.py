import os

import pytest

# Tests never touch the network: every hub call must fail fast instead of hanging or downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# On a shared 2-core machine, OpenMP threads that spin-wait for work make torch 5-20x slower whenever another
# process holds a core; passive waiting costs nothing when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def one_thread(tmp_path_factory, monkeypatch):
    """One torch thread, and datasets' cache in this session's temp dir (not the home directory). With two threads on
    a CPU shared with other processes, OpenMP oversubscription makes tiny models many times slower."""
    import datasets
    import torch
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def plain_model_code():
    """Every test starts on model.py's plain code. Each script's main() calls common.setup(), which switches the CPU
    speed-ups of speedups.py on for the process; this switches them off again after the test."""
    import speedups
    speedups.enable(False)
    yield
    speedups.enable(False)
