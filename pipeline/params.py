"""Reading params.yaml: -S overrides, validation against the schemas in config.py, one message for all problems."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipeline.config import Params, Problems
from pipeline.errors import UserError
from pipeline.files import absent


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-5' -> (['train', 'lr'], 3e-05). The value is read as YAML, like params.yaml itself."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise UserError(f"override {text!r}: expected SECTION.KEY=VALUE, e.g. -S tokenize.vocab_size=4096")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise UserError(f"override {text[:40]!r}...: the value is nested too deeply") from None
    return [p.strip() for p in parts], value


def apply_overrides(raw: dict, overrides: list[str], new_section: Callable[[], dict] = dict) -> dict:
    """raw with each KEY=VALUE set in place; a missing or empty section is made with new_section (a recipe passes
    ruamel's CommentedMap, so the file keeps its comments)."""
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = new_section()
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: params file {absent(path)}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a params file (sections are two or three levels deep)") from None
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
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be params (sections are two or three levels deep)") from None
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
    """Field names of the section found by following loc from Params (for 'did you mean')."""
    model: type[BaseModel] | None = Params
    for part in loc:
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation) -> type[BaseModel] | None:
    """The section model a field holds (X, or X | None); a list of models (evaluate.lm_eval.tasks) is a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if getattr(annotation, "__origin__", None) in (list, dict, tuple):
        return None
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def walk_schema(model: type[BaseModel] = Params, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, FieldInfo, int, bool]]:
    """Every field under model in file order: (dotted key, field, depth, whether it is a section whose keys follow)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = _model_in(field.annotation)
        section = sub is not None and field.default is not None  # a section that may be null (val_source) is a value
        yield key, field, depth, section
        if section:
            yield from walk_schema(sub, key, depth + 1)


def describe(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every value under model, nested sections expanded."""
    rows = []
    for key, field, _, section in walk_schema(model, prefix):
        if not section:
            default = field.get_default(call_default_factory=True)
            rows.append((key, "null" if default is None else repr(default), field.description or ""))
    return rows


def reference_markdown() -> str:
    """docs/params.md: every param with its type, default and description, from the schemas themselves."""
    from pipeline.config import SECTIONS

    lines = ["# Params reference", "",
             "Every key of `params.yaml`, generated from the schemas in `pipeline/config.py` by",
             "`python scripts/params_reference.py` (a test fails when this page is out of date). Each stage's",
             "`--help` lists the same. A key left out takes its default.", ""]
    for section in SECTIONS:
        model = Params.model_fields[section].annotation
        lines += [f"## {section}", "", model.__doc__.strip().splitlines()[0], "", "| key | type | default | description |", "|---|---|---|---|"]
        for key, default, description in describe(model, section):
            field = _field_at(key)
            kind = _type_name(field.annotation).replace("|", "or")
            lines.append(f"| `{key}` | {kind} | `{default}` | {description.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def _field_at(dotted: str) -> FieldInfo:
    return next(field for key, field, _, _ in walk_schema() if key == dotted)


def _type_name(annotation) -> str:
    args = getattr(annotation, "__args__", None)
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and str(origin).endswith("Literal"):
        return " / ".join(repr(a) for a in args)
    if args and origin is list:
        return f"list of {_type_name(args[0])}"
    if args:
        return " or ".join(_type_name(a) for a in args)
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def validate_overrides(overrides: list[str]) -> Params:
    """Params from -S overrides alone, every other key at its default."""
    return validate_params(apply_overrides({}, overrides), source="-S overrides")
