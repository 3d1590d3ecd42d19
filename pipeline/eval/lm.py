"""Language-model metrics on token windows: loss, perplexity, bits per byte and token accuracy, summed across ranks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.infra.distributed import all_reduce_sum
from pipeline.tokenize.tokenizers import Tokenizer

IGNORE = -100  # target of padded positions


@dataclass
class ValSums:
    """What val metrics are made of, summed over windows: adds up across ranks."""

    loss: float = 0.0  # nats over every predicted token
    correct: int = 0  # argmax predictions equal to the target
    tokens: int = 0  # predicted tokens

    def __add__(self, other: ValSums) -> ValSums:
        return ValSums(self.loss + other.loss, self.correct + other.correct, self.tokens + other.tokens)


def count_windows(n_tokens: int, block_size: int) -> int:
    """Windows of block_size predictions that predict every token after the first once (the last may be short)."""
    return math.ceil((n_tokens - 1) / block_size) if n_tokens > 1 else 0


def document_positions(x: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Position ids (B, T) that restart at 0 after each end-of-text in x (B, T) (a window's first token is 0 too).

    Given to a transformers model, they reset GPT-2's learned positions and Llama's RoPE per document, and
    transformers turns positions that restart into a block-diagonal causal mask (its packed-sequence path; a window
    with one document keeps the plain causal kernel): attention stays inside each document, as torchtitan's
    block_causal or Megatron's --reset-attention-mask / --reset-position-ids.
    """
    T = x.shape[1]
    index = torch.arange(T, device=x.device).expand_as(x)
    starts = torch.zeros_like(x, dtype=torch.bool)
    starts[:, 1:] = x[:, :-1] == eot_id
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def attention_of(model) -> str:
    """The attention kernel a model (or the DeepSpeed engine around it) runs: transformers' attn_implementation."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def lm_forward(model, x: torch.Tensor, eot_id: int | None = None, flatten: bool | None = None):
    """model(x) for next-token logits, with positions per document when eot_id is given (train.document_mask).

    flash-attention reads documents from the positions only in a batch of one sequence (transformers' padding-free
    path; with more rows it would silently attend across documents), so for it the (B, T) windows go in as one
    (1, B x T) row: each window's positions start at 0, so no document spans two windows. SDPA and eager take the
    batch as it is (their mask is per row; one row of B x T would cost (B x T)^2). flatten: force either way.
    """
    if eot_id is None:
        return model(input_ids=x, use_cache=False)
    positions = document_positions(x, eot_id)
    if flatten is None:
        flatten = attention_of(model).startswith("flash")
    if not flatten or x.shape[0] == 1:
        return model(input_ids=x, position_ids=positions, use_cache=False)
    out = model(input_ids=x.reshape(1, -1), position_ids=positions.reshape(1, -1), use_cache=False)
    out.logits = out.logits.view(*x.shape, -1)
    return out


@torch.no_grad()
def window_sums(model, tokens: np.ndarray, starts: np.ndarray, block_size: int, batch_size: int, rank: int = 0,
                world_size: int = 1, count_correct: bool = True, progress: Callable[[int], None] | None = None,
                eot_id: int | None = None) -> ValSums:
    """This rank's sums over the windows at starts[rank], starts[rank + world_size], ...: the one val loss of gptpipe,
    for the evaluate stage (consecutive windows) and training's evaluations (a fixed random set).

    Window s is tokens[s : s + T + 1]: inputs are its first T tokens, targets the last T; one cut short by the end of
    the tokens is padded on the right, which a causal model never sees. Every rank runs the same number of forward
    passes (ZeRO-3 gathers parameters inside each one), so a rank with fewer windows scores a placeholder that
    counts for nothing. model may be a DeepSpeed engine or a plain module. eot_id: attention inside each document
    (train.document_mask), as training saw it.
    """
    T = block_size
    mine = starts[rank::world_size]
    n_batches = math.ceil(math.ceil(len(starts) / world_size) / batch_size)
    device = next(model.parameters()).device
    sums = ValSums()
    for b in range(n_batches):
        batch, counts = mine[b * batch_size : (b + 1) * batch_size], True
        if len(batch) == 0:
            batch, counts = starts[:1], False
        windows = [np.asarray(tokens[s : s + T + 1], dtype=np.int64) for s in batch]
        x = torch.zeros(len(windows), T, dtype=torch.long)
        y = torch.full((len(windows), T), IGNORE, dtype=torch.long)
        for row, w in enumerate(windows):
            x[row, : len(w) - 1] = torch.from_numpy(w[:-1])
            y[row, : len(w) - 1] = torch.from_numpy(w[1:])
        x, y = x.to(device), y.to(device)
        logits = lm_forward(model, x, eot_id).logits.float()  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE, reduction="sum")
        if not counts:
            continue
        scored = y != IGNORE
        correct = int(((logits.argmax(-1) == y) & scored).sum()) if count_correct else 0
        sums += ValSums(loss.item(), correct, int(scored.sum()))
        if progress:
            progress(len(windows))
    return sums


def val_sums(model, tokens: np.ndarray, block_size: int, batch_size: int, max_windows: int | None = None,
             rank: int = 0, world_size: int = 1, progress: Callable[[int], None] | None = None, eot_id: int | None = None) -> ValSums:
    """This rank's sums over the consecutive windows that predict every token once (the first max_windows)."""
    n = min(count_windows(len(tokens), block_size), max_windows or math.inf)
    return window_sums(model, tokens, np.arange(n, dtype=np.int64) * block_size, block_size, batch_size, rank, world_size,
                       progress=progress, eot_id=eot_id)


def metrics_from_sums(sums: ValSums, text_bytes: int | None) -> dict:
    loss = sums.loss / max(sums.tokens, 1)
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": sums.loss / math.log(2) / text_bytes if text_bytes else None,
        "token_accuracy": sums.correct / max(sums.tokens, 1),
        "tokens_scored": sums.tokens,
    }


def val_metrics(model, tokens: np.ndarray, block_size: int, batch_size: int, text_bytes: int | None,
                max_windows: int | None = None, rank: int = 0, world_size: int = 1,
                progress: Callable[[int], None] | None = None, eot_id: int | None = None) -> dict:
    """Loss over the val tokens in non-overlapping windows (deterministic), summed over ranks.

    bits_per_byte divides the loss in bits by text_bytes, the UTF-8 size of the text the scored windows cover
    (the first token's text included, though it is not predicted): meta.json's text_bytes for the whole split,
    covered_text_bytes of the windows' tokens for a part. None leaves it out.
    """
    sums = val_sums(model, tokens, block_size, batch_size, max_windows, rank, world_size, progress, eot_id)
    if world_size > 1:
        loss, correct, count = all_reduce_sum([sums.loss, sums.correct, sums.tokens], next(model.parameters()).device)
        sums = ValSums(loss, round(correct), round(count))
    return metrics_from_sums(sums, text_bytes)


def covered_text_bytes(tokenizer: Tokenizer, tokens: np.ndarray) -> int:
    """UTF-8 bytes of the text that tokens encode, end-of-text tokens excluded (they stand for no text).

    Decoded document by document: a document boundary is always a clean place to cut the ids.
    """
    tokens = np.asarray(tokens)
    cuts = np.flatnonzero(tokens == tokenizer.eot_id)
    total, start = 0, 0
    for end in [*cuts.tolist(), len(tokens)]:
        if end > start:
            total += len(tokenizer.decode(tokens[start:end]).encode("utf-8"))
        start = end + 1
    return total
