"""Preparation: documents tokenized once into train.bin, val.bin and meta.json, again when the source changes."""
import errno
import json
import os
import secrets
import shutil

import numpy as np
from tqdm import tqdm

from mupgpt.data.files import fingerprint
from mupgpt.data.lock import owner, preparing
from mupgpt.data.prepared import check_data_dir, open_prepared
from mupgpt.data.sources import dataset_slug, load_documents, source_of
from mupgpt.data.tokenizers import resolve_tokenizer
from mupgpt.errors import UsageError


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
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"writing {os.path.basename(path)}") as bar:
        for batch in tok.select_columns(["ids"]).iter(batch_size=1024):
            start = pos
            for ids in batch["ids"]:
                out[pos:pos + len(ids)] = ids
                pos += len(ids)
            bar.update(pos - start)
    out.flush()
    return total, dtype


def prepare(dataset, tokenizer, out_dir, num_proc=None, documents=None):
    """Tokenize `dataset` once into out_dir/{train,val}.bin + meta.json. Written into a folder of this
    process's own and renamed into place, so processes preparing the same folder at once (a sweep, the
    nodes of a job on a shared filesystem) never see each other's half-written files."""
    if num_proc is not None and num_proc < 1:
        raise UsageError(f"--num_proc must be at least 1, not {num_proc}: or leave it out")
    documents = documents or load_documents(dataset)
    (train, val), source = documents
    tmp = f"{out_dir}.tmp-{owner()}-{secrets.token_hex(4)}"
    os.makedirs(tmp)
    try:
        procs = num_proc if num_proc else (min(8, os.cpu_count() or 1) if len(train) > 10000 else None)
        n_train, dtype = write_tokens(train, tokenizer, os.path.join(tmp, "train.bin"), procs)
        n_val, _ = write_tokens(val, tokenizer, os.path.join(tmp, "val.bin"), None)
        meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot": tokenizer.eot,
                "dtype": np.dtype(dtype).name, "train_tokens": n_train, "val_tokens": n_val,
                "train_documents": len(train), "val_documents": len(val), "source": source}
        if getattr(documents, "fingerprint", None):
            meta["fingerprint"] = documents.fingerprint
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        old = f"{out_dir}.old-{owner()}-{secrets.token_hex(4)}"
        try:
            os.rename(out_dir, old)
        except FileNotFoundError:
            old = None
        try:
            os.rename(tmp, out_dir)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                if old:
                    os.rename(old, out_dir)
                raise
            print(f"note: another process prepared {out_dir} meanwhile; keeping its copy", flush=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta



def load_data(dataset, tokenizer_name, data_dir, is_main=True, together=lambda work: work()):
    """Prepare on first use (rank 0 only), then open the memmaps. together is World.together: the other
    ranks wait for rank 0's preparation and stop with its error line if it fails."""
    def dataset_dir(tok):
        return os.path.join(data_dir, f"{dataset_slug(dataset)}-{tok}")
    tokenizer = resolve_tokenizer(tokenizer_name, dataset_dir)
    path = dataset_dir(tokenizer.name)
    together(lambda: prepare_if_needed(dataset, tokenizer, data_dir, path) if is_main else None)
    return open_prepared(path, tokenizer, source_of(dataset)), tokenizer


def prepare_if_needed(dataset, tokenizer, data_dir, path):
    """Prepare the dataset into path unless it is there already, prepared from the files as they are."""
    if os.path.exists(os.path.join(path, "meta.json")) and not changed_since(path, dataset):
        return
    check_data_dir(data_dir)
    documents = load_documents(dataset)  # bad input is refused before anything is written
    with preparing(path):
        if not os.path.exists(os.path.join(path, "meta.json")):
            print(f"preparing {dataset} with the {tokenizer.name} tokenizer into {path}", flush=True)
            prepare(dataset, tokenizer, path, documents=documents)
        elif changed_since(path, dataset):
            print(f"{dataset} changed since it was prepared (files added, removed or modified): preparing it "
                  f"again with the {tokenizer.name} tokenizer into {path}", flush=True)
            prepare(dataset, tokenizer, path, documents=documents)


def changed_since(path, dataset):
    """Whether a local dataset's files differ from those `path` was prepared from (a folder prepared before
    fingerprints were recorded counts as changed: it is prepared once more)."""
    now = fingerprint(dataset)
    if now is None:
        return False
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False  # open_prepared names what is wrong with it
    if not isinstance(meta, dict) or meta.get("source") != source_of(dataset):
        return False  # another source's folder is refused by open_prepared, never prepared over
    return meta.get("fingerprint") != now

