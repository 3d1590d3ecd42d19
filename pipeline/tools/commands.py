"""The tools around the stages: `gptpipe recipe`, `gptpipe init`, `gptpipe dvc-yaml`, `gptpipe doctor` and `gptpipe plan`. No stage imports this."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config.all import Params
from pipeline.console import ParamsOption, SetOption, echo, fail, user_errors
from pipeline.errors import UserError
from pipeline.params import load_params

recipe_app = typer.Typer(help="Complete params files for common workflows: list them, show one, use one as params.yaml.",
                         no_args_is_help=True, rich_markup_mode="rich")


@recipe_app.command("list")
def recipe_list():
    """The recipes, each with what it reproduces."""
    from pipeline.tools import recipes

    table = Table(show_header=False)
    for name in recipes.names():
        table.add_row(f"[cyan]{name}[/cyan]", recipes.summary(name))
    Console().print(table)


@recipe_app.command("show")
def recipe_show(name: Annotated[str, typer.Argument(help="a recipe (gptpipe recipe list)")]):
    """Print a recipe: its header says what it reproduces, what it needs and what it reached."""
    from pipeline.tools import recipes

    with user_errors():
        typer.echo(recipes.text(name), nl=False)


@recipe_app.command("use")
def recipe_use(
    name: Annotated[str, typer.Argument(help="a recipe (gptpipe recipe list)")],
    set_: SetOption = [],  # noqa: B006
    params: ParamsOption = Path("params.yaml"),
    force: Annotated[bool, typer.Option("--force", help="replace a params file holding changes of your own")] = False,
):
    """Write a recipe (with -S overrides) to params.yaml, so that `dvc repro` and `dvc exp run` use it."""
    from pipeline.tools import recipes

    from pipeline.tools.dvc_yaml import refresh, written_by_gptpipe

    with user_errors():
        path = recipes.use(name, set_, params, force)
        # The recipe's path params may name other files than before: the stages' file deps follow.
        changed = path.name == "params.yaml" and written_by_gptpipe(path.parent / "dvc.yaml") and refresh(path.parent)[1]
    echo(f"recipe: {name} written to {path}" + (f" with {' '.join(set_)}" if set_ else "")
         + (", and dvc.yaml's deps rendered for it" if changed else "") + "; next: dvc repro")


def init(
    folder: Annotated[Path, typer.Argument(help="the new project's folder (must not exist, or be empty)")],
    recipe: Annotated[str | None, typer.Option(help="start from this recipe instead of every default")] = None,
):
    """Make a new git + DVC project whose stages call the installed gptpipe: dvc.yaml, params.yaml, data/raw/, a README."""
    from pipeline.tools.init import init_project

    with user_errors():
        init_project(folder, recipe, echo)


def dvc_yaml(
    folder: Annotated[Path, typer.Argument(help="the project (holding dvc.yaml and params.yaml)")] = Path("."),
):
    """Render dvc.yaml again for params.yaml: after setting or clearing a path param (train.deepspeed_config,
    sample.prompts_file, ...), so that the file it names is a dependency of the stages that read it."""
    from pipeline.tools.dvc_yaml import refresh

    with user_errors():
        target, changed = refresh(folder)
    echo(f"dvc-yaml: {target} " + ("written; commit it with params.yaml" if changed else "already declares every file the params name"))


def doctor(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    hostfile: Annotated[str | None, typer.Option(help="hostfile to check (default: train.hostfile)")] = None,
    launcher_args: Annotated[str | None, typer.Option(
        "--launcher-args", help='the flags you give `deepspeed` by hand, e.g. "--no_ssh_check --master_addr 127.0.0.1" (default: train.launcher_args)'
    )] = None,
):
    """Check this machine and the cluster in the hostfile before a (multi-node) training run."""
    import shlex

    from pipeline.tools.doctor import run_checks

    try:
        p = load_params(params, set_) if params.exists() else Params()
        if launcher_args is not None:
            p.train.launcher_args = shlex.split(launcher_args)
    except UserError as e:
        fail(str(e))
    results = run_checks(p, hostfile or p.train.hostfile)
    table = Table(title="gptpipe doctor", title_justify="left")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for check, ok, detail in results:
        table.add_row(check, "[green]ok[/green]" if ok else "[red]problem[/red]", detail)
    Console().print(table)
    raise typer.Exit(0 if all(ok for _, ok, _ in results) else 1)


def plan(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    processes: Annotated[int | None, typer.Option(
        min=1, help="plan for this many processes (default: what the launcher settings give)")] = None,
    probe: Annotated[int | None, typer.Option(
        "--probe", min=1, help="also run N real optimizer steps (outputs in a scratch folder, deleted after) for speed, peak memory and an ETA")] = None,
):
    """Before a run: parameters, tokens, FLOPs and memory per process against this machine; with --probe N, an ETA."""
    from pipeline.console import print_summary
    from pipeline.tools.plan import make_plan, plan_rows, run_probe

    with user_errors():
        p = load_params(params, set_)
        made = make_plan(p, processes)
        measured = run_probe(p, params.resolve().parent, probe, echo) if probe else None
        rows, warning = plan_rows(p, made, measured)
    print_summary(f"plan: {params}", rows)
    if warning:
        echo(f"[red]plan: {warning}[/red]")
        raise typer.Exit(1)
