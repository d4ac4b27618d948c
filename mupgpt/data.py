"""Text in, token windows out: tokenizers, one-time preparation into memmap files, and batches.

A prepared dataset is a folder with train.bin and val.bin (flat uint16, or uint32 when the vocabulary
needs it; documents joined by an end-of-text token, no padding) and meta.json. Batches are random
contiguous windows drawn as a pure function of (seed, step), so a resumed run sees the batches it
would have seen, and a global batch is the same whatever the world size; each rank takes its own
disjoint slice of it.
"""
import codecs
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sysconfig
import threading
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from mupgpt.config import tokenizer_names
from mupgpt.errors import UsageError, did_you_mean

HUB_ALIASES = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "openwebtext": ("Skylion007/openwebtext", None),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HUB_TIMEOUT = 3  # seconds to wait for the hub's host to answer
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
        try:
            return self.enc.decode(ids)
        except KeyError:  # an id in a gap of the vocabulary (cl100k_base, o200k_base have some) or the padding
            return self.enc.decode([i for i in ids if self._known(i)])

    def _known(self, i):
        try:
            self.enc.decode_single_token_bytes(i)
            return True
        except (KeyError, OverflowError):
            return False


def get_tokenizer(name):
    """bytes, or any encoding tiktoken knows (its files are downloaded once into tiktoken's cache)."""
    if name == "bytes":
        return ByteTokenizer()
    names = tokenizer_names()
    if name not in names:
        raise UsageError(f"unknown tokenizer {name!r}{did_you_mean(name, names)}: "
                         f"use one of {', '.join(names)}")
    import tiktoken
    try:
        enc = tiktoken.get_encoding(name)
    except Exception as e:
        raise UsageError(f"could not load tiktoken's {name} files ({type(e).__name__}; no network?): "
                         "use --tokenizer bytes, or point TIKTOKEN_CACHE_DIR at a folder that has them") from None
    if "<|endoftext|>" not in enc.special_tokens_set:
        raise UsageError(f"tiktoken's {name} has no <|endoftext|> token to end documents with: use another --tokenizer")
    return TiktokenTokenizer(enc)


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
    """The prepared folder's name: 'stdlib' and the hub aliases as they are; anything else a readable part
    and a hash of the absolute path (or hub name), so that '/x/a b' and '/x/a_b' get different folders."""
    if dataset == "stdlib" or dataset in HUB_ALIASES:
        return dataset
    key = os.path.abspath(dataset) if os.path.exists(dataset) else dataset
    readable = os.path.basename(key.rstrip(os.sep)) if os.path.exists(dataset) else key
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("_.")[:40] or "data"
    return f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def _hub_name(dataset):
    name, config = HUB_ALIASES.get(dataset, (dataset.split(":")[0], dataset.split(":")[1] if ":" in dataset else None))
    return name, config, f"hub:{name}" + (f":{config}" if config else "")


def source_of(dataset):
    """What meta.json's 'source' says for `dataset`, known without loading it."""
    if dataset == "stdlib":
        return f"python-stdlib-{sysconfig.get_python_version()}"
    if os.path.exists(dataset):
        return os.path.abspath(dataset)
    return _hub_name(dataset)[2]


def stdlib_documents():
    """The running Python's top-level standard-library modules: real text every Python machine has."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    if not files:
        raise UsageError("no standard-library sources found for --dataset stdlib: use a path or a hub dataset")
    return [open(f, encoding="utf-8", errors="replace").read() for f in files]


def check_parquet(f):
    """A readable parquet file with a string 'text' column and no nulls in it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(f)
    except Exception as e:
        raise UsageError(f"{f} is not a readable parquet file ({type(e).__name__}): fix it or move it out of the dataset") from None
    schema = pf.schema_arrow
    if "text" not in schema.names or not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
        raise UsageError(f"{f} has no string 'text' column (columns: {schema.names}): name the text column 'text'")
    col, md = schema.get_field_index("text"), pf.metadata
    for g in range(md.num_row_groups):
        stats = md.row_group(g).column(col).statistics
        if stats is not None and stats.has_null_count and stats.null_count:
            raise UsageError(f"{f} has {stats.null_count} empty (null) 'text' values in row group {g}: drop or fill them")


def check_utf8(f):
    """UTF-8 text throughout (binary and UTF-16 files have NUL bytes or fail to decode), read in chunks."""
    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    try:
        fh = open(f, "rb")
    except OSError as e:
        raise UsageError(f"{f} can't be read ({e.strerror}): fix it or move it out of the dataset") from None
    with fh:
        while chunk := fh.read(1 << 20):
            if b"\0" in chunk:
                line += chunk[:chunk.index(b"\0")].count(b"\n")
                raise UsageError(f"{f} is not UTF-8 text (a NUL byte on line {line}: binary or UTF-16?): convert it to UTF-8 or move it out of the dataset")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line += chunk[:e.start].count(b"\n")
                raise UsageError(f"{f} is not UTF-8 text (line {line} does not decode): convert it to UTF-8 or move it out of the dataset") from None
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UsageError(f"{f} is not UTF-8 text (it ends inside a character): convert it to UTF-8 or move it out of the dataset") from None


def check_json_records(f):
    """Every record (a JSON Lines line, or an element of one top-level array) an object with a 'text' string."""
    with open(f, encoding="utf-8") as fh:
        head = fh.read(4096).lstrip("\ufeff \t\r\n")[:1]
        fh.seek(0)
        if head == "[":  # a .json file holding one array of records
            try:
                records = list(enumerate(json.load(fh), 1))
            except ValueError as e:
                raise UsageError(f"{f} is not valid JSON ({e}): fix it or move it out of the dataset") from None
            where = "record"
        else:
            records, where = ((n, line) for n, line in enumerate(fh, 1) if line.strip()), "line"
        for n, rec in records:
            if where == "line":
                try:
                    rec = json.loads(rec)
                except ValueError:
                    raise UsageError(f"{f} line {n} is not JSON: fix or delete that line (JSON Lines: one object per line)") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UsageError(f"{f} {where} {n} is not an object with a 'text' string: give every record a 'text' field")


def check_local_file(f, kind):
    """Refuse, naming the file, what the loaders would crash on half-way."""
    if kind == "parquet":
        return check_parquet(f)
    check_utf8(f)
    if kind == "json":
        check_json_records(f)


def suffix(path):
    return os.path.splitext(path)[1].lower()


def local_files(dataset):
    """-> (data files, fingerprint, other files) of a local dataset. Each file counts once, by its real path, and each
    folder is walked once (a link back up the tree, `again -> .`, would repeat every document and put validation
    documents into the training split). A data file that is not a regular file (a fifo would block the read for
    ever, a broken link or a socket cannot be read) or is empty is refused, naming it. The fingerprint (names,
    sizes, modification times) is recorded beside the prepared tokens: a changed source is prepared again."""
    def refuse(path, what):
        raise UsageError(f"{path} {what}: remove it from the dataset folder or fix it")

    def onerror(e):
        refuse(e.filename, f"can't be read ({e.strerror})")

    if os.path.isdir(dataset):
        names, seen_dirs = [], set()
        for root, dirs, found in os.walk(dataset, followlinks=True, onerror=onerror):
            real = os.path.realpath(root)
            if real in seen_dirs:
                dirs[:] = []
                continue
            seen_dirs.add(real)
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden entries are not data (.git, editor files)
            names += [os.path.join(root, f) for f in found if not f.startswith(".")]
    else:
        names = [dataset]
    files, others, seen, stamp = [], [], set(), hashlib.sha1()
    for path in sorted(names):
        if suffix(path) not in LOCAL_SUFFIXES:
            others.append(path)
            continue
        try:
            st = os.stat(path)
        except FileNotFoundError:
            refuse(path, "is a broken link")
        except OSError as e:
            refuse(path, f"can't be read ({e.strerror})")
        if not stat.S_ISREG(st.st_mode):
            refuse(path, "is not a regular file (a fifo, socket or device)")
        if os.path.realpath(path) in seen:
            continue
        if st.st_size == 0:
            refuse(path, "is empty")
        seen.add(os.path.realpath(path))
        files.append(path)
        stamp.update(f"{os.path.relpath(path, dataset)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return files, stamp.hexdigest(), others


def fingerprint(dataset):
    """What local_files says of a local dataset now; None for the stdlib and hub datasets."""
    if dataset == "stdlib" or not os.path.exists(dataset):
        return None
    try:
        return local_files(dataset)[1]
    except UsageError:
        return "unreadable"


class Documents(tuple):
    """load_documents' ((train, val), source), with the fingerprint of the files they were read from."""
    def __new__(cls, value, fingerprint=None):
        self = super().__new__(cls, value)
        self.fingerprint = fingerprint
        return self


def load_documents(dataset):
    """-> (train, val) datasets.Dataset with a 'text' column, and a description of the source."""
    import datasets

    if dataset == "stdlib":
        docs = stdlib_documents()
        ds = datasets.Dataset.from_dict({"text": docs})
        return _split(ds), source_of(dataset)
    if os.path.exists(dataset):
        files, stamp, others = local_files(dataset)
        if not files:
            raise UsageError(f"no .txt, .jsonl or .parquet files in {dataset}: point --dataset at text files")
        if others:
            print(f"note: {dataset}: {len(others)} file(s) that are not .txt, .jsonl, .json or .parquet are not read "
                  f"(e.g. {others[0]})", flush=True)
        kinds = {LOCAL_SUFFIXES[suffix(f)] for f in files}
        if len(kinds) > 1:
            raise UsageError(f"{dataset} mixes file types {sorted(kinds)}: prepare one type at a time")
        kind = kinds.pop()
        for f in files:
            check_local_file(f, kind)
        kw = {"sample_by": "document"} if kind == "text" else {}
        was_off = not datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # reading local files is quick; keep stderr for what matters
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train", **kw)
        finally:
            if not was_off:
                datasets.enable_progress_bars()
        if "text" not in ds.column_names:
            raise UsageError(f"{dataset} has no 'text' field (columns: {ds.column_names}): name the text column 'text'")
        return Documents((_split(ds.select_columns(["text"])), os.path.abspath(dataset)), stamp)
    if dataset.startswith(("/", ".", "~")) or os.sep in dataset and not re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", dataset):
        raise UsageError(f"no such file or folder: {dataset}: give a path to text files, 'stdlib', or a hub dataset name")
    name, config, source = _hub_name(dataset)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise UsageError(f"unknown dataset {dataset!r}: give 'stdlib', a path to text files, or a hub dataset name")
    if not hub_offline() and not hub_reachable():
        raise UsageError(f"the hub cannot be reached (no network?) for dataset {dataset!r}: use --dataset stdlib or a "
                         "local path (or set HF_HUB_OFFLINE=1 to load it from the datasets cache)")
    try:
        splits = datasets.load_dataset(name, config)
    except Exception as e:
        raise UsageError(f"could not load dataset {dataset!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}): "
                         "check the name, the network, or use --dataset stdlib or a local path") from None
    train = splits["train"].select_columns(["text"])
    if "validation" in splits:
        return (train, splits["validation"].select_columns(["text"])), source
    return _split(train), source


def hub_offline():
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout=HUB_TIMEOUT):
    """Whether the hub (HF_ENDPOINT, or huggingface.co), or the proxy in the way, takes a TCP connection
    within `timeout` seconds, name lookup included. Without this, datasets retries for about 30 s."""
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
    except ValueError:
        return True  # a malformed endpoint: let datasets say what is wrong with it
    answered = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            answered.append(True)
        except (OSError, UnicodeError):
            pass

    t = threading.Thread(target=probe, daemon=True)  # name lookup has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(answered)


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
    tmp = f"{out_dir}.tmp-{_owner()}-{secrets.token_hex(4)}"
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
        old = f"{out_dir}.old-{_owner()}-{secrets.token_hex(4)}"
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


def check_data_dir(data_dir):
    """Refuse a --data_dir that is a file or can't be written, before anything is made."""
    d = os.path.abspath(data_dir)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise UsageError(f"--data_dir {data_dir}: {d} is a file, not a folder: give a folder path")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UsageError(f"--data_dir {data_dir}: {d} is not writable: give a folder you can write to")


@contextmanager
def preparing(out_dir):
    """Hold out_dir.lock while preparing: a second process waits (and says so) rather than preparing the
    same folder again. Yields whether it waited. Where the filesystem has no locks, prepare()'s own
    folder and rename still keep the result whole."""
    check_data_dir(os.path.dirname(out_dir) or ".")
    try:
        os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    except OSError as e:
        raise UsageError(f"can't make the folder {os.path.dirname(out_dir)} ({e.strerror}): give another --data_dir") from None
    with open(out_dir + ".lock", "a") as f:
        waited = False
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing {out_dir} (it holds {out_dir}.lock)", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
            waited = True
        except OSError:
            yield waited  # no locks here (some network filesystems): another process's folders may be live
            return
        clear_stale(out_dir)
        yield waited


def _owner():
    """host-pid: what a later preparation checks before it removes a folder this one leaves."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _dead_here(folder, prefix):
    """Whether `folder` (PREFIX + HOST-PID-HEX) was made on this host by a process that has ended. A lock may
    be this host's alone (some network filesystems), so another host's folders are never judged."""
    parts = folder[len(prefix):].rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        pass
    return False


def clear_stale(out_dir):
    """With out_dir.lock held, a .tmp-* or .old-* folder of out_dir made on this host by an ended process is a
    killed preparation's: remove it (an .old-* is the previous copy, put back if it was not replaced)."""
    tmp, old = out_dir + ".tmp-", out_dir + ".old-"
    for folder in glob.glob(glob.escape(tmp) + "*"):
        if _dead_here(folder, tmp):
            shutil.rmtree(folder, ignore_errors=True)
            print(f"note: removed {folder}, left by a preparation that was killed", flush=True)
    olds = [f for f in glob.glob(glob.escape(old) + "*") if _dead_here(f, old)]
    for folder in sorted(olds, key=os.path.getmtime):
        if not os.path.exists(out_dir) and os.path.exists(os.path.join(folder, "meta.json")):
            os.rename(folder, out_dir)
            print(f"note: put back {out_dir} from {folder}, moved aside by a preparation that was killed", flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)


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
FULL_CHECK_TOKENS = 2**30  # np.max over a memmap in the page cache: 7 ms per 100M tokens; above this a sample


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
        raise UsageError(f"no prepared data at {path} (meta.json missing): run scripts/prepare_data.py or drop --data_dir")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise UsageError(f"{meta_path} is unreadable: delete {path} and it will be prepared again") from None
    problem = check_meta(meta)
    if problem:
        raise UsageError(f"{meta_path} is not a prepared dataset's ({problem}): delete {path} and it will be prepared again")
    if source is not None and meta["source"] != source:
        raise UsageError(f"{path} was prepared from {meta['source']}, not {source}: delete it or use another --data_dir")
    if tokenizer is not None and (meta.get("tokenizer") != tokenizer.name or meta.get("vocab_size") != tokenizer.vocab_size):
        raise UsageError(f"{path} was prepared with tokenizer {meta.get('tokenizer')} (vocab {meta.get('vocab_size')}), "
                         f"not {tokenizer.name} (vocab {tokenizer.vocab_size}): pass --tokenizer {meta.get('tokenizer')} or prepare again")
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


def load_data(dataset, tokenizer_name, data_dir, is_main=True, barrier=lambda: None):
    """Prepare on first use (rank 0 only; others wait at the barrier), then open the memmaps."""
    def dataset_dir(tok):
        return os.path.join(data_dir, f"{dataset_slug(dataset)}-{tok}")
    tokenizer = resolve_tokenizer(tokenizer_name, dataset_dir)
    path = dataset_dir(tokenizer.name)
    if is_main and (not os.path.exists(os.path.join(path, "meta.json")) or changed_since(path, dataset)):
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
    barrier()
    return open_prepared(path, tokenizer, source_of(dataset)), tokenizer


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
        for split, tokens in (("train", data.train), ("val", data.val)):
            if len(tokens) < seq_len + 1:
                raise UsageError(f"{data.path}'s {split} split has {len(tokens)} tokens, fewer than one window of "
                                 f"{seq_len + 1}: use a smaller --seq_len or more data")

    def train(self, step):
        starts = window_starts(len(self.data.train), self.seq_len, self.global_batch, self.seed, step)
        mine = starts[self.rank * self.accum * self.micro:(self.rank + 1) * self.accum * self.micro]
        return [get_batch(self.data.train, self.seq_len, mine[i * self.micro:(i + 1) * self.micro], self.device)
                for i in range(self.accum)]

    def val(self, i):
        """The i-th validation batch: the same windows at every evaluation; ranks split them."""
        starts = window_starts(len(self.data.val), self.seq_len, self.micro * self.world, self.seed + 1_000_003, i)
        return get_batch(self.data.val, self.seq_len, starts[self.rank * self.micro:(self.rank + 1) * self.micro], self.device)
