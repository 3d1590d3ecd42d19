"""Raw text sources (builtin, files, url, hf) -> normalised documents split into train.jsonl and val.jsonl."""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import http.client
import itertools
import json
import os
import platform
import re
import shutil
import sysconfig
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pipeline.config import PrepareConfig, SourceConfig
from pipeline.errors import UserError

DOWNLOAD_DIR = Path("data/cache/downloads")
CHUNK = 1 << 20  # bytes per read; tests lower it to exercise chunk boundaries
DATA_EXTRA = "pip install 'gptpipe[data]'"
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}  # anything else is text
SPLITS = ("train", "val")
_ESCAPED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of invalid bytes; valid UTF-8 never has them
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class SourceStats:
    """What iter_source read: inputs for the manifest, invalid bytes replaced; progress(n) advances by input bytes."""

    inputs: list[dict] = field(default_factory=list)
    replaced: int = 0
    progress: Callable[[int], None] | None = None
    _unreported: int = 0

    def advance(self, n: int, flush: bool = False) -> None:
        self._unreported += n
        # Once per MiB: a call per JSONL line would cost more than parsing the line.
        if self.progress and self._unreported and (flush or self._unreported >= 1 << 20):
            self.progress(self._unreported)
            self._unreported = 0


# ---------------------------------------------------------------------------------------------- files


def _invalid(where: str, offset: int, e: UnicodeDecodeError) -> UserError:
    return UserError(f"{where}: invalid UTF-8 at byte {offset} ({e.reason}); "
                     "fix the file or set prepare.unicode_errors=replace")


def _clean(text: str, stats: SourceStats, at_start: bool) -> str:
    """Invalid bytes (escaped by surrogateescape) -> U+FFFD, counted; no BOM, which would hide a CSV header."""
    if text.isascii():
        return text
    text, n = _ESCAPED.subn("\ufffd", text)
    stats.replaced += n
    return text[1:] if at_start and text.startswith("\ufeff") else text


def _decode(data: bytes, offset: int, where: str, errors: str, stats: SourceStats) -> str:
    """A self-contained piece of a file (a line, the whole file) that starts at byte `offset`."""
    try:
        return _clean(data.decode("utf-8", "strict" if errors == "strict" else "surrogateescape"), stats, offset == 0)
    except UnicodeDecodeError as e:
        raise _invalid(where, offset + e.start, e) from None


class _Input:
    """One input file read once in binary: hashed and counted for the manifest, decoded naming file offsets."""

    def __init__(self, path: Path, errors: str, stats: SourceStats, record: dict):
        self.path, self.name, self.errors, self.stats, self.record = path, str(path), errors, stats, record
        self.sha, self.size = hashlib.sha256(), 0
        self._stream = codecs.getincrementaldecoder("utf-8")("strict" if errors == "strict" else "surrogateescape")

    def __enter__(self) -> _Input:
        self.file = open(self.path, "rb")
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.file.close()
        if exc_type is None:  # a half-read file has no meaningful hash
            self.stats.inputs.append({**self.record, "bytes": self.size, "sha256": self.sha.hexdigest()})

    def _seen(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)
        self.stats.advance(len(data))

    def chunks(self) -> Iterator[bytes]:
        while chunk := self.file.read(CHUNK):
            self._seen(chunk)
            yield chunk

    def lines(self) -> Iterator[tuple[int, str]]:
        """(line number, text); UTF-8 has no 0x0A inside a character, so splitting bytes is safe."""
        for number, line in enumerate(self.file, 1):
            offset = self.size
            self._seen(line)
            yield number, _decode(line, offset, self.name, self.errors, self.stats)

    def texts(self) -> Iterator[str]:
        """The file's text in pieces, with "\\n" newlines; a character cut by a chunk's end waits for the next."""
        carry = ""  # a trailing "\r" may be half of a "\r\n"
        for chunk in itertools.chain(self.chunks(), [b""]):
            start, pending = self.size - len(chunk), len(self._stream.getstate()[0])
            try:
                text = carry + _clean(self._stream.decode(chunk, not chunk), self.stats, start == 0)
            except UnicodeDecodeError as e:  # e.start counts from the first pending byte
                raise _invalid(self.name, start - pending + e.start, e) from None
            carry = "\r" if text.endswith("\r") and chunk else ""
            yield _newlines(text[: len(text) - len(carry)])


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _text_docs(src: _Input, separator: str | None) -> Iterator[str]:
    if separator is None:
        yield "".join(src.texts())
        return
    # Split after newline normalisation so "\n\n" also separates the paragraphs of a Windows file.
    sep, pending = _newlines(separator), ""
    for piece in src.texts():
        start = max(0, len(pending) - len(sep) + 1)  # never rescan what was searched already
        pending += piece
        while (i := pending.find(sep, start)) >= 0:
            yield pending[:i]
            pending, start = pending[i + len(sep):], 0
    yield pending


def _as_text(value, where: str, column: str) -> str:
    if value is None:  # a missing value is an empty document, dropped by min_chars like any other
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: {column!r} holds {type(value).__name__}, expected text")
    if not value.isascii() and _SURROGATE.search(value):  # from a JSON "\ud800" escape: no UTF-8 file can hold it
        raise UserError(f"{where}: {column!r} has a lone surrogate (invalid Unicode)")
    return value


def _missing(where: str, column: str, names: Iterable) -> UserError:
    return UserError(f"{where}: no {column!r} column (it has: {', '.join(map(str, names)) or 'none'}); set text_column")


def _jsonl_docs(src: _Input, column: str) -> Iterator[str]:
    for number, line in src.lines():
        if line.strip():
            where = f"{src.name}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
            if column not in obj:
                raise _missing(where, column, obj)
            yield _as_text(obj[column], where, column)


def _json_docs(src: _Input, column: str) -> Iterator[str]:
    try:
        value = json.loads(_decode(b"".join(src.chunks()), 0, src.name, src.errors, src.stats))
    except json.JSONDecodeError as e:
        raise UserError(f"{src.name}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if column not in lists and len(lists) != 1:
            raise UserError(f"{src.name}: expected a list, or an object with one list "
                            f"(lists under: {', '.join(lists) or 'none'})")
        value = value[column if column in lists else lists[0]]  # {"text": [...]} (columnar) or {"data": [...]}
    if not isinstance(value, list):
        raise UserError(f"{src.name}: expected a list of objects or strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        where = f"{src.name}: item {i}"
        if isinstance(item, dict) and column not in item:
            raise _missing(where, column, item)
        yield _as_text(item[column] if isinstance(item, dict) else item, where, column)


def _csv_docs(src: _Input, column: str, delimiter: str) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)  # documents are long; the default 128 KiB limit rejects them
    reader = csv.reader((line for _, line in src.lines()), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is not None and column not in header:
            raise _missing(f"{src.name}: the header", column, header)
        for row in reader:
            if row and len(row) != len(header):
                raise UserError(f"{src.name}:{reader.line_num}: {len(row)} fields, the header has {len(header)}")
            if row:
                yield row[header.index(column)]  # a list scan, but the header is short
    except csv.Error as e:
        raise UserError(f"{src.name}:{reader.line_num}: malformed CSV ({e})") from None


def _parquet_docs(src: _Input, column: str) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{src.name}: reading Parquet needs pyarrow: {DATA_EXTRA}") from None
    for _ in src.chunks():  # pyarrow reads the file itself; this pass is for the hash and the progress bar
        pass
    try:
        parquet = pq.ParquetFile(src.path)
    except pa.ArrowException as e:
        raise UserError(f"{src.name}: not a readable Parquet file ({e})") from None
    if column not in parquet.schema_arrow.names:
        raise _missing(src.name, column, parquet.schema_arrow.names)
    batches = parquet.iter_batches(columns=[column], batch_size=1024)
    for row, value in enumerate(itertools.chain.from_iterable(b.column(0).to_pylist() for b in batches)):
        yield _as_text(value, f"{src.name}: row {row}", column)


def _file_docs(path: Path, source: SourceConfig, errors: str, stats: SourceStats, record: dict) -> Iterator[str]:
    fmt = EXTENSIONS.get(path.suffix.lower(), "text") if source.format == "auto" else source.format
    with _Input(path, errors, stats, record) as src:
        if fmt == "text":
            yield from _text_docs(src, source.separator)
        elif fmt == "csv":
            yield from _csv_docs(src, source.text_column, "\t" if path.suffix.lower() == ".tsv" else ",")
        else:
            read = {"jsonl": _jsonl_docs, "json": _json_docs, "parquet": _parquet_docs}[fmt]
            yield from read(src, source.text_column)


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


# ---------------------------------------------------------------------------------- builtin, url and hf


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
        texts = (_decode(p.read_bytes(), 0, str(p), errors, stats) for p in _stdlib_files())
    return _counted_docs(texts, stats, record)


def _stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _cached(url: str, cache_dir: Path | None) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlparse(url).path).name) or "download"
    return Path(cache_dir or DOWNLOAD_DIR) / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def download(url: str, cache_dir: Path | None = None) -> Path:
    """The cached copy of url, downloaded on first use; a failed download leaves no file behind."""
    target = _cached(url, cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(part, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            with _download_bar(target.name[17:], size) as advance:
                while chunk := response.read(CHUNK):
                    advance(out.write(chunk))
            if size is not None and out.tell() != size:
                raise http.client.IncompleteRead(b"", size - out.tell())
        os.replace(part, target)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # timeouts and resets are OSErrors
        http_error = isinstance(e, urllib.error.HTTPError)
        reason = f"HTTP {e.code} {e.reason}" if http_error else getattr(e, "reason", None) or repr(e)
        raise UserError(f"could not download {url}: {reason}. Offline? Download it yourself and use "
                        "prepare.source.kind=files with path=...") from None
    finally:
        if os.path.exists(part):
            os.unlink(part)
    return target


@contextmanager
def _download_bar(name: str, size: int | None) -> Iterator[Callable[[int], None]]:
    """advance(n) for a transient rich progress bar, shown when the size is known."""
    if size is None:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("download {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  transient=True) as bar:
        task = bar.add_task(name, total=size)
        yield lambda n: bar.advance(task, n)


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
                raise _missing(f"{where} row {i}", column, row)
            yield _as_text(row[column], f"{where} row {i}", column)

    record = {"name": source.dataset, "config": source.config, "split": source.split, "data_files": source.data_files}
    yield from _counted_docs(texts(), stats, record)


def iter_source(source: SourceConfig, *, unicode_errors: str, stats: SourceStats, key: str = "prepare.source",
                download_dir: Path | None = None) -> Iterator[str]:
    """Raw documents of one source, streamed; `key` names its params section in error messages."""
    if source.kind == "builtin":
        yield from _builtin_docs(source, unicode_errors, stats)
    elif source.kind == "files":
        for path in resolve_files(source.path, key):
            yield from _file_docs(path, source, unicode_errors, stats, {"path": str(path)})
    elif source.kind == "url":
        path = download(source.url, download_dir)
        yield from _file_docs(path, source, unicode_errors, stats, {"url": source.url, "path": str(path)})
    else:
        yield from _hf_docs(source, key, stats)


def source_size(cfg: PrepareConfig, download_dir: Path | None = None) -> int | None:
    """Input bytes prepare_corpus will read, a progress bar's total; None when unknown beforehand (hf, url)."""
    roles = [("prepare.source", cfg.source), ("prepare.val_source", cfg.val_source)]
    sizes = [_size(source, key, download_dir) for key, source in roles if source is not None]
    return None if None in sizes else sum(sizes)


def _size(source: SourceConfig, key: str, download_dir: Path | None) -> int | None:
    if source.kind == "files":
        return sum(f.stat().st_size for f in resolve_files(source.path, key))
    if source.kind == "url":
        cached = _cached(source.url, download_dir)
        return cached.stat().st_size if cached.is_file() else None
    if source.kind == "builtin" and source.name == "pydoc_topics":
        from pydoc_data.topics import topics

        return sum(len(t.encode("utf-8")) for t in topics.values())
    return sum(p.stat().st_size for p in _stdlib_files()) if source.kind == "builtin" else None


# -------------------------------------------------------------------------------------- the prepare stage


def normalize(text: str, nfc: bool) -> str:
    """One newline convention ("\\n"), NFC when asked, no surrounding whitespace."""
    text = _newlines(text)
    if nfc and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return text.strip()


def _position(data: bytes, seed: int) -> float:
    """The document's place in [0, 1) by a keyed hash: independent of order and of the rest of the corpus."""
    digest = hashlib.blake2b(b"%d\0" % seed, digest_size=8)
    digest.update(data)
    return int.from_bytes(digest.digest(), "big") / 2**64


def is_val(text: str, seed: int, val_fraction: float) -> bool:
    """Whether a normalised document belongs to the validation split."""
    return _position(text.encode("utf-8"), seed) < val_fraction


def prepare_corpus(cfg: PrepareConfig, progress: Callable[[int], None] | None = None, *,
                   download_dir: Path | None = None) -> dict:
    """The prepare stage: out_dir/train.jsonl, val.jsonl and manifest.json, replaced whole or not at all.

    progress(n) is called as n more input bytes are read (source_size gives the total). Returns the manifest.
    """
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"prepare.out_dir: {out} is a file, expected a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # from a run that was killed; the name is ours
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        stats = SourceStats(progress=progress)
        manifest = _write_splits(cfg, tmp, stats, download_dir)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        stats.advance(0, flush=True)
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        if out.exists():  # two renames: out_dir never holds a mix of old and new files
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_splits(cfg: PrepareConfig, tmp: Path, stats: SourceStats, download_dir: Path | None) -> dict:
    seen: set[bytes] = set()  # 16-byte digests, not texts: memory stays small whatever the corpus
    dropped = {"short": 0, "duplicate": 0}
    documents, nbytes = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    # Per split, (distance, line) of the document nearest the other split: it moves if that one ends up empty.
    nearest: dict[str, tuple[float, int]] = {}
    roles = [("source", cfg.source, "train")] + ([("val_source", cfg.val_source, "val")] if cfg.val_source else [])
    with open(tmp / "train.jsonl", "w", encoding="utf-8", newline="\n") as train, \
            open(tmp / "val.jsonl", "w", encoding="utf-8", newline="\n") as val:
        for role, source, target in roles:
            first_input, before = len(stats.inputs), dict(dropped)
            for raw in iter_source(source, unicode_errors=cfg.unicode_errors, stats=stats, key=f"prepare.{role}",
                                   download_dir=download_dir):
                text = normalize(raw, cfg.nfc)
                if len(text) < cfg.min_chars:
                    dropped["short"] += 1
                    continue
                data = text.encode("utf-8")
                if cfg.dedup:  # across both sources too: a val document also in train would leak
                    digest = hashlib.blake2b(data, digest_size=16).digest()
                    if digest in seen:
                        dropped["duplicate"] += 1
                        continue
                    seen.add(digest)
                split = target
                if cfg.val_source is None:
                    position = _position(data, cfg.seed)
                    split = "val" if position < cfg.val_fraction else "train"
                    distance = position if split == "train" else -position
                    if split not in nearest or distance < nearest[split][0]:
                        nearest[split] = (distance, documents[split])
                (val if split == "val" else train).write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                documents[split] += 1
                nbytes[split] += len(data)
            for record in stats.inputs[first_input:]:
                record["role"] = role
            if (documents[target] if cfg.val_source else sum(documents.values())) == 0:
                raise UserError(f"prepare.{role}: no documents from {source.kind} "
                                f"{source.path or source.url or source.dataset or source.name} (dropped "
                                f"{dropped['short'] - before['short']} shorter than prepare.min_chars={cfg.min_chars}, "
                                f"{dropped['duplicate'] - before['duplicate']} duplicates)")
    moved = None
    if cfg.val_source is None:
        if sum(documents.values()) == 1:
            raise UserError('prepare.val_fraction: the corpus is one document; set prepare.source.separator '
                            '(e.g. "\\n\\n") or prepare.val_source')
        for empty, full in [("val", "train"), ("train", "val")]:
            if documents[empty] == 0:  # deterministic: the document nearest the empty split moves
                size = _move_line(tmp, full, empty, nearest[full][1])
                documents[full], documents[empty] = documents[full] - 1, 1
                nbytes[full], nbytes[empty] = nbytes[full] - size, size
                moved = {"from": full, "to": empty, "documents": 1, "reason": f"{empty} was empty"}
    combined = json.dumps([[r["role"], r["sha256"]] for r in stats.inputs]).encode()
    return {"documents": documents, "bytes": nbytes, "dropped": dropped, "replaced": stats.replaced, "moved": moved,
            "inputs": stats.inputs, "input_hash": hashlib.sha256(combined).hexdigest(),
            "params": cfg.model_dump(mode="json")}


def _move_line(tmp: Path, src: str, dst: str, index: int) -> int:
    """Move line `index` of src.jsonl to the end of dst.jsonl, streaming; returns the document's UTF-8 bytes."""
    path, rest = tmp / f"{src}.jsonl", tmp / f"{src}.jsonl.rest"
    with open(path, "rb") as lines, open(rest, "wb") as keep, open(tmp / f"{dst}.jsonl", "ab") as moved:
        for i, line in enumerate(lines):
            (moved if i == index else keep).write(line)
            if i == index:
                size = len(json.loads(line)["text"].encode("utf-8"))
    os.replace(rest, path)
    return size


def iter_prepared(out_dir: str | Path, split: str) -> Iterator[str]:
    """The documents of one prepared split ("train" or "val"), streamed back."""
    assert split in SPLITS, split
    path = Path(out_dir) / f"{split}.jsonl"
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
    path = Path(out_dir) / "manifest.json"
    return sum(json.loads(path.read_text(encoding="utf-8"))["bytes"].values()) if path.is_file() else None
