"""Preparation into memmap files, and batches as a pure function of (seed, step, rank)."""
import json
import os

import numpy as np
import pytest
import torch

from mupgpt.data import (Batches, ByteTokenizer, get_tokenizer, open_prepared, prepare, stdlib_documents,
                         window_starts)
from mupgpt.errors import UsageError


def test_prepared_text_files_round_trip(tmp_path, corpus):
    meta = prepare(str(corpus), ByteTokenizer(), str(tmp_path / "p"))
    data = open_prepared(str(tmp_path / "p"), ByteTokenizer())
    assert meta["dtype"] == "uint16" and meta["train_documents"] + meta["val_documents"] == 30
    assert meta["val_documents"] >= 1 and not os.path.exists(tmp_path / "p.tmp")
    # documents are joined by end-of-text with no padding: one eot per document, the text intact
    assert int((data.train == 256).sum()) == meta["train_documents"]
    first = data.train[: int(np.argmax(data.train == 256))]
    assert ByteTokenizer().decode(first.tolist()) == (corpus / "doc00.txt").read_text()
    assert len(data.train) + len(data.val) == sum(len(f.read_bytes()) + 1 for f in corpus.iterdir())


def test_jsonl_and_parquet_give_the_same_tokens_as_text(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [f.read_text() for f in sorted(corpus.iterdir())]
    (tmp_path / "j").mkdir()
    with open(tmp_path / "j" / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    (tmp_path / "q").mkdir()
    pq.write_table(pa.table({"text": texts}), tmp_path / "q" / "docs.parquet")
    ref = open_prepared(prepare(str(corpus), ByteTokenizer(), str(tmp_path / "t")) and str(tmp_path / "t"))
    for src in ("j", "q"):
        prepare(str(tmp_path / src), ByteTokenizer(), str(tmp_path / f"{src}-out"))
        got = open_prepared(str(tmp_path / f"{src}-out"))
        assert np.array_equal(got.train, ref.train) and np.array_equal(got.val, ref.val), src


def test_stdlib_corpus_is_real_text_from_this_python():
    docs = stdlib_documents()
    assert len(docs) > 50 and sum(map(len, docs)) > 1_000_000
    assert any("def " in d for d in docs)


def make_batches(data, rank, world, seed=0, micro=2, global_batch=8):
    return Batches(data, 16, global_batch, micro, rank, world, seed, torch.device("cpu"))


def rows(batches, step):
    return [tuple(r.tolist()) for x, _ in batches.train(step) for r in x]


def test_batches_are_a_pure_function_of_seed_and_step(data_dir):
    data = open_prepared(str(next(data_dir.iterdir())))
    a, b = make_batches(data, 0, 1), make_batches(data, 0, 1)
    assert rows(a, 7) == rows(b, 7)
    assert rows(a, 7) != rows(a, 8)
    assert rows(a, 7) != rows(make_batches(data, 0, 1, seed=1), 7)
    x, y = a.train(3)[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token


def test_ranks_get_disjoint_slices_of_the_same_global_batch(data_dir):
    data = open_prepared(str(next(data_dir.iterdir())))
    single = rows(make_batches(data, 0, 1), 5)
    r0, r1 = rows(make_batches(data, 0, 2), 5), rows(make_batches(data, 1, 2), 5)
    assert len(r0) == len(r1) == 4 and r0 + r1 == single
    starts = window_starts(len(data.train), 16, 8, 0, 5)
    assert len(set(starts)) == 8 and np.all(np.diff(np.sort(starts)) >= 17)  # windows do not overlap


def test_open_prepared_errors_name_the_fix(tmp_path, data_dir):
    with pytest.raises(UsageError, match="meta.json missing"):
        open_prepared(str(tmp_path / "nothing"))
    src = next(data_dir.iterdir())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text((src / "meta.json").read_text())
    with pytest.raises(UsageError, match="train.bin is missing"):
        open_prepared(str(broken))
    meta = json.loads((src / "meta.json").read_text())
    meta["tokenizer"], meta["vocab_size"] = "gpt2", 50257
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="--tokenizer gpt2"):
        open_prepared(str(broken), ByteTokenizer())


def test_gpt2_tokenizer_loads_or_names_the_alternative():
    try:
        tok = get_tokenizer("gpt2")
    except UsageError as e:  # no network and no cached BPE files, as on CI
        assert "--tokenizer bytes" in str(e)
    else:
        assert tok.decode(tok.encode("hello world")) == "hello world" and tok.vocab_size == 50257
