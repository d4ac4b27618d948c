"""The model a training config asks for: its GPTConfig, with the vocabulary padded to a multiple of 64."""
import math

from mup_model import GPTConfig
from mupgpt.errors import UsageError


def model_config(cfg, vocab_size):
    """cfg (a TrainConfig) and the tokenizer's vocabulary -> GPTConfig; a shape the model refuses is one line."""
    if cfg.vocab_size and cfg.vocab_size < vocab_size:
        raise UsageError(f"--vocab_size {cfg.vocab_size} is smaller than the tokenizer's {vocab_size}: "
                         "drop it or give at least that")
    vocab_size = 64 * math.ceil(max(vocab_size, cfg.vocab_size) / 64)
    try:
        return GPTConfig(vocab_size=vocab_size, block_size=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         head_width=cfg.head_width, parametrization=cfg.parametrization,
                         base_head_width=cfg.base_head_width, base_width=cfg.base_width, base_n_layer=cfg.base_n_layer,
                         depth_alpha=cfg.depth_alpha, init_std=cfg.init_std, output_mult=cfg.output_mult,
                         attn_mult=cfg.attn_mult, readout_zero_init=cfg.readout_zero_init,
                         query_zero_init=cfg.query_zero_init, arch=cfg.arch, n_kv_head=cfg.n_kv_head,
                         mlp_hidden=cfg.mlp_hidden)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_model_flags(cfg):
    """The model flags checked as the model will check them, before the tokenizer (its vocabulary) is known."""
    model_config(cfg, 0)
