"""`gptpipe init DIR`: a new git + DVC project whose stages call the installed gptpipe, not this repository's code."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pipeline.config.all import Params
from pipeline.errors import UserError
from pipeline.files import WRITE_ERRNOS
from pipeline.output import Echo, silent
from pipeline.params import walk_schema
from pipeline.tools import recipes
from pipeline.tools.dvc_yaml import render as render_dvc_yaml

# DVC's cache link type, as in this repository's .dvc/config: a reflink (copy-on-write, on Btrfs, XFS, APFS) where
# the file system has them, else a copy. Never a hard link by default: an output edited in place (root ignores the
# read-only bit DVC sets) would rewrite the cache object and lose that version for good. Hard links save the
# disk a second copy takes, for corpora of gigabytes, as an opt-in: docs/benchmarks.md has the figures.
CACHE_TYPE = "reflink,copy"

# The same stages, params, outputs and plots as this repository's dvc.yaml, from the same source, with
# `gptpipe <stage>` as each command, and the files the written params name as deps.

GITIGNORE = """\
__pycache__/
.venv/
# Downloads; the pipeline's outputs are ignored by DVC itself.
/data/cache/
/checkpoints
# What an interrupted tokenize keeps for its next run.
.*.partial/
# The lock a run holds beside a folder it writes; a killed run can leave the file (harmless).
.*.lock
"""

DVCIGNORE = """\
# Files DVC should not look at.
.venv/
"""


README = """\
# {name}

A language model trained with [gptpipe](https://pypi.org/project/gptpipe/): `params.yaml` says what to train,
`dvc repro` trains it, DVC versions every run.

```bash
dvc repro                         # prepare -> tokenize -> train -> evaluate -> sample -> report
dvc exp run -S train.lr=3e-4      # an experiment with one param changed; `dvc exp show` compares them
```

Your data goes in `data/raw/` (DVC tracks it as the prepare stage's input) when `prepare.source` points there
(`kind: files`, `path: data/raw/...`): text files (one document per file, or set `prepare.source.separator`),
JSONL, JSON, CSV/TSV or Parquet. The default params read a corpus every Python carries instead, offline.

Results: `models/final/` (a Hugging Face model folder), `reports/report.html`, `reports/metrics.json`.
Every param is described in `params.yaml` and by `gptpipe <stage> --help`; `gptpipe recipe list` shows the
recipes (`gptpipe recipe use NAME` writes one to `params.yaml`). A file a param names (a prompts file, a DeepSpeed
JSON, a model folder to fine-tune, ...) is a dependency of the stages that read it: after setting or clearing such a
param, run `gptpipe dvc-yaml` so that `dvc.yaml` declares it.

Several GPUs or nodes: `train.launcher: deepspeed` (and `train.hostfile`), or by hand on every node
(gptpipe is installed there, so no script path is needed):

```bash
deepspeed --hostfile hostfile --module pipeline.train
```
"""


def commented_params() -> str:
    """Every param at its default, each with its description as a comment: the schema as a params.yaml."""
    lines = ["# gptpipe params: every key at its default, described. Change what you need; `gptpipe <stage> --help` lists",
             "# them too, and `gptpipe recipe list` shows complete setups for common workflows."]
    for key, field, depth, section in walk_schema():
        indent, name = "  " * depth, key.rpartition(".")[2]
        if section:
            lines += [""] * (depth == 0) + [f"{indent}{name}:"]
            continue
        value = json.dumps(field.get_default(call_default_factory=True), ensure_ascii=False)  # JSON is YAML: null, true, "\n"
        lines.append(f"{f'{indent}{name}: {value}':<44} # {field.description}")
    return "\n".join(lines) + "\n\n"


def init_project(folder: str | Path, recipe: str | None = None, echo: Echo = silent) -> Path:
    """Create folder as a new git + DVC project with the stages, params (a recipe, or every default described) and
    a README; it must not exist or be empty."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file: gptpipe init makes a new project in a new (or empty) folder")
    if folder.is_dir() and any(folder.iterdir()):
        raise UserError(f"{folder} is not empty: gptpipe init makes a new project in a new (or empty) folder")
    params = recipes.render(recipe, []) if recipe else commented_params()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        above = next((p for p in folder.parents if p.exists()), None)
        why = (f"{above} is a file" if above is not None and not above.is_dir() else
               WRITE_ERRNOS.get(e.errno) or e.strerror or type(e).__name__)
        raise UserError(f"gptpipe init: cannot create {folder}: {why}") from None
    files = {"dvc.yaml": render_dvc_yaml(None, validated(params), folder), "params.yaml": params, ".gitignore": GITIGNORE, ".dvcignore": DVCIGNORE,
             # data/raw must exist (a dependency of prepare); a hidden file keeps it in git without becoming corpus.
             "data/raw/.gitkeep": "", "README.md": README.format(name=folder.resolve().name)}
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content, encoding="utf-8")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                # Outputs linked to DVC's cache, not copied: a 20 GB token folder is not stored twice (docs/benchmarks.md).
                ["dvc", "config", "cache.type", CACHE_TYPE], ["git", "add", "-A"]):
        run(cmd, folder)
    # DVC experiments need a first commit; without a git identity, say how to make it rather than invent one.
    commit = subprocess.run(["git", "commit", "-qm", "gptpipe init"], cwd=folder, capture_output=True, text=True)
    if commit.returncode != 0:
        echo(f"init: files staged but not committed ({(commit.stderr.strip().splitlines() or ['git commit failed'])[-1]});"
             " set git's user.name and user.email, then `git commit -m init`")
    echo(f"init: {folder} is ready" + (f" with recipe {recipe}" if recipe else "") + f"; next: {next_step(params)}")
    return folder


def validated(params_text: str) -> Params:
    import yaml

    return Params.model_validate(yaml.safe_load(params_text) or {})


def next_step(params_text: str) -> str:
    """What the user does next: bring the data the params read, then dvc repro."""
    source = validated(params_text).prepare.source
    if source.kind == "files":
        return f"put your text where prepare.source.path says ({source.path}), then run dvc repro"
    return f"dvc repro (prepare reads the {source.kind} source {source.url or source.dataset or source.name})"


def run(cmd: list[str], cwd: Path) -> None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"init needs {cmd[0]} on PATH (dvc comes with gptpipe: activate the environment it is installed in)") from None
    if out.returncode != 0:
        raise UserError(f"init: `{' '.join(cmd)}` failed in {cwd}: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
