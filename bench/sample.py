"""Generation speed: tokens/s of gptpipe's sampler with and without its KV cache, one and eight sequences at once,
256 new tokens each, on GPT-2-shaped models of the default demo's size (4 layers, 128 wide) and a larger one
(6 layers, 384 wide), their context long enough that nothing is cropped. The same model, prompt and seed for
every variant; medians of alternating runs.

    python bench/sample.py [--repeats 3]
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_row  # noqa: E402

NEW_TOKENS = 256
SIZES = {"4 layers x 128 (the demo)": {"n_layer": 4, "n_head": 4, "n_embd": 128},
         "6 layers x 384": {"n_layer": 6, "n_head": 6, "n_embd": 384}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.model.generate import sample_batch

    prompt = list(range(1, 17))
    for name, shape in SIZES.items():
        torch.manual_seed(0)
        config = GPT2Config(**shape, n_positions=512, vocab_size=4096, activation_function="gelu", bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config).eval()
        results = {(batch, cache): [] for batch in (1, 8) for cache in (True, False)}
        for _ in range(args.repeats):
            for (batch, cache), times in results.items():
                start = time.perf_counter()
                rows = sample_batch(model, prompt, batch, NEW_TOKENS, 1.0, 50, 1.0, torch.Generator().manual_seed(0), 0, False, 4096,
                                    kv_cache=cache)
                assert all(len(r) == NEW_TOKENS for r in rows)
                times.append(batch * NEW_TOKENS / (time.perf_counter() - start))
        medians = {key: statistics.median(values) for key, values in results.items()}
        for batch in (1, 8):
            with_cache, without = medians[(batch, True)], medians[(batch, False)]
            print(f"{name}, batch {batch}: KV cache {with_cache:,.0f} tok/s, no cache {without:,.0f} tok/s: {with_cache / without:.1f}x")
            if not args.no_record:
                append_row("## Generation", f"| {datetime.date.today()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores |"
                           f" {name} | {batch} | {with_cache:,.0f} | {without:,.0f} | {with_cache / without:.1f}x |",
                           intro="`python bench/sample.py`: tokens/s generating 256 new tokens from a 16-token prompt (vocabulary 4,096),"
                                 " top-k 50, with and without the KV cache; medians of alternating runs.",
                           columns="| date | machine | model | sequences at once | with KV cache | without | speed-up |")


if __name__ == "__main__":
    main()
