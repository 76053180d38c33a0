"""
The files of a Hugging Face model, without `transformers`: a local folder or a hub repository, its config.json and
its weights (model.safetensors or pytorch_model.bin, whole or in shards listed by an .index.json). model.py's
GPT.from_pretrained turns them into our GPT-2.
"""

import json
import os
import pickle
import zipfile

import torch


def folder_and_config(name_or_path):
    """(folder, its config.json as a dict): a local folder as it is, anything else fetched from the hub."""
    folder = name_or_path if os.path.isdir(name_or_path) else download(name_or_path)
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no config.json, not a Hugging Face model folder")
    with open(path) as f:
        return folder, json.load(f)


WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # an HF folder's weights: one file, or shards and an .index.json


def download(repo_id):
    """The config and the weights of a hub repository: safetensors if it has them, else PyTorch's pickle files."""
    try:
        from huggingface_hub import snapshot_download
        for name in WEIGHTS:  # shards: model-00001-of-00002.safetensors, pytorch_model-00001-of-00002.bin
            folder = snapshot_download(repo_id, allow_patterns=["config.json", name + "*", name.replace(".", "-*.")])
            if any(os.path.exists(os.path.join(folder, f)) for w in WEIGHTS for f in (w, w + ".index.json")):
                return folder
        return folder  # no weights: load_weights says so
    except Exception as e:  # no network, unknown id, ...: say what was asked for
        raise ValueError(f"{repo_id!r} is not a local folder and could not be fetched from the Hugging Face hub "
                         f"({type(e).__name__}: {e})") from e


def load_weights(folder):
    """The state dict of an HF folder: model.safetensors or pytorch_model.bin, whole or in shards listed by an
    .index.json. A .bin file is a pickle: loaded with weights_only=True, which reads tensors and plain containers
    only, never code."""
    for name in WEIGHTS:
        index = os.path.join(folder, name + ".index.json")
        if os.path.exists(os.path.join(folder, name)):
            files = [name]
        elif os.path.exists(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, no weight_map, not a dict
                raise ValueError(f"{index}: not a shard index (a JSON object with a weight_map of tensor -> file): "
                                 f"{type(e).__name__}: {e}") from None
        else:
            continue
        sd = {}
        for file in files:
            sd.update(load_file(os.path.join(folder, file)))
        return sd
    raise ValueError(f"{folder}: no model.safetensors or pytorch_model.bin (nor shards of either with their "
                     f".index.json); the folder holds {sorted(os.listdir(folder))[:10]}")


def load_file(path):
    """One weights file's tensors: safetensors, or a PyTorch pickle read with weights_only=True."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file as load_safetensors
            return load_safetensors(path)
        # mmap: read as used, not copied into memory by every rank at once (old non-zip files cannot be mapped)
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:  # torch's message advises loading it unsafely: not advice to pass on
        raise ValueError(f"{path}: holds Python objects other than tensors; not loaded, as that could run code from "
                         f"the file") from e
    except Exception as e:  # a missing shard, a file cut short, ...
        message = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {message})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict (a dict of names -> tensors)")
    return sd
