"""The prepared documents read back: the manifest, each split's texts (from the JSONL files, or from the sources
again through plan.bin), and their sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from pipeline.config.prepare import PrepareConfig
from pipeline.errors import UserError
from pipeline.files import absent
from pipeline.layout import SPLITS, PreparedDir
from pipeline.prepare.formats import SourceStats
from pipeline.prepare.plan import read_codes, replay


def text_bytes(text: str) -> int:
    """UTF-8 size; isascii() is O(1) on CPython, so ASCII text is not encoded just to be measured."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def read_manifest(out_dir: str | Path) -> dict:
    path = PreparedDir(out_dir).manifest
    if not path.is_file():
        raise UserError(f"{path} {absent(path)}: run the prepare stage first (dvc repro prepare)")
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
    documents = replay(cfg, read_codes(out.plan), plan["cut"], plan["download_dir"], SourceStats(), str(out.root), manifest["inputs"])
    if set(splits) == set(SPLITS):
        yield from documents  # tokenize: every document, no test per document
    else:
        yield from ((split, text) for split, text in documents if split in splits)


def iter_prepared(out_dir: str | Path, split: str) -> Iterator[str]:
    """The documents of one prepared split ("train" or "val"), streamed back."""
    for _, text in iter_documents(out_dir, (split,)):
        yield text


def _read_split(out: PreparedDir, split: str) -> Iterator[str]:
    path = out.split(split)
    if not path.is_file():
        raise UserError(f"{path} {absent(path)}: run the prepare stage first (dvc repro prepare)")
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
