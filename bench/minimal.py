"""Baselines for the benchmarks: a minimal GPT written the way nanoGPT's model.py is (no biases, exact GELU,
PyTorch's fused attention, tied embeddings) and a plain PyTorch training loop, both our own code.

Run as a script it is the time-to-loss baseline: nanoGPT's CPU settings for shakespeare_char, trained for a
number of steps, then the loss over the whole val split; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd, bias=False), nn.LayerNorm(c.n_embd, bias=False)
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd, bias=False)
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=False)
        self.fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=False)
        self.fc_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=False)
        self.n_head = c.n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))  # exact GELU, as nanoGPT


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab_size, c.n_embd), nn.Embedding(c.block_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=False)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * c.n_layer) if name.endswith(("proj.weight",)) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool = False) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only, as nanoGPT's configure_optimizers (which fuses on CUDA only: on a CPU
    torch's default, the foreach implementation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def get_batch(data: np.ndarray, block_size: int, batch_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's random windows."""
    ix = rng.integers(0, len(data) - block_size - 1, size=batch_size)
    x = torch.from_numpy(np.stack([data[i : i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + block_size] for i in ix]).astype(np.int64))
    return x, y


@torch.no_grad()
def estimate_loss(model: nn.Module, train: np.ndarray, val: np.ndarray, block_size: int, batch_size: int, iters: int,
                  rng: np.random.Generator) -> dict:
    """nanoGPT's periodic estimate: the mean loss of `iters` random batches of each split."""
    model.eval()
    out = {}
    for name, data in (("train", train), ("val", val)):
        losses = []
        for _ in range(iters):
            x, y = get_batch(data, block_size, batch_size, rng)
            logits = model(x)
            losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
        out[name] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def whole_split_loss(model: nn.Module, data: np.ndarray, block_size: int, batch_size: int = 64) -> float:
    """Mean loss over every token of data in non-overlapping windows (the last one short), as gptpipe's evaluate."""
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(data) - 1, block_size)
    for first in range(0, len(starts), batch_size):
        for s in starts[first : first + batch_size]:
            w = torch.from_numpy(np.asarray(data[s : s + block_size + 1], dtype=np.int64))[None]
            logits = model(w[:, :-1])
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), w[0, 1:], reduction="sum").item()
            count += w.shape[1] - 1
    model.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--text", required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--eval-interval", type=int, default=250, help="nanoGPT's estimate_loss every N steps (0 = never)")
    parser.add_argument("--eval-iters", type=int, default=20, help="batches per split in each estimate_loss")
    parser.add_argument("--fused", action="store_true", help="fused AdamW (nanoGPT uses it on CUDA only)")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    text = open(args.text, encoding="utf-8").read()
    chars = sorted(set(text))
    table = np.zeros(max(map(ord, chars)) + 1, dtype=np.uint16)  # code point -> id
    table[[ord(ch) for ch in chars]] = np.arange(len(chars))
    ids = table[np.frombuffer(text.encode("utf-32-le"), dtype="<u4")]
    n = int(len(ids) * 0.9)  # nanoGPT's split: the last 10% of the text is val
    train, val = ids[:n], ids[n:]
    c = GPTConfig(vocab_size=len(chars))
    model = GPT(c)
    opt = adamw(model, args.lr, 0.1, (0.9, 0.99), args.fused)
    rng = np.random.default_rng(args.seed)
    warmup, min_lr = 100, args.lr / 10
    loop_start = time.perf_counter()
    for step in range(args.steps):
        if args.eval_interval and step % args.eval_interval == 0:
            estimate_loss(model, train, val, c.block_size, args.batch, args.eval_iters, rng)
        # nanoGPT's schedule: linear warmup, cosine to min_lr at lr_decay_iters = max_iters
        if step < warmup:
            lr = args.lr * (step + 1) / (warmup + 1)
        else:
            lr = min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup))) * (args.lr - min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(train, c.block_size, args.batch, rng)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    loop = time.perf_counter() - loop_start
    val_loss = whole_split_loss(model, val, c.block_size)
    print(json.dumps({"steps": args.steps, "val_loss": val_loss, "loop_seconds": loop,
                      "tokens_per_s": args.steps * args.batch * c.block_size / loop, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
