"""The token file format (a header with magic, version, dtype, vocabulary and count, then the ids, CRC-checked),
a split's shards written (resumably) and read as one sequence."""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UserError
from pipeline.files import absent
from pipeline.layout import TokensDir

if TYPE_CHECKING:
    pass


MAGIC = b"GPTPTOK1"


VERSION = 1


HEADER_BYTES = 64


# magic, version, dtype code, vocab_size, token count, crc32 of the payload, eot_id; zero-padded to 64 bytes.
HEADER = struct.Struct("<8sIIQQII")


DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


VERIFY_BLOCK = 1 << 24  # tokens per step when verifying: bounded memory whatever the file size


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50257 does), else uint32."""
    return DTYPES[1] if vocab_size <= 1 << 16 else DTYPES[2]


class TokenWriter:
    """Stream ids into a token file: written to <path>.tmp, moved into place only when closed without error.

    with TokenWriter(path, vocab_size, eot_id) as w:
        w.write(ids)
    """

    def __init__(self, path: str | Path, vocab_size: int, eot_id: int, keep: int = 0):
        """keep > 0 continues an interrupted writer whose <path>.tmp holds at least keep ids: the rest is cut off."""
        self.path = Path(path)
        self.tmp = self.temporary(self.path)
        self.vocab_size, self.eot_id = vocab_size, eot_id
        self.dtype = token_dtype(vocab_size)
        self.count, self.crc = 0, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep:
            self.file = open(self.tmp, "r+b")
            self.file.truncate(HEADER_BYTES + keep * self.dtype.itemsize)
            self.file.seek(HEADER_BYTES)
            while block := self.file.read(VERIFY_BLOCK):
                self.crc = zlib.crc32(block, self.crc)
            self.count = keep
        else:
            self.file = open(self.tmp, "wb")
            self.file.write(bytes(HEADER_BYTES))  # the real header goes in on close, once count and crc are known

    @staticmethod
    def temporary(path: Path) -> Path:
        """Where the file is written until it is closed."""
        return path.with_name(path.name + ".tmp")

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"{self.path}: id {int(ids.max())} out of range for vocab_size {self.vocab_size}")
        payload = np.ascontiguousarray(ids, dtype=self.dtype)
        self.file.write(payload.data)
        self.crc = zlib.crc32(payload.data, self.crc)
        self.count += payload.size

    def close(self) -> None:
        code = next(c for c, d in DTYPES.items() if d == self.dtype)
        self.file.seek(0)
        self.file.write(HEADER.pack(MAGIC, VERSION, code, self.vocab_size, self.count, self.crc, self.eot_id))
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_tokens(path: str | Path, ids: np.ndarray, vocab_size: int, eot_id: int) -> None:
    """Write a whole token file at once (tests, small files)."""
    with TokenWriter(path, vocab_size, eot_id) as w:
        w.write(ids)


class ShardWriter:
    """A split's ids into shards of exactly shard_tokens ids (train-00000.bin, ...; the last one shorter), so the files
    do not depend on how the ids arrive. Finished shards are whole token files, the one being filled a TokenWriter's
    temporary file. state() is what a new writer needs to carry on from there (resume=, after check_resume)."""

    def __init__(self, out: TokensDir, split: str, vocab_size: int, eot_id: int, shard_tokens: int, resume: dict | None = None):
        """resume: the state() of an interrupted writer of this split; ValueError when its partial shard is not that."""
        self.out, self.split, self.vocab_size, self.eot_id, self.shard_tokens = out, split, vocab_size, eot_id, shard_tokens
        state = resume or {"shards": [], "crc32": [], "partial": 0}
        self.shards, self.crcs = list(state["shards"]), list(state["crc32"])
        self.current = TokenWriter(out.shard(split, len(self.shards)), vocab_size, eot_id, keep=state["partial"])
        if resume and self.current.crc != state["partial_crc32"]:
            self.current.file.close()
            raise ValueError(f"{self.current.tmp.name} is not the partial shard the resume state recorded")

    @property
    def tokens(self) -> int:
        return sum(self.shards) + self.current.count

    def write(self, ids: np.ndarray) -> bool:
        """Append ids; True when a shard was finished."""
        finished = False
        while ids.size:
            room = self.shard_tokens - self.current.count
            self.current.write(ids[:room])
            ids = ids[room:]
            if self.current.count == self.shard_tokens:
                self.current.close()
                self.shards.append(self.shard_tokens)
                self.crcs.append(self.current.crc)
                self.current = TokenWriter(self.out.shard(self.split, len(self.shards)), self.vocab_size, self.eot_id)
                finished = True
        return finished

    def state(self) -> dict:
        """Each finished shard's count and CRC, and the partial shard's: JSON, for a resumed writer."""
        self.current.file.flush()  # the partial shard's bytes reach the file before the state that counts them
        return {"shards": list(self.shards), "crc32": list(self.crcs), "partial": self.current.count, "partial_crc32": self.current.crc}

    def close(self) -> list[int]:
        """Finish the last shard; every shard's token count. Each shard is read back against the CRC recorded as it
        was written first: a shard damaged on disk since (or swapped for another) never reaches train."""
        if self.current.count or not self.shards:  # an exact multiple of shard_tokens leaves an empty writer
            self.current.close()
            self.shards.append(self.current.count)
            self.crcs.append(self.current.crc)
        else:
            self.current.abort()
        for index, (count, crc) in enumerate(zip(self.shards, self.crcs)):
            shard = open_tokens(self.out.shard(self.split, index), verify=True)
            if (shard.count, shard.crc32) != (count, crc):
                raise UserError(f"{shard.path}: not the shard this run wrote (its ids changed on disk); rerun tokenize")
        return list(self.shards)


def check_resume(out: TokensDir, split: str, state: dict, vocab_size: int) -> None:
    """ValueError unless the files in out are what a ShardWriter's state() says: each finished shard whole, with its
    recorded count and CRC, and the partial shard at least as long (ShardWriter checks its CRC as it resumes)."""
    try:
        finished = [open_tokens(out.shard(split, i), verify=True) for i in range(len(state["shards"]))]
        if [(f.count, f.crc32) for f in finished] != list(zip(state["shards"], state["crc32"])):
            raise ValueError("a finished shard does not match")
        shard = out.shard(split, len(state["shards"]))
        partial = TokenWriter.temporary(shard)
        if state["partial"] and not partial.exists() and shard.exists():
            os.replace(shard, partial)  # killed after this shard was finished, before the state that says so
        if state["partial"] and partial.stat().st_size < HEADER_BYTES + state["partial"] * token_dtype(vocab_size).itemsize:
            raise ValueError("the partial shard is short")
    except (OSError, KeyError, TypeError, UserError) as e:
        raise ValueError(f"{out.root} ({split}): {e}") from e


@dataclass
class TokenFile:
    """A token file's header and its ids as a read-only memory map."""

    path: Path
    version: int
    dtype: np.dtype
    vocab_size: int
    eot_id: int
    count: int
    crc32: int
    tokens: np.ndarray

    def __len__(self) -> int:
        return self.count


def open_tokens(path: str | Path, verify: bool = False) -> TokenFile:
    """Open a token file, checking its header and size; verify=True also checks the crc and every id."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: token file {absent(path)}; run the tokenize stage")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise UserError(f"{path}: {size} bytes, too small to be a token file (the header alone is {HEADER_BYTES})")
    magic, version, code, vocab_size, count, crc, eot_id = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise UserError(f"{path}: not a gptpipe token file (starts with {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise UserError(f"{path}: token file format version {version}; this gptpipe reads version {VERSION}, rerun tokenize")
    if code not in DTYPES:
        raise UserError(f"{path}: unknown dtype code {code} in the header (known: {sorted(DTYPES)})")
    dtype = DTYPES[code]
    if vocab_size > 1 << (8 * dtype.itemsize) or not 0 <= eot_id < vocab_size:
        raise UserError(f"{path}: inconsistent header (vocab_size {vocab_size}, eot_id {eot_id}, dtype {dtype.name})")
    payload = size - HEADER_BYTES
    if payload < count * dtype.itemsize:
        raise UserError(f"{path}: truncated: the header declares {count:,} tokens ({count * dtype.itemsize:,} bytes) "
                        f"but the file holds {payload:,} bytes after the header; rerun the tokenize stage")
    if payload > count * dtype.itemsize:
        raise UserError(f"{path}: {payload - count * dtype.itemsize:,} unexpected bytes after the {count:,} tokens "
                        "the header declares; rerun the tokenize stage")
    if count:
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    else:  # mmap cannot map zero bytes
        tokens = np.empty(0, dtype=dtype)
        tokens.flags.writeable = False
    file = TokenFile(path, version, dtype, vocab_size, eot_id, count, crc, tokens)
    if verify:
        verify_tokens(file)
    return file


def verify_tokens(file: TokenFile) -> None:
    """Check the payload's crc32 and that every id is below vocab_size, block by block."""
    crc, top = 0, -1
    for start in range(0, file.count, VERIFY_BLOCK):
        block = np.ascontiguousarray(file.tokens[start : start + VERIFY_BLOCK])
        crc = zlib.crc32(block.data, crc)
        top = max(top, int(block.max()))
    if crc != file.crc32:
        raise UserError(f"{file.path}: corrupt: crc32 of the tokens is {crc:08x}, the header says {file.crc32:08x}")
    if top >= file.vocab_size:
        raise UserError(f"{file.path}: holds token id {top}, not below the header's vocab_size {file.vocab_size}")


class TokenShards:
    """A split's shards read as one sequence of ids: len(), and slices that may cross from one shard to the next
    (a view into the memory map when they do not). It has a token file's header fields, so readers need not care."""

    def __init__(self, files: list[TokenFile], name: str):
        self.files, self.path = files, name
        self.vocab_size, self.eot_id, self.dtype = files[0].vocab_size, files[0].eot_id, files[0].dtype
        self.offsets = np.cumsum([0] + [f.count for f in files])
        self.count = int(self.offsets[-1])
        # One shard: its own crc, as a single file had; more: a crc of the shards' crcs (the run identity's data key).
        self.crc32 = files[0].crc32 if len(files) == 1 else zlib.crc32(b"".join(f.crc32.to_bytes(4, "little") for f in files))

    def __len__(self) -> int:
        return self.count

    @property
    def tokens(self) -> TokenShards:
        return self

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("token shards are read in contiguous slices")
        start, stop, _ = key.indices(self.count)
        if start >= stop:
            return self.files[0].tokens[:0]
        first = int(np.searchsorted(self.offsets, start, "right")) - 1
        last = int(np.searchsorted(self.offsets, stop, "left")) - 1
        pieces = [self.files[i].tokens[max(start - self.offsets[i], 0) : stop - self.offsets[i]] for i in range(first, last + 1)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


def open_split(tokens: TokensDir, split: str, meta: dict, verify: bool = True) -> TokenShards:
    """A split's shards, each checked (verify: its CRC and ids too), agreeing with meta.json on the vocabulary and
    on how many shards of how many tokens there are."""
    paths = tokens.shards(split)
    expected = (meta.get("splits") or {}).get(split, {}).get("shards")
    if not paths:
        raise UserError(f"{tokens.root}: no {split} token files ({split}-00000.bin ...); run the tokenize stage")
    files = [open_tokens(p, verify=verify) for p in paths]
    if expected is not None and [f.count for f in files] != expected:
        raise UserError(f"{tokens.root}: the {split} shards hold {[f.count for f in files]} tokens but {tokens.meta} says "
                        f"{expected}: a shard is missing or from another run; rerun the tokenize stage")
    for file in files:
        if (file.vocab_size, file.eot_id) != (meta.get("vocab_size"), meta.get("eot_id")):
            raise UserError(f"{file.path}: the header says vocab_size={file.vocab_size}, eot_id={file.eot_id} but {tokens.meta} "
                            f"says {meta.get('vocab_size')}, {meta.get('eot_id')}: the folder mixes two tokenize runs; rerun tokenize")
    return TokenShards(files, f"{tokens.root / split}-*.bin")


def describe_tokens(tokenizer, splits: dict[str, dict], params: dict) -> dict:
    """meta.json: what a token folder holds (tokenizer, ids, file format, each split's counts) and the params that
    made it; the tokenize stage and an import (tokenize.kind: import) write the same thing."""
    return {
        "tokenizer": tokenizer.describe(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "format": {"magic": MAGIC.decode(), "version": VERSION, "header_bytes": HEADER_BYTES},
        "splits": splits,
        "tokens": sum(s["tokens"] for s in splits.values()),
        "text_bytes": sum(s["text_bytes"] for s in splits.values()),
        "params": params,
    }


def read_meta(tokens_dir: str | Path) -> dict:
    """The tokenize stage's meta.json: vocab size, end-of-text id, token counts; every key a reader uses checked, so
    a damaged file is one message naming the file and the key."""
    path = TokensDir(tokens_dir).meta
    if not path.is_file():
        raise UserError(f"{path} {absent(path)}: run the tokenize stage first (dvc repro tokenize)")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path}: not valid JSON; rerun the tokenize stage") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: not the tokenize stage's meta.json; rerun the tokenize stage")
    problem = meta_problem(meta)
    if problem:
        raise UserError(f"{path}: {problem}: the file is damaged; rerun the tokenize stage")
    return meta


def meta_problem(meta: dict) -> str | None:
    """What is wrong with a meta.json's keys, naming the key; None when vocab_size and eot_id are there and every
    count present is a whole number."""

    def count(value, low: int = 0, high: int = 1 << 62) -> bool:
        return type(value) is int and low <= value <= high

    def shown(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 40 else text[:40] + "..."

    if "vocab_size" not in meta or "eot_id" not in meta:
        return f"`{'vocab_size' if 'vocab_size' not in meta else 'eot_id'}` is missing"
    if not count(meta["vocab_size"], 1, 1 << 32):
        return f"`vocab_size` is {shown(meta['vocab_size'])}, not a vocabulary size (a whole number from 1 to 2**32)"
    if not count(meta["eot_id"], 0, 1 << 32):  # below vocab_size too: open_split holds both against the shards' headers
        return f"`eot_id` is {shown(meta['eot_id'])}, not a token id"
    for key in ("tokens", "text_bytes"):
        if key in meta and not count(meta[key]):
            return f"`{key}` is {shown(meta[key])}, not a count"
    if "tokenizer" in meta and not isinstance(meta["tokenizer"], dict):
        return f"`tokenizer` is {shown(meta['tokenizer'])}, not a description of the tokenizer"
    splits = meta.get("splits", {})
    if not isinstance(splits, dict) or not all(isinstance(s, dict) for s in splits.values()):
        return f"`splits` is {shown(splits)}, not {{split: counts}}"
    for split, info in splits.items():
        for key in ("documents", "tokens", "text_bytes"):
            if key in info and not count(info[key]):
                return f"`splits.{split}.{key}` is {shown(info[key])}, not a count"
        if "shards" in info and not (isinstance(info["shards"], list) and all(count(n) for n in info["shards"])):
            return f"`splits.{split}.shards` is {shown(info['shards'])}, not a list of token counts"
    return None


def first_position(shards: TokenShards, token_id: int) -> int | None:
    """Where token_id first occurs in a split (None: nowhere), block by block: train.document_mask needs the
    end-of-text id in the data, and a split that has it has it early."""
    for start in range(0, len(shards), VERIFY_BLOCK):
        hits = np.flatnonzero(np.asarray(shards[start : start + VERIFY_BLOCK]) == token_id)
        if hits.size:
            return start + int(hits[0])
    return None
