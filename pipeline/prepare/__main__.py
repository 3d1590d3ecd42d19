"""`python -m pipeline.prepare`: the DVC stage `prepare`, the same command as `gptpipe prepare` (see `--help`)."""

from pipeline.console import run_stage
from pipeline.prepare.command import prepare

run_stage(prepare, "prepare")
