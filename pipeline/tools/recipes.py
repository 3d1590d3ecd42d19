"""Recipes: complete params files for the workflows users come from (nanoGPT, run_clm.py, build-nanogpt, ...).

They live in the repository's recipes/ folder, installed as the gptpipe_recipes package so that
`gptpipe recipe` and `gptpipe init --recipe` work wherever gptpipe is installed.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
from importlib import resources
from pathlib import Path

import yaml as safe_yaml

from pipeline.errors import UserError
from pipeline.files import write_text_atomic
from pipeline.params import apply_overrides, validate_params


def names() -> list[str]:
    return sorted(f.name.removesuffix(".yaml") for f in resources.files("gptpipe_recipes").iterdir() if f.name.endswith(".yaml"))


def text(name: str) -> str:
    """The recipe's file, comments included."""
    if name not in names():
        raise UserError(f"no recipe {name!r}; the recipes are: {', '.join(names())} (gptpipe recipe list)")
    return resources.files("gptpipe_recipes").joinpath(f"{name}.yaml").read_text(encoding="utf-8")


def summary(name: str) -> str:
    """The first line of the recipe's header comment, after its name."""
    first = text(name).splitlines()[0]
    return first.removeprefix("#").strip().removeprefix(f"{name}:").strip()


def render(name: str, overrides: list[str]) -> str:
    """The recipe with -S overrides applied, its comments kept, checked against the schema."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    yaml = YAML()  # round trip: comments and key order survive
    yaml.width = 4096
    doc = yaml.load(text(name))
    apply_overrides(doc, overrides, new_section=CommentedMap)
    source = f"recipe {name} with {' '.join(overrides) or 'no overrides'}"
    rendered = dump(yaml, doc)
    validate_params(safe_yaml.safe_load(rendered) or {}, source=source)
    return rendered


def dump(yaml, doc) -> str:
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()


def use(name: str, overrides: list[str], dest: str | Path = "params.yaml", force: bool = False) -> Path:
    """Write the recipe (with overrides) to dest; refuse to replace a params file holding changes of the user's own."""
    dest = Path(dest)
    if dest.is_dir():
        raise UserError(f"--params {dest} is a folder: name the params file to write (e.g. {dest / 'params.yaml'})")
    if dest.parent.exists() and not dest.parent.is_dir():
        raise UserError(f"--params {dest}: {dest.parent} is a file, not a folder")
    refuse_special(dest)
    rendered = render(name, overrides)
    if dest.exists() and not force and not replaceable(dest):
        raise UserError(f"{dest} holds changes of your own (it is not a shipped recipe, nor committed to git): commit it,"
                        " or add --force to replace it")
    write_text_atomic(dest, rendered)
    return dest


def refuse_special(dest: Path) -> None:
    """Refuse a FIFO, socket or device as the params file, from its kind alone: reading a FIFO to see whether it
    holds changes would block until something writes to it, and replacing any of them is not what was meant."""
    try:
        mode = os.stat(dest).st_mode
    except FileNotFoundError:
        return  # a new file (or a dangling link, which the write replaces)
    except OSError as e:
        raise UserError(f"--params {dest}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise UserError(f"--params {dest} is {kind}: name a params file to write (a new path, or an existing file)")


def replaceable(path: Path) -> bool:
    """A params file that loses nothing when replaced: a shipped recipe as written, or one git has committed as it is."""
    current = path.read_text(encoding="utf-8", errors="replace")
    if any(current == text(n) for n in names()):
        return True
    folder = path.resolve().parent
    tracked = subprocess.run(["git", "-C", str(folder), "ls-files", "--error-unmatch", path.name], capture_output=True)
    clean = subprocess.run(["git", "-C", str(folder), "diff", "--quiet", "HEAD", "--", path.name], capture_output=True)
    return tracked.returncode == 0 and clean.returncode == 0
