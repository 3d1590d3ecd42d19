"""Raw text sources (builtin, files, url, hf) streamed as documents, and their size for a progress bar."""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import platform
import stat
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.config.prepare import PrepareConfig, SourceConfig
from pipeline.downloads import cached_path, download
from pipeline.errors import UserError
from pipeline.output import ProgressFactory, no_progress
from pipeline.prepare.formats import DATA_EXTRA, SourceStats, as_text, decode, iter_file, missing_column


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
        files = [path] if path.is_file() else []
        problem = "" if files else f"{pattern}: {_not_a_file(path)}"
    if not files:
        raise UserError(f"{key}.path: {problem}")
    return files


def _not_a_file(path: Path) -> str:
    """Why a path that is neither a file nor a folder cannot be read, from its kind (a FIFO is never opened)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "no such file or folder"
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a regular file (prepare sizes, hashes and may reread a source: save the stream to a file)"
    return "not a regular file (a socket or device)"


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
