"""Raw text sources (builtin, files, url, hf) -> normalised documents split into train.jsonl and val.jsonl."""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import platform
import sysconfig
import unicodedata
from pathlib import Path
from typing import Callable, Iterable, Iterator

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
    text = unify_newlines(text)
    if nfc and not unicodedata.is_normalized("NFC", text):
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


def prepare_corpus(cfg: PrepareConfig, progress: Callable[[int], None] | None = None,
                   download_progress: ProgressFactory = no_progress) -> dict:
    """The prepare stage: out_dir/train.jsonl, val.jsonl and manifest.json, replaced whole or not at all.

    progress(n) is called as n more input bytes are read (source_size gives the total). Returns the manifest.
    """
    with building_dir(cfg.out_dir, "prepare.out_dir") as tmp:
        stats = SourceStats(progress=progress)
        manifest = _write_splits(cfg, PreparedDir(tmp), stats, download_progress)
        write_json_atomic(PreparedDir(tmp).manifest, manifest)
        stats.advance(0, flush=True)
    return manifest


def _write_splits(cfg: PrepareConfig, out: PreparedDir, stats: SourceStats, download_progress: ProgressFactory) -> dict:
    seen: set[bytes] = set()  # 16-byte digests, not texts: memory stays small whatever the corpus
    dropped = {"short": 0, "duplicate": 0}
    documents, nbytes = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    # Per split, (distance, line) of the document nearest the other split: it moves if that one ends up empty.
    nearest: dict[str, tuple[float, int]] = {}
    roles = [("source", cfg.source, "train")] + ([("val_source", cfg.val_source, "val")] if cfg.val_source else [])
    with open(out.split("train"), "w", encoding="utf-8", newline="\n") as train, \
            open(out.split("val"), "w", encoding="utf-8", newline="\n") as val:
        for role, source, target in roles:
            first_input, before = len(stats.inputs), dict(dropped)
            for raw in iter_source(source, unicode_errors=cfg.unicode_errors, stats=stats, download_dir=cfg.download_dir,
                                   key=f"prepare.{role}", progress=download_progress):
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
                if cfg.val_source is None and cfg.split == "hash":
                    split, position = split_of(data, cfg.seed, cfg.val_fraction)
                    distance = position if split == "train" else -position
                    if split not in nearest or distance < nearest[split][0]:
                        nearest[split] = (distance, documents[split])
                (val if split == "val" else train).write(JSON_LINE.encode({"text": text}) + "\n")
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
    if cfg.val_source is None and cfg.split == "tail":
        documents, nbytes = _split_tail(out, cfg.val_fraction)
    elif cfg.val_source is None:
        if sum(documents.values()) == 1:
            raise UserError('prepare.val_fraction: the corpus is one document; set prepare.source.separator '
                            '(e.g. "\\n\\n") or prepare.val_source')
        for empty, full in [("val", "train"), ("train", "val")]:
            if documents[empty] == 0:  # deterministic: the document nearest the empty split moves
                size = _move_line(out, full, empty, nearest[full][1])
                documents[full], documents[empty] = documents[full] - 1, 1
                nbytes[full], nbytes[empty] = nbytes[full] - size, size
                moved = {"from": full, "to": empty, "documents": 1, "reason": f"{empty} was empty"}
    combined = json.dumps([[r["role"], r["sha256"]] for r in stats.inputs]).encode()
    return {"documents": documents, "bytes": nbytes, "dropped": dropped, "replaced": stats.replaced, "moved": moved,
            "inputs": stats.inputs, "input_hash": hashlib.sha256(combined).hexdigest(),
            "params": cfg.model_dump(mode="json", exclude={"out_dir", "download_dir"})}


def _split_tail(out: PreparedDir, val_fraction: float) -> tuple[dict, dict]:
    """Move the last val_fraction of the text (all in train.jsonl, in order) to val.jsonl, cutting the document that
    straddles the boundary at the boundary character; streams, so memory stays flat. Returns counts and bytes."""
    train = out.split("train")
    total = sum(len(json.loads(line)["text"]) for line in open(train, encoding="utf-8"))
    boundary = int(total * (1 - val_fraction))  # characters kept in train, as nanoGPT cuts data[:int(n * 0.9)]
    if boundary in (0, total):
        raise UserError(f"prepare.val_fraction: {val_fraction} of {total} characters leaves a split empty; raise it or use more text")
    documents, nbytes = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    rest = train.with_name(train.name + ".rest")
    seen = 0
    with open(train, encoding="utf-8") as lines, open(rest, "w", encoding="utf-8", newline="\n") as keep, \
            open(out.split("val"), "w", encoding="utf-8", newline="\n") as val:
        for line in lines:
            text = json.loads(line)["text"]
            head = text[: max(0, boundary - seen)]
            for part, split, f in ((head, "train", keep), (text[len(head):], "val", val)):
                if part:
                    f.write(json.dumps({"text": part}, ensure_ascii=False) + "\n")
                    documents[split] += 1
                    nbytes[split] += len(part.encode("utf-8"))
            seen += len(text)
    os.replace(rest, train)
    return documents, nbytes


def _move_line(out: PreparedDir, src: str, dst: str, index: int) -> int:
    """Move line `index` of split src to the end of split dst, streaming; returns the document's UTF-8 bytes."""
    path = out.split(src)
    rest = path.with_name(path.name + ".rest")
    with open(path, "rb") as lines, open(rest, "wb") as keep, open(out.split(dst), "ab") as moved:
        for i, line in enumerate(lines):
            (moved if i == index else keep).write(line)
            if i == index:
                size = len(json.loads(line)["text"].encode("utf-8"))
    os.replace(rest, path)
    return size


def iter_prepared(out_dir: str | Path, split: str) -> Iterator[str]:
    """The documents of one prepared split ("train" or "val"), streamed back."""
    path = PreparedDir(out_dir).split(split)
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
