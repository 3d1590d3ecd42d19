"""Raw text sources (builtin, files, url, hf) -> normalised documents split into train.jsonl and val.jsonl."""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import mmap
import os
import platform
import shutil
import sysconfig
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline.config import PrepareConfig, SourceConfig
from pipeline.downloads import cached_path, download
from pipeline.errors import UserError
from pipeline.files import building_dir, write_json_atomic
from pipeline.formats import DATA_EXTRA, SourceStats, as_text, decode, iter_file, missing_column, unify_newlines
from pipeline.layout import SPLITS, PreparedDir
from pipeline.output import ProgressFactory, no_progress

# ---------------------------------------------------------------------------------- files, builtin, url and hf


def resolve_files(pattern: str, key: str = "prepare.source") -> list[Path]:
    """A file, every non-hidden file under a folder, or a glob's matches; sorted so that runs repeat."""
    path = Path(pattern).expanduser()
    if any(c in pattern for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        problem = f"{pattern!r} matches no files"
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        problem = f"the folder {pattern} has no (non-hidden) files"
    else:
        files, problem = [path] if path.is_file() else [], f"{pattern}: no such file or folder"
    if not files:
        raise UserError(f"{key}.path: {problem}")
    return files


def _counted_docs(texts: Iterable[str], stats: SourceStats, record: dict) -> Iterator[str]:
    """Documents that come from no file of ours: hashed as a stream of texts for the manifest."""
    digest, size, count = hashlib.sha256(), 0, 0
    for text in texts:
        data = text.encode("utf-8")
        digest.update(data + b"\0")
        size, count = size + len(data), count + 1
        stats.advance(len(data))
        yield text
    stats.inputs.append({**record, "documents": count, "bytes": size, "sha256": digest.hexdigest()})


def _builtin_docs(source: SourceConfig, errors: str, stats: SourceStats) -> Iterator[str]:
    record = {"name": f"builtin:{source.name}", "python": platform.python_version()}
    if source.name == "pydoc_topics":
        from pydoc_data.topics import topics

        texts = (topics[k] for k in sorted(topics))
    else:
        texts = (decode(p.read_bytes(), 0, str(p), errors, stats) for p in _stdlib_files())
    return _counted_docs(texts, stats, record)


def _stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _hf_docs(source: SourceConfig, key: str, stats: SourceStats) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{key}.kind=hf needs the datasets package: {DATA_EXTRA}") from None
    # Network, unknown dataset, bad config or split: reported naming the dataset, not as a traceback.
    failures = (OSError, ValueError, datasets.exceptions.DatasetsError)

    def fail(e: Exception) -> UserError:
        return UserError(f"{key}.dataset: could not load {source.dataset!r} ({type(e).__name__}: {e}). Offline? "
                         "Set HF_DATASETS_OFFLINE=1 to use the cache, or point dataset at a local folder "
                         "(or dataset: json with data_files: ...)")

    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split,
                                   data_files=source.data_files, streaming=True)
        rows = iter(ds)
    except failures as e:
        raise fail(e) from None
    column, where = source.text_column, f"{key}: {source.dataset}"

    def texts() -> Iterator[str]:
        for i in itertools.count():
            try:
                row = next(rows, None)
            except failures as e:
                raise fail(e) from None
            if row is None:
                return
            if column not in row:
                raise missing_column(f"{where} row {i}", column, row)
            yield as_text(row[column], f"{where} row {i}", column)

    record = {"name": source.dataset, "config": source.config, "split": source.split, "data_files": source.data_files}
    yield from _counted_docs(texts(), stats, record)


def iter_source(source: SourceConfig, *, unicode_errors: str, stats: SourceStats, download_dir: str | Path,
                key: str = "prepare.source", progress: ProgressFactory = no_progress) -> Iterator[str]:
    """Raw documents of one source, streamed; `key` names its params section in error messages."""
    if source.kind == "builtin":
        yield from _builtin_docs(source, unicode_errors, stats)
    elif source.kind == "files":
        for path in resolve_files(source.path, key):
            yield from iter_file(path, source, unicode_errors, stats, {"path": str(path)})
    elif source.kind == "url":
        path = download(source.url, download_dir, progress)
        yield from iter_file(path, source, unicode_errors, stats, {"url": source.url, "path": str(path)})
    else:
        yield from _hf_docs(source, key, stats)


def source_size(cfg: PrepareConfig) -> int | None:
    """Input bytes prepare_corpus will read, a progress bar's total; None when unknown beforehand (hf, url)."""
    roles = [("prepare.source", cfg.source), ("prepare.val_source", cfg.val_source)]
    sizes = [_size(source, key, cfg.download_dir) for key, source in roles if source is not None]
    return None if None in sizes else sum(sizes)


def _size(source: SourceConfig, key: str, download_dir: str) -> int | None:
    if source.kind == "files":
        return sum(f.stat().st_size for f in resolve_files(source.path, key))
    if source.kind == "url":
        cached = cached_path(source.url, download_dir)
        return cached.stat().st_size if cached.is_file() else None
    if source.kind == "builtin" and source.name == "pydoc_topics":
        from pydoc_data.topics import topics

        return sum(len(t.encode("utf-8")) for t in topics.values())
    return sum(p.stat().st_size for p in _stdlib_files()) if source.kind == "builtin" else None


# -------------------------------------------------------------------------------------- the prepare stage


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


def prepare_corpus(cfg: PrepareConfig, progress: Callable[[int], None] | None = None,
                   download_progress: ProgressFactory = no_progress) -> dict:
    """The prepare stage: out_dir/manifest.json and, by prepare.store, train.jsonl + val.jsonl (text) or plan.bin
    (index); replaced whole or not at all.

    One pass over the source decides each document's fate (dropped, train or val) into files, not memory; store:
    text also writes every document it may keep to a scratch file, whose lines then go to train.jsonl or
    val.jsonl by those decisions. progress(n) is called as n more input bytes are read (source_size gives the
    total). Returns the manifest.
    """
    with building_dir(cfg.out_dir, "prepare.out_dir") as tmp:
        out, work = PreparedDir(tmp), tmp / ".work"
        work.mkdir()
        stats = SourceStats(progress=progress)
        plan = _plan(cfg, out.plan, work, stats, download_progress)  # raises unless some document is kept
        plan.codes.flush()
        documents, nbytes = _count(cfg, plan)
        if cfg.store == "text":
            _write_text(out, work / "candidates.jsonl", plan)
            out.plan.unlink()
        shutil.rmtree(work)
        combined = json.dumps([[r["role"], r["sha256"]] for r in stats.inputs]).encode()
        manifest = {"documents": documents, "bytes": nbytes, "dropped": plan.dropped, "replaced": stats.replaced,
                    "moved": plan.moved, "inputs": stats.inputs, "input_hash": hashlib.sha256(combined).hexdigest(),
                    "params": cfg.model_dump(mode="json", exclude={"out_dir", "download_dir"})}
        if cfg.store == "index":  # what tokenize needs to read the source again
            manifest["plan"] = {"documents": len(plan.codes), "cut": plan.cut, "download_dir": cfg.download_dir}
        write_json_atomic(out.manifest, manifest)
        stats.advance(0, flush=True)
    return manifest


def _roles(cfg: PrepareConfig) -> list[tuple[str, SourceConfig, str]]:
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
class _Plan:
    """The fate of every document: codes (a memory map of plan.bin), their UTF-8 sizes, and what was decided."""

    codes: np.ndarray
    sizes: np.ndarray
    dropped: dict
    moved: dict | None
    cut: list[int] | None  # split: tail: [document index, characters of it kept in train]



def _plan(cfg: PrepareConfig, plan_file: Path, work: Path, stats: SourceStats, download_progress: ProgressFactory) -> _Plan:
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
    for role, source, target in _roles(cfg):
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
    plan = _Plan(codes.done(), sizes.done(), {}, None, None)
    for duplicates in digests.duplicates() if digests else ():
        plan.codes[duplicates] = DUPLICATE
        _release(plan.codes)
    counts = _bincount(plan.codes)
    plan.dropped = {"short": int(counts[SHORT]), "duplicate": int(counts[DUPLICATE])}
    for role, source, first, end in ranges:
        here = _bincount(plan.codes, first, end)
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


def _bincount(values: np.ndarray, first: int = 0, end: int | None = None, weights: np.ndarray | None = None) -> np.ndarray:
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
    total = _bincount(codes, weights=chars)[TRAIN]
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


def _read_codes(path: Path) -> Iterator[int]:
    """plan.bin's codes, streamed (chained in C: this runs once per document)."""

    def blocks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    return itertools.chain.from_iterable(blocks())


def _replay(cfg: PrepareConfig, codes: Iterable[int], cut: list[int] | None, download_dir: str, stats: SourceStats,
            where: str, expected: list[dict]) -> Iterator[tuple[str, str]]:
    """(split, text) of every kept document, reading the sources again and following the plan's codes.

    expected: the inputs the plan was made from; a source that changed since is a UserError naming it.
    """
    names, nfc = {TRAIN: "train", VAL: "val"}, cfg.nfc
    codes = iter(codes)
    changed = f"{where}: the source changed since the prepare stage read it ({{}}); rerun prepare (dvc repro prepare)"
    first_input = len(stats.inputs)
    for role, source, _ in _roles(cfg):
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


def _write_text(out: PreparedDir, candidates: Path, plan: _Plan) -> None:
    """store: text: the scratch file's lines (one per document not too short, in source order) into train.jsonl and
    val.jsonl by the plan's codes; copied as bytes, only the cut document of split: tail is decoded."""
    lines = open(candidates, "rb")
    with lines, open(out.split("train"), "wb") as train, open(out.split("val"), "wb") as val:
        for code in _read_codes(out.plan):
            if code == SHORT:
                continue  # it has no line
            line = next(lines)
            if code == TRAIN:
                train.write(line)
            elif code == VAL:
                val.write(line)
            elif code == CUT:
                text = json.loads(line)["text"]
                train.write((JSON_LINE.encode({"text": text[: plan.cut[1]]}) + "\n").encode("utf-8"))
                val.write((JSON_LINE.encode({"text": text[plan.cut[1]:]}) + "\n").encode("utf-8"))


def _count(cfg: PrepareConfig, plan: _Plan) -> tuple[dict, dict]:
    """Documents and bytes per split from the plan; the cut document of split: tail is read again."""
    documents = {split: int(n) for split, n in zip(SPLITS, _bincount(plan.codes)[[TRAIN, VAL]])}
    nbytes = {split: int(n) for split, n in zip(SPLITS, _bincount(plan.codes, weights=plan.sizes)[[TRAIN, VAL]])}
    if plan.cut:
        codes = itertools.chain(itertools.repeat(SHORT, plan.cut[0]), [CUT])  # skip to it, read it
        replay = _replay(cfg, codes, plan.cut, cfg.download_dir, SourceStats(), "prepare.source", [])
        for split, text in itertools.islice(replay, 2):  # its two halves; the rest of the source is not read
            documents[split] += 1
            nbytes[split] += text_bytes(text)
        replay.close()
    return documents, nbytes


def text_bytes(text: str) -> int:
    """UTF-8 size; isascii() is O(1) on CPython, so ASCII text is not encoded just to be measured."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def read_manifest(out_dir: str | Path) -> dict:
    path = PreparedDir(out_dir).manifest
    if not path.is_file():
        raise UserError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("params"), dict):
        raise UserError(f"{path}: not a prepare stage manifest; rerun the prepare stage")
    return manifest


def iter_documents(out_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> Iterator[tuple[str, str]]:
    """(split, text) of the prepared documents of the given splits: read back (store: text), or read from the
    source again through plan.bin (store: index), in source order with the splits interleaved."""
    out = PreparedDir(out_dir)
    manifest = read_manifest(out_dir)
    if manifest["params"].get("store", "text") == "text":
        for split in splits:
            for text in _read_split(out, split):
                yield split, text
        return
    try:
        cfg = PrepareConfig.model_validate({**manifest["params"], "out_dir": str(out_dir)})
        plan = manifest["plan"]
    except (ValueError, KeyError):
        raise UserError(f"{out.manifest}: not this gptpipe's manifest; rerun the prepare stage") from None
    if not out.plan.is_file() or out.plan.stat().st_size != plan["documents"]:
        raise UserError(f"{out.plan}: missing or not {plan['documents']} bytes as {out.manifest} says; rerun the prepare stage")
    replay = _replay(cfg, _read_codes(out.plan), plan["cut"], plan["download_dir"], SourceStats(), str(out.root), manifest["inputs"])
    if set(splits) == set(SPLITS):
        yield from replay  # tokenize: every document, no test per document
    else:
        yield from ((split, text) for split, text in replay if split in splits)


def iter_prepared(out_dir: str | Path, split: str) -> Iterator[str]:
    """The documents of one prepared split ("train" or "val"), streamed back."""
    for _, text in iter_documents(out_dir, (split,)):
        yield text


def _read_split(out: PreparedDir, split: str) -> Iterator[str]:
    path = out.split(split)
    if not path.is_file():
        raise UserError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    with open(path, encoding="utf-8", newline="\n") as lines:
        for number, line in enumerate(lines, 1):
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{number}: not a prepared document; rerun the prepare stage") from None
            yield text


def prepared_size(out_dir: str | Path) -> int | None:
    """UTF-8 bytes of text in both prepared splits, from the manifest (a progress bar's total); None if absent."""
    path = PreparedDir(out_dir).manifest
    return sum(json.loads(path.read_text(encoding="utf-8"))["bytes"].values()) if path.is_file() else None
