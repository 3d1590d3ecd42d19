"""The files and folders each stage reads through its params (a DeepSpeed JSON, a prompts file, a task folder, a
model to fine-tune, ...): what dvc.yaml declares as the stage's deps, and the check, under DVC, that it does.

DVC reruns a stage when a dep's content changes, but a param only says where a file is: without the file as a dep,
an edited prompts file or DeepSpeed JSON leaves `dvc repro` "up to date" and `dvc exp show` pairs the old outputs
with the new inputs. `pipeline/tools/dvc_yaml.py` renders these deps from params.yaml; a stage run by DVC refuses
to start when dvc.yaml lacks one (the params changed since dvc.yaml was rendered), rather than run untracked.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

GLOB = re.compile(r"[*?\[]")
TEMPLATE = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*\}")


@dataclass(frozen=True)
class Input:
    """A file or folder a stage reads, and the params key that names it."""

    key: str  # e.g. sample.prompts_file, evaluate.metrics[0]
    path: str  # the file or folder (a glob cut before its first wildcard: DVC deps are paths, not patterns)
    dep: str  # how dvc.yaml names it: ${key} where the key holds exactly this path (so -S to another path still
    # tracks it), else the path itself
    stages: tuple[str, ...]


def stage_inputs(p: Any, project: str | Path = ".") -> list[Input]:
    """Every local file or folder a stage reads through p's params (p: a validated Params). A name that is no path
    here (a hub id, an installed module) is not declared: its content is not in this project."""
    found: list[Input] = []

    def add(key: str, path: str | None, stages: tuple[str, ...], single: bool = True, local_only: bool = False) -> None:
        if not path or (local_only and not os.path.exists(os.path.expanduser(path))):
            return
        cut = GLOB.split(path)[0]
        if cut != path:  # a glob: the folder it lists
            cut = (cut if cut.endswith(("/", os.sep)) else os.path.dirname(cut)).rstrip("/" + os.sep) or "."
        found.append(Input(key, cut, f"${{{key}}}" if single and cut == path else cut, stages))

    # Sources of kind files: prepare reads them, and tokenize reads them again when prepare keeps an index of them.
    readers = ("prepare", "tokenize") if p.prepare.store == "index" else ("prepare",)
    for key, source in (("prepare.source", p.prepare.source), ("prepare.val_source", p.prepare.val_source)):
        if source is not None and source.kind == "files":
            add(f"{key}.path", source.path, readers)
    for i, folder in enumerate(p.tokenize.import_dirs):
        add(f"tokenize.import_dirs[{i}]", folder, ("tokenize",), single=False)
    add("tokenize.pretrained", p.tokenize.pretrained, ("tokenize",), local_only=True)
    add("model.init", None if p.model.is_scratch else p.model.init, ("train",), local_only=True)
    add("train.deepspeed_config", p.train.deepspeed_config, ("train",))
    # In-training HellaSwag scores the items evaluate names, only when it is on.
    add("evaluate.hellaswag", p.evaluate.hellaswag, ("train", "evaluate") if p.train.hellaswag_interval else ("evaluate",))
    add("evaluate.model_dir", p.evaluate.model_dir, ("evaluate",), local_only=True)
    # The harness reads the task folder only when there are tasks to run. Keep each task's data file inside it.
    add("evaluate.lm_eval.include_path", p.evaluate.lm_eval.include_path if p.evaluate.lm_eval.tasks else None, ("evaluate",))
    for i, name in enumerate(p.evaluate.metrics):
        add(f"evaluate.metrics[{i}]", module_path(name.partition(":")[0], project), ("evaluate",), single=False)
    add("sample.model_dir", p.sample.model_dir, ("sample",), local_only=True)
    add("sample.prompts_file", p.sample.prompts_file, ("sample",))
    return found


def module_path(module: str, project: str | Path) -> str | None:
    """The project file or package folder `import module` reads from the project folder (eval/hooks.py puts it first
    on sys.path), relative to it; a whole package for a dotted name, since its modules import each other. None for a
    module that is not in the project (an installed one)."""
    top = module.split(".")[0]
    if (Path(project) / top).is_dir():
        return top
    if "." not in module and (Path(project) / f"{top}.py").is_file():
        return f"{top}.py"
    return None


def declared_for(stage: str, p: Any, static: list[str], project: str | Path = ".") -> list[str]:
    """The deps dvc.yaml gives stage beyond its static ones (static: its data deps as dvc.yaml writes them, ${...}
    included): each input of the stage that no static dep already covers."""
    covered = [resolve(dep, p) for dep in static]
    deps: list[str] = []
    for item in stage_inputs(p, project):
        if stage in item.stages and not any(c is not None and covers(c, item.path) for c in covered) and item.dep not in deps:
            deps.append(item.dep)
    return deps


def resolve(dep: str, p: Any) -> str | None:
    """A dvc.yaml dep with its ${section.key} templates filled in from p; None where a key is not a path."""

    def value(match: re.Match) -> str:
        node = p
        for part in match.group(1).split("."):
            node = getattr(node, part, None) if not isinstance(node, dict) else node.get(part)
        if not isinstance(node, str):
            raise LookupError(match.group(1))
        return node

    try:
        return TEMPLATE.sub(value, dep)
    except LookupError:
        return None


def covers(dep: str, path: str) -> bool:
    """Whether DVC, tracking dep, sees every change of path: the same file or folder, or one inside it."""
    dep, path = (os.path.realpath(os.path.expanduser(x)) for x in (dep, path))
    return path == dep or path.startswith(dep.rstrip(os.sep) + os.sep)


def check_declared(p: Any) -> None:
    """Under `dvc repro`/`dvc exp run` (DVC sets DVC_STAGE and DVC_ROOT for the command it runs): refuse to start
    when dvc.yaml does not declare a file this stage reads, since DVC would not rerun it when the file changes."""
    address, root = os.environ.get("DVC_STAGE"), os.environ.get("DVC_ROOT")
    if not address or not root:
        return
    yaml_file, _, stage = address.rpartition(":")
    path = Path(root) / (yaml_file or "dvc.yaml")
    try:
        deps = yaml.safe_load(path.read_text(encoding="utf-8"))["stages"][stage].get("deps") or []
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return  # not a dvc.yaml gptpipe can read (DVC itself ran it): nothing to compare with
    covered = [resolve(str(dep), p) for dep in deps]
    missing = [item for item in stage_inputs(p) if stage in item.stages and not any(c is not None and covers(c, item.path) for c in covered)]
    if missing:
        listed = ", ".join(f"{item.key} ({item.path})" for item in missing)
        raise UserError(
            f"{path.name}: the {stage} stage reads {listed}, which its deps do not declare, so DVC would not rerun it when"
            f" {'that file changes' if len(missing) == 1 else 'those files change'}; run `gptpipe dvc-yaml` to render the deps"
            f" params.yaml needs (or add `- {missing[0].dep}` under the stage's deps)"
        )
