"""Where documents come from: the running Python's standard library, local files, or a hub dataset;
the prepared folder's name and the source it records; the validation split."""
import glob
import hashlib
import os
import re
import socket
import sysconfig
import threading
import urllib.parse
import urllib.request

import numpy as np

from mupgpt.data.files import LOCAL_SUFFIXES, check_local_file, local_files, suffix
from mupgpt.errors import UsageError

HUB_ALIASES = {
    "wikitext-103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "openwebtext": ("Skylion007/openwebtext", None),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
HUB_TIMEOUT = 3  # seconds to wait for the hub's host to answer
VAL_EVERY = 20  # without a validation split, every 20th document is held out


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
        return load_local(dataset)
    return load_hub(dataset)


def load_local(dataset):
    """A local file or folder's documents, every file checked first; the Documents carry its fingerprint."""
    import datasets

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


def load_hub(dataset):
    """A hub dataset's documents, refused at once when the hub cannot be reached (and not offline)."""
    import datasets

    hub_like = re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", dataset)
    if dataset.startswith(("/", ".", "~")) or os.sep in dataset and not hub_like:
        raise UsageError(f"no such file or folder: {dataset}: give a path to text files, 'stdlib', or a hub dataset "
                         "name")
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
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout=HUB_TIMEOUT):
    """Whether the hub (HF_ENDPOINT, or huggingface.co), or the proxy in the way, takes a TCP connection
    within `timeout` seconds, name lookup included: datasets itself retries for long before it fails."""
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
        raise UsageError(f"the dataset has only {len(ds)} document(s): give at least {VAL_EVERY // 2 + 1} so some can "
                         "be held out for validation")
    return ds.select(np.setdiff1d(idx, val)), ds.select(val)

