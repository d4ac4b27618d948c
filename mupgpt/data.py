"""Text in, token windows out: tokenizers, one-time preparation into memmap files, and batches.

A prepared dataset is a folder with train.bin and val.bin (flat uint16, or uint32 when the vocabulary
needs it; documents joined by an end-of-text token, no padding) and meta.json. Batches are random
contiguous windows drawn as a pure function of (seed, step), so a resumed run sees the batches it
would have seen, and a global batch is the same whatever the world size; each rank takes its own
disjoint slice of it.
"""
import glob
import json
import os
import re
import shutil
import sysconfig
from dataclasses import dataclass

import numpy as np
import torch

from mupgpt.errors import UsageError

HUB_ALIASES = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "openwebtext": ("Skylion007/openwebtext", None),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
VAL_EVERY = 20  # without a validation split, every 20th document is held out


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus an end-of-text token 256. Needs no files."""

    name, vocab_size, eot = "bytes", 257, 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    def __init__(self, encoding):
        self.enc = encoding
        self.name, self.vocab_size, self.eot = encoding.name, encoding.n_vocab, encoding.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([i for i in ids if i < self.vocab_size])


def get_tokenizer(name):
    if name == "bytes":
        return ByteTokenizer()
    if name != "gpt2":
        raise UsageError(f"unknown tokenizer {name!r}: use gpt2 or bytes")
    import tiktoken
    try:
        return TiktokenTokenizer(tiktoken.get_encoding("gpt2"))
    except Exception as e:
        raise UsageError(f"could not load tiktoken's gpt2 files ({type(e).__name__}; no network?): "
                         "use --tokenizer bytes, or point TIKTOKEN_CACHE_DIR at a folder that has them") from None


def resolve_tokenizer(name, dataset_dir):
    """auto: the tokenizer the data was prepared with if it exists, else gpt2 when loadable, else bytes."""
    if name != "auto":
        return get_tokenizer(name)
    for tok in ("gpt2", "bytes"):
        if os.path.exists(os.path.join(dataset_dir(tok), "meta.json")):
            return get_tokenizer(tok)
    try:
        return get_tokenizer("gpt2")
    except UsageError:
        print("note: tiktoken's gpt2 files can't be had here; using the byte-level tokenizer (--tokenizer bytes)")
        return get_tokenizer("bytes")


def dataset_slug(dataset):
    if dataset == "stdlib" or dataset in HUB_ALIASES:
        return dataset
    return re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.abspath(dataset) if os.path.exists(dataset) else dataset).strip("_")


def stdlib_documents():
    """The running Python's top-level standard-library modules: real text every Python machine has."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise UsageError("no standard-library sources found for --dataset stdlib: use a path or a hub dataset")
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


def load_documents(dataset):
    """-> (train, val) datasets.Dataset with a 'text' column, and a description of the source."""
    import datasets

    if dataset == "stdlib":
        docs = stdlib_documents()
        ds = datasets.Dataset.from_dict({"text": docs})
        return _split(ds), f"python-stdlib-{sysconfig.get_python_version()}"
    if os.path.exists(dataset):
        files = sorted(glob.glob(os.path.join(dataset, "**", "*"), recursive=True)) if os.path.isdir(dataset) else [dataset]
        files = [f for f in files if os.path.splitext(f)[1] in LOCAL_SUFFIXES]
        if not files:
            raise UsageError(f"no .txt, .jsonl or .parquet files in {dataset}: point --dataset at text files")
        kinds = {LOCAL_SUFFIXES[os.path.splitext(f)[1]] for f in files}
        if len(kinds) > 1:
            raise UsageError(f"{dataset} mixes file types {sorted(kinds)}: prepare one type at a time")
        kind = kinds.pop()
        kw = {"sample_by": "document"} if kind == "text" else {}
        ds = datasets.load_dataset(kind, data_files=files, split="train", **kw)
        if "text" not in ds.column_names:
            raise UsageError(f"{dataset} has no 'text' field (columns: {ds.column_names}): name the text column 'text'")
        return _split(ds.select_columns(["text"])), os.path.abspath(dataset)
    if dataset.startswith(("/", ".", "~")) or os.sep in dataset and not re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", dataset):
        raise UsageError(f"no such file or folder: {dataset}: give a path to text files, 'stdlib', or a hub dataset name")
    name, config = HUB_ALIASES.get(dataset, (dataset.split(":")[0], dataset.split(":")[1] if ":" in dataset else None))
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise UsageError(f"unknown dataset {dataset!r}: give 'stdlib', a path to text files, or a hub dataset name")
    try:
        splits = datasets.load_dataset(name, config)
    except Exception as e:
        raise UsageError(f"could not load dataset {dataset!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}): "
                         "check the name, the network, or use --dataset stdlib or a local path") from None
    train = splits["train"].select_columns(["text"])
    if "validation" in splits:
        return (train, splits["validation"].select_columns(["text"])), f"hub:{name}" + (f":{config}" if config else "")
    return _split(train), f"hub:{name}" + (f":{config}" if config else "")


def _split(ds):
    idx = np.arange(len(ds))
    val = idx[idx % VAL_EVERY == VAL_EVERY // 2]
    if len(val) == 0:
        raise UsageError(f"the dataset has only {len(ds)} document(s): give at least {VAL_EVERY // 2 + 1} so some can be held out for validation")
    return ds.select(np.setdiff1d(idx, val)), ds.select(val)


def write_tokens(ds, tokenizer, path, num_proc):
    """Tokenize a 'text' dataset into one flat file, each document followed by end-of-text."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    def encode(batch):
        ids = [tokenizer.encode(t) + [tokenizer.eot] for t in batch["text"]]
        return {"ids": ids, "len": [len(i) for i in ids]}

    tok = ds.map(encode, batched=True, remove_columns=["text"], num_proc=num_proc,
                 desc=f"tokenizing {os.path.basename(path)}")
    total = int(np.sum(tok["len"], dtype=np.int64))
    out = np.memmap(path, dtype=dtype, mode="w+", shape=(max(total, 1),))
    pos = 0
    for batch in tok.select_columns(["ids"]).iter(batch_size=1024):
        for ids in batch["ids"]:
            out[pos:pos + len(ids)] = ids
            pos += len(ids)
    out.flush()
    return total, dtype


def prepare(dataset, tokenizer, out_dir, num_proc=None):
    """Tokenize `dataset` once into out_dir/{train,val}.bin + meta.json, written atomically."""
    (train, val), source = load_documents(dataset)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    procs = num_proc if num_proc else (min(8, os.cpu_count() or 1) if len(train) > 10000 else None)
    n_train, dtype = write_tokens(train, tokenizer, os.path.join(tmp, "train.bin"), procs)
    n_val, _ = write_tokens(val, tokenizer, os.path.join(tmp, "val.bin"), None)
    meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot": tokenizer.eot,
            "dtype": np.dtype(dtype).name, "train_tokens": n_train, "val_tokens": n_val,
            "train_documents": len(train), "val_documents": len(val), "source": source}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return meta


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    meta: dict
    path: str

    @property
    def vocab_size(self):
        return self.meta["vocab_size"]


def open_prepared(path, tokenizer=None):
    """Open a prepared folder; the one-line errors say what is wrong and how to fix it."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        raise UsageError(f"no prepared data at {path} (meta.json missing): run scripts/prepare_data.py or drop --data_dir")
    try:
        meta = json.load(open(meta_path))
    except (OSError, ValueError):
        raise UsageError(f"{meta_path} is unreadable: delete {path} and it will be prepared again") from None
    if tokenizer is not None and (meta.get("tokenizer") != tokenizer.name or meta.get("vocab_size") != tokenizer.vocab_size):
        raise UsageError(f"{path} was prepared with tokenizer {meta.get('tokenizer')} (vocab {meta.get('vocab_size')}), "
                         f"not {tokenizer.name} (vocab {tokenizer.vocab_size}): pass --tokenizer {meta.get('tokenizer')} or prepare again")
    arrays = []
    for split in ("train", "val"):
        f = os.path.join(path, f"{split}.bin")
        if not os.path.exists(f):
            raise UsageError(f"{f} is missing: delete {path} and it will be prepared again")
        arr = np.memmap(f, dtype=np.dtype(meta["dtype"]), mode="r")
        if len(arr) < meta[f"{split}_tokens"]:
            raise UsageError(f"{f} is truncated ({len(arr)} of {meta[f'{split}_tokens']} tokens): delete {path} and prepare again")
        arrays.append(arr[: meta[f"{split}_tokens"]])
    return TokenData(arrays[0], arrays[1], meta, path)


def load_data(dataset, tokenizer_name, data_dir, is_main=True, barrier=lambda: None):
    """Prepare on first use (rank 0 only; others wait at the barrier), then open the memmaps."""
    def dataset_dir(tok):
        return os.path.join(data_dir, f"{dataset_slug(dataset)}-{tok}")
    tokenizer = resolve_tokenizer(tokenizer_name, dataset_dir)
    path = dataset_dir(tokenizer.name)
    if is_main and not os.path.exists(os.path.join(path, "meta.json")):
        print(f"preparing {dataset} with the {tokenizer.name} tokenizer into {path}", flush=True)
        prepare(dataset, tokenizer, path)
    barrier()
    return open_prepared(path, tokenizer), tokenizer


def window_starts(num_tokens, seq_len, batch, seed, step):
    """`batch` disjoint windows of seq_len + 1 tokens: a pure function of (seed, step)."""
    span = seq_len + 1
    rng = np.random.default_rng([seed, step])
    offset = int(rng.integers(0, span)) if num_tokens >= 2 * span else 0
    slots = (num_tokens - offset) // span
    if slots < 1:
        raise UsageError(f"only {num_tokens} tokens, fewer than one window of {span}: use a smaller --seq_len or more data")
    idx = rng.choice(slots, size=batch, replace=batch > slots)
    return offset + idx.astype(np.int64) * span


def get_batch(tokens, seq_len, starts, device):
    """(x, y) int64 tensors of shape (len(starts), seq_len), on `device`."""
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    xy = torch.from_numpy(rows)
    if device.type == "cuda":
        xy = xy.pin_memory().to(device, non_blocking=True)
    return xy[:, :-1], xy[:, 1:]


class Batches:
    """Micro batches for one rank: step -> [(x, y)] * accumulation, a slice of the global batch."""

    def __init__(self, data, seq_len, global_batch, micro_batch, rank, world, seed, device):
        self.data, self.seq_len, self.global_batch = data, seq_len, global_batch
        self.micro, self.rank, self.world, self.seed, self.device = micro_batch, rank, world, seed, device
        self.accum = global_batch // (micro_batch * world)

    def train(self, step):
        starts = window_starts(len(self.data.train), self.seq_len, self.global_batch, self.seed, step)
        mine = starts[self.rank * self.accum * self.micro:(self.rank + 1) * self.accum * self.micro]
        return [get_batch(self.data.train, self.seq_len, mine[i * self.micro:(i + 1) * self.micro], self.device)
                for i in range(self.accum)]

    def val(self, i):
        """The i-th validation batch: the same windows at every evaluation; ranks split them."""
        starts = window_starts(len(self.data.val), self.seq_len, self.micro * self.world, self.seed + 1_000_003, i)
        return get_batch(self.data.val, self.seq_len, starts[self.rank * self.micro:(self.rank + 1) * self.micro], self.device)
