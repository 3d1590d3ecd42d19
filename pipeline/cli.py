"""The `gptpipe` command: a map from command name to the stage commands and the tools.

No stage runs through this module: DVC runs `python -m pipeline.<stage>`, so an edit here or in a tool reruns nothing.
"""

from __future__ import annotations

import typer

from pipeline.eval.command import evaluate
from pipeline.prepare.command import prepare
from pipeline.report.command import report
from pipeline.sample.command import sample
from pipeline.tokenize.command import tokenize
from pipeline.tools.commands import doctor, dvc_yaml, init, plan, recipe_app
from pipeline.train.command import train

app = typer.Typer(
    name="gptpipe",
    help="Train and fine-tune GPT-style models: prepare -> tokenize -> train -> evaluate -> sample.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
for command in (prepare, tokenize, train, evaluate, sample, report):
    app.command(epilog=command.epilog)(command)
app.add_typer(recipe_app, name="recipe")
app.command()(init)
app.command(name="dvc-yaml")(dvc_yaml)
app.command()(doctor)
app.command()(plan)

if __name__ == "__main__":
    app()
