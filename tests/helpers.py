"""Small helpers shared by the test modules."""
import json

import torch

from common import load_checkpoint


def write_jsonl(path, rows):
    """Rows as a JSON Lines fixture file; returns the path as a string (what --data takes)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def assert_same_weights(path_a, path_b, step, atol=1e-6):
    """Two checkpoints (e.g. an uninterrupted run and a stopped-and-resumed one) end at `step` with the same weights."""
    a, b = load_checkpoint(str(path_a)), load_checkpoint(str(path_b))
    assert a["step"] == b["step"] == step
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=atol, rtol=0), k
