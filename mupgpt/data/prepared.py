"""The prepared folder: where one may be written, and opening one with every way it can be wrong named."""
import json
import os
from dataclasses import dataclass

import numpy as np

from mupgpt.errors import UsageError


def check_data_dir(data_dir):
    """Refuse a --data_dir that is a file or can't be written, before anything is made."""
    d = os.path.abspath(data_dir)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UsageError(f"--data_dir {data_dir}: {d} is a file, not a folder: give a folder path")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UsageError(f"--data_dir {data_dir}: {d} is not writable: give a folder you can write to")



@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    meta: dict
    path: str

    @property
    def vocab_size(self):
        return self.meta["vocab_size"]


META_TYPES = {"tokenizer": str, "vocab_size": int, "eot": int, "dtype": str, "train_tokens": int, "val_tokens": int,
              "source": str}
# up to this many tokens a split's largest token is checked in full; above it, a sample of chunks, so that
# opening a large dataset does not read all of it on every start
FULL_CHECK_TOKENS = 2**30


def check_meta(meta):
    """-> what is wrong with a prepared meta.json's contents, or None."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    for key, kind in META_TYPES.items():
        if key not in meta:
            return f"no {key!r}"
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            return f"{key!r} is {meta[key]!r}, not {'a string' if kind is str else 'an integer'}"
    if meta["dtype"] not in ("uint16", "uint32"):
        return f"dtype {meta['dtype']!r} is not uint16 or uint32"
    if not 0 < meta["vocab_size"] <= np.iinfo(meta["dtype"]).max + 1 or not 0 <= meta["eot"] < meta["vocab_size"]:
        return f"vocab_size {meta['vocab_size']} and eot {meta['eot']} do not fit {meta['dtype']}"
    if meta["train_tokens"] < 0 or meta["val_tokens"] < 0:
        return "a negative token count"
    return None


def max_token(arr):
    if len(arr) <= FULL_CHECK_TOKENS:
        return int(arr.max())
    chunk, n = 1 << 20, 256  # evenly spaced chunks, the first and the last among them
    starts = np.linspace(0, len(arr) - chunk, n).astype(np.int64)
    return max(int(arr[s:s + chunk].max()) for s in starts)


def open_prepared(path, tokenizer=None, source=None):
    """Open a prepared folder; the one-line errors say what is wrong and how to fix it. With `source`
    (source_of(dataset)), a folder prepared from anything else is refused."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise UsageError(f"no prepared data at {path} (meta.json missing): run scripts/prepare_data.py or drop "
                         "--data_dir")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"{meta_path} is unreadable: delete {path} and it will be prepared again") from None
    problem = check_meta(meta)
    if problem:
        raise UsageError(f"{meta_path} is not a prepared dataset's ({problem}): delete {path} and it will be prepared "
                         "again")
    if source is not None and meta["source"] != source:
        raise UsageError(f"{path} was prepared from {meta['source']}, not {source}: delete it or use another "
                         "--data_dir")
    if tokenizer is not None and (meta["tokenizer"], meta["vocab_size"]) != (tokenizer.name, tokenizer.vocab_size):
        raise UsageError(f"{path} was prepared with tokenizer {meta.get('tokenizer')} (vocab "
                         f"{meta.get('vocab_size')}), "
                         f"not {tokenizer.name} (vocab {tokenizer.vocab_size}): pass --tokenizer "
                         f"{meta.get('tokenizer')} or prepare again")
    arrays = []
    for split in ("train", "val"):
        f = os.path.join(path, f"{split}.bin")
        if not os.path.exists(f):
            raise UsageError(f"{f} is missing: delete {path} and it will be prepared again")
        n, have = meta[f"{split}_tokens"], os.path.getsize(f) // np.dtype(meta["dtype"]).itemsize
        if have < n:
            raise UsageError(f"{f} is truncated ({have} of {n} tokens): delete {path} and prepare again")
        if n == 0:
            raise UsageError(f"{f} holds no tokens: prepare {path} again from a dataset with text in it")
        arr = np.memmap(f, dtype=np.dtype(meta["dtype"]), mode="r")[:n]
        top = max_token(arr)
        if top >= meta["vocab_size"]:
            raise UsageError(f"{f} holds token {top}, outside the vocabulary of {meta['vocab_size']} in meta.json: "
                             f"delete {path} and prepare again")
        arrays.append(arr)
    return TokenData(arrays[0], arrays[1], meta, path)

