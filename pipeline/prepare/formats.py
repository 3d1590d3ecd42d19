"""File formats -> documents: plain text (whole or split at a separator), JSONL, JSON, CSV/TSV and Parquet."""

from __future__ import annotations

import codecs
import csv
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from pipeline.config.prepare import SourceConfig
from pipeline.errors import UserError
from pipeline.files import parse_json

CHUNK = 1 << 20  # bytes per read; tests lower it to exercise chunk boundaries
DATA_EXTRA = "pip install 'gptpipe[data]'"
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}  # anything else is text
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


def decode(data: bytes, offset: int, where: str, errors: str, stats: SourceStats) -> str:
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
            yield number, decode(line, offset, self.name, self.errors, self.stats)

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
            yield unify_newlines(text[: len(text) - len(carry)])


def unify_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _text_docs(src: _Input, separator: str | None) -> Iterator[str]:
    if separator is None:
        yield "".join(src.texts())
        return
    # Split after newline normalisation so "\n\n" also separates the paragraphs of a Windows file.
    sep = unify_newlines(separator)
    k = len(sep) - 1  # a separator may start in the last k characters of what came before a piece
    pending: list[str] = []  # the pieces of the document not ended yet
    edge = ""  # its last k characters
    for piece in src.texts():
        if sep in piece or (k and sep in edge + piece[:k]):
            # str.split in C, once per piece that ends a document: far cheaper per document than a find loop,
            # and a long document is joined once, when it ends, so nothing is scanned twice over.
            docs = ("".join(pending) + piece).split(sep)
            pending = [docs.pop()]
            yield from docs
        else:
            pending.append(piece)
        edge = (edge + piece)[-k:] if k and len(pending) > 1 else pending[-1][-k:] if k else ""
    yield "".join(pending)


def as_text(value, where: str, column: str) -> str:
    if value is None:  # a missing value is an empty document, dropped by min_chars like any other
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: {column!r} holds {type(value).__name__}, expected text")
    if not value.isascii() and _SURROGATE.search(value):  # from a JSON "\ud800" escape: no UTF-8 file can hold it
        raise UserError(f"{where}: {column!r} has a lone surrogate (invalid Unicode)")
    return value


def missing_column(where: str, column: str, names: Iterable) -> UserError:
    return UserError(f"{where}: no {column!r} column (it has: {', '.join(map(str, names)) or 'none'}); set text_column")



def _jsonl_docs(src: _Input, column: str) -> Iterator[str]:
    for number, line in src.lines():
        if line.strip():
            where = f"{src.name}:{number}"
            obj = parse_json(line, where)
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
            if column not in obj:
                raise missing_column(where, column, obj)
            yield as_text(obj[column], where, column)


def _json_docs(src: _Input, column: str) -> Iterator[str]:
    value = parse_json(decode(b"".join(src.chunks()), 0, src.name, src.errors, src.stats), src.name)
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
            raise missing_column(where, column, item)
        yield as_text(item[column] if isinstance(item, dict) else item, where, column)


def _csv_docs(src: _Input, column: str, delimiter: str) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)  # documents are long; the default 128 KiB limit rejects them
    reader = csv.reader((line for _, line in src.lines()), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is not None and column not in header:
            raise missing_column(f"{src.name}: the header", column, header)
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
        raise missing_column(src.name, column, parquet.schema_arrow.names)
    batches = parquet.iter_batches(columns=[column], batch_size=1024)
    for row, value in enumerate(itertools.chain.from_iterable(b.column(0).to_pylist() for b in batches)):
        yield as_text(value, f"{src.name}: row {row}", column)


def iter_file(path: Path, source: SourceConfig, errors: str, stats: SourceStats, record: dict) -> Iterator[str]:
    """Raw documents of one file, in source.format (auto: by extension); once read, record joins stats.inputs."""
    fmt = EXTENSIONS.get(path.suffix.lower(), "text") if source.format == "auto" else source.format
    with _Input(path, errors, stats, record) as src:
        if fmt == "text":
            yield from _text_docs(src, source.separator)
        elif fmt == "csv":
            yield from _csv_docs(src, source.text_column, "\t" if path.suffix.lower() == ".tsv" else ",")
        else:
            read = {"jsonl": _jsonl_docs, "json": _json_docs, "parquet": _parquet_docs}[fmt]
            yield from read(src, source.text_column)

