"""Schemas for params.yaml: one pydantic model per section, the single source of truth for every knob."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UserError


class Section(BaseModel):
    """Base for every params section: unknown keys are errors at every depth, values are coerced."""

    # Lax mode coerces the strings `dvc exp run -S` writes ("3e-05", "4096", "true") to the field's type.
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True)


class Problems(ValueError):
    """Cross-field problems found by a model validator: (key relative to the model, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{k}: {m}" for k, m in problems))
        self.problems = problems


def check(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise Problems(problems)


# --------------------------------------------------------------------------------------------- prepare


class SourceConfig(Section):
    """Where raw text comes from."""

    kind: Literal["builtin", "files", "url", "hf"] = Field(
        "builtin", description="builtin (offline corpus every Python carries), files, url or hf (a Hugging Face dataset)"
    )
    name: Literal["pydoc_topics", "stdlib"] = Field(
        "pydoc_topics", description="builtin only: pydoc_topics (Python's help topics, ~0.5 MB) or stdlib (its .py sources, ~5 MB)"
    )
    path: str | None = Field(None, description="files only: a file, a folder or a glob such as data/raw/*.jsonl")
    url: str | None = Field(None, description="url only: an http(s) address, downloaded once into data/cache/")
    dataset: str | None = Field(None, description="hf only: dataset name on the hub or a local dataset script/folder")
    config: str | None = Field(None, description="hf only: dataset configuration name")
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
    val_fraction: float = Field(0.1, ge=0.0, le=0.5, description="fraction of documents held out for validation (seeded, by document)")
    seed: int = Field(1337, ge=0, description="seed of the train/val split")
    dedup: bool = Field(True, description="drop exact duplicate documents (after normalisation)")
    nfc: bool = Field(True, description="normalise Unicode to NFC")
    min_chars: int = Field(1, ge=1, description="drop documents shorter than this many characters after normalisation")
    unicode_errors: Literal["strict", "replace"] = Field(
        "strict", description="invalid UTF-8: strict fails naming the file and byte offset; replace substitutes U+FFFD and counts"
    )
    out_dir: str = Field("data/prepared", min_length=1, description="where train.jsonl, val.jsonl and manifest.json go")

    @model_validator(mode="after")
    def _split(self):
        if self.val_source is None and self.val_fraction == 0:
            check([("val_fraction", "is 0 and val_source is null: set one of them so there is a validation split")])
        return self


# -------------------------------------------------------------------------------------------- tokenize


class TokenizeConfig(Section):
    """tokenize: documents -> a tokenizer and memory-mappable token files."""

    kind: Literal["tiktoken", "char", "bpe", "hf"] = Field(
        "bpe", description="tiktoken (OpenAI BPE), char (characters of the train split), bpe (byte-level BPE trained here) or hf"
    )
    encoding: str = Field("gpt2", min_length=1, description="tiktoken only: encoding name (gpt2, r50k_base, cl100k_base, ...)")
    vocab_size: int = Field(4096, ge=260, le=1_000_000, description="bpe only: vocabulary size to train, special tokens included")
    min_frequency: int = Field(2, ge=1, description="bpe only: minimum pair count for a merge")
    pretrained: str | None = Field(None, description="hf only: tokenizer folder or hub id (use the model's own for fine-tuning)")
    unknown_chars: Literal["error", "skip", "unk"] = Field(
        "unk", description="char only, for characters not in the train split: error, skip them, or map to an <unk> token"
    )
    workers: int = Field(0, ge=0, description="threads for encoding; 0 = one per CPU core")
    chunk_bytes: int = Field(1 << 20, ge=1024, description="text per unit of parallel work; bounds memory whatever the corpus size")
    out_dir: str = Field("data/tokens", min_length=1, description="where train.bin, val.bin, meta.json and tokenizer/ go")

    @model_validator(mode="after")
    def _kind_needs(self):
        if self.kind == "hf" and not self.pretrained:
            check([("pretrained", "required when kind is 'hf' (a tokenizer folder or hub id)")])
        return self


# ------------------------------------------------------------------------------------------------ all


class Params(Section):
    """The whole params.yaml. Every section has defaults, so a file may set only what it changes."""

    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)


SECTIONS = tuple(Params.model_fields)


# ------------------------------------------------------------------------------------ loading and errors


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-5' -> (['train', 'lr'], 3e-05). The value is read as YAML, like params.yaml itself."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise UserError(f"override {text!r}: expected SECTION.KEY=VALUE, e.g. -S tokenize.vocab_size=4096")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: the value is not valid YAML ({e.problem if hasattr(e, 'problem') else e})")
    return [p.strip() for p in parts], value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (prepare:, tokenize:, ...), got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate params; every problem is reported in one UserError."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    return validate_params(raw, source=str(path))


def validate_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = format_errors(e)
        head = f"{source}: {len(lines)} problem{'s' if len(lines) > 1 else ''}"
        raise UserError(head + "\n" + "\n".join(f"  - {line}" for line in lines)) from None


def format_errors(error: ValidationError) -> list[str]:
    lines = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "(top level)"
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, Problems):
            lines += [f"{'.'.join([*loc, k])}: {m}" for k, m in inner.problems]
        elif err["type"] == "extra_forbidden":
            known = _fields_at(loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(known)}"
            lines.append(f"{key}: unknown key ({hint})")
        elif err["type"] == "missing":
            lines.append(f"{key}: required")
        else:
            msg = err["msg"]
            msg = msg[0].lower() + msg[1:]
            lines.append(f"{key}: got {err['input']!r}; {msg}")
    return lines


def _fields_at(loc: list[str]) -> list[str]:
    """Field names of the model found by following loc from Params (for 'did you mean')."""
    model: type[BaseModel] = Params
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            return []
        sub = _model_in(field.annotation)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def describe(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field under model, nested sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        sub = _model_in(field.annotation)
        if sub is not None and field.default is not None:
            rows += describe(sub, key)
            continue
        default = field.get_default(call_default_factory=True)
        rows.append((key, "null" if default is None else repr(default), field.description or ""))
    return rows
