"""Evaluation speed: val tokens/s and HellaSwag items/s of gptpipe's evaluate path against a plain loop of our own
that scores one window (one HellaSwag ending) per forward pass, on the same models and data, in this process.

  - val: tiny Shakespeare's last 10% at character level, 128-token windows, a 4-layer 128-wide GPT-2 (random
    weights: speed only), gptpipe's val_sums at evaluate.batch_size 8 and 32 against the one-window loop;
  - HellaSwag: the shared 100-item sample, tiktoken's gpt2 ids, a 4-layer 128-wide GPT-2 with GPT-2's vocabulary,
    gptpipe's choice_logliks at batch 8 against scoring each of the four endings alone.

Medians of alternating runs; a dated row goes to docs/benchmarks.md.

    python bench/evaluate.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BLOCK = 128
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(DATA / "tiktoken_cache"))  # offline: tiktoken's GPT-2 files are shared


@torch.inference_mode()
def plain_val(model, tokens: np.ndarray, block: int) -> float:
    """Summed loss over the same windows as val_sums, one window per forward pass."""
    total = 0.0
    for start in range(0, len(tokens) - 1, block):
        w = torch.from_numpy(np.asarray(tokens[start : start + block + 1], dtype=np.int64))[None]
        logits = model(input_ids=w[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), w[0, 1:], reduction="sum").item()
    return total


@torch.inference_mode()
def plain_hellaswag(model, tokenizer, items) -> list[list[float]]:
    """Each ending's summed log-likelihood, one ending per forward pass."""
    from pipeline.eval.hellaswag import encode_pair

    out = []
    for item in items:
        scores = []
        for ending in item.endings:
            context, cont = encode_pair(tokenizer, item.query, " " + ending)
            ids = torch.tensor([context + cont])
            logprobs = F.log_softmax(model(input_ids=ids[:, :-1], use_cache=False).logits.float(), dim=-1)[0]
            at = torch.arange(len(context) - 1, ids.shape[1] - 1)
            scores.append(float(logprobs[at, torch.tensor(cont)].sum()))
        out.append(scores)
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.eval.hellaswag import choice_logliks, parse_hellaswag
    from pipeline.eval.lm import val_sums
    from pipeline.tokenize.tokenizers import CharTokenizer, TiktokenTokenizer

    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    val_text = text[int(len(text) * 0.9) :]
    chars = CharTokenizer.train([text], unknown_chars="error")
    tokens = np.asarray(chars.encode(val_text), dtype=np.uint16)
    torch.manual_seed(0)
    shape = {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 512, "activation_function": "gelu", "bos_token_id": 0, "eos_token_id": 0}
    char_model = GPT2LMHeadModel(GPT2Config(vocab_size=chars.vocab_size, **shape)).eval()
    gpt2_model = GPT2LMHeadModel(GPT2Config(vocab_size=50257, **{**shape, "bos_token_id": 50256, "eos_token_id": 50256})).eval()
    tiktoken_gpt2 = TiktokenTokenizer("gpt2")
    items = parse_hellaswag(DATA / "hellaswag_val_sample.jsonl")

    runs = {
        "val, gptpipe batch 8": lambda: val_sums(char_model, tokens, BLOCK, 8),
        "val, gptpipe batch 32": lambda: val_sums(char_model, tokens, BLOCK, 32),
        "val, one window at a time": lambda: plain_val(char_model, tokens, BLOCK),
        "HellaSwag, gptpipe batch 8": lambda: choice_logliks(gpt2_model, tiktoken_gpt2, items, 8),
        "HellaSwag, one ending at a time": lambda: plain_hellaswag(gpt2_model, tiktoken_gpt2, items),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            s, results[name] = timed(fn)
            seconds[name].append(s)
    # The same numbers both ways: the batched path scores what the plain loop scores.
    assert abs(results["val, gptpipe batch 8"].loss - results["val, one window at a time"]) < 1e-3 * abs(results["val, one window at a time"])
    np.testing.assert_allclose(results["HellaSwag, gptpipe batch 8"], results["HellaSwag, one ending at a time"], rtol=1e-4)

    rates = {}
    for name, values in seconds.items():
        amount, unit = (len(tokens) - 1, "tokens/s") if name.startswith("val") else (len(items), "items/s")
        rates[name] = amount / statistics.median(values)
        print(f"{name}: {rates[name]:,.0f} {unit}")
    val_ratio = rates["val, gptpipe batch 8"] / rates["val, one window at a time"]
    hs_ratio = rates["HellaSwag, gptpipe batch 8"] / rates["HellaSwag, one ending at a time"]
    print(f"gptpipe / one at a time: val {val_ratio:.1f}x (batch 32: {rates['val, gptpipe batch 32'] / rates['val, one window at a time']:.1f}x),"
          f" HellaSwag {hs_ratio:.1f}x")
    if not args.no_record:
        row = (f"| {datetime.date.today()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores |"
               f" {rates['val, gptpipe batch 8']:,.0f} | {rates['val, gptpipe batch 32']:,.0f} | {rates['val, one window at a time']:,.0f} |"
               f" {val_ratio:.1f}x | {rates['HellaSwag, gptpipe batch 8']:,.1f} | {rates['HellaSwag, one ending at a time']:,.1f} | {hs_ratio:.1f}x |")
        append_row("## Evaluation", row,
                   intro="`python bench/evaluate.py`: val tokens/s (tiny Shakespeare's last 10%, characters, 128-token windows, a 4-layer"
                         " 128-wide GPT-2) and HellaSwag items/s (the shared 100-item sample, GPT-2 ids, a 4-layer 128-wide GPT-2 with"
                         " GPT-2's vocabulary), gptpipe's batched path against one window or ending per forward pass; medians.",
                   columns="| date | machine | val tok/s, batch 8 | batch 32 | one window at a time | ratio (batch 8) |"
                           " HellaSwag items/s, batch 8 | one ending at a time | ratio |")


if __name__ == "__main__":
    main()
