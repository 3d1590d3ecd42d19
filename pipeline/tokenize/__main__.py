"""`python -m pipeline.tokenize`: the DVC stage `tokenize`, the same command as `gptpipe tokenize` (see `--help`)."""

from pipeline.console import run_stage
from pipeline.tokenize.command import tokenize

run_stage(tokenize, "tokenize")
