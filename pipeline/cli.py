"""The `gptpipe` command line: one command per stage, params from params.yaml plus -S overrides."""

from __future__ import annotations

import functools
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from pipeline import config
from pipeline.errors import UserError
from pipeline.files import WRITE_ERRNOS
from pipeline.output import format_value
from pipeline.params import describe, load_params

app = typer.Typer(
    name="gptpipe",
    help="Train and fine-tune GPT-style models: prepare -> tokenize -> train -> evaluate -> sample.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file to read")]
SetOption = Annotated[
    list[str], typer.Option("--set", "-S", metavar="KEY=VALUE", help="override a param, e.g. -S tokenize.vocab_size=4096")
]


def section_help(*sections: str) -> str:
    """The params a command reads, with defaults and descriptions, for its --help."""
    lines = ["[bold]Params[/bold] (params.yaml; override with -S KEY=VALUE):\n\n"]
    for name in sections:
        model = config.Params.model_fields[name].annotation
        for key, default, description in describe(model, name):
            lines.append(f"[cyan]{key}[/cyan] = {_escape(default)}: {_escape(description)}\n\n")
    return "".join(lines)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def stage_command(*sections: str) -> Callable:
    """Register a stage: its --help lists the params it reads; UserError becomes one line and exit code 2."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
                if os.environ.get("RANK", "0") == "0":  # once per job, not once per process
                    echo(f"{fn.__name__}: {time.perf_counter() - start:,.1f} s")
                return result
            except UserError as e:
                console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except OSError as e:  # a full disk or a permission the user fixes: one line; anything else is a bug
                if e.errno not in WRITE_ERRNOS:
                    raise
                where = f" ({e.filename})" if e.filename else ""
                console.print(f"[bold red]error:[/bold red] {WRITE_ERRNOS[e.errno]}{where}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/yellow]")
                raise typer.Exit(130) from None

        return app.command(epilog=section_help(*sections))(run)

    return register


@contextmanager
def byte_progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar advanced by a callable taking a byte count."""
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with _bar(columns, description, total) as advance:
        yield advance


@contextmanager
def count_progress(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar advanced by a callable taking a count of items."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with _bar(columns, description, total) as advance:
        yield advance


@contextmanager
def _bar(columns: list, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def print_summary(title: str, rows: dict[str, object]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="cyan")
    table.add_column(justify="right")
    for key, value in rows.items():
        table.add_row(key, format_value(value))
    Console().print(table)


def echo(line: str) -> None:
    """A log line on stderr (stdout stays for results), drawn above any progress bar."""
    console.print(line, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------- stages


@stage_command("prepare")
def prepare(params: ParamsOption = Path("params.yaml"), set_: SetOption = []):  # noqa: B006
    """Read the corpus, normalise it, split documents into train and val."""
    from pipeline.sources import prepare_corpus, source_size

    cfg = load_params(params, set_).prepare
    with byte_progress("prepare", source_size(cfg)) as advance:
        manifest = prepare_corpus(cfg, progress=advance, download_progress=byte_progress)
    print_summary(
        f"prepare -> {cfg.out_dir}",
        {
            "train documents": manifest["documents"]["train"],
            "val documents": manifest["documents"]["val"],
            "train MB": manifest["bytes"]["train"] / 1e6,
            "val MB": manifest["bytes"]["val"] / 1e6,
            "dropped (duplicate)": manifest["dropped"]["duplicate"],
            "dropped (short)": manifest["dropped"]["short"],
            "invalid bytes replaced": manifest["replaced"],
        },
    )


@stage_command("tokenize")
def tokenize(params: ParamsOption = Path("params.yaml"), set_: SetOption = []):  # noqa: B006
    """Train or load the tokenizer and write memory-mappable token files."""
    from pipeline.encoding import tokenize_corpus
    from pipeline.files import write_json_atomic
    from pipeline.sources import prepared_size

    p = load_params(params, set_)
    with byte_progress("tokenize", prepared_size(p.prepare.out_dir)) as advance:
        meta, throughput = tokenize_corpus(p.tokenize, p.prepare.out_dir, progress=advance)
    write_json_atomic(p.tokenize.metrics_file, throughput)
    print_summary(
        f"tokenize -> {p.tokenize.out_dir}",
        {
            "tokenizer": meta["tokenizer"]["kind"],
            "vocab size": meta["vocab_size"],
            "train tokens": meta["splits"]["train"]["tokens"],
            "val tokens": meta["splits"]["val"]["tokens"],
            "dtype": meta["dtype"],
            "shards": sum(len(s["shards"]) for s in meta["splits"].values()),
            **({"kept from the interrupted run": throughput["resumed_tokens"]} if throughput["resumed_tokens"] else {}),
            "tokens/s": throughput["tokens_per_s"],
            "MB/s": throughput["mb_per_s"],
        },
    )


def run_stage(name: str) -> None:
    """Entry point of stages/<name>.py: the same command as `gptpipe <name>`."""
    app([name, *sys.argv[1:]], prog_name=f"stages/{name}.py")


@stage_command("model", "train")
def train(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    fresh: Annotated[bool, typer.Option("--fresh", help="start over instead of resuming (the same as -S train.resume=never)")] = False,
    local_rank: Annotated[int, typer.Option("--local_rank", "--local-rank", hidden=True, help="set by the deepspeed launcher")] = -1,
):
    """Train with DeepSpeed (resuming a compatible checkpoint) and export a Hugging Face folder."""
    from pipeline import engine

    set_ = [*set_, "train.resume=never"] if fresh else set_
    p = load_params(params, set_)
    if p.train.launcher == "deepspeed" and not engine.is_launched():
        raise typer.Exit(engine.relaunch(p.train, params, set_, echo))

    from pipeline.training import train as run_training

    summary = run_training(p, progress=count_progress, echo=echo)
    engine.leave_process_group()
    if summary:
        print_summary(f"train -> {p.train.export_dir}", summary)


@stage_command("evaluate")
def evaluate(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    local_rank: Annotated[int, typer.Option("--local_rank", "--local-rank", hidden=True, help="set by a launcher")] = -1,
):
    """Val loss, perplexity, bits per byte, accuracy and HellaSwag of the trained model."""
    from pipeline import engine
    from pipeline.evaluation import evaluate as run_evaluation

    p = load_params(params, set_)
    # Started by a launcher: the work is split across ranks, which wait for each other no longer than training does.
    dist = engine.init_distributed(single_process_group=False, timeout_s=p.train.collective_timeout)
    metrics = run_evaluation(p, dist, progress=count_progress)
    engine.leave_process_group()
    if dist.is_main:
        rows = {f"{group} {k}": v for group in ("val", "hellaswag") for k, v in (metrics.get(group) or {}).items()}
        print_summary(f"evaluate -> {p.evaluate.metrics_file}", rows)
        for note in metrics.get("notes", []):
            echo(f"note: {note}")


@stage_command("sample")
def sample(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    prompt: Annotated[list[str], typer.Option("--prompt", help="ad hoc: sample these prompts and print, writing no files")] = [],  # noqa: B006
    model: Annotated[str | None, typer.Option("--model", help="a model folder, a training checkpoint or run folder, any HF folder or hub id")] = None,
):
    """Generate samples into sample.out_dir (samples.md, samples.jsonl), or with --prompt just print them."""
    from pipeline.sampling import generate_samples, sample_summary, write_samples

    # Ad hoc sampling from a given model needs no project: without a params.yaml the sample defaults apply.
    standalone = model is not None and params == Path("params.yaml") and not params.exists()
    p = load_params(params, set_) if not standalone else validate_overrides(set_)
    samples = generate_samples(p, prompts=prompt or None, model_dir=model)
    if prompt:
        for s in samples:
            Console().print(f"[bold]{s['prompt']}[/bold]{s['text']}\n", highlight=False)
        return
    write_samples(samples, p.sample.out_dir, sample_summary(p, model))
    print_summary(
        f"sample -> {p.sample.out_dir}",
        {"samples": len(samples), "tokens": sum(s["tokens"] for s in samples)},
    )


def validate_overrides(overrides: list[str]) -> config.Params:
    """Params from -S overrides alone, every other key at its default."""
    from pipeline.params import apply_overrides, validate_params

    return validate_params(apply_overrides({}, overrides), source="-S overrides")


@stage_command("report")
def report(params: ParamsOption = Path("params.yaml"), set_: SetOption = []):  # noqa: B006
    """Draw the training curves and write report.md and a self-contained report.html (metrics, curves, samples)."""
    from pipeline.reports import build_report

    p = load_params(params, set_)
    page = build_report(p)
    print_summary(f"report -> {p.report.out_dir}", {"report": str(page)})


recipe_app = typer.Typer(help="Complete params files for common workflows: list them, show one, use one as params.yaml.",
                         no_args_is_help=True, rich_markup_mode="rich")
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("list")
def recipe_list():
    """The recipes, each with what it reproduces."""
    from pipeline import recipes

    table = Table(show_header=False)
    for name in recipes.names():
        table.add_row(f"[cyan]{name}[/cyan]", recipes.summary(name))
    Console().print(table)


@recipe_app.command("show")
def recipe_show(name: Annotated[str, typer.Argument(help="a recipe (gptpipe recipe list)")]):
    """Print a recipe: its header says what it reproduces, what it needs and what it reached."""
    from pipeline import recipes

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
    from pipeline import recipes

    with user_errors():
        path = recipes.use(name, set_, params, force)
    echo(f"recipe: {name} written to {path}" + (f" with {' '.join(set_)}" if set_ else "") + "; next: dvc repro")


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="the new project's folder (must not exist, or be empty)")],
    recipe: Annotated[str | None, typer.Option(help="start from this recipe instead of every default")] = None,
):
    """Make a new git + DVC project whose stages call the installed gptpipe: dvc.yaml, params.yaml, data/raw/, a README."""
    from pipeline.scaffold import init_project

    with user_errors():
        init_project(folder, recipe, echo)


@contextmanager
def user_errors() -> Iterator[None]:
    """A UserError in a command that is not a stage: one line and exit code 2, as stages do."""
    try:
        yield
    except UserError as e:
        console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
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

    from pipeline.doctor import run_checks

    try:
        p = load_params(params, set_) if params.exists() else config.Params()
        if launcher_args is not None:
            p.train.launcher_args = shlex.split(launcher_args)
    except UserError as e:
        console.print(f"[bold red]error:[/bold red] {e}", highlight=False)
        raise typer.Exit(2) from None
    results = run_checks(p, hostfile or p.train.hostfile)
    table = Table(title="gptpipe doctor", title_justify="left")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for check, ok, detail in results:
        table.add_row(check, "[green]ok[/green]" if ok else "[red]problem[/red]", detail)
    Console().print(table)
    raise typer.Exit(0 if all(ok for _, ok, _ in results) else 1)


if __name__ == "__main__":
    app()
