import os

# Tests never touch the network: every hub call must fail fast instead of hanging or downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# On a shared 2-core machine, OpenMP threads that spin-wait for work make torch 5-20x slower whenever another
# process holds a core; passive waiting costs nothing when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
