"""The tokenize stage: a prepared corpus -> train.bin, val.bin (token files, data.py), tokenizer/ and meta.json.

Documents stream through in chunks encoded on every core, so memory stays bounded whatever the corpus size.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline.config import TokenizeConfig
from pipeline.data import HEADER_BYTES, MAGIC, VERSION, TokenWriter, token_dtype
from pipeline.errors import UserError
from pipeline.files import building_dir, write_json_atomic
from pipeline.layout import SPLITS, PreparedDir, TokensDir
from pipeline.sources import iter_prepared
from pipeline.tokenizers import Tokenizer, build_tokenizer


def text_bytes(text: str) -> int:
    """UTF-8 size; isascii() is O(1) on CPython, so ASCII text is not encoded just to be measured."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def chunk_documents(docs: Iterable[str], chunk_bytes: int) -> Iterator[tuple[list[str], int]]:
    """Group documents into (documents, UTF-8 bytes) of about chunk_bytes (a longer document is one chunk)."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += text_bytes(doc)
        if size >= chunk_bytes:
            yield chunk, size
            chunk, size = [], 0
    if chunk:
        yield chunk, size


def encode_chunks(encode: Callable[[list[str]], np.ndarray], chunks: Iterable[tuple[list[str], int]],
                  workers: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """encode(documents) for each chunk on `workers` threads; yields (ids, documents, bytes) in order.

    At most 2 x workers chunks are queued or in flight, so memory is bounded whatever the corpus size.
    """
    pending: deque[tuple[Future, int, int]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
    try:
        for docs, size in chunks:
            pending.append((pool.submit(encode, docs), len(docs), size))
            if len(pending) >= 2 * workers:
                future, n, size = pending.popleft()
                yield future.result(), n, size
        while pending:
            future, n, size = pending.popleft()
            yield future.result(), n, size
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def usable_cores() -> int:
    """Cores this process may run on (a container's or taskset's share, not the whole machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def encode_workers(tok: Tokenizer, cfg: TokenizeConfig) -> int:
    """Threads encoding chunks: tokenize.workers (0 = a core each), or 1 where the tokenizer is parallel inside."""
    return 1 if tok.parallel_inside else cfg.workers or usable_cores()


def tokenize_split(tok: Tokenizer, docs: Iterable[str], path: Path, cfg: TokenizeConfig, where: str,
                   progress: Callable[[int], None] | None = None) -> tuple[dict, float]:
    """Encode documents (each followed by EOT) into the token file at path; returns its counts and the seconds taken."""
    start = time.perf_counter()
    documents = tokens = size_total = 0
    workers = encode_workers(tok, cfg)

    def encode(chunk: list[str]) -> np.ndarray:
        try:
            return tok.encode_documents(chunk)
        except UserError as e:  # e.g. an unknown character: say which split it is in
            raise UserError(f"{where}: {e}") from None

    with TokenWriter(path, tok.vocab_size, tok.eot_id) as writer:
        for ids, n, size in encode_chunks(encode, chunk_documents(docs, cfg.chunk_bytes), workers):
            writer.write(ids)
            documents, tokens, size_total = documents + n, tokens + ids.size, size_total + size
            if progress:
                progress(size)
    return {"documents": documents, "tokens": tokens, "text_bytes": size_total}, time.perf_counter() - start


def measure_rates(tokens: int, size: int, seconds: float) -> dict:
    seconds = max(seconds, 1e-9)
    return {"tokens_per_s": round(tokens / seconds), "mb_per_s": round(size / 1e6 / seconds, 2)}


def tokenize_corpus(cfg: TokenizeConfig, prepared_dir: str | Path,
                    progress: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """Build the tokenizer on the train split, then write train.bin, val.bin, tokenizer/ and meta.json to out_dir.

    Returns (meta, throughput). meta.json holds only what the inputs and params determine, so identical text
    gives a byte-identical out_dir (and DVC skips the stages after it); the throughput is the caller's to
    report (the stage writes it to tokenize.metrics_file). progress(n) is called with the UTF-8 bytes encoded since the last call (once per chunk).
    out_dir is built in a temporary folder beside it and swapped in at the end: never half-written.
    """
    start = time.perf_counter()
    tok = build_tokenizer(cfg, lambda: iter_prepared(prepared_dir, "train"))
    build_seconds = time.perf_counter() - start
    splits, seconds = {}, {}
    with building_dir(cfg.out_dir, "tokenize.out_dir") as tmp:
        out = TokensDir(tmp)
        for split in SPLITS:
            splits[split], seconds[split] = tokenize_split(tok, iter_prepared(prepared_dir, split), out.split(split), cfg,
                                                           str(PreparedDir(prepared_dir).split(split)), progress)
        tok.save(out.tokenizer)
        tokens = sum(s["tokens"] for s in splits.values())
        size = sum(s["text_bytes"] for s in splits.values())
        meta = {
            "tokenizer": tok.describe(),
            "vocab_size": tok.vocab_size,
            "eot_id": tok.eot_id,
            "dtype": token_dtype(tok.vocab_size).name,
            "format": {"magic": MAGIC.decode(), "version": VERSION, "header_bytes": HEADER_BYTES},
            "splits": splits,
            "tokens": tokens,
            "text_bytes": size,
            # Where things go and how fast they are made (workers, chunk_bytes) never change the tokens.
            "params": cfg.model_dump(mode="json", exclude={"workers", "chunk_bytes", "out_dir", "metrics_file"}),
        }
        write_json_atomic(out.meta, meta)
    encode_seconds = sum(seconds.values())
    throughput = {
        "tokens": tokens,
        "text_bytes": size,
        "tokenizer_seconds": round(build_seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
        **measure_rates(tokens, size, encode_seconds),
        "workers": encode_workers(tok, cfg),
    }
    return meta, throughput
