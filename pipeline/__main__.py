"""`python -m pipeline <command>`: the same as `gptpipe <command>`."""

from pipeline.cli import app

app()
