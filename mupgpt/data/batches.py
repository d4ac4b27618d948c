"""Batches: random contiguous windows of the token files, a pure function of (seed, step), split over ranks."""
import numpy as np
import torch

from mupgpt.errors import UsageError


def window_starts(num_tokens, seq_len, batch, seed, step):
    """`batch` disjoint windows of seq_len + 1 tokens: a pure function of (seed, step)."""
    span = seq_len + 1
    rng = np.random.default_rng([seed, step])
    offset = int(rng.integers(0, span)) if num_tokens >= 2 * span else 0
    slots = (num_tokens - offset) // span
    if slots < 1:
        raise UsageError(f"only {num_tokens} tokens, fewer than one window of {span}: use a smaller --seq_len or more "
                         "data")
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
        mine = starts[self.rank * self.micro:(self.rank + 1) * self.micro]
        return get_batch(self.data.val, self.seq_len, mine, self.device)

