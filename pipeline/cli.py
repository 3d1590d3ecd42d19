"""The `gptpipe` command line: one command per stage, params from params.yaml plus -S overrides."""

from __future__ import annotations

import functools
import sys
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
        for key, default, description in config.describe(model, name):
            lines.append(f"[cyan]{key}[/cyan] = {_escape(default)}: {_escape(description)}\n\n")
    return "".join(lines)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def stage_command(*sections: str) -> Callable:
    """Register a stage: its --help lists the params it reads; UserError becomes one line and exit code 2."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as e:
                console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/yellow]")
                raise typer.Exit(130) from None

        return app.command(epilog=section_help(*sections))(run)

    return register


@contextmanager
def byte_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar advanced by a callable taking a byte count."""
    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with _bar(columns, description, total) as advance:
        yield advance


@contextmanager
def count_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
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
        table.add_row(key, _fmt(value))
    Console().print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# ------------------------------------------------------------------------------------------- stages


@stage_command("prepare")
def prepare(params: ParamsOption = Path("params.yaml"), set_: SetOption = []):  # noqa: B006
    """Read the corpus, normalise it, split documents into train and val."""
    from pipeline.sources import prepare_corpus, source_size

    cfg = config.load_params(params, set_).prepare
    with byte_progress("prepare", source_size(cfg)) as advance:
        manifest = prepare_corpus(cfg, progress=advance)
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
    from pipeline.data import tokenize_corpus
    from pipeline.sources import prepared_size

    p = config.load_params(params, set_)
    with byte_progress("tokenize", prepared_size(p.prepare.out_dir)) as advance:
        meta = tokenize_corpus(p.tokenize, p.prepare.out_dir, progress=advance)
    print_summary(
        f"tokenize -> {p.tokenize.out_dir}",
        {
            "tokenizer": meta["tokenizer"]["kind"],
            "vocab size": meta["vocab_size"],
            "train tokens": meta["splits"]["train"]["tokens"],
            "val tokens": meta["splits"]["val"]["tokens"],
            "dtype": meta["dtype"],
            "tokens/s": meta["tokens_per_s"],
            "MB/s": meta["mb_per_s"],
        },
    )


def run_stage(name: str) -> None:
    """Entry point of stages/<name>.py: the same command as `gptpipe <name>`."""
    app([name, *sys.argv[1:]], prog_name=f"stages/{name}.py")


@stage_command("model", "train")
def train(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    local_rank: Annotated[int, typer.Option("--local_rank", "--local-rank", hidden=True, help="set by the deepspeed launcher")] = -1,
):
    """Train with DeepSpeed (resuming a compatible checkpoint) and export a Hugging Face folder."""
    import subprocess

    from pipeline import engine

    p = config.load_params(params, set_)
    if p.train.launcher == "deepspeed" and not engine.is_launched():
        # Every node runs this same script, so the repository must sit at the same path on each.
        script = Path(__file__).resolve().parents[1] / "stages" / "train.py"
        if not script.is_file():
            raise UserError("train.launcher=deepspeed runs stages/train.py of the gptpipe repository, which this install lacks")
        overrides = [f"--set={s}" for s in set_]
        cmd = engine.launcher_command(p.train, str(script), ["--params", str(Path(params).resolve()), *overrides])
        console.print(f"train: launching {' '.join(cmd)}", highlight=False)
        raise typer.Exit(subprocess.call(cmd))

    from pipeline.training import train as run_training

    summary = run_training(p)
    if summary:
        print_summary(f"train -> {p.train.export_dir}", summary)


@stage_command("evaluate")
def evaluate(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    local_rank: Annotated[int, typer.Option("--local_rank", "--local-rank", hidden=True, help="set by a launcher")] = -1,
):
    """Val loss, perplexity, bits per byte, accuracy and HellaSwag of the trained model."""
    import os

    from pipeline.evaluation import evaluate as run_evaluation

    p = config.load_params(params, set_)
    rank, world_size, device = 0, 1, None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by a launcher: split the work across ranks
        from pipeline import engine

        dist = engine.init_distributed()
        rank, world_size, device = dist.rank, dist.world_size, dist.device
    metrics = run_evaluation(p, rank, world_size, device, progress=count_progress)
    if rank == 0:
        rows = {f"{group} {k}": v for group in ("val", "hellaswag") for k, v in (metrics.get(group) or {}).items()}
        print_summary(f"evaluate -> {p.evaluate.metrics_file}", rows)
        for note in metrics.get("notes", []):
            console.print(f"note: {note}", highlight=False)


@stage_command("sample")
def sample(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    prompt: Annotated[list[str], typer.Option("--prompt", help="ad hoc: sample these prompts and print, writing no files")] = [],  # noqa: B006
    model: Annotated[str | None, typer.Option("--model", help="a model folder, a training checkpoint or run folder, any HF folder")] = None,
):
    """Generate samples and write reports/samples.md, samples.jsonl and the report (or, with --prompt, just print)."""
    from pipeline.reports import build_report
    from pipeline.sampling import generate_samples, sample_summary, write_samples

    p = config.load_params(params, set_)
    samples = generate_samples(p, prompts=prompt or None, model_dir=model)
    if prompt:
        for s in samples:
            Console().print(f"[bold]{s['prompt']}[/bold]{s['text']}\n", highlight=False)
        return
    write_samples(samples, p.sample.out_dir, sample_summary(p, model))
    report = build_report(p, p.sample.out_dir)
    print_summary(
        f"sample -> {p.sample.out_dir}",
        {"samples": len(samples), "tokens": sum(s["tokens"] for s in samples), "report": str(report)},
    )


@app.command()
def doctor(
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = [],  # noqa: B006
    hostfile: Annotated[str | None, typer.Option(help="hostfile to check (default: train.hostfile)")] = None,
):
    """Check this machine and the cluster in the hostfile before a (multi-node) training run."""
    from pipeline.doctor import run_checks

    try:
        p = config.load_params(params, set_) if params.exists() else config.Params()
    except UserError as e:
        console.print(f"[bold red]error:[/bold red] {e}", highlight=False)
        raise typer.Exit(2) from None
    results = run_checks(p.train, hostfile or p.train.hostfile)
    table = Table(title="gptpipe doctor", title_justify="left")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for check, ok, detail in results:
        table.add_row(check, "[green]ok[/green]" if ok else "[red]problem[/red]", detail)
    Console().print(table)
    raise typer.Exit(0 if all(ok for _, ok, _ in results) else 1)


if __name__ == "__main__":
    app()
