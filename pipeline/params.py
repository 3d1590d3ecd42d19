"""Reading params.yaml: -S overrides, validation against the schemas in config/, then the rules that look at the disk
(an input that exists, an output that would clobber it, a model folder's own tokenizer), one message for all problems."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from pipeline.config.all import Params
from pipeline.config.base import Problems
from pipeline.errors import UserError
from pipeline.files import absent
from pipeline.layout import saved_tokenizer
from pipeline.stage_inputs import check_declared


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
    p = validate_params(raw, source=str(path))
    check_declared(p)  # run by DVC: every file this stage will read must be one of its deps
    return p


def validate_params(raw: dict, source: str = "params") -> Params:
    """Params from raw, checked against the schemas and then against the disk; every problem in one UserError."""
    try:
        p = Params.model_validate(raw)
    except RecursionError:
        raise UserError(f"{source}: nested too deeply to be params (sections are two or three levels deep)") from None
    except ValidationError as e:
        raise UserError(_problems_message(source, format_errors(e))) from None
    problems = disk_problems(p)
    if problems:
        raise UserError(_problems_message(source, [f"{key}: {message}" for key, message in problems]))
    return p


def _problems_message(source: str, lines: list[str]) -> str:
    head = f"{source}: {len(lines)} problem{'s' if len(lines) > 1 else ''}"
    return head + "\n" + "\n".join(f"  - {line}" for line in lines)


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


# ------------------------------------------------------------------------------ rules that look at the disk

# Folders a stage builds beside their place and swaps in whole (files.building_dir).
REPLACED_WHOLE = ("prepare.out_dir", "tokenize.out_dir", "train.export_dir")
# Output folders whose stage only adds files of its own naming (a run folder, a download named by its URL's hash),
# so an input kept inside one (model.init=checkpoints/run-.../step-...) is never written over.
WRITES_NEW_FILES_ONLY = ("train.out_dir", "prepare.download_dir")


def disk_problems(p: Params) -> list[tuple[str, str]]:
    """(key, message) for every rule params break against this disk: an output on or around an input or another
    output, a pretrained model without its own tokenizer. Checked here, where the file is read, not in the schemas:
    a schema that looks at the disk would validate differently from one folder to the next."""
    return [*_clobbered(p), *_tokenizer_mismatch(p)]


def input_paths(p: Params) -> dict[str, str]:
    """Every local path a stage reads that no stage writes (globs cut at their first wildcard)."""
    found = {
        "prepare.source.path": p.prepare.source.path if p.prepare.source.kind == "files" else None,
        "prepare.val_source.path": p.prepare.val_source.path if p.prepare.val_source and p.prepare.val_source.kind == "files" else None,
        "evaluate.hellaswag": p.evaluate.hellaswag, "sample.prompts_file": p.sample.prompts_file,
        "evaluate.lm_eval.include_path": p.evaluate.lm_eval.include_path,
        **{f"tokenize.import_dirs[{i}]": path for i, path in enumerate(p.tokenize.import_dirs)},
        "train.deepspeed_config": p.train.deepspeed_config, "train.hostfile": p.train.hostfile,
        # A hub id is not a path; a local folder is.
        "model.init": p.model.init if not p.model.is_scratch and os.path.exists(p.model.init) else None,
        "tokenize.pretrained": p.tokenize.pretrained if p.tokenize.pretrained and os.path.exists(p.tokenize.pretrained) else None,
    }  # fmt: skip
    return {key: re.split(r"[*?\[]", path)[0] or "." for key, path in found.items() if path}

def _clobbered(p: Params) -> list[tuple[str, str]]:
    """A folder a stage replaces whole must not hold, or sit inside, anything else: not an input, not another output."""
    problems = []
    outputs, inputs = p.output_paths(), input_paths(p)
    for key in REPLACED_WHOLE:
        folder = _absolute(outputs[key])
        for other, path in {**outputs, **inputs}.items():
            if other == key:
                continue
            what = "an input" if other in inputs else "another output"
            if _absolute(path) == folder:
                problems.append((key, f"{outputs[key]} is also {other} ({what}): the stage replaces it whole; give each its own folder"))
            elif _inside(_absolute(path), folder):
                problems.append((key, f"{outputs[key]} holds {other}={path} ({what}), which replacing the folder would delete; choose another folder"))
            elif _inside(folder, _absolute(path)) and other not in REPLACED_WHOLE:  # else reported from the other side
                problems.append((key, f"{outputs[key]} is inside {other}={path} ({what}); choose a folder outside it"))
    # Every other path a stage writes (metrics files, the metrics folder, samples, the report): never an input,
    # never inside an input folder (the next run would read it as data), never a folder that holds an input.
    for key, path in outputs.items():
        if key in REPLACED_WHOLE:
            continue
        written = _absolute(path)
        for other, source in inputs.items():
            read = _absolute(source)
            if written == read:
                problems.append((key, f"{path} is also {other} (an input): the stage would overwrite it; give it a path of its own"))
            elif _inside(read, written) and key not in WRITES_NEW_FILES_ONLY:
                problems.append((key, f"{path} holds {other}={source} (an input), which the stage would write over; choose another folder"))
            elif _inside(written, read):
                problems.append((key, f"{path} is inside {other}={source} (an input), so a later run would read what the stage"
                                      " writes there; choose a path outside it"))
    return problems


def _tokenizer_mismatch(p: Params) -> list[tuple[str, str]]:
    """A pretrained model needs its own tokenizer's ids: tokenize.kind must give them."""
    # GPT-2 checkpoints and tiktoken's gpt2 encoding give identical ids: nanoGPT's fine-tuning flow (checked on load).
    gpt2_ids = p.tokenize.kind == "tiktoken" and p.tokenize.encoding == "gpt2"
    # A model gptpipe trained carries its tokenizer, of any kind: train checks that the tokens use its ids.
    own = not p.model.is_scratch and saved_tokenizer(p.model.init) is not None
    # Imported ids are checked against the model when train loads them (nanoGPT's gpt2 ids fit GPT-2 checkpoints).
    if not p.model.is_scratch and p.tokenize.kind not in ("hf", "import") and not gpt2_ids and not own:
        init = p.model.init
        if not os.path.exists(os.path.expanduser(init)):
            # Not a folder here: either a mistyped path or a hub id; say which, rather than "a pretrained checkpoint".
            if os.path.isabs(init) or init.startswith((".", "~")) or init.count("/") > 1:
                return [("model.init", f"{init!r} not found (no such folder; a hub id has the form name or owner/name)")]
            what = ("is no folder here, so it names a model on the Hugging Face hub (downloaded with network access, or read"
                    " from the HF_HOME cache; if you meant a folder, check the path)")
        else:
            what = "is a pretrained checkpoint"
        return [("tokenize.kind", f"is '{p.tokenize.kind}' but model.init={init!r} {what}: its own"
                                  f" tokenizer is needed (tokenize.kind=hf, tokenize.pretrained={init!r}; for GPT-2 checkpoints"
                                  " tokenize.kind=tiktoken with encoding gpt2 also works)")]
    return []


def _absolute(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))  # through symlinks: a link to the corpus is the corpus


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


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


def validate_overrides(overrides: list[str]) -> Params:
    """Params from -S overrides alone, every other key at its default."""
    return validate_params(apply_overrides({}, overrides), source="-S overrides")
