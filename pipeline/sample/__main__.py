"""`python -m pipeline.sample`: the DVC stage `sample`, the same command as `gptpipe sample` (see `--help`)."""

from pipeline.console import run_stage
from pipeline.sample.command import sample

run_stage(sample, "sample")
