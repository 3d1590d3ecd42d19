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

from pipeline.config import TokenizeConfig
from pipeline.errors import UserError
from pipeline.files import MARKER, resumable_dir, write_json_atomic
from pipeline.layout import SPLITS, PreparedDir, TokensDir
from pipeline.prepare.documents import iter_documents, iter_prepared, read_manifest, text_bytes
from pipeline.tokenize.tokenizers import Tokenizer, build_tokenizer
from pipeline.tokens import HEADER_BYTES, VERSION, TokenWriter, describe_tokens, open_tokens, token_dtype


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
    """One split's ids into shards of exactly shard_tokens: finished shards are whole token files, the one being
    filled is a TokenWriter's .tmp. state() is what a resumed run needs to carry on from here, and what it checks
    first: each finished shard's CRC, the partial shard's, and the sha256 of the text encoded so far."""

    def __init__(self, out: TokensDir, split: str, tok: Tokenizer, shard_tokens: int, resume: dict | None = None,
                 text_digest=None):
        self.out, self.split, self.tok, self.shard_tokens = out, split, tok, shard_tokens
        state = resume or {"shards": [], "crc32": [], "partial": 0, "position": 0, "documents": 0, "text_bytes": 0}
        self.shards, self.crcs, self.position = list(state["shards"]), list(state["crc32"]), state["position"]
        self.documents, self.text_bytes = state["documents"], state["text_bytes"]
        self.digest = text_digest or hashlib.sha256()
        self.current = TokenWriter(out.shard(split, len(self.shards)), tok.vocab_size, tok.eot_id, keep=state["partial"])
        if resume and self.current.crc != state["partial_crc32"]:
            raise ValueError(f"{self.current.tmp.name} is not the partial shard progress.json recorded")

    @property
    def tokens(self) -> int:
        return sum(self.shards) + self.current.count

    def write(self, chunk: Chunk, ids: np.ndarray) -> bool:
        """Append a chunk's ids; True when a shard was finished."""
        finished = False
        while ids.size:
            room = self.shard_tokens - self.current.count
            self.current.write(ids[:room])
            ids = ids[room:]
            if self.current.count == self.shard_tokens:
                self.current.close()
                self.shards.append(self.shard_tokens)
                self.crcs.append(self.current.crc)
                self.current = TokenWriter(self.out.shard(self.split, len(self.shards)), self.tok.vocab_size, self.tok.eot_id)
                finished = True
        self.position, self.documents, self.text_bytes = chunk.end, self.documents + len(chunk.docs), self.text_bytes + chunk.size
        hash_documents(self.digest, chunk.docs)
        return finished

    def state(self) -> dict:
        self.current.file.flush()  # the partial shard's bytes reach the file before the state that counts them
        return {"shards": self.shards, "crc32": self.crcs, "partial": self.current.count, "partial_crc32": self.current.crc,
                "position": self.position, "documents": self.documents, "text_bytes": self.text_bytes,
                "text_sha256": self.digest.hexdigest()}

    def close(self) -> dict:
        if self.current.count or not self.shards:  # an exact multiple of shard_tokens leaves an empty writer
            self.current.close()
            self.shards.append(self.current.count)
            self.crcs.append(self.current.crc)
        else:
            self.current.abort()
        # Every shard is read back against the CRC recorded as it was written before the folder is published:
        # a shard damaged on disk since (or swapped for another) never reaches train.
        for index, (count, crc) in enumerate(zip(self.shards, self.crcs)):
            shard = open_tokens(self.out.shard(self.split, index), verify=True)
            if (shard.count, shard.crc32) != (count, crc):
                raise UserError(f"{shard.path}: not the shard this run wrote (its ids changed on disk); rerun tokenize")
        return {"documents": self.documents, "tokens": sum(self.shards), "text_bytes": self.text_bytes, "shards": self.shards}


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
        resume = _resume_state(out, identity, token_dtype(tok.vocab_size).itemsize)
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


def _resume_state(out: TokensDir, identity: dict, itemsize: int) -> dict:
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
            s = state[split]
            finished = [open_tokens(out.shard(split, i), verify=True) for i in range(len(s["shards"]))]
            if [(f.count, f.crc32) for f in finished] != list(zip(s["shards"], s["crc32"])):
                raise ValueError("a finished shard does not match")
            shard = out.shard(split, len(s["shards"]))
            partial = shard.with_name(shard.name + ".tmp")
            if s["partial"] and not partial.exists() and shard.exists():
                os.replace(shard, partial)  # killed after this shard was finished, before the state that says so
            if s["partial"] and partial.stat().st_size < HEADER_BYTES + s["partial"] * itemsize:
                raise ValueError("the partial shard is short")
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
