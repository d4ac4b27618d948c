"""Tokenize a dataset once into <data_dir>/<name>-<tokenizer>/{train,val}.bin + meta.json.

    python scripts/prepare_data.py --dataset stdlib --tokenizer bytes
    python scripts/prepare_data.py --dataset wikitext-103            # needs the hub
    python scripts/prepare_data.py --dataset path/to/texts/ --tokenizer gpt2

The trainer does the same on first use; this is for preparing ahead of a cluster job. It prepares
again over an existing folder, unless another process was preparing the same one at the same time
(then it waits for that one and keeps its result).
"""
import argparse
import json
import os

from mupgpt.config import tokenizer_names
from mupgpt.data import (
    check_data_dir,
    dataset_slug,
    load_documents,
    open_prepared,
    prepare,
    preparing,
    resolve_tokenizer,
    source_of,
)
from mupgpt.errors import UsageError, exit_on_usage_error


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="stdlib",
                   help="stdlib, a hub dataset name, or a path to .txt/.jsonl/.parquet files")
    p.add_argument("--tokenizer", default="auto", choices=["auto", *tokenizer_names()],
                   help="as the trainer's --tokenizer: bytes, gpt2 or another tiktoken encoding; auto is gpt2 when its "
                   "files can be had, else bytes")
    p.add_argument("--data_dir", default="data", help="where prepared datasets go (the trainer's --data_dir)")
    p.add_argument("--num_proc", type=int, default=None,
                   help="tokenizer processes (default: up to 8 for large datasets)")
    args = p.parse_args()
    if args.num_proc is not None and args.num_proc < 1:
        raise UsageError(f"--num_proc must be at least 1, not {args.num_proc}: or leave it out")
    check_data_dir(args.data_dir)
    tokenizer = resolve_tokenizer(args.tokenizer,
                                  lambda tok: os.path.join(args.data_dir, f"{dataset_slug(args.dataset)}-{tok}"))
    out = os.path.join(args.data_dir, f"{dataset_slug(args.dataset)}-{tokenizer.name}")
    documents = load_documents(args.dataset)  # bad input is refused before anything is written
    with preparing(out) as waited:
        if waited and os.path.exists(os.path.join(out, "meta.json")):
            meta = open_prepared(out, tokenizer, source_of(args.dataset)).meta
            print(f"{out} was prepared by the process this one waited for")
        else:
            meta = prepare(args.dataset, tokenizer, out, args.num_proc, documents)
    print(json.dumps({"path": out, **meta}, indent=2))


if __name__ == "__main__":
    exit_on_usage_error(main)
