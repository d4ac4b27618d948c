"""Tokenizers: the byte-level one that needs no files, and tiktoken's encodings."""
import os

from mupgpt.config import tokenizer_names
from mupgpt.errors import UsageError, did_you_mean


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

