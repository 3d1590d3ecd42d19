"""docs/params.md: every param with its type, default and description, generated from the schemas themselves.

A tool, not a stage's code: `scripts/params_reference.py` writes the page and tests/test_docs.py checks it, so editing
how the page reads reruns no stage.
"""

from __future__ import annotations

from pydantic.fields import FieldInfo

from pipeline.config.all import SECTIONS, Params
from pipeline.params import describe, walk_schema


def reference_markdown() -> str:
    """docs/params.md: every param with its type, default and description, from the schemas themselves."""
    lines = ["# Params reference", "",
             "Every key of `params.yaml`, generated from the schemas in `pipeline/config/` by",
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
