"""The windows training reads from a split: seeded random batches by (step, micro step), and fixed val windows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.config.train import Batch
from pipeline.errors import UserError

if TYPE_CHECKING:
    import torch


class WindowSampler:
    """Batches of (block_size + 1)-token windows from a token file; each rank reads its slice of a global batch.

    Sample i of a run is window perm_e[i % n] of epoch e = i // n, where perm_e is a seeded permutation of the
    file's n non-overlapping windows. A batch depends only on (seed, step), so resuming needs no sampler state,
    and the global batch is the same whatever the world size: only who reads which part of it changes.
    """

    def __init__(self, tokens: np.ndarray, *, batch: Batch, seed: int, rank: int):
        self.tokens, self.block_size, self.seed = tokens, batch.block_size, seed
        self.global_batch, self.micro_batch_size = batch.global_size, batch.micro_batch_size
        self.rank_offset = rank * batch.micro_batch_size * batch.grad_accum
        self.n_windows = full_windows(tokens, batch.block_size)
        self._epoch, self._perm = -1, None

    def starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of samples first .. first + count - 1."""
        out = np.empty(count, dtype=np.int64)
        for j, i in enumerate(range(first, first + count)):
            epoch, k = divmod(i, self.n_windows)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            out[j] = self._perm[k] * self.block_size
        return out

    def micro_batch(self, step: int, micro: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (B, T) for this rank's micro batch `micro` of global batch `step`."""
        first = step * self.global_batch + self.rank_offset + micro * self.micro_batch_size
        return window_batch(self.tokens, self.starts(first, self.micro_batch_size), self.block_size, device)


class MicroBatches:
    """This rank's micro batches in training order, each made one ahead: the next is read while the device still
    runs the current one (a GPU's kernels are queued, not finished). A batch depends only on (step, micro), so
    making it early changes nothing."""

    def __init__(self, sampler: WindowSampler, grad_accum: int, step: int, device):
        self.sampler, self.grad_accum, self.device = sampler, grad_accum, device
        self.step, self.micro = step, 0
        self.current = sampler.micro_batch(step, 0, device)  # (x, y), each (B, T)

    def advance(self) -> None:
        """Make the next micro batch current: call it once this one's forward pass is queued."""
        self.micro += 1
        if self.micro == self.grad_accum:
            self.step, self.micro = self.step + 1, 0
        self.current = self.sampler.micro_batch(self.step, self.micro, self.device)


def full_windows(tokens: np.ndarray, block_size: int) -> int:
    """Non-overlapping (block_size + 1)-token windows in tokens; UserError when there is not even one."""
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise UserError(f"{len(tokens)} tokens are fewer than model.block_size + 1 = {block_size + 1}: use more data or a shorter block_size")
    return n


def fixed_windows(tokens: np.ndarray, block_size: int, count: int, seed: int) -> np.ndarray:
    """Token offsets of `count` seeded windows (every window when there are fewer), in file order.

    The same offsets whatever the world size: in-training val loss must not depend on how many processes score it.
    """
    n = full_windows(tokens, block_size)
    return np.sort(np.random.default_rng([seed, 0]).permutation(n)[:count]) * block_size


def window_batch(tokens: np.ndarray, starts: np.ndarray, block_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (B, T): the windows at starts, inputs and targets shifted by one."""
    import torch  # here, so the tokenize stage doesn't pay for importing it

    T, device = block_size, torch.device(device)
    # One copy out of the memory map, converting the ids to int64 as it goes; into pinned memory for a GPU, so
    # the copy to the device runs without blocking this thread.
    w = torch.empty((len(starts), T + 1), dtype=torch.int64, pin_memory=device.type == "cuda")  # (B, T + 1)
    for row, start in zip(w.numpy(), starts):
        row[:] = tokens[start : start + T + 1]
    return w[:, :-1].to(device, non_blocking=True), w[:, 1:].to(device, non_blocking=True)
