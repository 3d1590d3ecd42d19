"""The tokenize stage: a prepared corpus -> token shards per split (tokens.py's files), tokenizer/ and meta.json.

Documents stream through in chunks encoded on every core, so memory stays bounded whatever the corpus size.
Each split's ids go into shards of exactly tokenize.shard_tokens (the last one shorter), so the output does not
depend on how the work was chunked or whether it was interrupted: a killed run resumes from its finished shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline.config.tokenize import TokenizeConfig
from pipeline.errors import UserError
from pipeline.files import MARKER, resumable_dir, write_json_atomic
from pipeline.layout import SPLITS, PreparedDir, TokensDir
from pipeline.prepare.documents import iter_documents, iter_prepared, read_manifest, text_bytes
from pipeline.tokenize.tokenizers import Tokenizer, build_tokenizer
from pipeline.tokens import VERSION, ShardWriter, check_resume, describe_tokens


@dataclass
class Chunk:
    """Whole documents of one split to encode as a unit; end: the stream position after its last document."""

    split: str
    docs: list[str] = field(default_factory=list)
    size: int = 0
    end: int = 0


def chunk_documents(docs: Iterable[tuple[int, str, str]], chunk_bytes: int) -> Iterator[Chunk]:
    """Each split's documents, in order, grouped into chunks of about chunk_bytes of UTF-8 (a longer document is a
    chunk of its own). docs: (stream position, split, text); the splits may be interleaved."""
    filling: dict[str, Chunk] = {}
    for position, split, doc in docs:  # once per document: kept lean
        chunk = filling.get(split) or filling.setdefault(split, Chunk(split))
        chunk.docs.append(doc)
        chunk.size += text_bytes(doc)
        chunk.end = position + 1
        if chunk.size >= chunk_bytes:
            yield filling.pop(split)
    yield from filling.values()


def encode_chunks(encode: Callable[[Chunk], np.ndarray], chunks: Iterable[Chunk], workers: int) -> Iterator[tuple[Chunk, np.ndarray]]:
    """encode(chunk) for each chunk on `workers` threads; yields (chunk, ids) in order.

    At most 2 x workers chunks are queued or in flight, so memory is bounded whatever the corpus size.
    """
    pending: deque[tuple[Future, Chunk]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
    try:
        for chunk in chunks:
            pending.append((pool.submit(encode, chunk), chunk))
            if len(pending) >= 2 * workers:
                future, done = pending.popleft()
                yield done, future.result()
        while pending:
            future, done = pending.popleft()
            yield done, future.result()
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


def hash_documents(digest, docs: list[str]) -> None:
    """The text a split's shards were made from, as it streams by: what a resumed run checks it reads again."""
    if docs:  # each document and a NUL after it, encoded once per chunk rather than once per document
        digest.update(("\0".join(docs) + "\0").encode("utf-8"))


class SplitWriter:
    """One split's ids into shards (tokens.py's ShardWriter), and where in the documents the split stands. state() is
    what a resumed run needs to carry on from here, and what it checks first: the shards' CRCs and the sha256 of the
    text encoded so far."""

    def __init__(self, out: TokensDir, split: str, tok: Tokenizer, shard_tokens: int, resume: dict | None = None,
                 text_digest=None):
        state = resume or {"position": 0, "documents": 0, "text_bytes": 0}
        self.position, self.documents, self.text_bytes = state["position"], state["documents"], state["text_bytes"]
        self.digest = text_digest or hashlib.sha256()
        self.shards = ShardWriter(out, split, tok.vocab_size, tok.eot_id, shard_tokens, resume)

    @property
    def tokens(self) -> int:
        return self.shards.tokens

    def write(self, chunk: Chunk, ids: np.ndarray) -> bool:
        """Append a chunk's ids; True when a shard was finished."""
        finished = self.shards.write(ids)
        self.position, self.documents, self.text_bytes = chunk.end, self.documents + len(chunk.docs), self.text_bytes + chunk.size
        hash_documents(self.digest, chunk.docs)
        return finished

    def state(self) -> dict:
        return {**self.shards.state(), "position": self.position, "documents": self.documents, "text_bytes": self.text_bytes,
                "text_sha256": self.digest.hexdigest()}

    def close(self) -> dict:
        shards = self.shards.close()
        return {"documents": self.documents, "tokens": sum(shards), "text_bytes": self.text_bytes, "shards": shards}


def measure_rates(tokens: int, size: int, seconds: float) -> dict:
    seconds = max(seconds, 1e-9)
    return {"tokens_per_s": round(tokens / seconds), "mb_per_s": round(size / 1e6 / seconds, 2)}


def tokenize_corpus(cfg: TokenizeConfig, prepared_dir: str | Path,
                    progress: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """Build the tokenizer on the train split, then write the shards, tokenizer/ and meta.json to out_dir.

    Returns (meta, throughput). meta.json holds only what the inputs and params determine, so identical text
    gives a byte-identical out_dir (and DVC skips the stages after it); the throughput is the caller's to
    report (the stage writes it to tokenize.metrics_file). progress(n) is called with the UTF-8 bytes encoded
    since the last call (once per chunk). out_dir is built in .<name>.partial beside it and swapped in at the
    end, never half-written; a run that is killed or fails leaves that folder, and the next run with the same
    inputs and params keeps its finished shards and encodes only the rest.
    """
    start = time.perf_counter()
    tok = build_tokenizer(cfg, lambda: iter_prepared(prepared_dir, "train"))
    build_seconds = time.perf_counter() - start
    read_manifest(prepared_dir)  # present and readable, before any folder is made
    identity = {"manifest": hashlib.sha256(PreparedDir(prepared_dir).manifest.read_bytes()).hexdigest(),
                # import_encoding is read by imports alone: meta.json stays what it was before the key came
                "params": cfg.model_dump(mode="json", exclude={"workers", "chunk_bytes", "out_dir", "metrics_file", "import_encoding"}),
                "tokenizer": tok.describe(), "format": VERSION}
    workers = encode_workers(tok, cfg)
    with resumable_dir(cfg.out_dir, "tokenize.out_dir") as folder:
        out = TokensDir(folder)
        shutil.rmtree(folder / "tokenizer.new", ignore_errors=True)  # an interrupted run's, maybe of another tokenizer
        tok.save(folder / "tokenizer.new")
        identity["tokenizer_files"] = _digest_folder(folder / "tokenizer.new")
        resume = _resume_state(out, identity, tok.vocab_size)
        digests = _reread_digests(prepared_dir, resume) if resume else {}
        if any(digests[split].hexdigest() != resume[split]["text_sha256"] for split in digests):
            # The text the finished shards were made from is not what the sources hold now (edited since, or edited
            # and restored): those shards are stale, whatever the manifest says.
            _clear(out)
            resume, digests = {}, {}
        try:
            writers = {split: SplitWriter(out, split, tok, cfg.shard_tokens, resume.get(split), digests.get(split)) for split in SPLITS}
        except ValueError:  # the partial shard is not what progress.json recorded: start afresh
            _clear(out)
            resume, writers = {}, {split: SplitWriter(out, split, tok, cfg.shard_tokens) for split in SPLITS}
        resumed = {split: w.tokens for split, w in writers.items()}
        if progress and any(resumed.values()):
            progress(sum(w.text_bytes for w in writers.values()))

        def encode(chunk: Chunk) -> np.ndarray:
            try:
                return tok.encode_documents(chunk.docs)
            except UserError as e:  # e.g. an unknown character: say which split it is in
                raise UserError(f"{PreparedDir(prepared_dir).root} ({chunk.split} split): {e}") from None

        # The documents not in a finished shard yet; those before a split's position are skipped, not encoded.
        done = {split: w.position for split, w in writers.items()}
        todo = ((i, split, text) for i, (split, text) in enumerate(iter_documents(prepared_dir)) if i >= done[split])
        encode_start, encoded_bytes = time.perf_counter(), 0
        for chunk, ids in encode_chunks(encode, chunk_documents(todo, cfg.chunk_bytes), workers):
            if writers[chunk.split].write(chunk, ids):
                state = {"identity": identity, **{s: w.state() for s, w in writers.items()}}
                write_json_atomic(out.progress, {**state, "sha256": _state_digest(state)})
            encoded_bytes += chunk.size
            if progress:
                progress(chunk.size)
        encode_seconds = time.perf_counter() - encode_start
        splits = {split: w.close() for split, w in writers.items()}
        if out.tokenizer.exists():
            shutil.rmtree(out.tokenizer)
        os.replace(folder / "tokenizer.new", out.tokenizer)
        out.progress.unlink(missing_ok=True)
        for stray in folder.glob(".*.tmp"):  # an atomic write a kill interrupted (progress.json's): not part of the output
            stray.unlink()
        # Where things go and how fast they are made (workers, chunk_bytes) never change the tokens.
        meta = describe_tokens(tok, splits, identity["params"])
        write_json_atomic(out.meta, meta)
    tokens = meta["tokens"]
    encoded = tokens - sum(resumed.values())
    throughput = {
        "tokens": tokens,
        "text_bytes": meta["text_bytes"],
        "resumed_tokens": sum(resumed.values()),
        "tokenizer_seconds": round(build_seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
        **measure_rates(encoded, encoded_bytes, encode_seconds),
        "workers": workers,
    }
    return meta, throughput


def _digest_folder(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _state_digest(state: dict) -> str:
    """progress.json's checksum of itself: a count or position changed by hand (or on disk) is not trusted."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _resume_state(out: TokensDir, identity: dict, vocab_size: int) -> dict:
    """What an interrupted run with the same identity finished, each split's shards checked against the CRCs it
    recorded; {} to start afresh (then everything an earlier run left in the folder goes, except the tokenizer
    just saved)."""
    try:
        saved = json.loads(out.progress.read_text())
        state = {k: v for k, v in saved.items() if k != "sha256"}
        if saved.get("sha256") != _state_digest(state):
            raise ValueError("progress.json does not match its checksum")
        if state.get("identity") != identity:
            raise ValueError("other inputs or params")
        for split in SPLITS:
            check_resume(out, split, state[split], vocab_size)
        return {split: state[split] for split in SPLITS}
    except (OSError, ValueError, KeyError, TypeError, UserError):
        pass
    _clear(out)
    return {}


def _reread_digests(prepared_dir: str | Path, resume: dict) -> dict:
    """Each split's text up to where the interrupted run stopped, read again and hashed as that run hashed it
    (reading and hashing is fast next to encoding; the documents are not encoded again)."""
    digests = {split: hashlib.sha256() for split in SPLITS}
    until = {split: resume[split]["position"] for split in SPLITS}
    if any(until.values()):
        for i, (split, text) in enumerate(iter_documents(prepared_dir)):
            if i < until[split]:
                hash_documents(digests[split], [text])
            if all(i + 1 >= position for position in until.values()):
                break
    return digests


def _clear(out: TokensDir) -> None:
    for path in out.root.iterdir():
        if path.name not in ("tokenizer.new", MARKER):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
