"""`python -m pipeline <command>`: the same as `gptpipe <command>` (for `deepspeed --module pipeline ...` too)."""

from pipeline.cli import app

app()
