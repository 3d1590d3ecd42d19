"""What every command shares on the terminal: the params options, --help listing a stage's params, summary tables,
log lines, and user mistakes as one line with exit code 2. Progress bars, drawn by some stages only, are
progress.py's."""

from __future__ import annotations

import functools
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config.all import Params
from pipeline.errors import UserError
from pipeline.files import WRITE_ERRNOS
from pipeline.output import format_value
from pipeline.params import describe

console = Console(stderr=True)


ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params file to read")]


SetOption = Annotated[
    list[str], typer.Option("--set", "-S", metavar="KEY=VALUE", help="override a param, e.g. -S tokenize.vocab_size=4096")
]


def section_help(*sections: str) -> str:
    """The params a command reads, with defaults and descriptions, for its --help."""
    lines = ["[bold]Params[/bold] (params.yaml; override with -S KEY=VALUE):\n\n"]
    for name in sections:
        model = Params.model_fields[name].annotation
        for key, default, description in describe(model, name):
            lines.append(f"[cyan]{key}[/cyan] = {_escape(default)}: {_escape(description)}\n\n")
    return "".join(lines)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def stage_command(*sections: str) -> Callable:
    """Make fn a stage command: its --help lists the params of these sections; a user mistake is one line and exit
    code 2. The `gptpipe` app registers it by name (pipeline/cli.py) and `python -m pipeline.<stage>` runs it alone."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
                if os.environ.get("RANK", "0") == "0":  # once per job, not once per process
                    echo(f"{fn.__name__}: {time.perf_counter() - start:,.1f} s")
                return result
            except UserError as e:
                fail(str(e))
            except OSError as e:  # a full disk or a permission the user fixes: one line; anything else is a bug
                if e.errno not in WRITE_ERRNOS:
                    raise
                where = f" ({e.filename})" if e.filename else ""
                fail(f"{WRITE_ERRNOS[e.errno]}{where}")
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/yellow]")
                raise typer.Exit(130) from None
            except SystemExit as e:
                # Code the stage ran (a library, a hook) called sys.exit before the stage finished: with exit code 0
                # DVC would record whatever outputs an earlier run left as this run's.
                fail(f"{fn.__name__}: stopped by sys.exit({e.code!r}) in code it ran, before it finished; its outputs were not written")

        run.epilog = section_help(*sections)
        return run

    return wrap


def fail(message: str) -> NoReturn:
    """A user mistake: one line on stderr, exit code 2, no traceback."""
    console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


def run_stage(command: Callable, name: str) -> None:
    """`python -m pipeline.<stage>`: the DVC stage's entry, the same command as `gptpipe <name>`."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")
    app.command(name, epilog=command.epilog)(command)
    try:
        app(prog_name=f"python -m {command.__module__.rpartition('.')[0]}")
    except SystemExit as e:
        if "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ:  # a process the deepspeed launcher started
            # Leave without the interpreter's teardown. A rank that had finished its work and left the process
            # group (barrier, destroy_process_group) still aborted there now and then in CI ("terminate called
            # without an active exception", exit -6), and one such rank fails the whole launch. The likely path: a
            # C++ thread of torch's or gloo's that takes the GIL once Python 3.11 has begun finalizing is ended by
            # pthread_exit, whose unwinding through a noexcept destructor calls std::terminate. The command has
            # written, renamed and closed all it makes; only the streams are left to flush.
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise


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



@contextmanager
def user_errors() -> Iterator[None]:
    """A UserError in a command that is not a stage: one line and exit code 2, as stages do."""
    try:
        yield
    except UserError as e:
        fail(str(e))
