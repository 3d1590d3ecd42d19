"""The plan: each source document's fate (too short, duplicate, train, val, or the tail split's cut), decided in one
pass in bounded memory, written one byte a document to plan.bin, and followed to read the sources again."""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from pipeline.config.prepare import PrepareConfig, SourceConfig
from pipeline.errors import UserError
from pipeline.output import ProgressFactory
from pipeline.prepare.formats import SourceStats, unify_newlines
from pipeline.prepare.sources import iter_source

JSON_LINE = json.JSONEncoder(ensure_ascii=False)  # one encoder for every document: json.dumps builds one per call


def normalize(text: str, nfc: bool) -> str:
    """One newline convention ("\\n"), NFC when asked, no surrounding whitespace."""
    if "\r" in text:  # one scan; most text has none, and tokenize calls this for every document again (store: index)
        text = unify_newlines(text)
    if nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):  # ASCII is NFC: isascii() is O(1)
        text = unicodedata.normalize("NFC", text)
    return text.strip()


def split_of(data: bytes, seed: int, val_fraction: float) -> tuple[str, float]:
    """(split, position) of a normalised document's UTF-8 bytes: val when its position is below val_fraction.

    The position in [0, 1) is a keyed hash, independent of the order and of the rest of the corpus.
    """
    digest = hashlib.blake2b(b"%d\0" % seed, digest_size=8)
    digest.update(data)
    position = int.from_bytes(digest.digest(), "big") / 2**64
    return ("val" if position < val_fraction else "train"), position


# What becomes of each source document, in the order the sources yield it: one byte each (plan.bin for store: index).
SHORT, DUPLICATE, TRAIN, VAL, CUT = range(5)  # CUT: split: tail's boundary document, its head in train, the rest in val


CODE = {"train": TRAIN, "val": VAL}


BLOCK = 1 << 20  # documents per numpy step over the per-document columns: memory stays flat whatever the corpus


def roles(cfg: PrepareConfig) -> list[tuple[str, SourceConfig, str]]:
    """(params key, source, the split its documents go to before any hash split)."""
    return [("source", cfg.source, "train")] + ([("val_source", cfg.val_source, "val")] if cfg.val_source else [])


class _Column:
    """A growing array of one number per document, kept in a file rather than in memory."""

    def __init__(self, path: Path, dtype: str):
        self.path, self.dtype, self.values = path, np.dtype(dtype), []
        path.write_bytes(b"")

    def append(self, value: int) -> None:
        self.values.append(value)
        if len(self.values) >= 1 << 16:
            self.flush()

    def flush(self) -> None:
        with open(self.path, "ab") as f:
            np.asarray(self.values, dtype=self.dtype).tofile(f)
        self.values.clear()

    def done(self) -> np.ndarray:
        """The whole column, memory-mapped read-write."""
        self.flush()
        return np.memmap(self.path, self.dtype, "r+") if self.path.stat().st_size else np.zeros(0, self.dtype)


class _Digests:
    """Exact deduplication in bounded memory. Each document's 16-byte digest and index go to one of 256 bucket
    files by the digest's first byte; at the end each bucket is sorted on its own and every repeat of a digest
    after its first document is a duplicate. (A Python set costs about 100 bytes a document: 1.4 GB at 14 million.)"""

    ENTRY = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("index", "<u8")])

    def __init__(self, folder: Path):
        folder.mkdir()
        self.paths = [folder / f"{b:02x}" for b in range(256)]
        self.buffers = [bytearray() for _ in self.paths]

    def add(self, digest: bytes, index: int) -> None:
        buffer = self.buffers[digest[0]]
        buffer += digest
        buffer += index.to_bytes(8, "little")
        if len(buffer) >= 1 << 16:
            self._flush(digest[0])

    def _flush(self, bucket: int) -> None:
        with open(self.paths[bucket], "ab") as f:
            f.write(self.buffers[bucket])
        self.buffers[bucket].clear()

    def duplicates(self) -> Iterator[np.ndarray]:
        """Indices of the duplicate documents, a bucket at a time."""
        for bucket, path in enumerate(self.paths):
            self._flush(bucket)
            entries = np.fromfile(path, self.ENTRY)
            path.unlink()
            entries = entries[np.lexsort((entries["index"], entries["lo"], entries["hi"]))]
            repeat = (entries["hi"][1:] == entries["hi"][:-1]) & (entries["lo"][1:] == entries["lo"][:-1])
            yield entries["index"][1:][repeat]


@dataclass
class Plan:
    """The fate of every document: codes (a memory map of plan.bin), their UTF-8 sizes, and what was decided."""

    codes: np.ndarray
    sizes: np.ndarray
    dropped: dict
    moved: dict | None
    cut: list[int] | None  # split: tail: [document index, characters of it kept in train]


def make_plan(cfg: PrepareConfig, plan_file: Path, work: Path, stats: SourceStats, download_progress: ProgressFactory) -> Plan:
    codes, sizes = _Column(plan_file, "u1"), _Column(work / "bytes", "<u8")
    chars = _Column(work / "chars", "<u8") if cfg.split == "tail" and cfg.val_source is None else None
    # store: text: each document not too short, as its JSON line, until dedup and the split decide where it goes.
    candidates = open(work / "candidates.jsonl", "wb") if cfg.store == "text" else None
    digests = _Digests(work / "digests") if cfg.dedup else None  # across both sources too: a val document also in train would leak
    hashed = cfg.val_source is None and cfg.split == "hash"
    # Per split, (distance, index) of the document nearest the other split: it moves if that one ends up empty.
    # Strictly nearer only, so it is the first of equal documents: never one dedup drops.
    nearest: dict[str, tuple[float, int]] = {}
    ranges, index = [], 0
    for role, source, target in roles(cfg):
        first_input, first = len(stats.inputs), index
        for raw in iter_source(source, unicode_errors=cfg.unicode_errors, stats=stats, download_dir=cfg.download_dir,
                               key=f"prepare.{role}", progress=download_progress):
            text = normalize(raw, cfg.nfc)
            code, size = SHORT, 0
            if len(text) >= cfg.min_chars:
                data = text.encode("utf-8")
                code, size = CODE[target], len(data)
                if candidates:
                    candidates.write((JSON_LINE.encode({"text": text}) + "\n").encode("utf-8"))
                if digests:
                    digests.add(hashlib.blake2b(data, digest_size=16).digest(), index)
                if hashed:
                    split, position = split_of(data, cfg.seed, cfg.val_fraction)
                    code, distance = CODE[split], position if split == "train" else -position
                    if split not in nearest or distance < nearest[split][0]:
                        nearest[split] = (distance, index)
            codes.append(code)
            sizes.append(size)
            if chars:
                chars.append(len(text) if code != SHORT else 0)
            index += 1
        for record in stats.inputs[first_input:]:
            record["role"] = role
        ranges.append((role, source, first, index))
    if candidates:
        candidates.close()
    plan = Plan(codes.done(), sizes.done(), {}, None, None)
    for duplicates in digests.duplicates() if digests else ():
        plan.codes[duplicates] = DUPLICATE
        _release(plan.codes)
    counts = bincount(plan.codes)
    plan.dropped = {"short": int(counts[SHORT]), "duplicate": int(counts[DUPLICATE])}
    for role, source, first, end in ranges:
        here = bincount(plan.codes, first, end)
        if here[TRAIN:].sum() == 0:
            raise UserError(f"prepare.{role}: no documents from {source.kind} "
                            f"{source.path or source.url or source.dataset or source.name} (dropped "
                            f"{here[SHORT]} shorter than prepare.min_chars={cfg.min_chars}, {here[DUPLICATE]} duplicates)")
    if chars:
        plan.cut = _cut_tail(plan.codes, chars.done(), cfg.val_fraction)
    elif hashed:
        if counts[TRAIN] + counts[VAL] == 1:
            raise UserError('prepare.val_fraction: the corpus is one document; set prepare.source.separator '
                            '(e.g. "\\n\\n") or prepare.val_source')
        for empty, full in [("val", "train"), ("train", "val")]:
            if counts[CODE[empty]] == 0:  # deterministic: the document nearest the empty split moves
                plan.codes[nearest[full][1]] = CODE[empty]
                plan.moved = {"from": full, "to": empty, "documents": 1, "reason": f"{empty} was empty"}
    return plan


def _release(*columns: np.ndarray) -> None:
    """Hand a memory-mapped column's pages back to the file: reading a whole column a block at a time would
    otherwise leave all of it counted in the process's memory (8 bytes a document for the sizes)."""
    for column in columns:
        if isinstance(column, np.memmap) and column._mmap is not None:
            column.flush()
            column._mmap.madvise(mmap.MADV_DONTNEED)


def bincount(values: np.ndarray, first: int = 0, end: int | None = None, weights: np.ndarray | None = None) -> np.ndarray:
    """np.bincount of values[first:end] over the five codes, a block at a time."""
    total, end = np.zeros(CUT + 1), len(values) if end is None else end
    for lo in range(first, end, BLOCK):
        hi = min(end, lo + BLOCK)
        total += np.bincount(values[lo:hi], None if weights is None else weights[lo:hi], minlength=CUT + 1)
        _release(values, weights)
    return total.astype(np.int64)


def _cut_tail(codes: np.ndarray, chars: np.ndarray, val_fraction: float) -> list[int] | None:
    """split: tail: every kept document after the last val_fraction of the characters starts goes to val, and
    the one it starts inside is cut there (nanoGPT's data[:int(n * 0.9)]). Returns [that document, its
    characters kept in train], or None when the boundary falls between documents."""
    total = bincount(codes, weights=chars)[TRAIN]
    boundary = int(total * (1 - val_fraction))  # characters kept in train
    if boundary in (0, total):
        raise UserError(f"prepare.val_fraction: {val_fraction} of {total} characters leaves a split empty; raise it or use more text")
    seen, cut = 0, None
    for lo in range(0, len(codes), BLOCK):
        block = codes[lo : lo + BLOCK]
        if cut is not None or seen >= boundary:
            block[block == TRAIN] = VAL
            _release(codes)
            continue
        kept = np.where(block == TRAIN, chars[lo : lo + BLOCK], 0)
        ends = seen + np.cumsum(kept)
        seen = int(ends[-1])
        _release(chars)
        if seen <= boundary:
            continue
        k = int(np.argmax(ends > boundary))  # the first document that ends past the boundary
        head = boundary - int(ends[k] - kept[k])
        block[k + 1 :][block[k + 1 :] == TRAIN] = VAL
        block[k] = CUT if head else VAL
        _release(codes)
        cut = [lo + k, head] if head else []
    return cut or None


def read_codes(path: Path) -> Iterator[int]:
    """plan.bin's codes, streamed (chained in C: this runs once per document)."""

    def blocks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    return itertools.chain.from_iterable(blocks())


def replay(cfg: PrepareConfig, codes: Iterable[int], cut: list[int] | None, download_dir: str, stats: SourceStats,
            where: str, expected: list[dict]) -> Iterator[tuple[str, str]]:
    """(split, text) of every kept document, reading the sources again and following the plan's codes.

    expected: the inputs the plan was made from; a source that changed since is a UserError naming it.
    """
    names, nfc = {TRAIN: "train", VAL: "val"}, cfg.nfc
    codes = iter(codes)
    changed = f"{where}: the source changed since the prepare stage read it ({{}}); rerun prepare (dvc repro prepare)"
    first_input = len(stats.inputs)
    for role, source, _ in roles(cfg):
        for raw in iter_source(source, unicode_errors=cfg.unicode_errors, stats=stats, download_dir=download_dir,
                               key=f"prepare.{role}"):
            code = next(codes, None)  # once per document: kept lean
            if code == TRAIN or code == VAL:
                yield names[code], normalize(raw, nfc)
            elif code == CUT and cut:
                text = normalize(raw, nfc)
                yield "train", text[: cut[1]]
                yield "val", text[cut[1]:]
            elif code is None:
                raise UserError(changed.format("it now has more documents"))
            elif code not in (SHORT, DUPLICATE):  # a damaged plan.bin must not silently drop documents
                raise UserError(f"{where}: plan.bin holds {code}, not a document's fate; rerun prepare (dvc repro prepare)")
    if next(codes, None) is not None:
        raise UserError(changed.format("it now has fewer documents"))
    now = stats.inputs[first_input:]
    for before, after in itertools.zip_longest(expected, now, fillvalue={}):
        if before.get("sha256") != after.get("sha256"):
            raise UserError(changed.format(after.get("path") or after.get("name") or before.get("path") or before.get("name")))
