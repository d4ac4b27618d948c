"""Text in, token windows out: tokenizers, one-time preparation into memmap files, and batches.

A prepared dataset is a folder with train.bin and val.bin (flat uint16, or uint32 when the vocabulary
needs it; documents joined by an end-of-text token, no padding) and meta.json. Batches are random
contiguous windows drawn as a pure function of (seed, step), so a resumed run sees the batches it
would have seen, and a global batch is the same whatever the world size; each rank takes its own
disjoint slice of it.

    tokenizers.py  the byte-level tokenizer and tiktoken's encodings
    files.py       a local dataset's files: which are read, their checks, their fingerprint
    sources.py     documents from the standard library, local files or the hub; folder names
    prepare.py     tokenizing once into a prepared folder (load_data: prepare on first use, then open)
    lock.py        the lock around preparing, and clean-up after a killed preparation
    prepared.py    where a prepared folder may go, and opening one checked
    batches.py     windows and micro batches per rank
"""
from mupgpt.data.batches import Batches, get_batch, window_starts
from mupgpt.data.files import (
           LOCAL_SUFFIXES,
           check_json_records,
           check_local_file,
           check_parquet,
           check_utf8,
           fingerprint,
           local_files,
           suffix,
)
from mupgpt.data.lock import clear_stale, owner, preparing
from mupgpt.data.prepare import changed_since, load_data, prepare, write_tokens
from mupgpt.data.prepared import (
           FULL_CHECK_TOKENS,
           META_TYPES,
           TokenData,
           check_data_dir,
           check_meta,
           max_token,
           open_prepared,
)
from mupgpt.data.sources import (
           HUB_ALIASES,
           HUB_TIMEOUT,
           VAL_EVERY,
           Documents,
           dataset_slug,
           hub_offline,
           hub_reachable,
           load_documents,
           source_of,
           stdlib_documents,
)
from mupgpt.data.tokenizers import ByteTokenizer, TiktokenTokenizer, get_tokenizer, resolve_tokenizer

__all__ = ["Batches", "get_batch", "window_starts", "LOCAL_SUFFIXES", "check_json_records", "check_local_file",
           "check_parquet", "check_utf8", "fingerprint", "local_files", "suffix", "clear_stale", "owner", "preparing",
           "changed_since", "load_data", "prepare", "write_tokens", "FULL_CHECK_TOKENS", "META_TYPES", "TokenData",
           "check_data_dir", "check_meta", "max_token", "open_prepared", "HUB_ALIASES", "HUB_TIMEOUT", "VAL_EVERY",
           "Documents", "dataset_slug", "hub_offline", "hub_reachable", "load_documents", "source_of",
           "stdlib_documents", "ByteTokenizer", "TiktokenTokenizer", "get_tokenizer", "resolve_tokenizer"]
