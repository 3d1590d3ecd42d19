"""`python -m pipeline.eval`: the DVC stage `evaluate`, the same command as `gptpipe evaluate` (see `--help`)."""

from pipeline.console import run_stage
from pipeline.eval.command import evaluate

run_stage(evaluate, "evaluate")
