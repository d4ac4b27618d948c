"""Preparation into memmap files, and batches as a pure function of (seed, step, rank)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_one_error_line, run_cli, trainer_args
from mupgpt.data import (
    Batches,
    ByteTokenizer,
    dataset_slug,
    get_tokenizer,
    load_data,
    open_prepared,
    prepare,
    source_of,
    stdlib_documents,
    window_starts,
)
from mupgpt.errors import UsageError


def test_prepared_text_files_round_trip(tmp_path, corpus):
    meta = prepare(str(corpus), ByteTokenizer(), str(tmp_path / "p"))
    data = open_prepared(str(tmp_path / "p"), ByteTokenizer())
    assert meta["dtype"] == "uint16" and meta["train_documents"] + meta["val_documents"] == 30
    assert meta["val_documents"] >= 1 and os.listdir(tmp_path) == ["p"]
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


# Each process imports everything, says it is ready, and starts preparing when the test says go: so the
# two really prepare at once whatever the machine's load (the old shared .tmp folder crashed one of them).
AT_ONCE = """import os, runpy, sys, time
import datasets, torch
from mupgpt.data import ByteTokenizer, prepare
go, what, args = sys.argv[1], sys.argv[2], sys.argv[3:]
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
if what == "prepare":
    prepare(args[0], ByteTokenizer(), args[1])
else:
    sys.argv = [what, *args]
    runpy.run_path(what, run_name="__main__")
"""


@pytest.mark.parametrize("how", ["script", "prepare"])
def test_two_processes_preparing_the_same_folder_at_once_both_succeed(tmp_path, how):
    """'script': two prepare_data.py at once (one waits on the lock); 'prepare': two bare prepare() calls,
    no lock, each in its own temporary folder and renamed into place."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(60):
        (src / f"d{i:02d}.txt").write_text((f"document {i} says {i * 7} " * 1000)[:8000])
    out, go = tmp_path / "d", tmp_path / "go"
    if how == "script":
        args = [str(ROOT / "scripts/prepare_data.py"), "--dataset", str(src), "--tokenizer", "bytes", "--data_dir",
                str(out)]
        final = out / f"{dataset_slug(str(src))}-bytes"
    else:
        args, final = ["prepare", str(src), str(out / "p")], out / "p"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", AT_ONCE, str(go), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    while len(list(tmp_path.glob("go.ready-*"))) < 2 and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    for rc, _, err in results:
        assert rc == 0, err[-2000:]
    data = open_prepared(str(final), ByteTokenizer(), source_of(str(src)))
    assert len(data.train) + len(data.val) == sum(len(f.read_bytes()) + 1 for f in src.iterdir())
    lock = [final.name + ".lock"] if how == "script" else []
    assert sorted(p.name for p in out.iterdir()) == sorted([final.name] + lock)
    if how == "script":
        assert any("waiting for another process" in o for _, o, _ in results)


def test_paths_that_differ_only_in_punctuation_get_their_own_folders(tmp_path):
    texts = {"a b": "spaces and more spaces ", "a_b": "underscores_only_here "}
    for name, text in texts.items():
        (tmp_path / name).mkdir()
        for i in range(12):
            (tmp_path / name / f"{i}.txt").write_text(text * 20)
    paths = set()
    for name, text in texts.items():
        data, tok = load_data(str(tmp_path / name), "bytes", str(tmp_path / "d"))
        assert tok.decode(data.train[:len(text)].tolist()) == text, name
        paths.add(data.path)
    assert len(paths) == 2
    assert dataset_slug("stdlib") == "stdlib" and dataset_slug("wikitext-103") == "wikitext-103"
    assert dataset_slug(str(tmp_path / "a b")).startswith("a_b-")
    # a folder prepared from another source is refused, never used
    a, b = (os.path.join(tmp_path / "d", f"{dataset_slug(str(tmp_path / n))}-bytes") for n in texts)
    shutil.rmtree(b)
    shutil.copytree(a, b)
    with pytest.raises(UsageError, match="was prepared from .*a b, not .*a_b"):
        load_data(str(tmp_path / "a_b"), "bytes", str(tmp_path / "d"))


def broken_copy(tmp_path, data_dir, name="broken"):
    src = next(p for p in data_dir.iterdir() if p.is_dir())
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst, json.loads((src / "meta.json").read_text())


@pytest.mark.parametrize("change,message", [
    (lambda m: m.pop("dtype"), "no 'dtype'"),
    (lambda m: m.update(train_tokens="12"), "'train_tokens' is '12', not an integer"),
    (lambda m: m.update(vocab_size=None), "'vocab_size' is None"),
    (lambda m: m.update(dtype="float32"), "dtype 'float32'"),
    (lambda m: m.update(vocab_size=70000), "do not fit uint16"),
])
def test_a_meta_json_missing_keys_or_with_wrong_types_is_refused(tmp_path, data_dir, change, message):
    broken, meta = broken_copy(tmp_path, data_dir)
    change(meta)
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match=re.escape(message) + ".*delete .* and it will be prepared again"):
        open_prepared(str(broken))


def test_empty_or_out_of_vocabulary_token_files_are_refused(tmp_path, data_dir):
    broken, meta = broken_copy(tmp_path, data_dir)
    (broken / "train.bin").write_bytes(b"")
    meta["train_tokens"] = 0
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="train.bin holds no tokens"):
        open_prepared(str(broken))
    broken, meta = broken_copy(tmp_path, data_dir, "oov")
    tokens = np.memmap(broken / "val.bin", dtype=np.uint16, mode="r+")
    tokens[len(tokens) // 2] = 300  # the byte vocabulary has 257
    tokens.flush()
    with pytest.raises(UsageError, match="val.bin holds token 300, outside the vocabulary of 257"):
        open_prepared(str(broken))


def test_fewer_tokens_than_one_window_is_refused_before_training(data_dir):
    data = open_prepared(str(next(p for p in data_dir.iterdir() if p.is_dir())))
    with pytest.raises(UsageError, match="val split has .* fewer than one window"):
        Batches(data, len(data.val) + 5, 8, 2, 0, 1, 0, torch.device("cpu"))


def test_a_corrupted_meta_json_stops_the_trainer_with_one_line(tmp_path, corpus, data_dir):
    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    meta_file = next(p for p in d.iterdir() if p.is_dir()) / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["val_tokens"]
    meta_file.write_text(json.dumps(meta))
    res = run_cli(trainer_args(tmp_path / "out", corpus, d, "--max_steps", "2"))
    lines = res.stderr.strip().splitlines()
    assert (res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            and "no 'val_tokens'" in lines[0]), res.stderr
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in data_dir.iterdir())


def test_a_killed_preparations_folders_are_cleared_by_the_next_one(tmp_path):
    """A preparation killed mid-way leaves <folder>.tmp-<host>-<pid>-<hex> (half-written) and, killed between
    its two renames, <folder>.old-* (the previous copy, moved aside): the next one, holding the lock, removes
    the first and puts the second back. A live process's folders, and another host's (a lock may be this
    host's alone), stay."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"d{i:02d}.txt").write_text(f"document {i} " * 50)
    out = tmp_path / "d"
    args = [sys.executable, str(ROOT / "scripts/prepare_data.py"), "--dataset", str(src), "--tokenizer", "bytes",
            "--data_dir", str(out)]
    assert subprocess.run(args, capture_output=True, text=True).returncode == 0
    final = out / f"{dataset_slug(str(src))}-bytes"
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{socket.gethostname()}-{int(ended.stdout)}"
    os.rename(final, f"{final}.old-{dead}-beef")  # killed between moving the old copy aside and the new in
    (out / f"{final.name}.tmp-{dead}-cafe").mkdir()
    (out / f"{final.name}.tmp-{dead}-cafe" / "train.bin").write_bytes(b"\0" * 100)
    kept = [f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-0a0a",  # this process: alive
            f"{final.name}.tmp-other-host-{ended.stdout.strip()}-0b0b"]
    for name in kept:
        (out / name).mkdir()
    from mupgpt.data import preparing
    with preparing(str(final)):
        pass
    assert sorted(p.name for p in out.iterdir()) == sorted([final.name, final.name + ".lock", *kept])
    assert open_prepared(str(final), ByteTokenizer(), source_of(str(src)))  # the old copy, whole
    (out / f"{final.name}.tmp-{dead}-x").mkdir()
    res = subprocess.run(args, capture_output=True, text=True)
    assert res.returncode == 0 and f"removed {out / f'{final.name}.tmp-{dead}-x'}" in res.stdout, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([final.name, final.name + ".lock", *kept])


def small_corpus(path, n=12):
    path.mkdir()
    for i in range(n):
        (path / f"doc{i:02d}.txt").write_text(f"document {i}: " + "some words here. " * 40 + "\n")
    return path


def test_a_changed_source_folder_is_prepared_again(tmp_path):
    """The prepared folder is named by the dataset's path; its files' names, sizes and times are recorded beside
    the tokens, so adding, changing or removing a file gives the tokens of the files as they are now."""
    src, d = small_corpus(tmp_path / "texts"), tmp_path / "d"
    first, _ = load_data(str(src), "bytes", str(d))
    (src / "doc99.txt").write_text("a new document, " * 50 + "\n")
    added, _ = load_data(str(src), "bytes", str(d))
    assert added.meta["train_documents"] + added.meta["val_documents"] == 13
    (src / "doc03.txt").write_text((src / "doc03.txt").read_text().replace("some", "SOME"))
    edited, _ = load_data(str(src), "bytes", str(d))  # an edit that keeps the size
    assert b"SOME" in bytes(np.concatenate([edited.train, edited.val]).astype(np.uint8))
    (src / "doc99.txt").unlink()
    removed, _ = load_data(str(src), "bytes", str(d))
    assert removed.meta["train_documents"] + removed.meta["val_documents"] == 12
    fresh = prepare(str(src), ByteTokenizer(), str(tmp_path / "fresh"))
    assert removed.meta["train_tokens"] == fresh["train_tokens"] and first.meta["train_tokens"] == fresh["train_tokens"]
    assert sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) == [f"{dataset_slug(str(src))}-bytes"]
    again, _ = load_data(str(src), "bytes", str(d))  # unchanged: the same prepared files, not a new copy
    assert again.meta == removed.meta and os.path.samefile(again.path, removed.path)


def test_a_link_loop_in_a_dataset_folder_counts_each_file_once(tmp_path):
    src = small_corpus(tmp_path / "texts")
    (src / "again").symlink_to(".")
    (src / "sub").mkdir()
    (src / "sub" / "same.txt").symlink_to(src / "doc00.txt")  # one file under two names: once
    data, _ = load_data(str(src), "bytes", str(tmp_path / "d"))
    assert data.meta["train_documents"] == 11 and data.meta["val_documents"] == 1
    alone = prepare(str(src), ByteTokenizer(), str(tmp_path / "p"))
    assert alone["train_tokens"] == data.meta["train_tokens"]


def odd_entry(src, kind):
    if kind == "fifo":
        os.mkfifo(src / "pipe.txt")
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(src / "sock.txt"))
        return s
    elif kind == "broken_link":
        (src / "gone.txt").symlink_to(src / "nowhere")
    elif kind == "empty":
        (src / "empty.txt").write_text("")
    elif kind == "unreadable_folder":
        (src / "deep.txt").mkdir()  # a folder named like a text file holding a fifo
        os.mkfifo(src / "deep.txt" / "x.txt")


ODD = {"fifo": "pipe.txt is not a regular file", "socket": "sock.txt is not a regular file",
       "broken_link": "gone.txt is a broken link", "empty": "empty.txt is empty",
       "unreadable_folder": "x.txt is not a regular file"}


@pytest.mark.parametrize("kind", ODD)
def test_odd_entries_in_a_dataset_folder_are_one_line_and_exit_2(tmp_path, script, kind):
    """What the checks did not look at: a fifo (reading it blocked for ever), a socket, a broken link, an empty
    file. The trainer and prepare_data.py refuse them, naming the file, before anything is written."""
    src = small_corpus(tmp_path / "texts")
    keep = odd_entry(src, kind)
    res = script("scripts/prepare_data.py", "--dataset", src, "--tokenizer", "bytes", "--data_dir", tmp_path / "d")
    assert_one_error_line(res, ODD[kind], "remove it from the dataset folder")
    if kind in ("fifo", "empty"):
        res = run_cli(["--dataset", src, "--data_dir", tmp_path / "d", "--output_dir", tmp_path / "o",
                       "--tokenizer", "bytes", "--max_steps", "1"], timeout=120)
        assert_one_error_line(res, ODD[kind])
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
    del keep


@pytest.mark.parametrize("name", ["UPPER.TXT", ".hidden.txt"])
def test_which_files_of_a_folder_are_read(tmp_path, name, capsys):
    """Data files are picked by suffix in any case; hidden files (.git, editor files) and other types are not read,
    and a note says how many others there are."""
    src = small_corpus(tmp_path / "texts")
    (src / name).write_text("one more document " * 30)
    (src / "README.md").write_text("# not data\n")
    data, _ = load_data(str(src), "bytes", str(tmp_path / "d"))
    assert data.meta["train_documents"] + data.meta["val_documents"] == (13 if name == "UPPER.TXT" else 12)
    assert "1 file(s) that are not .txt, .jsonl, .json or .parquet are not read" in capsys.readouterr().out
