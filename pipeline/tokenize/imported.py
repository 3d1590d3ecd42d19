"""tokenize.kind: import. Token ids made elsewhere become gptpipe token folders, split by split, with no text to
encode: nanoGPT's data folders (train.bin, val.bin: uint16 ids; char-level with a meta.pkl, else tiktoken's gpt2, which
ids all below 256 are not unless tokenize.import_encoding says so) and gptpipe token folders, several of them
concatenated when they share one tokenizer (what a `cat` of token files, refused by their headers, was meant to do).

meta.pkl is a pickle: a regular file of at most 1 MB whose opcodes are checked first, then read by an unpickler that
builds no object but dicts, lists, strings and numbers, so a file that would run code (or ask for gigabytes) is refused
before anything runs, and any damage is one message."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pipeline.config.tokenize import TokenizeConfig
from pipeline.errors import UserError
from pipeline.files import MARKER, absent, resumable_dir, write_json_atomic
from pipeline.layout import SPLITS, TokensDir
from pipeline.tokenize.tokenizers import CharTokenizer, TiktokenTokenizer, Tokenizer, ids_difference, load_tokenizer
from pipeline.tokens import ShardWriter, describe_tokens, open_split, read_meta

KEY = "tokenize.import_dirs"
BLOCK = 1 << 24  # ids read, checked and written at a time: bounded memory whatever the size of train.bin


@dataclass
class Source:
    """One folder to import: its tokenizer, and per split a function giving its ids in blocks (already in the
    tokenizer's ids), the UTF-8 bytes they stand for and their document count."""

    folder: Path
    tokenizer: Tokenizer
    blocks: dict[str, Callable[[], Iterator[np.ndarray]]]
    text_bytes: dict[str, int | None]  # None: counted from the ids as they are copied
    documents: dict[str, int | None]


class OnlyPlainData(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings and numbers only: any class or function the pickle names is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}")


META_PKL_BYTES = 1 << 20  # nanoGPT's meta.pkl is about 1 KB (65 characters); a bigger file is not one
# The opcodes plain data needs (containers, strings, numbers, the memo); any other (a class, a call, a persistent id,
# an extension, a buffer) is refused before loading.
PLAIN_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP EMPTY_DICT DICT SETITEM SETITEMS EMPTY_LIST LIST APPEND APPENDS EMPTY_TUPLE "
    "TUPLE TUPLE1 TUPLE2 TUPLE3 UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8 STRING BINSTRING SHORT_BINSTRING INT "
    "BININT BININT1 BININT2 LONG LONG1 LONG4 NONE NEWTRUE NEWFALSE FLOAT BINFLOAT PUT BINPUT LONG_BINPUT MEMOIZE GET "
    "BINGET LONG_BINGET".split()
)
CONTAINER_OPCODES = frozenset("EMPTY_DICT DICT EMPTY_LIST LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3".split())
MAX_CONTAINERS = 64  # nanoGPT's holds three dicts; the bound keeps nesting shallow for the hashing and comparing after
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
               OverflowError, MemoryError, RecursionError)  # what loading hostile bytes raises: the file's fault


def check_opcodes(data: bytes) -> None:
    """Raise UnpicklingError at the first opcode plain data has no use for, or a memo index no pickler writes (the
    unpickler would size its memo to it: a 10-byte file asking for gigabytes), before anything is loaded."""
    containers, strings = 0, []
    for n, (op, arg, pos) in enumerate(pickletools.genops(data)):
        if op.name in ("GLOBAL", "STACK_GLOBAL"):
            raise pickle.UnpicklingError(f"it names {arg.replace(' ', '.') if arg else '.'.join(strings[-2:])}")
        if op.name not in PLAIN_OPCODES:
            raise pickle.UnpicklingError(f"opcode {op.name} at byte {pos}, which plain data has no use for")
        if isinstance(arg, str):
            strings.append(arg)
        if op.name.endswith(("PUT", "GET")) and not 0 <= arg <= n:  # picklers number the memo 0, 1, ... as they go
            raise pickle.UnpicklingError(f"memo index {arg:,} at byte {pos}, past the {n} opcodes before it")
        containers += op.name in CONTAINER_OPCODES
        if containers > MAX_CONTAINERS:
            raise pickle.UnpicklingError(f"more than {MAX_CONTAINERS} dicts, lists and tuples")


def meta_pkl_bytes(path: Path) -> bytes:
    """The bytes of a meta.pkl that is a regular file of at most META_PKL_BYTES (checked before opening: a FIFO
    would block the read)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{KEY}: {path} {absent(path)}: a nanoGPT folder's meta.pkl is the file of its characters that "
                            "nanoGPT's prepare.py writes; put that file there (or remove this one if the ids are GPT-2's)")
        if info.st_size > META_PKL_BYTES:
            raise UserError(f"{KEY}: {path} is {info.st_size:,} bytes: nanoGPT's meta.pkl is a few KB, and more than "
                            f"{META_PKL_BYTES:,} is refused unread")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, should it have become a FIFO since
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UserError(f"{KEY}: {path} is not a regular file")
            data = f.read(META_PKL_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{KEY}: {path} is a broken link: put nanoGPT's meta.pkl there, or remove the link") from None
    except OSError as e:
        raise UserError(f"{KEY}: {path} could not be read ({e.strerror or e})") from None
    if len(data) > META_PKL_BYTES:
        raise UserError(f"{KEY}: {path} is more than {META_PKL_BYTES:,} bytes: nanoGPT's meta.pkl is a few KB; refused")
    return data


def read_nanogpt_meta(path: Path) -> dict:
    """nanoGPT's meta.pkl: {"vocab_size": int, "itos": {int: str}, "stoi": {str: int}}, checked. Whatever the bytes,
    the outcome is this dict or one UserError naming the file."""
    data = meta_pkl_bytes(path)
    try:
        check_opcodes(data)
        meta = OnlyPlainData(io.BytesIO(data)).load()
    except LOAD_ERRORS as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{KEY}: {path} is not a nanoGPT meta.pkl of plain data ({reason}); refused, nothing in it ran") from None
    itos = meta.get("itos") if isinstance(meta, dict) else None
    size = meta.get("vocab_size") if isinstance(meta, dict) else None
    if (not isinstance(itos, dict) or type(size) is not int
            or not all(type(i) is int and type(s) is str for i, s in itos.items())):
        raise UserError(f"{KEY}: {path} is not nanoGPT's meta.pkl (a dict with vocab_size: int and itos: {{id: character}})")
    if size < 1:
        raise UserError(f"{KEY}: {path}: vocab_size is {size}: nanoGPT's char data has at least one character")
    if size != len(itos) or set(itos) != set(range(size)):  # the size first: range(2**62) is never built
        raise UserError(f"{KEY}: {path}: itos does not hold ids 0..{size - 1}, one each (vocab_size {size}, {len(itos)} ids)")
    if any(len(s) != 1 for s in itos.values()) or len(set(itos.values())) != len(itos):
        raise UserError(f"{KEY}: {path}: itos maps ids to single distinct characters in nanoGPT's char datasets; this one does not")
    for i, s in itos.items():
        if 0xD800 <= ord(s) <= 0xDFFF:
            raise UserError(f"{KEY}: {path}: itos maps id {i} to {s!r}, a lone UTF-16 surrogate: not a character text can hold")
    if "stoi" in meta and meta["stoi"] != {s: i for i, s in itos.items()}:
        raise UserError(f"{KEY}: {path}: stoi is not the inverse of itos (nanoGPT writes one from the other)")
    return meta


CHAR_IDS = 256  # nanoGPT char data without meta.pkl: every id below this; GPT-2 text reaches far past it at once


def largest_id(paths, stop_at: int) -> int | None:
    """The largest uint16 id in these files (None: no ids), or the first one at least stop_at: GPT-2 data stops at once."""
    top = None
    for path in paths:
        data = np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size else np.zeros(0, np.uint16)
        for start in range(0, len(data), BLOCK):
            top = max(top or 0, int(data[start : start + BLOCK].max()))
            if top >= stop_at:
                return top
    return top


def nanogpt_source(folder: Path, encoding: str = "auto") -> Source:
    files = {split: folder / f"{split}.bin" for split in SPLITS}
    for path in files.values():
        if not path.is_file():
            raise UserError(f"{KEY}: {path} {absent(path)} (a nanoGPT data folder holds train.bin and val.bin)")
        if path.stat().st_size % 2:
            raise UserError(f"{KEY}: {path} is {path.stat().st_size:,} bytes, not a whole number of uint16 ids")
    meta_path = folder / "meta.pkl"
    if os.path.lexists(meta_path):  # a folder, a FIFO or a broken link too: refused, not taken for "no meta.pkl"
        itos = read_nanogpt_meta(meta_path)["itos"]
        tok = CharTokenizer(itos.values(), "unk")
        # nanoGPT's id -> gptpipe's (the same when itos is sorted, as nanoGPT's prepare.py writes it)
        remap = np.array([tok.encode(itos[i])[0] for i in range(len(itos))], dtype=np.uint32)
        what = f"char ids of {meta_path}"
    else:
        top = largest_id(files.values(), stop_at=CHAR_IDS) if encoding == "auto" else None
        if top is not None and top < CHAR_IDS:
            raise UserError(f"{KEY}: {folder} has no meta.pkl and every id in its train.bin and val.bin is below {CHAR_IDS} (the "
                            f"largest is {top}): that is nanoGPT character data without its meta.pkl, not GPT-2 ids. Copy the "
                            "meta.pkl nanoGPT's prepare.py wrote beside train.bin into the folder, or, if these really are "
                            "tiktoken gpt2 ids, set tokenize.import_encoding: gpt2")
        tok, remap, what = TiktokenTokenizer("gpt2"), None, "tiktoken gpt2 ids (no meta.pkl)"
    limit = len(remap) if remap is not None else tok.vocab_size

    def blocks(path: Path) -> Callable[[], Iterator[np.ndarray]]:
        def read() -> Iterator[np.ndarray]:
            data = np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size else np.zeros(0, np.uint16)
            for start in range(0, len(data), BLOCK):
                ids = np.asarray(data[start : start + BLOCK])
                if ids.size and int(ids.max()) >= limit:
                    at = start + int(np.argmax(ids >= limit))
                    raise UserError(f"{KEY}: {path} holds id {int(data[at])} at position {at:,}, outside the {limit:,} {what}")
                yield remap[ids] if remap is not None else ids

        return read

    return Source(folder, tok, {s: blocks(p) for s, p in files.items()}, {s: None for s in SPLITS}, {s: None for s in SPLITS})


def tokens_source(folder: Path) -> Source:
    meta = read_meta(folder)
    tok = load_tokenizer(TokensDir(folder).tokenizer)
    splits = {split: open_split(TokensDir(folder), split, meta) for split in SPLITS}

    def blocks(split: str) -> Callable[[], Iterator[np.ndarray]]:
        def read() -> Iterator[np.ndarray]:
            shards = splits[split]
            for start in range(0, len(shards), BLOCK):
                yield np.asarray(shards[start : start + BLOCK])

        return read

    info = meta.get("splits", {})
    return Source(folder, tok, {s: blocks(s) for s in SPLITS}, {s: info.get(s, {}).get("text_bytes") for s in SPLITS},
                  {s: info.get(s, {}).get("documents") for s in SPLITS})


def imported_ids(paths: list[str]) -> int:
    """How many ids importing these folders copies (for a progress bar): file sizes only, nothing read."""
    total = 0
    for path in map(Path, paths):
        meta = TokensDir(path).meta
        if meta.is_file():
            total += read_meta(path).get("tokens", 0)
        else:
            total += sum((path / f"{s}.bin").stat().st_size // 2 for s in SPLITS if (path / f"{s}.bin").is_file())
    return total


def open_source(path: str, encoding: str = "auto") -> Source:
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{KEY}: {folder} {absent(folder, folder=True)}")
    if TokensDir(folder).meta.is_file():
        return tokens_source(folder)
    if (folder / "train.bin").is_file() or (folder / "val.bin").is_file():
        return nanogpt_source(folder, encoding)
    raise UserError(f"{KEY}: {folder} is neither a gptpipe token folder (meta.json) nor a nanoGPT data folder (train.bin, val.bin)")


def id_bytes(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for end-of-text), so bits per byte can be had without decoding the text."""
    if isinstance(tok, TiktokenTokenizer):
        sizes = [len(tok.enc.decode_single_token_bytes(i)) for i in range(tok.vocab_size)]
    else:
        sizes = [len(tok.decode([i]).encode("utf-8")) for i in range(tok.vocab_size)]
    sizes[tok.eot_id] = 0
    return np.array(sizes, dtype=np.int64)


def import_tokens(cfg: TokenizeConfig, progress: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """Every folder of cfg.import_dirs into cfg.out_dir, split by split in their order; (meta, throughput) as
    tokenize_corpus gives them. The folder is built beside out_dir and swapped in whole. progress(n): n ids copied."""
    start = time.perf_counter()
    sources = [open_source(path, cfg.import_encoding) for path in cfg.import_dirs]
    tok = sources[0].tokenizer
    for other in sources[1:]:
        difference = ids_difference(tok, other.tokenizer, str(sources[0].folder), str(other.folder))
        if difference and (tok.kind, tok.vocab_size) != (other.tokenizer.kind, other.tokenizer.vocab_size):
            raise UserError(f"{KEY}: {other.folder} uses other token ids ({other.tokenizer.kind}, {other.tokenizer.vocab_size} ids) than"
                            f" {sources[0].folder} ({tok.kind}, {tok.vocab_size} ids): only folders of one tokenizer can be combined")
        if difference:
            raise UserError(f"{KEY}: {other.folder} uses other token ids than {sources[0].folder}: {difference}; only folders "
                            "of one tokenizer can be combined")
    sizes = id_bytes(tok) if any(None in s.text_bytes.values() for s in sources) else None
    with resumable_dir(cfg.out_dir, "tokenize.out_dir") as folder:
        out = TokensDir(folder)
        for path in folder.iterdir():  # nothing of an earlier, interrupted run is kept: copying is fast
            if path.name != MARKER:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        tok.save(out.tokenizer)
        splits = {}
        for split in SPLITS:
            text, documents = 0, 0
            writer = ShardWriter(out, split, tok.vocab_size, tok.eot_id, cfg.shard_tokens)
            for source in sources:
                counted = 0
                for ids in source.blocks[split]():
                    writer.write(ids)
                    if source.text_bytes[split] is None:
                        text += int(sizes[ids].sum())
                    counted += int((ids == tok.eot_id).sum())
                    if progress:
                        progress(ids.size)
                count_here = source.documents[split]
                documents += count_here if count_here is not None else max(counted, 1)
                text += source.text_bytes[split] or 0
            shards = writer.close()
            count = sum(shards)
            splits[split] = {"documents": documents, "tokens": count, "text_bytes": text, "shards": shards}
        for split, info in splits.items():
            if split == "train" and info["tokens"] < 2:
                raise UserError(f"{KEY}: the train split has {info['tokens']} token(s) in {', '.join(cfg.import_dirs)}: nothing to train on")
        meta = describe_tokens(tok, splits, cfg.model_dump(mode="json", exclude={"workers", "chunk_bytes", "out_dir", "metrics_file"}))
        write_json_atomic(out.meta, meta)
    seconds = round(time.perf_counter() - start, 3)
    throughput = {"tokens": meta["tokens"], "text_bytes": meta["text_bytes"], "seconds": seconds,
                  "tokens_per_s": round(meta["tokens"] / max(seconds, 1e-9)), "imported_from": list(cfg.import_dirs)}
    return meta, throughput
