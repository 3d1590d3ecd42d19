"""prepare's params: the sources of raw text and how they become train and val documents."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import BIG, MAX_SEED, Section, check


class SourceConfig(Section):
    """Where raw text comes from."""

    kind: Literal["builtin", "files", "url", "hf"] = Field(
        "builtin", description="builtin (offline corpus every Python carries), files, url or hf (a Hugging Face dataset)"
    )
    name: Literal["pydoc_topics", "stdlib"] = Field(
        "pydoc_topics", description="builtin only: pydoc_topics (Python's help topics, ~0.5 MB) or stdlib (its .py sources, ~5 MB)"
    )
    path: str | None = Field(None, description="files only: a file, a folder or a glob such as data/raw/*.jsonl")
    url: str | None = Field(None, description="url only: an http(s) address, downloaded once into prepare.download_dir")
    dataset: str | None = Field(None, description="hf only: dataset name on the hub or a local dataset script/folder")
    config: str | None = Field(None, description="hf only: dataset configuration name")
    data_files: str | None = Field(
        None, description="hf only: files for a packaged builder, e.g. dataset: json with data_files: data/raw/*.jsonl (works offline)"
    )
    split: str = Field("train", min_length=1, description="hf only: the split to read")
    format: Literal["auto", "text", "jsonl", "json", "csv", "parquet"] = Field(
        "auto", description="file format; auto picks it from the extension (.txt/.md = text)"
    )
    text_column: str = Field("text", min_length=1, description="JSONL/JSON/CSV/Parquet/hf: the column holding the text")
    separator: str | None = Field(
        None, description='text only: split each file into documents at this string (e.g. "\\n\\n"); none = one document per file'
    )

    @model_validator(mode="after")
    def _kind_needs(self):
        need = {"files": "path", "url": "url", "hf": "dataset"}.get(self.kind)
        problems = []
        if need and not getattr(self, need):
            problems.append((need, f"required when kind is '{self.kind}'"))
        if self.kind == "url" and self.url and not self.url.startswith(("http://", "https://")):
            problems.append(("url", f"got {self.url!r}; expected an http:// or https:// address"))
        if self.separator == "":
            problems.append(("separator", "must not be empty (use null for one document per file)"))
        check(problems)
        return self


class PrepareConfig(Section):
    """prepare: raw text -> normalised documents split into train and val."""

    source: SourceConfig = Field(default_factory=SourceConfig, description="the corpus")
    val_source: SourceConfig | None = Field(None, description="a separate validation corpus; null = split val_fraction off source")
    val_fraction: float = Field(0.1, ge=0.0, le=0.5, description="fraction held out for validation: of the documents (split: hash) or of the text (split: tail)")
    split: Literal["hash", "tail"] = Field(
        "hash", description="hash: each document goes to val by a seeded hash of its text; tail: the last val_fraction of the text, cut at that character (nanoGPT's split)"
    )
    seed: int = Field(1337, ge=0, le=MAX_SEED, description="seed of the train/val split")
    dedup: bool = Field(True, description="drop exact duplicate documents (after normalisation)")
    nfc: bool = Field(True, description="normalise Unicode to NFC")
    min_chars: int = Field(1, ge=1, le=BIG, description="drop documents shorter than this many characters after normalisation")
    unicode_errors: Literal["strict", "replace"] = Field(
        "strict", description="invalid UTF-8: strict fails naming the file and byte offset; replace substitutes U+FFFD and counts"
    )
    store: Literal["text", "index"] = Field(
        "text", description="text: write the documents to train.jsonl and val.jsonl (readable; a second copy of the corpus); index: write only "
        "plan.bin, each document's fate, and tokenize reads the source again (no copy: for corpora of gigabytes)"
    )
    download_dir: str = Field(
        "data/cache/downloads", min_length=1, description="where url sources (and evaluate.hellaswag_url) are downloaded once"
    )
    out_dir: str = Field("data/prepared", min_length=1, description="where train.jsonl and val.jsonl (or plan.bin) and manifest.json go")

    @model_validator(mode="after")
    def _split(self):
        if self.val_source is None and self.val_fraction == 0:
            check([("val_fraction", "is 0 and val_source is null: set one of them so there is a validation split")])
        return self
